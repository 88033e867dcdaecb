//! The end of a run: the counts, and the checks that decide it.
//!
//! **Duplicates.** A consumer that processes a webhook twice is allowed only where a
//! fault could have cost the first one's outcome (see `faults.rs` for what each fault
//! puts at risk). Every fault contributes *exposures*, each a (delivery, time) pair: a
//! delivery leased to a dispatcher the fault hit, a delivery the consumer processed
//! inside a restart's window, a request the receiver stalled past the timeout. Each
//! exposure can explain at most one extra delivery of its own delivery, later than the
//! exposure. The check matches every duplicate (each processing of a delivery after its
//! first) to a distinct, earlier exposure of the same delivery, earliest first (optimal
//! for this kind of matching), and fails on any duplicate left unmatched: a duplicate
//! nothing in flight at any fault explains. The total is therefore bounded by the
//! number of exposures, per delivery and in all, and each duplicate is attributed to the
//! kind of fault that explains it.
//!
//! **Ordered lines.** Each (endpoint, key) is a line: the key's events that the
//! endpoint's filter takes, in the order their producers committed them (by the
//! producer's counter `n` for a key one producer owns, by `ordering_seq` for a shared
//! one; `producers.rs`). Reading the consumer's requests in the order it read them, an
//! event may be sent only once every earlier event of its line has been processed
//! (what outboxd promises: the next goes out once the previous ended, and with no
//! delivery able to die in a run, ended means delivered, which needs the consumer's
//! 2xx). A request for an event already processed is a re-send, a duplicate like any
//! other (judged above, against the faults): so after a crash took back a head's
//! outcome and the next event's sending with it, `A B A B` passes, while `A(500) B`
//! does not, nor does `B A` (going back to an earlier event first received after a
//! later one). The consumer also says whether a line ever had two requests in flight
//! (`receiver.rs`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::Duration;

use crate::faults::{Fault, Kind};
use crate::fleet::Exit;
use crate::probe::Probe;
use crate::producers::{Ledger, is_shared};
use crate::receiver::{Fate, Lines, Rec};

/// A registered endpoint: its index (the receiver's `/ep/N`), its id and its filters.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub index: usize,
    pub id: i64,
    pub filters: Vec<String>,
}

impl Endpoint {
    /// Whether `event_type` goes to this endpoint, by the rules README states (no
    /// filter: everything; `*`; an exact name; a prefix `order.*`), written
    /// independently of the claim statement that applies them. outboxd's own
    /// operational events (`outboxd.*`, docs/webhooks.md: a circuit opening under the
    /// faults makes some) go only to endpoints whose filters name them, never through
    /// no filter or `*`. (None of the run's endpoints names them, so the rule that they
    /// never go to the endpoint they are about is not needed here.)
    pub fn matches(&self, event_type: &str) -> bool {
        let named = |f: &String| {
            f == event_type
                || f.strip_suffix('*')
                    .is_some_and(|prefix| prefix.ends_with('.') && event_type.starts_with(prefix))
        };
        if event_type.starts_with("outboxd.") {
            return self.filters.iter().any(|f| f != "*" && named(f));
        }
        self.filters.is_empty() || self.filters.iter().any(|f| f == "*" || named(f))
    }
}

/// An event of the run, as the database has it.
#[derive(Debug, Clone)]
pub struct Event {
    pub id: i64,
    pub event_type: String,
    pub uid: i64,
    /// `created_at`, in ms since the run began.
    pub created_ms: i64,
    /// Its `ordering_key` column, and the key, counter and producer its producer put
    /// in the payload.
    pub ordering_key: Option<String>,
    pub payload_key: Option<String>,
    pub n: Option<i64>,
    pub producer: Option<i64>,
}

/// A row of `webhook_ordering_keys` at the end.
#[derive(Debug, Clone)]
pub struct KeyRow {
    pub endpoint_id: i64,
    pub ordering_key: String,
    pub head_event_id: i64,
    pub blocked: bool,
}

/// A delivery row at the end.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub event_id: i64,
    pub endpoint_id: i64,
    pub state: String,
    pub attempts: i32,
    pub locked_by: Option<String>,
    pub last_error: Option<String>,
    pub ordering_key: Option<String>,
    pub ordering_seq: Option<i64>,
}

/// How a dispatcher's final SIGTERM went.
#[derive(Debug, Clone)]
pub struct Stop {
    pub worker_id: String,
    pub outcome: Result<(Option<i32>, Duration), Duration>,
}

