//! The operator commands: endpoints, deliveries, dead letters, replay and stats. Human
//! tables by default, `--json` for scripts; exit statuses as documented in `main.rs`.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use outboxd::endpoint::{
    self, DeadHead, EndpointUpdate, MAX_IN_FLIGHT_RANGE, RATE_LIMIT_RANGE, StaticHeader,
};
use outboxd::inspect::{self, BlockedFilter, DeliveryFilter, DeliveryId, DeliveryView, Page};
use outboxd::redrive::{self, DeadFilter, KeyAction};
use outboxd::{Error, NewEndpoint};
use tokio_postgres::Client;

use crate::parse_time;
use crate::settings::{DEFAULT_ROTATION_GRACE, parse_grace};

/// Exit status when a command found nothing to do (e.g. retrying deliveries that are
/// not dead).
const NOTHING_DONE: u8 = 4;

// No Debug: `add` and `rotate-secret` carry a secret.
#[derive(Subcommand)]
pub enum EndpointCommand {
    /// Register an endpoint; prints its id and signing secret (shown only here)
    Add {
        /// http(s) URL deliveries are POSTed to
        #[arg(long)]
        url: String,
        /// Event-type filter: an exact name, a prefix such as order.*, or *; repeatable; none means every event
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// Signing secret (whsec_ + base64 of 24 to 64 bytes); generated when omitted
        #[arg(long, env = "ENDPOINT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Free text for operators
        #[arg(long, default_value = "")]
        description: String,
        /// Header sent with every request, as 'Name: value' (an API key the consumer demands); repeatable. Its value is never shown again. From the environment: one per line
        #[arg(
            long = "header",
            env = "ENDPOINT_HEADERS",
            hide_env_values = true,
            value_delimiter = '\n'
        )]
        headers: Vec<String>,
        /// Request timeout for this endpoint in milliseconds, instead of WEBHOOK_HTTP_TIMEOUT_MS (each dispatcher keeps it under its lease)
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Most concurrent requests to this endpoint across all dispatchers, 1 to 10000 (default: each dispatcher's WEBHOOK_ENDPOINT_MAX_IN_FLIGHT)
        #[arg(
            long,
            value_name = "N",
            allow_negative_numbers = true,
            value_parser = max_in_flight
        )]
        max_in_flight: Option<u32>,
        /// Most requests per second to this endpoint across all dispatchers, 1 to 100000 (default: no limit)
        #[arg(
            long,
            value_name = "N",
            allow_negative_numbers = true,
            value_parser = rate_limit
        )]
        rate_limit: Option<u32>,
        /// What a dead head of an ordered key does for this endpoint: block (the key waits for an operator), skip (the next goes), or default (WEBHOOK_ORDERING_DEAD_HEAD)
        #[arg(long, value_name = "POLICY", value_parser = dead_head)]
        ordering_dead_head: Option<DeadHeadArg>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List endpoints
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Show one endpoint
    Show {
        /// Endpoint id
        id: i64,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Change an endpoint's URL, filters, description, headers, timeout or limits
    Update {
        /// Endpoint id
        id: i64,
        /// New URL
        #[arg(long)]
        url: Option<String>,
        /// New filters (replace the old ones); repeatable
        #[arg(long = "event-type", conflicts_with = "all_event_types")]
        event_types: Vec<String>,
        /// Remove every filter: the endpoint receives every event
        #[arg(long)]
        all_event_types: bool,
        /// New description
        #[arg(long)]
        description: Option<String>,
        /// New static headers, replacing all of them, as 'Name: value'; repeatable. From the environment: one per line
        #[arg(
            long = "header",
            env = "ENDPOINT_HEADERS",
            hide_env_values = true,
            value_delimiter = '\n',
            conflicts_with = "clear_headers"
        )]
        headers: Vec<String>,
        /// Remove every static header
        #[arg(long)]
        clear_headers: bool,
        /// New request timeout in milliseconds; 0 removes the override (WEBHOOK_HTTP_TIMEOUT_MS applies)
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// New limit of concurrent requests across all dispatchers, 1 to 10000
        #[arg(
            long,
            value_name = "N",
            allow_negative_numbers = true,
            value_parser = max_in_flight,
            conflicts_with = "clear_max_in_flight"
        )]
        max_in_flight: Option<u32>,
        /// Remove the concurrency limit: each dispatcher's WEBHOOK_ENDPOINT_MAX_IN_FLIGHT applies
        #[arg(long)]
        clear_max_in_flight: bool,
        /// New limit of requests per second across all dispatchers, 1 to 100000
        #[arg(
            long,
            value_name = "N",
            allow_negative_numbers = true,
            value_parser = rate_limit,
            conflicts_with = "clear_rate_limit"
        )]
        rate_limit: Option<u32>,
        /// Remove the rate limit
        #[arg(long)]
        clear_rate_limit: bool,
        /// What a dead head of an ordered key does for this endpoint: block (the key waits for an operator), skip (the next goes), or default (WEBHOOK_ORDERING_DEAD_HEAD)
        #[arg(long, value_name = "POLICY", value_parser = dead_head)]
        ordering_dead_head: Option<DeadHeadArg>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Replace the signing secret; the old one keeps signing beside it for the grace period
    RotateSecret {
        /// Endpoint id
        id: i64,
        /// The new secret; generated when omitted
        #[arg(long, env = "ENDPOINT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// How long the old secret keeps signing, e.g. 24h
        #[arg(long, env = "WEBHOOK_SECRET_ROTATION_GRACE", default_value = DEFAULT_ROTATION_GRACE, value_parser = parse_grace)]
        grace: Duration,
    },
    /// Stop deliveries to an endpoint; its pending deliveries, and those of new events, are parked
    Disable {
        /// Endpoint id
        id: i64,
        /// Why, recorded as disabled_reason
        #[arg(long, default_value = "disabled by operator")]
        reason: String,
    },
    /// Resume an endpoint; its parked deliveries (also those of events enqueued while it was disabled) become due at once
    Enable {
        /// Endpoint id
        id: i64,
        /// Discard the parked deliveries instead (state discarded, never sent; replay sends one again)
        #[arg(long)]
        discard_backlog: bool,
    },
    /// Remove an endpoint (its history is kept; pending deliveries are parked)
    Remove {
        /// Endpoint id
        id: i64,
    },
    /// Send a test event (outboxd.test) to this endpoint only
    Test {
        /// Endpoint id
        id: i64,
    },
    /// Close an endpoint's open (or half-open) circuit by hand: its due deliveries then go out at once, and its count of consecutive failures starts over
    CloseCircuit {
        /// Endpoint id
        id: i64,
    },
}

