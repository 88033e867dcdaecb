//! Connection strings as libpq reads them, against the test server: a Unix socket
//! directory as `host` (where libpq never uses TLS), every connection parameter outboxd
//! accepts yields a working session, `target_session_attrs` is honoured, and
//! `load_balance_hosts=random` still reaches the one host that answers.

use crate::harness::admin_url;

/// `host`, `port`, `user` and `dbname` of the test server, from `DATABASE_URL`.
fn server() -> (String, u16, String, String) {
    let url = url::Url::parse(&admin_url()).expect("DATABASE_URL is a URL");
    (
        url.host_str().expect("a host").to_owned(),
        url.port().unwrap_or(5432),
        url.username().to_owned(),
        url.path().trim_start_matches('/').to_owned(),
    )
}

fn kv(extra: &str) -> String {
    let (host, port, user, dbname) = server();
    format!("host={host} port={port} user={user} dbname={dbname} {extra}")
}

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    outboxd::db::connect(conninfo)
        .await
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unix_socket_directory_is_a_host_and_never_uses_tls() {
    crate::harness::init_tracing();
    let client = connect(&kv("")).await.expect("connect over TCP");
    let dir: String = client
        .query_one("SHOW unix_socket_directories", &[])
        .await
        .expect("read the socket directory")
        .get(0);
    let Some(dir) = dir
        .split(',')
        .map(str::trim)
        .find(|d| d.starts_with('/') && std::path::Path::new(d).is_dir())
    else {
        eprintln!("skipped: the server's socket directory is not on this machine");
        return;
    };
    let (_, port, user, dbname) = server();
    // sslmode=require: libpq does not use TLS over a Unix socket, and neither does outboxd.
    let conninfo = format!("host={dir} port={port} user={user} dbname={dbname} sslmode=require");
    let client = connect(&conninfo)
        .await
        .unwrap_or_else(|e| panic!("{conninfo}: {e}"));
    let (tcp, ssl): (bool, bool) = client
        .query_one(
            "SELECT inet_client_addr() IS NOT NULL, ssl FROM pg_stat_ssl \
             WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("read the session");
    assert!(!tcp, "a Unix-socket session has no client address");
    assert!(!ssl);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_parameter_yields_a_working_session() {
    crate::harness::init_tracing();
    for extra in [
        "connect_timeout=0",
        "connect_timeout=7",
        "keepalives=1 keepalives_idle=7 keepalives_interval=3 keepalives_count=4",
        "keepalives=0",
        "tcp_user_timeout=9000",
        "channel_binding=disable",
        "channel_binding=prefer",
        "target_session_attrs=read-write",
        "target_session_attrs=any",
        "application_name=from_the_string",
    ] {
        let client = connect(&kv(extra))
            .await
            .unwrap_or_else(|e| panic!("{extra}: {e}"));
        let name: String = client
            .query_one("SHOW application_name", &[])
            .await
            .unwrap_or_else(|e| panic!("{extra}: {e}"))
            .get(0);
        let expected = if extra.starts_with("application_name") {
            "from_the_string"
        } else {
            "outboxd-admin"
        };
        assert_eq!(name, expected, "{extra}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_session_attrs_read_only_refuses_a_primary() {
    crate::harness::init_tracing();
    let Err(e) = connect(&kv("target_session_attrs=read-only")).await else {
        panic!("the test server is a primary: read-only must refuse it");
    };
    assert!(e.contains("read-only") || e.contains("read only"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balanced_hosts_reach_the_one_that_answers() {
    crate::harness::init_tracing();
    let (host, port, user, dbname) = server();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    // In random order, a dead host comes first about half the time: every attempt
    // must still end on the live one.
    let conninfo = format!(
        "host={host},127.0.0.1 port={port},{closed} user={user} dbname={dbname} \
         load_balance_hosts=random connect_timeout=5"
    );
    for _ in 0..8 {
        let client = connect(&conninfo)
            .await
            .unwrap_or_else(|e| panic!("{conninfo}: {e}"));
        let one: i32 = client
            .query_one("SELECT 1", &[])
            .await
            .expect("query")
            .get(0);
        assert_eq!(one, 1);
    }
}
