//! Steady: producers committing single events at a fixed rate (`BENCH_STEADY_RATES`)
//! for `BENCH_STEADY_SECS`, in push and pure-poll mode. It measures latency under
//! load, the tail above all (p99, p99.9, receipts stalled over 100 ms), and whether
//! the dispatcher keeps up. The producers follow a schedule (event i is due at
//! i / rate) rather than a closed loop, so a slow dispatcher cannot slow the
//! producers down and hide its own latency; they use enough connections that
//! fsync'd commits keep the schedule, and report whether they did.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::latency::{latencies, split_latency, stalls};
use crate::pg;
use crate::report::{int, ms, pct};
use crate::sys::{Cpu, now_us};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    for rate in ctx.s.steady_rates.clone() {
        for mode in [Mode::Push, Mode::Poll] {
            steady_at(ctx, rate, mode).await?;
        }
    }
    Ok(())
}

/// One steady run. Targets are for push mode; pure-poll mode's latency is bounded by
/// its tick, and the table shows it.
async fn steady_at(ctx: &mut Ctx, rate: u64, mode: Mode) -> anyhow::Result<()> {
    let push = mode == Mode::Push;
    let tag = if push {
        format!("steady_{rate}")
    } else {
        format!("steady_{rate}_{}", mode.label())
    };
    let out = ctx
        .with_db(&tag, async |ctx, url, client| {
            let secs = ctx.s.steady_secs;
            steady_in(ctx, rate, secs, mode, Producers::Shared, url, client).await
        })
        .await?;
    let label = format!(
        "steady {}/s for {} s ({})",
        int(rate as f64),
        ctx.s.steady_secs,
        mode.label()
    );
    ctx.report.cpu(&label, out.cpu, Some(out.committed as u64));
    ctx.report
        .info(&label, "p50 commit → receipt", ms(out.p50));
    // The targets are for push mode at the higher rate.
    let has_target = rate >= 2_000 && push;
    ctx.report.target_if(
        has_target,
        &label,
        "p99 commit → receipt",
        ms(out.p99),
        "< 10 ms",
        out.p99 < 10_000.0,
    );
    ctx.report
        .info(&label, "p99.9 commit → receipt", ms(out.p999));
    ctx.report.info(
        &label,
        "events over 100 ms; longest gap between receipts",
        format!("{}; {}", int(out.slow as f64), ms(out.max_gap_us)),
    );
    ctx.report.info(
        &label,
        "producer kept its rate",
        format!(
            "{} ({} /s achieved, {} conns, p99 schedule lag {})",
            if out.kept_rate { "yes" } else { "NO" },
            int(out.achieved),
            out.conns,
            ms(out.lag_p99)
        ),
    );
    let up = format!(
        "{} of {} delivered, last {} after the last commit",
        int(out.delivered as f64),
        int(out.committed as f64),
        ms(out.drain_us)
    );
    ctx.report.target_if(
        has_target,
        &label,
        "dispatcher kept up",
        up,
        "all within 5 s",
        out.kept_up,
    );
    ctx.report.detail(&tag, out.json);
    Ok(())
}

/// How the steady producers are arranged. `Shared`: every connection takes the next
/// event due (the `steady` scenario). `Keyed`: event `i` has key `k{i % keys}` (in its
/// payload, and as `ordering_key` if `ordered`) and every event of a key is committed
/// by the same connection, so that a key's events commit in the order they were
/// scheduled and the receiver can check that order (the `ordered_steady` scenario and
/// its unordered twin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Producers {
    Shared,
    Keyed { keys: u64, ordered: bool },
}

