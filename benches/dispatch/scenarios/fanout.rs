//! Fan-out: `BENCH_FANOUT_EVENTS` events, each to `BENCH_FANOUT_ENDPOINTS` endpoints,
//! committed in one transaction. It measures whether a delivery costs the same when
//! events fan out (one claim yields several deliveries per event, the payload is shared)
//! as in the one-endpoint burst, so its rate is compared with the push burst's when the
//! burst scenario ran before it. The pure-poll run is shown beside it, by its drain
//! from the first receipt, since from the commit it also waits for a tick.

use crate::bursts::{BurstSpec, burst};
use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::report::int;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (n, k) = (ctx.s.fanout_events, ctx.s.fanout_endpoints as u32);
    let out = burst(ctx, BurstSpec {
            tag: "fanout",
            events: n,
            endpoints: k,
            mode: Mode::Push,
            history: 0,
            repeats: None,
            warmup: false,
        })
        .await?;
    let label = format!(
        "fan-out {} x {k} = {}",
        int(n as f64),
        int((n * u64::from(k)) as f64)
    );
    ctx.report.cpu(&label, out.cpu, Some(out.items));
    match ctx.burst_push_rate {
        Some(burst) => ctx.report.target(
            &label,
            &format!(
                "deliveries/s (median of {}); burst push {}",
                ctx.s.burst_repeats,
                int(burst)
            ),
            format!(
                "{} ({:+.0}%)",
                int(out.rate),
                (out.rate / burst - 1.0) * 100.0
            ),
            "same as burst (>= 90%)",
            out.rate >= 0.9 * burst,
        ),
        None => ctx.report.info(
            &label,
            "deliveries/s (burst not run: no comparison)",
            int(out.rate),
        ),
    }
    ctx.report.detail("fanout", out.json);

    // Pure-poll mode: the same drain once the tick has found the events (a full
    // batch is claimed again at once in either mode); from the commit it also waits
    // for the tick.
    let push_after_first = out.rate_after_first;
    let poll = burst(ctx, BurstSpec {
            tag: "fanout_poll",
            events: n,
            endpoints: k,
            mode: Mode::Poll,
            history: 0,
            repeats: None,
            warmup: false,
        })
        .await?;
    let poll_label = format!("{label} (poll)");
    ctx.report.cpu(&poll_label, poll.cpu, Some(poll.items));
    ctx.report.info(
        &poll_label,
        "deliveries/s from first receipt (median), vs push's; commit → last ack",
        format!(
            "{} ({:+.0}% vs push); {}",
            int(poll.rate_after_first),
            (poll.rate_after_first / push_after_first - 1.0) * 100.0,
            int(poll.rate)
        ),
    );
    ctx.report.detail("fanout_poll", poll.json);
    Ok(())
}
