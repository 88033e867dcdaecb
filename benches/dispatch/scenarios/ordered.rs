//! Ordered delivery (issue 15), bursts: `BENCH_ORDERED_EVENTS` events committed in one
//! transaction with an `ordering_key`, spread over 1,000, 10 and 1 keys
//! (`BENCH_ORDERED_KEYS`), each key's events in a row in the order they were inserted,
//! against the same burst without keys. The target: over 1,000 keys, at least 70% of
//! the unordered rate. Over 10 keys and 1 key a burst is bound by how fast one key can
//! go (one delivery at a time), so those bursts are smaller (`BENCH_ORDERED_PER_KEY`
//! events a key) and their rate is shown with what bounds it: the time between two
//! deliveries of a key, split into the request (send start → receipt) and the turn
//! between the receiver's answer and the next send start (the settle, the promotion of
//! the next in line, the wake-up and the claim), beside the receiver's round trip
//! measured on its own (POSTs one after another from this process over one keep-alive
//! connection).
//!
//! Each round (`BENCH_BURST_REPEATS`) runs the unordered burst and every key count once,
//! each on a fresh database with a fresh in-process dispatcher (push) after an uncounted
//! warm-up burst of the same shape, forward in even rounds and backward in odd ones;
//! each ordered rate is compared with the unordered one of its round. Both sides carry
//! the same payloads (key and place in the payload, ~`BENCH_PAYLOAD_BYTES`) to the same
//! receiver path, which reads them: only `ordering_key` differs. Every receipt is
//! checked (see `order`): no two requests of a key in flight at once, no event of a key
//! before an earlier one. The unordered burst is checked the same way, for comparison:
//! nothing keeps two of its events of a key from being in flight together.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::{self, Mode};
use crate::interleave::{ratios_by_round, round_order};
use crate::latency::first_receipts;
use crate::order::{self, Checked};
use crate::pg;
use crate::report::{int, median, ms, pct};
use crate::sys::{Cpu, Probe};

/// The key count the 70% target is set for.
const TARGET_KEYS: u64 = 1_000;
/// Warm-up events at most (pools, keep-alive connections, prepared statements).
const WARMUP_EVENTS: u64 = 2_000;