pub struct Inputs {
    pub header: String,
    pub endpoints: Vec<Endpoint>,
    pub events: Vec<Event>,
    pub deliveries: Vec<Delivery>,
    pub unprocessed: i64,
    /// In the order the consumer read them.
    pub records: Vec<Rec>,
    pub lines: Lines,
    pub key_rows: Vec<KeyRow>,
    /// Rows left in `webhook_ordering_log` (ordered events not fanned out).
    pub log_left: i64,
    pub ledger: Ledger,
    pub faults: Vec<Fault>,
    pub exits: Vec<Exit>,
    pub panics: Vec<String>,
    pub probes: Vec<Probe>,
    pub probe_bound: Duration,
    pub stops: Vec<Stop>,
    pub heal_ms: u64,
    /// When everything was found delivered after healing; `None` if the bound passed.
    pub settled_ms: Option<u64>,
    pub heal_bound: Duration,
}

struct Check {
    name: &'static str,
    /// How many problems it found; it passes with none.
    problems: usize,
    /// What it says about them (the first 15 problems, and details).
    lines: Vec<String>,
}

impl Check {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            problems: 0,
            lines: Vec::new(),
        }
    }

    /// Records one problem (the first 15 are described).
    fn fail(&mut self, what: String) {
        self.problems += 1;
        if self.problems <= 15 {
            self.lines.push(what);
        }
    }

    /// Adds a line of detail about the problems found.
    fn detail(&mut self, what: String) {
        self.lines.push(what);
    }
}

