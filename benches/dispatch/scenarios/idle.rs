//! Idle: single events `BENCH_IDLE_GAP_MS` apart, each committed alone to an idle
//! dispatcher. It measures commit → receipt latency when the dispatcher is asleep,
//! the path of the doorbell (NOTIFY, the LISTEN session, a wake-up, a claim), in push
//! mode, in pure-poll mode (bounded by the tick), and with two `outboxd run` processes:
//! with several dispatchers each wake-up wakes all of them, and the doorbell's gate
//! must stay open for whichever sleeps. The latency is split at the attempt's start
//! (wake-up and claim versus the HTTP request) in the JSON.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::latency::{latencies, split_latency};
use crate::pg;
use crate::report::{ms, pct};

/// Single events, `gap` apart: commit → receipt latency.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    // Two `outboxd run` processes too: with several dispatchers, each wake-up
    // wakes all of them, and the doorbell's gate must stay open for whichever
    // sleeps (a late close that shut it cost up to a recheck or poll tick).
    let mut modes = vec![Mode::Push, Mode::Poll];
    if ctx.outboxd_bin.is_file() {
        modes.push(Mode::Procs(2));
    } else {
        eprintln!(
            "bench:   {} not found: idle with 2 processes skipped",
            ctx.outboxd_bin.display()
        );
    }
    for mode in modes {
        let tag = match mode {
            Mode::Procs(n) => format!("idle_procs_{n}"),
            _ => format!("idle_{}", mode.label()),
        };
        let (p50, p99, json) = ctx
            .with_db(&tag, async |ctx, url, client| {
                idle_in(ctx, mode, url, client).await
            })
            .await?;
        let label = format!(
            "idle {} x 1 event, {} ms apart ({})",
            ctx.s.idle_events,
            ctx.s.idle_gap_ms,
            mode.label()
        );
        let push = mode == Mode::Push;
        ctx.report.target_if(
            push,
            &label,
            "p50 commit → receipt",
            ms(p50),
            "< 1.5 ms",
            p50 < 1_500.0,
        );
        ctx.report.target_if(
            push,
            &label,
            "p99 commit → receipt",
            ms(p99),
            "< 3 ms",
            p99 < 3_000.0,
        );
        ctx.report.detail(&tag, json);
    }
    Ok(())
}

async fn idle_in(
    ctx: &mut Ctx,
    mode: Mode,
    url: &str,
    client: &Client,
) -> anyhow::Result<(f64, f64, Value)> {
    let running = ctx.start_one_endpoint(url, client, mode).await?;
    let mut producer = pg::connect(url).await?;
    let payload = pg::payload(0, ctx.s.payload_bytes);
    let gap = Duration::from_millis(ctx.s.idle_gap_ms);
    let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut commits = Vec::new();
    for i in 0..ctx.s.idle_events {
        tokio::time::sleep_until(t0 + gap * i as u32).await;
        commits.push(pg::produce_one(&mut producer, &payload, "bench.idle").await?);
    }
    let extra = if mode == Mode::Poll {
        ctx.poll_interval()
    } else {
        Duration::ZERO
    };
    let got = ctx
        .receiver
        .wait_for(ctx.s.idle_events, Duration::from_secs(5) + extra)
        .await?;
    let recs = ctx.receiver.take().await?;
    pg::wait_settled(client, Duration::from_secs(10)).await?;
    let starts = pg::attempt_starts(client).await?;
    let dispatcher = running.stop().await?;
    let lat = latencies(&commits, &recs);
    let split = split_latency(&commits, &recs, &starts);
    if lat.delivered < commits.len() {
        bail!(
            "{mode:?}: only {} of {} idle events arrived (receiver count {got})",
            lat.delivered,
            commits.len()
        );
    }
    let (p50, p99) = (pct(&lat.sorted, 50.0), pct(&lat.sorted, 99.0));
    let json = json!({
        "mode": mode.label(),
        "events": commits.len(),
        "gap_ms": ctx.s.idle_gap_ms,
        "latency_us": lat.json(),
        "split_us": split,
        "dispatcher_report": dispatcher,
    });
    Ok((p50, p99, json))
}
