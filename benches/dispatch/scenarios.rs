//! The scenarios. Each gets a fresh database, measures, records rows and details in
//! the report, and drops its database.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::disp::{self, InProc, Proc};
use crate::pg;
use crate::receiver::{Rec, Receiver};
use crate::report::{Report, int, median, ms, pct};
use crate::sys::{self, Cpu, PgProcs, Probe, now_us};

#[path = "many.rs"]
mod many;

/// Every scenario, in the order a full run executes them.
pub const ALL: &[&str] = &[
    "burst",
    "fanout",
    "idle",
    "steady",
    "producer",
    "scaleout",
    "ceiling",
    "history",
    "statements",
    "retention",
    "many",
];

/// What the run measures, from the environment (`BENCH_*`), with quick-mode defaults.
#[derive(Debug, Clone)]
pub struct Settings {
    pub quick: bool,
    pub scenarios: Vec<String>,
    pub payload_bytes: usize,
    pub burst_events: u64,
    pub burst_repeats: u64,
    pub poll_interval_ms: u64,
    pub steady_rates: Vec<u64>,
    pub steady_secs: u64,
    pub idle_events: u64,
    pub idle_gap_ms: u64,
    pub fanout_events: u64,
    pub fanout_endpoints: u64,
    pub producer_conns: u64,
    pub producer_rounds: u64,
    pub producer_secs: u64,
    pub scaleout_procs: Vec<u64>,
    /// A second `outboxd` binary to compare in scale-out, round by round.
    pub scaleout_ab_bin: Option<PathBuf>,
    pub ceiling_conns: u64,
    pub ceiling_secs: u64,
    pub history_rows: u64,
    pub retention_kept: u64,
    pub retention_expired: u64,
    pub retention_bulk: u64,
    pub dispatcher_threads: u64,
    pub receiver_threads: u64,
    pub max_seconds: u64,
}

fn env_u64(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .with_context(|| format!("{name} must be a whole number, got {v:?}")),
        _ => Ok(default),
    }
}

fn env_list(name: &str, default: &[u64]) -> anyhow::Result<Vec<u64>> {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .split(',')
            .map(|x| {
                x.trim()
                    .parse()
                    .with_context(|| format!("{name}: bad number {x:?}"))
            })
            .collect(),
        _ => Ok(default.to_vec()),
    }
}

impl Settings {
    /// Reads the settings.
    pub fn from_env() -> anyhow::Result<Self> {
        let quick = std::env::var("BENCH_QUICK").is_ok_and(|v| !matches!(v.trim(), "" | "0"));
        let q = |full: u64, quick_value: u64| if quick { quick_value } else { full };
        let scenarios: Vec<String> = match std::env::var("BENCH_SCENARIOS") {
            Ok(v) if !v.trim().is_empty() && v.trim() != "all" => v
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            _ => ALL.iter().map(|s| (*s).to_owned()).collect(),
        };
        for s in &scenarios {
            if !ALL.contains(&s.as_str()) {
                bail!(
                    "unknown scenario {s:?} in BENCH_SCENARIOS (known: {})",
                    ALL.join(",")
                );
            }
        }
        Ok(Self {
            quick,
            scenarios,
            payload_bytes: env_u64("BENCH_PAYLOAD_BYTES", 500)? as usize,
            burst_events: env_u64("BENCH_BURST_EVENTS", q(20_000, 2_000))?,
            burst_repeats: env_u64("BENCH_BURST_REPEATS", q(3, 1))?.max(1),
            poll_interval_ms: env_u64("BENCH_POLL_INTERVAL_MS", 1_000)?,
            steady_rates: env_list("BENCH_STEADY_RATES", &[500, 2_000])?,
            steady_secs: env_u64("BENCH_STEADY_SECS", q(20, 4))?,
            idle_events: env_u64("BENCH_IDLE_EVENTS", q(200, 40))?,
            idle_gap_ms: env_u64("BENCH_IDLE_GAP_MS", 50)?,
            fanout_events: env_u64("BENCH_FANOUT_EVENTS", q(5_000, 500))?,
            fanout_endpoints: env_u64("BENCH_FANOUT_ENDPOINTS", 10)?,
            producer_conns: env_u64("BENCH_PRODUCER_CONNS", 16)?,
            producer_rounds: env_u64("BENCH_PRODUCER_ROUNDS", q(6, 2))?.max(1),
            producer_secs: env_u64("BENCH_PRODUCER_SECS", q(5, 2))?.max(1),
            scaleout_procs: {
                let mut procs = env_list("BENCH_SCALEOUT_PROCS", &[1, 2, 4])?;
                if procs.contains(&0) {
                    bail!("BENCH_SCALEOUT_PROCS: process counts start at 1");
                }
                procs.sort_unstable();
                procs.dedup();
                procs
            },
            scaleout_ab_bin: std::env::var_os("BENCH_AB_BIN")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            ceiling_conns: env_u64("BENCH_CEILING_CONNS", 128)?.max(1),
            ceiling_secs: env_u64("BENCH_CEILING_SECS", q(5, 2))?.max(1),
            history_rows: env_u64("BENCH_HISTORY_ROWS", q(1_000_000, 100_000))?,
            retention_kept: env_u64("BENCH_RETENTION_KEPT", q(10_000_000, 1_000_000))?,
            retention_expired: env_u64("BENCH_RETENTION_EXPIRED", 1_000)?.max(1),
            retention_bulk: env_u64("BENCH_RETENTION_BULK", q(400_000, 40_000))?,
            dispatcher_threads: env_u64("BENCH_DISPATCHER_THREADS", sys::nproc() as u64)?,
            receiver_threads: env_u64("BENCH_RECEIVER_THREADS", 1)?,
            max_seconds: env_u64("BENCH_MAX_SECONDS", 1_800)?,
        })
    }

    /// As JSON, for the report.
    pub fn json(&self) -> Value {
        let cfg = disp::config(true, Duration::from_millis(self.poll_interval_ms));
        json!({
            "quick": self.quick,
            "scenarios": self.scenarios,
            "payload_bytes": self.payload_bytes,
            "burst_events": self.burst_events,
            "burst_repeats": self.burst_repeats,
            "poll_interval_ms": self.poll_interval_ms,
            "steady_rates": self.steady_rates,
            "steady_secs": self.steady_secs,
            "idle_events": self.idle_events,
            "idle_gap_ms": self.idle_gap_ms,
            "fanout_events": self.fanout_events,
            "fanout_endpoints": self.fanout_endpoints,
            "producer_conns": self.producer_conns,
            "producer_rounds": self.producer_rounds,
            "producer_secs": self.producer_secs,
            "scaleout_procs": self.scaleout_procs,
            "scaleout_ab_binary": self.scaleout_ab_bin.as_ref().map(|p| p.display().to_string()),
            "ceiling_conns": self.ceiling_conns,
            "ceiling_secs": self.ceiling_secs,
            "history_rows": self.history_rows,
            "retention_kept": self.retention_kept,
            "retention_expired": self.retention_expired,
            "retention_bulk": self.retention_bulk,
            "dispatcher_runtime_threads": self.dispatcher_threads,
            "receiver_runtime_threads": self.receiver_threads,
            "dispatcher_config": {
                "batch_size": cfg.batch_size,
                "concurrency": cfg.concurrency,
                "pool_size": cfg.pool_size,
                "lease_ms": cfg.lease.as_millis() as u64,
                "http_timeout_ms": cfg.http_timeout.as_millis() as u64,
                "allow_private_targets": cfg.allow_private_targets,
                "tracing": "no subscriber in-process; RUST_LOG=warn for outboxd run",
            },
        })
    }
}