/// Counts, checks and the report text; returns (report, passed, failed).
pub fn judge(inputs: &Inputs) -> (String, usize, usize) {
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "{}", inputs.header);

    let by_index: HashMap<usize, &Endpoint> =
        inputs.endpoints.iter().map(|e| (e.index, e)).collect();
    let index_of: HashMap<i64, usize> = inputs.endpoints.iter().map(|e| (e.id, e.index)).collect();
    let events: HashMap<i64, &Event> = inputs.events.iter().map(|e| (e.id, e)).collect();
    let uids: HashMap<i64, &Event> = inputs.events.iter().map(|e| (e.uid, e)).collect();
    let deliveries: HashMap<(i64, usize), &Delivery> = inputs
        .deliveries
        .iter()
        .filter_map(|d| {
            index_of
                .get(&d.endpoint_id)
                .map(|&ep| ((d.event_id, ep), d))
        })
        .collect();

    // Expected deliveries: every event to every endpoint whose filter matches.
    let mut expected: Vec<(i64, usize)> = Vec::new();
    for event in &inputs.events {
        for ep in &inputs.endpoints {
            if ep.matches(&event.event_type) {
                expected.push((event.id, ep.index));
            }
        }
    }
    let expected_set: HashSet<(i64, usize)> = expected.iter().copied().collect();

    // What the consumer processed, per delivery, in arrival order.
    let mut processed: HashMap<(i64, usize), Vec<u64>> = HashMap::new();
    let mut stalled: HashMap<(i64, usize), Vec<u64>> = HashMap::new();
    let mut fates: BTreeMap<String, usize> = BTreeMap::new();
    for r in &inputs.records {
        let fate = match r.fate {
            Fate::Accepted => "accepted".to_owned(),
            Fate::Stalled => "stalled (processed, answered late)".to_owned(),
            Fate::Refused(status) => format!("refused with {status}"),
            Fate::Closed => "dropped without an answer".to_owned(),
            Fate::Incomplete => "incomplete (sender died mid-request)".to_owned(),
        };
        *fates.entry(fate).or_default() += 1;
        if let (Some(id), Some(ep)) = (r.event_id, r.ep) {
            if r.fate.processed() {
                processed.entry((id, ep)).or_default().push(r.at_ms);
            }
            if r.fate == Fate::Stalled {
                stalled.entry((id, ep)).or_default().push(r.at_ms);
            }
        }
    }
    for times in processed.values_mut() {
        times.sort_unstable();
    }

    // ---- counts ----
    let ledger = &inputs.ledger;
    let ambiguous_in = ledger
        .ambiguous
        .iter()
        .filter(|u| uids.contains_key(u))
        .count();
    let _ = writeln!(w, "\ncounts");
    let _ = writeln!(
        w,
        "  events committed          {:>7}  (producers saw {} commits succeed; {} commits were ambiguous, {} of them committed)",
        inputs.events.len(),
        ledger.committed.len(),
        ledger.ambiguous.len(),
        ambiguous_in
    );
    for (action, n) in &ledger.actions {
        let _ = writeln!(w, "      {action:<34} {n:>6} transactions");
    }
    let _ = writeln!(
        w,
        "  events rolled back        {:>7}  (and {} in transactions that failed)",
        ledger.rolled_back.len(),
        ledger.failed.len()
    );
    let errors: Vec<String> = ledger
        .errors
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let _ = writeln!(
        w,
        "  producer errors           {:>7}  ({})",
        ledger.errors.values().sum::<u64>(),
        if errors.is_empty() {
            "none".to_owned()
        } else {
            errors.join(", ")
        }
    );
    let _ = writeln!(w, "  deliveries expected       {:>7}", expected.len());
    let _ = writeln!(w, "  requests received         {:>7}", inputs.records.len());
    for (fate, n) in &fates {
        let _ = writeln!(w, "      {fate:<34} {n:>6}");
    }
    let arrived = expected
        .iter()
        .filter(|p| processed.contains_key(p))
        .count();
    let _ = writeln!(
        w,
        "  deliveries arrived        {:>7}  of {}",
        arrived,
        expected.len()
    );

    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for d in &inputs.deliveries {
        let state = if d.state == "pending" && d.locked_by.is_some() {
            "leased".to_owned()
        } else {
            d.state.clone()
        };
        *states.entry(state).or_default() += 1;
    }
    let state = |s: &str| states.get(s).copied().unwrap_or(0);
    let _ = writeln!(
        w,
        "  deliveries in the db      {:>7}  (delivered {}, pending {}, leased {}, dead {}, parked {}); events not fanned out: {}",
        inputs.deliveries.len(),
        state("delivered"),
        state("pending"),
        state("leased"),
        state("dead"),
        state("parked"),
        inputs.unprocessed
    );

    // ---- duplicates against exposures ----
    let mut exposures: HashMap<(i64, usize), Vec<(u64, Kind)>> = HashMap::new();
    let mut exposed_by: BTreeMap<Kind, usize> = BTreeMap::new();
    for f in &inputs.faults {
        for &(event_id, endpoint_id) in &f.at_risk {
            if let Some(&ep) = index_of.get(&endpoint_id) {
                exposures
                    .entry((event_id, ep))
                    .or_default()
                    .push((f.start_ms, f.kind));
                *exposed_by.entry(f.kind).or_default() += 1;
            }
        }
        if let Some((from, to)) = f.window {
            for (pair, times) in &processed {
                for &t in times.iter().filter(|&&t| from <= t && t <= to) {
                    exposures.entry(*pair).or_default().push((t, f.kind));
                    *exposed_by.entry(f.kind).or_default() += 1;
                }
            }
        }
    }
    for (pair, times) in &stalled {
        for &t in times {
            exposures.entry(*pair).or_default().push((t, Kind::Stall));
            *exposed_by.entry(Kind::Stall).or_default() += 1;
        }
    }
    let mut duplicates = 0usize;
    let mut explained_by: BTreeMap<Kind, usize> = BTreeMap::new();
    // Unexplained duplicates, and a line for each of the first deliveries that had any.
    let mut unexplained = 0usize;
    let mut unexplained_lines: Vec<String> = Vec::new();
    let mut pairs: Vec<_> = processed.iter().filter(|(_, t)| t.len() > 1).collect();
    pairs.sort();
    for (pair, times) in pairs {
        let mut available = exposures.get(pair).cloned().unwrap_or_default();
        available.sort();
        // Both in time order: the earliest unused exposure is always the next one.
        let mut next = 0;
        let mut missing = 0;
        for &dup in &times[1..] {
            duplicates += 1;
            if next < available.len() && available[next].0 <= dup {
                *explained_by.entry(available[next].1).or_default() += 1;
                next += 1;
            } else {
                missing += 1;
            }
        }
        unexplained += missing;
        if missing > 0 && unexplained_lines.len() < 15 {
            let list = |items: Vec<String>| {
                let more = items.len().saturating_sub(10);
                let mut text = items.into_iter().take(10).collect::<Vec<_>>().join(", ");
                if more > 0 {
                    text.push_str(&format!(" and {more} more"));
                }
                text
            };
            unexplained_lines.push(format!(
                "event {} at endpoint {}: {missing} of {} duplicates unexplained; processed at {} ms; exposures: {}; delivery {}",
                pair.0,
                pair.1,
                times.len() - 1,
                list(times.iter().map(u64::to_string).collect()),
                if available.is_empty() {
                    "none".to_owned()
                } else {
                    list(available.iter().map(|(t, k)| format!("{t} ms {}", k.label())).collect())
                },
                deliveries
                    .get(pair)
                    .map(|d| format!("{} after {} attempts", d.state, d.attempts))
                    .unwrap_or_else(|| "missing".to_owned())
            ));
        }
    }
    let exposures_total: usize = exposed_by.values().sum();
    let _ = writeln!(
        w,
        "  duplicates                {:>7}  (bound: {} exposures at faults; explained {}, unexplained {})",
        duplicates,
        exposures_total,
        duplicates - unexplained,
        unexplained
    );
    let kinds: BTreeMap<Kind, (usize, usize)> = exposed_by
        .iter()
        .map(|(k, n)| (*k, (*n, explained_by.get(k).copied().unwrap_or(0))))
        .collect();
    for (kind, (exposed, dup)) in &kinds {
        let _ = writeln!(
            w,
            "      {:<34} {dup:>6} duplicates of {exposed} exposed",
            kind.label()
        );
    }

    // ---- latency ----
    let latency = |ordered: Option<bool>| {
        let mut latencies: Vec<i64> = expected
            .iter()
            .filter_map(|p| {
                let event = events.get(&p.0)?;
                if ordered.is_some_and(|o| o != event.ordering_key.is_some()) {
                    return None;
                }
                let first = *processed.get(p)?.first()?;
                Some(first as i64 - event.created_ms)
            })
            .collect();
        latencies.sort_unstable();
        let pct = |q: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * q).round().max(0.0) as usize)
                .map_or("-".to_owned(), |ms| format!("{:.2} s", *ms as f64 / 1000.0))
        };
        format!("p50 {}, p99 {}, max {}", pct(0.5), pct(0.99), pct(1.0))
    };
    let _ = writeln!(w, "  commit to first arrival   {}", latency(None));
    let _ = writeln!(
        w,
        "      without a key                      {}",
        latency(Some(false))
    );
    let _ = writeln!(
        w,
        "      ordered                            {}",
        latency(Some(true))
    );
    let last_first = expected
        .iter()
        .filter_map(|p| processed.get(p)?.first().copied())
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        w,
        "  after healing             the last delivery arrived {:.2} s after the faults stopped; all settled in the db after {}",
        last_first.saturating_sub(inputs.heal_ms) as f64 / 1000.0,
        inputs
            .settled_ms
            .map_or("(not within the bound)".to_owned(), |ms| format!(
                "{:.2} s",
                ms.saturating_sub(inputs.heal_ms) as f64 / 1000.0
            ))
    );
    for p in &inputs.probes {
        let arrived: Vec<Duration> = p.shots.iter().filter_map(|s| s.latency).collect();
        let _ = writeln!(
            w,
            "  push probes {:<13} poll {:>6} ms: {} probes, {} arrived, slowest {}",
            p.worker_id,
            p.poll_ms,
            p.shots.len(),
            arrived.len(),
            arrived
                .iter()
                .max()
                .map_or("-".to_owned(), |l| format!("{:.3} s", l.as_secs_f64()))
        );
    }
    let mut fault_counts: BTreeMap<Kind, usize> = BTreeMap::new();
    for f in &inputs.faults {
        *fault_counts.entry(f.kind).or_default() += 1;
    }
    let _ = writeln!(w, "  faults                    {:>7}", inputs.faults.len());
    for (kind, n) in &fault_counts {
        let _ = writeln!(w, "      {:<34} {n:>6}", kind.label());
    }
    let startup_exits = inputs.exits.iter().filter(|e| !e.was_running).count();
    let _ = writeln!(
        w,
        "  dispatcher exits of their own: {} before starting (restarted), {} while running",
        startup_exits,
        inputs.exits.len() - startup_exits
    );

    // ---- ordered lines ----
    let ordered = Ordered::build(inputs, &index_of);
    let longest = ordered.lines.values().map(Vec::len).max().unwrap_or(0);
    let ordered_events = inputs
        .events
        .iter()
        .filter(|e| e.ordering_key.is_some())
        .count();
    let shared = ordered.keys.keys().filter(|k| is_shared(k)).count();
    let _ = writeln!(
        w,
        "  ordered events            {:>7}  ({:.0}% of the events, from {} committed transactions) over {} keys ({} owned by one producer, {} shared by two); commit order differed from insert order {} times",
        ordered_events,
        100.0 * ordered_events as f64 / inputs.events.len().max(1) as f64,
        ledger.ordered_transactions,
        ordered.keys.len(),
        ordered.keys.len() - shared,
        shared,
        ordered.overtaken
    );
    let _ = writeln!(
        w,
        "  ordered lines             {:>7}  (endpoint, key); longest {} events; {} requests, {} of them abandoned by their sender before the answer; overlaps {}",
        ordered.lines.len(),
        longest,
        inputs.lines.requests,
        inputs.lines.abandoned,
        inputs.lines.overlaps.len()
    );

    // ---- checks ----
    let mut checks = Vec::new();

    let mut c = Check::new("every committed event arrived at every endpoint its filter matches");
    for p in &expected {
        if !processed.contains_key(p) {
            let d = deliveries.get(p);
            c.fail(format!(
                "event {} (uid {}) never processed at endpoint {}; delivery: {}",
                p.0,
                events.get(&p.0).map_or(0, |e| e.uid),
                p.1,
                d.map_or("none".to_owned(), |d| format!(
                    "{} after {} attempts, locked_by {:?}, last error {:?}",
                    d.state, d.attempts, d.locked_by, d.last_error
                ))
            ));
        }
    }
    checks.push(c);

    let mut c = Check::new("every commit a producer saw succeed is in the outbox");
    for uid in &ledger.committed {
        if !uids.contains_key(uid) {
            c.fail(format!(
                "uid {uid} was committed but is not in webhook_outbox"
            ));
        }
    }
    checks.push(c);

    let mut c = Check::new("no event of a rolled-back or failed transaction exists or arrived");
    let received_uids: HashSet<i64> = inputs.records.iter().filter_map(|r| r.uid).collect();
    for uid in ledger.rolled_back.iter().chain(&ledger.failed) {
        if uids.contains_key(uid) {
            c.fail(format!(
                "uid {uid} was not committed but is in webhook_outbox"
            ));
        }
        if received_uids.contains(uid) {
            c.fail(format!(
                "uid {uid} was not committed but reached the receiver"
            ));
        }
    }
    checks.push(c);

    let mut c =
        Check::new("no delivery left pending, leased, dead or parked; every event fanned out");
    if inputs.settled_ms.is_none() {
        c.fail(format!(
            "the database did not settle within {:?} after healing",
            inputs.heal_bound
        ));
    }
    for d in inputs.deliveries.iter().filter(|d| d.state != "delivered") {
        c.fail(format!(
            "delivery ({}, endpoint id {}) is {}{} after {} attempts; last error {:?}",
            d.event_id,
            d.endpoint_id,
            d.state,
            d.locked_by
                .as_ref()
                .map_or(String::new(), |w| format!(" (leased to {w})")),
            d.attempts,
            d.last_error
        ));
    }
    if inputs.unprocessed > 0 {
        c.fail(format!(
            "{} events were never fanned out",
            inputs.unprocessed
        ));
    }
    let in_db: HashSet<(i64, usize)> = deliveries.keys().copied().collect();
    for p in expected_set.difference(&in_db) {
        c.fail(format!(
            "no delivery row for event {} at endpoint {}",
            p.0, p.1
        ));
    }
    for p in in_db.difference(&expected_set) {
        c.fail(format!(
            "a delivery row for event {} at endpoint {} that its filter does not match",
            p.0, p.1
        ));
    }
    checks.push(c);

    let mut c = Check::new(
        "every request was for a known event at an endpoint it matches, with its payload",
    );
    for r in &inputs.records {
        let (Some(ep), Some(id)) = (r.ep, r.event_id) else {
            c.fail(format!(
                "a request without a known endpoint path or webhook-id: {r:?}"
            ));
            continue;
        };
        match events.get(&id) {
            None => c.fail(format!(
                "webhook-id {id} is not an event of the run (endpoint {ep})"
            )),
            Some(e) => {
                if !by_index.get(&ep).is_some_and(|x| x.matches(&e.event_type)) {
                    c.fail(format!(
                        "event {id} ({}) reached endpoint {ep}, whose filter does not match",
                        e.event_type
                    ));
                }
                if r.uid != Some(e.uid) {
                    c.fail(format!(
                        "event {id} arrived with uid {:?}, its row has {}",
                        r.uid, e.uid
                    ));
                }
            }
        }
    }
    checks.push(c);

    let mut c = Check::new("every request carried a valid Standard Webhooks signature");
    for r in inputs
        .records
        .iter()
        .filter(|r| r.ep.is_some() && !r.signed && r.fate != Fate::Incomplete)
    {
        c.fail(format!(
            "event {:?} at endpoint {:?}: signature did not verify",
            r.event_id, r.ep
        ));
    }
    checks.push(c);

    let mut c = Check::new("duplicates only where a fault left a delivery in flight");
    c.problems = unexplained;
    c.lines = unexplained_lines;
    checks.push(c);

    let mut c = Check::new("no producer transaction failed except for a lost connection");
    for (code, n) in &ledger.errors {
        if code != "connection" && !code.starts_with("57P") && !code.starts_with("08") {
            c.fail(format!(
                "{n} producer transactions failed with SQLSTATE {code}"
            ));
        }
    }
    if c.problems > 0 {
        for m in &ledger.harmful {
            c.detail(m.clone());
        }
    }
    checks.push(c);

    let mut c = Check::new(
        "dispatchers: none died while running, no panic, every SIGTERM drained in time and exited 0",
    );
    for e in inputs.exits.iter().filter(|e| e.was_running) {
        c.fail(format!(
            "{} exited on its own at {} ms while running ({}); log {}",
            e.worker_id,
            e.at_ms,
            e.status,
            e.log.display()
        ));
    }
    for p in &inputs.panics {
        c.fail(p.clone());
    }
    for f in &inputs.faults {
        if let Some(finding) = &f.finding {
            c.fail(finding.clone());
        }
    }
    for s in &inputs.stops {
        match s.outcome {
            Ok((Some(0), _)) => {}
            Ok((code, took)) => c.fail(format!(
                "{} exited with {code:?} {} ms after the final SIGTERM",
                s.worker_id,
                took.as_millis()
            )),
            Err(waited) => c.fail(format!(
                "{} had not exited {} ms after the final SIGTERM",
                s.worker_id,
                waited.as_millis()
            )),
        }
    }
    checks.push(c);

    let mut c = Check::new(
        "push works after the faults: each dispatcher alone wakes for a new event, also after losing its connections",
    );
    for p in &inputs.probes {
        for shot in &p.shots {
            match shot.latency {
                Some(l) if l <= inputs.probe_bound => {}
                Some(l) => c.fail(format!(
                    "{} (poll {} ms), {}: the probe arrived {:.2} s after its commit (bound {:?}): push did not wake it",
                    p.worker_id,
                    p.poll_ms,
                    shot.setup,
                    l.as_secs_f64(),
                    inputs.probe_bound
                )),
                None => c.fail(format!(
                    "{} (poll {} ms), {}: the probe had not arrived {:.1} s after its commit",
                    p.worker_id,
                    p.poll_ms,
                    shot.setup,
                    shot.waited.as_secs_f64()
                )),
            }
        }
    }
    checks.push(c);

    checks.extend(ordered.checks(inputs, &processed));

    let _ = writeln!(w, "\nchecks");
    let mut passed = 0;
    let mut failed = 0;
    for c in &checks {
        if c.problems == 0 {
            passed += 1;
            let _ = writeln!(w, "  PASS  {}", c.name);
        } else {
            failed += 1;
            let _ = writeln!(w, "  FAIL  {} ({} problems)", c.name, c.problems);
            for line in &c.lines {
                let _ = writeln!(w, "          {line}");
            }
            if c.problems > c.lines.len() {
                let _ = writeln!(w, "          ... ({} problems in all)", c.problems);
            }
        }
    }
    (out, passed, failed)
}

