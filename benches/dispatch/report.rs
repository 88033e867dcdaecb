//! The printed table and the JSON report.

use serde_json::{Map, Value, json};

use crate::sys::Cpu;

/// One line of the results table.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub value: String,
    pub target: String,
    /// Whether the project's target is met; `None` when the figure has no target.
    pub met: Option<bool>,
}

/// Everything measured so far.
#[derive(Debug, Default)]
pub struct Report {
    rows: Vec<Row>,
    cpu: Vec<(String, Cpu, Option<u64>)>,
    scenarios: Map<String, Value>,
    errors: Vec<(String, String)>,
}

impl Report {
    /// Adds a figure without a target.
    pub fn info(&mut self, scenario: &str, metric: &str, value: String) {
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            target: String::new(),
            met: None,
        });
    }

    /// Adds a figure with a target and whether it is met.
    pub fn target(&mut self, scenario: &str, metric: &str, value: String, target: &str, met: bool) {
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: metric.into(),
            value,
            target: target.into(),
            met: Some(met),
        });
    }

    /// A figure with its target where `has_target` holds (push mode, say), shown
    /// without one where it does not (pure-poll mode, whose latency its tick bounds).
    pub fn target_if(
        &mut self,
        has_target: bool,
        scenario: &str,
        metric: &str,
        value: String,
        target: &str,
        met: bool,
    ) {
        if has_target {
            self.target(scenario, metric, value, target, met);
        } else {
            self.info(scenario, metric, value);
        }
    }

    /// Records where the CPU went during a measurement window in which `items`
    /// deliveries (or inserts, or requests) happened.
    pub fn cpu(&mut self, label: &str, cpu: Cpu, items: Option<u64>) {
        self.cpu.push((label.into(), cpu, items));
    }

    /// Stores a scenario's detailed figures for the JSON report.
    pub fn detail(&mut self, key: &str, value: Value) {
        self.scenarios.insert(key.into(), value);
    }

    /// Records a scenario that failed.
    pub fn error(&mut self, scenario: &str, error: &anyhow::Error) {
        self.errors.push((scenario.into(), format!("{error:#}")));
        self.rows.push(Row {
            scenario: scenario.into(),
            metric: "ERROR".into(),
            value: format!("{error:#}"),
            target: String::new(),
            met: None,
        });
    }

    /// Whether any scenario failed.
    pub fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The tables as text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let headers = ["scenario", "metric", "value", "target", "met"];
        let cells: Vec<[String; 5]> = self
            .rows
            .iter()
            .map(|r| {
                [
                    r.scenario.clone(),
                    r.metric.clone(),
                    r.value.clone(),
                    r.target.clone(),
                    match r.met {
                        Some(true) => "yes".into(),
                        Some(false) => "NO".into(),
                        None => String::new(),
                    },
                ]
            })
            .collect();
        table(&mut out, &headers, &cells);
        if !self.cpu.is_empty() {
            out.push_str("\nCPU during each measurement window, in cores (this machine has ");
            out.push_str(&crate::sys::nproc().to_string());
            out.push_str("):\n");
            let headers = [
                "window",
                "seconds",
                "dispatcher",
                "postgres",
                "receiver",
                "harness",
                "machine",
                "steal",
                "pg µs/item",
                "disp µs/item",
                "ours µs/item",
            ];
            let cells: Vec<[String; 11]> = self
                .cpu
                .iter()
                .map(|(label, c, items)| {
                    let per = |cores: f64| {
                        items.filter(|n| *n > 0).map_or(String::new(), |n| {
                            format!("{:.1}", cores * c.wall_s / n as f64 * 1e6)
                        })
                    };
                    let ours = c.dispatcher + c.postgres.unwrap_or(0.0) + c.receiver + c.harness;
                    [
                        label.clone(),
                        format!("{:.2}", c.wall_s),
                        format!("{:.2}", c.dispatcher),
                        c.postgres.map_or("?".into(), |p| format!("{p:.2}")),
                        format!("{:.2}", c.receiver),
                        format!("{:.2}", c.harness),
                        format!("{:.2}", c.machine),
                        format!("{:.2}", c.steal),
                        c.postgres.map_or(String::new(), per),
                        per(c.dispatcher),
                        per(ours),
                    ]
                })
                .collect();
            table(&mut out, &headers, &cells);
            out.push_str(
                "(dispatcher: the in-process dispatcher's runtime threads or the `outboxd run` \
                 processes; harness: the rest of the bench process, i.e. producers and the load \
                 generator; machine: all busy CPU, other users' and steal included; steal: CPU the \
                 hypervisor gave to other guests; µs/item: CPU time per delivery, insert or request \
                 in the window, for PostgreSQL, the dispatcher, and all of the benchmark's own \
                 processes together)\n",
            );
        }
        out
    }

    /// The JSON report.
    pub fn json(&self, header: Map<String, Value>) -> Value {
        let mut root = header;
        root.insert(
            "table".into(),
            Value::Array(
                self.rows
                    .iter()
                    .map(|r| {
                        json!({
                            "scenario": r.scenario,
                            "metric": r.metric,
                            "value": r.value,
                            "target": r.target,
                            "met": r.met,
                        })
                    })
                    .collect(),
            ),
        );
        root.insert(
            "cpu".into(),
            Value::Array(
                self.cpu
                    .iter()
                    .map(|(label, c, items)| {
                        let mut v = c.json();
                        v["window"] = Value::String(label.clone());
                        v["items"] = json!(items);
                        v
                    })
                    .collect(),
            ),
        );
        root.insert("scenarios".into(), Value::Object(self.scenarios.clone()));
        root.insert(
            "errors".into(),
            Value::Array(
                self.errors
                    .iter()
                    .map(|(s, e)| json!({"scenario": s, "error": e}))
                    .collect(),
            ),
        );
        Value::Object(root)
    }
}

fn table<const N: usize>(out: &mut String, headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths = headers.map(|h| h.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            // Left-align text columns, right-align the rest (numbers).
            if i < 2 {
                text.push_str(&format!("{cell:<w$}"));
            } else {
                text.push_str(&format!("{cell:>w$}"));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(out, headers.to_vec());
    line(
        out,
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    );
    for row in rows {
        line(out, row.iter().map(String::as_str).collect());
    }
}

/// `12345.6` as `12,346`.
pub fn int(x: f64) -> String {
    let n = x.round() as i64;
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

/// Milliseconds from microseconds, with a precision that suits the size.
pub fn ms(us: f64) -> String {
    let ms = us / 1000.0;
    if ms.abs() < 10.0 {
        format!("{ms:.2} ms")
    } else if ms.abs() < 1000.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.0} ms")
    }
}

/// Nearest-rank percentile of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Median of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Seconds with three significant figures.
pub fn fmt_secs(secs: f64) -> String {
    if secs < 1.0 {
        format!("{secs:.3}")
    } else if secs < 10.0 {
        format!("{secs:.2}")
    } else {
        format!("{secs:.1}")
    }
}
