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
            steady_in(ctx, rate, mode, url, client).await
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

async fn steady_in(
    ctx: &mut Ctx,
    rate: u64,
    mode: Mode,
    url: &str,
    client: &Client,
) -> anyhow::Result<Steady> {
    let running = ctx.start_one_endpoint(url, client, mode).await?;
    let probe = ctx.probe(Vec::new());
    // Enough connections that fsync'd commits (group commit) keep the schedule.
    let conns = (rate / 125).clamp(4, 32);
    let mut producers = Vec::new();
    for _ in 0..conns {
        producers.push(pg::connect(url).await?);
    }
    let total = rate * ctx.s.steady_secs;
    let duration = Duration::from_secs(ctx.s.steady_secs);
    let next = Arc::new(AtomicU64::new(0));
    let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
    let t0_us = now_us() + 100_000;
    let hard_end = t0 + duration + Duration::from_secs(10);
    let payload = Arc::new(pg::payload(0, ctx.s.payload_bytes));
    let mut tasks = Vec::new();
    for mut producer in producers {
        let (next, payload) = (Arc::clone(&next), Arc::clone(&payload));
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
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
                let (id, commit_us) =
                    pg::produce_one(&mut producer, &payload, "bench.steady").await?;
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
        "bench:   steady {rate}/s ({}): {} committed ({} /s), {} delivered, p50 {} p99 {}",
        mode.label(),
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
            "secs": ctx.s.steady_secs,
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
            "cpu": cpu.json(),
            "dispatcher_report": dispatcher,
        }),
    })
}

struct Steady {
    slow: u64,
    max_gap_us: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    lag_p99: f64,
    achieved: f64,
    kept_rate: bool,
    kept_up: bool,
    conns: u64,
    committed: usize,
    delivered: usize,
    drain_us: f64,
    cpu: Cpu,
    json: Value,
}