/// The ordered lines of a run: each key's events in commit order, and each (endpoint,
/// key)'s part of them.
struct Ordered<'a> {
    by_id: HashMap<i64, &'a Event>,
    /// Each key's events, in commit order.
    keys: BTreeMap<String, Vec<&'a Event>>,
    /// Each (endpoint index, key)'s event ids, in commit order.
    lines: BTreeMap<(usize, String), Vec<i64>>,
    /// The place of each (event, endpoint index) in its line.
    position: HashMap<(i64, usize), usize>,
    /// `ordering_seq` of each ordered event, as its deliveries have it.
    seq: HashMap<i64, i64>,
    /// What the numbering got wrong, found while building.
    numbering: Check,
    /// How often a key's next event in commit order had the smaller id: a transaction
    /// that inserted later committed first (shared keys only), so insert order would
    /// not have done.
    overtaken: usize,
}

impl<'a> Ordered<'a> {
    fn build(inputs: &'a Inputs, index_of: &HashMap<i64, usize>) -> Self {
        let mut numbering = Check::new(
            "outboxd numbered every ordered event (ordering_seq), each key's in its producers' commit order",
        );
        let by_id: HashMap<i64, &Event> = inputs.events.iter().map(|e| (e.id, e)).collect();
        let mut seq: HashMap<i64, i64> = HashMap::new();
        for d in &inputs.deliveries {
            let Some(e) = by_id.get(&d.event_id) else {
                continue;
            };
            if !index_of.contains_key(&d.endpoint_id) {
                continue;
            }
            if d.ordering_key != e.ordering_key {
                numbering.fail(format!(
                    "delivery ({}, endpoint id {}) has ordering_key {:?}, its event {:?}",
                    d.event_id, d.endpoint_id, d.ordering_key, e.ordering_key
                ));
            }
            match (e.ordering_key.is_some(), d.ordering_seq) {
                (true, None) => numbering.fail(format!(
                    "delivery ({}, endpoint id {}) of an ordered event has no ordering_seq",
                    d.event_id, d.endpoint_id
                )),
                (false, Some(s)) => numbering.fail(format!(
                    "delivery ({}, endpoint id {}) of an event without a key has ordering_seq {s}",
                    d.event_id, d.endpoint_id
                )),
                (true, Some(s)) => {
                    if let Some(other) = seq.insert(d.event_id, s).filter(|&o| o != s) {
                        numbering.fail(format!(
                            "the deliveries of event {} have ordering_seq {other} and {s}",
                            d.event_id
                        ));
                    }
                }
                (false, None) => {}
            }
        }
        let mut keys: BTreeMap<String, Vec<&Event>> = BTreeMap::new();
        for e in &inputs.events {
            if e.ordering_key != e.payload_key {
                numbering.fail(format!(
                    "event {} has ordering_key {:?}, its producer wrote {:?}",
                    e.id, e.ordering_key, e.payload_key
                ));
            }
            if let Some(key) = &e.ordering_key {
                keys.entry(key.clone()).or_default().push(e);
            }
        }
        let mut numbers: HashMap<i64, i64> = HashMap::new();
        let mut overtaken = 0;
        for (key, list) in keys.iter_mut() {
            // A shared key's order is the commit order, which only the numbers tell;
            // an owned key's is its producer's counter, which the numbers must follow.
            if is_shared(key) {
                list.sort_by_key(|e| (seq.get(&e.id).copied().unwrap_or(i64::MAX), e.id));
            } else {
                list.sort_by_key(|e| (e.n.unwrap_or(i64::MAX), e.id));
            }
            let mut numbered: Vec<(i64, &Event)> = list
                .iter()
                .filter_map(|e| Some((*seq.get(&e.id)?, *e)))
                .collect();
            numbered.sort_by_key(|(s, _)| *s);
            overtaken += numbered
                .windows(2)
                .filter(|w| w[1].1.id < w[0].1.id)
                .count();
            // Each producer's last event of the key so far, in number order.
            let mut last: HashMap<Option<i64>, &Event> = HashMap::new();
            for (s, e) in numbered {
                if let Some(other) = numbers.insert(s, e.id) {
                    numbering.fail(format!(
                        "events {other} and {} have the same ordering_seq {s}",
                        e.id
                    ));
                }
                if e.n.is_none() {
                    numbering.fail(format!("ordered event {} has no n in its payload", e.id));
                }
                if let Some(before) = last.get(&e.producer)
                    && e.n <= before.n
                {
                    numbering.fail(format!(
                        "key {key}: producer {:?} committed event {} (n {:?}) before event {} (n {:?}), \
                         but they are numbered {} and {s}",
                        e.producer, e.id, e.n, before.id, before.n, seq[&before.id]
                    ));
                }
                last.insert(e.producer, e);
            }
        }
        let mut lines = BTreeMap::new();
        let mut position = HashMap::new();
        for (key, list) in &keys {
            for ep in &inputs.endpoints {
                let line: Vec<i64> = list
                    .iter()
                    .filter(|e| ep.matches(&e.event_type))
                    .map(|e| e.id)
                    .collect();
                if line.is_empty() {
                    continue;
                }
                for (i, id) in line.iter().enumerate() {
                    position.insert((*id, ep.index), i);
                }
                lines.insert((ep.index, key.clone()), line);
            }
        }
        Self {
            by_id,
            keys,
            lines,
            position,
            seq,
            numbering,
            overtaken,
        }
    }

