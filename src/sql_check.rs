//! Every SQL statement of the library prepared against a freshly migrated schema, so a
//! statement that no longer matches the schema (a renamed column, a changed function
//! signature, a type that no longer infers) fails `make test` instead of a dispatcher.
//!
//! The statements are listed in [`STATEMENTS`]; a scan of `src/` fails the test when a
//! SQL literal is not a listed constant, so a new statement cannot be forgotten. Needs
//! `DATABASE_URL` (a role that may create databases), as the integration tests do.

#![allow(
    clippy::disallowed_methods,
    reason = "preparing each statement is how this test checks it against the schema"
)]

use tokio_postgres::Client;

use crate::{
    claim, endpoint, health, inspect, metrics, ordering, outbox, pooler, redrive, retention,
    schema, settle,
};

/// `(module path, constant name, SQL)` of every statement, as the scan names them.
macro_rules! statements {
    ($($module:ident :: $name:ident),* $(,)?) => {
        &[$((stringify!($module), stringify!($name), $module::$name)),*]
    };
}

const STATEMENTS: &[(&str, &str, &str)] = statements![
    claim::CLAIM,
    claim::CLAIM_FAST,
    claim::ARM_DOORBELL,
    claim::CLOSE_DOORBELL_GATE,
    claim::NEXT_DUE,
    endpoint::INSERT_ENDPOINT,
    endpoint::SELECT_ENDPOINTS,
    endpoint::DISABLE,
    endpoint::ENABLE,
    endpoint::LOCK_ENDPOINT_KEYS,
    endpoint::ENABLE_DISCARDING_BACKLOG,
    endpoint::REMOVE,
    endpoint::PARK_ALL,
    endpoint::UPDATE_FIELDS,
    endpoint::ROTATE,
    endpoint::CLOSE_CIRCUIT,
    health::FAILING_TOO_LONG,
    health::DISABLE_IF_STILL_FAILING,
    health::RESUME_STRANDED,
    inspect::LIST_DELIVERIES,
    inspect::GET_DELIVERY,
    inspect::ATTEMPTS,
    inspect::LIST_EVENTS,
    inspect::GET_EVENT,
    inspect::STATS_DEPTH,
    inspect::STATS_ENDPOINTS,
    inspect::LIST_BLOCKED,
    metrics::QUEUE_SAMPLE,
    ordering::PEEK,
    ordering::HORIZON,
    ordering::SEQUENCE,
    ordering::STRAYS,
    outbox::INSERT_EVENT,
    pooler::BACKEND_PID,
    pooler::CURRENT_SETTINGS,
    redrive::WAKE,
    redrive::RESTART,
    redrive::DEAD_MATCHING,
    redrive::FINISHED_OF_EVENT,
    redrive::ADD_MISSING,
    redrive::KEY_LINE,
    redrive::DISCARD_BLOCKED,
    redrive::ADVANCE,
    redrive::TEST_EVENT,
    retention::NEXT_EVENTS,
    retention::DELETE_DELIVERIES,
    retention::DELETE_EVENTS,
    retention::LOCK,
    retention::RESTORE,
    retention::SET_FRONTIER,
    retention::SET_SWEEP,
    retention::DELETE_EXPIRED_DEAD,
    retention::DELETE_REMOVED_PARKED,
    retention::DELETE_REMOVED_QUEUED,
    retention::DELETE_REMOVED_KEYS,
    schema::LOCK_MIGRATIONS,
    schema::CREATE_MIGRATIONS_TABLE,
    schema::HAS_CHECKSUM_COLUMN,
    schema::ADD_CHECKSUM_COLUMN,
    schema::RECORDED_CHECKSUM,
    schema::RECORD_MIGRATION,
    schema::RECORD_MISSING_CHECKSUM,
    schema::MIGRATIONS_TABLE_EXISTS,
    schema::APPLIED_MIGRATIONS,
    settle::SETTLE,
    settle::SETTLE_ORDERED,
    settle::READ_ONLY,
];

/// The statement as it is sent: `inspect` splices its column list in.
fn as_sent(sql: &str) -> String {
    sql.replace("{COLUMNS}", inspect::DELIVERY_COLUMNS)
}

/// A database of its own, migrated; dropped when the test ends.
struct Scratch {
    admin: String,
    name: String,
    client: Client,
}

