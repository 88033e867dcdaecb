//! `make chaos`: outboxd under faults, judged by what the consumer received.
//!
//! The suite owns everything it breaks: a PostgreSQL cluster of its own with durability
//! on (`cluster.rs`), a consumer in this process (`receiver.rs`), producers writing
//! events in their own transactions (`producers.rs`), and real `outboxd run` processes
//! (`fleet.rs`). For `CHAOS_SECONDS` the producers write and the faults (`faults.rs`)
//! strike at random: dispatchers killed with `kill -9` or stopped with SIGTERM and
//! restarted, their backends terminated, PostgreSQL restarted (fast, or immediate: a
//! crash), the consumer failing, dropping connections and stalling. Then the faults
//! stop, the consumer heals, and the dispatchers must finish the work; push probes
//! (`probe.rs`) check that each one, alone, still wakes for a new event, also right
//! after losing its connections. `verdict.rs` prints the
//! counts and the checks, and the process exits 1 if any check failed.
//!
//! Settings (environment): `CHAOS_SECONDS` (default 60), `CHAOS_SEED` (default: from
//! the clock; printed, so a run can be repeated), `CHAOS_RATE` (events per second,
//! default 60), `CHAOS_DISPATCHERS` (default 3), `CHAOS_BIN` (the outboxd binary to
//! test; default the one cargo built), `CHAOS_HEAL_SECONDS` (how long the work may take
//! to finish after the faults, default 180), `CHAOS_ORDERED` (the share of the
//! producers' transactions whose events carry an `ordering_key`, default 0.33),
//! `CHAOS_KEYS` (how many ordering keys, default 40: [`SHARED_KEYS`] shared by two
//! producers, the rest owned by one), `CHAOS_KEEP=1` (keep the cluster's
//! directory), `PG_BINDIR`. Logs and the report go to `target/chaos/seed-<seed>/`.
//!
//! Ordered delivery is judged like the rest, by the consumer: per (endpoint, key) the
//! events must arrive in the order the producers committed them, one request at a time
//! (`producers.rs` says how the order is known, `receiver.rs` how "in flight" is
//! seen, `verdict.rs` what is allowed). The dispatchers run with the default dead-head
//! policy (`block`): no delivery can die within a run (`fleet.rs`), so the policy never
//! acts, and a key left blocked at the end fails the run like any dead delivery.
//!
//! A seed fixes the schedule of faults and the producers' choices; what the processes
//! do in between still depends on timing, so a repeated seed repeats the faults, not
//! necessarily their outcome.

mod cluster;
mod faults;
mod fleet;
mod observer;
mod probe;
mod producers;
mod receiver;
mod verdict;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};

use crate::cluster::Cluster;
use crate::faults::Ctx;
use crate::fleet::Fleet;
use crate::observer::Observer;
use crate::probe::{PROBE_BOUND, PROBE_TYPE};
use crate::verdict::{Endpoint, Inputs, Stop};

/// Producers writing at once.
const PRODUCERS: usize = 4;
/// Ordering keys written by two producers at once (the rest of `CHAOS_KEYS` are owned
/// by one, spread evenly).
const SHARED_KEYS: usize = 4;
/// The first dispatcher polls often; the others rely on push, with a poll tick long
/// enough that a lost push shows as lateness (and fails the push probe).
const SHORT_POLL_MS: u64 = 500;
const LONG_POLL_MS: u64 = 60_000;
/// The endpoints' filters: one takes everything, two take part (fan-out to 1-2 of 3).
const FILTERS: [&[&str]; 3] = [&[], &["order.*"], &["customer.updated", "invoice.*"]];

/// Time since the run began, shared by every part of the suite.
#[derive(Debug, Clone)]
pub struct Clock {
    start: Instant,
    start_wall_us: i64,
}

