//! Shared test machinery: a database per test, a scriptable capturing HTTP receiver,
//! in-process dispatchers, the real binary, and bounded polling.
//!
//! Everything is real: PostgreSQL from `DATABASE_URL` (set by `make test`) and an HTTP
//! server on 127.0.0.1. Each test creates its own database, so tests run in parallel and
//! NOTIFY/LISTEN never crosses between them.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use outboxd::{Config, Report};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

/// How long a "this should happen soon" wait may take before the test fails. Generous:
/// the machine is small and shared, and a slow pass is not a failure.
pub const WAIT: Duration = Duration::from_secs(20);
/// How often bounded waits look again.
pub const POLL_EVERY: Duration = Duration::from_millis(20);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A name unique in this test run: `<label>_<pid>_<n>`.
pub fn unique(label: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{label}_{}_{n}", std::process::id())
}

/// The admin (superuser) URL from `DATABASE_URL`; panics with instructions if unset.
pub fn admin_url() -> String {
    match std::env::var("DATABASE_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => panic!(
            "DATABASE_URL is not set: the integration tests need a PostgreSQL superuser URL. \
             Run them with `make test`, which starts a throwaway PostgreSQL and sets it \
             (or: PG_FAST=1 scripts/with-postgres.sh cargo test --test it)"
        ),
    }
}

/// The same server as `admin`, database `dbname`.
fn url_for_database(admin: &str, dbname: &str) -> String {
    if admin.starts_with("postgres://") || admin.starts_with("postgresql://") {
        let mut url = url::Url::parse(admin).expect("DATABASE_URL is not a valid URL");
        url.set_path(&format!("/{dbname}"));
        url.to_string()
    } else {
        // key=value form: a later key overrides an earlier one.
        format!("{admin} dbname={dbname}")
    }
}

