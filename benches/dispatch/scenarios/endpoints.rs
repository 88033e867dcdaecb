//! Many endpoints (issue 16): a burst of `BENCH_BURST_EVENTS` events spread over n
//! endpoints, each endpoint subscribed to its own event type and each event of one of
//! those types, so that every event goes to exactly one endpoint: the shape of a
//! platform with an endpoint per customer. n is 1, 1,000 and 10,000
//! (`BENCH_ENDPOINTS_SIZES`). A delivery should cost the same whatever the number of
//! endpoints that do not receive it: the target is at least 70% of the single-endpoint
//! rate with 1,000 endpoints.
//!
//! Each round (`BENCH_BURST_REPEATS`) runs every size once, on a fresh database with
//! the endpoints registered in one statement after the schema's statistics were taken
//! (as when a platform registers its customers between two autovacuum passes) and a
//! fresh in-process dispatcher, after an uncounted warm-up burst; sizes run forward in
//! even rounds and backward in odd ones, and each size's rate is compared with the
//! single endpoint's of the same round. Every receipt is checked: each event reached
//! its own endpoint and no other.

use std::time::Duration;

use anyhow::bail;
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::{self, Mode};
use crate::interleave::{ratios_by_round, round_order};
use crate::latency::first_receipts;
use crate::pg;
use crate::report::{int, median};
use crate::sys::{Cpu, Probe, now_us};

/// Endpoint counts compared, the first being the reference (`BENCH_ENDPOINTS_SIZES`).
const SIZES: &[u64] = &[1, 1_000, 10_000];
/// The size the target is set for.
const TARGET_SIZE: u64 = 1_000;
/// Events of the uncounted warm-up burst (pools, keep-alive connections, plans).
const WARMUP_EVENTS: u64 = 2_000;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let sizes = sizes()?;
    let events = ctx.s.burst_events;
    let rounds = ctx.s.burst_repeats;
    // rates[s][round]
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); sizes.len()];
    let mut cpus: Vec<Option<Cpu>> = vec![None; sizes.len()];
    let mut runs: Vec<Vec<Value>> = vec![Vec::new(); sizes.len()];
    for round in 0..rounds {
        for s in round_order(sizes.len(), round) {
            let n = sizes[s];
            let tag = format!("endpoints_{n}_r{}", round + 1);
            let (rate, cpu, detail) = ctx
                .with_db(&tag, async |ctx, url, client| {
                    spread_burst(ctx, url, client, n, events).await
                })
                .await?;
            Cpu::accumulate(&mut cpus[s], &cpu);
            eprintln!(
                "bench:   endpoints round {}: {} events over {} endpoints: {} deliveries/s",
                round + 1,
                int(events as f64),
                int(n as f64),
                int(rate)
            );
            rates[s].push(rate);
            runs[s].push(detail);
        }
    }
    let mut details = Vec::new();
    for (s, &n) in sizes.iter().enumerate() {
        let label = format!(
            "many endpoints: {} events, each to 1 of {}",
            int(events as f64),
            int(n as f64)
        );
        ctx.report.cpu(
            &format!("endpoints: 1 of {}", int(n as f64)),
            cpus[s].unwrap_or_default(),
            Some(events * rounds),
        );
        let rate = median(&rates[s]);
        let ratios = ratios_by_round(&rates[s], &rates[0]);
        let ratio = median(&ratios);
        let value = format!("{} ({:.0}% of 1)", int(rate), ratio * 100.0);
        let metric = format!(
            "deliveries/s, commit → last receipt (median of {rounds}); vs {} endpoint, by round",
            sizes[0]
        );
        if s == 0 {
            ctx.report.info(
                &label,
                &format!("deliveries/s, commit → last receipt (median of {rounds})"),
                int(rate),
            );
        } else if n == TARGET_SIZE {
            ctx.report
                .target(&label, &metric, value, ">= 70% of 1 endpoint", ratio >= 0.7);
        } else {
            ctx.report.info(&label, &metric, value);
        }
        details.push(json!({
            "endpoints": n,
            "median_deliveries_per_s": rate,
            "ratio_to_first_size_by_round": ratios,
            "rounds": runs[s],
        }));
    }
    ctx.report.detail("endpoints", json!(details));
    Ok(())
}

fn sizes() -> anyhow::Result<Vec<u64>> {
    let Ok(list) = std::env::var("BENCH_ENDPOINTS_SIZES") else {
        return Ok(SIZES.to_vec());
    };
    let sizes = list
        .split(',')
        .map(|s| s.trim().parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("BENCH_ENDPOINTS_SIZES={list:?}: {e}"))?;
    if sizes.is_empty() || sizes.contains(&0) {
        bail!("BENCH_ENDPOINTS_SIZES={list:?}: endpoint counts of 1 or more");
    }
    Ok(sizes)
}