impl Clock {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            start_wall_us: wall_us(),
        }
    }

    /// Milliseconds since the run began.
    pub fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// A wall-clock time (µs since the epoch, as PostgreSQL on this machine gives it)
    /// in ms since the run began.
    pub fn wall_to_ms(&self, wall_us: i64) -> i64 {
        (wall_us - self.start_wall_us) / 1000
    }
}

fn wall_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

static LOG: OnceLock<Mutex<std::fs::File>> = OnceLock::new();

/// Prints a timestamped line and appends it to the run's log.
pub fn note(clock: &Clock, message: &str) {
    note_at(clock.ms(), message);
}

/// [`note`] for something that happened at `ms`.
pub fn note_at(ms: u64, message: &str) {
    let line = format!("[{:>8.3}s] {message}", ms as f64 / 1000.0);
    println!("{line}");
    if let Some(log) = LOG.get() {
        let _ = writeln!(log.lock().expect("log"), "{line}");
    }
}

struct Settings {
    seconds: u64,
    seed: u64,
    rate: f64,
    dispatchers: usize,
    bin: PathBuf,
    heal_bound: Duration,
    keep: bool,
    ordered: f64,
    keys: usize,
}

/// A setting that cannot be used; names its variable.
#[derive(Debug)]
struct BadSetting(String);

fn setting<T: std::str::FromStr>(
    name: &str,
    default: T,
    ok: impl Fn(&T) -> bool,
    expect: &str,
) -> Result<T, BadSetting> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => match v.trim().parse::<T>() {
            Ok(parsed) if ok(&parsed) => Ok(parsed),
            _ => Err(BadSetting(format!(
                "invalid {name}: expected {expect}, got {v:?}"
            ))),
        },
        _ => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Self, BadSetting> {
        let clock_seed = wall_us() as u64 % 1_000_000_000;
        let bin: PathBuf = setting(
            "CHAOS_BIN",
            PathBuf::from(env!("CARGO_BIN_EXE_outboxd")),
            |p: &PathBuf| p.is_file(),
            "the path of an outboxd binary",
        )?;
        Ok(Self {
            seconds: setting(
                "CHAOS_SECONDS",
                60,
                |s| (10..=3600).contains(s),
                "10 to 3600 seconds",
            )?,
            seed: setting("CHAOS_SEED", clock_seed, |_| true, "an unsigned integer")?,
            rate: setting(
                "CHAOS_RATE",
                60.0,
                |r: &f64| (1.0..=2000.0).contains(r),
                "1 to 2000 events per second",
            )?,
            dispatchers: setting("CHAOS_DISPATCHERS", 3, |n| (2..=8).contains(n), "2 to 8")?,
            bin,
            heal_bound: Duration::from_secs(setting(
                "CHAOS_HEAL_SECONDS",
                180,
                |s| (10..=3600).contains(s),
                "10 to 3600 seconds",
            )?),
            keep: setting("CHAOS_KEEP", 0u8, |k| *k <= 1, "0 or 1")? == 1,
            ordered: setting(
                "CHAOS_ORDERED",
                0.33,
                |r: &f64| (0.0..=1.0).contains(r),
                "a share from 0 to 1",
            )?,
            keys: setting(
                "CHAOS_KEYS",
                40,
                |n| (SHARED_KEYS + PRODUCERS..=100_000).contains(n),
                &format!("{} to 100000 keys", SHARED_KEYS + PRODUCERS),
            )?,
        })
    }
}

static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Remembers a process the watchdog must kill if the run overstays.
pub fn register_child(pid: u32) {
    CHILDREN.lock().expect("children").push(pid);
}