    /// "event 123 (n 5 of producer 2, seq 77)".
    fn describe(&self, id: i64) -> String {
        let Some(e) = self.by_id.get(&id) else {
            return format!("event {id}");
        };
        format!(
            "event {id} (n {} of producer {}, seq {})",
            e.n.map_or("-".to_owned(), |n| n.to_string()),
            e.producer.map_or("-".to_owned(), |p| p.to_string()),
            self.seq.get(&id).map_or("-".to_owned(), |s| s.to_string())
        )
    }

    /// The checks of ordered delivery; `processed` is when the consumer processed each
    /// (event, endpoint index).
    fn checks(self, inputs: &Inputs, processed: &HashMap<(i64, usize), Vec<u64>>) -> Vec<Check> {
        let mut arrived =
            Check::new("every ordered event arrived at every endpoint its filter matches");
        for ((ep, key), line) in &self.lines {
            let missing: Vec<usize> = (0..line.len())
                .filter(|&i| !processed.contains_key(&(line[i], *ep)))
                .collect();
            if let Some(&first) = missing.first() {
                arrived.fail(format!(
                    "endpoint {ep}, key {key}: {} of its {} events never processed, the first {} at position {first}",
                    missing.len(),
                    line.len(),
                    self.describe(line[first])
                ));
            }
        }

        // Each line's requests, in the order the consumer read them.
        let mut first_order = Check::new(
            "per (endpoint, key), first arrivals follow the commit order (re-sends of a processed event are duplicates)",
        );
        let mut ahead = Check::new(
            "per (endpoint, key), no event was sent before every earlier one in its line had been processed",
        );
        struct Walk {
            done: Vec<bool>,
            /// How many events from the line's start have all been processed.
            prefix: usize,
            /// The furthest position first processed so far.
            furthest: Option<usize>,
        }
        let mut walks: HashMap<(usize, &str), Walk> = HashMap::new();
        for (i, r) in inputs.records.iter().enumerate() {
            let (Some(ep), Some(id)) = (r.ep, r.event_id) else {
                continue;
            };
            let Some(key) = self.by_id.get(&id).and_then(|e| e.ordering_key.as_deref()) else {
                continue;
            };
            // Not in a line: an endpoint the event's filter does not match, judged above.
            let Some(&pos) = self.position.get(&(id, ep)) else {
                continue;
            };
            let line = &self.lines[&(ep, key.to_owned())];
            let walk = walks.entry((ep, key)).or_insert_with(|| Walk {
                done: vec![false; line.len()],
                prefix: 0,
                furthest: None,
            });
            if walk.prefix < pos {
                ahead.fail(format!(
                    "endpoint {ep}, key {key}: request #{i} at {} ms ({:?}) for {} at position {pos}, while {} at position {} had not been processed",
                    r.at_ms,
                    r.fate,
                    self.describe(id),
                    self.describe(line[walk.prefix]),
                    walk.prefix
                ));
            }
            if r.fate.processed() && !walk.done[pos] {
                walk.done[pos] = true;
                if let Some(furthest) = walk.furthest.filter(|&f| pos < f) {
                    first_order.fail(format!(
                        "endpoint {ep}, key {key}: {} at position {pos} first processed at {} ms (request #{i}), after {} at position {furthest}",
                        self.describe(id),
                        r.at_ms,
                        self.describe(line[furthest])
                    ));
                }
                walk.furthest = Some(walk.furthest.map_or(pos, |f| f.max(pos)));
                while walk.prefix < walk.done.len() && walk.done[walk.prefix] {
                    walk.prefix += 1;
                }
            }
        }

        let mut overlap = Check::new("no (endpoint, key) ever had two requests in flight at once");
        for o in &inputs.lines.overlaps {
            let others: Vec<String> = o
                .others
                .iter()
                .map(|(id, since)| {
                    format!(
                        "{} since {since} ms",
                        id.map_or("an unknown event".to_owned(), |id| self.describe(id))
                    )
                })
                .collect();
            overlap.fail(format!(
                "endpoint {}, key {}: a request for {} began at {} ms while in flight: {}",
                o.ep,
                o.key,
                o.event_id
                    .map_or("an unknown event".to_owned(), |id| self.describe(id)),
                o.at_ms,
                others.join(", ")
            ));
        }

        let mut left = Check::new(
            "no ordered line left at the end: nothing queued, no row in webhook_ordering_keys (none blocked), the ordering log empty",
        );
        for d in inputs.deliveries.iter().filter(|d| d.state == "queued") {
            left.fail(format!(
                "delivery ({}, endpoint id {}) of key {:?} is still queued",
                d.event_id, d.endpoint_id, d.ordering_key
            ));
        }
        for k in &inputs.key_rows {
            left.fail(format!(
                "(endpoint id {}, key {}) still has a row, head {}{}",
                k.endpoint_id,
                k.ordering_key,
                self.describe(k.head_event_id),
                if k.blocked {
                    ", blocked: its head ended dead"
                } else {
                    ""
                }
            ));
        }
        if inputs.log_left > 0 {
            left.fail(format!(
                "{} rows left in webhook_ordering_log (ordered events never fanned out)",
                inputs.log_left
            ));
        }
        vec![self.numbering, arrived, first_order, ahead, overlap, left]
    }
}
