//! Producer cost: what outboxd costs the application's inserts.
//! `BENCH_PRODUCER_CONNS` connections insert as fast as they can, with the notify
//! trigger (and a dispatcher running) and without it, in alternating phases. The
//! trigger runs inside every producer's transaction, so its cost is paid by the
//! application; the target is that it keeps 90% of the insert rate. Round 0 is an
//! uncounted warm-up, and the measured rounds alternate which half goes first, so
//! neither gains from the machine drifting; each phase starts with the dispatcher idle.
//! In pure-poll mode no dispatcher opens the doorbell's gate, so the trigger costs
//! only its `WHEN` test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;
use tokio_postgres::Client;

use crate::ctx::Ctx;
use crate::dispatcher::Mode;
use crate::pg;
use crate::report::{int, median};
use crate::sys::Cpu;

/// Producers' insert rate with and without the notify trigger, dispatcher running.
/// The target is for push mode. In pure-poll mode no dispatcher ever opens the
/// doorbell's gate, so the trigger costs only its `WHEN` test; the table shows it.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    for mode in [Mode::Push, Mode::Poll] {
        let tag = format!("producer_{}", mode.label());
        ctx.with_db(&tag, async |ctx, url, client| {
            producer_in(ctx, mode, url, client).await
        })
        .await?;
    }
    Ok(())
}

async fn producer_in(ctx: &mut Ctx, mode: Mode, url: &str, client: &Client) -> anyhow::Result<()> {
    let push = mode == Mode::Push;
    let running = ctx.start_one_endpoint(url, client, mode).await?;
    let probe = ctx.probe(Vec::new());
    let mut producers = Vec::new();
    for _ in 0..ctx.s.producer_conns {
        producers.push(pg::connect(url).await?);
    }
    let payload = Arc::new(pg::payload(0, ctx.s.payload_bytes));
    let phase = Duration::from_secs(ctx.s.producer_secs);
    let mut inserted = 0_u64;
    let mut delivered = 0_u64;
    let mut with = Vec::new();
    let mut without = Vec::new();
    let mut cpu_with: Option<Cpu> = None;
    let mut cpu_without: Option<Cpu> = None;
    let (mut inserted_with, mut inserted_without) = (0_u64, 0_u64);
    let mut phases = Vec::new();
    // Round 0 is a warm-up and is not counted: the first phase after the dispatcher
    // starts was 10-17% slower than the rest, whichever it was. The measured rounds
    // alternate which half goes first, so neither gains from the machine drifting.
    for round in 0..=ctx.s.producer_rounds {
        let warmup = round == 0;
        let order = if round % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for trigger in order {
            pg::set_trigger(client, trigger).await?;
            // Start each phase with the dispatcher idle: no backlog from the last one.
            ctx.receiver
                .wait_for(inserted - delivered, Duration::from_secs(30))
                .await?;
            delivered += ctx.receiver.take().await?.len() as u64;
            if trigger && push {
                pg::wait_push_ready(client, 1, Duration::from_secs(10)).await?;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let snap0 = probe.snap();
            let started = Instant::now();
            let length = if warmup {
                phase.min(Duration::from_secs(2))
            } else {
                phase
            };
            let deadline = tokio::time::Instant::now() + length;
            let mut tasks = Vec::new();
            for mut producer in std::mem::take(&mut producers) {
                let payload = Arc::clone(&payload);
                tasks.push(tokio::spawn(async move {
                    let mut n = 0_u64;
                    while tokio::time::Instant::now() < deadline {
                        pg::produce_one(&mut producer, &payload, "bench.producer").await?;
                        n += 1;
                    }
                    anyhow::Ok((producer, n))
                }));
            }
            let mut n = 0;
            for task in tasks {
                let (producer, count) = task.await??;
                producers.push(producer);
                n += count;
            }
            let elapsed = started.elapsed().as_secs_f64();
            let cpu = snap0.until(&probe.snap());
            inserted += n;
            let rate = n as f64 / elapsed;
            eprintln!(
                "bench:   {} {} trigger {}: {} inserts/s",
                mode.label(),
                if warmup {
                    "warm-up".to_string()
                } else {
                    format!("round {round}")
                },
                if trigger { "on " } else { "off" },
                int(rate)
            );
            if warmup {
                continue;
            }
            phases.push(json!({
                "round": round,
                "trigger": trigger,
                "inserts": n,
                "seconds": elapsed,
                "inserts_per_s": rate,
                "cpu": cpu.json(),
            }));
            let (rates, acc, count) = if trigger {
                (&mut with, &mut cpu_with, &mut inserted_with)
            } else {
                (&mut without, &mut cpu_without, &mut inserted_without)
            };
            *count += n;
            rates.push(rate);
            Cpu::accumulate(acc, &cpu);
        }
    }
    pg::set_trigger(client, true).await?;
    let got = ctx
        .receiver
        .wait_for(inserted - delivered, Duration::from_secs(30))
        .await?;
    delivered += ctx.receiver.take().await?.len() as u64;
    let dispatcher = running.stop().await?;
    let (a, b) = (median(&with), median(&without));
    let ratio = a / b;
    let label = format!(
        "producer cost, {} conns, {} x {} s rounds ({})",
        ctx.s.producer_conns,
        ctx.s.producer_rounds,
        ctx.s.producer_secs,
        mode.label()
    );
    ctx.report
        .info(&label, "median inserts/s with trigger + dispatcher", int(a));
    ctx.report
        .info(&label, "median inserts/s without trigger", int(b));
    ctx.report.target_if(
        push,
        &label,
        "ratio with / without",
        format!("{ratio:.3}"),
        ">= 0.90",
        ratio >= 0.90,
    );
    if let Some(c) = cpu_with {
        ctx.report.cpu(
            &format!("producers, trigger on ({})", mode.label()),
            c,
            Some(inserted_with),
        );
    }
    if let Some(c) = cpu_without {
        ctx.report.cpu(
            &format!("producers, trigger off ({})", mode.label()),
            c,
            Some(inserted_without),
        );
    }
    ctx.report.detail(
        if push { "producer" } else { "producer_poll" },
        json!({
            "mode": mode.label(),
            "connections": ctx.s.producer_conns,
            "median_with_trigger": a,
            "median_without_trigger": b,
            "ratio": ratio,
            "phases": phases,
            "inserted": inserted,
            "delivered": delivered,
            "receiver_count_at_end": got,
            "dispatcher_report": dispatcher,
        }),
    );
    if delivered < inserted {
        bail!("only {delivered} of {inserted} producer events were delivered");
    }
    Ok(())
}