/// One burst's outcome.
struct Out {
    rate: f64,
    cpu: Cpu,
    checked: Checked,
    json: Value,
}

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    // None: the unordered twin, the reference of each round.
    let sides: Vec<Option<u64>> = std::iter::once(None)
        .chain(ctx.s.ordered_keys.iter().copied().map(Some))
        .collect();
    let rounds = ctx.s.burst_repeats;
    // The receiver's own round trip, for the one-key pace.
    let body = pg::keyed_payload("k0", 0, ctx.s.payload_bytes).to_string();
    let round_trips = ctx.receiver.round_trips(200, body).await?;
    let mut outs: Vec<Vec<Out>> = (0..sides.len()).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for s in round_order(sides.len(), round) {
            let keys = sides[s];
            let events = events_for(ctx, keys);
            let tag = format!(
                "ordered_{}_r{}",
                keys.map_or("none".into(), |k| k.to_string()),
                round + 1
            );
            let out = ctx
                .with_db(&tag, async |ctx, url, client| {
                    burst_on(ctx, url, client, keys, events).await
                })
                .await?;
            eprintln!(
                "bench:   ordered round {}: {} events over {}: {} deliveries/s, violations {}",
                round + 1,
                int(events as f64),
                keys.map_or("no keys".into(), |k| format!("{} keys", int(k as f64))),
                int(out.rate),
                out.checked.violations()
            );
            outs[s].push(out);
        }
    }
    let rates = |s: usize| -> Vec<f64> { outs[s].iter().map(|o| o.rate).collect() };
    let mut details = Vec::new();
    for (s, &keys) in sides.iter().enumerate() {
        let events = events_for(ctx, keys);
        let label = match keys {
            None => format!("ordered: unordered twin, {}", int(events as f64)),
            Some(k) => format!(
                "ordered: burst {} over {} key{}",
                int(events as f64),
                int(k as f64),
                if k == 1 { "" } else { "s" }
            ),
        };
        let mut cpu: Option<Cpu> = None;
        for out in &outs[s] {
            Cpu::accumulate(&mut cpu, &out.cpu);
        }
        ctx.report
            .cpu(&label, cpu.unwrap_or_default(), Some(events * rounds));
        let rate = median(&rates(s));
        let ratios = ratios_by_round(&rates(s), &rates(0));
        let ratio = median(&ratios);
        let rate_metric = format!("deliveries/s, commit → last receipt (median of {rounds})");
        let pooled = |f: fn(&Checked) -> &Vec<f64>| -> Vec<f64> {
            let mut v: Vec<f64> = outs[s].iter().flat_map(|o| f(&o.checked).clone()).collect();
            v.sort_by(f64::total_cmp);
            v
        };
        let (cycle, request, turn) = (
            pooled(|c| &c.cycle_us),
            pooled(|c| &c.request_us),
            pooled(|c| &c.turnaround_us),
        );
        match keys {
            None => {
                ctx.report.info(&label, &rate_metric, int(rate));
                let (ooo, overlap): (u64, u64) = outs[s].iter().fold((0, 0), |(a, b), o| {
                    (
                        a + o.checked.receiver.out_of_order,
                        b + o.checked.receiver.overlaps + o.checked.sent_early,
                    )
                });
                ctx.report.info(
                    &label,
                    "the same checks on these unordered events (no order promised: shown, not a target)",
                    format!(
                        "{} out of order, {} in flight beside another of their key",
                        int(ooo as f64),
                        int(overlap as f64)
                    ),
                );
            }
            Some(k) => {
                let value = format!("{} ({:.0}% of unordered)", int(rate), ratio * 100.0);
                let metric = format!(
                    "{rate_metric}; vs the unordered twin by round ({})",
                    ratios
                        .iter()
                        .map(|r| format!("{:.0}%", r * 100.0))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if k == TARGET_KEYS {
                    ctx.report
                        .target(&label, &metric, value, ">= 70% of unordered", ratio >= 0.7);
                } else {
                    ctx.report.info(&label, &metric, value);
                }
                ctx.report.info(
                    &label,
                    "one key's pace: receipt → next receipt of the key = request + answer → next send start (p50)",
                    format!(
                        "{} = {} + {}",
                        ms(pct(&cycle, 50.0)),
                        ms(pct(&request, 50.0)),
                        ms(pct(&turn, 50.0))
                    ),
                );
                if k == 1 {
                    ctx.report.info(
                        &label,
                        "the receiver's round trip alone, p50 / p99 (one keep-alive connection)",
                        format!(
                            "{} / {}",
                            ms(pct(&round_trips, 50.0)),
                            ms(pct(&round_trips, 99.0))
                        ),
                    );
                }
                let violations: u64 = outs[s].iter().map(|o| o.checked.violations()).sum();
                let worst = outs[s]
                    .iter()
                    .max_by_key(|o| o.checked.violations())
                    .map(|o| o.checked.summary())
                    .unwrap_or_default();
                ctx.report.target(
                    &label,
                    &format!("order violations over {rounds} bursts (worst burst's detail)"),
                    format!("{violations}: {worst}"),
                    "0",
                    violations == 0,
                );
            }
        }
        details.push(json!({
            "keys": keys,
            "ordered": keys.is_some(),
            "events": events,
            "median_deliveries_per_s": rate,
            "ratio_to_unordered_by_round": ratios,
            "rounds": outs[s].iter().map(|o| o.json.clone()).collect::<Vec<_>>(),
        }));
    }
    ctx.report.detail(
        "ordered",
        json!({
            "receiver_round_trip_us": {
                "p50": pct(&round_trips, 50.0),
                "p99": pct(&round_trips, 99.0),
                "count": round_trips.len(),
            },
            "sides": details,
        }),
    );
    Ok(())
}

