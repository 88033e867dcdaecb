//! One HTTP attempt: build the Standard Webhooks request, send it, and describe what
//! came back. Never panics and never logs: every outcome is a value the caller records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use reqwest::header::{CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};

use crate::config::Config;
use crate::error::Result;
use crate::sign::{Secret, signature_header};
use crate::target::{ForbiddenTarget, GuardedResolver, is_forbidden};
use crate::time_format::PgTimestamp;

/// Bytes of a response body kept for inspection; the rest is never read.
pub const EXCERPT_BYTES: usize = 1024;

/// An endpoint's static headers, ready to send, shared by its deliveries. The values
/// are marked sensitive (kept out of HTTP/2 header compression tables and debug output).
pub type StaticHeaders = Arc<[(HeaderName, HeaderValue)]>;

/// An endpoint's stored `headers` column as [`StaticHeaders`], or why it cannot be
/// sent (a row written by hand, past the registration's checks). The reason names the
/// header, never its value.
pub fn static_headers(stored: &serde_json::Value) -> std::result::Result<StaticHeaders, String> {
    use serde::Deserialize as _;
    let headers = Vec::<crate::endpoint::StaticHeader>::deserialize(stored)
        .map_err(|_| "its endpoint's stored headers are not a list of {name, value}".to_owned())?;
    crate::endpoint::validate_headers(&headers)
        .map_err(|e| format!("its endpoint cannot be sent to: {e}"))?;
    headers
        .into_iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("its endpoint's header {:?} is not a valid name", h.name))?;
            let mut value = HeaderValue::from_str(&h.value)
                .map_err(|_| format!("its endpoint's header {:?} has an invalid value", h.name))?;
            value.set_sensitive(true);
            Ok((name, value))
        })
        .collect()
}

/// A claimed delivery, with everything needed to send it.
///
/// Its request body is shared: every delivery of one event in a claim holds the same
/// buffer, whatever the number of endpoints (only the signature differs per endpoint).
/// Its `Debug` output shows ids and sizes, never the payload, the URL or a secret.
#[derive(Clone)]
pub struct Delivery {
    /// The event's id; also the `webhook-id` header, identical on every retry and
    /// every endpoint, so consumers can deduplicate.
    pub event_id: i64,
    /// The endpoint it goes to.
    pub endpoint_id: i64,
    /// This attempt's number (1-based); also the lease token the outcome is settled with.
    pub attempt: i32,
    /// When the event was written (the body's `timestamp`), for latency figures; the
    /// Unix epoch when its row is gone.
    pub created_at: SystemTime,
    /// The request body, or why it cannot be built: then no request is made and the
    /// delivery is dead (see [`ErrorKind::Unbuildable`]).
    pub body: std::result::Result<Bytes, Unbuildable>,
    /// The endpoint's URL.
    pub url: String,
    /// The endpoint's signing secret, as stored.
    pub secret: String,
    /// The secret it replaced, while the rotation grace period lasts: the request then
    /// carries a signature from each.
    pub previous_secret: Option<String>,
    /// Attempts counted against the retry budget, this one included (the attempt number
    /// less those made before the last re-drive).
    pub tries: i32,
    /// The endpoint's static headers, sent after outboxd's own.
    pub headers: StaticHeaders,
    /// The endpoint's timeout override; the dispatcher's `WEBHOOK_HTTP_TIMEOUT_MS`
    /// when `None`. Capped below the lease by the [`Sender`].
    pub timeout: Option<Duration>,
    /// The head of an ordered line (an event with an `ordering_key`): when it ends, the
    /// next delivery of its key for this endpoint is made due, so its outcome is
    /// written at once.
    pub ordered: bool,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("event_id", &self.event_id)
            .field("endpoint_id", &self.endpoint_id)
            .field("attempt", &self.attempt)
            .field("body_bytes", &self.body.as_ref().map(|body| body.len()))
            .field("created_at", &self.created_at)
            .field("url_bytes", &self.url.len())
            .field("secret", &"<redacted>")
            .field(
                "previous_secret",
                &self.previous_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("tries", &self.tries)
            .field("headers", &self.headers.len())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Why a claimed delivery's request cannot be built: its event's or endpoint's row is
/// gone, or the payload is over the size limit. Such a delivery can never be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbuildable(pub Arc<str>);

impl std::fmt::Display for Unbuildable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The request body of an event: `{"id", "type", "timestamp", "data"}` with the
/// payload's JSON text verbatim. `payload` must be JSON (PostgreSQL's `jsonb` output).
pub fn body(event_id: i64, event_type: &str, created_at: PgTimestamp, payload: &str) -> Vec<u8> {
    let event_type = serde_json::Value::String(event_type.to_owned()).to_string();
    let head =
        format!(r#"{{"id":"{event_id}","type":{event_type},"timestamp":"{created_at}","data":"#);
    let mut body = Vec::with_capacity(head.len() + payload.len() + 1);
    body.extend_from_slice(head.as_bytes());
    body.extend_from_slice(payload.as_bytes());
    body.push(b'}');
    body
}

/// What an attempt produced. Its `Debug` output gives the excerpt's length, not the
/// receiver's words.
#[derive(Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The receiver answered (any status).
    Response {
        /// The HTTP status code.
        status: u16,
        /// A parsed `Retry-After`, if the receiver sent one.
        retry_after: Option<Duration>,
        /// The start of the response body, lossily decoded.
        excerpt: String,
    },
    /// No answer.
    Failed {
        /// Why, as a stable kind.
        kind: ErrorKind,
        /// A human-readable description.
        message: String,
    },
}

impl std::fmt::Debug for AttemptResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Response {
                status,
                retry_after,
                excerpt,
            } => f
                .debug_struct("Response")
                .field("status", status)
                .field("retry_after", retry_after)
                .field("excerpt_bytes", &excerpt.len())
                .finish(),
            Self::Failed { kind, message } => f
                .debug_struct("Failed")
                .field("kind", kind)
                .field("message", message)
                .finish(),
        }
    }
}