/// Shared state of a run.
pub struct Ctx {
    pub s: Settings,
    pub admin_url: String,
    pub admin: Client,
    pub receiver: Receiver,
    pub pg: Option<PgProcs>,
    pub outboxd_bin: PathBuf,
    /// `WEBHOOK_WORKER_THREADS` for the `outboxd run` processes started next (unset:
    /// the binary's default, the CPUs available to it).
    pub outboxd_threads: Option<u16>,
    pub report: Report,
    /// The push burst's median rate, for the fan-out comparison.
    pub burst_push_rate: Option<f64>,
    /// In-process VmHWM after the push burst.
    pub inproc_hwm_kib: Option<u64>,
    db_seq: u32,
}

impl Ctx {
    pub fn new(
        s: Settings,
        admin_url: String,
        admin: Client,
        receiver: Receiver,
        pg: Option<PgProcs>,
        outboxd_bin: PathBuf,
    ) -> Self {
        Self {
            s,
            admin_url,
            admin,
            receiver,
            pg,
            outboxd_bin,
            outboxd_threads: None,
            report: Report::default(),
            burst_push_rate: None,
            inproc_hwm_kib: None,
            db_seq: 0,
        }
    }

    fn db_name(&mut self, tag: &str) -> String {
        self.db_seq += 1;
        format!("outboxd_bench_{}_{}", self.db_seq, tag)
    }

    fn probe(&self, outboxd: Vec<u32>) -> Probe {
        Probe {
            receiver: self.receiver.pid(),
            pg: self.pg,
            outboxd,
        }
    }

    fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.s.poll_interval_ms)
    }

    /// Runs one scenario by name.
    pub async fn run(&mut self, name: &str) -> anyhow::Result<()> {
        match name {
            "burst" => self.burst_scenario().await,
            "fanout" => self.fanout().await,
            "idle" => self.idle_scenario().await,
            "steady" => self.steady_scenario().await,
            "producer" => self.producer_cost().await,
            "scaleout" => self.scaleout().await,
            "ceiling" => self.ceiling().await,
            "history" => self.history().await,
            "statements" => self.statements().await,
            "retention" => self.retention().await,
            "many" => self.many().await,
            other => bail!("unknown scenario {other}"),
        }
    }
}

/// How the dispatcher runs in a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// In-process, LISTEN on.
    Push,
    /// In-process, LISTEN off, poll tick only.
    Poll,
    /// `n` `outboxd run` processes (push).
    Procs(usize),
    /// `n` `outboxd run` processes, LISTEN off, poll tick only.
    PollProcs(usize),
}

impl Mode {
    fn label(self) -> String {
        match self {
            Mode::Push => "push".into(),
            Mode::Poll => "poll".into(),
            Mode::Procs(n) => format!("{n} x outboxd run"),
            Mode::PollProcs(n) => format!("{n} x outboxd run, poll"),
        }
    }
}

/// Dispatchers started for a scenario.
enum Running {
    InProc(InProc),
    Procs(Vec<Proc>),
}

impl Running {
    fn pids(&self) -> Vec<u32> {
        match self {
            Running::InProc(_) => Vec::new(),
            Running::Procs(p) => p.iter().map(Proc::pid).collect(),
        }
    }

    async fn stop(self) -> anyhow::Result<Value> {
        match self {
            Running::InProc(d) => {
                let report = d.stop().await?;
                Ok(json!({
                    "delivered": report.totals.delivered,
                    "retried": report.totals.retried,
                    "dead": report.totals.dead,
                    "released": report.totals.released,
                    "lease_lost": report.totals.lease_lost,
                    "drained": format!("{:?}", report.drained),
                }))
            }
            Running::Procs(procs) => {
                let mut clean = Vec::new();
                for p in procs {
                    clean.push(p.stop().await?);
                }
                Ok(json!({ "exited_cleanly": clean }))
            }
        }
    }
}

async fn start(ctx: &Ctx, url: &str, client: &Client, mode: Mode) -> anyhow::Result<Running> {
    let threads = ctx.s.dispatcher_threads as usize;
    let running = match mode {
        Mode::Push => Running::InProc(InProc::start(
            url,
            disp::config(true, ctx.poll_interval()),
            threads,
        )?),
        Mode::Poll => Running::InProc(InProc::start(
            url,
            disp::config(false, ctx.poll_interval()),
            threads,
        )?),
        Mode::Procs(n) | Mode::PollProcs(n) => {
            // Pure polling: LISTEN off, the same tick as the in-process poll mode.
            let poll = matches!(mode, Mode::PollProcs(_)).then(|| ctx.poll_interval());
            let mut procs = Vec::new();
            for i in 0..n {
                procs.push(Proc::spawn(
                    &ctx.outboxd_bin,
                    url,
                    &format!("bench-proc-{}", i + 1),
                    ctx.outboxd_threads,
                    poll,
                )?);
            }
            Running::Procs(procs)
        }
    };
    wait_ready(client, mode).await?;
    Ok(running)
}

async fn wait_ready(client: &Client, mode: Mode) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(30);
    match mode {
        Mode::Push => pg::wait_push_ready(client, 1, timeout).await?,
        Mode::Procs(n) => pg::wait_push_ready(client, n, timeout).await?,
        Mode::Poll => pg::wait_pool_ready(client, 1, timeout).await?,
        Mode::PollProcs(n) => {
            pg::wait_pool_ready(client, n, timeout).await?;
            // No readiness to see without LISTEN: give each process time to start.
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
    }
    // Let every dispatcher finish its arm / look-again sequence and fall asleep.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

/// The order in which round `round` runs `n` compared sides: forward in even rounds,
/// reversed in odd ones, so that over the rounds no side always goes first or always
/// follows another.
fn round_order(n: usize, round: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if round % 2 == 1 {
        order.reverse();
    }
    order
}

/// First receive time per (event, endpoint) and how many receipts were duplicates.
fn first_receipts(recs: &[Rec]) -> (HashMap<(i64, u32), i64>, usize) {
    let mut first = HashMap::with_capacity(recs.len());
    let mut dups = 0;
    for r in recs {
        match first.entry((r.id, r.ep)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                dups += 1;
                if r.t_us < *e.get() {
                    e.insert(r.t_us);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(r.t_us);
            }
        }
    }
    (first, dups)
}

/// One burst measurement's outcome.
struct BurstOut {
    /// Deliveries received over all repeats.
    items: u64,
    /// Medians of commit → first receipt (µs) and of deliveries/s after the first receipt.
    first_wait_us: f64,
    rate_after_first: f64,
    /// Median over the repeats of deliveries / (last receive - commit).
    rate: f64,
    /// That rate for each repeat.
    rates: Vec<f64>,
    cpu: Cpu,
    /// Peak RSS of each `outboxd run` process, or of this process for in-process runs.
    hwm_kib: Vec<Option<u64>>,
    json: Value,
}

/// How many `outboxd run` processes a scale-out burst uses, and their runtime threads.
#[derive(Debug, Clone, Copy)]
struct ScaleoutConfig {
    procs: u64,
    /// `WEBHOOK_WORKER_THREADS`; `None` leaves the binary's default.
    threads: Option<u16>,
    /// Each process runs with its share of the cores: the configuration the target is
    /// for. The others run the default threads beside it, for comparison.
    target: bool,
    /// Pure polling (`WEBHOOK_LISTEN=false`), shown beside the push configurations and
    /// compared by the drain rate from the first receipt.
    poll: bool,
}

impl ScaleoutConfig {
    /// The JSON key and burst tag: `scaleout_4`, `scaleout_4_default_threads` or
    /// `scaleout_4_poll`.
    fn key(&self) -> String {
        if self.poll {
            format!("scaleout_{}_poll", self.procs)
        } else if self.target {
            format!("scaleout_{}", self.procs)
        } else {
            format!("scaleout_{}_default_threads", self.procs)
        }
    }

    fn mode(&self) -> Mode {
        if self.poll {
            Mode::PollProcs(self.procs as usize)
        } else {
            Mode::Procs(self.procs as usize)
        }
    }

    fn label(&self, cores: usize) -> String {
        let procs = self.procs;
        let threads = |n: usize| {
            if n == 1 {
                "1 thread".to_owned()
            } else {
                format!("{n} threads")
            }
        };
        let label = match self.threads {
            _ if procs == 1 => "scale-out 1 x outboxd run".to_owned(),
            Some(t) => format!(
                "scale-out {procs} x outboxd run, {} each",
                threads(usize::from(t))
            ),
            None => format!(
                "scale-out {procs} x outboxd run, default ({} each)",
                threads(cores)
            ),
        };
        if self.poll {
            format!("{label} (poll)")
        } else {
            label
        }
    }
}

struct BurstSpec<'a> {
    tag: &'a str,
    events: u64,
    endpoints: u32,
    mode: Mode,
    history: u64,
    /// Bursts on this database; `BENCH_BURST_REPEATS` when `None`.
    repeats: Option<u64>,
    /// Deliver one uncounted burst first, so connections (PostgreSQL pools, HTTP
    /// keep-alive) are open before anything is measured.
    warmup: bool,
}

