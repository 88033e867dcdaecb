//! Backlog: `BENCH_BACKLOG_EVENTS` (200,000) events committed at once to one endpoint,
//! ten times a burst: what a dispatcher finds after an outage or behind a batch job.
//! The drain rate must not fall with the size of what waits: each claim reads only what
//! it takes, and nothing in its plan may cost more as the outbox grows (with JIT, the
//! claim's estimated cost crossed `jit_above_cost` past ~20,000 waiting events, and each
//! claim paid ~150 ms compiling). Compared with the push burst's rate when the burst
//! scenario ran before it.

use serde_json::json;

use crate::bursts::{BurstSpec, burst};
use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::report::{int, ms};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n = ctx.s.backlog_events;
    let out = burst(ctx, BurstSpec {
        tag: "backlog",
        events: n,
        endpoints: 1,
        mode: Mode::Push,
        history: 0,
        repeats: Some(1),
        warmup: true,
    })
    .await?;
    let label = format!("backlog {} (push)", int(n as f64));
    ctx.report.cpu(&label, out.cpu, Some(out.items));
    match ctx.burst_push_rate {
        Some(burst_rate) => {
            let ratio = out.rate / burst_rate;
            ctx.report.target(
                &label,
                "deliveries/s, commit → last ack; vs the 20,000-event burst",
                format!("{} ({:.0}%)", int(out.rate), ratio * 100.0),
                ">= 70% of the burst",
                ratio >= 0.7,
            );
        }
        None => ctx.report.info(
            &label,
            "deliveries/s, commit → last ack (run the burst scenario too to compare)",
            int(out.rate),
        ),
    }
    ctx.report.info(
        &label,
        "commit → first receipt; deliveries/s from first receipt",
        format!("{}; {}", ms(out.first_wait_us), int(out.rate_after_first)),
    );
    ctx.report.detail(
        "backlog",
        json!({ "events": n, "deliveries_per_s": out.rate, "round": out.json }),
    );
    Ok(())
}