/// Why an attempt produced no answer. Stored as `error_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request did not finish within `WEBHOOK_HTTP_TIMEOUT_MS`.
    Timeout,
    /// The TCP or TLS connection could not be made.
    Connect,
    /// The SSRF guard refused the target's address. Terminal.
    RefusedTarget,
    /// The endpoint's URL or secret cannot be used. Terminal.
    InvalidEndpoint,
    /// The request cannot be built (see [`Unbuildable`]): no request was made.
    /// Terminal, and not held against the endpoint's health.
    Unbuildable,
    /// Anything else on the wire (reset, protocol error).
    Network,
    /// The attempt failed inside outboxd (its send task panicked): a bug, not the
    /// endpoint's fault. Terminal: retrying would meet the same bug; re-drive the
    /// delivery after upgrading.
    Internal,
}

impl ErrorKind {
    /// The value stored in `webhook_attempts.error_kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::RefusedTarget => "refused_target",
            Self::InvalidEndpoint => "invalid_endpoint",
            Self::Unbuildable => "unbuildable",
            Self::Network => "network",
            Self::Internal => "internal",
        }
    }
}

/// A finished attempt, ready to be recorded.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// When the request started.
    pub started_at: SystemTime,
    /// How long it took, to the end of the excerpt.
    pub duration: Duration,
    /// What came back.
    pub result: AttemptResult,
}

/// Sends webhooks over one shared keep-alive connection pool. Its `Debug` output leaves
/// out the endpoint URLs it has parsed.
pub struct Sender {
    client: reqwest::Client,
    allow_private: bool,
    /// The longest an endpoint's timeout override may make a request: a second under
    /// the lease (or `WEBHOOK_HTTP_TIMEOUT_MS`, if that is longer), so that an attempt
    /// ends, and its outcome can be recorded, before its row can be claimed again.
    max_timeout: Duration,
    /// Parsed endpoint URLs by their text. A burst sends thousands of requests to the
    /// same few URLs, and parsing each one again (IDNA host processing included) shows
    /// in a profile of a burst (docs/performance.md).
    urls: Mutex<HashMap<String, reqwest::Url>>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cached = self.urls.lock().map_or(0, |urls| urls.len());
        f.debug_struct("Sender")
            .field("allow_private", &self.allow_private)
            .field("cached_urls", &cached)
            .finish_non_exhaustive()
    }
}

/// Most URLs [`Sender`] keeps parsed; the cache starts over when it is full.
const URL_CACHE_ENTRIES: usize = 1024;

