//! One burst measurement, the machinery of the burst, fan-out, scale-out and history
//! scenarios: a fresh database with its endpoints (and history, if asked), dispatchers
//! started and asleep, then `events` committed in one transaction, and the time from
//! that commit to the last receipt. Rates count each (event, endpoint) once, at its
//! first receipt, so a duplicate delivery cannot inflate them; the CPU of every process
//! involved is sampled over the same window.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::{Mode, start, wait_ready};
use crate::latency::first_receipts;
use crate::pg;
use crate::report::{int, median, ms};
use crate::sys::Cpu;

/// One burst measurement's outcome.
pub struct BurstOut {
    /// Deliveries received over all repeats.
    pub items: u64,
    /// Medians of commit → first receipt (µs) and of deliveries/s after the first receipt.
    pub first_wait_us: f64,
    pub rate_after_first: f64,
    /// Median over the repeats of deliveries / (last receive - commit).
    pub rate: f64,
    /// That rate for each repeat.
    pub rates: Vec<f64>,
    pub cpu: Cpu,
    /// Peak RSS of each `outboxd run` process, or of this process for in-process runs.
    pub hwm_kib: Vec<Option<u64>>,
    pub json: Value,
}

/// One burst measurement: how many events, to how many endpoints, in which mode, on
/// how much history.
pub struct BurstSpec<'a> {
    pub tag: &'a str,
    pub events: u64,
    pub endpoints: u32,
    pub mode: Mode,
    pub history: u64,
    /// Bursts on this database; `BENCH_BURST_REPEATS` when `None`.
    pub repeats: Option<u64>,
    /// Deliver one uncounted burst first, so connections (PostgreSQL pools, HTTP
    /// keep-alive) are open before anything is measured.
    pub warmup: bool,
}

/// Commits `events` in one transaction, `repeats` times on one database with one set
/// of dispatchers, and measures commit → last receipt.
pub async fn burst(ctx: &mut Ctx, spec: BurstSpec<'_>) -> anyhow::Result<BurstOut> {
    ctx.with_db(spec.tag, async |ctx, url, client| {
        burst_in(ctx, &spec, url, client).await
    })
    .await
}

async fn burst_in(
    ctx: &mut Ctx,
    spec: &BurstSpec<'_>,
    url: &str,
    client: &mut Client,
) -> anyhow::Result<BurstOut> {
    pg::add_endpoints(client, (0..spec.endpoints).map(|i| ctx.receiver.url(i))).await?;
    let mut prefill_s = None;
    if spec.history > 0 {
        let started = Instant::now();
        let ep: i64 = client
            .query_one("SELECT min(id) FROM webhook_endpoints", &[])
            .await?
            .get(0);
        eprintln!(
            "bench:   prefilling {} delivered events of history ...",
            spec.history
        );
        pg::prefill_history(client, spec.history, ep, ctx.s.payload_bytes).await?;
        prefill_s = Some(started.elapsed().as_secs_f64());
        eprintln!(
            "bench:   prefill done in {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
    ctx.receiver.take().await?;
    // Reset this process's peak RSS so the in-process figure covers this burst only.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let running = start(ctx, url, client, spec.mode).await?;
    let probe = ctx.probe(running.pids());
    let expected = spec.events * u64::from(spec.endpoints);
    let timeout = Duration::from_secs(60 + expected / 1_000);
    let mut runs = Vec::new();
    let mut rates = Vec::new();
    let mut cpu: Option<Cpu> = None;
    let mut items = 0_u64;
    let mut waits = Vec::new();
    let mut after_firsts = Vec::new();
    let mut failure = None;
    if spec.warmup {
        pg::insert_burst(
            client,
            spec.events,
            ctx.s.payload_bytes,
            &format!("bench.{}.warmup", spec.tag),
        )
        .await?;
        ctx.receiver.wait_for(expected, timeout).await?;
        ctx.receiver.take().await?;
        pg::wait_settled(client, Duration::from_secs(60)).await?;
        wait_ready(client, spec.mode).await?;
    }
    for rep in 0..spec.repeats.unwrap_or(ctx.s.burst_repeats) {
        if rep > 0 {
            wait_ready(client, spec.mode).await?;
        }
        let (insert, commit_us) = pg::insert_burst(
            client,
            spec.events,
            ctx.s.payload_bytes,
            &format!("bench.{}", spec.tag),
        )
        .await?;
        let snap0 = probe.snap();
        let got = ctx.receiver.wait_for(expected, timeout).await?;
        let snap1 = probe.snap();
        let window = snap0.until(&snap1);
        let recs = ctx.receiver.take().await?;
        let settled = pg::wait_settled(client, Duration::from_secs(60)).await;
        let (first, dups) = first_receipts(&recs);
        let first_us = first.values().copied().min().unwrap_or(commit_us);
        let last_us = first.values().copied().max().unwrap_or(commit_us);
        let secs = (last_us - commit_us) as f64 / 1e6;
        let rate = first.len() as f64 / secs.max(1e-6);
        let after_first =
            (first.len().saturating_sub(1)) as f64 / ((last_us - first_us) as f64 / 1e6).max(1e-6);
        eprintln!(
            "bench:   {} ({}) run {}: {} deliveries in {:.3} s = {} /s (first after {}, insert+commit {} ms)",
            spec.tag,
            spec.mode.label(),
            rep + 1,
            first.len(),
            secs,
            int(rate),
            ms((first_us - commit_us) as f64),
            insert.as_millis()
        );
        runs.push(json!({
            "deliveries": first.len(),
            "expected": expected,
            "duplicates": dups,
            "receiver_count_at_end": got,
            "insert_and_commit_ms": insert.as_secs_f64() * 1e3,
            "commit_to_first_receipt_ms": (first_us - commit_us) as f64 / 1e3,
            "commit_to_last_receipt_ms": (last_us - commit_us) as f64 / 1e3,
            "commit_to_all_settled_ms": settled.as_ref().ok().map(|t| (t - commit_us) as f64 / 1e3),
            "deliveries_per_s": rate,
            "deliveries_per_s_after_first": after_first,
            "cpu": window.json(),
        }));
        Cpu::accumulate(&mut cpu, &window);
        items += first.len() as u64;
        if (first.len() as u64) < expected {
            failure = Some(format!(
                "only {} of {expected} deliveries arrived within {timeout:?}",
                first.len()
            ));
            break;
        }
        if let Err(e) = settled {
            failure = Some(format!("{e:#}"));
            break;
        }
        rates.push(rate);
        waits.push((first_us - commit_us) as f64);
        after_firsts.push(after_first);
    }
    let hwm_kib = running.vm_hwm_kib();
    let dispatcher = running.stop().await?;
    if let Some(f) = failure {
        bail!(f);
    }
    let rate = median(&rates);
    Ok(BurstOut {
        items,
        first_wait_us: median(&waits),
        rate_after_first: median(&after_firsts),
        rate,
        rates,
        cpu: cpu.unwrap_or_default(),
        hwm_kib: hwm_kib.clone(),
        json: json!({
            "mode": spec.mode.label(),
            "events": spec.events,
            "endpoints": spec.endpoints,
            "history_rows": spec.history,
            "history_prefill_s": prefill_s,
            "median_deliveries_per_s": rate,
            "runs": runs,
            "vm_hwm_kib": hwm_kib,
            "dispatcher_report": dispatcher,
        }),
    })
}
