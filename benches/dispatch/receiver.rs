//! The webhook receiver the benchmark delivers to, in a process of its own.
//!
//! The bench binary re-executes itself with `OUTBOXD_BENCH_ROLE=receiver`; that child runs
//! a hyper 1 HTTP/1.1 server on 127.0.0.1 (keep-alive) that reads each request's body,
//! notes the `webhook-id`, the endpoint number from the path (`/hook/N`) and the receive
//! time (CLOCK_REALTIME, microseconds), and answers 204 at once. The parent reads the
//! records over `GET /take` (returns and clears them) and polls `GET /count`.
//!
//! The child prints `listening PORT` on stdout when ready and exits when its stdin closes,
//! so it never outlives the bench.
//!
//! Ordered delivery (issue 15) is checked here too, for endpoints registered at
//! `/hook/N/ordered`: their events carry their key and their place in its order in the
//! payload (`{"k": key, "n": n, ...}`), and the receiver counts, per (endpoint, key),
//! the requests that arrived before the previous one of their key was answered (two in
//! flight at once), the first arrivals of an event after a later one of its key (out of
//! order), and repeated events. `GET /ordered` returns and resets those counts.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::io::{Read as _, Write as _};
use std::process::{ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncBufReadExt as _;

use crate::sys::now_us;

/// Environment variable that selects the receiver role of the bench binary.
pub const ROLE_ENV: &str = "OUTBOXD_BENCH_ROLE";
/// The receiver never lives longer than this, whatever happens to its parent.
const MAX_LIFETIME: Duration = Duration::from_secs(3 * 3600);

/// One received webhook.
#[derive(Debug, Clone, Copy)]
pub struct Rec {
    /// `webhook-id` (the event id), or -1 when missing.
    pub id: i64,
    /// Endpoint number from the path `/hook/N`.
    pub ep: u32,
    /// Receive time, CLOCK_REALTIME microseconds.
    pub t_us: i64,
    /// When the receiver answered (its handler returned), CLOCK_REALTIME microseconds.
    pub done_us: i64,
}

static RECORDS: Mutex<Vec<Rec>> = Mutex::new(Vec::new());

/// What the receiver saw of ordered endpoints since the last `GET /ordered`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrderedCounts {
    /// Requests to ordered endpoints.
    pub requests: u64,
    /// Requests that arrived while another of their (endpoint, key) was unanswered.
    pub overlaps: u64,
    /// First arrivals of an event after a later event of its (endpoint, key).
    pub out_of_order: u64,
    /// Arrivals of an event already received.
    pub duplicates: u64,
    /// Requests whose body did not carry a key and a number.
    pub unreadable: u64,
}

/// One (endpoint, key)'s requests so far.
#[derive(Default)]
struct KeyState {
    in_flight: u32,
    last_done_us: i64,
    max_n: Option<u64>,
    seen: HashSet<u64>,
}

#[derive(Default)]
struct OrderedState {
    counts: OrderedCounts,
    keys: HashMap<(u32, String), KeyState>,
}

static ORDERED: Mutex<Option<OrderedState>> = Mutex::new(None);

/// The part of an ordered event's body the receiver reads (the body is
/// `{"id", "type", "timestamp", "data"}`, `data` being the payload).
#[derive(serde::Deserialize)]
struct OrderedBody {
    data: OrderedData,
}

#[derive(serde::Deserialize)]
struct OrderedData {
    k: String,
    n: u64,
}

/// Counts an ordered request whose body has been read: it arrived at `arrived_us`.
/// Returns its (endpoint, key) so that its answer can be noted.
fn ordered_arrival(ep: u32, body: &[u8], arrived_us: i64) -> Option<(u32, String)> {
    let mut guard = ORDERED.lock().ok()?;
    let state = guard.get_or_insert_with(OrderedState::default);
    state.counts.requests += 1;
    let Ok(parsed) = serde_json::from_slice::<OrderedBody>(body) else {
        state.counts.unreadable += 1;
        return None;
    };
    let OrderedData { k, n } = parsed.data;
    let key = (ep, k);
    let st = state.keys.entry(key.clone()).or_default();
    // Another request of this key is being handled, or was answered after this one
    // arrived: the dispatcher sent this one before it had the previous answer.
    let overlap = st.in_flight > 0 || st.last_done_us > arrived_us;
    st.in_flight += 1;
    let (out_of_order, duplicate) = if st.seen.insert(n) {
        let late = st.max_n.is_some_and(|max| n < max);
        st.max_n = Some(st.max_n.map_or(n, |max| max.max(n)));
        (late, false)
    } else {
        (false, true)
    };
    state.counts.overlaps += u64::from(overlap);
    state.counts.out_of_order += u64::from(out_of_order);
    state.counts.duplicates += u64::from(duplicate);
    Some(key)
}

