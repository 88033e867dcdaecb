//! Opening connections: the connection string read as libpq reads it ([`conninfo`]),
//! TLS as libpq's `sslmode` asks ([`tls`]), the settings of outboxd's sessions
//! ([`session`]), several hosts tried in turn, and a pooler that refuses startup
//! options worked around.
//!
//! [`conninfo`]: super::conninfo
//! [`tls`]: super::tls
//! [`session`]: super::session

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rand::seq::SliceRandom as _;
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::{CancelToken, Client, Connection, Socket};

use super::conninfo::{
    ChannelBinding, ConnInfo, ConnInfoError, Host, SslMode, SslNegotiation, Target,
    TargetSessionAttrs,
};
use super::session::Session;
use super::tls::{self, RustlsStream};
use tokio_util::sync::CancellationToken;

use crate::config::ConfigError;
use crate::error::{Error, Result};

/// How long a statement abandoned at shutdown may take to end once its cancel has been
/// requested (normally a round trip).
pub(crate) const CANCEL_BOUND: Duration = Duration::from_secs(2);

/// How often the cancel of a statement abandoned at shutdown is sent again while the
/// statement has not ended (see [`Connector::finish_or_cancel`]).
const CANCEL_RESEND: Duration = Duration::from_millis(200);

/// How long a connection attempt may take when the string sets no `connect_timeout`
/// (libpq would wait indefinitely; a dispatcher should rather retry).
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TCP keepalive idle time for connections when the string sets none: notices a dead
/// server or a dropped NAT entry within minutes rather than the system's two hours.
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

/// Opens connections for one kind of session to one database: the connection string
/// parsed and its files read once, then any number of connections. Cloning is cheap.
/// `Debug` shows no password.
#[derive(Clone)]
pub struct Connector {
    info: Arc<ConnInfo>,
    tls: tls::MakeRustls,
    options: Option<String>,
    application_name: String,
    keepalives: Option<(Duration, Duration, u32)>,
    /// Set once the server refused the startup `options` (a pooler): later connections
    /// leave them out (see [`Connector::connect_raw`]).
    options_refused: Arc<AtomicBool>,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("info", &self.info)
            .field("tls", &self.tls)
            .field("options", &self.options)
            .field("application_name", &self.application_name)
            .finish_non_exhaustive()
    }
}

/// An unusable connection string is a configuration error of `DATABASE_URL`.
fn invalid(e: ConnInfoError) -> Error {
    Error::Config(ConfigError {
        variable: "DATABASE_URL",
        message: e.to_string(),
    })
}

