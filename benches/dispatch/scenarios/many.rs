//! The many-endpoints scenario: a burst whose events each go to one endpoint among 1,
//! 1,000 or 10,000, each endpoint subscribed to its own event type (a platform with an
//! endpoint per customer). A delivery should cost the same whatever the number of
//! endpoints that do not receive it: target, at least 70% of the single-endpoint rate
//! with 1,000 endpoints (issue 16).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::bail;
use serde_json::json;
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::{Mode, start};
use crate::latency::first_receipts;
use crate::pg;
use crate::report::{int, median};
use crate::settings::{env_list, env_u64};

/// Endpoint counts, each on a database of its own (`BENCH_MANY_ENDPOINTS`).
const DEFAULT_SIZES: &[u64] = &[1, 1_000, 10_000];

/// Registers `n` endpoints `/hook/0` .. `/hook/{n-1}`, endpoint `i` subscribed to
/// `bench.many.i` only, in one statement (10,000 registrations one by one would take
/// longer than the burst).
async fn add_filtered_endpoints(ctx: &Ctx, client: &Client, n: u64) -> anyhow::Result<()> {
    let urls: Vec<String> = (0..n as u32).map(|i| ctx.receiver.url(i)).collect();
    // A fixed, valid secret: signing costs the same whatever its value.
    client
        .execute(
            "INSERT INTO webhook_endpoints (url, secret, event_types, description)
             SELECT u, 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
                    ARRAY['bench.many.' || (i - 1)], 'bench'
             FROM unnest($1::text[]) WITH ORDINALITY AS t(u, i)",
            &[&urls],
        )
        .await?;
    client.batch_execute("ANALYZE webhook_endpoints").await?;
    Ok(())
}

/// Commits `events` events in one transaction, event `k` of type `bench.many.{k % n}`;
/// returns the commit time.
async fn insert_spread(
    client: &mut Client,
    events: u64,
    n: u64,
    bytes: usize,
) -> anyhow::Result<i64> {
    let payload = json!({ "pad": "x".repeat(bytes.saturating_sub(12)) }).to_string();
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT 'bench.many.' || (k % $2::int8), $3::text::jsonb
             FROM generate_series(0, $1::int8 - 1) AS k",
            &[&(events as i64), &(n as i64), &payload],
        )
        .await?;
    tx.commit().await?;
    let commit_us = crate::sys::now_us();
    if inserted != events {
        bail!("inserted {inserted} events, expected {events}");
    }
    Ok(commit_us)
}

/// See the module's documentation. `BENCH_MANY_EVENTS` (default: the burst size)
/// events per burst, `BENCH_BURST_REPEATS` bursts per size after a warm-up one.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.many().await
}

impl Ctx {
    async fn many(&mut self) -> anyhow::Result<()> {
        let sizes = env_list("BENCH_MANY_ENDPOINTS", DEFAULT_SIZES)?;
        let events = env_u64("BENCH_MANY_EVENTS", self.s.burst_events)?;
        let mut rates: HashMap<u64, f64> = HashMap::new();
        let mut details = Vec::new();
        for &n in &sizes {
            let (rate, runs) = self
                .with_db(&format!("many_{n}"), async |ctx, url, client| {
                    ctx.many_in(url, client, n, events).await
                })
                .await?;
            rates.insert(n, rate);
            details.push(json!({ "endpoints": n, "median_deliveries_per_s": rate, "runs": runs }));
        }
        let one = rates.get(&1).copied();
        for &n in &sizes {
            let label = format!(
                "many endpoints: {} x 1 of {}",
                int(events as f64),
                int(n as f64)
            );
            let rate = rates[&n];
            match one {
                Some(one) if n == 1_000 => self.report.target(
                    &label,
                    "deliveries/s (median); vs 1 endpoint",
                    format!("{} ({:+.0}%)", int(rate), (rate / one - 1.0) * 100.0),
                    ">= 70% of 1 endpoint",
                    rate >= 0.7 * one,
                ),
                Some(one) if n != 1 => self.report.info(
                    &label,
                    "deliveries/s (median); vs 1 endpoint",
                    format!("{} ({:+.0}%)", int(rate), (rate / one - 1.0) * 100.0),
                ),
                _ => self.report.info(&label, "deliveries/s (median)", int(rate)),
            }
        }
        self.report.detail("many", json!(details));
        Ok(())
    }

    async fn many_in(
        &mut self,
        url: &str,
        client: &mut Client,
        n: u64,
        events: u64,
    ) -> anyhow::Result<(f64, Vec<serde_json::Value>)> {
        add_filtered_endpoints(self, client, n).await?;
        self.receiver.take().await?;
        let running = start(self, url, client, Mode::Push).await?;
        let timeout = Duration::from_secs(60 + events / 200);
        let mut rates = Vec::new();
        let mut runs = Vec::new();
        let mut failure = None;
        // A warm-up burst first (connections, plans), not counted.
        for rep in 0..=self.s.burst_repeats {
            // Errors end the loop, not the function: the dispatcher must be stopped.
            let burst = async {
                let commit_us = insert_spread(client, events, n, self.s.payload_bytes).await?;
                let got = self.receiver.wait_for(events, timeout).await?;
                anyhow::Ok((commit_us, got, self.receiver.take().await?))
            };
            let (commit_us, got, recs) = match burst.await {
                Ok(burst) => burst,
                Err(e) => {
                    failure = Some(format!("{e:#}"));
                    break;
                }
            };
            let settled = pg::wait_settled(client, Duration::from_secs(60)).await;
            let (first, dups) = first_receipts(&recs);
            if (first.len() as u64) < events {
                failure = Some(format!(
                    "{n} endpoints: only {} of {events} deliveries arrived within {timeout:?} \
                     (receiver count {got})",
                    first.len()
                ));
                break;
            }
            // Each event went to its own endpoint and no other: event k of the burst
            // (from 0, ids taken in order) to endpoint k % n.
            let first_id = first.keys().map(|(id, _)| *id).min().unwrap_or(0);
            if let Some((id, ep)) = first
                .keys()
                .find(|(id, ep)| (id - first_id).rem_euclid(n as i64) != i64::from(*ep))
            {
                failure = Some(format!("event {id} reached endpoint {ep}"));
                break;
            }
            if let Err(e) = settled {
                failure = Some(format!("{e:#}"));
                break;
            }
            let last_us = first.values().copied().max().unwrap_or(commit_us);
            let secs = (last_us - commit_us) as f64 / 1e6;
            let rate = first.len() as f64 / secs.max(1e-6);
            eprintln!(
                "bench:   many ({n} endpoints) run {rep}{}: {} deliveries in {secs:.3} s = {} /s \
                 ({dups} duplicates)",
                if rep == 0 { " (warm-up)" } else { "" },
                first.len(),
                int(rate),
            );
            if rep > 0 {
                rates.push(rate);
                runs.push(json!({
                    "deliveries": first.len(),
                    "duplicates": dups,
                    "commit_to_last_receipt_ms": secs * 1e3,
                    "deliveries_per_s": rate,
                }));
            }
        }
        running.stop().await?;
        if let Some(f) = failure {
            bail!(f);
        }
        Ok((median(&rates), runs))
    }
}
