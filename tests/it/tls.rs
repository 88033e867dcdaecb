//! TLS to PostgreSQL, against a real TLS-only cluster (`hostssl` only) whose CA, server
//! and client certificates are made at test time: libpq's meaning of every `sslmode`,
//! client certificates, channel binding, and the CLI, in both connection-string forms.

use std::path::PathBuf;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SerialNumber,
};
use serde_json::json;
use tokio::sync::OnceCell;

use crate::cluster::{Cluster, ClusterSpec};
use crate::harness::{
    Receiver, RunningDispatcher, WAIT, eventually, outboxd_command, run_to_end, test_config, unique,
};

/// The name on the server's certificate; the tests reach it as `hostaddr=127.0.0.1`.
const SERVER_NAME: &str = "db.test";
const SCRAM_PASSWORD: &str = "scram-test-password";

/// The shared TLS-only cluster and the files a client needs.
struct TlsServer {
    cluster: Cluster,
    /// The CA that signed the server's and the client's certificates.
    ca: PathBuf,
    /// Another CA, which signed nothing the server shows.
    other_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// A client certificate and key signed by the other CA, which the server does not trust.
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
    /// A CRL from the CA that revokes the server's certificate.
    revoking_crl: PathBuf,
    /// A CRL from the CA that revokes nothing.
    clean_crl: PathBuf,
    /// A CRL from the other CA: it says nothing about the server's issuer.
    unrelated_crl: PathBuf,
}

/// The serial number of the server's certificate, as the revoking CRL lists it.
const SERVER_SERIAL: u64 = 0x5e_7e_5e;