impl Connector {
    /// A connector for `database_url` (libpq's URL or key=value form) and sessions of
    /// kind `session`. Fails, naming the parameter, on anything libpq would refuse or
    /// outboxd cannot honour, and on TLS files that cannot be read.
    pub fn new(database_url: &str, session: Session) -> Result<Self> {
        let info = ConnInfo::parse(database_url).map_err(invalid)?;
        let tls = tls::MakeRustls::new(&info.tls, tls::home_dir().as_deref()).map_err(invalid)?;
        let options = session.settings().options(info.options.as_deref());
        let application_name = match &session {
            Session::Dispatcher(_) => "outboxd",
            Session::Operator => "outboxd-admin",
        };
        Ok(Self {
            info: Arc::new(info),
            tls,
            options,
            application_name: application_name.to_owned(),
            keepalives: None,
            options_refused: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Names the sessions `application_name` unless the connection string names them
    /// (libpq's `fallback_application_name`).
    pub fn with_application_name(mut self, name: &str) -> Self {
        self.application_name = name.to_owned();
        self
    }

    /// TCP keepalives with these idle time, interval and count, whatever the string
    /// says: for a session that must notice a half-open socket.
    pub fn with_keepalives(mut self, idle: Duration, interval: Duration, retries: u32) -> Self {
        self.keepalives = Some((idle, interval, retries));
        self
    }

    /// The driver's configuration for one target and one TLS attempt.
    fn driver_config(
        &self,
        target: &Target,
        ssl: DriverSslMode,
        options: bool,
    ) -> tokio_postgres::Config {
        let info = &*self.info;
        let mut c = tokio_postgres::Config::new();
        match (&target.host, target.hostaddr) {
            (Some(Host::Tcp(name)), addr) => {
                c.host(name);
                if let Some(addr) = addr {
                    c.hostaddr(addr);
                }
            }
            (Some(Host::Unix(dir)), None) => {
                c.host_path(dir);
            }
            // An address without a name: the driver needs a host to hand TLS; the IP
            // itself is what libpq checks too (verify-full is refused without a name).
            (_, Some(addr)) => {
                c.host(addr.to_string());
                c.hostaddr(addr);
            }
            (None, None) => {}
        }
        c.port(target.port);
        if let Some(user) = &info.user {
            c.user(user);
        }
        if let Some(password) = &info.password {
            c.password(password);
        }
        if let Some(dbname) = &info.dbname {
            c.dbname(dbname);
        }
        if let (true, Some(options)) = (options, &self.options) {
            c.options(options);
        }
        c.application_name(
            info.application_name
                .as_deref()
                .unwrap_or(&self.application_name),
        );
        match info.connect_timeout {
            None => {
                c.connect_timeout(DEFAULT_CONNECT_TIMEOUT);
            }
            Some(Duration::ZERO) => {}
            Some(timeout) => {
                c.connect_timeout(timeout);
            }
        }
        match self.keepalives {
            Some((idle, interval, retries)) => {
                c.keepalives(true)
                    .keepalives_idle(idle)
                    .keepalives_interval(interval)
                    .keepalives_retries(retries);
            }
            None => {
                c.keepalives(info.keepalives.unwrap_or(true));
                c.keepalives_idle(info.keepalives_idle.unwrap_or(DEFAULT_KEEPALIVES_IDLE));
                if let Some(interval) = info.keepalives_interval {
                    c.keepalives_interval(interval);
                }
                if let Some(count) = info.keepalives_count {
                    c.keepalives_retries(count);
                }
            }
        }
        if let Some(timeout) = info.tcp_user_timeout {
            c.tcp_user_timeout(timeout);
        }
        c.channel_binding(match info.channel_binding {
            ChannelBinding::Disable => tokio_postgres::config::ChannelBinding::Disable,
            ChannelBinding::Prefer => tokio_postgres::config::ChannelBinding::Prefer,
            ChannelBinding::Require => tokio_postgres::config::ChannelBinding::Require,
        });
        c.target_session_attrs(match info.target_session_attrs {
            TargetSessionAttrs::Any => tokio_postgres::config::TargetSessionAttrs::Any,
            TargetSessionAttrs::ReadWrite => tokio_postgres::config::TargetSessionAttrs::ReadWrite,
            TargetSessionAttrs::ReadOnly => tokio_postgres::config::TargetSessionAttrs::ReadOnly,
        });
        c.ssl_mode(ssl);
        if info.tls.negotiation == SslNegotiation::Direct {
            c.ssl_negotiation(tokio_postgres::config::SslNegotiation::Direct);
        }
        c
    }

    /// How to try one target, in order: libpq never uses TLS over a Unix socket;
    /// `allow` tries plaintext, then TLS if the server refused the plaintext session;
    /// `prefer` lets the server refuse TLS; from `require` on, TLS or nothing.
    fn attempts(&self, target: &Target) -> &'static [DriverSslMode] {
        if target.is_unix() {
            return &[DriverSslMode::Disable];
        }
        match self.info.tls.mode {
            SslMode::Disable => &[DriverSslMode::Disable],
            SslMode::Allow => &[DriverSslMode::Disable, DriverSslMode::Require],
            SslMode::Prefer => &[DriverSslMode::Prefer],
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => &[DriverSslMode::Require],
        }
    }

    /// Opens a connection and returns it with its driver, for a caller that drives it
    /// itself (the LISTEN session polls it for notifications). Tries each host in turn
    /// (in random order with `load_balance_hosts=random`) and returns the last error
    /// if none answers.
    ///
    /// A server that refuses the startup parameter `options` is a pooler (pgbouncer
    /// refuses it unless told to ignore it): the connection is opened again without
    /// it, and so are this connector's later ones, with a warning, once. The session
    /// settings must then come from the role; the dispatcher checks at start that they
    /// did ([`crate::pooler::check_settings`]).
    pub async fn connect_raw(
        &self,
    ) -> Result<(Client, Connection<Socket, RustlsStream>), tokio_postgres::Error> {
        let options = self.options.is_some() && !self.options_refused.load(Ordering::Relaxed);
        match self.connect_targets(options).await {
            Err(e) if options && refuses_startup_options(&e) => {
                if !self.options_refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "the server refuses startup options (a pooler such as pgbouncer): \
                         connecting without them, so outboxd's session settings and the \
                         connection string's own options must come from the role \
                         (ALTER ROLE ... SET)"
                    );
                }
                self.connect_targets(false).await
            }
            other => other,
        }
    }