/// `--max-in-flight`: in range, or clap's error naming the option (exit status 2).
fn max_in_flight(text: &str) -> Result<u32, String> {
    limit(text, "max_in_flight", &MAX_IN_FLIGHT_RANGE)
}

/// `--ordering-dead-head`'s value: a policy, or `None` for `default` (the dispatchers'
/// `WEBHOOK_ORDERING_DEAD_HEAD`). A type of its own: clap reads `Option<Option<_>>` as
/// a flag whose value may be left out.
#[derive(Debug, Clone, Copy)]
pub struct DeadHeadArg(Option<DeadHead>);

/// `--ordering-dead-head`: `block`, `skip`, or `default`; anything else is clap's error
/// (exit status 2).
fn dead_head(text: &str) -> Result<DeadHeadArg, String> {
    match text {
        "default" => Ok(DeadHeadArg(None)),
        _ => text
            .parse()
            .map(|policy| DeadHeadArg(Some(policy)))
            .map_err(|_| "ordering_dead_head must be block, skip or default".to_owned()),
    }
}

/// `--rate-limit`: in range, or clap's error naming the option (exit status 2).
fn rate_limit(text: &str) -> Result<u32, String> {
    limit(text, "rate_limit", &RATE_LIMIT_RANGE)
}

/// A limit, checked by the library's rule so the CLI and the API refuse the same values.
fn limit(
    text: &str,
    field: &'static str,
    range: &std::ops::RangeInclusive<u32>,
) -> Result<u32, String> {
    let value: u64 = text.parse().map_err(|_| {
        format!(
            "{field} must be a whole number between {} and {}",
            range.start(),
            range.end()
        )
    })?;
    endpoint::validate_limit(field, value, range).map_err(|e| e.to_string())
}

