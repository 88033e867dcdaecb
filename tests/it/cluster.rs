//! Extra PostgreSQL clusters of a test's own, for what the shared test server cannot
//! be: TLS-only, a pooler's backend, a standby. Each runs from the binaries
//! `scripts/pg.sh` finds (installing PostgreSQL if missing), on a free port of
//! 127.0.0.1 and a socket directory of its own; as root it runs as the `postgres` OS
//! user, since PostgreSQL refuses to run as root.
//!
//! A cluster stops and its directory goes when its [`Cluster`] is dropped, and in any
//! case when the test process exits: a watchdog process waits for it, so a cluster
//! kept in a `static` (shared by several tests) or left behind by a panic is not
//! leaked.
//!
//! For failover and start-up tests a cluster can also be stopped at once as in a crash
//! and started again ([`Cluster::kill`], [`Cluster::restart`]), copied into a hot
//! standby with `pg_basebackup -R` ([`Cluster::standby_of`]) and promoted.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What makes a cluster special.
#[derive(Debug, Clone, Default)]
pub struct ClusterSpec {
    /// Lines appended to `postgresql.conf`, such as `ssl = on`. Commits are
    /// asynchronous unless a line says `synchronous_commit = on`, which a cluster that
    /// is killed and must keep what it acknowledged needs.
    pub conf: Vec<String>,
    /// The whole `pg_hba.conf`; `local all all trust` comes first in any case, so the
    /// harness can always reach the cluster over its socket.
    pub hba: Vec<String>,
    /// Files written into the data directory before start (name, contents), owned by
    /// the server's user with mode 0600.
    pub files: Vec<(String, Vec<u8>)>,
    /// The `postgres` superuser's password, for password authentication.
    pub superuser_password: Option<String>,
}

impl ClusterSpec {
    /// Plain TCP on 127.0.0.1 with trust authentication, replication included (for a
    /// standby), and synchronous commits, so a killed cluster keeps what it
    /// acknowledged.
    pub fn plain() -> Self {
        Self {
            conf: vec!["synchronous_commit = on".to_owned()],
            hba: vec![
                "host all all 127.0.0.1/32 trust".to_owned(),
                "host replication all 127.0.0.1/32 trust".to_owned(),
            ],
            ..Self::default()
        }
    }
}

/// A running cluster.
pub struct Cluster {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The directory of its Unix socket.
    pub socket_dir: PathBuf,
    dir: PathBuf,
    data: PathBuf,
    bindir: PathBuf,
    stopped: bool,
}

/// A fresh directory for a cluster, owned by the server's user.
fn cluster_dir(root: bool) -> PathBuf {
    let dir = PathBuf::from(
        String::from_utf8(
            Command::new("mktemp")
                .args(["-d", "/tmp/outboxd-it-cluster.XXXXXX"])
                .output()
                .expect("mktemp")
                .stdout,
        )
        .expect("a path")
        .trim(),
    );
    if root {
        run("chown", Command::new("chown").arg("postgres:").arg(&dir));
    }
    dir
}

