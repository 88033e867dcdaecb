//! From the receiver's records to latencies: the first receipt of each (event,
//! endpoint), commit → first receipt percentiles, that latency split at the attempt's
//! start (the dispatcher's wake-up and claim versus the HTTP request), and stalls
//! (gaps in the flow of receipts). Latency counts from the producer's `COMMIT`
//! returning, as an application sees it, to the receiver's clock (the same host's
//! CLOCK_REALTIME).

use std::collections::HashMap;

use serde_json::{Value, json};

use crate::receiver::Rec;
use crate::report::pct;

/// First receive time per (event, endpoint) and how many receipts were duplicates.
pub fn first_receipts(recs: &[Rec]) -> (HashMap<(i64, u32), i64>, usize) {
    let mut first = HashMap::with_capacity(recs.len());
    let mut dups = 0;
    for r in recs {
        match first.entry((r.id, r.ep)) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                dups += 1;
                if r.t_us < *e.get() {
                    e.insert(r.t_us);
                }
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(r.t_us);
            }
        }
    }
    (first, dups)
}

/// Commit → first receipt latencies of committed events.
pub struct Latencies {
    pub sorted: Vec<f64>,
    pub delivered: usize,
    pub duplicates: usize,
    pub last_receipt_us: i64,
}

impl Latencies {
    pub fn json(&self) -> Value {
        let s = &self.sorted;
        json!({
            "count": s.len(),
            "duplicates": self.duplicates,
            "min": s.first(),
            "p50": pct(s, 50.0),
            "p90": pct(s, 90.0),
            "p99": pct(s, 99.0),
            "p99_9": pct(s, 99.9),
            "max": s.last(),
        })
    }
}

/// Commit → first receipt (at endpoint 0) of each committed `(id, commit_us)`.
pub fn latencies(commits: &[(i64, i64)], recs: &[Rec]) -> Latencies {
    let (first, duplicates) = first_receipts(recs);
    let mut sorted = Vec::with_capacity(commits.len());
    let mut last = 0;
    for &(id, commit_us) in commits {
        if let Some(&t) = first.get(&(id, 0)) {
            sorted.push((t - commit_us) as f64);
            last = last.max(t);
        }
    }
    sorted.sort_by(f64::total_cmp);
    Latencies {
        delivered: sorted.len(),
        sorted,
        duplicates,
        last_receipt_us: last,
    }
}

/// Latency split at the attempt's start: commit → send start (wake-up, claim, spawn)
/// and send start → receipt (HTTP), percentiles in µs.
pub fn split_latency(commits: &[(i64, i64)], recs: &[Rec], starts: &HashMap<i64, i64>) -> Value {
    let (first, _) = first_receipts(recs);
    let mut to_send = Vec::new();
    let mut to_receipt = Vec::new();
    for &(id, commit_us) in commits {
        if let (Some(&start), Some(&receipt)) = (starts.get(&id), first.get(&(id, 0))) {
            to_send.push((start - commit_us) as f64);
            to_receipt.push((receipt - start) as f64);
        }
    }
    to_send.sort_by(f64::total_cmp);
    to_receipt.sort_by(f64::total_cmp);
    let summary = |v: &[f64]| json!({"p50": pct(v, 50.0), "p90": pct(v, 90.0), "p99": pct(v, 99.0), "max": v.last()});
    json!({
        "events": to_send.len(),
        "commit_to_send_start": summary(&to_send),
        "send_start_to_receipt": summary(&to_receipt),
    })
}

/// Where deliveries stopped flowing: gaps between consecutive receipts longer than
/// `threshold_us`, and events whose latency exceeded 100 ms.
pub fn stalls(recs: &[Rec], lat: &Latencies, threshold_us: i64) -> Value {
    let mut times: Vec<i64> = recs.iter().map(|r| r.t_us).collect();
    times.sort_unstable();
    let gaps: Vec<i64> = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .filter(|g| *g > threshold_us)
        .collect();
    json!({
        "gaps_over_threshold": gaps.len(),
        "threshold_us": threshold_us,
        "max_receipt_gap_us": times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0) as f64,
        "events_over_100ms": lat.sorted.iter().filter(|l| **l > 100_000.0).count(),
    })
}
