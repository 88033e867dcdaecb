//! Through pgbouncer in transaction pooling mode (the Debian package, 1.18, which keeps
//! no prepared statement across transactions): several polling dispatchers deliver
//! everything exactly once, and push works with the pool through pgbouncer and the
//! LISTEN session straight to PostgreSQL.
//!
//! Each test starts its own pgbouncer on a free port in front of the test cluster
//! ([`Bouncer`]); `scripts/pgbouncer.sh` installs the package when it is missing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use outboxd::config::PreparedStatements;

use crate::harness::{
    Receiver, RunningDispatcher, Spawned, TestDb, admin_url, outboxd_command, run_to_end, sigterm,
    test_config, unique,
};

/// A pgbouncer in transaction pooling mode in front of the test cluster, stopped and
/// removed when dropped. Dropped by a failing test, it prints its log and whether it
/// was still running (pgbouncer 1.18 exits on some bugs: its log says which).
pub struct Bouncer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

/// The pgbouncer binary, installed by `scripts/pgbouncer.sh` if needed (once per run);
/// `None`, with the reason printed, where it cannot be had.
fn pgbouncer_binary() -> Option<&'static str> {
    static BINARY: OnceLock<Option<String>> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pgbouncer.sh");
            match Command::new(script).arg("bin").output() {
                Ok(out) if out.status.success() => {
                    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
                }
                Ok(out) => {
                    eprintln!(
                        "SKIPPED: pgbouncer cannot be installed here: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    None
                }
                Err(e) => {
                    eprintln!("SKIPPED: cannot run {script}: {e}");
                    None
                }
            }
        })
        .as_deref()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// The `postgres` OS user's uid and gid.
