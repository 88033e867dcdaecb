//! Ordered delivery seen from outside (issue 15): whether each key's events arrived one
//! at a time and in order, and where a key's time goes between two of its deliveries.
//!
//! Two checks, both counted as violations. The receiver's (see `receiver`): a request
//! that arrived while another of its key was unanswered, and a first arrival after a
//! later event of its key. And one made here that also catches two requests in flight
//! when the receiver happened to handle them one after the other: the dispatcher's
//! own record of when it started each attempt (`webhook_attempts.started_at`, its clock,
//! which is the receiver's: the same host) against the receiver's answer to the
//! previous event of the key. A dispatcher that waits for an answer before sending the
//! next one always starts it after that answer; one that starts earlier had two in
//! flight.

use std::collections::HashMap;

use serde_json::{Value, json};
use tokio_postgres::Client;

use crate::pg;
use crate::receiver::{OrderedCounts, Rec};
use crate::report::pct;

/// What the checks found, and where a key's time went.
#[derive(Debug, Default)]
pub struct Checked {
    pub receiver: OrderedCounts,
    /// Events whose first attempt started before the receiver answered the previous
    /// event of their key.
    pub sent_early: u64,
    /// Events received (first receipts) out of those with a key.
    pub received: usize,
    /// Keys seen.
    pub keys: usize,
    /// Per consecutive pair (a, b) of a key: receipt of a → receipt of b (a key's pace),
    /// b's send start → its receipt (the request), and a's answer → b's send start (the
    /// dispatcher and the database between two deliveries of the key), µs, sorted.
    pub cycle_us: Vec<f64>,
    pub request_us: Vec<f64>,
    pub turnaround_us: Vec<f64>,
}

impl Checked {
    /// Violations of one in flight per key, in order: must be 0.
    pub fn violations(&self) -> u64 {
        self.receiver.overlaps + self.receiver.out_of_order + self.sent_early
    }

    /// The violations and what each check counted, for the table.
    pub fn summary(&self) -> String {
        format!(
            "{} (in flight together: {} at the receiver, {} sent before the previous answer; out of order: {}; repeated: {})",
            self.violations(),
            self.receiver.overlaps,
            self.sent_early,
            self.receiver.out_of_order,
            self.receiver.duplicates
        )
    }

    pub fn json(&self) -> Value {
        let summary =
            |v: &[f64]| json!({"p50": pct(v, 50.0), "p90": pct(v, 90.0), "p99": pct(v, 99.0)});
        json!({
            "violations": self.violations(),
            "receiver": {
                "requests": self.receiver.requests,
                "in_flight_together": self.receiver.overlaps,
                "out_of_order": self.receiver.out_of_order,
                "repeated": self.receiver.duplicates,
                "unreadable": self.receiver.unreadable,
            },
            "sent_before_previous_answer": self.sent_early,
            "events_received": self.received,
            "keys": self.keys,
            "per_key_cycle_us": summary(&self.cycle_us),
            "send_start_to_receipt_us": summary(&self.request_us),
            "answer_to_next_send_start_us": summary(&self.turnaround_us),
        })
    }
}

/// Checks the receipts `recs` of endpoint 0 against the events' keys and order (read
/// from the database at `client`), with the receiver's own counts.
pub async fn check(
    client: &Client,
    recs: &[Rec],
    receiver: OrderedCounts,
) -> anyhow::Result<Checked> {
    let orders = pg::event_orders(client).await?;
    let starts = pg::attempt_starts(client).await?;
    // First receipt (time, answer) per event.
    let mut first: HashMap<i64, (i64, i64)> = HashMap::with_capacity(recs.len());
    for r in recs.iter().filter(|r| r.ep == 0) {
        let e = first.entry(r.id).or_insert((r.t_us, r.done_us));
        if r.t_us < e.0 {
            *e = (r.t_us, r.done_us);
        }
    }
    let mut lines: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
    for (id, (key, n)) in &orders {
        if first.contains_key(id) {
            lines.entry(key.as_str()).or_default().push((*n, *id));
        }
    }
    let mut out = Checked {
        receiver,
        keys: lines.len(),
        ..Checked::default()
    };
    for line in lines.values_mut() {
        line.sort_unstable();
        out.received += line.len();
        for pair in line.windows(2) {
            let (a, b) = (pair[0].1, pair[1].1);
            let ((a_t, a_done), (b_t, _)) = (first[&a], first[&b]);
            out.cycle_us.push((b_t - a_t) as f64);
            if let Some(&b_start) = starts.get(&b) {
                out.request_us.push((b_t - b_start) as f64);
                out.turnaround_us.push((b_start - a_done) as f64);
                if b_start < a_done {
                    out.sent_early += 1;
                }
            }
        }
    }
    for v in [
        &mut out.cycle_us,
        &mut out.request_us,
        &mut out.turnaround_us,
    ] {
        v.sort_by(f64::total_cmp);
    }
    Ok(out)
}