    async fn connect_targets(
        &self,
        options: bool,
    ) -> Result<(Client, Connection<Socket, RustlsStream>), tokio_postgres::Error> {
        let mut targets: Vec<&Target> = self.info.targets.iter().collect();
        if self.info.load_balance_hosts {
            targets.shuffle(&mut rand::rng());
        }
        let mut last = None;
        for target in targets {
            let attempts = self.attempts(target);
            for (i, &ssl) in attempts.iter().enumerate() {
                let config = self.driver_config(target, ssl, options);
                match config.connect(self.tls.clone()).await {
                    Ok(connected) => return Ok(connected),
                    Err(e) => {
                        // `allow` retries with TLS only when the server answered and
                        // refused (an error response), not when it was unreachable.
                        let refused = e.as_db_error().is_some();
                        last = Some(e);
                        if !(refused && i + 1 < attempts.len()) {
                            break;
                        }
                    }
                }
            }
        }
        Err(last.expect("a connection string has at least one target"))
    }

    /// Asks the server to cancel the statement running on the connection `token` was
    /// taken from, over a connection of its own.
    ///
    /// As libpq does, the request is written and its connection left open until the
    /// server closes it, which it does once it has passed the request on. The driver's
    /// own cancel closes its side at once: behind pgbouncer that can lose the request,
    /// and it crashes pgbouncer 1.18.0 to 1.19.0 (Debian 12's package; pgbouncer issue
    /// 801) when the close arrives while pgbouncer passes the request on, taking every
    /// connection of every client of that pgbouncer with it. So a request goes this way
    /// wherever it may go in plaintext, as libpq sends it (a server reads a cancel
    /// request before any authentication): to a connection string's only host, unless
    /// its `sslmode` requires TLS. Elsewhere (several hosts, TLS required, or this way
    /// failed) the driver sends it, over TLS where the connection used it, to the
    /// address the connection went to.
    pub async fn cancel(&self, token: &CancelToken) -> Result<(), tokio_postgres::Error> {
        if let ([target], SslMode::Disable | SslMode::Allow | SslMode::Prefer) =
            (self.info.targets.as_slice(), self.info.tls.mode)
        {
            if let Some(sent) = cancel_awaiting_close(target, token).await {
                return sent;
            }
        }
        token.cancel_query(self.tls.clone()).await
    }

    /// Awaits `statement`, running on `client` (a connection this connector opened),
    /// unless `stop` comes first: then asks the server to cancel it and waits at most
    /// [`CANCEL_BOUND`] more for it to end. The statement's result if it ended (a claim
    /// that committed must still be handed back), `None` if it did not.
    ///
    /// A statement may wait on a lock without bound (a producer holding the doorbell's
    /// row in an idle transaction, an operator's `LOCK TABLE`); dropping its future
    /// would leave the server session waiting, and taking effect later, after the
    /// dispatcher that sent it is gone.
    ///
    /// A statement not yet started when `stop` has already come is never sent. One sent
    /// as `stop` comes may reach its backend after the cancel request does, and
    /// PostgreSQL ignores a cancel that finds its backend idle: the request is sent
    /// again every [`CANCEL_RESEND`] until the statement ends or the bound is spent.
    pub(crate) async fn finish_or_cancel<T>(
        &self,
        client: &Client,
        stop: &CancellationToken,
        statement: impl Future<Output = T>,
    ) -> Option<T> {
        self.finish_or_cancel_token(&client.cancel_token(), stop, statement)
            .await
    }

