//! Noisy neighbour (issue 16): what one bad endpoint costs the others. Three
//! measurements, each on a database of its own with in-process dispatchers:
//!
//! * Timing out: a healthy endpoint's burst of `BENCH_NOISY_EVENTS`, commit → last
//!   receipt, alone (after an uncounted warm-up burst), then on the same dispatcher again
//!   with one more endpoint registered, taking every event, whose receiver never answers
//!   within the HTTP timeout (`BENCH_NOISY_TIMEOUT_MS`, 1 s): a listener that reads each
//!   request and holds it. The target is the healthy endpoint's rate beside it as a share
//!   of its rate alone (>= 90%). That drain is bounded by `BENCH_NOISY_BOUND_SECS`: if the
//!   healthy endpoint has not received everything by then, its rate is what it received
//!   over the bound, and the row says so. `BENCH_NOISY_ROUNDS` rounds, each on a fresh
//!   database, the ratio taken round by round (median). Between the two, a control: the
//!   burst beside a second healthy endpoint taking the same events (then removed), which
//!   shows what the second endpoint's fan-out costs without any failure.
//! * Backlog: `BENCH_NOISY_FRESH_EVENTS` single events, 50 ms apart, each committed alone
//!   to a healthy endpoint while another endpoint has `BENCH_NOISY_BACKLOG` pending
//!   deliveries (made as fan-out leaves them, before the dispatcher starts) and
//!   `rate_limit` 50: p99 commit → receipt of the fresh events (target < 50 ms), and what
//!   the backlogged endpoint received per second meanwhile, against its limit.
//! * Rate limit: `rate_limit` 50 on one endpoint with a burst of twice what it may take
//!   waiting, four dispatchers, the receipts over `BENCH_NOISY_RATE_SECS` after the first
//!   second (the token bucket holds a second's worth): target within 10% of 50/s. The
//!   most receipts in any one second is shown beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tokio::io::AsyncReadExt as _;
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::{self, InProc, Mode, Running};
use crate::latency::{first_receipts, latencies};
use crate::pg;
use crate::interleave::ratios_by_round;
use crate::report::{int, median, ms, pct};
use crate::sys::{Cpu, now_us};

/// The rate limit of the backlog and rate-limit measurements (the figure).
const RATE_LIMIT: i32 = 50;
/// Fresh events' spacing beside the backlog.
const FRESH_GAP: Duration = Duration::from_millis(50);

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    // Each part on its own: a failure in one still leaves the others' figures.
    if let Err(e) = timing_out(ctx).await {
        ctx.report.error("noisy: timing-out neighbour", &e);
    }
    if let Err(e) = backlog(ctx).await {
        ctx.report.error("noisy: backlog beside", &e);
    }
    if let Err(e) = rate_limit(ctx).await {
        ctx.report.error("noisy: rate limit", &e);
    }
    Ok(())
}

/// An HTTP endpoint that never answers: it reads whatever arrives and holds the
/// connection until the client gives up (a timed-out request closes its connection, so
/// connections accepted count the requests sent to it).
struct Blackhole {
    port: u16,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    async fn start() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((mut stream, _)) = accepted else {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                        held.spawn(async move {
                            let mut buf = [0_u8; 8192];
                            while let Ok(n) = stream.read(&mut buf).await {
                                if n == 0 {
                                    break;
                                }
                            }
                        });
                    }
                    Some(_) = held.join_next(), if !held.is_empty() => {}
                }
            }
        });
        Ok(Self {
            port,
            accepted,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook/1", self.port)
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        // The held connections are in the task's JoinSet, which aborts them with it.
        self.task.abort();
    }
}

/// The in-process dispatcher's configuration here: the bench's (push), a short drain
/// (work left beside a bad endpoint is not waited for), and the given HTTP timeout.
fn config(ctx: &Ctx, worker: &str, http_timeout: Option<Duration>) -> outboxd::Config {
    let mut config = dispatcher::config(true, ctx.poll_interval());
    config.worker_id = format!("{}-{worker}", config.worker_id);
    config.drain_timeout = Duration::from_secs(2);
    if let Some(timeout) = http_timeout {
        config.http_timeout = timeout;
    }
    config
}

/// Registers an endpoint with event-type filters (empty: every event); returns its id.
async fn add_endpoint(client: &Client, url: String, event_types: &[&str]) -> anyhow::Result<i64> {
    let (endpoint, _) = outboxd::endpoint::add(
        client,
        outboxd::NewEndpoint {
            url,
            event_types: event_types.iter().map(|s| (*s).to_owned()).collect(),
            description: "bench".into(),
            ..Default::default()
        },
    )
    .await?;
    Ok(endpoint.id)
}

