//! The consumer: a hyper HTTP/1.1 server on 127.0.0.1, in this process, with one path
//! per endpoint (`/ep/N`). It reads each webhook whole, verifies its signature with the
//! independent `standardwebhooks` crate, records it, and answers as the fault of the
//! moment says:
//!
//! * healthy: 204 after up to 40 ms of "work", and the webhook counts as **accepted**
//!   (the consumer processed it);
//! * a status fault: 500, 503 or 429 (with or without `Retry-After`) for a share of the
//!   requests, which are **refused** (not processed);
//! * a close fault: the connection is dropped without an answer for a share of the
//!   requests, which are **closed** (not processed);
//! * a stall: the webhook is processed at once but answered only after the dispatcher's
//!   HTTP timeout has passed. It counts as accepted, and since the dispatcher saw a
//!   timeout it will send it again: a **stalled** webhook is a duplicate the consumer
//!   is allowed to see (docs/webhooks.md, "When a duplicate can happen").
//!
//! **Ordered lines.** For an event with an ordering key (the producers put it in the
//! payload as `data.key`), the consumer also keeps, live, which requests of each
//! (endpoint, key) are in flight: from the moment the body has been read until the
//! handler has its answer (before hyper writes it, so before the dispatcher can learn
//! the outcome) or is dropped. hyper drops it when the sender closes the connection
//! under it: a dispatcher that gives up on a stalled answer at its HTTP timeout, or
//! dies. Such a request has ended for the dispatcher, which then retries (or leaves
//! it to the lease's expiry) with a new request; the consumer's handler of the old one
//! has nothing left to do for it (it processed the webhook on arrival), so it is not in
//! flight any more either. A request for an (endpoint, key) that begins while another
//! one is in flight is an **overlap**: outboxd promised one at a time per (endpoint,
//! key). Its drop is what tells "the sender gave up" from "the consumer is still
//! working": were hyper not to notice the closed connection, every stall followed by
//! the retry would show as an overlap, and the run would say so.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::Clock;

/// A healthy answer takes up to this long (uniformly drawn).
const WORK_MS: u64 = 40;

/// What the consumer did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Processed and answered 204.
    Accepted,
    /// Processed, answered after the client's timeout.
    Stalled,
    /// Answered with this status, not processed.
    Refused(u16),
    /// Dropped without an answer, not processed.
    Closed,
    /// The body did not arrive whole (the sender died mid-request).
    Incomplete,
}

impl Fate {
    /// Whether the consumer processed the webhook.
    pub fn processed(self) -> bool {
        matches!(self, Self::Accepted | Self::Stalled)
    }
}

/// One request as the consumer saw it.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Endpoint index from the path; `None` for a path that is not `/ep/N`.
    pub ep: Option<usize>,
    /// `webhook-id`, parsed; `None` if missing or not a number.
    pub event_id: Option<i64>,
    /// `data.uid` of the body; `None` if absent.
    pub uid: Option<i64>,
    /// `data.key` of the body: the event's ordering key, as its producer wrote it.
    pub key: Option<String>,
    /// Whether the signature verified against the endpoint's secret.
    pub signed: bool,
    /// When it was read whole, in ms since the run began.
    pub at_ms: u64,
    pub fate: Fate,
}

/// A fault the receiver applies to an endpoint for a while.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Answer `status` (with `Retry-After: retry_after` seconds if set) to this share
    /// of requests.
    Status {
        status: u16,
        retry_after: Option<u32>,
        share: f64,
    },
    /// Drop this share of requests without an answer.
    Close { share: f64 },
    /// Answer every request only after `delay`.
    Stall { delay: Duration },
}

struct Active {
    fault: Fault,
    until: Instant,
}

/// A request that began while another one of its (endpoint, key) was in flight.
#[derive(Debug, Clone)]
pub struct Overlap {
    pub ep: usize,
    pub key: String,
    /// The request that began, and when (ms).
    pub event_id: Option<i64>,
    pub at_ms: u64,
    /// The requests already in flight: event id and since when (ms).
    pub others: Vec<(Option<i64>, u64)>,
}

/// What the consumer saw of the ordered lines.
#[derive(Debug, Clone, Default)]
pub struct Lines {
    /// Requests of ordered events (body read whole).
    pub requests: u64,
    /// Of those, requests whose sender closed the connection before the answer.
    pub abandoned: u64,
    pub overlaps: Vec<Overlap>,
}

/// A request in flight on an (endpoint, key): its token, event id, since when (ms).
type InFlight = (u64, Option<i64>, u64);

