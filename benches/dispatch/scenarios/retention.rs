//! Retention: what a pass of the library's `retention::prune` costs on a database
//! that holds `BENCH_RETENTION_KEPT` rows it must keep. It measures that a pass costs
//! what it prunes, not what it keeps: the kept rows (dead within their retention,
//! parked under a disabled endpoint, retries due tomorrow) are all older than the
//! delivered retention, so a scan that walked them would show here. No dispatcher runs.

use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::pg;
use crate::report::{fmt_secs, int};

/// Retention with `BENCH_RETENTION_KEPT` rows it must keep (dead within their
/// retention, parked under a disabled endpoint, retries due tomorrow, all of events
/// older than the delivered retention): a first pass, then a pass that prunes
/// `BENCH_RETENTION_EXPIRED` expired events behind them, then one that prunes
/// `BENCH_RETENTION_BULK`. No dispatcher runs; passes call the library's `prune`
/// with a budget that never ends them.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.with_db("retention", async |ctx, url, client| {
        retention_in(ctx, url, client).await
    })
    .await
}

async fn retention_in(ctx: &mut Ctx, url: &str, client: &Client) -> anyhow::Result<()> {
    use outboxd::retention::{Pruned, RetentionPolicy, prune};
    let (kept, expired, bulk) = (
        ctx.s.retention_kept,
        ctx.s.retention_expired,
        ctx.s.retention_bulk,
    );
    pg::add_endpoints(client, (0..2).map(|i| ctx.receiver.url(i))).await?;
    let ids: Vec<i64> = client
        .query("SELECT id FROM webhook_endpoints ORDER BY id", &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let (active, disabled) = (ids[0], ids[1]);
    outboxd::endpoint::disable(client, disabled, "bench").await?;
    eprintln!("bench:   prefilling {} kept rows ...", int(kept as f64));
    let started = Instant::now();
    pg::prefill_kept(client, kept, active, disabled).await?;
    let prefill_s = started.elapsed().as_secs_f64();
    eprintln!("bench:   prefill done in {prefill_s:.1} s");

    let pool = outboxd::db::admin_pool(url).await?;
    let policy = RetentionPolicy {
        delivered: Duration::from_secs(72 * 3600),
        dead: Duration::from_secs(720 * 3600),
    };
    let pass = async |what: &str, rows: u64| -> anyhow::Result<(f64, Pruned)> {
        pg::prefill_expired(client, rows, active).await?;
        let started = Instant::now();
        let pruned = prune(&pool, policy, Duration::from_secs(24 * 3600)).await?;
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "bench:   {what}: {} s, pruned {} events (scanned {})",
            fmt_secs(secs),
            pruned.events,
            pruned.scanned
        );
        if (pruned.deliveries, pruned.attempts, pruned.events) != (rows, rows, rows) {
            bail!("{what} pruned {pruned:?}, expected {rows} of each");
        }
        Ok((secs, pruned))
    };
    let first = pass("first pass", expired).await?;
    let next = pass("next pass", expired).await?;
    let bulk_pass = pass("bulk pass", bulk).await?;

    let label = format!("retention, {} kept rows", int(kept as f64));
    ctx.report.target(
        &label,
        &format!(
            "a pass pruning {} expired events behind them (the first pass: {} s)",
            int(expired as f64),
            fmt_secs(first.0)
        ),
        format!("{} s", fmt_secs(next.0)),
        "< 1 s",
        next.0 < 1.0,
    );
    ctx.report.target(
        &label,
        &format!(
            "a pass pruning {} expired events with deliveries and attempts",
            int(bulk as f64)
        ),
        format!("{} s", fmt_secs(bulk_pass.0)),
        "< 10 s",
        bulk_pass.0 < 10.0,
    );
    ctx.report
        .info(&label, "prefill", format!("{prefill_s:.0} s"));
    let pass_json = |(secs, pruned): (f64, Pruned)| {
        json!({
            "seconds": secs,
            "deliveries": pruned.deliveries,
            "attempts": pruned.attempts,
            "events": pruned.events,
            "scanned": pruned.scanned,
        })
    };
    ctx.report.detail(
        "retention",
        json!({
            "kept_rows": kept,
            "prefill_s": prefill_s,
            "first_pass": pass_json(first),
            "next_pass": pass_json(next),
            "bulk_pass": pass_json(bulk_pass),
        }),
    );
    Ok(())
}
