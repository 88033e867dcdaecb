//! Receiver ceiling: the bench's receiver alone, driven by an in-process hyper client
//! over `BENCH_CEILING_CONNS` keep-alive connections. It measures how many requests per
//! second the receiver (and the loopback) can take on this machine, so that a
//! dispatcher figure near it is read as the receiver's limit, not outboxd's. No
//! database and no dispatcher.

use std::time::{Duration, Instant};

use anyhow::bail;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::ctx::Ctx;
use crate::pg;
use crate::report::int;

/// The receiver alone, hammered by an in-process hyper client.
pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()> {
    ctx.receiver.take().await?;
    let conns = ctx.s.ceiling_conns;
    let secs = ctx.s.ceiling_secs;
    let body = Bytes::from(
        json!({"id": "1", "type": "bench.ceiling", "timestamp": "2025-01-01T00:00:00.000000Z",
               "data": pg::payload(1, 510)})
        .to_string(),
    );
    let port = ctx.receiver.port();
    let probe = ctx.probe(Vec::new());
    let snap0 = probe.snap();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            stream.set_nodelay(true)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let mut n = 0_u64;
            while tokio::time::Instant::now() < deadline {
                let request = hyper::Request::post("/hook/0")
                    .header("host", "127.0.0.1")
                    .header("content-type", "application/json")
                    .header("webhook-id", (c * 1_000_000 + n).to_string())
                    .body(Full::new(body.clone()))?;
                sender.ready().await?;
                let response = sender.send_request(request).await?;
                if response.status() != hyper::StatusCode::NO_CONTENT {
                    bail!("receiver answered {}", response.status());
                }
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = snap0.until(&probe.snap());
    let recorded = ctx.receiver.take().await?.len() as u64;
    let rate = total as f64 / elapsed;
    eprintln!("bench:   receiver ceiling: {} requests/s", int(rate));
    let label = format!("receiver ceiling, {conns} conns, {secs} s");
    ctx.report.info(
        &label,
        &format!("requests/s ({}-byte body)", body.len()),
        int(rate),
    );
    ctx.report.cpu(&label, cpu, Some(total));
    ctx.report.detail(
        "ceiling",
        json!({
            "connections": conns,
            "seconds": elapsed,
            "requests": total,
            "recorded_by_receiver": recorded,
            "requests_per_s": rate,
            "body_bytes": body.len(),
            "cpu": cpu.json(),
        }),
    );
    if recorded != total {
        bail!("the receiver recorded {recorded} of {total} requests");
    }
    Ok(())
}