impl Sender {
    /// Builds the HTTP client: no redirects, no proxies (a proxy would connect on our
    /// behalf and bypass the address guard), a per-request timeout, and the guarded
    /// resolver unless private targets are allowed.
    pub fn new(config: &Config) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(config.http_timeout)
            .connect_timeout(config.http_timeout.min(Duration::from_secs(10)))
            .pool_max_idle_per_host(config.concurrency as usize)
            .tcp_nodelay(true)
            .user_agent(concat!("outboxd/", env!("CARGO_PKG_VERSION")));
        if !config.allow_private_targets {
            builder = builder.dns_resolver(GuardedResolver::shared());
        }
        Ok(Self {
            client: builder.build()?,
            allow_private: config.allow_private_targets,
            max_timeout: config
                .lease
                .saturating_sub(Duration::from_secs(1))
                .max(config.http_timeout),
            urls: Mutex::new(HashMap::new()),
        })
    }

    /// Parses `text`, or returns the copy parsed earlier.
    fn parse_url(&self, text: &str) -> std::result::Result<reqwest::Url, url::ParseError> {
        let lock = || {
            self.urls
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        if let Some(url) = lock().get(text) {
            return Ok(url.clone());
        }
        let url = reqwest::Url::parse(text)?;
        let mut urls = lock();
        if urls.len() >= URL_CACHE_ENTRIES {
            urls.clear();
        }
        urls.insert(text.to_owned(), url.clone());
        Ok(url)
    }

    /// Makes one attempt. The `webhook-timestamp` is this attempt's time, as the spec
    /// requires (verifiers reject stale timestamps).
    pub async fn send(&self, delivery: &Delivery) -> Attempt {
        let started_at = SystemTime::now();
        let clock = Instant::now();
        let result = self.attempt(delivery, started_at).await;
        Attempt {
            started_at,
            duration: clock.elapsed(),
            result,
        }
    }

    async fn attempt(&self, delivery: &Delivery, now: SystemTime) -> AttemptResult {
        // First: a delivery whose endpoint row is gone has no URL to judge.
        let body = match &delivery.body {
            Ok(body) => body.clone(),
            Err(reason) => {
                return AttemptResult::Failed {
                    kind: ErrorKind::Unbuildable,
                    message: reason.to_string(),
                };
            }
        };
        let invalid = |message: String| AttemptResult::Failed {
            kind: ErrorKind::InvalidEndpoint,
            message,
        };
        let url = match self.parse_url(&delivery.url) {
            Ok(url) => url,
            Err(e) => return invalid(format!("endpoint URL cannot be parsed: {e}")),
        };
        let mut secrets = Vec::with_capacity(2);
        for secret in std::iter::once(&delivery.secret).chain(&delivery.previous_secret) {
            match Secret::parse(secret) {
                Ok(secret) => secrets.push(secret),
                Err(e) => return invalid(format!("endpoint secret cannot be used: {e}")),
            }
        }
        // An IP literal never reaches the resolver, so it is checked here.
        if !self.allow_private {
            let literal = match url.host() {
                Some(url::Host::Ipv4(ip)) => Some(ip.into()),
                Some(url::Host::Ipv6(ip)) => Some(ip.into()),
                _ => None,
            };
            if let Some(ip) = literal.filter(|ip| is_forbidden(*ip)) {
                return AttemptResult::Failed {
                    kind: ErrorKind::RefusedTarget,
                    message: ForbiddenTarget(ip).to_string(),
                };
            }
        }
        let msg_id = delivery.event_id.to_string();
        let timestamp = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let signature = signature_header(&secrets, &msg_id, timestamp, &body);
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
            .header("webhook-id", msg_id)
            .header("webhook-timestamp", timestamp)
            .header("webhook-signature", signature)
            .body(body);
        for (name, value) in delivery.headers.iter() {
            request = request.header(name, value);
        }
        if let Some(timeout) = delivery.timeout {
            request = request.timeout(timeout.min(self.max_timeout));
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, SystemTime::now()));
                let excerpt = read_excerpt(response).await;
                AttemptResult::Response {
                    status,
                    retry_after,
                    excerpt,
                }
            }
            Err(e) => AttemptResult::Failed {
                kind: classify(&e),
                message: describe(e),
            },
        }
    }
}