    /// [`Connector::finish_or_cancel`] for a statement whose connection is borrowed
    /// elsewhere: `token` is that connection's cancel token.
    pub(crate) async fn finish_or_cancel_token<T>(
        &self,
        token: &CancelToken,
        stop: &CancellationToken,
        statement: impl Future<Output = T>,
    ) -> Option<T> {
        if stop.is_cancelled() {
            return None;
        }
        let mut statement = std::pin::pin!(statement);
        tokio::select! {
            biased;
            done = &mut statement => return Some(done),
            _ = stop.cancelled() => {}
        }
        // A cancel request still going when the statement ends is seen through, not
        // dropped half-way: its connection would close early (see
        // `Connector::cancel`), and the process may be about to exit.
        let mut cancel = None;
        let ended = tokio::time::timeout(CANCEL_BOUND, async {
            // Each cancel request goes over a connection of its own; if it cannot be
            // sent (the server is gone), the bound still ends the wait.
            let mut resend = tokio::time::interval(CANCEL_RESEND);
            resend.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut warned = false;
            loop {
                let idle = cancel.is_none();
                let sending = futures_util::future::OptionFuture::from(cancel.as_mut());
                tokio::select! {
                    biased;
                    done = &mut statement => return done,
                    Some(sent) = sending => {
                        cancel = None;
                        if let Err(e) = sent
                            && !std::mem::replace(&mut warned, true)
                        {
                            tracing::warn!(error = %e, "cancelling a statement at shutdown failed");
                        }
                    }
                    _ = resend.tick(), if idle => {
                        cancel = Some(Box::pin(self.cancel(token)));
                    }
                }
            }
        })
        .await;
        if let Some(sending) = cancel {
            let _ = tokio::time::timeout(CANCEL_BOUND, sending).await;
        }
        if ended.is_err() {
            tracing::warn!(
                bound_ms = CANCEL_BOUND.as_millis() as u64,
                "a statement still running at shutdown did not end once cancelled; abandoned"
            );
        }
        ended.ok()
    }

    /// Opens a connection driven by a background task that ends with it.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.connect_raw().await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection closed");
            }
        });
        Ok(client)
    }
}

/// Whether a connection attempt failed because the server (a pooler: pgbouncer unless
/// `options` is in its `ignore_startup_parameters`) refuses the startup parameter
/// `options`, which carries the session settings. pgbouncer says so with the generic
/// protocol-violation code, so its words are what tells this refusal apart.
fn refuses_startup_options(error: &tokio_postgres::Error) -> bool {
    error.as_db_error().is_some_and(|db| {
        *db.code() == tokio_postgres::error::SqlState::PROTOCOL_VIOLATION
            && db.message().contains("startup parameter")
            && db.message().contains("options")
    })
}

/// A pool of `size` connections from `connector`. Connections are not tested on
/// checkout (that would cost a round trip per query); a broken one is noticed by the
/// query that uses it and replaced.
pub async fn pool(connector: &Connector, size: u32) -> Result<super::Pool> {
    let pool = bb8::Pool::builder()
        .max_size(size)
        .test_on_check_out(false)
        .connection_timeout(Duration::from_secs(10))
        .build(super::Manager(connector.clone()))
        .await?;
    Ok(pool)
}


/// Sends `token`'s cancel request to `target` in plaintext and waits, at most
/// [`CANCEL_BOUND`], for the server to close the connection (see
/// [`Connector::cancel`]). `None` if it could not be sent this way: no connection
/// within the bound, or the request refused (the server insisted on TLS).
async fn cancel_awaiting_close(
    target: &Target,
    token: &CancelToken,
) -> Option<Result<(), tokio_postgres::Error>> {
    let connect = async {
        let stream: Box<dyn CancelStream> = match (&target.host, target.hostaddr) {
            (_, Some(addr)) => Box::new(tokio::net::TcpStream::connect((addr, target.port)).await?),
            (Some(Host::Tcp(name)), None) => {
                Box::new(tokio::net::TcpStream::connect((name.as_str(), target.port)).await?)
            }
            (Some(Host::Unix(dir)), None) => Box::new(
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{}", target.port)))
                    .await?,
            ),
            (None, None) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no host",
                ));
            }
        };
        Ok::<_, std::io::Error>(stream)
    };
    let stream = tokio::time::timeout(CANCEL_BOUND, connect).await.ok()?.ok()?;
    let sent = token.cancel_query_raw(AwaitClose(stream), tokio_postgres::NoTls);
    match tokio::time::timeout(CANCEL_BOUND, sent).await {
        Ok(Ok(())) => Some(Ok(())),
        // The server would have this request over TLS only.
        Ok(Err(_)) => None,
        // Written; the server was slow to close.
        Err(_) => Some(Ok(())),
    }
}