#[derive(Default)]
struct Tracker {
    in_flight: HashMap<(usize, String), Vec<InFlight>>,
    overlaps: Vec<Overlap>,
}

struct State {
    verifiers: Vec<standardwebhooks::Webhook>,
    faults: Mutex<Vec<Option<Active>>>,
    records: Mutex<Vec<Rec>>,
    rng: Mutex<StdRng>,
    clock: Clock,
    tracker: Mutex<Tracker>,
    next_token: AtomicU64,
    ordered_requests: AtomicU64,
    abandoned: AtomicU64,
}

/// A request counted in flight on its (endpoint, key) until dropped: when the handler
/// returns its answer, or when hyper drops the handler because the sender left.
struct Flight {
    state: Arc<State>,
    line: (usize, String),
    token: u64,
    answered: bool,
}

impl Flight {
    fn begin(state: &Arc<State>, ep: usize, key: String, event_id: Option<i64>) -> Self {
        let token = state.next_token.fetch_add(1, Ordering::Relaxed);
        let now = state.clock.ms();
        let line = (ep, key);
        state.ordered_requests.fetch_add(1, Ordering::Relaxed);
        let mut tracker = state.tracker.lock().expect("tracker");
        let flying = tracker.in_flight.entry(line.clone()).or_default();
        if !flying.is_empty() {
            let others = flying.iter().map(|&(_, id, since)| (id, since)).collect();
            flying.push((token, event_id, now));
            tracker.overlaps.push(Overlap {
                ep: line.0,
                key: line.1.clone(),
                event_id,
                at_ms: now,
                others,
            });
        } else {
            flying.push((token, event_id, now));
        }
        drop(tracker);
        Self {
            state: Arc::clone(state),
            line,
            token,
            answered: false,
        }
    }
}

impl std::ops::Drop for Flight {
    fn drop(&mut self) {
        if !self.answered {
            self.state.abandoned.fetch_add(1, Ordering::Relaxed);
        }
        let mut tracker = self.state.tracker.lock().expect("tracker");
        if let Some(flying) = tracker.in_flight.get_mut(&self.line) {
            flying.retain(|&(token, _, _)| token != self.token);
            if flying.is_empty() {
                tracker.in_flight.remove(&self.line);
            }
        }
    }
}

pub struct Receiver {
    state: Arc<State>,
    server: tokio::task::JoinHandle<()>,
}

/// Refusing to answer: hyper closes the connection when the service fails.
#[derive(Debug)]
struct Drop;

impl std::fmt::Display for Drop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped by a close fault")
    }
}

impl std::error::Error for Drop {}

/// The receiver's socket, bound before the endpoints are registered (their URLs need
/// the port) and served once their secrets are known.
pub struct Bound {
    listener: tokio::net::TcpListener,
    port: u16,
}

impl Bound {
    /// Binds 127.0.0.1 on a free port.
    pub async fn new() -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        Ok(Self { listener, port })
    }

    /// The URL of endpoint `ep`.
    pub fn url(&self, ep: usize) -> String {
        format!("http://127.0.0.1:{}/ep/{ep}", self.port)
    }

    /// Starts answering; `secrets[i]` is endpoint `i`'s signing secret.
    pub fn serve(self, secrets: &[String], seed: u64, clock: Clock) -> anyhow::Result<Receiver> {
        let verifiers = secrets
            .iter()
            .map(|s| standardwebhooks::Webhook::new(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("an endpoint secret is not usable: {e:?}"))?;
        let state = Arc::new(State {
            faults: Mutex::new((0..verifiers.len()).map(|_| None).collect()),
            verifiers,
            records: Mutex::new(Vec::new()),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            clock,
            tracker: Mutex::new(Tracker::default()),
            next_token: AtomicU64::new(0),
            ordered_requests: AtomicU64::new(0),
            abandoned: AtomicU64::new(0),
        });
        Ok(Receiver {
            server: tokio::spawn(serve(self.listener, Arc::clone(&state))),
            state,
        })
    }
}

impl Receiver {
    /// Applies `fault` to the endpoints in `eps` for `duration`.
    pub fn set_fault(&self, eps: &[usize], fault: Fault, duration: Duration) {
        let until = Instant::now() + duration;
        let mut faults = self.state.faults.lock().expect("faults");
        for &ep in eps {
            if let Some(slot) = faults.get_mut(ep) {
                *slot = Some(Active { fault, until });
            }
        }
    }

