//! Database side of the benchmark: a fresh database per scenario, producers, bulk
//! history, and waiting for the dispatcher to be ready or done.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::sys::now_us;

/// The URL of database `name` on the server of `admin_url` (URL or key=value form).
pub fn db_url(admin_url: &str, name: &str) -> anyhow::Result<String> {
    if admin_url.starts_with("postgres://") || admin_url.starts_with("postgresql://") {
        let mut url = url::Url::parse(admin_url).context("parsing DATABASE_URL")?;
        url.set_path(&format!("/{name}"));
        Ok(url.to_string())
    } else {
        Ok(format!("{admin_url} dbname={name}"))
    }
}

/// One plain connection (synchronous_commit as the server has it: on by default).
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    Ok(outboxd::db::connect(url).await?)
}

/// Creates database `name` (dropping a leftover of the same name) and migrates it.
pub async fn create_db(
    admin: &Client,
    admin_url: &str,
    name: &str,
) -> anyhow::Result<(String, Client)> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await?;
    let url = db_url(admin_url, name)?;
    let mut client = connect(&url).await?;
    outboxd::schema::migrate(&mut client).await?;
    Ok((url, client))
}

/// Drops a scenario's database.
pub async fn drop_db(admin: &Client, name: &str) -> anyhow::Result<()> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// A JSON payload of about `bytes` bytes (as jsonb renders it).
pub fn payload(seq: u64, bytes: usize) -> Value {
    let base = json!({"seq": seq, "order_id": format!("ord_{seq:010}"), "amount_cents": 4_999, "currency": "EUR", "pad": ""});
    let pad = bytes.saturating_sub(base.to_string().len() + 8);
    json!({"seq": seq, "order_id": format!("ord_{seq:010}"), "amount_cents": 4_999, "currency": "EUR", "pad": "x".repeat(pad)})
}

/// Commits `n` events in one transaction with one multi-row INSERT; returns how long
/// the INSERT and COMMIT took and the time COMMIT returned (CLOCK_REALTIME µs).
pub async fn insert_burst(
    client: &mut Client,
    n: u64,
    bytes: usize,
    event_type: &str,
) -> anyhow::Result<(Duration, i64)> {
    let payloads: Vec<String> = (0..n).map(|i| payload(i, bytes).to_string()).collect();
    let started = Instant::now();
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload)
             SELECT $1, p::jsonb FROM unnest($2::text[]) AS p",
            &[&event_type, &payloads],
        )
        .await?;
    commit_burst(tx, inserted, n, started).await
}

/// Commits a burst's transaction, whose INSERT made `inserted` rows of the `n` expected;
/// returns how long the INSERT and COMMIT took since `started` and the time COMMIT
/// returned (CLOCK_REALTIME µs).
async fn commit_burst(
    tx: tokio_postgres::Transaction<'_>,
    inserted: u64,
    n: u64,
    started: Instant,
) -> anyhow::Result<(Duration, i64)> {
    tx.commit().await?;
    let commit_us = now_us();
    if inserted != n {
        bail!("inserted {inserted} events, expected {n}");
    }
    Ok((started.elapsed(), commit_us))
}

/// Enqueues one event in its own transaction through the library, as an application
/// does; returns the event id and the time COMMIT returned.
pub async fn produce_one(
    client: &mut Client,
    payload: &Value,
    event_type: &str,
) -> anyhow::Result<(i64, i64)> {
    let tx = client.transaction().await?;
    let id = outboxd::enqueue(&tx, &outboxd::NewEvent::new(event_type, payload))
        .await?
        .context("enqueue returned no id")?;
    tx.commit().await?;
    Ok((id, now_us()))
}

/// Registers `k` endpoints, numbered 0..k, all pointing at the receiver.
pub async fn add_endpoints(
    client: &Client,
    urls: impl IntoIterator<Item = String>,
) -> anyhow::Result<()> {
    for url in urls {
        outboxd::endpoint::add(
            client,
            outboxd::NewEndpoint {
                url,
                description: "bench".into(),
                ..Default::default()
            },
        )
        .await?;
    }
    Ok(())
}