fn main() -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(BadSetting(message)) => {
            eprintln!("chaos: {message}");
            return ExitCode::from(2);
        }
    };
    // Whatever happens, the run ends by itself, and takes its processes with it.
    let limit =
        Duration::from_secs(settings.seconds) + settings.heal_bound + Duration::from_secs(600);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("chaos: the run took longer than {limit:?}; killing its processes");
        for pid in CHILDREN.lock().map(|c| c.clone()).unwrap_or_default() {
            fleet::signal(pid, "KILL");
        }
        if let Some(pid) = cluster::postmaster_of_run() {
            fleet::signal(pid, "QUIT");
        }
        std::process::exit(3);
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(settings));
    runtime.shutdown_timeout(Duration::from_secs(10));
    match result {
        Ok((passed, failed)) => {
            // The plain closing line CI reads.
            println!("chaos: {passed} passed, {failed} failed");
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: the run could not be completed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(s: Settings) -> anyhow::Result<(usize, usize)> {
    let clock = Clock::new();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap_or(Path::new("target"))
        .join("chaos")
        .join(format!("seed-{}", s.seed));
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("clearing {}", out.display()))?;
    }
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let log = std::fs::File::create(out.join("chaos.log"))?;
    let _ = LOG.set(Mutex::new(log));
    let polls: Vec<u64> = (0..s.dispatchers)
        .map(|i| if i == 0 { SHORT_POLL_MS } else { LONG_POLL_MS })
        .collect();
    let ordering = producers::Ordering {
        share: s.ordered,
        owned_per_producer: (s.keys - SHARED_KEYS) / PRODUCERS,
        shared: SHARED_KEYS,
        producers: PRODUCERS,
    };
    let header = format!(
        "chaos: seed {} (repeat with CHAOS_SEED={}), {} s of faults, ~{} events/s from {PRODUCERS} producers \
         ({:.0}% of transactions ordered over {} keys: {} owned by one producer, {SHARED_KEYS} shared by two), \
         {} dispatchers (poll {:?} ms, lease {} ms, HTTP timeout {} ms), binary {}",
        s.seed,
        s.seed,
        s.seconds,
        s.rate,
        s.ordered * 100.0,
        ordering.owned_per_producer * PRODUCERS + SHARED_KEYS,
        ordering.owned_per_producer * PRODUCERS,
        s.dispatchers,
        polls,
        fleet::LEASE.as_millis(),
        fleet::HTTP_TIMEOUT.as_millis(),
        s.bin.display()
    );
    note(&clock, &header);
    note(&clock, &format!("logs: {}", out.display()));

    let cluster = Arc::new(Cluster::create(cluster::find_bindir()?, s.keep).await?);
    note(
        &clock,
        &format!("PostgreSQL on 127.0.0.1:{} (durability on)", cluster.port()),
    );
    let setup = observer::connect(&cluster.url("postgres"), "chaos-setup").await?;
    setup.batch_execute("CREATE DATABASE chaos").await?;
    drop(setup);
    let url = cluster.url("chaos");
    outboxd(&s.bin, &url, &["migrate"]).await?;

    let bound = receiver::Bound::new().await?;
    let mut endpoints = Vec::new();
    let mut secrets = Vec::new();
    for (index, filters) in FILTERS.iter().enumerate() {
        let mut args = vec!["endpoint", "add", "--json", "--description", "chaos"];
        let target = bound.url(index);
        args.extend(["--url", target.as_str()]);
        for f in *filters {
            args.extend(["--event-type", f]);
        }
        let added: serde_json::Value =
            serde_json::from_str(&outboxd(&s.bin, &url, &args).await?)
                .context("`outboxd endpoint add --json` did not print JSON")?;
        endpoints.push(Endpoint {
            index,
            id: added["id"].as_i64().context("no id from endpoint add")?,
            filters: filters.iter().map(|f| (*f).to_owned()).collect(),
        });
        secrets.push(
            added["secret"]
                .as_str()
                .context("no secret from endpoint add")?
                .to_owned(),
        );
    }
    let receiver = Arc::new(bound.serve(&secrets, s.seed ^ 0x5eed, clock.clone())?);
    let observer = Arc::new(Observer::new(url.clone()));
    let fleet = Arc::new(Fleet::new(
        s.bin.clone(),
        url.clone(),
        out.clone(),
        cluster.port(),
        clock.clone(),
        &polls,
    ));
    fleet.start_all(Duration::from_secs(60)).await?;
    let supervisor_stop = tokio_util::sync::CancellationToken::new();
    let supervisor = tokio::spawn({
        let fleet = Arc::clone(&fleet);
        let stop = supervisor_stop.clone();
        async move { fleet.supervise(stop).await }
    });
    note(
        &clock,
        "dispatchers running; producing and injecting faults",
    );

    // ---- the fault period ----
    let until = Instant::now() + Duration::from_secs(s.seconds);
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|k| {
            tokio::spawn(producers::run(
                k + 1,
                url.clone(),
                s.seed.wrapping_add(k as u64 + 1),
                until,
                s.rate / PRODUCERS as f64,
                ordering,
            ))
        })
        .collect();
    let ctx = Arc::new(Ctx {
        fleet: Arc::clone(&fleet),
        cluster: Arc::clone(&cluster),
        observer: Arc::clone(&observer),
        receiver: Arc::clone(&receiver),
        clock: clock.clone(),
        endpoints: endpoints.len(),
        faults: Mutex::new(Vec::new()),
    });
    let process_faults = tokio::spawn(faults::process_stream(
        Arc::clone(&ctx),
        s.seed.wrapping_mul(31),
        until,
    ));
    let receiver_faults = tokio::spawn(faults::receiver_stream(
        Arc::clone(&ctx),
        s.seed.wrapping_mul(37),
        until,
    ));
    let mut ledger = producers::Ledger::default();
    for p in producers {
        ledger.merge(p.await.context("a producer panicked")?);
    }
    receiver_faults
        .await
        .context("the receiver's faults panicked")?;
    process_faults
        .await
        .context("the process faults panicked")?
        .context("a fault could not be carried out")?;

    // ---- healing ----
    receiver.heal();
    let heal_ms = clock.ms();
    note(
        &clock,
        "faults stopped, receiver healed; waiting for every delivery to settle",
    );
    let deadline = Instant::now() + s.heal_bound;
    let mut next_report = Instant::now() + Duration::from_secs(10);
    let settled_ms = loop {
        let rows = observer
            .query(
                "SELECT (SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL),
                        (SELECT count(*) FROM webhook_deliveries WHERE state <> 'delivered')",
                &[],
            )
            .await?;
        let (unprocessed, unsettled): (i64, i64) = (rows[0].get(0), rows[0].get(1));
        if unprocessed == 0 && unsettled == 0 {
            note(&clock, "every delivery settled");
            break Some(clock.ms());
        }
        if Instant::now() > deadline {
            note(
                &clock,
                &format!(
                    "not settled within {:?}: {unprocessed} events not fanned out, {unsettled} deliveries not delivered",
                    s.heal_bound
                ),
            );
            break None;
        }
        if Instant::now() > next_report {
            note(
                &clock,
                &format!(
                    "still waiting: {unprocessed} events not fanned out, {unsettled} deliveries not delivered"
                ),
            );
            next_report += Duration::from_secs(10);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };

    // ---- push probes ----
    let mut probes = Vec::new();
    if settled_ms.is_some() {
        let mut prober = probe::Prober::new(
            &fleet,
            &observer,
            &receiver,
            &clock,
            s.seed.wrapping_mul(41),
        );
        for i in 0..fleet.slots.len() {
            probes.push(prober.probe(i).await?);
        }
    } else {
        note(&clock, "push probes skipped: the work did not settle");
    }

    // ---- a graceful stop of every dispatcher ----
    supervisor_stop.cancel();
    let _ = supervisor.await;
    let mut stops = Vec::new();
    for slot in &fleet.slots {
        let mut slot = slot.lock().await;
        let worker_id = slot.worker_id.clone();
        let outcome = fleet
            .sigterm(&mut slot, fleet::DRAIN_TIMEOUT + Duration::from_secs(15))
            .await;
        stops.push(Stop { worker_id, outcome });
    }
    note(&clock, "dispatchers stopped");

    // ---- what happened ----
    let events = observer
        .query(
            "SELECT id, event_type, (payload->>'uid')::bigint,
                    (extract(epoch FROM created_at) * 1e6)::bigint,
                    ordering_key, payload->>'key', (payload->>'n')::bigint,
                    (payload->>'producer')::bigint
             FROM webhook_outbox WHERE event_type <> $1 ORDER BY id",
            &[&PROBE_TYPE],
        )
        .await?
        .iter()
        .map(|r| verdict::Event {
            id: r.get(0),
            event_type: r.get(1),
            uid: r.get::<_, Option<i64>>(2).unwrap_or(-1),
            created_ms: clock.wall_to_ms(r.get(3)),
            ordering_key: r.get(4),
            payload_key: r.get(5),
            n: r.get(6),
            producer: r.get(7),
        })
        .collect::<Vec<_>>();
    let probe_ids: Vec<i64> = observer
        .query(
            "SELECT id FROM webhook_outbox WHERE event_type = $1",
            &[&PROBE_TYPE],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let deliveries = observer
        .query(
            "SELECT event_id, endpoint_id, state, attempts, locked_by, last_error,
                    ordering_key, ordering_seq
             FROM webhook_deliveries WHERE NOT (event_id = ANY($1)) ORDER BY 1, 2",
            &[&probe_ids],
        )
        .await?
        .iter()
        .map(|r| verdict::Delivery {
            event_id: r.get(0),
            endpoint_id: r.get(1),
            state: r.get(2),
            attempts: r.get(3),
            locked_by: r.get(4),
            last_error: r.get(5),
            ordering_key: r.get(6),
            ordering_seq: r.get(7),
        })
        .collect();
    let key_rows = observer
        .query(
            "SELECT endpoint_id, ordering_key, head_event_id, blocked_since IS NOT NULL
             FROM webhook_ordering_keys ORDER BY 1, 2",
            &[],
        )
        .await?
        .iter()
        .map(|r| verdict::KeyRow {
            endpoint_id: r.get(0),
            ordering_key: r.get(1),
            head_event_id: r.get(2),
            blocked: r.get(3),
        })
        .collect();
    let log_left: i64 = observer
        .query("SELECT count(*) FROM webhook_ordering_log", &[])
        .await?[0]
        .get(0);
    let unprocessed: i64 = observer
        .query(
            "SELECT count(*) FROM webhook_outbox WHERE processed_at IS NULL AND event_type <> $1",
            &[&PROBE_TYPE],
        )
        .await?[0]
        .get(0);
    let records = receiver
        .records()
        .into_iter()
        .filter(|r| !r.event_id.is_some_and(|id| probe_ids.contains(&id)))
        .collect();
    let lines = receiver.lines();
    let panics = panics_in(&out);
    let _ = std::fs::copy(cluster.log(), out.join("postgres.log"));
    let faults = ctx.faults.lock().expect("faults").clone();
    let exits = fleet.exits.lock().expect("exits").clone();

    let (report, passed, failed) = verdict::judge(&Inputs {
        header,
        endpoints,
        events,
        deliveries,
        unprocessed,
        records,
        lines,
        key_rows,
        log_left,
        ledger,
        faults,
        exits,
        panics,
        probes,
        probe_bound: PROBE_BOUND,
        stops,
        heal_ms,
        settled_ms,
        heal_bound: s.heal_bound,
    });
    println!("\n{report}");
    std::fs::write(out.join("report.txt"), &report)?;
    println!("report: {}", out.join("report.txt").display());
    Ok((passed, failed))
}

/// Runs an outboxd command against `url`; returns its stdout, or fails with its output.
async fn outboxd(bin: &Path, url: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", url)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "outboxd {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// "panicked" lines in the dispatchers' logs.
fn panics_in(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if !path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("chaos-d"))
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("panicked")) {
            found.push(format!("{}: {line}", path.display()));
        }
    }
    found
}