/// A stream a cancel request can go over.
trait CancelStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> CancelStream for S {}

/// A cancel request's connection which, told to shut down once the request is written,
/// waits for the server to close it instead, as libpq does (see [`Connector::cancel`]).
struct AwaitClose(Box<dyn CancelStream>);

impl AsyncRead for AwaitClose {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for AwaitClose {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    /// Reads until the server closes the connection; it sends nothing before that.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let mut scratch = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            std::task::ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    /// A statement that has not started when the stop comes is not sent: sent, it could
    /// reach the server after its cancel and wait there for a lock long after the
    /// dispatcher is gone (`shutdown_ends_while_a_claim_waits_for_a_lock` failed now and
    /// then that way). Needs `DATABASE_URL`, as the integration tests do.
    #[tokio::test]
    async fn a_statement_not_started_before_the_stop_is_never_sent() {
        let url = std::env::var("DATABASE_URL").expect("DATABASE_URL (make test sets it)");
        let connector = Connector::new(&url, Session::Operator).unwrap();
        let holder = connector.connect().await.unwrap();
        let table = format!("stop_probe_{}", std::process::id());
        holder
            .batch_execute(&format!("CREATE TABLE {table} (x int)"))
            .await
            .unwrap();
        holder
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .unwrap();
        let client = connector.connect().await.unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        let sql = format!("SELECT count(*) FROM {table}");
        let ran = connector
            .finish_or_cancel(&client, &stop, client.simple_query(&sql))
            .await;
        let waiting = holder
            .simple_query(&format!(
                "SELECT 1 FROM pg_stat_activity WHERE query = '{sql}' AND pid <> pg_backend_pid()"
            ))
            .await
            .unwrap()
            .into_iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        holder
            .batch_execute(&format!("COMMIT; DROP TABLE {table}"))
            .await
            .unwrap();
        assert!(ran.is_none(), "the statement was sent and ended: {ran:?}");
        assert_eq!(waiting, 0, "the statement reached the server");
    }

    /// What a stand-in server saw of a client's opening: PostgreSQL 17's direct TLS
    /// cannot be had from the PostgreSQL 15 the tests run, so a rustls server on
    /// loopback takes the handshake and reports how it began.
    async fn opening(negotiation: &str) -> (Vec<u8>, Option<Vec<u8>>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["db.test".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let root = std::env::temp_dir().join(format!(
            "outboxd-direct-{}-{negotiation}.pem",
            std::process::id()
        ));
        std::fs::write(&root, cert.pem()).unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
        server.alpn_protocols = vec![b"postgresql".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut first = [0u8; 8];
            socket.peek(&mut first).await.unwrap();
            if first[0] != 0x16 {
                // An SSLRequest: read it and say no.
                let mut socket = socket;
                socket.read_exact(&mut first).await.unwrap();
                return (first.to_vec(), None);
            }
            let tls = acceptor.accept(socket).await.unwrap();
            let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
            (first.to_vec(), alpn)
        });
        let conninfo = format!(
            "host=db.test hostaddr=127.0.0.1 port={port} sslmode=verify-full \
             sslrootcert={} sslnegotiation={negotiation} connect_timeout=5",
            root.display()
        );
        let connector = Connector::new(&conninfo, Session::Operator).unwrap();
        // The stand-in speaks no PostgreSQL after the handshake: the connection fails.
        assert!(connector.connect().await.is_err());
        let _ = std::fs::remove_file(&root);
        seen.await.unwrap()
    }

    #[tokio::test]
    async fn sslnegotiation_direct_starts_with_tls_and_alpn() {
        let (first, alpn) = opening("direct").await;
        assert_eq!(first[0], 0x16, "a TLS handshake record, not an SSLRequest");
        assert_eq!(alpn.as_deref(), Some(&b"postgresql"[..]));
        // The default asks first: the SSLRequest (length 8, code 80877103).
        let (first, _) = opening("postgres").await;
        assert_eq!(first, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let connector = Connector::new(
            "postgres://app:hunter2-not-shown@db.example:5433/appdb?sslmode=require",
            Session::Operator,
        )
        .expect("a valid connection string");
        let debug = format!("{connector:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("db.example") && debug.contains("appdb"), "{debug}");
    }
}
