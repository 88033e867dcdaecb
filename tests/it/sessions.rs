//! What outboxd's sessions run with: the user's `options` honoured everywhere, and the
//! settings its statements need set explicitly, whatever the database's defaults.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{
    Receiver, RunningDispatcher, TestDb, outboxd_command, run_to_end, test_config,
};

/// `url` with one more query parameter.
fn with_param(url: &str, param: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}{param}")
}

/// The test server's URL for `dbname` in key=value form.
fn key_value(url: &str) -> String {
    let url = url::Url::parse(url).expect("DATABASE_URL is a URL");
    format!(
        "host={} port={} user={} dbname={}",
        url.host_str().expect("a host"),
        url.port().unwrap_or(5432),
        url.username(),
        url.path().trim_start_matches('/')
    )
}

async fn migrate_with_the_binary(database_url: &str) {
    let mut migrate = outboxd_command();
    migrate.arg("migrate").env("DATABASE_URL", database_url);
    let finished = run_to_end(migrate).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_in_their_own_schema_work_for_every_session() {
    let db = TestDb::empty("schema").await;
    db.client
        .batch_execute("CREATE SCHEMA webhooks")
        .await
        .unwrap();
    let url = with_param(&db.url, "options=-csearch_path%3Dwebhooks");
    migrate_with_the_binary(&url).await;
    let placed: (bool, bool) = db
        .client
        .query_one(
            "SELECT to_regclass('webhooks.webhook_outbox') IS NOT NULL,
                    to_regclass('public.webhook_outbox') IS NULL",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(placed, (true, true), "the tables belong in schema webhooks");

    let receiver = Receiver::start().await;
    let client = outboxd::db::connect(&url).await.expect("connect");
    outboxd::endpoint::add(
        &client,
        outboxd::NewEndpoint {
            url: receiver.url("/hook"),
            event_types: Vec::new(),
            secret: None,
            description: "schema".into(),
            ..Default::default()
        },
    )
    .await
    .expect("register");
    let dispatcher = RunningDispatcher::start(&url, test_config("schema"));
    outboxd::enqueue(
        &client,
        &outboxd::NewEvent::new("order.created", &json!({"n": 1})),
    )
    .await
    .expect("enqueue");
    receiver.wait_for(1).await;
    db.wait_until("SELECT count(*) = 1 FROM webhooks.webhook_deliveries WHERE state = 'delivered'")
        .await;
    assert_eq!(dispatcher.stop().await.totals.delivered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatcher_session_runs_with_the_users_options_and_its_own_settings() {
    let db = TestDb::empty("settings").await;
    db.client
        .batch_execute(&format!(
            "CREATE SCHEMA webhooks;
             ALTER DATABASE {} SET default_transaction_isolation = 'serializable';
             ALTER DATABASE {0} SET lock_timeout = 0;",
            db.name
        ))
        .await
        .unwrap();
    // key=value form, a quoted value with spaces, as libpq reads it.
    let conninfo = format!(
        "{} options='-c search_path=webhooks -c work_mem=9MB'",
        key_value(&db.url)
    );
    let config = outboxd::Config {
        db_lock_timeout: Duration::from_millis(1_500),
        db_statement_timeout: Duration::from_millis(45_000),
        ..test_config("settings")
    };
    let sessions =
        outboxd::db::Connector::new(&conninfo, outboxd::db::Session::dispatcher(&config))
            .expect("a connector");
    let pool = outboxd::db::pool(&sessions, config.pool_size)
        .await
        .expect("a dispatcher pool");
    let conn = pool.get().await.expect("a session");
    let mut shown = Vec::new();
    for name in [
        "search_path",
        "work_mem",
        "default_transaction_isolation",
        "synchronous_commit",
        "lock_timeout",
        "statement_timeout",
        "idle_in_transaction_session_timeout",
        "jit",
    ] {
        let row = conn
            .simple_query(&format!("SHOW {name}"))
            .await
            .expect("SHOW");
        let value = row
            .iter()
            .find_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .expect("a value");
        shown.push((name, value));
    }
    assert_eq!(
        shown,
        [
            ("search_path", "webhooks".to_owned()),
            ("work_mem", "9MB".to_owned()),
            ("default_transaction_isolation", "read committed".to_owned()),
            ("synchronous_commit", "off".to_owned()),
            ("lock_timeout", "1500ms".to_owned()),
            ("statement_timeout", "45s".to_owned()),
            ("idle_in_transaction_session_timeout", "1min".to_owned()),
            ("jit", "off".to_owned()),
        ]
    );

    // An operator's session: read committed too, and a lock_timeout its options may set.
    let admin = outboxd::db::connect(&conninfo).await.expect("connect");
    let row = admin
        .query_one(
            "SELECT current_setting('default_transaction_isolation'),
                    current_setting('lock_timeout'), current_setting('search_path')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, String>(0),
            row.get::<_, String>(1),
            row.get::<_, String>(2)
        ),
        ("read committed".into(), "10s".into(), "webhooks".into())
    );
    let admin = outboxd::db::connect(&format!(
        "{} options='-c lock_timeout=250'",
        key_value(&db.url)
    ))
    .await
    .expect("connect");
    let lock_timeout: String = admin
        .query_one("SELECT current_setting('lock_timeout')", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(lock_timeout, "250ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serializable_database_still_dispatches_at_read_committed() {
    let db = TestDb::empty("serializable").await;
    db.client
        .batch_execute(&format!(
            "ALTER DATABASE {} SET default_transaction_isolation = 'serializable'",
            db.name
        ))
        .await
        .unwrap();
    migrate_with_the_binary(&db.url).await;
    // Records the settings of every session that writes a delivery row: the
    // dispatcher's claim (fan-out and lease) and its settle.
    db.client
        .batch_execute(
            "CREATE TABLE seen (app text, isolation text, sync text, lock_timeout text,
                                statement_timeout text);
             CREATE FUNCTION record_session() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 INSERT INTO seen VALUES (current_setting('application_name'),
                     current_setting('transaction_isolation'),
                     current_setting('synchronous_commit'),
                     current_setting('lock_timeout'),
                     current_setting('statement_timeout'));
                 RETURN NULL;
             END $$;
             CREATE TRIGGER record_session AFTER INSERT OR UPDATE ON webhook_deliveries
                 FOR EACH ROW EXECUTE FUNCTION record_session();",
        )
        .await
        .unwrap();
    let receiver = Receiver::start().await;
    db.add_endpoint(&receiver.url("/hook"), &[]).await;
    let dispatcher = RunningDispatcher::start(&db.url, test_config("serializable"));
    // Producers at the database's default, SERIALIZABLE.
    let mut producers = Vec::new();
    for p in 0..4 {
        let client = db.connect().await;
        producers.push(tokio::spawn(async move {
            for n in 0..5 {
                client
                    .execute(
                        "INSERT INTO webhook_outbox (event_type, payload)
                         VALUES ('order.created', jsonb_build_object('p', $1::int, 'n', $2::int))",
                        &[&p, &n],
                    )
                    .await
                    .expect("a serializable producer enqueues");
            }
        }));
    }
    for producer in producers {
        producer.await.unwrap();
    }
    db.wait_all_in_state(20, "delivered").await;
    assert_eq!(dispatcher.stop().await.totals.delivered, 20);

    let rows = db
        .client
        .query(
            "SELECT DISTINCT isolation, sync, lock_timeout, statement_timeout
             FROM seen WHERE app = 'outboxd'",
            &[],
        )
        .await
        .unwrap();
    let seen: Vec<(String, String, String, String)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(
        seen,
        [(
            "read committed".to_owned(),
            "off".to_owned(),
            "5s".to_owned(),
            "30s".to_owned()
        )],
        "every write of the dispatcher ran with its own settings"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_command_gives_up_on_a_lock_instead_of_hanging() {
    let db = TestDb::new("oplock").await;
    let (id, _) = db.add_endpoint("http://127.0.0.1:9/hook", &[]).await;
    let mut holder = db.connect().await;
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM webhook_endpoints WHERE id = $1 FOR UPDATE",
        &[&id],
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut disable = outboxd_command();
    disable
        .args(["endpoint", "disable", &id.to_string()])
        .env("DATABASE_URL", &db.url);
    let finished = run_to_end(disable).await;
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("lock timeout"), "{finished:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "it waited a while first"
    );
    tx.rollback().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_limits_are_checked_by_name() {
    let db = TestDb::new("dblimits").await;
    for (variable, value) in [
        ("WEBHOOK_DB_LOCK_TIMEOUT_MS", "5"),
        ("WEBHOOK_DB_LOCK_TIMEOUT_MS", "soon"),
        ("WEBHOOK_DB_STATEMENT_TIMEOUT_MS", "50"),
        ("WEBHOOK_DB_STATEMENT_TIMEOUT_MS", "1000"),
    ] {
        let mut run = outboxd_command();
        run.arg("run")
            .env("DATABASE_URL", &db.url)
            .env(variable, value);
        let finished = run_to_end(run).await;
        assert_eq!(finished.code, Some(2), "{variable}={value}: {finished:?}");
        assert!(
            finished.stderr.contains(variable),
            "{variable}={value}: {finished:?}"
        );
    }
}
