//! Scale-out: the burst delivered by 1, 2, 4 (`BENCH_SCALEOUT_PROCS`) real
//! `outboxd run` processes on one database. It measures whether more processes deliver
//! at least as fast as one, i.e. whether `FOR UPDATE SKIP LOCKED` claims and the
//! doorbell let processes share a queue without getting in each other's way. Several
//! processes on one host are given their share of the cores (`WEBHOOK_WORKER_THREADS`
//! = cores / processes), the configuration the target is for; each count also runs
//! with the default threads and in pure-poll mode, shown beside it. Configurations run
//! interleaved, one burst each per round in an order that alternates by round, each
//! figure the median of its rounds. With `BENCH_AB_BIN`, each burst is repeated with
//! that binary in the same round, and the binary under test is reported relative to it.
//! It also gives the peak RSS of one `outboxd run` process.

use std::path::PathBuf;

use anyhow::bail;
use serde_json::{Value, json};

use crate::bursts::{BurstSpec, burst};
use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::interleave::{ratios_by_round, round_order};
use crate::report::{int, median};
use crate::sys::Cpu;

pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    // The binary under test, then (with BENCH_AB_BIN) the one to compare it with.
    let bins: Vec<PathBuf> = std::iter::once(ctx.outboxd_bin.clone())
        .chain(ctx.s.scaleout_ab_bin.clone())
        .collect();
    for bin in &bins {
        if !bin.is_file() {
            bail!(
                "{} not found: build it first (cargo build --release --bin outboxd)",
                bin.display()
            );
        }
    }
    let n = ctx.s.burst_events;
    let rounds = ctx.s.burst_repeats;
    // Several processes on one host each get their share of its cores
    // (WEBHOOK_WORKER_THREADS = cores / processes, at least 1), as docs/operations.md
    // advises and as a CPU quota of that share would make the default; each such
    // count also runs with the default threads (every process as many as there are
    // cores), shown beside it.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut configs: Vec<ScaleoutConfig> = Vec::new();
    for &procs in &ctx.s.scaleout_procs {
        let share = (cores / procs as usize).max(1);
        if share >= cores {
            // One process, or a machine with no more cores than processes: the
            // default is the share.
            configs.push(ScaleoutConfig {
                procs,
                threads: None,
                target: true,
                poll: false,
            });
        } else {
            let threads = u16::try_from(share.min(1024)).unwrap_or(1024);
            configs.push(ScaleoutConfig {
                procs,
                threads: Some(threads),
                target: true,
                poll: false,
            });
            configs.push(ScaleoutConfig {
                procs,
                threads: None,
                target: false,
                poll: false,
            });
        }
    }
    // Pure polling, for each count given its share of the cores (shown, no target):
    // the drain once a tick has found the burst, since from the commit every poll
    // burst also waits for a tick.
    let push_configs: Vec<ScaleoutConfig> =
        configs.iter().filter(|c| c.target).copied().collect();
    for config in push_configs {
        configs.push(ScaleoutConfig {
            target: false,
            poll: true,
            ..config
        });
    }
    // Interleaved: round r bursts once with each configuration (fresh databases and
    // processes each time), so a machine that drifts slower or faster during the
    // scenario biases none of them. Each figure is the median of its rounds, like
    // the producer-cost comparison. With a second binary, each burst is repeated with
    // it right before or after; the pair's order alternates by round, so going first
    // or second favours neither.
    // Index [b][i]: binary b (0 the one under test), configuration i.
    let mut rates: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); configs.len()]; bins.len()];
    let mut cpus: Vec<Vec<Option<Cpu>>> = vec![vec![None; configs.len()]; bins.len()];
    let mut items = vec![vec![0_u64; configs.len()]; bins.len()];
    let mut hwm: Vec<Option<u64>> = vec![None; configs.len()];
    let mut rounds_json: Vec<Vec<Vec<Value>>> =
        vec![vec![Vec::new(); configs.len()]; bins.len()];
    for round in 0..rounds {
        // Odd rounds run the configurations in reverse, so none always follows
        // another (each share-of-the-cores run and its default-threads run, above all).
        for i in round_order(configs.len(), round) {
            let config = &configs[i];
            for b in round_order(bins.len(), round) {
                let suffix = if b == 0 { "" } else { "_ab" };
                let tag = format!("{}_r{}{suffix}", config.key(), round + 1);
                ctx.outboxd_bin = bins[b].clone();
                ctx.outboxd_threads = config.threads;
                let out = burst(ctx, BurstSpec {
                        tag: &tag,
                        events: n,
                        endpoints: 1,
                        mode: config.mode(),
                        history: 0,
                        repeats: Some(1),
                        warmup: true,
                    })
                    .await;
                ctx.outboxd_bin = bins[0].clone();
                ctx.outboxd_threads = None;
                let out = out?;
                rates[b][i].push(if config.poll {
                    out.rate_after_first
                } else {
                    out.rate
                });
                Cpu::accumulate(&mut cpus[b][i], &out.cpu);
                items[b][i] += out.items;
                rounds_json[b][i].push(out.json);
                if b == 0 {
                    let peak = out.hwm_kib.iter().flatten().copied().max();
                    hwm[i] = hwm[i].max(peak);
                }
            }
        }
    }
    let mut details = serde_json::Map::new();
    let one = configs
        .iter()
        .position(|c| c.procs == 1 && !c.poll)
        .map(|i| median(&rates[0][i]));
    let one_poll = configs
        .iter()
        .position(|c| c.procs == 1 && c.poll)
        .map(|i| median(&rates[0][i]));
    for (i, config) in configs.iter().enumerate() {
        let procs = config.procs;
        let rate = median(&rates[0][i]);
        let label = config.label(cores);
        if let Some(cpu) = cpus[0][i] {
            ctx.report.cpu(&label, cpu, Some(items[0][i]));
        }
        let metric = format!(
            "deliveries/s{}, burst {} (median of {rounds} interleaved)",
            if config.poll {
                " from first receipt"
            } else {
                ""
            },
            int(n as f64)
        );
        let vs_one =
            |one: f64| format!("{} ({:+.0}% vs 1)", int(rate), (rate / one - 1.0) * 100.0);
        match if config.poll { one_poll } else { one } {
            // The target is for processes given their share of the cores; with the
            // default threads, several processes on one host oversubscribe it.
            Some(one) if procs > 1 && config.target => {
                ctx.report
                    .target(&label, &metric, vs_one(one), ">= 1 process", rate >= one)
            }
            Some(one) if procs > 1 => ctx.report.info(&label, &metric, vs_one(one)),
            _ => ctx.report.info(&label, &metric, int(rate)),
        }
        if procs == 1
            && !config.poll
            && let Some(kib) = hwm[i]
        {
            let mib = kib as f64 / 1024.0;
            ctx.report.target(
                "memory",
                "peak RSS (VmHWM) of `outboxd run`, scale-out 1 bursts",
                format!("{mib:.1} MiB"),
                "< 48 MiB",
                mib < 48.0,
            );
        }
        details.insert(
            config.key(),
            json!({
                "processes": procs,
                "worker_threads": config.threads,
                "poll": config.poll,
                "rates_from": if config.poll { "first receipt" } else { "commit" },
                "median_deliveries_per_s": rate,
                "deliveries_per_s_by_round": rates[0][i],
                "peak_rss_kib": hwm[i],
                "rounds": rounds_json[0][i],
            }),
        );
        if let Some(ab) = rates.get(1) {
            // The binary under test relative to the baseline: above 1, it was faster.
            let ratios = ratios_by_round(&rates[0][i], &ab[i]);
            let faster = ratios.iter().filter(|&&r| r > 1.0).count();
            let ab_label = format!("A/B {}", label.trim_start_matches("scale-out "));
            if let Some(cpu) = cpus[1][i] {
                ctx.report.cpu(
                    &format!("{ab_label} (BENCH_AB_BIN)"),
                    cpu,
                    Some(items[1][i]),
                );
            }
            ctx.report.info(
                &ab_label,
                "the binary above vs BENCH_AB_BIN, paired by round (median ratio)",
                format!(
                    "{:+.1}%, faster in {faster} of {}",
                    (median(&ratios) - 1.0) * 100.0,
                    ratios.len()
                ),
            );
            details.insert(
                format!("ab_{}", config.key()),
                json!({
                    "processes": procs,
                    "worker_threads": config.threads,
                    "binary": bins[1].display().to_string(),
                    "median_deliveries_per_s": median(&ab[i]),
                    "deliveries_per_s_by_round": ab[i],
                    "ratio_under_test_to_ab_by_round": ratios,
                    "rounds": rounds_json[1][i],
                }),
            );
        }
    }
    ctx.report.detail("scaleout", Value::Object(details));
    Ok(())
}