impl Scratch {
    async fn new() -> Self {
        let admin = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            panic!(
                "DATABASE_URL is not set: this test prepares every statement against a \
                 migrated schema and needs a PostgreSQL role that may create databases. \
                 Run `make test`, which starts a throwaway PostgreSQL."
            )
        });
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("a clock after 1970")
            .as_nanos();
        let name = format!("outboxd_sqlcheck_{}_{nanos}", std::process::id());
        crate::db::connect(&admin)
            .await
            .expect("connect with DATABASE_URL")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("CREATE DATABASE");
        let url = if admin.starts_with("postgres://") || admin.starts_with("postgresql://") {
            let mut url = url::Url::parse(&admin).expect("DATABASE_URL is a URL");
            url.set_path(&format!("/{name}"));
            url.to_string()
        } else {
            format!("{admin} dbname={name}")
        };
        let mut client = crate::db::connect(&url).await.expect("connect");
        schema::migrate(&mut client).await.expect("migrate");
        Self {
            admin,
            name,
            client,
        }
    }

    async fn drop(self) {
        drop(self.client);
        let admin = crate::db::connect(&self.admin).await.expect("connect");
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ))
            .await
            .expect("DROP DATABASE");
    }
}

#[tokio::test]
async fn every_statement_prepares_against_the_migrated_schema() {
    let db = Scratch::new().await;
    let mut failed = Vec::new();
    for (module, name, sql) in STATEMENTS {
        if let Err(e) = db.client.prepare(&as_sent(sql)).await {
            let reason = e
                .as_db_error()
                .map(|d| format!("{} (SQLSTATE {})", d.message(), d.code().code()))
                .unwrap_or_else(|| e.to_string());
            failed.push(format!("{module}::{name}: {reason}"));
        }
    }
    db.drop().await;
    assert!(
        failed.is_empty(),
        "statements that do not match the schema:\n{}",
        failed.join("\n")
    );
}

/// The claim's rows are read by position: the prepared statement's columns must be the
/// ones its reader expects.
#[tokio::test]
async fn the_claim_returns_the_columns_its_reader_expects() {
    let db = Scratch::new().await;
    let mut checked = Vec::new();
    for form in [claim::Form::Full, claim::Form::Fast] {
        let prepared = db
            .client
            .prepare_typed(form.sql(), form.types())
            .await
            .expect("prepare the claim");
        checked.push((form, claim::check_columns(prepared.columns())));
    }
    let other = db
        .client
        .prepare(inspect::GET_EVENT)
        .await
        .expect("prepare another statement");
    let refused = claim::check_columns(other.columns());
    db.drop().await;
    for (form, checked) in checked {
        checked.unwrap_or_else(|e| panic!("{form:?}: {e}"));
    }
    let refused = refused.expect_err("another statement's columns are refused");
    assert!(refused.to_string().contains("event_id int8"), "{refused}");
}

/// Where a SQL literal starts: a keyword that begins a statement, right after the
/// opening quote (and any whitespace). `LISTEN`/`SET` are left out: they do not depend
/// on the schema.
const SQL_START: &str =
    r#"r?#*"[ \t\r\n]*(?:SELECT|WITH|INSERT|UPDATE|DELETE|CREATE|ALTER)[ \t\r\n]"#;

/// A `&str` constant's declaration up to its literal's opening quote.
const CONST_DECL: &str = concat!(
    r#"(?m)^[ \t]*(?:pub(?:\([a-z:]+\))?[ \t]+)?const[ \t]+([A-Z][A-Z0-9_]*)[ \t]*:"#,
    r#"[ \t]*&(?:'static[ \t]+)?str[ \t]*=[ \t\r\n]*(?:concat!\([ \t\r\n]*)?"#
);

/// A `macro_rules!` fragment's declaration up to its literal's opening quote: a piece of
/// SQL that constants share (`claim::CLAIM` and `claim::CLAIM_FAST` are built of them),
/// checked through those constants.
const FRAGMENT_DECL: &str = r#"macro_rules![ \t]+([a-z][a-z0-9_]*)[ \t\r\n]*\{[ \t\r\n]*\(\)[ \t\r\n]*=>[ \t\r\n]*\{[ \t\r\n]*"#;