/// Logs from the library, shown with a failing test's output (`RUST_LOG` to tune).
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("outboxd=info"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

async fn connect_raw(url: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to PostgreSQL: {e}"));
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own for one test, dropped (forcibly) when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub client: Client,
}

impl TestDb {
    /// A fresh database with the outboxd schema migrated.
    pub async fn new(label: &str) -> Self {
        let mut db = Self::empty(label).await;
        let applied = outboxd::schema::migrate(&mut db.client)
            .await
            .expect("migrate a fresh test database");
        assert_eq!(applied.len(), outboxd::schema::MIGRATIONS.len());
        db
    }

    /// A fresh, empty database (no schema).
    pub async fn empty(label: &str) -> Self {
        init_tracing();
        let admin = admin_url();
        let name = format!("outboxd_test_{}", unique(label)).to_lowercase();
        assert!(name.len() <= 63, "database name too long: {name}");
        let admin_client = connect_raw(&admin).await;
        admin_client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        let url = url_for_database(&admin, &name);
        let client = connect_raw(&url).await;
        Self { name, url, client }
    }

    /// Whether the test's database user may create roles (a superuser, or CREATEROLE):
    /// tests of privileges skip themselves without it.
    pub async fn may_create_roles(&self) -> bool {
        self.scalar("SELECT rolsuper OR rolcreaterole FROM pg_roles WHERE rolname = current_user")
            .await
    }

    /// Another plain connection to this database.
    pub async fn connect(&self) -> Client {
        connect_raw(&self.url).await
    }

    /// A pool like the one the library's admin functions use.
    pub async fn pool(&self) -> outboxd::db::Pool {
        outboxd::db::admin_pool(&self.url).await.expect("pool")
    }

    /// Registers an endpoint; returns `(id, secret)`.
    pub async fn add_endpoint(&self, url: &str, event_types: &[&str]) -> (i64, String) {
        let (endpoint, secret) = outboxd::endpoint::add(
            &self.client,
            outboxd::NewEndpoint {
                url: url.to_owned(),
                event_types: event_types.iter().map(|s| (*s).to_owned()).collect(),
                secret: None,
                description: "integration test".to_owned(),
                ..Default::default()
            },
        )
        .await
        .expect("register endpoint");
        (endpoint.id, secret)
    }

    /// Enqueues an event outside any transaction; returns its id.
    pub async fn enqueue(&self, event_type: &str, payload: &serde_json::Value) -> i64 {
        outboxd::enqueue(&self.client, &outboxd::NewEvent::new(event_type, payload))
            .await
            .expect("enqueue")
            .expect("a new event (no idempotency key)")
    }

    /// Commits `order.created` events with payloads `{"n": first}` to `{"n": last}` in
    /// one transaction, so that one claim can take them all.
    pub async fn enqueue_series(&self, first: i32, last: i32) {
        self.client
            .execute(
                "INSERT INTO webhook_outbox (event_type, payload)
                 SELECT 'order.created', jsonb_build_object('n', n)
                 FROM generate_series($1::int, $2::int) n",
                &[&first, &last],
            )
            .await
            .expect("enqueue a series");
    }

    /// Runs a query returning one value.
    pub async fn scalar<T>(&self, sql: &str) -> T
    where
        T: for<'a> tokio_postgres::types::FromSql<'a>,
    {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// Every delivery row, ordered by (event, endpoint).
    pub async fn deliveries(&self) -> Vec<DeliveryRow> {
        self.client
            .query(
                "SELECT event_id, endpoint_id, state, attempts, next_attempt_at, locked_by,
                        locked_until, last_status, last_error, delivered_at
                 FROM webhook_deliveries ORDER BY event_id, endpoint_id",
                &[],
            )
            .await
            .expect("read deliveries")
            .iter()
            .map(|r| DeliveryRow {
                event_id: r.get(0),
                endpoint_id: r.get(1),
                state: r.get(2),
                attempts: r.get(3),
                next_attempt_at: r.get(4),
                locked_by: r.get(5),
                locked_until: r.get(6),
                last_status: r.get(7),
                last_error: r.get(8),
                delivered_at: r.get(9),
            })
            .collect()
    }

    /// One delivery row; panics if it does not exist.
    pub async fn delivery(&self, event_id: i64, endpoint_id: i64) -> DeliveryRow {
        self.deliveries()
            .await
            .into_iter()
            .find(|d| d.event_id == event_id && d.endpoint_id == endpoint_id)
            .unwrap_or_else(|| panic!("no delivery ({event_id}, {endpoint_id})"))
    }

    /// Every attempt row, ordered by (event, endpoint, attempt).
    pub async fn attempts(&self) -> Vec<AttemptRow> {
        self.client
            .query(
                "SELECT event_id, endpoint_id, attempt, started_at, status_code, error_kind,
                        error, response_excerpt, worker_id
                 FROM webhook_attempts ORDER BY event_id, endpoint_id, attempt",
                &[],
            )
            .await
            .expect("read attempts")
            .iter()
            .map(|r| AttemptRow {
                event_id: r.get(0),
                endpoint_id: r.get(1),
                attempt: r.get(2),
                started_at: r.get(3),
                status_code: r.get(4),
                error_kind: r.get(5),
                error: r.get(6),
                response_excerpt: r.get(7),
                worker_id: r.get(8),
            })
            .collect()
    }

    /// Waits until `sql` (one boolean in its first row) is true; on timeout panics with
    /// the delivery and attempt rows.
    pub async fn wait_until(&self, sql: &str) {
        self.wait_until_within(sql, WAIT).await
    }

    /// [`TestDb::wait_until`] with an explicit bound.
    pub async fn wait_until_within(&self, sql: &str, bound: Duration) {
        let deadline = Instant::now() + bound;
        loop {
            // No row or NULL (an aggregate over nothing) counts as not yet.
            let rows = self
                .client
                .query(sql, &[])
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
            let done = rows.first().and_then(|r| r.get::<_, Option<bool>>(0));
            if done == Some(true) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "condition not met within {bound:?}: {sql}\ndeliveries: {:#?}\nattempts: {:#?}",
                    self.deliveries().await,
                    self.attempts().await
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// Waits until every delivery row is in `state` and there are exactly `count` of them.
    pub async fn wait_all_in_state(&self, count: i64, state: &str) {
        self.wait_all_in_state_within(count, state, WAIT).await
    }

    /// [`TestDb::wait_all_in_state`] with an explicit bound.
    pub async fn wait_all_in_state_within(&self, count: i64, state: &str, bound: Duration) {
        self.wait_until_within(
            &format!(
                "SELECT count(*) = {count} AND count(*) FILTER (WHERE state = '{state}') = {count} \
                 FROM webhook_deliveries"
            ),
            bound,
        )
        .await
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Async drop does not exist: drop the database from a helper thread with its own
        // runtime. FORCE ends whatever connections are left (e.g. after a failed test).
        let name = self.name.clone();
        let Ok(admin) = std::env::var("DATABASE_URL") else {
            return;
        };
        let dropper = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok((client, connection)) = tokio_postgres::connect(&admin, NoTls).await {
                    tokio::spawn(connection);
                    let _ = client
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                }
            });
        });
        let _ = dropper.join();
    }
}