async fn set_rate_limit(client: &Client, endpoint: i64, limit: i32) -> anyhow::Result<()> {
    client
        .execute(
            "UPDATE webhook_endpoints SET rate_limit = $2 WHERE id = $1",
            &[&endpoint, &limit],
        )
        .await
        .context("setting rate_limit")?;
    Ok(())
}

/// One burst to the healthy endpoint (number 0 at the receiver), bounded.
struct Drain {
    expected: u64,
    received: u64,
    /// Commit → last receipt, or → the bound when not everything arrived.
    secs: f64,
    rate: f64,
    cpu: Cpu,
    json: Value,
}

impl Drain {
    fn complete(&self) -> bool {
        self.received >= self.expected
    }
}

/// `at_receiver`: how many endpoints at the bench receiver take each event (the healthy
/// endpoint 0, and a healthy control beside it); only endpoint 0's receipts count.
async fn drain(
    ctx: &mut Ctx,
    client: &mut Client,
    event_type: &str,
    bound: Duration,
    at_receiver: u64,
) -> anyhow::Result<Drain> {
    let n = ctx.s.noisy_events;
    let statements = Statements::reset(client).await;
    let probe = ctx.probe(Vec::new());
    let (insert, commit_us) = pg::insert_burst(client, n, ctx.s.payload_bytes, event_type).await?;
    let snap0 = probe.snap();
    let got = ctx.receiver.wait_for(n * at_receiver, bound).await?;
    let end_us = now_us();
    let cpu = snap0.until(&probe.snap());
    let recs = ctx.receiver.take().await?;
    let (mut first, dups) = first_receipts(&recs);
    first.retain(|(_, ep), _| *ep == 0);
    let received = first.len() as u64;
    let last_us = first.values().copied().max().unwrap_or(commit_us);
    let secs = if received >= n {
        (last_us - commit_us) as f64 / 1e6
    } else {
        (end_us - commit_us) as f64 / 1e6
    };
    let rate = received as f64 / secs.max(1e-6);
    eprintln!(
        "bench:   {event_type}: {received} of {n} in {secs:.3} s = {} /s",
        int(rate)
    );
    let statements = match statements {
        Some(s) => s.split(client, received).await,
        None => Value::Null,
    };
    Ok(Drain {
        expected: n,
        received,
        secs,
        rate,
        cpu,
        json: json!({
            "events": n,
            "received": received,
            "duplicates": dups,
            "receiver_count_at_end": got,
            "insert_and_commit_ms": insert.as_secs_f64() * 1e3,
            "seconds": secs,
            "complete": received >= n,
            "deliveries_per_s": rate,
            "cpu": cpu.json(),
            "statements": statements,
        }),
    })
}

/// PostgreSQL's time by statement during a drain, when the server has
/// `pg_stat_statements` loaded (`PG_EXTRA_OPTS="-c shared_preload_libraries=pg_stat_statements
/// -c pg_stat_statements.track=all"`): where the healthy endpoint's lost throughput goes.
/// Without it, nothing is measured and nothing is shown.
struct Statements;

impl Statements {
    async fn reset(client: &Client) -> Option<Self> {
        client
            .batch_execute(
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements;
                 SELECT pg_stat_statements_reset();",
            )
            .await
            .ok()
            .map(|()| Self)
    }

    /// The statements of this database by total execution time, µs per delivery received.
    async fn split(self, client: &Client, received: u64) -> Value {
        let rows = client
            .query(
                "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 90), calls, rows,
                        total_exec_time::float8, toplevel
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 ORDER BY total_exec_time DESC LIMIT 12",
                &[],
            )
            .await;
        let Ok(rows) = rows else {
            return Value::Null;
        };
        let per = received.max(1) as f64;
        let list: Vec<Value> = rows
            .iter()
            .map(|r| {
                let ms: f64 = r.get(3);
                json!({
                    "query": r.get::<_, String>(0),
                    "calls": r.get::<_, i64>(1),
                    "rows": r.get::<_, i64>(2),
                    "ms": ms,
                    "us_per_delivery": ms * 1e3 / per,
                    "toplevel": r.get::<_, bool>(4),
                })
            })
            .collect();
        for v in &list {
            eprintln!(
                "bench:     {:>8.1} µs/delivery {:>7} calls {:>8} rows {}{}",
                v["us_per_delivery"].as_f64().unwrap_or_default(),
                v["calls"],
                v["rows"],
                if v["toplevel"] == json!(true) { "" } else { "  (nested) " },
                v["query"].as_str().unwrap_or_default()
            );
        }
        Value::Array(list)
    }
}

