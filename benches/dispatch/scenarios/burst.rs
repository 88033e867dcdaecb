//! Burst: `BENCH_BURST_EVENTS` events committed in one transaction to one endpoint,
//! and the time from that commit to the last receipt, in push mode and in pure-poll
//! mode. It measures the drain rate, the figure a backlog after an outage or a batch
//! job depends on. Each round bursts once per mode on a fresh database and dispatcher,
//! after an uncounted warm-up burst (so pools and keep-alive connections are open),
//! push first in even rounds and poll first in odd ones; poll mode is compared with
//! push round by round, by its drain from the first receipt, since from the commit a
//! poll burst also waits up to a tick. The push rate and the bench process's peak RSS
//! are kept for the fan-out comparison and the memory row.

use serde_json::{Value, json};

use crate::bursts::{BurstOut, BurstSpec, burst};
use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::interleave::{ratios_by_round, round_order};
use crate::report::{int, median, ms};
use crate::sys::Cpu;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let n = ctx.s.burst_events;
    let rounds = ctx.s.burst_repeats;
    let modes = [Mode::Push, Mode::Poll];
    // Paired like the scale-out rounds: round r bursts once in each mode (fresh
    // database and dispatcher, after a warm-up burst), push first in even rounds and
    // poll first in odd ones, so the poll-mode comparison is made within a round
    // instead of between two halves of the scenario that the machine's drift can set
    // 20% apart.
    let mut outs: Vec<Vec<BurstOut>> = vec![Vec::new(), Vec::new()];
    for round in 0..rounds {
        for m in round_order(modes.len(), round) {
            let mode = modes[m];
            let tag = format!("burst_{}_r{}", mode.label(), round + 1);
            let out = burst(ctx, BurstSpec {
                    tag: &tag,
                    events: n,
                    endpoints: 1,
                    mode,
                    history: 0,
                    repeats: Some(1),
                    warmup: true,
                })
                .await?;
            outs[m].push(out);
        }
    }
    let of =
        |m: usize, f: fn(&BurstOut) -> f64| -> Vec<f64> { outs[m].iter().map(f).collect() };
    // Poll mode's drain once the burst was found, against push's in the same round.
    // From the commit, a poll-mode burst also waits 0-1 s for the next tick, which is
    // as long as the whole burst takes at push speed; that wait is bounded by the
    // interval (as for idle events) and shown below.
    let ratios = ratios_by_round(&of(1, |o| o.rate_after_first), &of(0, |o| o.rate_after_first));
    for (m, &mode) in modes.iter().enumerate() {
        let label = format!("burst {} ({})", int(n as f64), mode.label());
        let mut cpu: Option<Cpu> = None;
        for out in &outs[m] {
            Cpu::accumulate(&mut cpu, &out.cpu);
        }
        let items = outs[m].iter().map(|o| o.items).sum();
        ctx.report
            .cpu(&label, cpu.unwrap_or_default(), Some(items));
        let rate = median(&of(m, |o| o.rate));
        let after_first = median(&of(m, |o| o.rate_after_first));
        if mode == Mode::Push {
            ctx.burst_push_rate = Some(rate);
            ctx.inproc_hwm_kib = outs[m]
                .iter()
                .filter_map(|o| o.hwm_kib.first().copied().flatten())
                .max();
            ctx.report.target(
                &label,
                &format!("deliveries/s, commit → last ack (median of {rounds})"),
                int(rate),
                ">= 20,000",
                rate >= 20_000.0,
            );
        } else {
            let ratio = median(&ratios);
            ctx.report.target(
                &label,
                &format!(
                    "deliveries/s from first receipt (median of {rounds}); vs push, paired by round (median)"
                ),
                format!("{} ({:+.0}% vs push)", int(after_first), (ratio - 1.0) * 100.0),
                "within 10% of push",
                ratio >= 0.9,
            );
            ctx.report.info(
                &label,
                "deliveries/s, commit → last ack, tick wait included (median)",
                int(rate),
            );
        }
        ctx.report.info(
            &label,
            "commit → first receipt; deliveries/s from first receipt (medians)",
            format!(
                "{}; {}",
                ms(median(&of(m, |o| o.first_wait_us))),
                int(after_first)
            ),
        );
        let rounds_json: Vec<Value> = outs[m].iter().map(|o| o.json.clone()).collect();
        let mut detail = json!({
            "mode": mode.label(),
            "median_deliveries_per_s": rate,
            "median_deliveries_per_s_after_first": after_first,
            "rounds": rounds_json,
        });
        if mode == Mode::Poll {
            detail["after_first_ratio_to_push_by_round"] = json!(ratios);
        }
        ctx.report
            .detail(&format!("burst_{}", mode.label()), detail);
    }
    if let Some(kib) = ctx.inproc_hwm_kib {
        ctx.report.info(
            "memory",
            "VmHWM of the bench process during the push bursts (dispatcher + harness)",
            format!("{:.1} MiB", kib as f64 / 1024.0),
        );
    }
    Ok(())
}