fn postgres_ids() -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("run id");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("the postgres OS user exists (scripts/pg.sh creates it)")
    };
    (id("-u"), id("-g"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl Bouncer {
    /// Starts pgbouncer in transaction mode in front of `DATABASE_URL`'s server, letting
    /// in `users` (trust authentication, as the test cluster has). pgbouncer's default
    /// `ignore_startup_parameters` is kept (nothing ignored but what it handles itself),
    /// so a client sending startup `options` is refused, as by a stock pgbouncer.
    /// `None` (the test skips) only where pgbouncer cannot be installed.
    pub async fn start(users: &[&str]) -> Option<Self> {
        let binary = pgbouncer_binary()?;
        let server: tokio_postgres::Config = admin_url().parse().expect("DATABASE_URL parses");
        let host = match &server.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(host) => host.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        };
        let server_port = server.get_ports().first().copied().unwrap_or(5432);
        let dir = std::env::temp_dir().join(unique("outboxd-pgbouncer"));
        std::fs::create_dir_all(&dir).expect("pgbouncer dir");
        let users_file = dir.join("users.txt");
        let mut all_users = vec!["postgres"];
        all_users.extend_from_slice(users);
        std::fs::write(
            &users_file,
            all_users
                .iter()
                .map(|u| format!("\"{u}\" \"\"\n"))
                .collect::<String>(),
        )
        .expect("write the users file");
        for _ in 0..5 {
            let port = free_port();
            let config = dir.join("pgbouncer.ini");
            std::fs::write(
                &config,
                format!(
                    "[databases]\n\
                     * = host={host} port={server_port}\n\
                     [pgbouncer]\n\
                     listen_addr = 127.0.0.1\n\
                     listen_port = {port}\n\
                     unix_socket_dir =\n\
                     auth_type = trust\n\
                     auth_file = {users}\n\
                     pool_mode = transaction\n\
                     default_pool_size = 8\n\
                     max_client_conn = 400\n\
                     server_login_retry = 1\n",
                    users = users_file.display()
                ),
            )
            .expect("write pgbouncer.ini");
            let log = std::fs::File::create(dir.join("pgbouncer.log")).expect("log file");
            // pgbouncer refuses to run as root: run it as the cluster's OS user, as this
            // process's own child (not under runuser, which would outlive a kill of it).
            let mut command = Command::new(binary);
            if is_root() {
                use std::os::unix::process::CommandExt as _;
                let (uid, gid) = postgres_ids();
                command.uid(uid).gid(gid);
            }
            let mut child = command
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn pgbouncer");
            if wait_listening(&mut child, port).await {
                watchdog(child.id(), &config);
                return Some(Self { child, port, dir });
            }
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default();
            eprintln!("pgbouncer did not come up on port {port}; retrying. Log:\n{log}");
        }
        panic!("pgbouncer did not start");
    }

    /// `db`'s connection string with pgbouncer's address instead of the server's.
    pub fn url(&self, db: &TestDb) -> String {
        let mut url = url::Url::parse(&db.url).expect("the test URL is a URL");
        url.set_host(Some("127.0.0.1")).expect("host");
        url.set_port(Some(self.port)).expect("port");
        url.to_string()
    }
}

/// Ends pgbouncer `pid` (started with `config`) once this test process is gone, should
/// it end without dropping its [`Bouncer`] (killed, or aborted). Only if that pid still
/// runs that configuration: a pid is reused once its process is gone.
fn watchdog(pid: u32, config: &Path) {
    let watch = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 1; done; \
         grep -qF '{config}' /proc/{pid}/cmdline 2>/dev/null && kill {pid}",
        me = std::process::id(),
        config = config.display()
    );
    // Detached (the shell forks it and exits), so it is nobody's child to reap.
    let _ = Command::new("sh")
        .args(["-c", &format!("({watch}) </dev/null >/dev/null 2>&1 &")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits until `child` accepts connections on `port`; `false` if it exits or takes
/// longer than 10 s.
async fn wait_listening(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

impl Bouncer {
    /// What pgbouncer logged, and whether it is still running: printed when a test
    /// fails, since a refused connection says nothing of why pgbouncer refused it.
    fn report(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(None) => "still running".to_owned(),
            Ok(Some(status)) => format!("exited: {status}"),
            Err(e) => format!("state unknown: {e}"),
        };
        let log = std::fs::read_to_string(self.dir.join("pgbouncer.log"))
            .unwrap_or_else(|e| format!("(no log: {e})"));
        format!("pgbouncer on port {} ({state}); its log:\n{log}", self.port)
    }
}

impl Drop for Bouncer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Dispatcher sessions for `url`, as a dispatcher with the test configuration opens them.
fn connector(url: &str) -> outboxd::db::Connector {
    outboxd::db::Connector::new(url, outboxd::db::Session::dispatcher(&test_config("c")))
        .expect("a valid connection string")
}

/// Asserts that the receiver saw each of `events` events exactly once.
fn assert_each_once(receiver: &Receiver, events: usize) {
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in receiver.requests() {
        *seen.entry(r.webhook_id().to_owned()).or_default() += 1;
    }
    let duplicated = seen.values().filter(|n| **n > 1).count();
    assert_eq!(duplicated, 0, "deliveries received more than once");
    assert_eq!(seen.len(), events, "every event received");
}

/// `outboxd run` through `url`, polling every 50 ms.
fn polling_process(url: &str, label: &str, env: &[(&str, &str)]) -> Spawned {
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", url)
        .env("WEBHOOK_LISTEN", "false")
        .env("WEBHOOK_POLL_INTERVAL_MS", "50")
        .env("WEBHOOK_BATCH_SIZE", "50")
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true")
        .env("WEBHOOK_WORKER_ID", unique(label));
    for (name, value) in env {
        command.env(name, value);
    }
    Spawned::start(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_dispatchers_through_pgbouncer_deliver_everything_once() {
    let Some(bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    let db = TestDb::new("bouncerpoll").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    const EVENTS: usize = 1_500;
    let url = bouncer.url(&db);
    // Separate processes, as deployed: tokio-postgres names prepared statements s0, s1,
    // ... per process, so only separate processes clash on a shared server session.
    let processes: Vec<Spawned> = (0..3)
        .map(|i| polling_process(&url, &format!("bouncer{i}"), &[]))
        .collect();
    db.enqueue_series(1, EVENTS as i32).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let delivered: i64 = db
            .scalar("SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'")
            .await;
        if delivered == EVENTS as i64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{delivered} of {EVENTS} delivered within 90 s; the first dispatcher's log:\n{}",
            processes[0].stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for process in processes {
        sigterm(process.pid());
        let finished = process.finish(Duration::from_secs(60)).await;
        assert_eq!(finished.code, Some(0), "{}", finished.stderr);
        assert!(
            finished.stderr.contains("claim statement mode decided"),
            "the decision is logged: {}",
            finished.stderr
        );
        // With a named claim statement the processes still delivered everything here,
        // but only after claims failed on server sessions that lacked their statement
        // (26000) or had another process's of the same name (42P05).
        assert!(
            !finished.stderr.contains("claim failed"),
            "no claim fails: {}",
            finished.stderr
        );
    }
    assert_each_once(&receiver, EVENTS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_with_the_pool_through_pgbouncer_and_listen_direct() {
    let Some(bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    let db = TestDb::new("bouncerpush").await;
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let config = outboxd::Config {
        // Only a notification can deliver within the test's bound.
        poll_interval: Duration::from_secs(600),
        ..test_config("bouncerpush")
    };
    let dispatcher = RunningDispatcher::start_with(
        outboxd::Dispatcher::new(bouncer.url(&db), config)
            .expect("valid config")
            .with_listen_database_url(db.url.clone())
            .expect("a valid connection string"),
    );
    crate::harness::eventually("the LISTEN session is up", Duration::from_secs(20), || {
        let metrics = dispatcher.metrics.clone();
        async move { metrics.listener_connected() }
    })
    .await;
    // Let the dispatcher go to sleep with the doorbell armed, then ring it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in 1..=3 {
        db.enqueue("order.created", &serde_json::json!({ "n": n }))
            .await;
        receiver.wait_for_within(n, Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let rendered = dispatcher.metrics.render();
    let notifications: f64 = rendered
        .lines()
        .find_map(|l| l.strip_prefix("outboxd_notifications_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the notifications counter");
    assert!(notifications >= 1.0, "the doorbell was heard: {rendered}");
    dispatcher.stop().await;
    assert_each_once(&receiver, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_through_a_transaction_pooler_is_refused_with_the_variable_named() {
    let Some(bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    let db = TestDb::new("bouncerlisten").await;
    let dispatcher = outboxd::Dispatcher::new(bouncer.url(&db), test_config("bouncerlisten"))
        .expect("valid config");
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        dispatcher.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("refused at start")
    .expect_err("push through a transaction pooler cannot hear notifications");
    let message = err.to_string();
    assert!(
        matches!(err, outboxd::Error::Config(ref c) if c.variable == "WEBHOOK_LISTEN_DATABASE_URL"),
        "{message}"
    );
    assert!(message.contains("WEBHOOK_LISTEN=false"), "{message}");
}

#[tokio::test]
async fn auto_finds_a_pooler_only_where_there_is_one() {
    let Some(bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    let db = TestDb::new("bouncerauto").await;
    use outboxd::pooler::{Sessions, StatementMode, decide, look_at_sessions};
    let direct = look_at_sessions(&connector(&db.url))
        .await
        .expect("look directly");
    assert!(matches!(direct, Sessions::Separate(..)), "{direct:?}");
    let pooled = look_at_sessions(&connector(&bouncer.url(&db)))
        .await
        .expect("look through pgbouncer");
    assert!(matches!(pooled, Sessions::Shared(_)), "{pooled:?}");
    assert_eq!(
        decide(PreparedStatements::Auto, pooled).0,
        StatementMode::Unnamed
    );
    assert_eq!(
        decide(PreparedStatements::Auto, direct).0,
        StatementMode::Prepared
    );
}

/// A statement cancelled through pgbouncer ends, and pgbouncer goes on: outboxd cancels
/// the statements still running at shutdown. A cancel request whose connection closed
/// as soon as it was written (the driver's own) was lost when pgbouncer 1.18 read the
/// close first, and crashed it when the close came while it passed the request on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_cancelled_through_pgbouncer_ends_and_pgbouncer_stays_up() {
    let Some(mut bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    let db = TestDb::new("bouncercancel").await;
    let connector = connector(&bouncer.url(&db));
    for round in 0..5 {
        let client = connector
            .connect()
            .await
            .expect("connect through pgbouncer");
        let token = client.cancel_token();
        let sleeping =
            tokio::spawn(async move { client.simple_query("SELECT pg_sleep(60)").await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        connector.cancel(&token).await.expect("send the cancel");
        let ended = tokio::time::timeout(Duration::from_secs(20), sleeping)
            .await
            .unwrap_or_else(|_| panic!("round {round}: the statement went on after its cancel"))
            .expect("the statement's task");
        let e = ended.expect_err("the statement was cancelled");
        assert_eq!(
            e.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "round {round}: {e}"
        );
        assert!(
            bouncer
                .child
                .try_wait()
                .expect("pgbouncer's state")
                .is_none(),
            "round {round}: pgbouncer exited"
        );
    }
}

/// `outboxd run` through `bouncer` for `db`, polling, until it logged `needle` (or
/// exited); returns its output after a SIGTERM.
async fn run_through(bouncer: &Bouncer, db: &TestDb, needle: &str) -> crate::harness::Finished {
    let process = polling_process(&bouncer.url(db), "settings", &[]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !process.stderr().contains(needle) {
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(pid) = process.child.id() {
        sigterm(pid);
    }
    process.finish(Duration::from_secs(60)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_pgbouncer_the_session_settings_come_from_the_role_and_are_checked() {
    let Some(bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    // A stock pgbouncer refuses the startup options that carry the settings: outboxd
    // connects without them and says which settings did not arrive, and how to set them.
    let bare = TestDb::new("settingsbare").await;
    let finished = run_through(&bouncer, &bare, "dispatcher started").await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert!(
        finished
            .stderr
            .contains("the server refuses startup options"),
        "{}",
        finished.stderr
    );
    for setting in [
        "lock_timeout",
        "statement_timeout",
        "idle_in_transaction_session_timeout",
        "jit",
    ] {
        assert!(
            finished.stderr.contains(&format!("SET {setting} = '")),
            "the fix for {setting} is logged: {}",
            finished.stderr
        );
    }

    // A database whose sessions default to SERIALIZABLE is refused: claims need READ
    // COMMITTED, and the message says what to run.
    let serializable = TestDb::new("settingsser").await;
    serializable
        .client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'",
            serializable.name
        ))
        .await
        .expect("make the database serializable by default");
    let finished = run_through(&bouncer, &serializable, "serializable").await;
    assert_eq!(finished.code, Some(2), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("invalid DATABASE_URL")
            && finished
                .stderr
                .contains("SET default_transaction_isolation = 'read committed'"),
        "{}",
        finished.stderr
    );

    // Set for the role (here the database: the test runs as its superuser), every
    // setting arrives and nothing is reported missing.
    let set = TestDb::new("settingsset").await;
    set.client
        .batch_execute(&format!(
            "ALTER DATABASE {db} SET lock_timeout = 5000;
             ALTER DATABASE {db} SET statement_timeout = 30000;
             ALTER DATABASE {db} SET idle_in_transaction_session_timeout = 60000;
             ALTER DATABASE {db} SET synchronous_commit = off;
             ALTER DATABASE {db} SET jit = off;",
            db = set.name
        ))
        .await
        .expect("set the settings for the database");
    let finished = run_through(&bouncer, &set, "dispatcher started").await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("dispatcher started")
            && !finished.stderr.contains("did not arrive"),
        "{}",
        finished.stderr
    );
}

/// The operator's side through a transaction-mode pooler: CLI commands (each its own
/// process) and admin API and `/readyz` requests, many at once, sharing pgbouncer's
/// server sessions with each other and with a polling dispatcher. Every statement they
/// send is one unnamed round trip: none can lose its server session between Parse and
/// Bind, or meet another process's statement of the same name there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_admin_api_through_pgbouncer_never_fail() {
    let Some(bouncer) = Bouncer::start(&[]).await else {
        return;
    };
    let db = TestDb::new("bounceradmin").await;
    let receiver = Receiver::start().await;
    let (endpoint, _) = db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let event = db.enqueue("order.created", &serde_json::json!({})).await;
    let url = bouncer.url(&db);
    let (admin_port, status_port) = (free_port(), free_port());
    const TOKEN: &str = "0123456789abcdef-bouncer";
    let server = polling_process(
        &url,
        "bounceradmin",
        &[
            ("ADMIN_ADDR", &admin_port.to_string()),
            ("ADMIN_TOKEN", TOKEN),
            ("METRICS_ADDR", &status_port.to_string()),
        ],
    );
    db.wait_all_in_state(1, "delivered").await;

    let http = reqwest::Client::new();
    let admin = format!("http://127.0.0.1:{admin_port}");
    let api_paths = [
        "/v1/endpoints".to_owned(),
        format!("/v1/endpoints/{endpoint}"),
        "/v1/events".to_owned(),
        format!("/v1/events/{event}"),
        "/v1/deliveries".to_owned(),
        format!("/v1/deliveries/{event}:{endpoint}"),
        "/v1/deliveries?state=dead".to_owned(),
        "/v1/stats".to_owned(),
    ];
    let endpoint_arg = endpoint.to_string();
    let delivery_arg = format!("{event}:{endpoint}");
    let cli_commands: Vec<(Vec<&str>, i32)> = vec![
        (vec!["migrate"], 0),
        (vec!["endpoint", "list", "--json"], 0),
        (vec!["endpoint", "show", &endpoint_arg], 0),
        (vec!["deliveries", "list", "--json"], 0),
        (vec!["deliveries", "show", &delivery_arg], 0),
        (vec!["dead", "list"], 0),
        (vec!["dead", "retry", "--all"], 4),
        (vec!["stats"], 0),
        (
            vec!["enqueue", "--event-type", "order.paid", "--payload", "{}"],
            0,
        ),
        (
            vec!["endpoint", "add", "--url", "https://example.com/hook"],
            0,
        ),
    ];

    let mut failures = Vec::new();
    for _round in 0..3 {
        let mut cli = tokio::task::JoinSet::new();
        for (args, expected) in &cli_commands {
            let mut command = outboxd_command();
            command.args(args).env("DATABASE_URL", &url);
            let what = args.join(" ");
            let expected = *expected;
            cli.spawn(async move { (what, expected, run_to_end(command).await) });
        }
        let mut api = tokio::task::JoinSet::new();
        for path in &api_paths {
            for _ in 0..3 {
                let request = http.get(format!("{admin}{path}")).bearer_auth(TOKEN).send();
                let path = path.clone();
                api.spawn(async move { (path, request.await) });
            }
        }
        let readyz = format!("http://127.0.0.1:{status_port}/readyz");
        for _ in 0..5 {
            let request = http.get(&readyz).send();
            api.spawn(async move { ("/readyz".to_owned(), request.await) });
        }
        let created = http
            .post(format!("{admin}/v1/endpoints"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(r#"{"url": "https://example.com/api"}"#)
            .send();
        api.spawn(async move { ("POST /v1/endpoints".to_owned(), created.await) });

        while let Some(done) = cli.join_next().await {
            let (what, expected, finished) = done.expect("a CLI task");
            if finished.code != Some(expected) {
                failures.push(format!(
                    "outboxd {what}: exit {:?}, expected {expected}: {}",
                    finished.code, finished.stderr
                ));
            }
        }
        while let Some(done) = api.join_next().await {
            let (path, answer) = done.expect("an API task");
            match answer {
                Ok(response) if response.status().is_success() => {}
                Ok(response) => {
                    let status = response.status();
                    let body = response.text().await.unwrap_or_default();
                    failures.push(format!("{path}: {status} {body}"));
                }
                Err(e) => failures.push(format!("{path}: {e}")),
            }
        }
    }
    sigterm(server.pid());
    let finished = server.finish(Duration::from_secs(60)).await;
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    for logged in ["database error", "internal error", "claim failed"] {
        assert!(
            !finished.stderr.contains(logged),
            "the server logged {logged:?}: {}",
            finished.stderr
        );
    }
}
