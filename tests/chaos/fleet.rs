//! The dispatchers: real `outboxd run` processes, one per slot, each incarnation with a
//! worker id of its own (`chaos-d<slot>-g<generation>`) so that the rows it held can be
//! told apart after it dies, and a log file of its own in the run's directory.
//!
//! A supervisor restarts a dispatcher that exits on its own (as systemd or Kubernetes
//! would) and records the exit: one that exits before it logged "dispatcher started"
//! could not start (say, PostgreSQL was down); one that exits after it did is a failure
//! of the suite's checks.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::Clock;

/// Settings every dispatcher runs with.
pub const LEASE: Duration = Duration::from_millis(6_000);
pub const HTTP_TIMEOUT: Duration = Duration::from_millis(2_000);
pub const DRAIN_TIMEOUT: Duration = Duration::from_millis(3_000);
/// Enough that no delivery can die of the receiver's faults within a run: retries are
/// at most [`BACKOFF_MAX_MS`] apart, and a run lasts minutes.
const MAX_ATTEMPTS: u32 = 1_000;
const BACKOFF_BASE_MS: u64 = 200;
const BACKOFF_MAX_MS: u64 = 2_000;
const CONCURRENCY: u32 = 32;
const BATCH_SIZE: u32 = 50;

/// The log line a dispatcher writes once it runs.
const STARTED: &str = "dispatcher started";

pub struct Slot {
    pub index: usize,
    pub poll_ms: u64,
    pub generation: u32,
    pub child: Option<tokio::process::Child>,
    pub worker_id: String,
    pub log: PathBuf,
    /// When the supervisor should start this slot again (after an exit of its own).
    respawn_at: Option<Instant>,
}

impl Slot {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Whether this incarnation has logged that it runs.
    pub fn started(&self) -> bool {
        std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(STARTED))
    }
}

/// A dispatcher that exited without being told to.
#[derive(Debug, Clone)]
pub struct Exit {
    pub worker_id: String,
    pub at_ms: u64,
    pub status: String,
    /// Whether it had logged "dispatcher started" (so it died while running).
    pub was_running: bool,
    pub log: PathBuf,
}

pub struct Fleet {
    bin: PathBuf,
    url: String,
    out: PathBuf,
    pg_port: u16,
    clock: Clock,
    pub slots: Vec<tokio::sync::Mutex<Slot>>,
    pub exits: Mutex<Vec<Exit>>,
}

impl Fleet {
    /// One slot per poll interval; nothing runs yet.
    pub fn new(
        bin: PathBuf,
        url: String,
        out: PathBuf,
        pg_port: u16,
        clock: Clock,
        polls: &[u64],
    ) -> Self {
        let slots = polls
            .iter()
            .enumerate()
            .map(|(index, &poll_ms)| {
                tokio::sync::Mutex::new(Slot {
                    index,
                    poll_ms,
                    generation: 0,
                    child: None,
                    worker_id: String::new(),
                    log: PathBuf::new(),
                    respawn_at: None,
                })
            })
            .collect();
        Self {
            bin,
            url,
            out,
            pg_port,
            clock,
            slots,
            exits: Mutex::new(Vec::new()),
        }
    }

