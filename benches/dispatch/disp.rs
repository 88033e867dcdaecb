//! Running dispatchers: in-process through the library (on a runtime of its own, so its
//! CPU time can be told apart from the harness's), or as `outboxd run` processes.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::sys::{DISPATCHER_THREADS, register_child};

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
