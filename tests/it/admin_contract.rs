//! The admin API against its OpenAPI document, checked by schemathesis: the real
//! `outboxd run` serves the API on a loopback port, and schemathesis (pinned, installed
//! by `scripts/schemathesis.sh` into a virtualenv under `target/`) generates requests
//! from `/openapi.json` — valid ones, which must not be refused as malformed, and
//! invalid ones, which must be — and checks every answer against the document
//! (`--checks all`: no 5xx, documented statuses, content types and response schemas).

use std::time::Instant;

use serde_json::json;

use crate::admin::{start_binary_api, stop_binary};
use crate::harness::{TestDb, WAIT};

const TOKEN: &str = "contract-admin-token-0123456789";
/// Fixed, so a failure is reproducible (`st run ... --seed 1`).
const SEED: &str = "1";
/// Examples per operation and phase: enough to reach every field's edge cases (the
/// coverage phase enumerates those anyway), few enough to finish in well under a minute
/// on two shared cores.
const MAX_EXAMPLES: &str = "40";
/// Where every endpoint URL is pinned: the discard port on loopback. With private
/// targets refused, the dispatcher never opens a connection at all.
const PINNED_URL: &str = "http://127.0.0.1:9/contract";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_keeps_its_openapi_contract() {
    let db = TestDb::new("admin_contract").await;
    // schemathesis registers endpoints at URLs of its own invention and sends them test
    // events. So that nothing leaves the machine, whatever URL the API validated and
    // stored is replaced in the table by a loopback one the guard refuses.
    db.client
        .batch_execute(&format!(
            "CREATE FUNCTION contract_pin_url() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN NEW.url := '{PINNED_URL}'; RETURN NEW; END $$;
             CREATE TRIGGER contract_pin_url BEFORE INSERT OR UPDATE ON webhook_endpoints
             FOR EACH ROW EXECUTE FUNCTION contract_pin_url();"
        ))
        .await
        .expect("pin endpoint URLs");

    let (outboxd, base) = start_binary_api(&db, TOKEN).await;
    // Something to list: endpoints (one disabled), events, dead and parked deliveries
    // with their attempts.
    let http = reqwest::Client::new();
    let mut endpoint_ids = Vec::new();
    for (url, types) in [
        ("https://a.example.com/hook", json!([])),
        ("https://b.example.com/hook", json!(["order.*"])),
    ] {
        let created = http
            .post(format!("{base}/v1/endpoints"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(json!({"url": url, "event_types": types}).to_string())
            .send()
            .await
            .expect("register")
            .text()
            .await
            .expect("an answer");
        let created: serde_json::Value = serde_json::from_str(&created).expect("an endpoint");
        endpoint_ids.push(created["id"].as_i64().expect("an id"));
    }
    for n in 0..6 {
        db.enqueue(
            if n % 2 == 0 {
                "order.created"
            } else {
                "user.created"
            },
            &json!({ "n": n }),
        )
        .await;
    }
    db.wait_until("SELECT count(*) = 9 AND bool_and(state = 'dead') FROM webhook_deliveries")
        .await;
    let disabled = http
        .patch(format!("{base}/v1/endpoints/{}", endpoint_ids[1]))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(json!({"active": false}).to_string())
        .send()
        .await
        .expect("disable");
    assert!(disabled.status().is_success(), "{disabled:?}");

    let work = concat!(env!("CARGO_TARGET_TMPDIR"), "/admin-contract");
    std::fs::create_dir_all(work).expect("a working directory");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/schemathesis.sh");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/schemathesis.toml");
    let args = [
        "--config-file".to_owned(),
        config.to_owned(),
        "run".to_owned(),
        format!("{base}/openapi.json"),
        "--header".to_owned(),
        format!("Authorization: Bearer {TOKEN}"),
        "--checks".to_owned(),
        "all".to_owned(),
        "--seed".to_owned(),
        SEED.to_owned(),
        "--max-examples".to_owned(),
        MAX_EXAMPLES.to_owned(),
        "--generation-database".to_owned(),
        "none".to_owned(),
        "--request-timeout".to_owned(),
        "30".to_owned(),
        "--no-color".to_owned(),
    ];
    println!(
        "running: scripts/schemathesis.sh {}",
        args.join(" ").replace(TOKEN, "$ADMIN_TOKEN")
    );
    let started = Instant::now();
    let run = tokio::process::Command::new(script)
        .args(&args)
        .current_dir(work)
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output();
    // Installing schemathesis the first time takes a while; a run itself takes seconds.
    let bound = WAIT * 15;
    let output = tokio::time::timeout(bound, run)
        .await
        .unwrap_or_else(|_| panic!("schemathesis did not finish within {bound:?}"))
        .expect("run scripts/schemathesis.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let finished = stop_binary(outboxd).await;
    if output.status.code() == Some(77) {
        println!("SKIPPED admin_api_keeps_its_openapi_contract: {stderr}");
        return;
    }
    println!("{stdout}");
    println!("schemathesis took {:?}", started.elapsed());
    assert!(
        output.status.success(),
        "schemathesis found requests or answers that break the document \
         (status {:?}):\n{stdout}\n{stderr}",
        output.status.code()
    );
    assert!(
        stdout.contains("passed") && !stdout.contains(" 0 generated"),
        "schemathesis ran no case:\n{stdout}"
    );
    // Nothing was ever sent anywhere: every endpoint was pinned to a refused target.
    let sent: i64 = db
        .scalar("SELECT count(*) FROM webhook_attempts WHERE status_code IS NOT NULL")
        .await;
    assert_eq!(sent, 0);
    assert!(
        !finished.stderr.contains("admin API request failed"),
        "{}",
        finished.stderr
    );
}