    /// Starts a new incarnation in `slot`.
    pub fn spawn(&self, slot: &mut Slot) -> anyhow::Result<()> {
        slot.generation += 1;
        slot.worker_id = format!("chaos-d{}-g{}", slot.index, slot.generation);
        slot.log = self.out.join(format!("{}.log", slot.worker_id));
        slot.respawn_at = None;
        let log = std::fs::File::create(&slot.log)
            .with_context(|| format!("creating {}", slot.log.display()))?;
        let child = tokio::process::Command::new(&self.bin)
            .arg("run")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("DATABASE_URL", &self.url)
            .env("WEBHOOK_WORKER_ID", &slot.worker_id)
            .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
            .env("WEBHOOK_LISTEN", "true")
            .env("WEBHOOK_POLL_INTERVAL_MS", slot.poll_ms.to_string())
            .env("WEBHOOK_LEASE_MS", LEASE.as_millis().to_string())
            .env(
                "WEBHOOK_HTTP_TIMEOUT_MS",
                HTTP_TIMEOUT.as_millis().to_string(),
            )
            .env(
                "WEBHOOK_DRAIN_TIMEOUT_MS",
                DRAIN_TIMEOUT.as_millis().to_string(),
            )
            .env("WEBHOOK_MAX_ATTEMPTS", MAX_ATTEMPTS.to_string())
            .env("WEBHOOK_BACKOFF_BASE_MS", BACKOFF_BASE_MS.to_string())
            .env("WEBHOOK_BACKOFF_MAX_MS", BACKOFF_MAX_MS.to_string())
            .env("WEBHOOK_CONCURRENCY", CONCURRENCY.to_string())
            .env("WEBHOOK_BATCH_SIZE", BATCH_SIZE.to_string())
            .env("WEBHOOK_WORKER_THREADS", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        if let Some(pid) = child.id() {
            crate::register_child(pid);
        }
        slot.child = Some(child);
        Ok(())
    }

    /// Starts every slot and waits until each has logged that it runs.
    pub async fn start_all(&self, bound: Duration) -> anyhow::Result<()> {
        for slot in &self.slots {
            self.spawn(&mut *slot.lock().await)?;
        }
        let deadline = Instant::now() + bound;
        for slot in &self.slots {
            loop {
                let slot = slot.lock().await;
                if slot.started() {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "{} did not start within {bound:?}; its log:\n{}",
                        slot.worker_id,
                        crate::cluster::tail(&slot.log, 20)
                    );
                }
                drop(slot);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// SIGKILLs the slot's process and waits for it.
    pub async fn kill9(&self, slot: &mut Slot) {
        if let Some(mut child) = slot.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// SIGTERMs the slot's process and waits up to `bound` for it to exit; returns its
    /// exit code (`None`: killed by a signal) and how long it took, or `Err` with the
    /// time waited if it did not exit (it is then SIGKILLed).
    pub async fn sigterm(
        &self,
        slot: &mut Slot,
        bound: Duration,
    ) -> Result<(Option<i32>, Duration), Duration> {
        let Some(mut child) = slot.child.take() else {
            return Ok((None, Duration::ZERO));
        };
        let started = Instant::now();
        if let Some(pid) = child.id() {
            signal(pid, "TERM");
        }
        match tokio::time::timeout(bound, child.wait()).await {
            Ok(status) => Ok((status.ok().and_then(|s| s.code()), started.elapsed())),
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                Err(started.elapsed())
            }
        }
    }

    /// The client ports of the slot's process's TCP connections to PostgreSQL, found
    /// through `/proc` (its socket inodes matched against `/proc/net/tcp*`): they
    /// identify its backends in `pg_stat_activity.client_port`.
    pub fn backend_ports(&self, slot: &Slot) -> Vec<i32> {
        let Some(pid) = slot.pid() else {
            return Vec::new();
        };
        let inodes: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| {
                let target = std::fs::read_link(fd.path()).ok()?;
                let target = target.to_string_lossy();
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect();
        let mut ports = Vec::new();
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            let text = std::fs::read_to_string(table).unwrap_or_default();
            for line in text.lines().skip(1) {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let (Some(local), Some(remote), Some(inode)) =
                    (fields.get(1), fields.get(2), fields.get(9))
                else {
                    continue;
                };
                let port = |addr: &str| {
                    addr.rsplit_once(':')
                        .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                };
                if port(remote) != Some(self.pg_port)
                    || !inode.parse().is_ok_and(|i: u64| inodes.contains(&i))
                {
                    continue;
                }
                ports.extend(port(local).map(i32::from));
            }
        }
        ports
    }

    /// Restarts dispatchers that exited on their own, once a second at most each, and
    /// records each such exit; runs until `stop`.
    pub async fn supervise(&self, stop: tokio_util::sync::CancellationToken) {
        while !stop.is_cancelled() {
            for slot in &self.slots {
                let Ok(mut slot) = slot.try_lock() else {
                    continue;
                };
                let exited = slot
                    .child
                    .as_mut()
                    .and_then(|child| child.try_wait().ok().flatten());
                if let Some(status) = exited {
                    let exit = Exit {
                        worker_id: slot.worker_id.clone(),
                        at_ms: self.clock.ms(),
                        status: status.to_string(),
                        was_running: slot.started(),
                        log: slot.log.clone(),
                    };
                    crate::note(
                        &self.clock,
                        &format!(
                            "{} exited on its own ({}), {}; restarting it in 1 s",
                            exit.worker_id,
                            exit.status,
                            if exit.was_running {
                                "after it had started"
                            } else {
                                "before it had started"
                            }
                        ),
                    );
                    self.exits.lock().expect("exits").push(exit);
                    slot.child = None;
                    slot.respawn_at = Some(Instant::now() + Duration::from_secs(1));
                }
                if slot.child.is_none() && slot.respawn_at.is_some_and(|at| Instant::now() >= at) {
                    if let Err(e) = self.spawn(&mut slot) {
                        crate::note(
                            &self.clock,
                            &format!("restarting a dispatcher failed: {e:#}"),
                        );
                        slot.respawn_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }
}

/// Sends `SIG<name>` to `pid` with the `kill` utility.
pub fn signal(pid: u32, name: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status();
}
