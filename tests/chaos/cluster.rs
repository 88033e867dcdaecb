//! The suite's own PostgreSQL cluster: created in a fresh directory, run with durability
//! on (fsync and synchronous_commit as PostgreSQL ships them), stopped and started again
//! on the same port as faults, removed at the end.
//!
//! PostgreSQL refuses to run as root, so as root every server command runs as the
//! `postgres` OS user through `runuser` (`scripts/chaos.sh` creates that user when it is
//! missing, as `scripts/pg.sh` does for the tests).

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// How the server is stopped for a restart fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// SIGINT: backends are terminated, a shutdown checkpoint is written. Nothing
    /// committed is lost, including the dispatcher's `synchronous_commit = off` commits.
    Fast,
    /// SIGQUIT: a crash. On start the server replays its WAL; the dispatcher's
    /// asynchronous commits of the last ~3 × `wal_writer_delay` may be lost.
    Immediate,
}

impl StopMode {
    pub fn label(self) -> &'static str {
        match self {
            Self::Fast => "fast",
            Self::Immediate => "immediate",
        }
    }
}

/// `wal_writer_delay` of the cluster. An asynchronous commit reaches the disk within
/// three of these (PostgreSQL's documentation of `synchronous_commit = off`), which
/// bounds what an immediate stop can take back.
pub const WAL_WRITER_DELAY: Duration = Duration::from_millis(200);

/// The data directory of this run's cluster, for the watchdog in `main.rs`.
static RUN_DATA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// The postmaster of this run's cluster, if it runs.
pub fn postmaster_of_run() -> Option<u32> {
    read_pid(RUN_DATA.get()?)
}

fn read_pid(data: &Path) -> Option<u32> {
    std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()?
        .lines()
        .next()?
        .trim()
        .parse()
        .ok()
}

pub struct Cluster {
    bindir: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    port: u16,
    as_postgres: bool,
    keep: bool,
}

/// Whether this process runs as root (the owner of `/proc/self`).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The PostgreSQL server's bin directory: `PG_BINDIR`, else the newest
/// `/usr/lib/postgresql/*/bin` (`scripts/chaos.sh` installs PostgreSQL when missing).
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    let usable = |d: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| d.join(b).is_file())
    };
    if let Some(dir) = std::env::var_os("PG_BINDIR").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if usable(&dir) {
            return Ok(dir);
        }
        bail!(
            "PG_BINDIR={} does not hold initdb, pg_ctl and postgres",
            dir.display()
        );
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse().ok()?;
            let bin = e.path().join("bin");
            usable(&bin).then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, bin)| bin).context(
        "no PostgreSQL server found under /usr/lib/postgresql: run `make chaos` \
         (it installs PostgreSQL when missing) or set PG_BINDIR",
    )
}

impl Cluster {
    /// initdb in a fresh directory under the system temp dir, and the first start on a
    /// free port.
    pub async fn create(bindir: PathBuf, keep: bool) -> anyhow::Result<Self> {
        let as_postgres = is_root();
        if as_postgres && !command_ok("id", &["-u", "postgres"]).await {
            bail!(
                "running as root, and there is no `postgres` OS user to run PostgreSQL as: \
                 run `make chaos` (scripts/chaos.sh creates it)"
            );
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "outboxd-chaos.{}.{}",
            std::process::id(),
            stamp % 1_000_000_000
        ));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut cluster = Self {
            bindir,
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            dir,
            port: 0,
            as_postgres,
            keep,
        };
        let _ = RUN_DATA.set(cluster.data.clone());
        if as_postgres {
            let dir = cluster.dir.to_string_lossy().into_owned();
            if !command_ok("chown", &["postgres:", &dir]).await {
                bail!("chown postgres: {dir} failed");
            }
        }
        let data = cluster.data.to_string_lossy().into_owned();
        let out = cluster
            .server_command(
                "initdb",
                &[
                    "-D",
                    &data,
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
            )
            .output()
            .await
            .context("running initdb")?;
        if !out.status.success() {
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start().await {
                Ok(()) => return Ok(cluster),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("PostgreSQL did not start")))
    }

    /// A server program from the bin directory, run as the cluster's owner with the
    /// cluster directory as working directory (the owner may not enter the caller's).
    fn server_command(&self, program: &str, args: &[&str]) -> tokio::process::Command {
        let path = self.bindir.join(program);
        let mut command = if self.as_postgres {
            let mut c = tokio::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            tokio::process::Command::new(path)
        };
        command
            .args(args)
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        command
    }

    /// Starts the server on its port and waits until it accepts connections.
    pub async fn start(&self) -> anyhow::Result<()> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} \
             -c max_connections=200 -c wal_writer_delay={}ms",
            self.port,
            self.dir.display(),
            WAL_WRITER_DELAY.as_millis()
        );
        let data = self.data.to_string_lossy().into_owned();
        let log = self.log.to_string_lossy().into_owned();
        let out = self
            .server_command(
                "pg_ctl",
                &[
                    "-D", &data, "-l", &log, "-w", "-t", "120", "start", "-o", &options,
                ],
            )
            .output()
            .await
            .context("running pg_ctl start")?;
        if !out.status.success() {
            bail!(
                "pg_ctl start failed: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// Stops the server the way `mode` says, by signalling the postmaster as `pg_ctl
    /// stop` does (directly, so the stop follows the caller's last look at the database
    /// within a millisecond), and waits until it has exited.
    pub async fn stop(&self, mode: StopMode) -> anyhow::Result<()> {
        let pid = self.postmaster_pid().context("no postmaster.pid")?;
        let signal = match mode {
            StopMode::Fast => "-INT",
            StopMode::Immediate => "-QUIT",
        };
        if !command_ok("kill", &[signal, &pid.to_string()]).await {
            bail!("kill {signal} {pid} failed");
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while alive(pid) {
            if Instant::now() > deadline {
                bail!("PostgreSQL (pid {pid}) did not stop within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    fn postmaster_pid(&self) -> Option<u32> {
        read_pid(&self.data)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `dbname` as the superuser.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// The server log.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Cluster {
    /// Stops the server (whatever state it is in) and removes its directory, unless
    /// `CHAOS_KEEP=1` asked to keep it.
    fn drop(&mut self) {
        if let Some(pid) = self.postmaster_pid().filter(|pid| alive(*pid)) {
            let _ = std::process::Command::new("kill")
                .args(["-QUIT", &pid.to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if self.keep {
            eprintln!("chaos: CHAOS_KEEP=1: leaving {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

async fn command_ok(program: &str, args: &[&str]) -> bool {
    tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