async fn wait_until(
    client: &Client,
    sql: &str,
    timeout: Duration,
    what: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok: bool = client.query_one(sql, &[]).await?.get(0);
        if ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `listeners` LISTEN sessions of outboxd are connected to this database
/// and the doorbell is armed with its gate open, i.e. the dispatchers are idle and waiting for a push.
pub async fn wait_push_ready(
    client: &Client,
    listeners: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT (SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database()
                    AND application_name = 'outboxd-listener') >= {listeners}
            AND (SELECT armed FROM webhook_doorbell WHERE id = 1)
            AND pg_sequence_last_value('webhook_doorbell_gate') IS NULL"
    );
    wait_until(client, &sql, timeout, "the dispatcher to arm the doorbell").await
}

/// Waits until at least `connections` dispatcher pool connections exist on this
/// database (each dispatcher opens at least one).
pub async fn wait_pool_ready(
    client: &Client,
    connections: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let sql = format!(
        "SELECT count(*) >= {connections} FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'outboxd'"
    );
    wait_until(client, &sql, timeout, "the dispatchers to connect").await
}

/// Waits until every event is fanned out and every delivery settled as delivered;
/// returns the time it noticed (CLOCK_REALTIME µs).
pub async fn wait_settled(client: &Client, timeout: Duration) -> anyhow::Result<i64> {
    let sql = "SELECT NOT EXISTS (SELECT 1 FROM webhook_outbox
                              WHERE processed_at IS NULL AND ordering_key IS NULL)
                  AND NOT EXISTS (SELECT 1 FROM webhook_ordering_log)
                  AND NOT EXISTS (SELECT 1 FROM webhook_deliveries WHERE state <> 'delivered')";
    wait_until(client, sql, timeout, "every delivery to be settled").await?;
    Ok(now_us())
}

/// Enables or disables the notify trigger, which keeps the definition the migrations
/// installed (sql/0004_doorbell_gate.sql). A disabled trigger costs an insert nothing.
pub async fn set_trigger(client: &Client, on: bool) -> anyhow::Result<()> {
    let sql = if on {
        "ALTER TABLE webhook_outbox ENABLE TRIGGER webhook_outbox_notify"
    } else {
        "ALTER TABLE webhook_outbox DISABLE TRIGGER webhook_outbox_notify"
    };
    client.batch_execute(sql).await?;
    Ok(())
}

/// Fills the tables with `rows` events already delivered to endpoint `endpoint_id`
/// (outbox rows processed, deliveries `delivered`, one attempt each), then VACUUM
/// ANALYZE, as a database looks after months of traffic without retention.
pub async fn prefill_history(
    client: &Client,
    rows: u64,
    endpoint_id: i64,
    bytes: usize,
) -> anyhow::Result<()> {
    let pad = bytes.saturating_sub(90).max(1) as i32;
    in_chunks(client, rows, 250_000, |n| {
        format!(
            "WITH ev AS (
                 INSERT INTO webhook_outbox (event_type, payload, deliver_after, created_at, processed_at)
                 SELECT 'bench.history',
                        jsonb_build_object('seq', g, 'order_id', 'ord_' || lpad(g::text, 10, '0'),
                                           'amount_cents', 4999, 'currency', 'EUR',
                                           'pad', repeat('x', {pad})),
                        now() - interval '1 day', now() - interval '1 day', now() - interval '1 day'
                 FROM generate_series(1, {n}) AS g
                 RETURNING id, created_at
             ), dl AS (
                 INSERT INTO webhook_deliveries
                     (event_id, endpoint_id, state, attempts, next_attempt_at, last_status,
                      created_at, updated_at, delivered_at)
                 SELECT id, {endpoint_id}, 'delivered', 1, created_at, 204,
                        created_at, created_at, created_at
                 FROM ev
             )
             INSERT INTO webhook_attempts
                 (event_id, endpoint_id, attempt, started_at, duration_ms, status_code,
                  response_excerpt, worker_id)
             SELECT id, {endpoint_id}, 1, created_at, 2, 204, '', 'bench-history'
             FROM ev"
        )
    })
    .await?;
    settle_prefill(
        client,
        &["webhook_outbox", "webhook_deliveries", "webhook_attempts"],
    )
    .await
}