fn crl(issuer: &Issuer<'_, KeyPair>, revoked: &[u64]) -> String {
    CertificateRevocationListParams {
        this_update: rcgen::date_time_ymd(2020, 1, 1),
        next_update: rcgen::date_time_ymd(2999, 1, 1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from(*serial),
                revocation_time: rcgen::date_time_ymd(2021, 1, 1),
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(issuer)
    .expect("sign a CRL")
    .pem()
    .expect("a CRL's PEM")
}

static SERVER: OnceCell<TlsServer> = OnceCell::const_new();

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().expect("a CA key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let pem = params.self_signed(&key).expect("self-sign the CA").pem();
    (params, key, pem)
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    names: &[&str],
    common_name: &str,
    usage: ExtendedKeyUsagePurpose,
    serial: Option<u64>,
) -> (String, String) {
    let key = KeyPair::generate().expect("a key");
    let mut params =
        CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
            .expect("params");
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.extended_key_usages = vec![usage];
    params.serial_number = serial.map(SerialNumber::from);
    let cert = params.signed_by(&key, issuer).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn start_server() -> TlsServer {
    let (ca_params, ca_key, ca_pem) = ca("outboxd test CA");
    let (other_params, other_key, other_pem) = ca("another CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let other_issuer = Issuer::new(other_params, other_key);
    let (server_cert, server_key) = leaf(
        &issuer,
        &[SERVER_NAME],
        SERVER_NAME,
        ExtendedKeyUsagePurpose::ServerAuth,
        Some(SERVER_SERIAL),
    );
    let (stranger_cert, stranger_key) = leaf(
        &other_issuer,
        &[],
        "certuser",
        ExtendedKeyUsagePurpose::ClientAuth,
        None,
    );
    // `cert` authentication maps the certificate's CN to the role.
    let (client_cert, client_key) = leaf(
        &issuer,
        &[],
        "certuser",
        ExtendedKeyUsagePurpose::ClientAuth,
        None,
    );
    let cluster = Cluster::start(&ClusterSpec {
        conf: vec![
            "ssl = on".into(),
            "ssl_cert_file = 'server.crt'".into(),
            "ssl_key_file = 'server.key'".into(),
            "ssl_ca_file = 'ca.crt'".into(),
            "password_encryption = 'scram-sha-256'".into(),
        ],
        // TLS only, but for one role that may also come in plaintext (to show that
        // `prefer` never falls back after a failed check, and what `allow` does).
        hba: vec![
            "host all plainok 127.0.0.1/32 trust".into(),
            "hostssl all certuser 127.0.0.1/32 cert".into(),
            "hostssl all scramuser 127.0.0.1/32 scram-sha-256".into(),
            "hostssl all all 127.0.0.1/32 trust".into(),
        ],
        files: vec![
            ("server.crt".into(), server_cert.into_bytes()),
            ("server.key".into(), server_key.into_bytes()),
            ("ca.crt".into(), ca_pem.clone().into_bytes()),
        ],
        superuser_password: None,
    });
    // Client files live in the cluster's directory, so they go with it.
    let files = cluster.socket_dir.join("client");
    std::fs::create_dir(&files).expect("client dir");
    let write = |name: &str, contents: &str| {
        let path = files.join(name);
        std::fs::write(&path, contents).expect("write a client file");
        let status = std::process::Command::new("chmod")
            .arg("600")
            .arg(&path)
            .status()
            .expect("chmod");
        assert!(status.success());
        path
    };
    TlsServer {
        ca: write("ca.crt", &ca_pem),
        other_ca: write("other-ca.crt", &other_pem),
        client_cert: write("client.crt", &client_cert),
        client_key: write("client.key", &client_key),
        stranger_cert: write("stranger.crt", &stranger_cert),
        stranger_key: write("stranger.key", &stranger_key),
        revoking_crl: write("revoking.crl", &crl(&issuer, &[SERVER_SERIAL])),
        clean_crl: write("clean.crl", &crl(&issuer, &[])),
        unrelated_crl: write("unrelated.crl", &crl(&other_issuer, &[])),
        cluster,
    }
}

async fn server() -> &'static TlsServer {
    let server = SERVER
        .get_or_init(|| async {
            let server = tokio::task::spawn_blocking(start_server)
                .await
                .expect("start the TLS cluster");
            let admin = server.cluster.admin("postgres").await;
            admin
                .batch_execute(&format!(
                    "CREATE ROLE certuser LOGIN SUPERUSER;
                     CREATE ROLE plainok LOGIN SUPERUSER;
                     CREATE ROLE scramuser LOGIN SUPERUSER PASSWORD '{SCRAM_PASSWORD}';"
                ))
                .await
                .expect("create the test roles");
            server
        })
        .await;
    crate::harness::init_tracing();
    server
}

impl TlsServer {
    /// A fresh database on the TLS cluster.
    async fn database(&self, label: &str) -> String {
        let name = unique(&format!("tls_{label}")).to_lowercase();
        self.cluster
            .admin("postgres")
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create a database");
        name
    }

    /// key=value form: `host` is the certificate's name, `hostaddr` where it listens.
    fn kv(&self, dbname: &str, extra: &str) -> String {
        format!(
            "host={SERVER_NAME} hostaddr=127.0.0.1 port={} user=postgres dbname={dbname} {extra}",
            self.cluster.port
        )
    }

    /// URL form of the same.
    fn url(&self, dbname: &str, query: &str) -> String {
        format!(
            "postgres://postgres@{SERVER_NAME}:{}/{dbname}?hostaddr=127.0.0.1&{query}",
            self.cluster.port
        )
    }

    fn ca(&self) -> String {
        self.ca.display().to_string()
    }

    fn other_ca(&self) -> String {
        self.other_ca.display().to_string()
    }
}

async fn connect(conninfo: &str) -> Result<tokio_postgres::Client, String> {
    outboxd::db::connect(conninfo)
        .await
        .map_err(|e| e.to_string())
}

async fn connected(conninfo: &str) -> tokio_postgres::Client {
    connect(conninfo)
        .await
        .unwrap_or_else(|e| panic!("{conninfo} must connect: {e}"))
}

fn refused(result: Result<tokio_postgres::Client, String>, conninfo: &str) -> String {
    match result {
        Ok(_) => panic!("{conninfo} must be refused"),
        Err(e) => e,
    }
}

/// Whether this session runs over TLS, as the server sees it.
async fn ssl_in_use(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_migrates_enqueues_and_delivers() {
    let server = server().await;
    let dbname = server.database("deliver").await;
    let url = server.url(
        &dbname,
        &format!("sslmode=verify-full&sslrootcert={}", server.ca()),
    );
    let mut client = connected(&url).await;
    assert!(ssl_in_use(&client).await);
    outboxd::schema::migrate(&mut client)
        .await
        .expect("migrate through TLS");
    let receiver = Receiver::start().await;
    outboxd::endpoint::add(
        &client,
        outboxd::NewEndpoint {
            url: receiver.url("/hook"),
            event_types: Vec::new(),
            secret: None,
            description: "tls".into(),
            ..Default::default()
        },
    )
    .await
    .expect("register an endpoint");
    let dispatcher = RunningDispatcher::start(&url, test_config("tls"));
    outboxd::enqueue(
        &client,
        &outboxd::NewEvent::new("order.created", &json!({"n": 1})),
    )
    .await
    .expect("enqueue")
    .expect("a new event");
    receiver.wait_for(1).await;
    eventually("the delivery is recorded", WAIT, || async {
        client
            .query_one(
                "SELECT count(*) = 1 FROM webhook_deliveries WHERE state = 'delivered'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await;

    // Every dispatcher session, the pool's and the LISTEN one, came over TLS.
    let admin = server.cluster.admin("postgres").await;
    let (sessions, all_tls): (i64, Option<bool>) = admin
        .query_one(
            "SELECT count(*), bool_and(s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = $1 AND a.application_name IN ('outboxd', 'outboxd-listener')",
            &[&dbname],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .expect("read the sessions");
    let listeners: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = 'outboxd-listener'",
            &[&dbname],
        )
        .await
        .expect("read the listener")
        .get(0);
    assert!(sessions >= 2, "pool and LISTEN sessions, got {sessions}");
    assert_eq!(listeners, 1);
    assert_eq!(all_tls, Some(true));
    let report = dispatcher.stop().await;
    assert_eq!(report.totals.delivered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_refuses_another_ca_and_another_name() {
    let server = server().await;
    let dbname = server.database("refuse").await;

    let other_ca = server.kv(
        &dbname,
        &format!("sslmode=verify-full sslrootcert={}", server.other_ca()),
    );
    let e = refused(connect(&other_ca).await, &other_ca);
    assert!(e.contains("unknown issuer"), "{e}");
    assert!(e.contains(&server.other_ca()), "names the roots used: {e}");

    // The certificate names db.test; `host` is what is checked, not `hostaddr`.
    let wrong_name = format!(
        "host=wrong.test hostaddr=127.0.0.1 port={} user=postgres dbname={dbname} \
         sslmode=verify-full sslrootcert={}",
        server.cluster.port,
        server.ca()
    );
    let e = refused(connect(&wrong_name).await, &wrong_name);
    assert!(e.contains("name mismatch"), "{e}");
    assert!(e.contains("wrong.test") && e.contains(SERVER_NAME), "{e}");

    // verify-ca checks the chain only, as in libpq.
    let chain_only = wrong_name.replace("verify-full", "verify-ca");
    assert!(ssl_in_use(&connected(&chain_only).await).await);
    let e = refused(
        connect(&chain_only.replace(&server.ca(), &server.other_ca())).await,
        &chain_only,
    );
    assert!(e.contains("unknown issuer"), "{e}");

    // The URL form says the same.
    let url = server.url(
        &dbname,
        &format!("sslmode=verify-full&sslrootcert={}", server.other_ca()),
    );
    let e = refused(connect(&url).await, &url);
    assert!(e.contains("unknown issuer"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_and_checks_the_chain_only_when_given_a_root() {
    let server = server().await;
    let dbname = server.database("require").await;
    let require = server.kv(&dbname, "sslmode=require");
    assert!(ssl_in_use(&connected(&require).await).await);
    assert!(ssl_in_use(&connected(&server.url(&dbname, "sslmode=require")).await).await);
    // libpq: with a root certificate given, require verifies the chain like verify-ca.
    let with_other_root = format!("{require} sslrootcert={}", server.other_ca());
    let e = refused(connect(&with_other_root).await, &with_other_root);
    assert!(e.contains("unknown issuer"), "{e}");
    let with_root = format!("{require} sslrootcert={}", server.ca());
    assert!(ssl_in_use(&connected(&with_root).await).await);

    // An address without a name: encryption and a chain check need none; verify-full
    // does, and is refused before connecting.
    let by_address = format!(
        "hostaddr=127.0.0.1 port={} user=postgres dbname={dbname}",
        server.cluster.port
    );
    assert!(ssl_in_use(&connected(&format!("{by_address} sslmode=require")).await).await);
    let chain = format!("{by_address} sslmode=verify-ca sslrootcert={}", server.ca());
    assert!(ssl_in_use(&connected(&chain).await).await);
    let full = chain.replace("verify-ca", "verify-full");
    let e = refused(connect(&full).await, &full);
    assert!(
        e.contains("DATABASE_URL") && e.contains("add host=NAME"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_by_a_tls_only_server_and_allow_prefer_find_tls() {
    let server = server().await;
    let dbname = server.database("plain").await;
    let disable = server.kv(&dbname, "sslmode=disable");
    let e = refused(connect(&disable).await, &disable);
    assert!(
        e.contains("no pg_hba.conf entry"),
        "{e}\n{}",
        server.cluster.log()
    );
    assert!(e.contains("no encryption"), "{e}");
    // allow: plaintext refused, then TLS.
    assert!(ssl_in_use(&connected(&server.kv(&dbname, "sslmode=allow")).await).await);
    // prefer (also libpq's default): TLS when the server offers it.
    assert!(ssl_in_use(&connected(&server.kv(&dbname, "sslmode=prefer")).await).await);
    assert!(ssl_in_use(&connected(&server.kv(&dbname, "")).await).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_check_never_falls_back_to_plaintext() {
    let server = server().await;
    let dbname = server.database("downgrade").await;
    // plainok may connect in plaintext: a client that fell back after a failed check
    // would get in. libpq's prefer would; outboxd refuses.
    let base = format!(
        "host={SERVER_NAME} hostaddr=127.0.0.1 port={} user=plainok dbname={dbname}",
        server.cluster.port
    );
    let prefer = format!("{base} sslmode=prefer sslrootcert={}", server.other_ca());
    let e = refused(connect(&prefer).await, &prefer);
    assert!(e.contains("unknown issuer"), "{e}");
    // allow starts in plaintext, and stays there when the server accepts it.
    assert!(!ssl_in_use(&connected(&format!("{base} sslmode=allow")).await).await);
    assert!(ssl_in_use(&connected(&format!("{base} sslmode=prefer")).await).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_accepted_where_the_server_asks_for_one() {
    let server = server().await;
    let dbname = server.database("clientcert").await;
    let base = format!(
        "host={SERVER_NAME} hostaddr=127.0.0.1 port={} user=certuser dbname={dbname} \
         sslmode=verify-full sslrootcert={}",
        server.cluster.port,
        server.ca()
    );
    let with_cert = format!(
        "{base} sslcert={} sslkey={}",
        server.client_cert.display(),
        server.client_key.display()
    );
    let client = connected(&with_cert).await;
    let dn: Option<String> = client
        .query_one(
            "SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("read pg_stat_ssl")
        .get(0);
    assert_eq!(dn.as_deref(), Some("/CN=certuser"));
    let e = refused(connect(&base).await, &base);
    assert!(e.contains("certificate"), "{e}");

    // A key that others may read is refused before connecting, as libpq does.
    let open_key = server.cluster.socket_dir.join("client/open.key");
    std::fs::copy(&server.client_key, &open_key).expect("copy the key");
    let status = std::process::Command::new("chmod")
        .arg("644")
        .arg(&open_key)
        .status()
        .expect("chmod");
    assert!(status.success());
    let loose = format!(
        "{base} sslcert={} sslkey={}",
        server.client_cert.display(),
        open_key.display()
    );
    let e = refused(connect(&loose).await, &loose);
    assert!(
        e.contains("sslkey") && e.contains("group or world access"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_with_channel_binding_through_tls() {
    let server = server().await;
    let dbname = server.database("scram").await;
    let conninfo = format!(
        "postgres://scramuser:{SCRAM_PASSWORD}@{SERVER_NAME}:{}/{dbname}?hostaddr=127.0.0.1\
         &sslmode=verify-full&sslrootcert={}&channel_binding=require",
        server.cluster.port,
        server.ca()
    );
    let client = connected(&conninfo).await;
    assert!(ssl_in_use(&client).await);
    let wrong = conninfo.replace(SCRAM_PASSWORD, "wrong-password");
    let e = refused(connect(&wrong).await, "a wrong password");
    assert!(e.contains("password authentication failed"), "{e}");
    assert!(!e.contains("wrong-password"), "the password stays out: {e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_works_through_tls_in_both_forms() {
    let server = server().await;
    let dbname = server.database("cli").await;
    let forms = [
        server.kv(
            &dbname,
            &format!("sslmode=verify-full sslrootcert='{}'", server.ca()),
        ),
        server.url(
            &dbname,
            &format!("sslmode=verify-full&sslrootcert={}", server.ca()),
        ),
    ];
    for (i, conninfo) in forms.iter().enumerate() {
        let mut migrate = outboxd_command();
        migrate.arg("migrate").env("DATABASE_URL", conninfo);
        let finished = run_to_end(migrate).await;
        assert_eq!(finished.code, Some(0), "{finished:?}");
        let expected = if i == 0 {
            "applied: 0001_schema.sql"
        } else {
            "schema is up to date"
        };
        assert!(finished.stdout.contains(expected), "{finished:?}");

        let mut list = outboxd_command();
        list.args(["endpoint", "list", "--json"])
            .env("DATABASE_URL", conninfo);
        let finished = run_to_end(list).await;
        assert_eq!(finished.code, Some(0), "{finished:?}");
        assert_eq!(finished.stdout.trim(), "[]");
    }

    // A certificate that does not verify: exit 1, and the reason.
    let mut migrate = outboxd_command();
    migrate.arg("migrate").env(
        "DATABASE_URL",
        server.kv(
            &dbname,
            &format!("sslmode=verify-full sslrootcert={}", server.other_ca()),
        ),
    );
    let finished = run_to_end(migrate).await;
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(finished.stderr.contains("unknown issuer"), "{finished:?}");

    // A value libpq would not take: exit 2, naming the variable and the parameter.
    for (bad, parameter) in [
        ("sslmode=verify-everything", "sslmode"),
        (
            "sslrootcert=/nonexistent/ca.pem sslmode=verify-ca",
            "sslrootcert",
        ),
        (
            &format!(
                "sslmode=verify-ca sslrootcert={} sslcrl=/nonexistent/root.crl",
                server.ca()
            ) as &str,
            "sslcrl",
        ),
        ("sslpassword=x", "sslpassword"),
    ] {
        let mut list = outboxd_command();
        list.args(["endpoint", "list"])
            .env("DATABASE_URL", server.kv(&dbname, bad));
        let finished = run_to_end(list).await;
        assert_eq!(finished.code, Some(2), "{bad}: {finished:?}");
        assert!(
            finished.stderr.contains("DATABASE_URL") && finished.stderr.contains(parameter),
            "{bad}: {finished:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_command_delivers_through_tls() {
    let server = server().await;
    let dbname = server.database("run").await;
    let conninfo = server.kv(
        &dbname,
        &format!("sslmode=verify-full sslrootcert={}", server.ca()),
    );
    let mut client = connected(&conninfo).await;
    outboxd::schema::migrate(&mut client)
        .await
        .expect("migrate");
    let receiver = Receiver::start().await;
    outboxd::endpoint::add(
        &client,
        outboxd::NewEndpoint {
            url: receiver.url("/hook"),
            event_types: Vec::new(),
            secret: None,
            description: "tls".into(),
            ..Default::default()
        },
    )
    .await
    .expect("register");
    let mut run = outboxd_command();
    run.arg("run")
        .env("DATABASE_URL", &conninfo)
        .env("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true");
    let spawned = crate::harness::Spawned::start(run);
    outboxd::enqueue(
        &client,
        &outboxd::NewEvent::new("order.created", &json!({"n": 2})),
    )
    .await
    .expect("enqueue");
    receiver.wait_for(1).await;
    crate::harness::sigterm(spawned.pid());
    let finished = spawned.finish(Duration::from_secs(30)).await;
    assert_eq!(finished.code, Some(0), "{finished:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_server_certificate_is_refused() {
    let server = server().await;
    let dbname = server.database("crl").await;
    let base = server.kv(
        &dbname,
        &format!("sslmode=verify-full sslrootcert={}", server.ca()),
    );
    let revoked = format!("{base} sslcrl={}", server.revoking_crl.display());
    let e = refused(connect(&revoked).await, &revoked);
    assert!(e.contains("revoked"), "{e}");
    // Every certificate in the chain must be covered by a CRL: one from another CA
    // leaves the server's status unknown, which is a refusal too.
    let unknown = format!("{base} sslcrl={}", server.unrelated_crl.display());
    let e = refused(connect(&unknown).await, &unknown);
    assert!(e.contains("unknown revocation status"), "{e}");
    // A CRL directory is read whole: the issuer's clean CRL lets the certificate through.
    let crls = server.cluster.socket_dir.join("client/crls");
    std::fs::create_dir_all(&crls).expect("a CRL directory");
    std::fs::copy(&server.clean_crl, crls.join("clean.crl")).expect("copy the CRL");
    let with_dir = format!("{base} sslcrldir={}", crls.display());
    assert!(ssl_in_use(&connected(&with_dir).await).await);
    // ... and the issuer's next CRL, revoking it, ends that.
    std::fs::remove_file(crls.join("clean.crl")).expect("remove the old CRL");
    std::fs::copy(&server.revoking_crl, crls.join("revoking.crl")).expect("copy the CRL");
    let e = refused(connect(&with_dir).await, &with_dir);
    assert!(e.contains("revoked"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_2_is_spoken_when_asked_and_a_refused_client_certificate_is_explained() {
    let server = server().await;
    let dbname = server.database("tls12").await;
    let version = |client: tokio_postgres::Client| async move {
        client
            .query_one(
                "SELECT version FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .expect("read pg_stat_ssl")
            .get::<_, String>(0)
    };
    // Both verifiers check TLS 1.2's handshake signature: the chain-checking one, and
    // the encrypt-only one of sslmode=require without roots.
    for extra in [
        format!(
            "sslmode=verify-full sslrootcert={} ssl_max_protocol_version=TLSv1.2",
            server.ca()
        ),
        "sslmode=require ssl_max_protocol_version=TLSv1.2".to_owned(),
    ] {
        let client = connected(&server.kv(&dbname, &extra)).await;
        assert_eq!(version(client).await, "TLSv1.2", "{extra}");
    }
    assert_eq!(
        version(connected(&server.kv(&dbname, "sslmode=require")).await).await,
        "TLSv1.3"
    );

    // A client certificate from a CA the server does not trust: under TLS 1.2 the
    // server's alert ends the handshake, and the message says what it wants.
    let stranger = format!(
        "host={SERVER_NAME} hostaddr=127.0.0.1 port={} user=certuser dbname={dbname} \
         sslmode=verify-full sslrootcert={} sslcert={} sslkey={} ssl_max_protocol_version=TLSv1.2",
        server.cluster.port,
        server.ca(),
        server.stranger_cert.display(),
        server.stranger_key.display()
    );
    // The server closes the connection right after its alert: a client still writing
    // its side of the handshake may meet the closed socket (a broken pipe) before it
    // reads the alert. Every attempt is refused; most read the alert, and the one that
    // does must explain it.
    let mut seen = Vec::new();
    for _ in 0..10 {
        let e = refused(connect(&stranger).await, &stranger);
        if e.contains("alert") {
            assert!(e.contains("it wants a client certificate it trusts"), "{e}");
            return;
        }
        assert!(
            e.contains("Broken pipe") || e.contains("reset") || e.contains("closed"),
            "{e}"
        );
        seen.push(e);
    }
    panic!("no attempt read the server's alert: {seen:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_roots_are_what_the_platform_trusts() {
    let server = server().await;
    let dbname = server.database("system").await;
    let conninfo = server.kv(&dbname, "sslmode=verify-full sslrootcert=system");
    // SSL_CERT_FILE replaces the platform's roots, as in OpenSSL: with the test CA there,
    // the server's certificate verifies.
    let mut list = outboxd_command();
    list.args(["endpoint", "list", "--json"])
        .env("DATABASE_URL", &conninfo)
        .env("SSL_CERT_FILE", &server.ca);
    let finished = run_to_end(list).await;
    // The database has no schema: reaching it is what counts (not a TLS refusal).
    assert!(
        !finished.stderr.contains("certificate") && !finished.stderr.contains("sslrootcert"),
        "{finished:?}"
    );
    assert!(finished.stderr.contains("webhook_"), "{finished:?}");

    // With no roots at all, the start is refused naming the parameter and why.
    let empty_dir = server.cluster.socket_dir.join(format!("client/{dbname}"));
    std::fs::create_dir_all(&empty_dir).expect("an empty directory");
    for (file, dir, says) in [
        ("/nonexistent/roots.pem", None, "/nonexistent/roots.pem"),
        ("/dev/null", Some(&empty_dir), "none found"),
    ] {
        let mut list = outboxd_command();
        list.args(["endpoint", "list"])
            .env("DATABASE_URL", &conninfo)
            .env("SSL_CERT_FILE", file);
        if let Some(dir) = dir {
            list.env("SSL_CERT_DIR", dir);
        }
        let finished = run_to_end(list).await;
        assert_eq!(finished.code, Some(2), "{finished:?}");
        assert!(
            finished.stderr.contains("DATABASE_URL")
                && finished.stderr.contains("sslrootcert")
                && finished.stderr.contains("no usable root certificates")
                && finished.stderr.contains(says),
            "{finished:?}"
        );
    }
}

/// A listener that answers PostgreSQL's SSLRequest with `S` and then, instead of a TLS
/// handshake, sends `reply` and hangs up: what a client meets behind a misrouted port.
async fn fake_tls_server(reply: &'static [u8]) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = [0u8; 8];
            if socket.read_exact(&mut request).await.is_err() {
                continue;
            }
            let _ = socket.write_all(b"S").await;
            let _ = socket.write_all(reply).await;
            let _ = socket.shutdown().await;
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_handshake_is_reported_as_such() {
    crate::harness::init_tracing();
    for (reply, says) in [
        // Not TLS at all: rustls names what it got.
        (
            &b"HTTP/1.1 400 Bad Request\r\n\r\n"[..],
            "TLS handshake failed",
        ),
        // The peer hangs up mid-handshake.
        (&b""[..], "TLS handshake failed"),
    ] {
        let port = fake_tls_server(reply).await;
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=u dbname=d sslmode=require connect_timeout=10"
        );
        let e = refused(connect(&conninfo).await, &conninfo);
        assert!(e.contains(says), "{reply:?}: {e}");
    }
}