/// Filters shared by the delivery listings.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Only this endpoint's deliveries
    #[arg(long = "endpoint")]
    endpoint_id: Option<i64>,
    /// Only this event type (exact)
    #[arg(long)]
    event_type: Option<String>,
    /// Created at or after this RFC 3339 time
    #[arg(long, value_parser = parse_time)]
    since: Option<SystemTime>,
    /// Created before this RFC 3339 time
    #[arg(long, value_parser = parse_time)]
    until: Option<SystemTime>,
    /// Continue after this cursor (printed at the end of the previous page)
    #[arg(long)]
    after: Option<String>,
    /// Page size, 1 to 1000
    #[arg(long, default_value_t = inspect::DEFAULT_PAGE)]
    limit: u32,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first
    List {
        /// pending, inflight, delivered, dead, parked, discarded or queued
        #[arg(long)]
        state: Option<String>,
        #[command(flatten)]
        list: ListArgs,
    },
    /// Show a delivery (EVENT_ID:ENDPOINT_ID) with its attempt history
    Show {
        /// EVENT_ID:ENDPOINT_ID
        id: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Send dead deliveries again, with a fresh retry budget
    Retry {
        /// EVENT_ID:ENDPOINT_ID, one or more
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadCommand {
    /// List dead deliveries, newest first
    List {
        #[command(flatten)]
        list: ListArgs,
    },
    /// Send dead deliveries again: the given ids, or --all matching the filters
    Retry {
        /// EVENT_ID:ENDPOINT_ID, one or more
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Every dead delivery matching --endpoint/--event-type/--since
        #[arg(long)]
        all: bool,
        /// With --all: only this endpoint's
        #[arg(long = "endpoint", requires = "all")]
        endpoint_id: Option<i64>,
        /// With --all: only this event type's
        #[arg(long, requires = "all")]
        event_type: Option<String>,
        /// With --all: only those that died at or after this RFC 3339 time
        #[arg(long, value_parser = parse_time, requires = "all")]
        since: Option<SystemTime>,
    },
}

pub async fn endpoint(client: &mut Client, command: EndpointCommand) -> anyhow::Result<ExitCode> {
    let client = &mut *client;
    match command {
        EndpointCommand::Add {
            url,
            event_types,
            secret,
            description,
            headers,
            timeout_ms,
            max_in_flight,
            rate_limit,
            ordering_dead_head,
            json,
        } => {
            let new = NewEndpoint {
                url,
                event_types,
                secret,
                description,
                headers: parse_headers(&headers)?,
                timeout: timeout_ms.map(Duration::from_millis),
                max_in_flight,
                rate_limit,
                ordering_dead_head: ordering_dead_head.and_then(|arg| arg.0),
            };
            let (endpoint, secret) = endpoint::add(&*client, new).await?;
            if json {
                let mut value = serde_json::to_value(&endpoint)?;
                value["secret"] = serde_json::Value::String(secret);
                println!("{value}");
            } else {
                println!("id: {}", endpoint.id);
                println!("secret: {secret}");
                println!("url: {}", endpoint.url);
                println!("event_types: {}", filters(&endpoint.event_types));
                print_limits(&endpoint);
            }
        }
        EndpointCommand::List { json } => {
            let endpoints = endpoint::list(&*client).await?;
            if json {
                println!("{}", serde_json::to_string(&endpoints)?);
            } else {
                let circuits: Vec<String> =
                    endpoints.iter().map(|e| e.circuit.to_string()).collect();
                let width = circuits.iter().map(String::len).max().unwrap_or(0);
                println!(
                    "{:>6}  {:<8}  {:<24}  {:>9}  {:>6}  {:<9}  {:<width$}  URL",
                    "ID", "STATE", "EVENT TYPES", "IN FLIGHT", "RATE/S", "DEAD HEAD", "CIRCUIT"
                );
                for (e, circuit) in endpoints.iter().zip(&circuits) {
                    println!(
                        "{:>6}  {:<8}  {:<24}  {:>9}  {:>6}  {:<9}  {:<width$}  {}",
                        e.id,
                        if e.active { "active" } else { "disabled" },
                        filters(&e.event_types),
                        or_dash(e.max_in_flight),
                        or_dash(e.rate_limit),
                        or_dash(e.ordering_dead_head),
                        circuit,
                        e.url
                    );
                }
            }
        }
        EndpointCommand::Show { id, json } => {
            let e = endpoint::get(&*client, id).await?;
            print_endpoint(&e, json)?;
        }
        EndpointCommand::Update {
            id,
            url,
            event_types,
            all_event_types,
            description,
            headers,
            clear_headers,
            timeout_ms,
            max_in_flight,
            clear_max_in_flight,
            rate_limit,
            clear_rate_limit,
            ordering_dead_head,
            json,
        } => {
            let event_types = if all_event_types {
                Some(Vec::new())
            } else {
                (!event_types.is_empty()).then_some(event_types)
            };
            let headers = if clear_headers {
                Some(Vec::new())
            } else {
                (!headers.is_empty())
                    .then(|| parse_headers(&headers))
                    .transpose()?
            };
            let timeout = timeout_ms.map(|ms| (ms > 0).then(|| Duration::from_millis(ms)));
            let change = EndpointUpdate {
                url,
                event_types,
                description,
                active: None,
                headers,
                timeout,
                max_in_flight: if clear_max_in_flight {
                    Some(None)
                } else {
                    max_in_flight.map(Some)
                },
                rate_limit: if clear_rate_limit {
                    Some(None)
                } else {
                    rate_limit.map(Some)
                },
                ordering_dead_head: ordering_dead_head.map(|arg| arg.0),
            };
            let e = endpoint::update(&*client, id, change).await?;
            print_endpoint(&e, json)?;
        }
        EndpointCommand::RotateSecret { id, secret, grace } => {
            let secret = endpoint::rotate_secret(&*client, id, secret, grace).await?;
            println!("secret: {secret}");
            println!(
                "the previous secret keeps signing for {}",
                humantime::format_duration(grace)
            );
        }
        EndpointCommand::Disable { id, reason } => {
            let parked = endpoint::disable(&*client, id, &reason).await?;
            println!("endpoint {id} disabled; {parked} pending deliveries parked");
        }
        EndpointCommand::Enable {
            id,
            discard_backlog: false,
        } => {
            let resumed = endpoint::enable(&*client, id).await?;
            println!("endpoint {id} enabled; {resumed} parked deliveries resumed");
        }
        EndpointCommand::Enable {
            id,
            discard_backlog: true,
        } => {
            let discarded = endpoint::enable_discarding_backlog(client, id).await?;
            println!(
                "endpoint {id} enabled; {discarded} parked deliveries discarded \
                 (ordered ones queued behind them included)"
            );
        }
        EndpointCommand::Remove { id } => {
            endpoint::remove(&*client, id).await?;
            println!("endpoint {id} removed");
        }
        EndpointCommand::Test { id } => {
            let delivery = redrive::send_test(&*client, id).await?;
            println!("test delivery {delivery} queued");
        }
        EndpointCommand::CloseCircuit { id } => {
            if endpoint::close_circuit(&*client, id).await? {
                println!("endpoint {id}: circuit closed; its due deliveries go out now");
            } else {
                println!("endpoint {id}: circuit was already closed; failures count from 0");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_endpoint(e: &outboxd::Endpoint, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    println!("id: {}", e.id);
    println!("url: {}", e.url);
    println!("event_types: {}", filters(&e.event_types));
    println!("description: {}", e.description);
    if !e.headers.is_empty() {
        // The values are never read back: only the names can be shown.
        println!("headers: {}", e.headers.join(", "));
    }
    if let Some(ms) = e.timeout_ms {
        println!("timeout_ms: {ms}");
    }
    print_limits(e);
    if let Some(policy) = e.ordering_dead_head {
        println!("ordering_dead_head: {policy}");
    }
    println!("circuit: {}", e.circuit);
    if e.circuit_failures > 0 {
        println!("circuit_failures: {}", e.circuit_failures);
    }
    println!("active: {}", e.active);
    if let Some(reason) = &e.disabled_reason {
        println!("disabled_reason: {reason}");
    }
    if let Some(since) = e.failing_since {
        println!(
            "failing_since: {}",
            humantime::format_rfc3339_seconds(since)
        );
    }
    if let Some(until) = e.previous_secret_expires_at {
        println!(
            "previous_secret_signs_until: {}",
            humantime::format_rfc3339_seconds(until)
        );
    }
    Ok(())
}

/// The limits that are set (an unset one is the dispatchers' default, or none).
fn print_limits(e: &outboxd::Endpoint) {
    if let Some(n) = e.max_in_flight {
        println!("max_in_flight: {n}");
    }
    if let Some(n) = e.rate_limit {
        println!("rate_limit: {n}/s");
    }
}

/// A setting in a table: `-` when unset.
fn or_dash(limit: Option<impl ToString>) -> String {
    limit.map_or_else(|| "-".to_owned(), |n| n.to_string())
}

/// `--header 'Name: value'` options, parsed here rather than by clap, whose error
/// would repeat the value. The error names the header, never the value.
fn parse_headers(texts: &[String]) -> Result<Vec<StaticHeader>, Error> {
    let headers = texts
        .iter()
        .map(|text| StaticHeader::parse(text))
        .collect::<Result<Vec<_>, _>>()?;
    outboxd::endpoint::validate_headers(&headers)?;
    Ok(headers)
}

fn filters(event_types: &[String]) -> String {
    if event_types.is_empty() {
        "*".to_owned()
    } else {
        event_types.join(",")
    }
}

fn delivery_filter(state: Option<String>, list: &ListArgs) -> Result<DeliveryFilter, Error> {
    Ok(DeliveryFilter {
        state,
        endpoint_id: list.endpoint_id,
        event_type: list.event_type.clone(),
        since: list.since,
        until: list.until,
        after: list.after.as_deref().map(str::parse).transpose()?,
        limit: Some(list.limit),
    })
}

fn print_deliveries(page: &Page<DeliveryView>, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(page)?);
        return Ok(());
    }
    println!(
        "{:<14}  {:<24}  {:<9}  {:>8}  {:>6}  LAST ERROR",
        "ID", "EVENT TYPE", "STATE", "ATTEMPTS", "STATUS"
    );
    for d in &page.items {
        println!(
            "{:<14}  {:<24}  {:<9}  {:>8}  {:>6}  {}",
            d.id.to_string(),
            d.event_type,
            d.state,
            d.attempts,
            d.last_status.map(|s| s.to_string()).unwrap_or_default(),
            d.last_error.as_deref().unwrap_or("")
        );
    }
    if let Some(cursor) = &page.next_cursor {
        println!("more: --after {cursor}");
    }
    Ok(())
}

fn parse_ids(ids: &[String]) -> Result<Vec<DeliveryId>, Error> {
    ids.iter().map(|id| id.parse()).collect()
}

/// Prints what was retried and reports [`NOTHING_DONE`] for ids that were not dead.
fn report_retried(asked: &[DeliveryId], retried: &[DeliveryId]) -> ExitCode {
    for id in retried {
        println!("retrying {id}");
    }
    let skipped: Vec<String> = asked
        .iter()
        .filter(|id| !retried.contains(id))
        .map(ToString::to_string)
        .collect();
    if skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("not dead (left as they are): {}", skipped.join(", "));
        ExitCode::from(NOTHING_DONE)
    }
}

pub async fn deliveries(client: &Client, command: DeliveriesCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeliveriesCommand::List { state, list } => {
            let page = inspect::list_deliveries(client, &delivery_filter(state, &list)?).await?;
            print_deliveries(&page, list.json)?;
        }
        DeliveriesCommand::Show { id, json } => {
            let detail = inspect::get_delivery(client, id.parse()?).await?;
            if json {
                println!("{}", serde_json::to_string(&detail)?);
            } else {
                let d = &detail.delivery;
                println!("delivery {}  ({}, {})", d.id, d.event_type, d.state);
                if let (Some(key), Some(seq)) = (&d.ordering_key, d.ordering_seq) {
                    println!("ordering key: {key:?}, number {seq}");
                }
                println!("attempts: {}", d.attempts);
                if let Some(at) = d.next_attempt_at {
                    println!("next attempt: {}", humantime::format_rfc3339_seconds(at));
                }
                println!(
                    "{:>7}  {:<20}  {:>8}  {:>6}  ERROR / RESPONSE",
                    "ATTEMPT", "STARTED", "MS", "STATUS"
                );
                for a in &detail.attempt_history {
                    let what = a
                        .error
                        .as_deref()
                        .or(a.response_excerpt.as_deref())
                        .unwrap_or("");
                    println!(
                        "{:>7}  {:<20}  {:>8}  {:>6}  {}",
                        a.attempt,
                        humantime::format_rfc3339_seconds(a.started_at).to_string(),
                        a.duration_ms,
                        a.status_code.map(|s| s.to_string()).unwrap_or_default(),
                        what.replace('\n', " ")
                    );
                }
            }
        }
        DeliveriesCommand::Retry { ids } => {
            let ids = parse_ids(&ids)?;
            let retried = redrive::retry_dead(client, &ids).await?;
            return Ok(report_retried(&ids, &retried));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn dead(client: &Client, command: DeadCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadCommand::List { list } => {
            let filter = delivery_filter(Some("dead".to_owned()), &list)?;
            let page = inspect::list_deliveries(client, &filter).await?;
            print_deliveries(&page, list.json)?;
            Ok(ExitCode::SUCCESS)
        }
        DeadCommand::Retry {
            ids,
            all,
            endpoint_id,
            event_type,
            since,
        } => {
            if all {
                let filter = DeadFilter {
                    endpoint_id,
                    event_type,
                    since,
                    until: None,
                };
                let retried = redrive::retry_dead_matching(client, &filter).await?;
                println!("retrying {} dead deliveries", retried.len());
                Ok(if retried.is_empty() {
                    ExitCode::from(NOTHING_DONE)
                } else {
                    ExitCode::SUCCESS
                })
            } else {
                let ids = parse_ids(&ids)?;
                let retried = redrive::retry_dead(client, &ids).await?;
                Ok(report_retried(&ids, &retried))
            }
        }
    }
}

pub async fn replay(
    client: &Client,
    event_id: i64,
    endpoint_id: Option<i64>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let restarted = redrive::replay(client, event_id, endpoint_id).await?;
    if json {
        println!("{}", serde_json::json!({ "deliveries": restarted }));
    } else if restarted.is_empty() {
        println!("nothing to replay: the deliveries are still pending or in flight");
    } else {
        for id in &restarted {
            println!("replaying {id}");
        }
    }
    Ok(if restarted.is_empty() {
        ExitCode::from(NOTHING_DONE)
    } else {
        ExitCode::SUCCESS
    })
}

pub async fn stats(client: &Client, json: bool) -> anyhow::Result<ExitCode> {
    let stats = inspect::stats(client).await?;
    if json {
        println!("{}", serde_json::to_string(&stats)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("queue:");
    for (state, n) in &stats.depth {
        println!("  {state:<12} {n}");
    }
    println!(
        "oldest pending: {}",
        humantime::format_duration(Duration::from_secs(stats.oldest_pending_age_seconds as u64))
    );
    println!(
        "last hour: {} delivered, {} failed attempts",
        stats.delivered_last_hour, stats.failed_last_hour
    );
    println!(
        "\n{:>6}  {:<8}  {:>8}  {:>6}  {:>6}  {:>8}  {:>6}  {:>7}  {:>9}  {:>9}  URL",
        "ID",
        "STATE",
        "PENDING",
        "DEAD",
        "PARKED",
        "QUEUED",
        "KEYS",
        "BLOCKED",
        "OK/1H",
        "FAILED/1H"
    );
    for e in &stats.endpoints {
        println!(
            "{:>6}  {:<8}  {:>8}  {:>6}  {:>6}  {:>8}  {:>6}  {:>7}  {:>9}  {:>9}  {}",
            e.endpoint_id,
            if e.active { "active" } else { "disabled" },
            e.pending,
            e.dead,
            e.parked,
            e.queued,
            e.ordering_keys,
            e.blocked_keys,
            e.delivered_last_hour,
            e.failed_last_hour,
            e.url
        );
    }
    let blocked: Vec<_> = stats
        .endpoints
        .iter()
        .filter_map(|e| Some((e.endpoint_id, e.blocked_keys, e.oldest_blocked_since?)))
        .collect();
    if !blocked.is_empty() {
        println!();
        for (id, keys, since) in blocked {
            println!(
                "endpoint {id}: {keys} ordered keys blocked, the oldest since {} \
                 (outboxd ordering blocked --endpoint {id})",
                humantime::format_rfc3339_seconds(since)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Subcommand)]
pub enum OrderingCommand {
    /// List an endpoint's ordered keys blocked behind a dead head (the block policy), by key
    Blocked {
        /// Endpoint id
        #[arg(long = "endpoint")]
        endpoint_id: i64,
        /// Continue after this key (printed at the end of the previous page)
        #[arg(long)]
        after: Option<String>,
        /// Page size, 1 to 1000
        #[arg(long, default_value_t = inspect::DEFAULT_PAGE)]
        limit: u32,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Send a blocked key's dead head again (fresh retry budget); the key resumes in order behind it
    Redrive {
        /// Endpoint id
        #[arg(long = "endpoint")]
        endpoint_id: i64,
        /// The ordering key
        #[arg(long)]
        key: String,
    },
    /// Discard a blocked key's dead head (never sent, unless replayed); the key's next event goes
    Discard {
        /// Endpoint id
        #[arg(long = "endpoint")]
        endpoint_id: i64,
        /// The ordering key
        #[arg(long)]
        key: String,
    },
}

pub async fn ordering(client: &mut Client, command: OrderingCommand) -> anyhow::Result<ExitCode> {
    let (endpoint_id, key, action, verb) = match command {
        OrderingCommand::Blocked {
            endpoint_id,
            after,
            limit,
            json,
        } => {
            let filter = BlockedFilter {
                endpoint_id,
                after,
                limit: Some(limit),
            };
            let page = inspect::list_blocked(&*client, &filter).await?;
            if json {
                println!("{}", serde_json::to_string(&page)?);
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24}  {:<14}  {:<20}  {:>8}",
                "KEY", "HEAD", "BLOCKED SINCE", "QUEUED"
            );
            for k in &page.items {
                println!(
                    "{:<24}  {:<14}  {:<20}  {:>8}",
                    k.ordering_key,
                    k.head.to_string(),
                    humantime::format_rfc3339_seconds(k.blocked_since).to_string(),
                    k.queued
                );
            }
            if let Some(cursor) = &page.next_cursor {
                println!("more: --after {cursor:?}");
            }
            return Ok(ExitCode::SUCCESS);
        }
        OrderingCommand::Redrive { endpoint_id, key } => {
            let done = redrive::redrive_blocked(&*client, endpoint_id, &key).await?;
            (endpoint_id, key, done, "re-driving")
        }
        OrderingCommand::Discard { endpoint_id, key } => {
            let done = redrive::discard_blocked(client, endpoint_id, &key).await?;
            (endpoint_id, key, done, "discarded")
        }
    };
    match action {
        KeyAction::Done(head) => {
            println!("{verb} {head}, the head of key {key:?} of endpoint {endpoint_id}");
            Ok(ExitCode::SUCCESS)
        }
        KeyAction::NotBlocked => {
            eprintln!(
                "key {key:?} of endpoint {endpoint_id} is not blocked (its head is pending, in flight or parked); nothing done"
            );
            Ok(ExitCode::from(NOTHING_DONE))
        }
    }
}
