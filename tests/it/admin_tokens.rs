//! The admin API's bearer token at its edges: a token given with surrounding whitespace
//! (read from a file, it ends in a newline) is the token without it, and an
//! `Authorization` header that is not text is refused like a wrong token.

use std::time::Duration;

use outboxd::admin::AdminState;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use tokio_util::sync::CancellationToken;

use crate::harness::TestDb;

const TOKEN: &str = "edge-admin-token-0123456789abcdef";

async fn status(http: &reqwest::Client, url: &str, authorization: HeaderValue) -> StatusCode {
    http.get(url)
        .header(AUTHORIZATION, authorization)
        .send()
        .await
        .expect("the admin API answers")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_is_compared_without_its_surrounding_whitespace_and_as_text() {
    let db = TestDb::new("admin_token_edges").await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!(
        "http://{}/v1/endpoints",
        listener.local_addr().expect("address")
    );
    let state = AdminState::new(
        db.pool().await,
        format!("  {TOKEN}\n"),
        Duration::from_secs(60),
    );
    assert_eq!(&*state.token, TOKEN);
    let stop = CancellationToken::new();
    let server = tokio::spawn(outboxd::admin::serve(listener, state, stop.clone()));
    let http = reqwest::Client::new();

    let bearer = |token: &str| HeaderValue::from_str(&format!("Bearer {token}")).expect("a header");
    assert_eq!(status(&http, &url, bearer(TOKEN)).await, StatusCode::OK);
    assert_eq!(
        status(
            &http,
            &url,
            bearer(&format!("  {TOKEN}\n").replace('\n', ""))
        )
        .await,
        StatusCode::OK,
        "spaces before the token are the header's, not the token's"
    );
    // Bytes that are not visible ASCII: no token can match them.
    let mut opaque = format!("Bearer {TOKEN}").into_bytes();
    opaque.push(0xff);
    let opaque = HeaderValue::from_bytes(&opaque).expect("an opaque header value");
    assert_eq!(status(&http, &url, opaque).await, StatusCode::UNAUTHORIZED);
    stop.cancel();
    server
        .await
        .expect("join")
        .expect("the server stops cleanly");
}
