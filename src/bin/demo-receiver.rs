//! A demo consumer for the quickstart: verifies each delivery's Standard Webhooks
//! signature and prints what arrived. Not part of the dispatcher.
//!
//! Environment: `DEMO_RECEIVER_ADDR` (default 127.0.0.1:8787) and
//! `DEMO_RECEIVER_SECRET` (the endpoint's `whsec_` secret). Listens on POST /webhook.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use outboxd::sign::{Secret, verify};

/// Verifiers reject timestamps further than this from their clock (replay protection).
const TOLERANCE_SECS: i64 = 300;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::var("DEMO_RECEIVER_ADDR").unwrap_or_else(|_| "127.0.0.1:8787".into());
    let secret = std::env::var("DEMO_RECEIVER_SECRET")
        .map_err(|_| anyhow::anyhow!("DEMO_RECEIVER_SECRET is not set"))?;
    let secret =
        Secret::parse(&secret).map_err(|e| anyhow::anyhow!("invalid DEMO_RECEIVER_SECRET: {e}"))?;
    let app = Router::new()
        .route("/webhook", post(receive))
        .with_state(Arc::new(secret));
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    // The address bound: with port 0, the one the system chose.
    let addr = listener.local_addr()?;
    println!("demo-receiver: listening on http://{addr}/webhook");
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}

async fn receive(State(secret): State<Arc<Secret>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let (id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let Ok(ts) = timestamp.parse::<i64>() else {
        println!("demo-receiver: rejected a request without a valid webhook-timestamp");
        return StatusCode::BAD_REQUEST;
    };
    if (now - ts).abs() > TOLERANCE_SECS {
        println!("demo-receiver: rejected webhook-id {id}: timestamp too far from now");
        return StatusCode::BAD_REQUEST;
    }
    if !verify(&secret, id, ts, &body, signature) {
        println!("demo-receiver: rejected webhook-id {id}: bad signature");
        return StatusCode::UNAUTHORIZED;
    }
    println!(
        "demo-receiver: verified webhook-id {id}: {}",
        String::from_utf8_lossy(&body)
    );
    StatusCode::NO_CONTENT
}
