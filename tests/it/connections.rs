//! Connection strings as libpq reads them, against the test server: a Unix socket
//! directory as `host` (where libpq never uses TLS).

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