/// Runs `sql(n)` for chunks of at most `chunk` rows until `rows` are written: a
/// statement per chunk, so no single transaction of a prefill grows without bound.
async fn in_chunks(
    client: &Client,
    rows: u64,
    chunk: u64,
    sql: impl Fn(i64) -> String,
) -> anyhow::Result<()> {
    let mut done = 0_u64;
    while done < rows {
        let n = chunk.min(rows - done) as i64;
        client.batch_execute(&sql(n)).await?;
        done += n as u64;
    }
    Ok(())
}

/// After a prefill: VACUUM ANALYZE `tables`, so the measurement runs on settled
/// statistics and a set visibility map, then a checkpoint. The prefill wrote more WAL
/// than max_wal_size, so a checkpoint is due; taking it now keeps its writes out of the
/// measurement that follows. It needs superuser or pg_checkpoint (PostgreSQL 15), so it
/// is best effort on a borrowed server.
async fn settle_prefill(client: &Client, tables: &[&str]) -> anyhow::Result<()> {
    for table in tables {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    if let Err(e) = client.batch_execute("CHECKPOINT").await {
        eprintln!("bench:   CHECKPOINT after the prefill failed ({e}); measuring anyway");
    }
    Ok(())
}

/// Fills the tables with `rows` events 100 hours old that retention must keep, each with
/// one delivery: a third dead (within the 30-day dead retention), a third parked under
/// the disabled endpoint `disabled`, a third retries of `active` due tomorrow. Then
/// VACUUM ANALYZE and a checkpoint, as for the history.
pub async fn prefill_kept(
    client: &Client,
    rows: u64,
    active: i64,
    disabled: i64,
) -> anyhow::Result<()> {
    in_chunks(client, rows, 1_000_000, |n| {
        format!(
            "WITH ev AS (
                 INSERT INTO webhook_outbox (event_type, payload, deliver_after, created_at, processed_at)
                 SELECT 'bench.kept', '{{}}', t, t, t
                 FROM generate_series(1, {n}) AS g, (SELECT now() - interval '100 hours' AS t) AS at
                 RETURNING id, created_at
             )
             INSERT INTO webhook_deliveries
                 (event_id, endpoint_id, state, attempts, next_attempt_at, last_status,
                  created_at, updated_at)
             SELECT id,
                    CASE id % 3 WHEN 1 THEN {disabled} ELSE {active} END,
                    CASE id % 3 WHEN 0 THEN 'dead' WHEN 1 THEN 'parked' ELSE 'pending' END,
                    CASE id % 3 WHEN 1 THEN 0 ELSE 3 END,
                    CASE id % 3 WHEN 2 THEN now() + interval '1 day' ELSE created_at END,
                    CASE id % 3 WHEN 1 THEN NULL ELSE 500 END,
                    created_at, created_at
             FROM ev"
        )
    })
    .await?;
    settle_prefill(client, &["webhook_outbox", "webhook_deliveries"]).await
}

