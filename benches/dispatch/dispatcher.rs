//! Running dispatchers: in-process through the library (on a runtime of its own, so its
//! CPU time can be told apart from the harness's), or as `outboxd run` processes; the
//! modes a scenario runs them in (push or pure poll, in-process or processes), and
//! waiting until they are ready, so that no figure includes a dispatcher's start-up.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use serde_json::{Value, json};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::ctx::Ctx;
use crate::pg;
use crate::sys::{self, DISPATCHER_THREADS, register_child};

/// How long a dispatcher may take to drain and stop.
const STOP_BOUND: Duration = Duration::from_secs(40);

/// A dispatcher running in this process.
pub struct InProc {
    runtime: tokio::runtime::Runtime,
    token: CancellationToken,
    handle: tokio::task::JoinHandle<outboxd::Result<outboxd::Report>>,
}

/// The in-process dispatcher's configuration for a mode: the defaults, except that
/// `WEBHOOK_CONCURRENCY` and `WEBHOOK_BATCH_SIZE` are taken from the environment when
/// set, as the `outboxd run` processes (which inherit it) take them.
pub fn config(listen: bool, poll_interval: Duration) -> outboxd::Config {
    let defaults = outboxd::Config::default();
    let env = |name: &str, default: u32| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    outboxd::Config {
        worker_id: format!("bench-inproc-{}", std::process::id()),
        listen,
        poll_interval,
        allow_private_targets: true,
        concurrency: env("WEBHOOK_CONCURRENCY", defaults.concurrency),
        batch_size: env("WEBHOOK_BATCH_SIZE", defaults.batch_size),
        ..defaults
    }
}

impl InProc {
    /// Starts `Dispatcher::new(url, config).run(token)` on a two-worker runtime whose
    /// threads are named [`DISPATCHER_THREADS`] (what `outboxd run` uses on this
    /// two-core machine: the default multi-thread runtime).
    pub fn start(url: &str, config: outboxd::Config, workers: usize) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name(DISPATCHER_THREADS)
            .enable_all()
            .build()?;
        let dispatcher = outboxd::Dispatcher::new(url, config)?;
        let token = CancellationToken::new();
        let handle = runtime.spawn(dispatcher.run(token.clone()));
        Ok(Self {
            runtime,
            token,
            handle,
        })
    }

    /// Cancels and waits for the drain; returns the dispatcher's report.
    pub async fn stop(self) -> anyhow::Result<outboxd::Report> {
        self.token.cancel();
        let result = tokio::time::timeout(STOP_BOUND, self.handle).await;
        self.runtime.shutdown_background();
        let report = result
            .context("the in-process dispatcher did not stop in time")?
            .context("the in-process dispatcher panicked")??;
        Ok(report)
    }
}

/// An `outboxd run` child process.
pub struct Proc {
    child: tokio::process::Child,
    pid: u32,
}

impl Proc {
    /// Starts `outboxd run` against `url` with private targets allowed, with `threads`
    /// runtime threads (`None`: the binary's default), and with LISTEN off and this
    /// poll tick if `poll` is set.
    pub fn spawn(
        bin: &Path,
        url: &str,
        worker_id: &str,
        threads: Option<u16>,
        poll: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let mut command = tokio::process::Command::new(bin);
        match poll {
            Some(tick) => command
                .env("WEBHOOK_LISTEN", "false")
                .env("WEBHOOK_POLL_INTERVAL_MS", tick.as_millis().to_string()),
            None => command.env("WEBHOOK_LISTEN", "true"),
        };
        // TOKIO_WORKER_THREADS too, for a `BENCH_AB_BIN` from before
        // WEBHOOK_WORKER_THREADS existed (tokio reads it when no count is set).
        match threads {
            Some(threads) => command
                .env("WEBHOOK_WORKER_THREADS", threads.to_string())
                .env("TOKIO_WORKER_THREADS", threads.to_string()),
            None => command
                .env_remove("WEBHOOK_WORKER_THREADS")
                .env_remove("TOKIO_WORKER_THREADS"),
        };
        let child = command
            .arg("run")
            .env("DATABASE_URL", url)
            .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
            .env("WEBHOOK_WORKER_ID", worker_id)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id().context("outboxd exited at once")?;
        register_child(pid);
        Ok(Self { child, pid })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGTERM, then waits for the drain (SIGKILL after [`STOP_BOUND`]); returns
    /// whether it exited successfully.
    pub async fn stop(mut self) -> anyhow::Result<bool> {
        let _ = tokio::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        match tokio::time::timeout(STOP_BOUND, self.child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                let _ = self.child.start_kill();
                let _ = self.child.wait().await;
                Ok(false)
            }
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
    pub fn label(self) -> String {
        match self {
            Mode::Push => "push".into(),
            Mode::Poll => "poll".into(),
            Mode::Procs(n) => format!("{n} x outboxd run"),
            Mode::PollProcs(n) => format!("{n} x outboxd run, poll"),
        }
    }
}

/// Dispatchers started for a scenario.
pub enum Running {
    InProc(InProc),
    Procs(Vec<Proc>),
}

impl Running {
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Running::InProc(_) => Vec::new(),
            Running::Procs(p) => p.iter().map(Proc::pid).collect(),
        }
    }

    /// Peak RSS (VmHWM) of each `outboxd run` process, or of this process for an
    /// in-process dispatcher.
    pub fn vm_hwm_kib(&self) -> Vec<Option<u64>> {
        match self {
            Running::InProc(_) => vec![sys::status_kib(None, "VmHWM")],
            Running::Procs(p) => p
                .iter()
                .map(|p| sys::status_kib(Some(p.pid()), "VmHWM"))
                .collect(),
        }
    }

    pub async fn stop(self) -> anyhow::Result<Value> {
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

/// Starts the dispatchers of `mode` on the database at `url` and waits until they
/// are ready and asleep.
pub async fn start(ctx: &Ctx, url: &str, client: &Client, mode: Mode) -> anyhow::Result<Running> {
    let threads = ctx.s.dispatcher_threads as usize;
    let running = match mode {
        Mode::Push => Running::InProc(InProc::start(
            url,
            config(true, ctx.poll_interval()),
            threads,
        )?),
        Mode::Poll => Running::InProc(InProc::start(
            url,
            config(false, ctx.poll_interval()),
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

/// Waits until the dispatchers of `mode` listen (push) or hold their pools (poll),
/// and then until they have fallen asleep.
pub async fn wait_ready(client: &Client, mode: Mode) -> anyhow::Result<()> {
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