/// Notes that the request of `key` is answered at `done_us`.
fn ordered_answered(key: (u32, String), done_us: i64) {
    if let Ok(mut guard) = ORDERED.lock()
        && let Some(st) = guard.as_mut().and_then(|s| s.keys.get_mut(&key))
    {
        st.in_flight = st.in_flight.saturating_sub(1);
        st.last_done_us = st.last_done_us.max(done_us);
    }
}

/// Entry point of the receiver child process.
pub fn serve_main() -> ExitCode {
    // Exit with the parent: it holds our stdin open for as long as it wants us.
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
    std::thread::spawn(|| {
        std::thread::sleep(MAX_LIFETIME);
        eprintln!("bench receiver: maximum lifetime reached, exiting");
        std::process::exit(2);
    });
    let threads: usize = std::env::var("BENCH_RECEIVER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench receiver: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench receiver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {port}")?;
        out.flush()?;
    }
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                eprintln!("bench receiver: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle))
                .await;
        });
    }
}

async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let reply = |status: StatusCode, body: Bytes| {
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        Ok(response)
    };
    if req.method() == Method::GET {
        return match req.uri().path() {
            "/count" => {
                let n = RECORDS.lock().map(|r| r.len()).unwrap_or(0);
                reply(StatusCode::OK, Bytes::from(n.to_string()))
            }
            "/take" => {
                let taken = RECORDS
                    .lock()
                    .map(|mut r| std::mem::take(&mut *r))
                    .unwrap_or_default();
                let mut text = String::with_capacity(taken.len() * 45);
                for r in &taken {
                    use std::fmt::Write as _;
                    let _ = writeln!(text, "{} {} {} {}", r.id, r.ep, r.t_us, r.done_us);
                }
                reply(StatusCode::OK, Bytes::from(text))
            }
            "/ordered" => {
                let c = ORDERED
                    .lock()
                    .ok()
                    .and_then(|mut o| o.take())
                    .map(|o| o.counts)
                    .unwrap_or_default();
                let text = format!(
                    "{} {} {} {} {}",
                    c.requests, c.overlaps, c.out_of_order, c.duplicates, c.unreadable
                );
                reply(StatusCode::OK, Bytes::from(text))
            }
            _ => reply(StatusCode::NOT_FOUND, Bytes::new()),
        };
    }
    let arrived_us = now_us();
    let id = req
        .headers()
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    // `/hook/N`, or `/hook/N/ordered` for an endpoint whose order is checked.
    let (ep, ordered) = match req.uri().path().strip_prefix("/hook/") {
        Some(rest) => match rest.split_once('/') {
            Some((n, "ordered")) => (n.parse::<u32>().unwrap_or(0), true),
            _ => (rest.parse::<u32>().unwrap_or(0), false),
        },
        None => (0, false),
    };
    // Read the whole webhook before calling it received (and so the connection stays
    // reusable); it normally arrived in the same segment as the head.
    let body = req.into_body().collect().await.map(|b| b.to_bytes());
    let t_us = now_us();
    let key = match (&body, ordered) {
        (Ok(body), true) => ordered_arrival(ep, body, arrived_us),
        _ => None,
    };
    let done_us = now_us();
    if let Some(key) = key {
        ordered_answered(key, done_us);
    }
    if let Ok(mut records) = RECORDS.lock() {
        records.push(Rec {
            id,
            ep,
            t_us,
            done_us,
        });
    }
    reply(StatusCode::NO_CONTENT, Bytes::new())
}