/// Adds `rows` events 100 hours old, each delivered to `endpoint` then (one delivery,
/// one attempt): all past the 72-hour delivered retention.
pub async fn prefill_expired(client: &Client, rows: u64, endpoint: i64) -> anyhow::Result<()> {
    let sql = format!(
        "WITH ev AS (
             INSERT INTO webhook_outbox (event_type, payload, deliver_after, created_at, processed_at)
             SELECT 'bench.expired', '{{}}', t, t, t
             FROM generate_series(1, {rows}) AS g, (SELECT now() - interval '100 hours' AS t) AS at
             RETURNING id, created_at
         ), dl AS (
             INSERT INTO webhook_deliveries
                 (event_id, endpoint_id, state, attempts, next_attempt_at, last_status,
                  created_at, updated_at, delivered_at)
             SELECT id, {endpoint}, 'delivered', 1, created_at, 204, created_at, created_at,
                    created_at
             FROM ev
         )
         INSERT INTO webhook_attempts
             (event_id, endpoint_id, attempt, started_at, duration_ms, status_code, worker_id)
         SELECT id, {endpoint}, 1, created_at, 2, 204, 'bench-retention'
         FROM ev"
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// The PostgreSQL server's version and durability settings.
pub async fn server_info(client: &Client) -> anyhow::Result<Value> {
    let rows = client
        .query(
            "SELECT name, setting FROM pg_settings WHERE name IN
               ('server_version', 'fsync', 'synchronous_commit', 'full_page_writes',
                'shared_buffers', 'max_connections', 'wal_level', 'max_wal_size',
                'checkpoint_timeout', 'data_directory')
             ORDER BY name",
            &[],
        )
        .await?;
    let mut map = serde_json::Map::new();
    for row in rows {
        let (name, setting): (String, String) = (row.get(0), row.get(1));
        map.insert(name, Value::String(setting));
    }
    Ok(Value::Object(map))
}

/// When each event's first attempt started (CLOCK_REALTIME µs, from the dispatcher's
/// clock as recorded in `webhook_attempts`), for splitting latency into the
/// dispatcher's wake-up and claim versus the HTTP request.
pub async fn attempt_starts(
    client: &Client,
) -> anyhow::Result<std::collections::HashMap<i64, i64>> {
    let rows = client
        .query(
            "SELECT event_id, (extract(epoch FROM started_at) * 1e6)::bigint
             FROM webhook_attempts WHERE attempt = 1",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// The payload of an event whose order is checked: its key `k` and its place `n` in the
/// key's order (what the receiver reads, see `receiver`), padded to about `bytes`.
pub fn keyed_payload(key: &str, n: u64, bytes: usize) -> Value {
    let base = json!({"k": key, "n": n, "pad": ""});
    let pad = bytes.saturating_sub(base.to_string().len() + 8);
    json!({"k": key, "n": n, "pad": "x".repeat(pad)})
}

/// Commits `n` events in one transaction with one INSERT, in this order: event `i` (from
/// 0) has key `k{i % keys}` and place `i / keys` in it (in its payload, see
/// [`keyed_payload`]), and that key as `ordering_key` when `ordered` (else none, the
/// unordered twin). Returns how long the INSERT and COMMIT took and the time COMMIT
/// returned (CLOCK_REALTIME µs). The events of one transaction are ordered by insert
/// order, so `n` is each key's order.
pub async fn insert_keyed_burst(
    client: &mut Client,
    n: u64,
    keys: u64,
    ordered: bool,
    bytes: usize,
    event_type: &str,
) -> anyhow::Result<(Duration, i64)> {
    let pad = keyed_payload("k0", 0, bytes)["pad"]
        .as_str()
        .map_or(0, str::len) as i32;
    let started = Instant::now();
    let tx = client.transaction().await?;
    let inserted = tx
        .execute(
            "INSERT INTO webhook_outbox (event_type, payload, ordering_key)
             SELECT $1, jsonb_build_object('k', 'k' || i % $3, 'n', i / $3, 'pad', repeat('x', $4)),
                    CASE WHEN $5 THEN 'k' || i % $3 END
             FROM generate_series(0::int8, $2::int8 - 1) AS i
             ORDER BY i",
            &[
                &event_type,
                &(n as i64),
                &(keys.max(1) as i64),
                &pad,
                &ordered,
            ],
        )
        .await?;
    commit_burst(tx, inserted, n, started).await
}

/// Enqueues one event in its own transaction through the library, as an application
/// does, with `ordering_key` = `key` (none if `None`); returns the event id and the time
/// COMMIT returned.
pub async fn produce_keyed(
    client: &mut Client,
    payload: &Value,
    event_type: &str,
    key: Option<&str>,
) -> anyhow::Result<(i64, i64)> {
    let tx = client.transaction().await?;
    let mut event = outboxd::NewEvent::new(event_type, payload);
    if let Some(key) = key {
        event = event.with_ordering_key(key);
    }
    let id = outboxd::enqueue(&tx, &event)
        .await?
        .context("enqueue returned no id")?;
    tx.commit().await?;
    Ok((id, now_us()))
}

/// Each event's key and place in its key's order, read back from the payloads of
/// [`keyed_payload`] (events without them are left out).
pub async fn event_orders(
    client: &Client,
) -> anyhow::Result<std::collections::HashMap<i64, (String, i64)>> {
    let rows = client
        .query(
            "SELECT id, payload->>'k', (payload->>'n')::int8 FROM webhook_outbox
             WHERE payload ? 'k' AND payload ? 'n'",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect())
}