    /// Ends every fault: from now on every request is accepted at once.
    pub fn heal(&self) {
        for slot in self.state.faults.lock().expect("faults").iter_mut() {
            *slot = None;
        }
    }

    /// When event `event_id` was first processed at any endpoint (ms), if it was.
    pub fn processed_at(&self, event_id: i64) -> Option<u64> {
        self.state
            .records
            .lock()
            .expect("records")
            .iter()
            .filter(|r| r.event_id == Some(event_id) && r.fate.processed())
            .map(|r| r.at_ms)
            .min()
    }

    /// Everything received so far, in the order it was read.
    pub fn records(&self) -> Vec<Rec> {
        self.state.records.lock().expect("records").clone()
    }

    /// What the ordered lines saw so far.
    pub fn lines(&self) -> Lines {
        Lines {
            requests: self.state.ordered_requests.load(Ordering::Relaxed),
            abandoned: self.state.abandoned.load(Ordering::Relaxed),
            overlaps: self.state.tracker.lock().expect("tracker").overlaps.clone(),
        }
    }
}

impl std::ops::Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Drop> {
    let ep = req
        .uri()
        .path()
        .strip_prefix("/ep/")
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|n| *n < state.verifiers.len());
    let (parts, body) = req.into_parts();
    let event_id = parts
        .headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let mut rec = Rec {
        ep,
        event_id,
        uid: None,
        key: None,
        signed: false,
        at_ms: 0,
        fate: Fate::Incomplete,
    };
    let body = match body.collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => {
            rec.at_ms = state.clock.ms();
            state.records.lock().expect("records").push(rec);
            return Err(Drop);
        }
    };
    rec.at_ms = state.clock.ms();
    rec.signed = ep.is_some_and(|ep| state.verifiers[ep].verify(&body, &parts.headers).is_ok());
    let data = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .map(|mut v| v["data"].take());
    rec.uid = data.as_ref().and_then(|d| d["uid"].as_i64());
    rec.key = data
        .as_ref()
        .and_then(|d| d["key"].as_str())
        .map(str::to_owned);
    let mut flight = match (ep, &rec.key) {
        (Some(ep), Some(key)) => Some(Flight::begin(&state, ep, key.clone(), event_id)),
        _ => None,
    };

    let fault = ep.and_then(|ep| {
        let mut faults = state.faults.lock().expect("faults");
        match &faults[ep] {
            Some(active) if Instant::now() < active.until => Some(active.fault),
            Some(_) => {
                faults[ep] = None;
                None
            }
            None => None,
        }
    });
    let roll: f64 = state.rng.lock().expect("rng").random();
    let answer = match fault {
        Some(Fault::Status {
            status,
            retry_after,
            share,
        }) if roll < share => Answer::Status(status, retry_after),
        Some(Fault::Close { share }) if roll < share => Answer::Close,
        Some(Fault::Stall { delay }) => Answer::Stall(delay),
        _ => Answer::Ok,
    };
    rec.fate = match answer {
        Answer::Ok => Fate::Accepted,
        Answer::Stall(_) => Fate::Stalled,
        Answer::Status(status, _) => Fate::Refused(status),
        Answer::Close => Fate::Closed,
    };
    // Recorded before answering: what the consumer processed is known even if the
    // answer never reaches the dispatcher.
    state.records.lock().expect("records").push(rec);
    let mut response = Response::new(Full::new(Bytes::new()));
    match answer {
        Answer::Ok => {
            // The consumer's own work takes a little while, so requests overlap and
            // a fault finds some in flight.
            let work = state.rng.lock().expect("rng").random_range(0..WORK_MS);
            tokio::time::sleep(Duration::from_millis(work)).await;
            *response.status_mut() = StatusCode::NO_CONTENT;
        }
        Answer::Stall(delay) => {
            tokio::time::sleep(delay).await;
            *response.status_mut() = StatusCode::NO_CONTENT;
        }
        Answer::Status(status, retry_after) => {
            *response.status_mut() =
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            if let Some(seconds) = retry_after {
                response.headers_mut().insert(
                    hyper::header::RETRY_AFTER,
                    hyper::header::HeaderValue::from(seconds),
                );
            }
        }
        Answer::Close => {
            if let Some(flight) = &mut flight {
                flight.answered = true;
            }
            return Err(Drop);
        }
    }
    if let Some(flight) = &mut flight {
        flight.answered = true;
    }
    Ok(response)
}

enum Answer {
    Ok,
    Stall(Duration),
    Status(u16, Option<u32>),
    Close,
}