/// Registers `n` endpoints, endpoint `i` at the receiver's `/hook/{i}` and subscribed
/// to `bench.endpoints.{i}` only, in one statement (10,000 registrations one by one
/// would take longer than the burst). No ANALYZE: the statistics are those of the empty
/// table, as after a bulk registration.
async fn add_filtered_endpoints(ctx: &Ctx, client: &Client, n: u64) -> anyhow::Result<()> {
    let urls: Vec<String> = (0..n as u32).map(|i| ctx.receiver.url(i)).collect();
    // A fixed, valid secret: signing costs the same whatever its value.
    let added = client
        .execute(
            "INSERT INTO webhook_endpoints (url, secret, event_types, description)
             SELECT u, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                    ARRAY['bench.endpoints.' || (i - 1)], 'bench'
             FROM unnest($1::text[]) WITH ORDINALITY AS t(u, i)",
            &[&urls],
        )
        .await?;
    if added != n {
        bail!("registered {added} endpoints, expected {n}");
    }
    Ok(())
}

/// Commits `events` events in one transaction, event `k` (from 0) of type
/// `bench.endpoints.{k % n}`; returns the first event's id and the commit time.
async fn insert_spread(
    client: &mut Client,
    events: u64,
    n: u64,
    bytes: usize,
) -> anyhow::Result<(i64, i64)> {
    let payload = pg::payload(0, bytes).to_string();
    let tx = client.transaction().await?;
    let first: i64 = tx
        .query_one(
            "WITH e AS (
                 INSERT INTO webhook_outbox (event_type, payload)
                 SELECT 'bench.endpoints.' || (k % $2::int8), $3::text::jsonb
                 FROM generate_series(0, $1::int8 - 1) AS k
                 RETURNING id)
             SELECT min(id) FROM e",
            &[&(events as i64), &(n as i64), &payload],
        )
        .await?
        .get(0);
    tx.commit().await?;
    Ok((first, now_us()))
}

/// One burst of `events` over `n` fresh endpoints on the database at `url`, after a
/// warm-up burst: its rate, where the CPU went, and its detail for the report.
async fn spread_burst(
    ctx: &mut Ctx,
    url: &str,
    client: &mut Client,
    n: u64,
    events: u64,
) -> anyhow::Result<(f64, Cpu, Value)> {
    add_filtered_endpoints(ctx, client, n).await?;
    ctx.receiver.take().await?;
    let running = dispatcher::start(ctx, url, client, Mode::Push).await?;
    let probe = ctx.probe(running.pids());
    let result = async {
        deliver_spread(ctx, &probe, client, n, WARMUP_EVENTS.min(events)).await?;
        deliver_spread(ctx, &probe, client, n, events).await
    }
    .await;
    // Stopped whatever happened, so a failed size does not leave a dispatcher running.
    let stopped = running.stop().await;
    let measured = result?;
    stopped?;
    Ok(measured)
}

/// Commits a spread burst, waits for every delivery, checks each event reached its own
/// endpoint only, and waits for every outcome to be settled.
async fn deliver_spread(
    ctx: &mut Ctx,
    probe: &Probe,
    client: &mut Client,
    n: u64,
    events: u64,
) -> anyhow::Result<(f64, Cpu, Value)> {
    let timeout = Duration::from_secs(60 + events / 200);
    let (first_id, commit_us) = insert_spread(client, events, n, ctx.s.payload_bytes).await?;
    let snap0 = probe.snap();
    let got = ctx.receiver.wait_for(events, timeout).await?;
    let cpu = snap0.until(&probe.snap());
    let recs = ctx.receiver.take().await?;
    let (first, duplicates) = first_receipts(&recs);
    if (first.len() as u64) < events {
        bail!(
            "{n} endpoints: {} of {events} deliveries arrived within {timeout:?} (receiver count {got})",
            first.len()
        );
    }
    if let Some((id, ep)) = first
        .keys()
        .find(|(id, ep)| (id - first_id).rem_euclid(n as i64) != i64::from(*ep))
    {
        bail!("{n} endpoints: event {id} reached endpoint {ep}");
    }
    pg::wait_settled(client, Duration::from_secs(60)).await?;
    let last_us = first.values().copied().max().unwrap_or(commit_us);
    let secs = (last_us - commit_us) as f64 / 1e6;
    let rate = first.len() as f64 / secs.max(1e-6);
    let detail = json!({
        "endpoints": n,
        "deliveries": first.len(),
        "duplicates": duplicates,
        "commit_to_last_receipt_ms": secs * 1e3,
        "deliveries_per_s": rate,
        "cpu": cpu.json(),
    });
    Ok((rate, cpu, detail))
}