/// A side's burst size: the full burst without keys, else `BENCH_ORDERED_PER_KEY` a key
/// up to the full burst.
fn events_for(ctx: &Ctx, keys: Option<u64>) -> u64 {
    match keys {
        None => ctx.s.ordered_events,
        Some(k) => ctx
            .s
            .ordered_events
            .min(k.saturating_mul(ctx.s.ordered_per_key)),
    }
}

/// One side's measured burst on a fresh database, after a warm-up burst of its shape.
/// `keys` `None`: the unordered twin, whose payloads are spread over the largest key
/// count (only the receiver reads them).
async fn burst_on(
    ctx: &mut Ctx,
    url: &str,
    client: &mut Client,
    keys: Option<u64>,
    events: u64,
) -> anyhow::Result<Out> {
    pg::add_endpoints(client, [ctx.receiver.ordered_url(0)]).await?;
    ctx.receiver.take().await?;
    ctx.receiver.take_ordered().await?;
    let running = dispatcher::start(ctx, url, client, Mode::Push).await?;
    let probe = ctx.probe(running.pids());
    let spread = keys.unwrap_or_else(|| ctx.s.ordered_keys.iter().copied().max().unwrap_or(1));
    let result = async {
        let warmup = WARMUP_EVENTS.min(events / 10).max(1);
        deliver(ctx, &probe, client, keys, spread, warmup).await?;
        dispatcher::wait_ready(client, Mode::Push).await?;
        deliver(ctx, &probe, client, keys, spread, events).await
    }
    .await;
    // Stopped whatever happened, so a failed side does not leave a dispatcher running.
    let stopped = running.stop().await;
    let (out, dispatcher) = (result?, stopped?);
    let mut out = out;
    out.json["dispatcher_report"] = dispatcher;
    Ok(out)
}

/// Commits a keyed burst, waits for every delivery and for every outcome to be
/// settled, and checks the order of what arrived.
async fn deliver(
    ctx: &mut Ctx,
    probe: &Probe,
    client: &mut Client,
    keys: Option<u64>,
    spread: u64,
    events: u64,
) -> anyhow::Result<Out> {
    // Generous: one key goes at a few hundred a second at best.
    let timeout = Duration::from_secs(60 + events / 100);
    let (insert, commit_us) = pg::insert_keyed_burst(
        client,
        events,
        spread,
        keys.is_some(),
        ctx.s.payload_bytes,
        "bench.ordered",
    )
    .await?;
    let snap0 = probe.snap();
    let got = ctx.receiver.wait_for(events, timeout).await?;
    let cpu = snap0.until(&probe.snap());
    let recs = ctx.receiver.take().await?;
    let counts = ctx.receiver.take_ordered().await?;
    let (first, duplicates) = first_receipts(&recs);
    if (first.len() as u64) < events {
        bail!(
            "{} of {events} deliveries arrived within {timeout:?} (receiver count {got})",
            first.len()
        );
    }
    let settled = pg::wait_settled(client, Duration::from_secs(60)).await?;
    let checked = order::check(client, &recs, counts).await?;
    let first_us = first.values().copied().min().unwrap_or(commit_us);
    let last_us = first.values().copied().max().unwrap_or(commit_us);
    let secs = (last_us - commit_us) as f64 / 1e6;
    let rate = first.len() as f64 / secs.max(1e-6);
    let json = json!({
        "keys": keys,
        "events": events,
        "deliveries": first.len(),
        "duplicates": duplicates,
        "insert_and_commit_ms": insert.as_secs_f64() * 1e3,
        "commit_to_first_receipt_ms": (first_us - commit_us) as f64 / 1e3,
        "commit_to_last_receipt_ms": secs * 1e3,
        "commit_to_all_settled_ms": (settled - commit_us) as f64 / 1e3,
        "deliveries_per_s": rate,
        "order": checked.json(),
        "cpu": cpu.json(),
    });
    Ok(Out {
        rate,
        cpu,
        checked,
        json,
    })
}
