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

struct State {
    verifiers: Vec<standardwebhooks::Webhook>,
    faults: Mutex<Vec<Option<Active>>>,
    records: Mutex<Vec<Rec>>,
    rng: Mutex<StdRng>,
    clock: Clock,
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

    /// Everything received so far.
    pub fn records(&self) -> Vec<Rec> {
        self.state.records.lock().expect("records").clone()
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
    rec.uid = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["uid"].as_i64());

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
        Answer::Close => return Err(Drop),
    }
    Ok(response)
}

enum Answer {
    Ok,
    Stall(Duration),
    Status(u16, Option<u32>),
    Close,
}