/// One round of (a) on a database of its own: a warm-up burst, the burst alone, beside a
/// second healthy endpoint taking the same events (the control: the same fan-out, no
/// failure), then, that one removed, beside the timing-out endpoint.
struct Round {
    alone: Drain,
    control: Drain,
    beside: Drain,
    neighbour_requests: u64,
    dispatcher: Value,
}

async fn timing_out_round(ctx: &mut Ctx, round: u64) -> anyhow::Result<Round> {
    let timeout = Duration::from_millis(ctx.s.noisy_timeout_ms);
    let bound = Duration::from_secs(ctx.s.noisy_bound_secs);
    ctx.with_db(&format!("noisy_timeout_r{round}"), async |ctx, url, client| {
        add_endpoint(client, ctx.receiver.url(0), &[]).await?;
        ctx.receiver.take().await?;
        let running = Running::InProc(InProc::start(
            url,
            config(ctx, "timeout", Some(timeout)),
            ctx.s.dispatcher_threads as usize,
        )?);
        dispatcher::wait_ready(client, Mode::Push).await?;
        // Warm-up: pools and keep-alive connections open before anything counts.
        let n = ctx.s.noisy_events;
        pg::insert_burst(client, n, ctx.s.payload_bytes, "bench.noisy.warmup").await?;
        ctx.receiver.wait_for(n, Duration::from_secs(60)).await?;
        ctx.receiver.take().await?;
        pg::wait_settled(client, Duration::from_secs(60)).await?;
        dispatcher::wait_ready(client, Mode::Push).await?;

        let alone = drain(ctx, client, "bench.noisy.alone", Duration::from_secs(60), 1).await?;
        if !alone.complete() {
            bail!(
                "alone, only {} of {} arrived within 60 s",
                alone.received,
                alone.expected
            );
        }
        pg::wait_settled(client, Duration::from_secs(60)).await?;
        dispatcher::wait_ready(client, Mode::Push).await?;

        let second = add_endpoint(client, ctx.receiver.url(1), &[]).await?;
        let control = drain(ctx, client, "bench.noisy.control", Duration::from_secs(60), 2).await?;
        pg::wait_settled(client, Duration::from_secs(60)).await?;
        outboxd::endpoint::remove(client, second).await?;
        dispatcher::wait_ready(client, Mode::Push).await?;

        let blackhole = Blackhole::start().await?;
        add_endpoint(client, blackhole.url(), &[]).await?;
        let beside = drain(ctx, client, "bench.noisy.beside", bound, 1).await?;
        let neighbour_requests = blackhole.accepted();
        let dispatcher = running.stop().await?;
        drop(blackhole);
        Ok(Round {
            alone,
            control,
            beside,
            neighbour_requests,
            dispatcher,
        })
    })
    .await
}