/// How many `outboxd run` processes a scale-out burst uses, and their runtime threads.
#[derive(Debug, Clone, Copy)]
struct ScaleoutConfig {
    procs: u64,
    /// `WEBHOOK_WORKER_THREADS`; `None` leaves the binary's default.
    threads: Option<u16>,
    /// Each process runs with its share of the cores: the configuration the target is
    /// for. The others run the default threads beside it, for comparison.
    target: bool,
    /// Pure polling (`WEBHOOK_LISTEN=false`), shown beside the push configurations and
    /// compared by the drain rate from the first receipt.
    poll: bool,
}

impl ScaleoutConfig {
    /// The JSON key and burst tag: `scaleout_4`, `scaleout_4_default_threads` or
    /// `scaleout_4_poll`.
    fn key(&self) -> String {
        if self.poll {
            format!("scaleout_{}_poll", self.procs)
        } else if self.target {
            format!("scaleout_{}", self.procs)
        } else {
            format!("scaleout_{}_default_threads", self.procs)
        }
    }

    fn mode(&self) -> Mode {
        if self.poll {
            Mode::PollProcs(self.procs as usize)
        } else {
            Mode::Procs(self.procs as usize)
        }
    }

    fn label(&self, cores: usize) -> String {
        let procs = self.procs;
        let threads = |n: usize| {
            if n == 1 {
                "1 thread".to_owned()
            } else {
                format!("{n} threads")
            }
        };
        let label = match self.threads {
            _ if procs == 1 => "scale-out 1 x outboxd run".to_owned(),
            Some(t) => format!(
                "scale-out {procs} x outboxd run, {} each",
                threads(usize::from(t))
            ),
            None => format!(
                "scale-out {procs} x outboxd run, default ({} each)",
                threads(cores)
            ),
        };
        if self.poll {
            format!("{label} (poll)")
        } else {
            label
        }
    }
}
