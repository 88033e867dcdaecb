//! Receivers that fail below HTTP: one that does not answer within
//! `WEBHOOK_HTTP_TIMEOUT_MS`, one that hangs up before answering. Each attempt is
//! recorded with its kind (`timeout`, `network`) and a reason without the URL (it may
//! carry a token), and the delivery is retried until the receiver answers.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::harness::{Receiver, Reply, RunningDispatcher, TestDb, test_config};

const URL_TOKEN: &str = "token-in-the-url-never-logged";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_outlasts_the_timeout_is_recorded_as_timeout_and_retried() {
    let db = TestDb::new("recv_timeout").await;
    let receiver = Receiver::start().await;
    receiver.sequence("/hook", vec![Reply::hang(), Reply::ok()]);
    db.add_endpoint(&format!("{}?token={URL_TOKEN}", receiver.url("/hook")), &[])
        .await;
    let mut config = test_config("recv_timeout");
    config.http_timeout = Duration::from_millis(1_000);
    let dispatcher = RunningDispatcher::start(&db.url, config);
    db.enqueue("order.created", &json!({"n": 1})).await;
    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;

    let attempts = db.attempts().await;
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(
        attempts[0].error_kind.as_deref(),
        Some("timeout"),
        "{attempts:#?}"
    );
    assert_eq!(attempts[0].status_code, None);
    let error = attempts[0].error.as_deref().unwrap_or_default();
    assert!(!error.is_empty() && !error.contains(URL_TOKEN), "{error}");
    assert_eq!(attempts[1].status_code, Some(200), "{attempts:#?}");
}

/// A plain TCP receiver: the first connection is read and closed without an answer,
/// every later one gets `200 OK`.
async fn hang_up_once() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            connections += 1;
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head (the body is small and follows it in the same packets).
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            if connections > 1 {
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
            }
            let _ = socket.shutdown().await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_hangs_up_is_recorded_as_network_and_retried() {
    let db = TestDb::new("recv_hangup").await;
    let port = hang_up_once().await;
    db.add_endpoint(
        &format!("http://127.0.0.1:{port}/hook?token={URL_TOKEN}"),
        &[],
    )
    .await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("recv_hangup"));
    db.enqueue("order.created", &json!({"n": 1})).await;
    db.wait_all_in_state(1, "delivered").await;
    dispatcher.stop().await;

    let attempts = db.attempts().await;
    assert_eq!(attempts.len(), 2, "{attempts:#?}");
    assert_eq!(
        attempts[0].error_kind.as_deref(),
        Some("network"),
        "{attempts:#?}"
    );
    let error = attempts[0].error.as_deref().unwrap_or_default();
    assert!(!error.is_empty() && !error.contains(URL_TOKEN), "{error}");
    assert_eq!(attempts[1].status_code, Some(200), "{attempts:#?}");
}
