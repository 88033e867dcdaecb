//! Ordered delivery (issue 15), steady: producers committing single events at
//! `BENCH_ORDERED_STEADY_RATE` (2,000/s) for `BENCH_ORDERED_STEADY_SECS` (10 s), spread
//! over `BENCH_ORDERED_STEADY_KEYS` (1,000) keys with an `ordering_key`, against the same
//! producers without keys. The target: p99 from commit to receipt within twice the
//! unordered p99. An ordered event goes out at the earliest in the sequencer's second
//! run after its commit (docs/ordering.md, section 1), and a key gets an event every
//! half second, so nearly every event is its key's head when it is fanned out: what
//! this measures is the sequencer's horizon and hand-off, not a line.
//!
//! It reuses the `steady` scenario's machinery with keyed producers: every event of a
//! key is committed by the same producer connection, so a key's events commit in their
//! scheduled order and the receiver can check that order (the key and the place in
//! it ride in the payload, on both sides). Each round (`BENCH_ORDERED_STEADY_ROUNDS`)
//! runs both sides, each on a fresh database with a fresh in-process dispatcher
//! (push), unordered first in even rounds and ordered first in odd ones; the p99s are
//! compared round by round. Every receipt is checked (see `order`).

use serde_json::json;

use super::steady::{Producers, Steady, steady_in};
use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::interleave::{ratios_by_round, round_order};
use crate::report::{int, median, ms};

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let (rate, secs, keys) = (
        ctx.s.ordered_steady_rate,
        ctx.s.ordered_steady_secs,
        ctx.s.ordered_steady_keys,
    );
    let rounds = ctx.s.ordered_steady_rounds;
    let sides = [false, true];
    let mut outs: Vec<Vec<Steady>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        for s in round_order(sides.len(), round) {
            let ordered = sides[s];
            let tag = format!(
                "ordered_steady_{}_r{}",
                if ordered { "keys" } else { "none" },
                round + 1
            );
            let out = ctx
                .with_db(&tag, async |ctx, url, client| {
                    let producers = Producers::Keyed { keys, ordered };
                    steady_in(ctx, rate, secs, Mode::Push, producers, url, client).await
                })
                .await?;
            outs[s].push(out);
        }
    }
    let p99s = |s: usize| -> Vec<f64> { outs[s].iter().map(|o| o.p99).collect() };
    let ratios = ratios_by_round(&p99s(1), &p99s(0));
    let ratio = median(&ratios);
    let mut details = Vec::new();
    for (s, &ordered) in sides.iter().enumerate() {
        let label = format!(
            "ordered steady {}/s for {secs} s, {} keys{}",
            int(rate as f64),
            int(keys as f64),
            if ordered { "" } else { " (unordered twin)" }
        );
        for out in &outs[s] {
            ctx.report.cpu(&label, out.cpu, Some(out.committed as u64));
        }
        let p50 = median(&outs[s].iter().map(|o| o.p50).collect::<Vec<_>>());
        let p99 = median(&p99s(s));
        let p999 = median(&outs[s].iter().map(|o| o.p999).collect::<Vec<_>>());
        ctx.report.info(
            &label,
            &format!("p50 / p99.9 commit → receipt (median of {rounds})"),
            format!("{} / {}", ms(p50), ms(p999)),
        );
        if ordered {
            ctx.report.target(
                &label,
                &format!(
                    "p99 commit → receipt (median of {rounds}); vs the unordered twin by round ({})",
                    ratios
                        .iter()
                        .map(|r| format!("x{r:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                format!("{} (x{ratio:.2} the unordered)", ms(p99)),
                "<= 2 x unordered p99",
                ratio <= 2.0,
            );
            let violations: u64 = outs[s]
                .iter()
                .filter_map(|o| o.checked.as_ref())
                .map(|c| c.violations())
                .sum();
            let worst = outs[s]
                .iter()
                .filter_map(|o| o.checked.as_ref())
                .max_by_key(|c| c.violations())
                .map(|c| c.summary())
                .unwrap_or_default();
            ctx.report.target(
                &label,
                &format!("order violations over {rounds} runs (worst run's detail)"),
                format!("{violations}: {worst}"),
                "0",
                violations == 0,
            );
        } else {
            ctx.report.info(
                &label,
                &format!("p99 commit → receipt (median of {rounds})"),
                ms(p99),
            );
        }
        let kept = outs[s].iter().all(|o| o.kept_rate && o.kept_up);
        ctx.report.target(
            &label,
            "producers kept their rate; dispatcher delivered all within 5 s",
            format!(
                "{} ({} of {} delivered)",
                if kept { "yes" } else { "NO" },
                int(outs[s].iter().map(|o| o.delivered as f64).sum()),
                int(outs[s].iter().map(|o| o.committed as f64).sum())
            ),
            "yes",
            kept,
        );
        details.push(json!({
            "ordered": ordered,
            "median_p50_us": p50,
            "median_p99_us": p99,
            "median_p99_9_us": p999,
            "runs": outs[s].iter().map(|o| o.json.clone()).collect::<Vec<_>>(),
        }));
    }
    ctx.report.detail(
        "ordered_steady",
        json!({
            "rate": rate,
            "secs": secs,
            "keys": keys,
            "p99_ratio_ordered_to_unordered_by_round": ratios,
            "sides": details,
        }),
    );
    Ok(())
}