impl Ctx {
    /// Commits `events` in one transaction, `repeats` times on one database with one set
    /// of dispatchers, and measures commit → last receipt.
    async fn burst(&mut self, spec: BurstSpec<'_>) -> anyhow::Result<BurstOut> {
        let name = self.db_name(spec.tag);
        let (url, mut client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
        let result = self.burst_in(&spec, &url, &mut client).await;
        drop(client);
        pg::drop_db(&self.admin, &name).await?;
        result
    }

    async fn burst_in(
        &mut self,
        spec: &BurstSpec<'_>,
        url: &str,
        client: &mut Client,
    ) -> anyhow::Result<BurstOut> {
        pg::add_endpoints(client, (0..spec.endpoints).map(|i| self.receiver.url(i))).await?;
        let mut prefill_s = None;
        if spec.history > 0 {
            let started = Instant::now();
            let ep: i64 = client
                .query_one("SELECT min(id) FROM webhook_endpoints", &[])
                .await?
                .get(0);
            eprintln!(
                "bench:   prefilling {} delivered events of history ...",
                spec.history
            );
            pg::prefill_history(client, spec.history, ep, self.s.payload_bytes).await?;
            prefill_s = Some(started.elapsed().as_secs_f64());
            eprintln!(
                "bench:   prefill done in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        self.receiver.take().await?;
        // Reset this process's peak RSS so the in-process figure covers this burst only.
        let _ = std::fs::write("/proc/self/clear_refs", "5");
        let running = start(self, url, client, spec.mode).await?;
        let probe = self.probe(running.pids());
        let expected = spec.events * u64::from(spec.endpoints);
        let timeout = Duration::from_secs(60 + expected / 1_000);
        let mut runs = Vec::new();
        let mut rates = Vec::new();
        let mut cpu: Option<Cpu> = None;
        let mut items = 0_u64;
        let mut waits = Vec::new();
        let mut after_firsts = Vec::new();
        let mut failure = None;
        if spec.warmup {
            pg::insert_burst(
                client,
                spec.events,
                self.s.payload_bytes,
                &format!("bench.{}.warmup", spec.tag),
            )
            .await?;
            self.receiver.wait_for(expected, timeout).await?;
            self.receiver.take().await?;
            pg::wait_settled(client, Duration::from_secs(60)).await?;
            wait_ready(client, spec.mode).await?;
        }
        for rep in 0..spec.repeats.unwrap_or(self.s.burst_repeats) {
            if rep > 0 {
                wait_ready(client, spec.mode).await?;
            }
            let (insert, commit_us) = pg::insert_burst(
                client,
                spec.events,
                self.s.payload_bytes,
                &format!("bench.{}", spec.tag),
            )
            .await?;
            let snap0 = probe.snap();
            let got = self.receiver.wait_for(expected, timeout).await?;
            let snap1 = probe.snap();
            let window = snap0.until(&snap1);
            let recs = self.receiver.take().await?;
            let settled = pg::wait_settled(client, Duration::from_secs(60)).await;
            let (first, dups) = first_receipts(&recs);
            let first_us = first.values().copied().min().unwrap_or(commit_us);
            let last_us = first.values().copied().max().unwrap_or(commit_us);
            let secs = (last_us - commit_us) as f64 / 1e6;
            let rate = first.len() as f64 / secs.max(1e-6);
            let after_first = (first.len().saturating_sub(1)) as f64
                / ((last_us - first_us) as f64 / 1e6).max(1e-6);
            eprintln!(
                "bench:   {} ({}) run {}: {} deliveries in {:.3} s = {} /s (first after {}, insert+commit {} ms)",
                spec.tag,
                spec.mode.label(),
                rep + 1,
                first.len(),
                secs,
                int(rate),
                ms((first_us - commit_us) as f64),
                insert.as_millis()
            );
            runs.push(json!({
                "deliveries": first.len(),
                "expected": expected,
                "duplicates": dups,
                "receiver_count_at_end": got,
                "insert_and_commit_ms": insert.as_secs_f64() * 1e3,
                "commit_to_first_receipt_ms": (first_us - commit_us) as f64 / 1e3,
                "commit_to_last_receipt_ms": (last_us - commit_us) as f64 / 1e3,
                "commit_to_all_settled_ms": settled.as_ref().ok().map(|t| (t - commit_us) as f64 / 1e3),
                "deliveries_per_s": rate,
                "deliveries_per_s_after_first": after_first,
                "cpu": window.json(),
            }));
            cpu = Some(cpu.map_or(window, |c| c.combine(&window)));
            items += first.len() as u64;
            if (first.len() as u64) < expected {
                failure = Some(format!(
                    "only {} of {expected} deliveries arrived within {timeout:?}",
                    first.len()
                ));
                break;
            }
            if let Err(e) = settled {
                failure = Some(format!("{e:#}"));
                break;
            }
            rates.push(rate);
            waits.push((first_us - commit_us) as f64);
            after_firsts.push(after_first);
        }
        let hwm_kib = match &running {
            Running::InProc(_) => vec![sys::status_kib(None, "VmHWM")],
            Running::Procs(p) => p
                .iter()
                .map(|p| sys::status_kib(Some(p.pid()), "VmHWM"))
                .collect(),
        };
        let dispatcher = running.stop().await?;
        if let Some(f) = failure {
            bail!(f);
        }
        let rate = median(&rates);
        Ok(BurstOut {
            items,
            first_wait_us: median(&waits),
            rate_after_first: median(&after_firsts),
            rate,
            rates,
            cpu: cpu.unwrap_or_default(),
            hwm_kib: hwm_kib.clone(),
            json: json!({
                "mode": spec.mode.label(),
                "events": spec.events,
                "endpoints": spec.endpoints,
                "history_rows": spec.history,
                "history_prefill_s": prefill_s,
                "median_deliveries_per_s": rate,
                "runs": runs,
                "vm_hwm_kib": hwm_kib,
                "dispatcher_report": dispatcher,
            }),
        })
    }

    async fn burst_scenario(&mut self) -> anyhow::Result<()> {
        let n = self.s.burst_events;
        let rounds = self.s.burst_repeats;
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
                let out = self
                    .burst(BurstSpec {
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
        let ratios: Vec<f64> = of(1, |o| o.rate_after_first)
            .iter()
            .zip(of(0, |o| o.rate_after_first))
            .map(|(poll, push)| poll / push)
            .collect();
        for (m, &mode) in modes.iter().enumerate() {
            let label = format!("burst {} ({})", int(n as f64), mode.label());
            let mut cpu: Option<Cpu> = None;
            for out in &outs[m] {
                cpu = Some(cpu.map_or(out.cpu, |c| c.combine(&out.cpu)));
            }
            let items = outs[m].iter().map(|o| o.items).sum();
            self.report
                .cpu(&label, cpu.unwrap_or_default(), Some(items));
            let rate = median(&of(m, |o| o.rate));
            let after_first = median(&of(m, |o| o.rate_after_first));
            if mode == Mode::Push {
                self.burst_push_rate = Some(rate);
                self.inproc_hwm_kib = outs[m]
                    .iter()
                    .filter_map(|o| o.hwm_kib.first().copied().flatten())
                    .max();
                self.report.target(
                    &label,
                    &format!("deliveries/s, commit → last ack (median of {rounds})"),
                    int(rate),
                    ">= 20,000",
                    rate >= 20_000.0,
                );
            } else {
                let ratio = median(&ratios);
                self.report.target(
                    &label,
                    &format!(
                        "deliveries/s from first receipt (median of {rounds}); vs push, paired by round (median)"
                    ),
                    format!("{} ({:+.0}% vs push)", int(after_first), (ratio - 1.0) * 100.0),
                    "within 10% of push",
                    ratio >= 0.9,
                );
                self.report.info(
                    &label,
                    "deliveries/s, commit → last ack, tick wait included (median)",
                    int(rate),
                );
            }
            self.report.info(
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
            self.report
                .detail(&format!("burst_{}", mode.label()), detail);
        }
        if let Some(kib) = self.inproc_hwm_kib {
            self.report.info(
                "memory",
                "VmHWM of the bench process during the push bursts (dispatcher + harness)",
                format!("{:.1} MiB", kib as f64 / 1024.0),
            );
        }
        Ok(())
    }

    async fn fanout(&mut self) -> anyhow::Result<()> {
        let (n, k) = (self.s.fanout_events, self.s.fanout_endpoints as u32);
        let out = self
            .burst(BurstSpec {
                tag: "fanout",
                events: n,
                endpoints: k,
                mode: Mode::Push,
                history: 0,
                repeats: None,
                warmup: false,
            })
            .await?;
        let label = format!(
            "fan-out {} x {k} = {}",
            int(n as f64),
            int((n * u64::from(k)) as f64)
        );
        self.report.cpu(&label, out.cpu, Some(out.items));
        match self.burst_push_rate {
            Some(burst) => self.report.target(
                &label,
                &format!(
                    "deliveries/s (median of {}); burst push {}",
                    self.s.burst_repeats,
                    int(burst)
                ),
                format!(
                    "{} ({:+.0}%)",
                    int(out.rate),
                    (out.rate / burst - 1.0) * 100.0
                ),
                "same as burst (>= 90%)",
                out.rate >= 0.9 * burst,
            ),
            None => self.report.info(
                &label,
                "deliveries/s (burst not run: no comparison)",
                int(out.rate),
            ),
        }
        self.report.detail("fanout", out.json);

        // Pure-poll mode: the same drain once the tick has found the events (a full
        // batch is claimed again at once in either mode); from the commit it also waits
        // for the tick.
        let push_after_first = out.rate_after_first;
        let poll = self
            .burst(BurstSpec {
                tag: "fanout_poll",
                events: n,
                endpoints: k,
                mode: Mode::Poll,
                history: 0,
                repeats: None,
                warmup: false,
            })
            .await?;
        let poll_label = format!("{label} (poll)");
        self.report.cpu(&poll_label, poll.cpu, Some(poll.items));
        self.report.info(
            &poll_label,
            "deliveries/s from first receipt (median), vs push's; commit → last ack",
            format!(
                "{} ({:+.0}% vs push); {}",
                int(poll.rate_after_first),
                (poll.rate_after_first / push_after_first - 1.0) * 100.0,
                int(poll.rate)
            ),
        );
        self.report.detail("fanout_poll", poll.json);
        Ok(())
    }

    async fn scaleout(&mut self) -> anyhow::Result<()> {
        // The binary under test, then (with BENCH_AB_BIN) the one to compare it with.
        let bins: Vec<PathBuf> = std::iter::once(self.outboxd_bin.clone())
            .chain(self.s.scaleout_ab_bin.clone())
            .collect();
        for bin in &bins {
            if !bin.is_file() {
                bail!(
                    "{} not found: build it first (cargo build --release --bin outboxd)",
                    bin.display()
                );
            }
        }
        let n = self.s.burst_events;
        let rounds = self.s.burst_repeats;
        // Several processes on one host each get their share of its cores
        // (WEBHOOK_WORKER_THREADS = cores / processes, at least 1), as docs/operations.md
        // advises and as a CPU quota of that share would make the default; each such
        // count also runs with the default threads (every process as many as there are
        // cores), shown beside it.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut configs: Vec<ScaleoutConfig> = Vec::new();
        for &procs in &self.s.scaleout_procs {
            let share = (cores / procs as usize).max(1);
            if share >= cores {
                // One process, or a machine with no more cores than processes: the
                // default is the share.
                configs.push(ScaleoutConfig {
                    procs,
                    threads: None,
                    target: true,
                    poll: false,
                });
            } else {
                let threads = u16::try_from(share.min(1024)).unwrap_or(1024);
                configs.push(ScaleoutConfig {
                    procs,
                    threads: Some(threads),
                    target: true,
                    poll: false,
                });
                configs.push(ScaleoutConfig {
                    procs,
                    threads: None,
                    target: false,
                    poll: false,
                });
            }
        }
        // Pure polling, for each count given its share of the cores (shown, no target):
        // the drain once a tick has found the burst, since from the commit every poll
        // burst also waits for a tick.
        let push_configs: Vec<ScaleoutConfig> =
            configs.iter().filter(|c| c.target).copied().collect();
        for config in push_configs {
            configs.push(ScaleoutConfig {
                target: false,
                poll: true,
                ..config
            });
        }
        // Interleaved: round r bursts once with each configuration (fresh databases and
        // processes each time), so a machine that drifts slower or faster during the
        // scenario biases none of them. Each figure is the median of its rounds, like
        // the producer-cost comparison. With a second binary, each burst is repeated with
        // it right before or after; the pair's order alternates by round, so going first
        // or second favours neither.
        // Index [b][i]: binary b (0 the one under test), configuration i.
        let mut rates: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); configs.len()]; bins.len()];
        let mut cpus: Vec<Vec<Option<Cpu>>> = vec![vec![None; configs.len()]; bins.len()];
        let mut items = vec![vec![0_u64; configs.len()]; bins.len()];
        let mut hwm: Vec<Option<u64>> = vec![None; configs.len()];
        let mut rounds_json: Vec<Vec<Vec<Value>>> =
            vec![vec![Vec::new(); configs.len()]; bins.len()];
        for round in 0..rounds {
            // Odd rounds run the configurations in reverse, so none always follows
            // another (each share-of-the-cores run and its default-threads run, above all).
            for i in round_order(configs.len(), round) {
                let config = &configs[i];
                for b in round_order(bins.len(), round) {
                    let suffix = if b == 0 { "" } else { "_ab" };
                    let tag = format!("{}_r{}{suffix}", config.key(), round + 1);
                    self.outboxd_bin = bins[b].clone();
                    self.outboxd_threads = config.threads;
                    let out = self
                        .burst(BurstSpec {
                            tag: &tag,
                            events: n,
                            endpoints: 1,
                            mode: config.mode(),
                            history: 0,
                            repeats: Some(1),
                            warmup: true,
                        })
                        .await;
                    self.outboxd_bin = bins[0].clone();
                    self.outboxd_threads = None;
                    let out = out?;
                    rates[b][i].push(if config.poll {
                        out.rate_after_first
                    } else {
                        out.rate
                    });
                    cpus[b][i] = Some(cpus[b][i].map_or(out.cpu, |c| c.combine(&out.cpu)));
                    items[b][i] += out.items;
                    rounds_json[b][i].push(out.json);
                    if b == 0 {
                        let peak = out.hwm_kib.iter().flatten().copied().max();
                        hwm[i] = hwm[i].max(peak);
                    }
                }
            }
        }
        let mut details = serde_json::Map::new();
        let one = configs
            .iter()
            .position(|c| c.procs == 1 && !c.poll)
            .map(|i| median(&rates[0][i]));
        let one_poll = configs
            .iter()
            .position(|c| c.procs == 1 && c.poll)
            .map(|i| median(&rates[0][i]));
        for (i, config) in configs.iter().enumerate() {
            let procs = config.procs;
            let rate = median(&rates[0][i]);
            let label = config.label(cores);
            if let Some(cpu) = cpus[0][i] {
                self.report.cpu(&label, cpu, Some(items[0][i]));
            }
            let metric = format!(
                "deliveries/s{}, burst {} (median of {rounds} interleaved)",
                if config.poll {
                    " from first receipt"
                } else {
                    ""
                },
                int(n as f64)
            );
            let vs_one =
                |one: f64| format!("{} ({:+.0}% vs 1)", int(rate), (rate / one - 1.0) * 100.0);
            match if config.poll { one_poll } else { one } {
                // The target is for processes given their share of the cores; with the
                // default threads, several processes on one host oversubscribe it.
                Some(one) if procs > 1 && config.target => {
                    self.report
                        .target(&label, &metric, vs_one(one), ">= 1 process", rate >= one)
                }
                Some(one) if procs > 1 => self.report.info(&label, &metric, vs_one(one)),
                _ => self.report.info(&label, &metric, int(rate)),
            }
            if procs == 1
                && !config.poll
                && let Some(kib) = hwm[i]
            {
                let mib = kib as f64 / 1024.0;
                self.report.target(
                    "memory",
                    "peak RSS (VmHWM) of `outboxd run`, scale-out 1 bursts",
                    format!("{mib:.1} MiB"),
                    "< 48 MiB",
                    mib < 48.0,
                );
            }
            details.insert(
                config.key(),
                json!({
                    "processes": procs,
                    "worker_threads": config.threads,
                    "poll": config.poll,
                    "rates_from": if config.poll { "first receipt" } else { "commit" },
                    "median_deliveries_per_s": rate,
                    "deliveries_per_s_by_round": rates[0][i],
                    "peak_rss_kib": hwm[i],
                    "rounds": rounds_json[0][i],
                }),
            );
            if let Some(ab) = rates.get(1) {
                // The binary under test relative to the baseline: above 1, it was faster.
                let ratios: Vec<f64> = rates[0][i].iter().zip(&ab[i]).map(|(a, b)| a / b).collect();
                let faster = ratios.iter().filter(|&&r| r > 1.0).count();
                let ab_label = format!("A/B {}", label.trim_start_matches("scale-out "));
                if let Some(cpu) = cpus[1][i] {
                    self.report.cpu(
                        &format!("{ab_label} (BENCH_AB_BIN)"),
                        cpu,
                        Some(items[1][i]),
                    );
                }
                self.report.info(
                    &ab_label,
                    "the binary above vs BENCH_AB_BIN, paired by round (median ratio)",
                    format!(
                        "{:+.1}%, faster in {faster} of {}",
                        (median(&ratios) - 1.0) * 100.0,
                        ratios.len()
                    ),
                );
                details.insert(
                    format!("ab_{}", config.key()),
                    json!({
                        "processes": procs,
                        "worker_threads": config.threads,
                        "binary": bins[1].display().to_string(),
                        "median_deliveries_per_s": median(&ab[i]),
                        "deliveries_per_s_by_round": ab[i],
                        "ratio_under_test_to_ab_by_round": ratios,
                        "rounds": rounds_json[1][i],
                    }),
                );
            }
        }
        self.report.detail("scaleout", Value::Object(details));
        Ok(())
    }

    async fn history(&mut self) -> anyhow::Result<()> {
        let n = self.s.burst_events;
        let spec = |tag, history| BurstSpec {
            tag,
            events: n,
            endpoints: 1,
            mode: Mode::Push,
            history,
            repeats: None,
            warmup: false,
        };
        // The baseline is measured on both sides of the history bursts, minutes apart
        // at most, and its figure is the median of both sets, so a machine drifting
        // during the scenario does not count for or against the history.
        let before = self.burst(spec("history_empty_before", 0)).await?;
        let full = self
            .burst(spec("history_full", self.s.history_rows))
            .await?;
        let after = self.burst(spec("history_empty_after", 0)).await?;
        let empty_rate = median(&[before.rates.as_slice(), &after.rates].concat());
        let label = format!("history {} rows", int(self.s.history_rows as f64));
        self.report.cpu(&label, full.cpu, Some(full.items));
        self.report.target(
            &label,
            &format!(
                "deliveries/s, burst {} (empty db before and after: {})",
                int(n as f64),
                int(empty_rate)
            ),
            format!(
                "{} ({:+.0}%)",
                int(full.rate),
                (full.rate / empty_rate - 1.0) * 100.0
            ),
            "within 10% of empty",
            full.rate >= 0.9 * empty_rate,
        );
        self.report.detail(
            "history",
            json!({
                "empty_before": before.json,
                "empty_after": after.json,
                "empty_median_deliveries_per_s": empty_rate,
                "with_history": full.json,
            }),
        );
        Ok(())
    }

    /// Retention with `BENCH_RETENTION_KEPT` rows it must keep (dead within their
    /// retention, parked under a disabled endpoint, retries due tomorrow, all of events
    /// older than the delivered retention): a first pass, then a pass that prunes
    /// `BENCH_RETENTION_EXPIRED` expired events behind them, then one that prunes
    /// `BENCH_RETENTION_BULK`. No dispatcher runs; passes call the library's `prune`
    /// with a budget that never ends them.
    async fn retention(&mut self) -> anyhow::Result<()> {
        let name = self.db_name("retention");
        let (url, client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
        let result = self.retention_in(&url, &client).await;
        drop(client);
        pg::drop_db(&self.admin, &name).await?;
        result
    }

    async fn retention_in(&mut self, url: &str, client: &Client) -> anyhow::Result<()> {
        use outboxd::retention::{Pruned, RetentionPolicy, prune};
        let (kept, expired, bulk) = (
            self.s.retention_kept,
            self.s.retention_expired,
            self.s.retention_bulk,
        );
        pg::add_endpoints(client, (0..2).map(|i| self.receiver.url(i))).await?;
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
        self.report.target(
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
        self.report.target(
            &label,
            &format!(
                "a pass pruning {} expired events with deliveries and attempts",
                int(bulk as f64)
            ),
            format!("{} s", fmt_secs(bulk_pass.0)),
            "< 10 s",
            bulk_pass.0 < 10.0,
        );
        self.report
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
        self.report.detail(
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

    /// Single events, `gap` apart: commit → receipt latency.
    async fn idle_scenario(&mut self) -> anyhow::Result<()> {
        // Two `outboxd run` processes too: with several dispatchers, each wake-up
        // wakes all of them, and the doorbell's gate must stay open for whichever
        // sleeps (a late close that shut it cost up to a recheck or poll tick).
        let mut modes = vec![Mode::Push, Mode::Poll];
        if self.outboxd_bin.is_file() {
            modes.push(Mode::Procs(2));
        } else {
            eprintln!(
                "bench:   {} not found: idle with 2 processes skipped",
                self.outboxd_bin.display()
            );
        }
        for mode in modes {
            let tag = match mode {
                Mode::Procs(n) => format!("idle_procs_{n}"),
                _ => format!("idle_{}", mode.label()),
            };
            let name = self.db_name(&tag);
            let (url, client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
            let result = self.idle_in(mode, &url, &client).await;
            drop(client);
            pg::drop_db(&self.admin, &name).await?;
            let (p50, p99, json) = result?;
            let label = format!(
                "idle {} x 1 event, {} ms apart ({})",
                self.s.idle_events,
                self.s.idle_gap_ms,
                mode.label()
            );
            if mode == Mode::Push {
                self.report.target(
                    &label,
                    "p50 commit → receipt",
                    ms(p50),
                    "< 1.5 ms",
                    p50 < 1_500.0,
                );
                self.report.target(
                    &label,
                    "p99 commit → receipt",
                    ms(p99),
                    "< 3 ms",
                    p99 < 3_000.0,
                );
            } else {
                self.report.info(&label, "p50 commit → receipt", ms(p50));
                self.report.info(&label, "p99 commit → receipt", ms(p99));
            }
            self.report.detail(&tag, json);
        }
        Ok(())
    }

    async fn idle_in(
        &mut self,
        mode: Mode,
        url: &str,
        client: &Client,
    ) -> anyhow::Result<(f64, f64, Value)> {
        pg::add_endpoints(client, [self.receiver.url(0)]).await?;
        self.receiver.take().await?;
        let running = start(self, url, client, mode).await?;
        let mut producer = pg::connect(url).await?;
        let payload = pg::payload(0, self.s.payload_bytes);
        let gap = Duration::from_millis(self.s.idle_gap_ms);
        let t0 = tokio::time::Instant::now() + Duration::from_millis(50);
        let mut commits = Vec::new();
        for i in 0..self.s.idle_events {
            tokio::time::sleep_until(t0 + gap * i as u32).await;
            commits.push(pg::produce_one(&mut producer, &payload, "bench.idle").await?);
        }
        let extra = if mode == Mode::Poll {
            self.poll_interval()
        } else {
            Duration::ZERO
        };
        let got = self
            .receiver
            .wait_for(self.s.idle_events, Duration::from_secs(5) + extra)
            .await?;
        let recs = self.receiver.take().await?;
        pg::wait_settled(client, Duration::from_secs(10)).await?;
        let starts = pg::attempt_starts(client).await?;
        let dispatcher = running.stop().await?;
        let lat = latencies(&commits, &recs);
        let split = split_latency(&commits, &recs, &starts);
        if lat.delivered < commits.len() {
            bail!(
                "{mode:?}: only {} of {} idle events arrived (receiver count {got})",
                lat.delivered,
                commits.len()
            );
        }
        let (p50, p99) = (pct(&lat.sorted, 50.0), pct(&lat.sorted, 99.0));
        let json = json!({
            "mode": mode.label(),
            "events": commits.len(),
            "gap_ms": self.s.idle_gap_ms,
            "latency_us": lat.json(),
            "split_us": split,
            "dispatcher_report": dispatcher,
        });
        Ok((p50, p99, json))
    }

    async fn steady_scenario(&mut self) -> anyhow::Result<()> {
        for rate in self.s.steady_rates.clone() {
            for mode in [Mode::Push, Mode::Poll] {
                self.steady_at(rate, mode).await?;
            }
        }
        Ok(())
    }

    /// One steady run. Targets are for push mode; pure-poll mode's latency is bounded by
    /// its tick, and the table shows it.
    async fn steady_at(&mut self, rate: u64, mode: Mode) -> anyhow::Result<()> {
        let push = mode == Mode::Push;
        let tag = if push {
            format!("steady_{rate}")
        } else {
            format!("steady_{rate}_{}", mode.label())
        };
        let name = self.db_name(&tag);
        let (url, client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
        let result = self.steady_in(rate, mode, &url, &client).await;
        drop(client);
        pg::drop_db(&self.admin, &name).await?;
        let out = result?;
        let label = format!(
            "steady {}/s for {} s ({})",
            int(rate as f64),
            self.s.steady_secs,
            mode.label()
        );
        self.report.cpu(&label, out.cpu, Some(out.committed as u64));
        self.report
            .info(&label, "p50 commit → receipt", ms(out.p50));
        if rate >= 2_000 && push {
            self.report.target(
                &label,
                "p99 commit → receipt",
                ms(out.p99),
                "< 10 ms",
                out.p99 < 10_000.0,
            );
        } else {
            self.report
                .info(&label, "p99 commit → receipt", ms(out.p99));
        }
        self.report
            .info(&label, "p99.9 commit → receipt", ms(out.p999));
        self.report.info(
            &label,
            "events over 100 ms; longest gap between receipts",
            format!("{}; {}", int(out.slow as f64), ms(out.max_gap_us)),
        );
        self.report.info(
            &label,
            "producer kept its rate",
            format!(
                "{} ({} /s achieved, {} conns, p99 schedule lag {})",
                if out.kept_rate { "yes" } else { "NO" },
                int(out.achieved),
                out.conns,
                ms(out.lag_p99)
            ),
        );
        let up = format!(
            "{} of {} delivered, last {} after the last commit",
            int(out.delivered as f64),
            int(out.committed as f64),
            ms(out.drain_us)
        );
        if rate >= 2_000 && push {
            self.report.target(
                &label,
                "dispatcher kept up",
                up,
                "all within 5 s",
                out.kept_up,
            );
        } else {
            self.report.info(&label, "dispatcher kept up", up);
        }
        self.report.detail(&tag, out.json);
        Ok(())
    }

    async fn steady_in(
        &mut self,
        rate: u64,
        mode: Mode,
        url: &str,
        client: &Client,
    ) -> anyhow::Result<Steady> {
        pg::add_endpoints(client, [self.receiver.url(0)]).await?;
        self.receiver.take().await?;
        let running = start(self, url, client, mode).await?;
        let probe = self.probe(Vec::new());
        // Enough connections that fsync'd commits (group commit) keep the schedule.
        let conns = (rate / 125).clamp(4, 32);
        let mut producers = Vec::new();
        for _ in 0..conns {
            producers.push(pg::connect(url).await?);
        }
        let total = rate * self.s.steady_secs;
        let duration = Duration::from_secs(self.s.steady_secs);
        let next = Arc::new(AtomicU64::new(0));
        let t0 = tokio::time::Instant::now() + Duration::from_millis(100);
        let t0_us = now_us() + 100_000;
        let hard_end = t0 + duration + Duration::from_secs(10);
        let payload = Arc::new(pg::payload(0, self.s.payload_bytes));
        let mut tasks = Vec::new();
        for mut producer in producers {
            let (next, payload) = (Arc::clone(&next), Arc::clone(&payload));
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let due = t0 + Duration::from_nanos(i * 1_000_000_000 / rate);
                    tokio::time::sleep_until(due).await;
                    let now = tokio::time::Instant::now();
                    if now >= hard_end {
                        break;
                    }
                    let lag = now.duration_since(due).as_micros() as f64;
                    let (id, commit_us) =
                        pg::produce_one(&mut producer, &payload, "bench.steady").await?;
                    out.push((id, commit_us, lag));
                }
                anyhow::Ok(out)
            }));
        }
        tokio::time::sleep_until(t0).await;
        let snap0 = probe.snap();
        let mut commits = Vec::new();
        let mut lags = Vec::new();
        for task in tasks {
            for (id, commit_us, lag) in task.await?? {
                commits.push((id, commit_us));
                lags.push(lag);
            }
        }
        let snap1 = probe.snap();
        let last_commit = commits.iter().map(|c| c.1).max().unwrap_or(t0_us);
        let got = self
            .receiver
            .wait_for(commits.len() as u64, Duration::from_secs(10))
            .await?;
        let recs = self.receiver.take().await?;
        let _ = pg::wait_settled(client, Duration::from_secs(10)).await;
        let starts = pg::attempt_starts(client).await?;
        let dispatcher = running.stop().await?;
        let lat = latencies(&commits, &recs);
        let split = split_latency(&commits, &recs, &starts);
        let stalls = stalls(&recs, &lat, 100_000);
        lags.sort_by(f64::total_cmp);
        let achieved = commits.len() as f64 / ((last_commit - t0_us) as f64 / 1e6).max(1e-6);
        let kept_rate = commits.len() as u64 == total && achieved >= 0.98 * rate as f64;
        let drain_us = (lat.last_receipt_us - last_commit) as f64;
        let kept_up = lat.delivered == commits.len() && drain_us <= 5e6;
        let cpu = snap0.until(&snap1);
        eprintln!(
            "bench:   steady {rate}/s ({}): {} committed ({} /s), {} delivered, p50 {} p99 {}",
            mode.label(),
            commits.len(),
            int(achieved),
            lat.delivered,
            ms(pct(&lat.sorted, 50.0)),
            ms(pct(&lat.sorted, 99.0))
        );
        Ok(Steady {
            p50: pct(&lat.sorted, 50.0),
            p99: pct(&lat.sorted, 99.0),
            p999: pct(&lat.sorted, 99.9),
            lag_p99: pct(&lags, 99.0),
            achieved,
            kept_rate,
            kept_up,
            conns,
            committed: commits.len(),
            delivered: lat.delivered,
            drain_us,
            slow: stalls["events_over_100ms"].as_u64().unwrap_or(0),
            max_gap_us: stalls["max_receipt_gap_us"].as_f64().unwrap_or(0.0),
            cpu,
            json: json!({
                "rate": rate,
                "mode": mode.label(),
                "secs": self.s.steady_secs,
                "producer_connections": conns,
                "scheduled": total,
                "committed": commits.len(),
                "achieved_per_s": achieved,
                "schedule_lag_us": {"p50": pct(&lags, 50.0), "p99": pct(&lags, 99.0), "max": lags.last()},
                "producer_kept_rate": kept_rate,
                "delivered": lat.delivered,
                "receiver_count": got,
                "last_receipt_after_last_commit_ms": drain_us / 1e3,
                "dispatcher_kept_up": kept_up,
                "latency_us": lat.json(),
                "split_us": split,
                "stalls": stalls,
                "cpu": cpu.json(),
                "dispatcher_report": dispatcher,
            }),
        })
    }

    /// Producers' insert rate with and without the notify trigger, dispatcher running.
    /// The target is for push mode. In pure-poll mode no dispatcher ever opens the
    /// doorbell's gate, so the trigger costs only its `WHEN` test; the table shows it.
    async fn producer_cost(&mut self) -> anyhow::Result<()> {
        for mode in [Mode::Push, Mode::Poll] {
            let name = self.db_name(&format!("producer_{}", mode.label()));
            let (url, client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
            let result = self.producer_in(mode, &url, &client).await;
            drop(client);
            pg::drop_db(&self.admin, &name).await?;
            result?;
        }
        Ok(())
    }

    async fn producer_in(&mut self, mode: Mode, url: &str, client: &Client) -> anyhow::Result<()> {
        let push = mode == Mode::Push;
        pg::add_endpoints(client, [self.receiver.url(0)]).await?;
        self.receiver.take().await?;
        let running = start(self, url, client, mode).await?;
        let probe = self.probe(Vec::new());
        let mut producers = Vec::new();
        for _ in 0..self.s.producer_conns {
            producers.push(pg::connect(url).await?);
        }
        let payload = Arc::new(pg::payload(0, self.s.payload_bytes));
        let phase = Duration::from_secs(self.s.producer_secs);
        let mut inserted = 0_u64;
        let mut delivered = 0_u64;
        let mut with = Vec::new();
        let mut without = Vec::new();
        let mut cpu_with: Option<Cpu> = None;
        let mut cpu_without: Option<Cpu> = None;
        let (mut inserted_with, mut inserted_without) = (0_u64, 0_u64);
        let mut phases = Vec::new();
        // Round 0 is a warm-up and is not counted: the first phase after the dispatcher
        // starts was 10-17% slower than the rest, whichever it was. The measured rounds
        // alternate which half goes first, so neither gains from the machine drifting.
        for round in 0..=self.s.producer_rounds {
            let warmup = round == 0;
            let order = if round % 2 == 1 {
                [true, false]
            } else {
                [false, true]
            };
            for trigger in order {
                pg::set_trigger(client, trigger).await?;
                // Start each phase with the dispatcher idle: no backlog from the last one.
                self.receiver
                    .wait_for(inserted - delivered, Duration::from_secs(30))
                    .await?;
                delivered += self.receiver.take().await?.len() as u64;
                if trigger && push {
                    pg::wait_push_ready(client, 1, Duration::from_secs(10)).await?;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let snap0 = probe.snap();
                let started = Instant::now();
                let length = if warmup {
                    phase.min(Duration::from_secs(2))
                } else {
                    phase
                };
                let deadline = tokio::time::Instant::now() + length;
                let mut tasks = Vec::new();
                for mut producer in std::mem::take(&mut producers) {
                    let payload = Arc::clone(&payload);
                    tasks.push(tokio::spawn(async move {
                        let mut n = 0_u64;
                        while tokio::time::Instant::now() < deadline {
                            pg::produce_one(&mut producer, &payload, "bench.producer").await?;
                            n += 1;
                        }
                        anyhow::Ok((producer, n))
                    }));
                }
                let mut n = 0;
                for task in tasks {
                    let (producer, count) = task.await??;
                    producers.push(producer);
                    n += count;
                }
                let elapsed = started.elapsed().as_secs_f64();
                let cpu = snap0.until(&probe.snap());
                inserted += n;
                let rate = n as f64 / elapsed;
                eprintln!(
                    "bench:   {} {} trigger {}: {} inserts/s",
                    mode.label(),
                    if warmup {
                        "warm-up".to_string()
                    } else {
                        format!("round {round}")
                    },
                    if trigger { "on " } else { "off" },
                    int(rate)
                );
                if warmup {
                    continue;
                }
                phases.push(json!({
                    "round": round,
                    "trigger": trigger,
                    "inserts": n,
                    "seconds": elapsed,
                    "inserts_per_s": rate,
                    "cpu": cpu.json(),
                }));
                let (rates, acc, count) = if trigger {
                    (&mut with, &mut cpu_with, &mut inserted_with)
                } else {
                    (&mut without, &mut cpu_without, &mut inserted_without)
                };
                *count += n;
                rates.push(rate);
                *acc = Some(acc.map_or(cpu, |c| c.combine(&cpu)));
            }
        }
        pg::set_trigger(client, true).await?;
        let got = self
            .receiver
            .wait_for(inserted - delivered, Duration::from_secs(30))
            .await?;
        delivered += self.receiver.take().await?.len() as u64;
        let dispatcher = running.stop().await?;
        let (a, b) = (median(&with), median(&without));
        let ratio = a / b;
        let label = format!(
            "producer cost, {} conns, {} x {} s rounds ({})",
            self.s.producer_conns,
            self.s.producer_rounds,
            self.s.producer_secs,
            mode.label()
        );
        self.report
            .info(&label, "median inserts/s with trigger + dispatcher", int(a));
        self.report
            .info(&label, "median inserts/s without trigger", int(b));
        if push {
            self.report.target(
                &label,
                "ratio with / without",
                format!("{ratio:.3}"),
                ">= 0.90",
                ratio >= 0.90,
            );
        } else {
            self.report
                .info(&label, "ratio with / without", format!("{ratio:.3}"));
        }
        if let Some(c) = cpu_with {
            self.report.cpu(
                &format!("producers, trigger on ({})", mode.label()),
                c,
                Some(inserted_with),
            );
        }
        if let Some(c) = cpu_without {
            self.report.cpu(
                &format!("producers, trigger off ({})", mode.label()),
                c,
                Some(inserted_without),
            );
        }
        self.report.detail(
            if push { "producer" } else { "producer_poll" },
            json!({
                "mode": mode.label(),
                "connections": self.s.producer_conns,
                "median_with_trigger": a,
                "median_without_trigger": b,
                "ratio": ratio,
                "phases": phases,
                "inserted": inserted,
                "delivered": delivered,
                "receiver_count_at_end": got,
                "dispatcher_report": dispatcher,
            }),
        );
        if delivered < inserted {
            bail!("only {delivered} of {inserted} producer events were delivered");
        }
        Ok(())
    }

    /// The receiver alone, hammered by an in-process hyper client.
    async fn ceiling(&mut self) -> anyhow::Result<()> {
        self.receiver.take().await?;
        let conns = self.s.ceiling_conns;
        let secs = self.s.ceiling_secs;
        let body = Bytes::from(
            json!({"id": "1", "type": "bench.ceiling", "timestamp": "2025-01-01T00:00:00.000000Z",
                   "data": pg::payload(1, 510)})
            .to_string(),
        );
        let port = self.receiver.port();
        let probe = self.probe(Vec::new());
        let snap0 = probe.snap();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for c in 0..conns {
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                stream.set_nodelay(true)?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
                tokio::spawn(conn);
                let mut n = 0_u64;
                while tokio::time::Instant::now() < deadline {
                    let request = hyper::Request::post("/hook/0")
                        .header("host", "127.0.0.1")
                        .header("content-type", "application/json")
                        .header("webhook-id", (c * 1_000_000 + n).to_string())
                        .body(Full::new(body.clone()))?;
                    sender.ready().await?;
                    let response = sender.send_request(request).await?;
                    if response.status() != hyper::StatusCode::NO_CONTENT {
                        bail!("receiver answered {}", response.status());
                    }
                    n += 1;
                }
                anyhow::Ok(n)
            }));
        }
        let mut total = 0;
        for task in tasks {
            total += task.await??;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = snap0.until(&probe.snap());
        let recorded = self.receiver.take().await?.len() as u64;
        let rate = total as f64 / elapsed;
        eprintln!("bench:   receiver ceiling: {} requests/s", int(rate));
        let label = format!("receiver ceiling, {conns} conns, {secs} s");
        self.report.info(
            &label,
            &format!("requests/s ({}-byte body)", body.len()),
            int(rate),
        );
        self.report.cpu(&label, cpu, Some(total));
        self.report.detail(
            "ceiling",
            json!({
                "connections": conns,
                "seconds": elapsed,
                "requests": total,
                "recorded_by_receiver": recorded,
                "requests_per_s": rate,
                "body_bytes": body.len(),
                "cpu": cpu.json(),
            }),
        );
        if recorded != total {
            bail!("the receiver recorded {recorded} of {total} requests");
        }
        Ok(())
    }
}

struct Steady {
    slow: u64,
    max_gap_us: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    lag_p99: f64,
    achieved: f64,
    kept_rate: bool,
    kept_up: bool,
    conns: u64,
    committed: usize,
    delivered: usize,
    drain_us: f64,
    cpu: Cpu,
    json: Value,
}

/// Commit → first receipt latencies of committed events.
struct Latencies {
    sorted: Vec<f64>,
    delivered: usize,
    duplicates: usize,
    last_receipt_us: i64,
}

impl Latencies {
    fn json(&self) -> Value {
        let s = &self.sorted;
        json!({
            "count": s.len(),
            "duplicates": self.duplicates,
            "min": s.first(),
            "p50": pct(s, 50.0),
            "p90": pct(s, 90.0),
            "p99": pct(s, 99.0),
            "p99_9": pct(s, 99.9),
            "max": s.last(),
        })
    }
}

fn latencies(commits: &[(i64, i64)], recs: &[Rec]) -> Latencies {
    let (first, duplicates) = first_receipts(recs);
    let mut sorted = Vec::with_capacity(commits.len());
    let mut last = 0;
    for &(id, commit_us) in commits {
        if let Some(&t) = first.get(&(id, 0)) {
            sorted.push((t - commit_us) as f64);
            last = last.max(t);
        }
    }
    sorted.sort_by(f64::total_cmp);
    Latencies {
        delivered: sorted.len(),
        sorted,
        duplicates,
        last_receipt_us: last,
    }
}

/// Latency split at the attempt's start: commit → send start (wake-up, claim, spawn)
/// and send start → receipt (HTTP), percentiles in µs.
fn split_latency(commits: &[(i64, i64)], recs: &[Rec], starts: &HashMap<i64, i64>) -> Value {
    let (first, _) = first_receipts(recs);
    let mut to_send = Vec::new();
    let mut to_receipt = Vec::new();
    for &(id, commit_us) in commits {
        if let (Some(&start), Some(&receipt)) = (starts.get(&id), first.get(&(id, 0))) {
            to_send.push((start - commit_us) as f64);
            to_receipt.push((receipt - start) as f64);
        }
    }
    to_send.sort_by(f64::total_cmp);
    to_receipt.sort_by(f64::total_cmp);
    let summary = |v: &[f64]| json!({"p50": pct(v, 50.0), "p90": pct(v, 90.0), "p99": pct(v, 99.0), "max": v.last()});
    json!({
        "events": to_send.len(),
        "commit_to_send_start": summary(&to_send),
        "send_start_to_receipt": summary(&to_receipt),
    })
}

/// Where deliveries stopped flowing: gaps between consecutive receipts longer than
/// `threshold_us`, and events whose latency exceeded 100 ms.
fn stalls(recs: &[Rec], lat: &Latencies, threshold_us: i64) -> Value {
    let mut times: Vec<i64> = recs.iter().map(|r| r.t_us).collect();
    times.sort_unstable();
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|g| *g > threshold_us)
        .collect();
    json!({
        "gaps_over_threshold": gaps.len(),
        "threshold_us": threshold_us,
        "max_receipt_gap_us": times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as f64,
        "events_over_100ms": lat.sorted.iter().filter(|l| **l > 100_000.0).count(),
    })
}

impl Ctx {
    /// What sending the claim unnamed (`WEBHOOK_PREPARED_STATEMENTS=off`, for
    /// transaction-mode poolers) costs against the prepared claim, per call: on an empty
    /// queue (the wake-up path) and taking full batches from a backlog (a burst). Two
    /// dispatcher sessions, one per form, take turns call by call, so both see the
    /// same queue and the same machine.
    async fn statements(&mut self) -> anyhow::Result<()> {
        let name = self.db_name("statements");
        let (url, client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
        let result = self.statements_in(&url, &client).await;
        drop(client);
        pg::drop_db(&self.admin, &name).await?;
        let json = result?;
        self.report.detail("statements", json);
        Ok(())
    }

    async fn statements_in(&mut self, url: &str, client: &Client) -> anyhow::Result<Value> {
        use outboxd::claim;
        pg::add_endpoints(client, [self.receiver.url(0)]).await?;
        let config = disp::config(false, self.poll_interval());
        let sessions = outboxd::db::Connector::new(url, outboxd::db::Session::dispatcher(&config))?;
        let prepared_conn = sessions.connect().await?;
        let unnamed_conn = sessions.connect().await?;
        let statement = prepared_conn
            .prepare_typed(claim::CLAIM, claim::CLAIM_TYPES)
            .await?;
        let lease = Duration::from_secs(600);
        let batch = config.batch_size;
        let budget = claim::PayloadBudget::from_config(&config);
        let (mut prepared, mut unnamed) = (Vec::new(), Vec::new());

        // Idle: the claim a wake-up makes, on an empty queue.
        let idle_calls = if self.s.quick { 300 } else { 3_000 };
        for i in 0..idle_calls {
            for first in [i % 2 == 0, i % 2 != 0] {
                let t = Instant::now();
                if first {
                    claim::claim_prepared(
                        &prepared_conn,
                        &statement,
                        "bench-p",
                        lease,
                        batch,
                        &budget,
                    )
                    .await?;
                    prepared.push(t.elapsed().as_secs_f64() * 1e6);
                } else {
                    claim::claim_unnamed(&unnamed_conn, "bench-u", lease, batch, &budget).await?;
                    unnamed.push(t.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
        let idle = (std::mem::take(&mut prepared), std::mem::take(&mut unnamed));

        // A burst: full batches from a backlog, the two forms in turn.
        let events = self.s.burst_events;
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
            let got = if turn % 2 == 0 {
                claim::claim_prepared(&prepared_conn, &statement, "bench-p", lease, batch, &budget)
                    .await?
            } else {
                claim::claim_unnamed(&unnamed_conn, "bench-u", lease, batch, &budget).await?
            };
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
                self.report
                    .info(&scenario, &format!("p50 {form}"), ms(median(v)));
                self.report
                    .info(&scenario, &format!("p99 {form}"), ms(pct(v, 99.0)));
            }
            self.report.info(
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
}

/// Seconds with three significant figures.
fn fmt_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{secs:.3}")
    } else if secs < 10.0 {
        format!("{secs:.2}")
    } else {
        format!("{secs:.1}")
    }
}