/// One steady run on the database at `url`: producers at `rate` for `secs`, the
/// dispatchers of `mode`, and the latencies and order of what arrived.
pub async fn steady_in(
    ctx: &mut Ctx,
    rate: u64,
    secs: u64,
    mode: Mode,
    producers: Producers,
    url: &str,
    client: &Client,
) -> anyhow::Result<Steady> {
    let running = match producers {
        Producers::Shared => ctx.start_one_endpoint(url, client, mode).await?,
        Producers::Keyed { .. } => {
            pg::add_endpoints(client, [ctx.receiver.ordered_url(0)]).await?;
            ctx.receiver.take().await?;
            ctx.receiver.take_ordered().await?;
            crate::dispatcher::start(ctx, url, client, mode).await?
        }
    };
    let probe = ctx.probe(Vec::new());
    // Enough connections that fsync'd commits (group commit) keep the schedule.
    let conns = (rate / 125).clamp(4, 32);
    let mut connections = Vec::new();
    for _ in 0..conns {
        connections.push(pg::connect(url).await?);
    }
    let total = rate * secs;
    let duration = Duration::from_secs(secs);
    let next = Arc::new(AtomicU64::new(0));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let t0_us = now_us() + 100_000;
    let hard_end = t0 + duration + Duration::from_secs(10);
    let payload = Arc::new(pg::payload(0, ctx.s.payload_bytes));
    let bytes = ctx.s.payload_bytes;
    let mut tasks = Vec::new();
    for (c, mut producer) in connections.into_iter().enumerate() {
        let (next, payload) = (Arc::clone(&next), Arc::clone(&payload));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            // A keyed connection's own events, in schedule order: those of its keys.
            let mut own = (0..total).filter(move |i| match producers {
                Producers::Shared => false,
                Producers::Keyed { keys, .. } => (i % keys) % conns == c as u64,
            });
            loop {
                let i = match producers {
                    Producers::Shared => next.fetch_add(1, Ordering::Relaxed),
                    Producers::Keyed { .. } => own.next().unwrap_or(total),
                };
                if i >= total {
                    break;
                }
                let due = t0 + Duration::from_nanos(i * 1_000_000_000 / rate);
                tokio::time::sleep_until(due).await;
                let now = tokio::time::Instant::now();
                if now >= hard_end {
                    break;
                }
                let lag = now.duration_since(due).as_micros() as f64;
                let (id, commit_us) = match producers {
                    Producers::Shared => {
                        pg::produce_one(&mut producer, &payload, "bench.steady").await?
                    }
                    Producers::Keyed { keys, ordered } => {
                        let key = format!("k{}", i % keys);
                        let body = pg::keyed_payload(&key, i / keys, bytes);
                        pg::produce_keyed(
                            &mut producer,
                            &body,
                            "bench.steady",
                            ordered.then_some(key.as_str()),
                        )
                        .await?
                    }
                };
                out.push((id, commit_us, lag));
            }
            anyhow::Ok(out)
        }));
    }
    tokio::time::sleep_until(t0).await;
    let snap0 = probe.snap();
    let mut commits = Vec::new();
    let mut lags = Vec::new();
    for task in tasks {
        for (id, commit_us, lag) in task.await?? {
            commits.push((id, commit_us));
            lags.push(lag);
        }
    }
    let snap1 = probe.snap();
    let last_commit = commits.iter().map(|c| c.1).max().unwrap_or(t0_us);
    let got = ctx
        .receiver
        .wait_for(commits.len() as u64, Duration::from_secs(10))
        .await?;
    let recs = ctx.receiver.take().await?;
    let _ = pg::wait_settled(client, Duration::from_secs(10)).await;
    let starts = pg::attempt_starts(client).await?;
    let checked = match producers {
        Producers::Shared => None,
        Producers::Keyed { .. } => {
            let counts = ctx.receiver.take_ordered().await?;
            Some(crate::order::check(client, &recs, counts).await?)
        }
    };
    let dispatcher = running.stop().await?;
    let lat = latencies(&commits, &recs);
    let split = split_latency(&commits, &recs, &starts);
    let stalls = stalls(&recs, &lat, 100_000);
    lags.sort_by(f64::total_cmp);
    let achieved = commits.len() as f64 / ((last_commit - t0_us) as f64 / 1e6).max(1e-6);
    let kept_rate = commits.len() as u64 == total && achieved >= 0.98 * rate as f64;
    let drain_us = (lat.last_receipt_us - last_commit) as f64;
    let kept_up = lat.delivered == commits.len() && drain_us <= 5e6;
    let cpu = snap0.until(&snap1);
    eprintln!(
        "bench:   steady {rate}/s ({}{}): {} committed ({} /s), {} delivered, p50 {} p99 {}",
        mode.label(),
        match producers {
            Producers::Shared => String::new(),
            Producers::Keyed { keys, ordered } => format!(
                ", {} keys{}",
                keys,
                if ordered { ", ordered" } else { ", not ordered" }
            ),
        },
        commits.len(),
        int(achieved),
        lat.delivered,
        ms(pct(&lat.sorted, 50.0)),
        ms(pct(&lat.sorted, 99.0))
    );
    Ok(Steady {
        p50: pct(&lat.sorted, 50.0),
        p99: pct(&lat.sorted, 99.0),
        p999: pct(&lat.sorted, 99.9),
        lag_p99: pct(&lags, 99.0),
        achieved,
        kept_rate,
        kept_up,
        conns,
        committed: commits.len(),
        delivered: lat.delivered,
        drain_us,
        slow: stalls["events_over_100ms"].as_u64().unwrap_or(0),
        max_gap_us: stalls["max_receipt_gap_us"].as_f64().unwrap_or(0.0),
        cpu,
        json: json!({
            "rate": rate,
            "mode": mode.label(),
            "secs": secs,
            "producers": format!("{producers:?}"),
            "producer_connections": conns,
            "scheduled": total,
            "committed": commits.len(),
            "achieved_per_s": achieved,
            "schedule_lag_us": {"p50": pct(&lags, 50.0), "p99": pct(&lags, 99.0), "max": lags.last()},
            "producer_kept_rate": kept_rate,
            "delivered": lat.delivered,
            "receiver_count": got,
            "last_receipt_after_last_commit_ms": drain_us / 1e3,
            "dispatcher_kept_up": kept_up,
            "latency_us": lat.json(),
            "split_us": split,
            "stalls": stalls,
            "order": checked.as_ref().map(crate::order::Checked::json),
            "cpu": cpu.json(),
            "dispatcher_report": dispatcher,
        }),
        checked,
    })
}

/// One steady run's figures.
pub struct Steady {
    pub slow: u64,
    pub max_gap_us: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub lag_p99: f64,
    pub achieved: f64,
    pub kept_rate: bool,
    pub kept_up: bool,
    pub conns: u64,
    pub committed: usize,
    pub delivered: usize,
    pub drain_us: f64,
    pub cpu: Cpu,
    pub json: Value,
    /// The order checks, for keyed producers.
    pub checked: Option<crate::order::Checked>,
}