/// Every SQL literal in the library's code (tests excluded) as `(module, constant)`, or
/// an error naming a literal that is neither a constant's value nor a fragment that a
/// constant of its file is built of.
fn sql_constants_in_source() -> (Vec<(String, String)>, Vec<String>) {
    let sql_start = regex::Regex::new(SQL_START).expect("a valid pattern");
    let const_decl = regex::Regex::new(CONST_DECL).expect("a valid pattern");
    let fragment_decl = regex::Regex::new(FRAGMENT_DECL).expect("a valid pattern");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src/") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut found = Vec::new();
    let mut inline = Vec::new();
    for path in files {
        let relative = path.strip_prefix(&root).expect("under src/");
        // The binaries talk to the database through the library only.
        if relative.starts_with("bin") || relative == std::path::Path::new("sql_check.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read a source file");
        // A unit-test module (at the end of a file, by the project's convention) may
        // hold SQL of its own.
        let code = text
            .find("\n#[cfg(test)]\nmod ")
            .map_or(text.as_str(), |end| &text[..end]);
        let module = relative
            .with_extension("")
            .to_string_lossy()
            .trim_end_matches("/mod")
            .replace('/', "::");
        let declared: Vec<(usize, String)> = const_decl
            .captures_iter(code)
            .map(|c| (c.get(0).expect("the match").end(), c[1].to_owned()))
            .collect();
        let fragments: Vec<(usize, String)> = fragment_decl
            .captures_iter(code)
            .map(|c| (c.get(0).expect("the match").end(), c[1].to_owned()))
            .collect();
        let used_by_a_constant = |fragment: &str| {
            let call = format!("{fragment}!()");
            declared.iter().any(|(at, _)| {
                let rest = &code[*at..];
                rest[..rest.find("\n);").unwrap_or(0)].contains(&call)
            })
        };
        // A constant that begins with a SQL fragment is SQL too.
        for (at, name) in &declared {
            let sql_fragment = fragments.iter().any(|(fragment_at, fragment)| {
                code[*at..].starts_with(&format!("{fragment}!()"))
                    && sql_start
                        .find(&code[*fragment_at..])
                        .is_some_and(|m| m.start() == 0)
            });
            if sql_fragment {
                found.push((module.clone(), name.clone()));
            }
        }
        for literal in sql_start.find_iter(code) {
            let fragment = fragments.iter().find(|(at, _)| *at == literal.start());
            match declared.iter().find(|(at, _)| *at == literal.start()) {
                Some((_, name)) => found.push((module.clone(), name.clone())),
                None if fragment.is_some_and(|(_, name)| used_by_a_constant(name)) => {}
                // A template that builds a statement for an operator to run (such as
                // `pooler::alter_role`) cannot be prepared as it stands.
                None if code[..literal.start()].trim_end().ends_with("format!(") => {}
                None => {
                    let line = code[..literal.start()].lines().count();
                    inline.push(format!("src/{}:{line}", relative.display()));
                }
            }
        }
    }
    (found, inline)
}

#[test]
fn every_sql_constant_is_checked() {
    let (found, inline) = sql_constants_in_source();
    assert!(
        inline.is_empty(),
        "SQL written inline: make each a named constant and list it in \
         src/sql_check.rs STATEMENTS: {inline:?}"
    );
    let listed: Vec<(String, String)> = STATEMENTS
        .iter()
        .map(|(m, n, _)| (m.to_string(), n.to_string()))
        .collect();
    let missing: Vec<String> = found
        .iter()
        .filter(|f| !listed.contains(f))
        .map(|(m, n)| format!("{m}::{n}"))
        .collect();
    assert!(
        missing.is_empty(),
        "SQL constants not prepared by every_statement_prepares_against_the_migrated_schema: \
         add them to src/sql_check.rs STATEMENTS: {missing:?}"
    );
    // The scan itself works: it finds every listed statement where the list says.
    let unseen: Vec<String> = listed
        .iter()
        .filter(|l| !found.contains(l))
        .map(|(m, n)| format!("{m}::{n}"))
        .collect();
    assert!(
        unseen.is_empty(),
        "listed but not found by the scan: {unseen:?}"
    );
}

/// The scan recognises the shapes the tree uses, and flags inline SQL.
#[test]
fn the_scan_flags_inline_sql() {
    let sql_start = regex::Regex::new(SQL_START).expect("a valid pattern");
    let const_decl = regex::Regex::new(CONST_DECL).expect("a valid pattern");
    let fragment_decl = regex::Regex::new(FRAGMENT_DECL).expect("a valid pattern");
    let code = "pub(crate) const A: &str = \"SELECT 1\";\n\
                const B: &str =\n    \"\n  WITH x AS (SELECT 1) SELECT * FROM x\";\n\
                fn f() { client.query(\"UPDATE t SET a = 1\", &[]); }\n\
                const C: &str = \"DELETE\";\n\
                fn g() -> String { format!(\n  \"ALTER ROLE x SET {a} = 1\") }\n";
    let declared: Vec<usize> = const_decl.find_iter(code).map(|m| m.end()).collect();
    let literals: Vec<(usize, bool)> = sql_start
        .find_iter(code)
        .map(|m| (m.start(), declared.contains(&m.start())))
        .collect();
    assert_eq!(literals.len(), 4, "{literals:?}");
    assert_eq!(
        literals.iter().map(|(_, c)| *c).collect::<Vec<_>>(),
        [true, true, false, false]
    );
    // The template is told apart by what precedes it, as the scan does.
    let template = literals[3].0;
    assert!(code[..template].trim_end().ends_with("format!("));
    // A fragment's literal is found where its declaration ends.
    let shared =
        "macro_rules! shared {\n    () => {\n        \"\nWITH y AS (SELECT 1)\"\n    };\n}\n";
    let fragment = fragment_decl.captures(shared).expect("a fragment");
    assert_eq!(&fragment[1], "shared");
    let literal = sql_start.find(shared).expect("its SQL");
    assert_eq!(fragment.get(0).expect("the match").end(), literal.start());
}