/// A PostgreSQL program run as the server's user, in `dir`.
fn as_owner(root: bool, dir: &Path, program: PathBuf) -> Command {
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    c.current_dir(dir);
    c
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The server's bin directory, as `scripts/pg.sh` finds it.
fn bindir() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/pg.sh");
    let out = Command::new("bash")
        .arg(script)
        .arg("bindir")
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/pg.sh bindir");
    assert!(out.status.success(), "scripts/pg.sh bindir failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn run(what: &str, command: &mut Command) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// Initialises and starts a cluster (blocking: a second or two).
    pub fn start(spec: &ClusterSpec) -> Self {
        let root = is_root();
        let bindir = bindir();
        let dir = cluster_dir(root);
        let data = dir.join("data");
        let mut initdb = as_owner(root, &dir, bindir.join("initdb"));
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        if let Some(password) = &spec.superuser_password {
            let pwfile = dir.join("pwfile");
            std::fs::write(&pwfile, password).expect("write pwfile");
            if root {
                run("chown", Command::new("chown").arg("postgres:").arg(&pwfile));
            }
            initdb.arg(format!("--pwfile={}", pwfile.display()));
        }
        run("initdb", &mut initdb);

        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        conf.push_str(&format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             max_connections = 100\n",
            dir.display()
        ));
        for line in &spec.conf {
            conf.push_str(line);
            conf.push('\n');
        }
        std::fs::write(data.join("postgresql.conf"), conf).expect("write conf");
        let mut hba = String::from("local all all trust\n");
        for line in &spec.hba {
            hba.push_str(line);
            hba.push('\n');
        }
        std::fs::write(data.join("pg_hba.conf"), hba).expect("write hba");
        for (name, contents) in &spec.files {
            let path = data.join(name);
            std::fs::write(&path, contents).expect("write a cluster file");
            run("chmod", Command::new("chmod").arg("600").arg(&path));
            if root {
                run("chown", Command::new("chown").arg("postgres:").arg(&path));
            }
        }

        let mut cluster = Self {
            port: 0,
            socket_dir: dir.clone(),
            dir,
            data,
            bindir,
            stopped: false,
        };
        cluster.launch();
        cluster
    }

    /// A hot standby of `primary`, copied with `pg_basebackup -R` (streaming
    /// replication from the primary's TCP port) and started on a port of its own.
    pub fn standby_of(primary: &Cluster) -> Self {
        let root = is_root();
        let dir = cluster_dir(root);
        let data = dir.join("data");
        run(
            "pg_basebackup",
            as_owner(root, &dir, primary.bindir.join("pg_basebackup"))
                .arg("-D")
                .arg(&data)
                .args(["-R", "-X", "stream", "--no-sync", "-h", "127.0.0.1"])
                // An immediate checkpoint: a spread one takes minutes.
                .arg("--checkpoint=fast")
                .args(["-p", &primary.port.to_string(), "-U", "postgres"]),
        );
        // Its own socket directory (the copied configuration names the primary's).
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).expect("conf");
        conf.push_str(&format!(
            "\nunix_socket_directories = '{}'\n",
            dir.display()
        ));
        std::fs::write(data.join("postgresql.conf"), conf).expect("write conf");
        let mut standby = Self {
            port: 0,
            socket_dir: dir.clone(),
            dir,
            data,
            bindir: primary.bindir.clone(),
            stopped: false,
        };
        standby.launch();
        standby
    }

    /// Starts the server on a free port, with a watchdog that stops it and removes it
    /// once this process is gone.
    fn launch(&mut self) {
        let root = is_root();
        let (dir, data, bindir) = (&self.dir, &self.data, &self.bindir);
        let mut port = 0;
        for attempt in 1..=5 {
            port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let out = as_owner(root, dir, bindir.join("pg_ctl"))
                .arg("-D")
                .arg(data)
                .args(["-w", "-t", "60", "-l"])
                .arg(dir.join("postgres.log"))
                .args(["start", "-o", &format!("-p {port}")])
                .stdin(Stdio::null())
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                break;
            }
            let log = std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default();
            assert!(
                attempt < 5 && log.contains("could not bind"),
                "pg_ctl start failed:\n{}\n{log}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // The watchdog: stops the cluster and removes it once this process is gone.
        let stop = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {owner}'{pg_ctl}' -D '{data}' \
             -m immediate -w stop >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            owner = if root { "runuser -u postgres -- " } else { "" },
            pg_ctl = bindir.join("pg_ctl").display(),
            data = data.display(),
            dir = dir.display(),
        );
        // Detached (the shell forks it and exits), so it is nobody's child to reap.
        let status = Command::new("sh")
            .args(["-c", &format!("({stop}) </dev/null >/dev/null 2>&1 &")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start the cluster's watchdog");
        assert!(status.success(), "the watchdog did not start");
        self.port = port;
    }

    /// Stops the server at once, as a crash would (`-m immediate`), keeping its data.
    pub fn kill(&self) {
        run(
            "pg_ctl stop",
            as_owner(is_root(), &self.dir, self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "stop"]),
        );
    }

    /// Starts a killed server again, on the same port.
    pub fn restart(&self) {
        run(
            "pg_ctl start",
            as_owner(is_root(), &self.dir, self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "60", "-l"])
                .arg(self.dir.join("postgres.log"))
                .args(["start", "-o", &format!("-p {}", self.port)]),
        );
    }

    /// Promotes a standby and waits until it is a primary.
    pub fn promote(&self) {
        run(
            "pg_ctl promote",
            as_owner(is_root(), &self.dir, self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "promote"]),
        );
    }

    /// A superuser URL over TCP (no TLS, trust), such as a dispatcher would be given;
    /// several of them make a multi-host URL.
    pub fn url(&self, dbname: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{dbname}", self.port)
    }

    /// A superuser key=value string over the cluster's Unix socket (no TLS, trust),
    /// for the harness's own setup work.
    pub fn socket_url(&self, dbname: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={dbname}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// A superuser connection over the socket.
    pub async fn admin(&self, dbname: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.socket_url(dbname), tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to the test cluster: {e}"));
        tokio::spawn(connection);
        client
    }

    /// The server's log so far, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let pg_ctl = self.bindir.join("pg_ctl");
        let mut c = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(pg_ctl);
            c
        } else {
            Command::new(pg_ctl)
        };
        let _ = c
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
