//! History: the burst again on a database that already holds `BENCH_HISTORY_ROWS`
//! delivered events (with their deliveries and attempts). It measures whether the claim
//! stays as cheap when the tables are large: the claim's indexes must make finished rows
//! cost nothing. The empty-database baseline is measured before and after the history
//! bursts, and the figure is the median of both, so a machine drifting during the
//! scenario counts neither for nor against the history; the prefill is vacuumed,
//! analysed and checkpointed first, so its writes stay out of the bursts.

use serde_json::json;

use crate::bursts::{BurstSpec, burst};
use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::report::{int, median};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n = ctx.s.burst_events;
    let spec = |tag, history| BurstSpec {
        tag,
        events: n,
        endpoints: 1,
        mode: Mode::Push,
        history,
        repeats: None,
        warmup: false,
    };
    // The baseline is measured on both sides of the history bursts, minutes apart
    // at most, and its figure is the median of both sets, so a machine drifting
    // during the scenario does not count for or against the history.
    let before = burst(ctx, spec("history_empty_before", 0)).await?;
    let full = burst(ctx, spec("history_full", ctx.s.history_rows))
        .await?;
    let after = burst(ctx, spec("history_empty_after", 0)).await?;
    let empty_rate = median(&[before.rates.as_slice(), &after.rates].concat());
    let label = format!("history {} rows", int(ctx.s.history_rows as f64));
    ctx.report.cpu(&label, full.cpu, Some(full.items));
    ctx.report.target(
        &label,
        &format!(
            "deliveries/s, burst {} (empty db before and after: {})",
            int(n as f64),
            int(empty_rate)
        ),
        format!(
            "{} ({:+.0}%)",
            int(full.rate),
            (full.rate / empty_rate - 1.0) * 100.0
        ),
        "within 10% of empty",
        full.rate >= 0.9 * empty_rate,
    );
    ctx.report.detail(
        "history",
        json!({
            "empty_before": before.json,
            "empty_after": after.json,
            "empty_median_deliveries_per_s": empty_rate,
            "with_history": full.json,
        }),
    );
    Ok(())
}