/// (a) The healthy endpoint's drain alone and beside an endpoint that times out,
/// `BENCH_NOISY_ROUNDS` rounds, compared round by round (a single pair of sub-second
/// bursts on this machine is ±20%). A round whose healthy endpoint did not drain within
/// the bound is the last: the figure is then far from the target anyway, and each
/// further round would take the whole bound again.
async fn timing_out(ctx: &mut Ctx) -> anyhow::Result<()> {
    let mut rounds = Vec::new();
    for round in 0..ctx.s.noisy_rounds {
        let r = timing_out_round(ctx, round + 1).await?;
        let incomplete = !r.beside.complete();
        rounds.push(r);
        if incomplete {
            break;
        }
    }
    let alone_rates: Vec<f64> = rounds.iter().map(|r| r.alone.rate).collect();
    let beside_rates: Vec<f64> = rounds.iter().map(|r| r.beside.rate).collect();
    let ratios = ratios_by_round(&beside_rates, &alone_rates);
    let ratio = median(&ratios);
    let (alone, beside) = (median(&alone_rates), median(&beside_rates));
    let label = format!(
        "noisy: {} to a healthy endpoint beside one timing out ({} ms)",
        int(ctx.s.noisy_events as f64),
        ctx.s.noisy_timeout_ms
    );
    let by_round = ratios
        .iter()
        .map(|r| format!("{:.0}%", r * 100.0))
        .collect::<Vec<_>>()
        .join(", ");
    let mut value = format!(
        "{} alone → {} beside ({:.0}%; by round {by_round})",
        int(alone),
        int(beside),
        ratio * 100.0
    );
    if let Some(short) = rounds.iter().find(|r| !r.beside.complete()) {
        value = format!(
            "{value}; only {} of {} arrived in {:.0} s",
            int(short.beside.received as f64),
            int(short.beside.expected as f64),
            short.beside.secs
        );
    }
    ctx.report.target(
        &label,
        &format!(
            "healthy endpoint's deliveries/s, commit → last receipt (medians of {}); beside/alone paired by round",
            rounds.len()
        ),
        value,
        ">= 90% of alone",
        ratio >= 0.9,
    );
    let control_rates: Vec<f64> = rounds.iter().map(|r| r.control.rate).collect();
    let control_ratios = ratios_by_round(&control_rates, &alone_rates);
    let beside_control = ratios_by_round(&beside_rates, &control_rates);
    ctx.report.info(
        &label,
        "control, beside a healthy endpoint taking the same events: deliveries/s (vs alone); the timing-out neighbour vs it",
        format!(
            "{} ({:.0}%); {:.0}%",
            int(median(&control_rates)),
            median(&control_ratios) * 100.0,
            median(&beside_control) * 100.0
        ),
    );
    ctx.report.info(
        &label,
        "requests to the timing-out endpoint during each burst beside it",
        rounds
            .iter()
            .map(|r| int(r.neighbour_requests as f64))
            .collect::<Vec<_>>()
            .join(", "),
    );
    let (mut alone_cpu, mut beside_cpu): (Option<Cpu>, Option<Cpu>) = (None, None);
    for r in &rounds {
        Cpu::accumulate(&mut alone_cpu, &r.alone.cpu);
        Cpu::accumulate(&mut beside_cpu, &r.beside.cpu);
    }
    let received = |f: fn(&Round) -> u64| rounds.iter().map(f).sum::<u64>();
    ctx.report.cpu(
        &format!("{label}, alone"),
        alone_cpu.unwrap_or_default(),
        Some(received(|r| r.alone.received)),
    );
    ctx.report.cpu(
        &format!("{label}, beside"),
        beside_cpu.unwrap_or_default(),
        Some(received(|r| r.beside.received)),
    );
    let rounds_json: Vec<Value> = rounds
        .iter()
        .map(|r| {
            json!({
                "alone": r.alone.json,
                "control": r.control.json,
                "beside": r.beside.json,
                "neighbour_requests": r.neighbour_requests,
                "dispatcher_report": r.dispatcher,
            })
        })
        .collect();
    ctx.report.detail(
        "noisy_timeout",
        json!({
            "http_timeout_ms": ctx.s.noisy_timeout_ms,
            "bound_s": ctx.s.noisy_bound_secs,
            "median_alone_per_s": alone,
            "median_beside_per_s": beside,
            "ratios_by_round": ratios,
            "median_ratio": ratio,
            "median_control_per_s": median(&control_rates),
            "control_ratios_by_round": control_ratios,
            "beside_to_control_by_round": beside_control,
            "rounds": rounds_json,
        }),
    );
    Ok(())
}

/// Waits until `n` LISTEN sessions of outboxd are connected to this database (the
/// dispatchers are up; with a backlog they never fall asleep, so readiness is not waited
/// for).
async fn wait_listening(client: &Client, n: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listening: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'outboxd-listener'",
                &[],
            )
            .await?
            .get(0);
        if listening >= n {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{listening} of {n} dispatchers listening after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Pending deliveries of `rows` processed events to `endpoint`, due now, as fan-out
/// leaves them; then VACUUM ANALYZE, as after any bulk load.
async fn prefill_backlog(
    client: &Client,
    rows: u64,
    endpoint: i64,
    bytes: usize,
) -> anyhow::Result<()> {
    let pad = bytes.saturating_sub(90).max(1) as i32;
    let mut done = 0;
    while done < rows {
        let n = (rows - done).min(250_000) as i64;
        client
            .execute(
                "WITH ev AS (
                     INSERT INTO webhook_outbox (event_type, payload, processed_at)
                     SELECT 'bench.backlog',
                            jsonb_build_object('seq', g, 'order_id', 'ord_' || lpad(g::text, 10, '0'),
                                               'pad', repeat('x', $3)),
                            now()
                     FROM generate_series(1, $1::int8) AS g
                     RETURNING id
                 )
                 INSERT INTO webhook_deliveries (event_id, endpoint_id) SELECT id, $2 FROM ev",
                &[&n, &endpoint, &pad],
            )
            .await
            .context("prefilling the backlog")?;
        done += n as u64;
    }
    for table in ["webhook_outbox", "webhook_deliveries"] {
        client
            .batch_execute(&format!("VACUUM ANALYZE {table}"))
            .await?;
    }
    Ok(())
}

