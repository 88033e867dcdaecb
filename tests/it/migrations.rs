//! Migrations: once each, also when racing, the SQL files applied by hand, and a
//! released file that changed refused by name.

use outboxd::schema::{self, MIGRATIONS};

use crate::harness::{TestDb, outboxd_command, run_to_end};

/// The `.sql` files on disk, in name order, as an operator applying them by hand sees
/// them.
fn sql_files() -> Vec<(String, String)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/sql");
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .expect("read sql/")
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "sql"))
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&path).expect("read a migration");
            (name, text)
        })
        .collect();
    files.sort();
    files
}

fn all_names() -> Vec<&'static str> {
    MIGRATIONS.iter().map(|(name, _)| *name).collect()
}

async fn recorded(db: &TestDb) -> Vec<String> {
    db.client
        .query("SELECT name FROM outboxd_migrations ORDER BY name", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// The schema works: an endpoint, an event through the trigger, the doorbell row.
async fn assert_usable(db: &TestDb) {
    db.add_endpoint("https://example.com/hook", &["order.*"])
        .await;
    db.enqueue("order.created", &serde_json::json!({})).await;
    let doorbells: i64 = db.scalar("SELECT count(*) FROM webhook_doorbell").await;
    assert_eq!(doorbells, 1);
    let tables: i64 = db
        .scalar(
            "SELECT count(*) FROM pg_tables WHERE tablename IN
             ('webhook_outbox', 'webhook_endpoints', 'webhook_deliveries', 'webhook_attempts')",
        )
        .await;
    assert_eq!(tables, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent() {
    let mut db = TestDb::empty("migrate").await;
    assert_eq!(
        schema::pending_migrations(&db.client).await.unwrap(),
        all_names()
    );
    let first = schema::migrate(&mut db.client).await.unwrap();
    assert_eq!(first, all_names());
    let second = schema::migrate(&mut db.client).await.unwrap();
    assert!(second.is_empty(), "{second:?}");
    assert!(
        schema::pending_migrations(&db.client)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(recorded(&db).await, all_names());
    assert_eq!(checksums(&db).await, expected_checksums());
    assert_usable(&db).await;
}

/// Each file's recorded checksum, by name (NULL as `None`).
async fn checksums(db: &TestDb) -> Vec<(String, Option<String>)> {
    db.client
        .query(
            "SELECT name, checksum FROM outboxd_migrations ORDER BY name",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get("name"), r.get("checksum")))
        .collect()
}

/// The SHA-256 of a file, in lowercase hex: what `outboxd_migrations` records.
fn sha256_hex(sql: &str) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(sql.as_bytes()))
}

fn expected_checksums() -> Vec<(String, Option<String>)> {
    MIGRATIONS
        .iter()
        .map(|(name, sql)| (name.to_string(), Some(sha256_hex(sql))))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_migration_is_refused_by_name() {
    let mut db = TestDb::new("migratechanged").await;
    // As if 0002_notify.sql had been edited after this database applied it.
    let tampered = "0".repeat(64);
    db.client
        .execute(
            "UPDATE outboxd_migrations SET checksum = $1 WHERE name = '0002_notify.sql'",
            &[&tampered],
        )
        .await
        .unwrap();
    let expect_refusal = |what: &str, message: &str| {
        for needle in ["0002_notify.sql", tampered.as_str(), "new migration file"] {
            assert!(message.contains(needle), "{what}: {needle:?} in {message}");
        }
    };

    let err = schema::migrate(&mut db.client).await.unwrap_err();
    assert!(
        matches!(
            err,
            outboxd::Error::MigrationChanged {
                name: "0002_notify.sql",
                ..
            }
        ),
        "{err:?}"
    );
    expect_refusal("migrate", &err.to_string());
    let err = schema::pending_migrations(&db.client).await.unwrap_err();
    expect_refusal("pending_migrations", &err.to_string());
    // Nothing was overwritten: the next run refuses the same way.
    let recorded: String = db
        .scalar("SELECT checksum FROM outboxd_migrations WHERE name = '0002_notify.sql'")
        .await;
    assert_eq!(recorded, tampered);

    // The binary: `migrate` and `run` both refuse, exit 1, and name the file.
    for args in [&["migrate"][..], &["run"][..]] {
        let mut command = outboxd_command();
        command
            .args(args)
            .env("DATABASE_URL", &db.url)
            .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true");
        let finished = run_to_end(command).await;
        assert_eq!(finished.code, Some(1), "{args:?}: {finished:?}");
        expect_refusal(&format!("outboxd {}", args[0]), &finished.stderr);
    }

    // Restoring the file (here: the record) is the way back.
    db.client
        .execute(
            "UPDATE outboxd_migrations SET checksum = $1 WHERE name = '0002_notify.sql'",
            &[&sha256_hex(MIGRATIONS[1].1)],
        )
        .await
        .unwrap();
    assert!(schema::migrate(&mut db.client).await.unwrap().is_empty());
    assert!(
        schema::pending_migrations(&db.client)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A database migrated by an outboxd that recorded no checksums (no column at all), still
/// served by such dispatchers while the new `migrate` runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_are_recorded_for_databases_migrated_before_them() {
    let mut db = TestDb::new("migrateold").await;
    db.client
        .batch_execute("ALTER TABLE outboxd_migrations DROP COLUMN checksum")
        .await
        .unwrap();
    // What a new `outboxd run` reads before anyone migrates: nothing pending, no error.
    assert!(
        schema::pending_migrations(&db.client)
            .await
            .unwrap()
            .is_empty()
    );

    let applied = schema::migrate(&mut db.client).await.unwrap();
    assert!(applied.is_empty(), "{applied:?}");
    assert_eq!(checksums(&db).await, expected_checksums());

    // An older outboxd's own statements still work on the table with the column.
    db.client
        .execute(
            "INSERT INTO outboxd_migrations (name) VALUES ($1)",
            &[&"9999_from_a_newer_release.sql"],
        )
        .await
        .expect("an older migrate records a file as before");
    let names = db
        .client
        .query("SELECT name FROM outboxd_migrations", &[])
        .await
        .unwrap();
    assert_eq!(names.len(), MIGRATIONS.len() + 1);
    // A file this build does not know is neither pending nor checked.
    assert!(
        schema::pending_migrations(&db.client)
            .await
            .unwrap()
            .is_empty()
    );

    // A row recorded without a checksum (an older migrate, or by hand) gets one next
    // time, and a recorded checksum is never overwritten.
    db.client
        .batch_execute(
            "UPDATE outboxd_migrations SET checksum = NULL WHERE name = '0003_operations.sql'",
        )
        .await
        .unwrap();
    assert!(
        schema::pending_migrations(&db.client)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(schema::migrate(&mut db.client).await.unwrap().is_empty());
    let mut expected = expected_checksums();
    expected.push(("9999_from_a_newer_release.sql".to_owned(), None));
    assert_eq!(checksums(&db).await, expected);
    assert_usable(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_migrations_apply_each_file_once() {
    let db = TestDb::empty("migraterace").await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(db.connect().await);
    }
    let [mut a, mut b, mut c] = <[_; 3]>::try_from(clients).ok().unwrap();
    let (ra, rb, rc) = tokio::join!(
        schema::migrate(&mut a),
        schema::migrate(&mut b),
        schema::migrate(&mut c)
    );
    let mut applied: Vec<&str> = Vec::new();
    for result in [ra, rb, rc] {
        applied.extend(result.expect("every concurrent migrate succeeds"));
    }
    applied.sort_unstable();
    assert_eq!(applied, all_names(), "each file applied exactly once");
    assert_eq!(recorded(&db).await, all_names());
    assert_eq!(checksums(&db).await, expected_checksums());
    assert_usable(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_files_apply_by_hand() {
    let files = sql_files();
    let names: Vec<&str> = files.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        names.starts_with(&["0001_schema.sql", "0002_notify.sql"]),
        "{names:?}"
    );
    // The embedded migrations are exactly the files on disk.
    assert_eq!(names, all_names());
    for ((_, text), (_, embedded)) in files.iter().zip(MIGRATIONS) {
        assert_eq!(text, embedded);
    }

    let mut db = TestDb::empty("migratehand").await;
    // As `psql -f` would, twice over.
    for round in 0..2 {
        for (name, text) in &files {
            db.client
                .batch_execute(text)
                .await
                .unwrap_or_else(|e| panic!("{name} by hand, round {round}: {e}"));
        }
    }
    assert_usable(&db).await;
    // `outboxd migrate` afterwards is harmless and keeps the data.
    let applied = schema::migrate(&mut db.client).await.unwrap();
    assert_eq!(applied, all_names());
    let events: i64 = db.scalar("SELECT count(*) FROM webhook_outbox").await;
    assert_eq!(events, 1);
    // And by hand once more after it.
    for (name, text) in &files {
        db.client
            .batch_execute(text)
            .await
            .unwrap_or_else(|e| panic!("{name} by hand after migrate: {e}"));
    }
    assert!(schema::migrate(&mut db.client).await.unwrap().is_empty());
    let doorbells: i64 = db.scalar("SELECT count(*) FROM webhook_doorbell").await;
    assert_eq!(doorbells, 1);
    let endpoints: i64 = db.scalar("SELECT count(*) FROM webhook_endpoints").await;
    assert_eq!(endpoints, 1);
}