/// Reads at most [`EXCERPT_BYTES`] of the body; a receiver cannot make us buffer more.
async fn read_excerpt(mut response: reqwest::Response) -> String {
    let mut buf = Vec::new();
    while buf.len() < EXCERPT_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            Ok(None) | Err(_) => break,
        }
    }
    buf.truncate(EXCERPT_BYTES);
    // PostgreSQL text cannot hold NUL: one would fail the whole settle batch, forever.
    String::from_utf8_lossy(&buf).replace('\0', "\u{FFFD}")
}

fn classify(e: &reqwest::Error) -> ErrorKind {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<ForbiddenTarget>() {
            return ErrorKind::RefusedTarget;
        }
        source = err.source();
    }
    if e.is_timeout() {
        ErrorKind::Timeout
    } else if e.is_connect() {
        ErrorKind::Connect
    } else {
        ErrorKind::Network
    }
}

/// The error and its causes on one line, without the URL (it may carry a token).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(err) = source {
        text.push_str(": ");
        text.push_str(&err.to_string());
        source = err.source();
    }
    text
}

/// Parses a `Retry-After` value: delta-seconds or an HTTP date (relative to `now`).
fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_retry_after_forms() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(30))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn url_cache_agrees_with_parsing_and_stays_bounded() {
        let sender = Sender::new(&Config::default()).unwrap();
        for i in 0..URL_CACHE_ENTRIES + 10 {
            let text = format!("https://Example.COM:443/hooks/{i}?a=%41");
            let parsed = reqwest::Url::parse(&text).unwrap();
            assert_eq!(sender.parse_url(&text).unwrap(), parsed);
            // Kept (the cache starts over when full, so look right away), and the
            // second answer, from the cache, is the same.
            assert!(sender.urls.lock().unwrap().contains_key(&text));
            assert_eq!(sender.parse_url(&text).unwrap(), parsed);
        }
        assert!(sender.urls.lock().unwrap().len() <= URL_CACHE_ENTRIES);
        assert!(sender.parse_url("not a url").is_err());
        assert!(!sender.urls.lock().unwrap().contains_key("not a url"));
    }

    #[test]
    fn body_embeds_the_payload_verbatim() {
        let created_at = PgTimestamp::from_system_time(
            UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456),
        );
        let body = body(42, "order.\"created\"", created_at, r#"{"order_id": 42}"#);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"id":"42","type":"order.\"created\"","timestamp":"2023-11-14T22:13:20.123456Z","data":{"order_id": 42}}"#
        );
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["data"]["order_id"], 42);
    }

    #[test]
    fn debug_shows_neither_secrets_nor_payload() {
        let delivery = Delivery {
            event_id: 42,
            endpoint_id: 1,
            attempt: 1,
            created_at: UNIX_EPOCH,
            body: Ok(Bytes::from_static(b"{\"data\":\"payload-text\"}")),
            url: "https://example.com/hook?token=url-token".into(),
            secret: "whsec_c2VjcmV0LXNlY3JldA==".into(),
            previous_secret: Some("whsec_b2xkLXNlY3JldA==".into()),
            tries: 1,
            headers: Arc::from([]),
            timeout: None,
            ordered: false,
        };
        let shown = format!("{delivery:?}");
        for hidden in ["payload-text", "url-token", "c2VjcmV0", "b2xk"] {
            assert!(!shown.contains(hidden), "{shown}");
        }
        assert!(shown.contains("event_id: 42"), "{shown}");
    }

    #[tokio::test]
    async fn an_unbuildable_delivery_makes_no_request() {
        let sender = Sender::new(&Config::default()).unwrap();
        let delivery = Delivery {
            event_id: 42,
            endpoint_id: 1,
            attempt: 1,
            created_at: UNIX_EPOCH,
            body: Err(Unbuildable("its event's row no longer exists".into())),
            // Nothing listens here, and a request would be refused anyway.
            url: String::new(),
            secret: String::new(),
            previous_secret: None,
            tries: 1,
            headers: Arc::from([]),
            timeout: None,
            ordered: false,
        };
        let attempt = sender.send(&delivery).await;
        assert_eq!(
            attempt.result,
            AttemptResult::Failed {
                kind: ErrorKind::Unbuildable,
                message: "its event's row no longer exists".into(),
            }
        );
    }
}