/// (b) Fresh events to a healthy endpoint beside another's backlog under a rate limit.
async fn backlog(ctx: &mut Ctx) -> anyhow::Result<()> {
    let rows = ctx.s.noisy_backlog;
    let fresh = ctx.s.noisy_fresh_events;
    let bound = Duration::from_secs(ctx.s.noisy_bound_secs);
    let (p99, p50, delivered, backlog_rate, left, json) = ctx
        .with_db("noisy_backlog", async |ctx, url, client| {
            let healthy = add_endpoint(client, ctx.receiver.url(0), &["bench.fresh"]).await?;
            let backlogged = add_endpoint(client, ctx.receiver.url(1), &["bench.backlog"]).await?;
            set_rate_limit(client, backlogged, RATE_LIMIT).await?;
            let started = Instant::now();
            prefill_backlog(client, rows, backlogged, ctx.s.payload_bytes).await?;
            eprintln!(
                "bench:   backlog of {rows} prefilled in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            ctx.receiver.take().await?;
            let running = Running::InProc(InProc::start(
                url,
                config(ctx, "backlog", None),
                ctx.s.dispatcher_threads as usize,
            )?);
            wait_listening(client, 1).await?;
            let mut producer = pg::connect(url).await?;
            let payload = pg::payload(0, ctx.s.payload_bytes);
            let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
            let window_start_us = now_us();
            let mut commits = Vec::new();
            for i in 0..fresh {
                tokio::time::sleep_until(t0 + FRESH_GAP * i as u32).await;
                commits.push(pg::produce_one(&mut producer, &payload, "bench.fresh").await?);
            }
            let window_end_us = now_us();
            let deadline = Instant::now() + bound;
            let fresh_i = fresh as i64;
            loop {
                let done: i64 = client
                    .query_one(
                        "SELECT count(*) FROM webhook_deliveries
                         WHERE endpoint_id = $1 AND state = 'delivered'",
                        &[&healthy],
                    )
                    .await?
                    .get(0);
                if done >= fresh_i || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let recs = ctx.receiver.take().await?;
            let left: i64 = client
                .query_one(
                    "SELECT count(*) FROM webhook_deliveries
                     WHERE endpoint_id = $1 AND state = 'pending'",
                    &[&backlogged],
                )
                .await?
                .get(0);
            let stopped = running.stop().await?;
            let lat = latencies(&commits, &recs);
            let window_s = (window_end_us - window_start_us) as f64 / 1e6;
            let backlog_in_window = recs
                .iter()
                .filter(|r| r.ep == 1 && r.t_us >= window_start_us && r.t_us <= window_end_us)
                .count();
            let backlog_total = recs.iter().filter(|r| r.ep == 1).count();
            let backlog_rate = backlog_in_window as f64 / window_s.max(1e-6);
            // Events that did not arrive within the bound count as the bound.
            let mut waits = lat.sorted.clone();
            waits.resize(commits.len(), bound.as_micros() as f64);
            waits.sort_by(f64::total_cmp);
            let (p50, p99) = (pct(&waits, 50.0), pct(&waits, 99.0));
            eprintln!(
                "bench:   fresh beside the backlog: {} of {} arrived, p50 {} p99 {}; backlog {} /s, {left} left",
                lat.delivered,
                commits.len(),
                ms(p50),
                ms(p99),
                int(backlog_rate)
            );
            let json = json!({
                "backlog": rows,
                "rate_limit": RATE_LIMIT,
                "fresh_events": commits.len(),
                "fresh_gap_ms": FRESH_GAP.as_millis() as u64,
                "fresh_delivered": lat.delivered,
                "fresh_latency_us": lat.json(),
                "window_s": window_s,
                "backlog_received_in_window": backlog_in_window,
                "backlog_received_per_s_in_window": backlog_rate,
                "backlog_received_in_all": backlog_total,
                "backlog_pending_at_end": left,
                "dispatcher_report": stopped,
            });
            Ok((p99, p50, lat.delivered, backlog_rate, left, json))
        })
        .await?;
    let label = format!(
        "noisy: {fresh} fresh events beside a backlog of {} (rate_limit {RATE_LIMIT})",
        int(rows as f64)
    );
    let missing = fresh as usize - delivered;
    let value = if missing == 0 {
        ms(p99)
    } else {
        format!(
            "{} ({missing} of {fresh} not arrived within {} s, counted as that)",
            ms(p99),
            bound.as_secs()
        )
    };
    ctx.report.target(
        &label,
        "p99 commit → receipt of the fresh events",
        value,
        "< 50 ms",
        missing == 0 && p99 < 50_000.0,
    );
    ctx.report.info(&label, "p50 commit → receipt", ms(p50));
    ctx.report.info(
        &label,
        "backlogged endpoint: received/s while the fresh events were sent; pending at the end",
        format!("{} (limit {RATE_LIMIT}); {}", int(backlog_rate), int(left as f64)),
    );
    ctx.report.detail("noisy_backlog", json);
    Ok(())
}

/// (c) `rate_limit` 50 across four dispatchers, at the receiver.
async fn rate_limit(ctx: &mut Ctx) -> anyhow::Result<()> {
    const DISPATCHERS: usize = 4;
    let secs = ctx.s.noisy_rate_secs;
    let (rate, max_1s, total, json) = ctx
        .with_db("noisy_rate", async |ctx, url, client| {
            let endpoint = add_endpoint(client, ctx.receiver.url(0), &[]).await?;
            set_rate_limit(client, endpoint, RATE_LIMIT).await?;
            ctx.receiver.take().await?;
            let mut running = Vec::new();
            for i in 0..DISPATCHERS {
                running.push(InProc::start(
                    url,
                    config(ctx, &format!("rate{i}"), None),
                    ctx.s.dispatcher_threads as usize,
                )?);
            }
            dispatcher::wait_ready(client, Mode::Procs(DISPATCHERS)).await?;
            // Twice what the limit lets through in the watch, so it never runs dry.
            let events = RATE_LIMIT as u64 * (secs + 2) * 2;
            let (_, commit_us) =
                pg::insert_burst(client, events, ctx.s.payload_bytes, "bench.rate").await?;
            let watch_us = commit_us + ((secs as f64 + 1.5) * 1e6) as i64;
            tokio::time::sleep(Duration::from_micros((watch_us - now_us()).max(0) as u64)).await;
            let recs = ctx.receiver.take().await?;
            let mut stopped = Vec::new();
            for d in running {
                stopped.push(Running::InProc(d).stop().await?);
            }
            let mut times: Vec<i64> = recs.iter().map(|r| r.t_us).collect();
            times.sort_unstable();
            let Some(&first) = times.first() else {
                bail!("nothing arrived within {secs} s");
            };
            let from = first + 1_000_000;
            let to = from + secs as i64 * 1_000_000;
            let in_window = times.iter().filter(|t| (from..to).contains(*t)).count();
            let rate = in_window as f64 / secs as f64;
            // The most receipts in any one second (a sliding window over the receipts).
            let mut max_1s = 0;
            let mut j = 0;
            for i in 0..times.len() {
                while j < times.len() && times[j] < times[i] + 1_000_000 {
                    j += 1;
                }
                max_1s = max_1s.max(j - i);
            }
            let json = json!({
                "rate_limit": RATE_LIMIT,
                "dispatchers": DISPATCHERS,
                "events_waiting": events,
                "watch_s": secs,
                "received_in_all": times.len(),
                "commit_to_first_receipt_ms": (first - commit_us) as f64 / 1e3,
                "received_in_window": in_window,
                "received_per_s": rate,
                "max_in_one_second": max_1s,
                "dispatcher_reports": stopped,
            });
            Ok((rate, max_1s, times.len(), json))
        })
        .await?;
    let label = format!("noisy: rate_limit {RATE_LIMIT}/s, {DISPATCHERS} dispatchers");
    let limit = f64::from(RATE_LIMIT);
    ctx.report.target(
        &label,
        &format!("received/s over {secs} s after the first second; most in any 1 s"),
        format!("{rate:.1}; {max_1s}"),
        "within 10% of 50",
        (rate - limit).abs() <= 0.1 * limit,
    );
    ctx.report.info(
        &label,
        "received in all (the watch and its first second)",
        int(total as f64),
    );
    ctx.report.detail("noisy_rate", json);
    Ok(())
}
