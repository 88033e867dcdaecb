//! The least-privileged roles of docs/operations.md ("Database roles"), run as they
//! stand there: migrations as a non-superuser owner, a dispatcher that neither is a
//! superuser nor owns the tables delivering what a producer role inserted (a retry
//! included), and operator commands, from the real binary, as the operator role.

use std::time::Duration;

use tokio_postgres::NoTls;

use crate::harness::{
    Receiver, Reply, RunningDispatcher, TestDb, outboxd_command, run_to_end, test_config, unique,
};

/// The ```sql block of docs/operations.md whose first line is `first_line`.
fn documented_sql(first_line: &str) -> String {
    let doc = include_str!("../../docs/operations.md");
    let start = doc
        .find(&format!("```sql\n{first_line}\n"))
        .unwrap_or_else(|| panic!("docs/operations.md has no sql block starting {first_line:?}"));
    let block = &doc[start + "```sql\n".len()..];
    block[..block.find("```").expect("the block ends")].to_owned()
}

/// The documented role names, made unique to this test (roles are cluster-wide).
struct Names {
    suffix: String,
    database: String,
}

impl Names {
    fn role(&self, documented: &str) -> String {
        format!("{documented}_{}", self.suffix)
    }

    fn apply(&self, sql: &str) -> String {
        let mut sql = sql.replace("appdb", &self.database);
        for role in [
            "outboxd_migrator",
            "outboxd_dispatcher",
            "outboxd_operator",
            "app_producer",
        ] {
            sql = sql.replace(role, &self.role(role));
        }
        sql
    }
}

fn url_as(db: &TestDb, user: &str) -> String {
    let mut url = url::Url::parse(&db.url).expect("the test URL is a URL");
    url.set_username(user).expect("user");
    url.to_string()
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"));
    tokio::spawn(connection);
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_minimal_roles_migrate_produce_deliver_and_operate() {
    let db = TestDb::empty("roles").await;
    if !db.may_create_roles().await {
        eprintln!("SKIPPED: the test database user may not create roles");
        return;
    }
    let names = Names {
        suffix: unique("r").to_lowercase(),
        database: db.name.clone(),
    };
    db.client
        .batch_execute(&names.apply(&documented_sql("-- outboxd roles: as an administrator")))
        .await
        .expect("the administrator's part of docs/operations.md runs");

    // Migrations as the owner, who is no superuser.
    let mut migrator = connect(&url_as(&db, &names.role("outboxd_migrator"))).await;
    let applied = outboxd::schema::migrate(&mut migrator)
        .await
        .expect("every migration runs as a non-superuser owner");
    assert_eq!(applied.len(), outboxd::schema::MIGRATIONS.len());
    migrator
        .batch_execute(&names.apply(&documented_sql(
            "-- outboxd grants: as the migrator, after `outboxd migrate`",
        )))
        .await
        .expect("the migrator's part of docs/operations.md runs");

    // An endpoint registered with the CLI as the operator.
    let receiver = Receiver::start().await;
    receiver.sequence("/hook", vec![Reply::status(500), Reply::ok()]);
    let operator_url = url_as(&db, &names.role("outboxd_operator"));
    let mut add = outboxd_command();
    add.args(["endpoint", "add", "--url", &receiver.url("/hook")])
        .env("DATABASE_URL", &operator_url);
    let added = run_to_end(add).await;
    assert_eq!(added.code, Some(0), "endpoint add: {}", added.stderr);

    // Events inserted by the producer, in its own transaction.
    const EVENTS: i32 = 20;
    let mut producer = connect(&url_as(&db, &names.role("app_producer"))).await;
    let tx = producer.transaction().await.expect("begin");
    for n in 1..=EVENTS {
        let payload = serde_json::json!({ "n": n });
        let key = format!("order-{n}");
        let mut event = outboxd::NewEvent::new("order.created", &payload);
        event.idempotency_key = Some(key.as_str());
        outboxd::enqueue(&tx, &event)
            .await
            .expect("the producer may enqueue")
            .expect("a new event");
    }
    tx.commit().await.expect("commit");
    tx_plain_insert(&producer).await;

    // The dispatcher, as its own role, delivers everything, the first try failing.
    let dispatcher = RunningDispatcher::start(
        &url_as(&db, &names.role("outboxd_dispatcher")),
        test_config("roles"),
    );
    db.wait_all_in_state_within(i64::from(EVENTS) + 1, "delivered", Duration::from_secs(60))
        .await;
    // Idle, it armed the doorbell and opened its gate: its push-mode writes are granted.
    db.wait_until(
        "SELECT armed AND pg_sequence_last_value('webhook_doorbell_gate') IS NULL \
         FROM webhook_doorbell",
    )
    .await;
    dispatcher.stop().await;
    assert_eq!(
        receiver.count(),
        EVENTS as usize + 2,
        "one retry, then each once"
    );
    // Its housekeeping prunes as that role too (sql/0007's frontier included).
    let dispatcher_pool = outboxd::db::admin_pool(&url_as(&db, &names.role("outboxd_dispatcher")))
        .await
        .expect("a pool as the dispatcher");
    let policy = outboxd::retention::RetentionPolicy {
        delivered: Duration::from_secs(3600),
        dead: Duration::from_secs(3600),
    };
    outboxd::retention::prune(&dispatcher_pool, policy, Duration::from_secs(30))
        .await
        .expect("the dispatcher's role may prune");
    drop(dispatcher_pool);

    // The operator's views work too.
    for args in [&["stats"][..], &["deliveries", "list", "--json"][..]] {
        let mut command = outboxd_command();
        command.args(args).env("DATABASE_URL", &operator_url);
        let finished = run_to_end(command).await;
        assert_eq!(finished.code, Some(0), "{args:?}: {}", finished.stderr);
    }

    let admin = connect(&crate::harness::admin_url()).await;
    drop(migrator);
    drop(producer);
    drop(db);
    for role in [
        "outboxd_operator",
        "outboxd_dispatcher",
        "outboxd_migrator",
        "app_producer",
    ] {
        let _ = admin
            .batch_execute(&format!("DROP ROLE IF EXISTS {}", names.role(role)))
            .await;
    }
}

/// The README's plain SQL form works for the producer role too.
async fn tx_plain_insert(producer: &tokio_postgres::Client) {
    producer
        .batch_execute(
            "BEGIN; INSERT INTO webhook_outbox (event_type, payload) \
             VALUES ('order.paid', '{\"order_id\": 42}'); COMMIT;",
        )
        .await
        .expect("a plain INSERT as the producer");
}
