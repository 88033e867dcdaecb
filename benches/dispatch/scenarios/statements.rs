//! Statements: what sending the claim unnamed (`WEBHOOK_PREPARED_STATEMENTS=off`, for
//! transaction-mode poolers that cannot keep prepared statements) costs against the
//! prepared claim, per call: on an empty queue (the wake-up path) and taking full
//! batches from a backlog (a burst). Two dispatcher sessions, one per form, take turns
//! call by call on the same database, so both see the same queue and the same machine.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher;
use crate::pg;
use crate::report::{median, ms, pct};

/// Both forms, in turn, on one fresh database.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    let json = ctx
        .with_db("statements", async |ctx, url, client| {
            statements_in(ctx, url, client).await
        })
        .await?;
    ctx.report.detail("statements", json);
    Ok(())
}

async fn statements_in(ctx: &mut Ctx, url: &str, client: &Client) -> anyhow::Result<Value> {
    use outboxd::claim;
    pg::add_endpoints(client, [ctx.receiver.url(0)]).await?;
    let config = dispatcher::config(false, ctx.poll_interval());
    let sessions = outboxd::db::Connector::new(url, outboxd::db::Session::dispatcher(&config))?;
    let prepared_conn = sessions.connect().await?;
    let unnamed_conn = sessions.connect().await?;
    let statement = prepared_conn
        .prepare_typed(claim::CLAIM_FAST, claim::CLAIM_FAST_TYPES)
        .await?;
    let lease = Duration::from_secs(600);
    let batch = config.batch_size;
    let budget = claim::PayloadBudget::from_config(&config);
    // Nothing in flight and no cap below a batch: the statement's own cost.
    let loads = claim::Loads::idle(batch);
    let (mut prepared, mut unnamed) = (Vec::new(), Vec::new());
    // The claim the dispatcher makes in both cases (no limits), prepared or unnamed.
    let claim_once = async |prepared: bool| {
        let (within, fast) = ((&budget, &loads), claim::Form::Fast);
        if prepared {
            let conn = &prepared_conn;
            claim::claim_prepared(conn, &statement, "bench-p", lease, batch, within, fast).await
        } else {
            claim::claim_unnamed(&unnamed_conn, "bench-u", lease, batch, within, fast).await
        }
    };

    // Idle: the claim a wake-up makes, on an empty queue.
    let idle_calls = if ctx.s.quick { 300 } else { 3_000 };
    for i in 0..idle_calls {
        for first in [i % 2 == 0, i % 2 != 0] {
            let t = Instant::now();
            claim_once(first).await?;
            if first {
                prepared.push(t.elapsed().as_secs_f64() * 1e6);
            } else {
                unnamed.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
    }
    let idle = (std::mem::take(&mut prepared), std::mem::take(&mut unnamed));

    // A burst: full batches from a backlog, the two forms in turn.
    let events = ctx.s.burst_events;
    client
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT 'bench.statements', jsonb_build_object('n', g)
             FROM generate_series(1, $1::int) g",
            &[&(events as i32)],
        )
        .await?;
    client
        .batch_execute("VACUUM ANALYZE webhook_outbox")
        .await?;
    let mut turn = 0u64;
    loop {
        let t = Instant::now();
        let got = claim_once(turn % 2 == 0).await?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if got.claimed.len() < batch as usize {
            break;
        }
        if turn % 2 == 0 {
            prepared.push(us);
        } else {
            unnamed.push(us);
        }
        turn += 1;
    }
    let burst = (prepared, unnamed);

    let mut json = serde_json::Map::new();
    for (label, (p, u)) in [
        ("idle (empty queue)", &idle),
        ("burst (full batches)", &burst),
    ] {
        let (mut p, mut u) = (p.clone(), u.clone());
        p.sort_by(f64::total_cmp);
        u.sort_by(f64::total_cmp);
        let scenario = format!("claim per call, {label}, batch {batch}");
        for (form, v) in [("prepared", &p), ("unnamed", &u)] {
            ctx.report
                .info(&scenario, &format!("p50 {form}"), ms(median(v)));
            ctx.report
                .info(&scenario, &format!("p99 {form}"), ms(pct(v, 99.0)));
        }
        ctx.report.info(
            &scenario,
            "unnamed - prepared (p50)",
            ms(median(&u) - median(&p)),
        );
        json.insert(
            label.to_owned(),
            json!({
                "calls": [p.len(), u.len()],
                "prepared_p50_us": median(&p), "prepared_p99_us": pct(&p, 99.0),
                "unnamed_p50_us": median(&u), "unnamed_p99_us": pct(&u, 99.0),
            }),
        );
    }
    Ok(Value::Object(json))
}