#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct DeliveryRow {
    pub event_id: i64,
    pub endpoint_id: i64,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: SystemTime,
    pub locked_by: Option<String>,
    pub locked_until: Option<SystemTime>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub delivered_at: Option<SystemTime>,
}

#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct AttemptRow {
    pub event_id: i64,
    pub endpoint_id: i64,
    pub attempt: i32,
    pub started_at: SystemTime,
    pub status_code: Option<i32>,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub response_excerpt: Option<String>,
    pub worker_id: String,
}

/// Polls `check` every [`POLL_EVERY`] until it returns true, for at most `bound`.
pub async fn eventually<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not true within {bound:?}: {what}"
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
}

// ---------------------------------------------------------------------------------------
// The capturing receiver
// ---------------------------------------------------------------------------------------

/// How the receiver answers one request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub headers: Vec<(&'static str, String)>,
    /// Wait this long before answering (a long one is a hang).
    pub delay: Duration,
}

impl Reply {
    pub fn status(status: u16) -> Self {
        Self {
            status,
            body: format!("answer {status}"),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok() -> Self {
        Self::status(200)
    }

    pub fn body(mut self, body: &str) -> Self {
        self.body = body.to_owned();
        self
    }

    pub fn header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_owned()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Never answers within any test's lifetime.
    pub fn hang() -> Self {
        Self::ok().delay(Duration::from_secs(3600))
    }
}

/// Decides the reply to the `n`th (0-based) request on one path.
pub type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub arrived_at: SystemTime,
    pub arrived: Instant,
    /// The status it was answered with, once the answer has been handed to the server
    /// (`None` while the receiver is still holding it, or if it was abandoned).
    pub answered: Option<u16>,
    /// When that answer was handed to the server.
    pub answered_at: Option<Instant>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("request without a {name} header: {self:?}"))
    }

    pub fn webhook_id(&self) -> &str {
        self.header("webhook-id")
    }

    pub fn event_id(&self) -> i64 {
        self.webhook_id()
            .parse()
            .expect("webhook-id is the event id")
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    /// Verifies the signature with the independent `standardwebhooks` implementation.
    pub fn verify(&self, secret: &str) -> Result<(), standardwebhooks::WebhookError> {
        standardwebhooks::Webhook::new(secret)?.verify(&self.body, &self.headers)
    }
}

#[derive(Default)]
struct ReceiverState {
    requests: Vec<Recorded>,
    per_path: HashMap<String, usize>,
    scripts: HashMap<String, Script>,
    /// Requests being handled now, and the most ever handled at once, per path.
    in_flight: HashMap<String, usize>,
    max_in_flight: HashMap<String, usize>,
}

/// Counts one request in flight on its path until dropped: when answered, or when the
/// client gave up and the server dropped the handler.
struct InFlight {
    state: Arc<Mutex<ReceiverState>>,
    path: String,
}

impl InFlight {
    fn enter(state: &Arc<Mutex<ReceiverState>>, s: &mut ReceiverState, path: &str) -> Self {
        let now = s.in_flight.entry(path.to_owned()).or_insert(0);
        *now += 1;
        let now = *now;
        let max = s.max_in_flight.entry(path.to_owned()).or_insert(0);
        *max = (*max).max(now);
        Self {
            state: Arc::clone(state),
            path: path.to_owned(),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut s) = self.state.lock() {
            if let Some(now) = s.in_flight.get_mut(&self.path) {
                *now = now.saturating_sub(1);
            }
        }
    }
}

/// An HTTP server on 127.0.0.1 recording every request and answering per path script
/// (200 for paths without one). Stops when dropped.
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
    server: JoinHandle<()>,
}