/// The parent's handle on the receiver process.
pub struct Receiver {
    child: tokio::process::Child,
    // Held open; the child exits when it closes.
    _stdin: tokio::process::ChildStdin,
    port: u16,
    http: reqwest::Client,
}

impl Receiver {
    /// Starts the receiver process and waits until it listens.
    pub async fn spawn() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut child = tokio::process::Command::new(exe)
            .env(ROLE_ENV, "receiver")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the receiver process")?;
        if let Some(pid) = child.id() {
            crate::sys::register_child(pid);
        }
        let stdin = child.stdin.take().context("receiver stdin")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("the receiver did not start within 20 s")??
            .context("the receiver exited before listening")?;
        let port: u16 = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .with_context(|| format!("unexpected receiver output {line:?}"))?;
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()?;
        Ok(Self {
            child,
            _stdin: stdin,
            port,
            http,
        })
    }

    /// The receiver's process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The webhook URL of endpoint number `ep`.
    pub fn url(&self, ep: u32) -> String {
        format!("http://127.0.0.1:{}/hook/{ep}", self.port)
    }

    /// The webhook URL of endpoint number `ep`, whose order per key is checked (see
    /// [`Receiver::take_ordered`]).
    pub fn ordered_url(&self, ep: u32) -> String {
        format!("http://127.0.0.1:{}/hook/{ep}/ordered", self.port)
    }

    /// Returns and resets the ordered endpoints' counts.
    pub async fn take_ordered(&self) -> anyhow::Result<OrderedCounts> {
        let url = format!("http://127.0.0.1:{}/ordered", self.port);
        let text = self.http.get(url).send().await?.text().await?;
        let n: Vec<u64> = text
            .split(' ')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("bad ordered counts {text:?}"))?;
        let [requests, overlaps, out_of_order, duplicates, unreadable] = n[..] else {
            bail!("bad ordered counts {text:?}");
        };
        Ok(OrderedCounts {
            requests,
            overlaps,
            out_of_order,
            duplicates,
            unreadable,
        })
    }

    /// Round trips of `n` webhook-sized POSTs sent one after another from this process
    /// over one keep-alive connection, in µs, sorted: what a single key's pace cannot
    /// beat. The receiver records them as endpoint `u32::MAX`; they are taken away here.
    pub async fn round_trips(&self, n: usize, body: String) -> anyhow::Result<Vec<f64>> {
        let url = format!("http://127.0.0.1:{}/hook/{}", self.port, u32::MAX);
        let client = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(1)
            .timeout(Duration::from_secs(10))
            .build()?;
        let mut out = Vec::with_capacity(n);
        for i in 0..n + 10 {
            let started = Instant::now();
            client
                .post(&url)
                .header("webhook-id", "-1")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?
                .error_for_status()?;
            // The first few open the connection.
            if i >= 10 {
                out.push(started.elapsed().as_secs_f64() * 1e6);
            }
        }
        self.take().await?;
        out.sort_by(f64::total_cmp);
        Ok(out)
    }

    /// How many webhooks are recorded and not yet taken.
    pub async fn count(&self) -> anyhow::Result<u64> {
        let url = format!("http://127.0.0.1:{}/count", self.port);
        let text = self.http.get(url).send().await?.text().await?;
        Ok(text.trim().parse()?)
    }

    /// Returns and clears the records.
    pub async fn take(&self) -> anyhow::Result<Vec<Rec>> {
        let url = format!("http://127.0.0.1:{}/take", self.port);
        let body = self.http.get(url).send().await?.bytes().await?;
        let mut out = Vec::new();
        for line in std::str::from_utf8(&body)?.lines() {
            let mut parts = line.split(' ');
            let (Some(id), Some(ep), Some(t), Some(done)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                bail!("bad receiver record {line:?}");
            };
            out.push(Rec {
                id: id.parse()?,
                ep: ep.parse()?,
                t_us: t.parse()?,
                done_us: done.parse()?,
            });
        }
        Ok(out)
    }

    /// Waits until at least `n` webhooks are recorded or `timeout` passes; returns the
    /// count reached. Polls every 10 ms (a negligible load on the receiver).
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.count().await?;
            if count >= n || Instant::now() >= deadline {
                return Ok(count);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
