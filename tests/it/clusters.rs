//! Extra PostgreSQL clusters for the tests that need their own server: one started
//! late, a hot standby made with `pg_basebackup -R`, a primary stopped for a failover.
//!
//! Each [`Cluster`] is a data directory of its own under the system temp dir, on a free
//! port on 127.0.0.1, run with the binaries `scripts/pg.sh bindir` finds (as root, as
//! the `postgres` OS user, since PostgreSQL refuses to run as root). It is stopped and
//! removed when dropped. `fsync` is off, as in the main test cluster, but commits
//! stay synchronous, so that a cluster stopped at once (`-m immediate`) keeps every
//! commit that was acknowledged.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use crate::harness::unique;

fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg.sh");
        let out = Command::new(script)
            .arg("bindir")
            .output()
            .expect("run scripts/pg.sh bindir");
        assert!(out.status.success(), "scripts/pg.sh bindir failed: {out:?}");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Runs a PostgreSQL program as the cluster's owner, in `dir`.
fn as_owner(dir: &Path, program: &str, args: &[&str]) -> Output {
    let binary = bindir().join(program);
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&binary);
        c
    } else {
        Command::new(&binary)
    };
    command
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"))
}

fn must(output: Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A PostgreSQL cluster of a test's own.
pub struct Cluster {
    dir: PathBuf,
    /// Its port on 127.0.0.1 (chosen when it was made; free then).
    pub port: u16,
}

impl Cluster {
    /// A new cluster, initialised (trust authentication, as the main test cluster) but
    /// not started.
    pub fn init(label: &str) -> Self {
        let cluster = Self::empty(label);
        let data = cluster.data();
        must(
            as_owner(
                &cluster.dir,
                "initdb",
                &[
                    "-D",
                    data.to_str().expect("utf-8 path"),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
            ),
            "initdb",
        );
        cluster
    }

    /// A hot standby of `primary` (which must be running), made with
    /// `pg_basebackup -R` and not started.
    pub fn standby_of(primary: &Cluster, label: &str) -> Self {
        let standby = Self::empty(label);
        let data = standby.data();
        let port = primary.port.to_string();
        must(
            as_owner(
                &standby.dir,
                "pg_basebackup",
                &[
                    "-D",
                    data.to_str().expect("utf-8 path"),
                    "-R",
                    "-X",
                    "stream",
                    // An immediate checkpoint: a spread one takes minutes.
                    "--checkpoint=fast",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "--no-sync",
                ],
            ),
            "pg_basebackup",
        );
        standby
    }

    fn empty(label: &str) -> Self {
        let dir = std::env::temp_dir().join(unique(&format!("outboxd-cluster-{label}")));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        if is_root() {
            must(
                Command::new("chown")
                    .args(["postgres:", dir.to_str().expect("utf-8 path")])
                    .output()
                    .expect("chown"),
                "chown",
            );
        }
        Self {
            dir,
            port: free_port(),
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server and waits until it accepts connections (a standby: until it
    /// accepts read-only ones).
    pub fn start(&self) {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} \
             -c fsync=off -c full_page_writes=off -c max_connections=100",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log");
        must(
            as_owner(
                &self.dir,
                "pg_ctl",
                &[
                    "-D",
                    self.data().to_str().expect("utf-8 path"),
                    "-w",
                    "-t",
                    "120",
                    "-l",
                    log.to_str().expect("utf-8 path"),
                    "start",
                    "-o",
                    &options,
                ],
            ),
            "pg_ctl start",
        );
    }

    /// Stops the server at once, as a crash would (`-m immediate`).
    pub fn kill(&self) {
        must(
            self.pg_ctl(&["-m", "immediate", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    /// Promotes a standby to primary and waits until it is one.
    pub fn promote(&self) {
        must(
            as_owner(
                &self.dir,
                "pg_ctl",
                &[
                    "-D",
                    self.data().to_str().expect("utf-8 path"),
                    "-w",
                    "promote",
                ],
            ),
            "pg_ctl promote",
        );
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let mut all = vec!["-D", data.to_str().expect("utf-8 path")];
        all.extend_from_slice(args);
        as_owner(&self.dir, "pg_ctl", &all)
    }

    /// A URL for `database` as the superuser `postgres`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