impl Receiver {
    pub async fn start() -> Self {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let app = Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().expect("receiver address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            state,
            server,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Answers requests on `path` with `script(n)` from now on (`n` counts from the
    /// first request ever made to the path).
    pub fn script(&self, path: &str, script: impl Fn(usize) -> Reply + Send + Sync + 'static) {
        self.state
            .lock()
            .unwrap()
            .scripts
            .insert(path.to_owned(), Arc::new(script));
    }

    /// Always answers `reply` on `path`.
    pub fn always(&self, path: &str, reply: Reply) {
        self.script(path, move |_| reply.clone());
    }

    /// Answers `replies` in order on `path`, then repeats the last one.
    pub fn sequence(&self, path: &str, replies: Vec<Reply>) {
        assert!(!replies.is_empty());
        self.script(path, move |n| replies[n.min(replies.len() - 1)].clone());
    }

    /// Everything received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.lock().unwrap().requests.clone()
    }

    /// Everything received so far on `path`.
    pub fn requests_to(&self, path: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().requests.len()
    }

    /// The most requests on `path` ever handled at once.
    pub fn max_in_flight_to(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .max_in_flight
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    pub fn count_to(&self, path: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .per_path
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until at least `n` requests have arrived in all.
    pub async fn wait_for(&self, n: usize) -> Vec<Recorded> {
        self.wait_for_within(n, WAIT).await
    }

    pub async fn wait_for_within(&self, n: usize, bound: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + bound;
        loop {
            if self.count() >= n {
                return self.requests();
            }
            if Instant::now() >= deadline {
                panic!(
                    "the receiver got {} requests within {bound:?}, expected at least {n}",
                    self.count()
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let (index, reply, _in_flight) = {
        let mut s = state.lock().unwrap();
        let in_flight = InFlight::enter(&state, &mut s, &path);
        let n = {
            let count = s.per_path.entry(path.clone()).or_insert(0);
            *count += 1;
            *count - 1
        };
        let reply = match s.scripts.get(&path) {
            Some(script) => script(n),
            None => Reply::ok(),
        };
        s.requests.push(Recorded {
            method,
            path,
            headers,
            body,
            arrived_at: SystemTime::now(),
            arrived: Instant::now(),
            answered: None,
            answered_at: None,
        });
        (s.requests.len() - 1, reply, in_flight)
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    {
        let mut s = state.lock().unwrap();
        s.requests[index].answered = Some(reply.status);
        s.requests[index].answered_at = Some(Instant::now());
    }
    let mut response = (
        StatusCode::from_u16(reply.status).expect("valid status"),
        reply.body,
    )
        .into_response();
    for (name, value) in reply.headers {
        response.headers_mut().insert(
            HeaderName::from_static(name),
            HeaderValue::from_str(&value).expect("header value"),
        );
    }
    response
}

// ---------------------------------------------------------------------------------------
// Dispatchers
// ---------------------------------------------------------------------------------------

/// A configuration for tests: loopback allowed, quick polls and retries, a lease that
/// survives a loaded machine, and a unique worker id.
pub fn test_config(label: &str) -> Config {
    Config {
        worker_id: format!("it-{}", unique(label)),
        listen: true,
        poll_interval: Duration::from_millis(150),
        batch_size: 100,
        lease: Duration::from_millis(15_000),
        http_timeout: Duration::from_millis(5_000),
        concurrency: 16,
        backoff_base: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
        max_attempts: 5,
        drain_timeout: Duration::from_millis(5_000),
        allow_private_targets: true,
        pool_size: 4,
        ..Config::default()
    }
}

/// An in-process dispatcher running on the test's runtime. Dropping it cancels it.
pub struct RunningDispatcher {
    pub worker_id: String,
    pub metrics: std::sync::Arc<outboxd::Metrics>,
    token: CancellationToken,
    handle: Option<JoinHandle<outboxd::Result<Report>>>,
}

impl RunningDispatcher {
    pub fn start(url: &str, config: Config) -> Self {
        Self::start_with(outboxd::Dispatcher::new(url, config).expect("valid test config"))
    }

    /// Runs `dispatcher` as it was built.
    pub fn start_with(dispatcher: outboxd::Dispatcher) -> Self {
        let worker_id = dispatcher.worker_id().to_owned();
        let metrics = dispatcher.metrics();
        let token = CancellationToken::new();
        let handle = tokio::spawn(dispatcher.run(token.clone()));
        Self {
            worker_id,
            metrics,
            token,
            handle: Some(handle),
        }
    }

    /// Cancels, waits for the drain, and returns the report.
    pub async fn stop(mut self) -> Report {
        self.token.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(60), handle)
            .await
            .expect("the dispatcher stops within 60 s of cancellation")
            .expect("the dispatcher task did not panic")
            .expect("the dispatcher ran without a start-up error")
    }
}

impl Drop for RunningDispatcher {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

// ---------------------------------------------------------------------------------------
// The real binary
// ---------------------------------------------------------------------------------------

/// `outboxd` with a clean environment: only `PATH`, what coverage needs, and what the
/// test sets.
pub fn outboxd_command() -> tokio::process::Command {
    package_binary(env!("CARGO_BIN_EXE_outboxd"))
}

/// One of this package's binaries (`CARGO_BIN_EXE_<name>`: under `cargo llvm-cov`, the
/// instrumented build) with a clean environment: `PATH`, `RUST_LOG=info`, and the
/// variables through which `cargo llvm-cov` tells a process where to write its profile,
/// so the lines the binaries run are counted too. Nothing else from the test's
/// environment reaches the binary.
pub fn package_binary(path: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(path);
    command
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(coverage_env())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// `LLVM_PROFILE_FILE` and the rest of what `cargo llvm-cov` sets (`LLVM_*`,
/// `CARGO_LLVM_COV*`); empty outside a coverage run. A process counts only if it exits
/// by itself (a signal it handles, not SIGKILL): the profile is written at exit.
fn coverage_env() -> Vec<(std::ffi::OsString, std::ffi::OsString)> {
    std::env::vars_os()
        .filter(|(name, _)| {
            name.to_str()
                .is_some_and(|n| n.starts_with("LLVM_") || n.starts_with("CARGO_LLVM_COV"))
        })
        .collect()
}

/// What a finished process left behind.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl TestDb {
    /// `outboxd ARGS` against this database, run to its end; asserts its exit status
    /// and returns `(stdout, stderr)`.
    pub async fn cli(&self, args: &[&str], expected: i32) -> (String, String) {
        let mut command = outboxd_command();
        command.args(args).env("DATABASE_URL", &self.url);
        let finished = run_to_end(command).await;
        assert_eq!(
            finished.code,
            Some(expected),
            "outboxd {args:?}: {}{}",
            finished.stdout,
            finished.stderr
        );
        (finished.stdout, finished.stderr)
    }
}

/// Runs `command` to completion (at most 60 s).
pub async fn run_to_end(mut command: tokio::process::Command) -> Finished {
    let child = command.spawn().expect("spawn outboxd");
    wait_child(child, Duration::from_secs(60)).await
}

/// Waits for `child` for at most `bound`, collecting its output.
pub async fn wait_child(child: tokio::process::Child, bound: Duration) -> Finished {
    let output = tokio::time::timeout(bound, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("outboxd did not exit within {bound:?}"))
        .expect("wait for outboxd");
    Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Sends SIGTERM to `pid` with the `kill` utility.
pub fn sigterm(pid: u32) {
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
}

/// A running `outboxd` whose output is collected as it comes, so a test can wait for a
/// line before acting.
pub struct Spawned {
    pub child: tokio::process::Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

impl Spawned {
    pub fn start(mut command: tokio::process::Command) -> Self {
        use tokio::io::AsyncBufReadExt as _;
        let mut child = command.spawn().expect("spawn outboxd");
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        fn collect<R>(reader: R, sink: Arc<Mutex<String>>) -> JoinHandle<()>
        where
            R: tokio::io::AsyncRead + Unpin + Send + 'static,
        {
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut sink = sink.lock().unwrap();
                    sink.push_str(&line);
                    sink.push('\n');
                }
            })
        }
        if let Some(out) = child.stdout.take() {
            readers.push(collect(out, Arc::clone(&stdout)));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(collect(err, Arc::clone(&stderr)));
        }
        Self {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    /// Waits until stderr contains `needle`.
    pub async fn wait_for_stderr(&self, needle: &str) {
        let deadline = Instant::now() + WAIT;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "outboxd did not log {needle:?} within {WAIT:?}; stderr:\n{}",
                self.stderr()
            );
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    /// The port of the server whose start outboxd logs as `message` (`serving /metrics`,
    /// `serving the admin API`), once logged. Servers asked for port 0 take a free one
    /// and log it: a port picked by the test and released before outboxd binds it could
    /// be taken meanwhile by anything else on the machine.
    pub async fn served_port(&self, message: &str) -> u16 {
        self.wait_for_stderr(message).await;
        let stderr = self.stderr();
        let line = stderr
            .lines()
            .find(|l| l.contains(message))
            .expect("the line just waited for");
        // The text format may colour field names: drop the escape sequences first.
        let mut plain = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                chars.by_ref().find(|c| c.is_ascii_alphabetic());
            } else {
                plain.push(c);
            }
        }
        plain
            .split("addr=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|addr| addr.trim_matches('"').parse::<std::net::SocketAddr>().ok())
            .map(|addr| addr.port())
            .unwrap_or_else(|| panic!("no address in {line:?}"))
    }

    /// Waits for the exit (at most `bound`) and the rest of the output.
    pub async fn finish(mut self, bound: Duration) -> Finished {
        let status = match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.expect("wait for outboxd"),
            Err(_) => panic!(
                "outboxd did not exit within {bound:?}; stderr:\n{}",
                self.stderr()
            ),
        };
        for reader in self.readers.drain(..) {
            let _ = reader.await;
        }
        Finished {
            code: status.code(),
            stdout: self.stdout.lock().unwrap().clone(),
            stderr: self.stderr(),
        }
    }
}
