//! Bad input to the binary: exit 2 and a message naming what to fix.

use std::time::Duration;

use crate::harness::{Spawned, TestDb, outboxd_command, run_to_end, sigterm};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_is_rejected_by_name() {
    let db = TestDb::new("badconfig").await;
    let cases = [
        ("WEBHOOK_BATCH_SIZE", "0"),
        ("WEBHOOK_POLL_INTERVAL_MS", "abc"),
        ("WEBHOOK_HTTP_TIMEOUT_MS", "90000"),
        ("WEBHOOK_LISTEN", "maybe"),
        ("WEBHOOK_LEASE_MS", "10"),
        ("WEBHOOK_BACKOFF_MAX_MS", "1"),
        ("WEBHOOK_POOL_SIZE", "1"),
        ("WEBHOOK_CONCURRENCY", "-5"),
        ("WEBHOOK_WORKER_THREADS", "0"),
        ("WEBHOOK_WORKER_THREADS", "1025"),
        ("WEBHOOK_BACKOFF_MAX_MS", "2592000001"),
        ("WEBHOOK_RETENTION_HOURS", "100001"),
        ("WEBHOOK_LISTEN_DATABASE_URL", "postgres://[::1"),
        // The admin API never runs without a token.
        ("ADMIN_ADDR", "127.0.0.1:0"),
    ];
    for (variable, value) in cases {
        let mut command = outboxd_command();
        command
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env(variable, value);
        let finished = run_to_end(command).await;
        assert_eq!(
            finished.code,
            Some(2),
            "{variable}={value} must exit 2: {finished:?}"
        );
        assert!(
            finished.stderr.contains(variable),
            "{variable}={value}: stderr must name the variable: {}",
            finished.stderr
        );
    }
    // Nothing ran: no dispatcher touched the database.
    let touched: i64 = db.scalar("SELECT count(*) FROM webhook_deliveries").await;
    assert_eq!(touched, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_endpoint_input_is_rejected() {
    let db = TestDb::new("badendpoint").await;
    let cases: [(&[&str], &str); 4] = [
        (&["--url", "ftp://x"], "scheme must be http or https"),
        (
            &["--url", "https://example.com/hook", "--secret", "nope"],
            "whsec_",
        ),
        (
            &[
                "--url",
                "https://example.com/hook",
                "--secret",
                "whsec_c2hvcnQ=",
            ],
            "24 to 64 bytes",
        ),
        (
            &[
                "--url",
                "https://example.com/hook",
                "--event-type",
                "order*",
            ],
            "order*",
        ),
    ];
    for (args, message) in cases {
        let mut command = outboxd_command();
        command
            .args(["endpoint", "add"])
            .args(args)
            .env("DATABASE_URL", &db.url);
        let finished = run_to_end(command).await;
        assert_eq!(finished.code, Some(2), "{args:?} must exit 2: {finished:?}");
        assert!(
            finished.stderr.contains(message),
            "{args:?}: stderr must say {message:?}: {}",
            finished.stderr
        );
        // A refused secret is not echoed back (it may be a real one, mistyped).
        if let Some(i) = args.iter().position(|a| *a == "--secret") {
            assert!(!finished.stderr.contains(args[i + 1]), "{finished:?}");
        }
    }
    let endpoints: i64 = db.scalar("SELECT count(*) FROM webhook_endpoints").await;
    assert_eq!(endpoints, 0, "nothing may be registered");

    // The same command with good input works (so the failures above are about input).
    let mut command = outboxd_command();
    command
        .args([
            "endpoint",
            "add",
            "--url",
            "https://example.com/hook",
            "--json",
        ])
        .env("DATABASE_URL", &db.url);
    let finished = run_to_end(command).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let out: serde_json::Value = serde_json::from_str(finished.stdout.trim()).unwrap();
    assert!(
        out["secret"]
            .as_str()
            .is_some_and(|s| s.starts_with("whsec_"))
    );
    let endpoints: i64 = db.scalar("SELECT count(*) FROM webhook_endpoints").await;
    assert_eq!(endpoints, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_refuses_an_unmigrated_database_and_migrate_fixes_it() {
    let db = TestDb::empty("climigrate").await;
    let command = |args: &[&str]| {
        let mut command = outboxd_command();
        command.args(args).env("DATABASE_URL", &db.url);
        command
    };

    let mut run = command(&["run"]);
    run.env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true");
    let refused = run_to_end(run).await;
    assert_ne!(refused.code, Some(0), "{refused:?}");
    assert!(
        refused.stderr.contains("outboxd migrate"),
        "the error must say how to fix it: {}",
        refused.stderr
    );

    let first = run_to_end(command(&["migrate"])).await;
    assert_eq!(first.code, Some(0), "{first:?}");
    for (name, _) in outboxd::schema::MIGRATIONS {
        assert!(first.stdout.contains(name), "{first:?}");
    }
    let second = run_to_end(command(&["migrate"])).await;
    assert_eq!(second.code, Some(0), "{second:?}");
    assert!(second.stdout.contains("up to date"), "{second:?}");

    // Without DATABASE_URL the binary says what is missing.
    let mut bare = outboxd_command();
    bare.arg("migrate");
    let missing = run_to_end(bare).await;
    assert_ne!(missing.code, Some(0), "{missing:?}");
    assert!(missing.stderr.contains("DATABASE_URL"), "{missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_url_without_listen_is_said_to_be_unused() {
    let db = TestDb::new("unused_listen").await;
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_LISTEN", "false")
        .env("WEBHOOK_LISTEN_DATABASE_URL", &db.url);
    let outboxd = Spawned::start(command);
    outboxd
        .wait_for_stderr("WEBHOOK_LISTEN=false: WEBHOOK_LISTEN_DATABASE_URL is not used")
        .await;
    sigterm(outboxd.pid());
    let finished = outboxd.finish(Duration::from_secs(60)).await;
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_listen_url_is_named_as_such() {
    let db = TestDb::new("bad_listen_tls").await;
    // Valid syntax, but its root certificate cannot be read: found when the LISTEN
    // session's connector is made, and named as the listen URL's fault, not DATABASE_URL's.
    let listen = format!(
        "{}?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem",
        db.url
    );
    let mut command = outboxd_command();
    command
        .arg("run")
        .env("DATABASE_URL", &db.url)
        .env("WEBHOOK_LISTEN_DATABASE_URL", &listen);
    let finished = run_to_end(command).await;
    assert_eq!(finished.code, Some(2), "{finished:?}");
    assert!(
        finished.stderr.contains("WEBHOOK_LISTEN_DATABASE_URL")
            && finished.stderr.contains("sslrootcert")
            && !finished.stderr.contains("invalid DATABASE_URL"),
        "{}",
        finished.stderr
    );
}
