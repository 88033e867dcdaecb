//! `outboxd run`: the dispatcher, and beside it the status server (metrics, health) and
//! the admin API when their addresses are set.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use outboxd::startup::{self, Startup};
use outboxd::{Config, ConfigError, Dispatcher, db, schema, shutdown, status};
use tokio_util::sync::CancellationToken;

/// Settings of the servers that run beside the dispatcher.
#[derive(Clone, clap::Args)]
pub struct ServeArgs {
    /// Serve /metrics, /healthz and /readyz on this address (off when unset); a bare port such as 9090 means 127.0.0.1:9090
    #[arg(long, env = "METRICS_ADDR", value_name = "METRICS_ADDR", value_parser = parse_addr)]
    pub metrics_addr: Option<SocketAddr>,
    /// Serve the admin API on this address (off when unset); a bare port such as 8080 means 127.0.0.1:8080
    #[arg(long, env = "ADMIN_ADDR", value_name = "ADMIN_ADDR", value_parser = parse_addr)]
    pub admin_addr: Option<SocketAddr>,
    /// Bearer token the admin API requires: at least 16 printable ASCII characters, no spaces (surrounding whitespace, such as a file's final newline, is not part of it); required when ADMIN_ADDR is set
    #[arg(
        long,
        env = "ADMIN_TOKEN",
        value_name = "ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// How long a rotated-out secret keeps signing beside the new one, e.g. 24h or 30m
    #[arg(long, env = "WEBHOOK_SECRET_ROTATION_GRACE", value_name = "WEBHOOK_SECRET_ROTATION_GRACE", default_value = "24h", value_parser = parse_grace)]
    pub secret_rotation_grace: Duration,
    /// Runtime threads [default: the CPUs available to the process]; several dispatchers on one host each do best with their share of its cores
    #[arg(long, env = "WEBHOOK_WORKER_THREADS", value_name = "WEBHOOK_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

/// Parses a listen address; a bare port binds loopback, so nothing is exposed beyond
/// the host unless an address is spelled out.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = s.trim().parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.trim()
        .parse()
        .map_err(|_| format!("expected HOST:PORT or a port, got {s:?}"))
}

/// Parses `WEBHOOK_SECRET_ROTATION_GRACE` (humantime: `24h`, `30m`, `1h 30m`).
pub fn parse_grace(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected a duration such as 24h)"))
}

/// The token is never shown: only whether one is set.
impl std::fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeArgs")
            .field("metrics_addr", &self.metrics_addr)
            .field("admin_addr", &self.admin_addr)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("secret_rotation_grace", &self.secret_rotation_grace)
            .field("worker_threads", &self.worker_threads)
            .finish()
    }
}

/// [`ServeArgs`] checked as a whole.
#[derive(Clone)]
pub struct Serve {
    metrics_addr: Option<SocketAddr>,
    /// The admin API's address and its token, trimmed.
    admin: Option<(SocketAddr, String)>,
    rotation_grace: Duration,
}

/// The token is never shown.
impl std::fmt::Debug for Serve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serve")
            .field("metrics_addr", &self.metrics_addr)
            .field("admin_addr", &self.admin.as_ref().map(|(addr, _)| addr))
            .field("rotation_grace", &self.rotation_grace)
            .finish_non_exhaustive()
    }
}

/// The fewest characters an admin token may have.
const MIN_TOKEN_CHARS: usize = 16;

/// What `ADMIN_TOKEN` means: the value without surrounding whitespace (a token read from
/// a file usually ends in a newline, which no client sends). What is left must be one
/// bearer credential a client can send as it is: printable ASCII without spaces.
fn admin_token(raw: &str) -> Result<String, ConfigError> {
    let refuse = |message: &str| ConfigError {
        variable: "ADMIN_TOKEN",
        message: message.to_owned(),
    };
    let token = raw.trim();
    if token.len() < MIN_TOKEN_CHARS {
        return Err(refuse(
            "must be at least 16 characters, not counting surrounding whitespace",
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(refuse(
            "must be printable ASCII without spaces (it is sent in an Authorization header)",
        ));
    }
    Ok(token.to_owned())
}

impl ServeArgs {
    /// Checks that the admin API has a usable token when it is on, and settles what the
    /// token is (see [`admin_token`]): the admin API compares requests with exactly that.
    pub fn validate(self) -> Result<Serve, ConfigError> {
        let admin = match (self.admin_addr, self.admin_token) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(ConfigError {
                    variable: "ADMIN_TOKEN",
                    message: "is required when ADMIN_ADDR is set".to_owned(),
                });
            }
            (Some(addr), Some(token)) => Some((addr, admin_token(&token)?)),
        };
        Ok(Serve {
            metrics_addr: self.metrics_addr,
            admin,
            rotation_grace: self.secret_rotation_grace,
        })
    }
}

/// Runs the dispatcher until SIGTERM/SIGINT and a drain, with the servers beside it.
///
/// The servers come up first; then the start waits for the database (up to
/// `WEBHOOK_DATABASE_WAIT_MS`), with `/readyz` saying so, and checks it is migrated.
/// `listen_database_url` is the LISTEN session's own connection string, if set.
pub async fn run(
    database_url: String,
    listen_database_url: Option<String>,
    config: Config,
    serve: Serve,
) -> anyhow::Result<()> {
    let listen = config.listen;
    let database_wait = config.database_wait;
    if let Some(url) = &listen_database_url {
        db::ConnInfo::parse(url).map_err(|e| ConfigError {
            variable: "WEBHOOK_LISTEN_DATABASE_URL",
            message: e.to_string(),
        })?;
        if !listen {
            tracing::info!("WEBHOOK_LISTEN=false: WEBHOOK_LISTEN_DATABASE_URL is not used");
        }
    }
    let mut dispatcher = Dispatcher::new(database_url.clone(), config)?;
    if let Some(url) = listen_database_url {
        dispatcher = dispatcher.with_listen_database_url(url);
    }
    let shutdown = CancellationToken::new();
    shutdown::cancel_on_signals(shutdown.clone()).context("cannot install signal handlers")?;
    let startup = Arc::new(Startup::waiting_for("waiting for the database"));

    // The servers stop only after the dispatcher has drained, so health checks and
    // metrics stay up during the drain.
    let servers_stop = CancellationToken::new();
    let mut servers = Vec::new();
    if serve.metrics_addr.is_some() || serve.admin.is_some() {
        let pool = db::admin_pool_lazy(&database_url)?;
        if let Some(addr) = serve.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind METRICS_ADDR {addr}"))?;
            tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
            let state = status::StatusState {
                metrics: dispatcher.metrics(),
                pool: pool.clone(),
                listen,
                startup: Arc::clone(&startup),
            };
            servers.push(tokio::spawn(status::serve(
                listener,
                state,
                servers_stop.clone(),
            )));
        }
        if let Some((addr, token)) = serve.admin {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind ADMIN_ADDR {addr}"))?;
            tracing::info!(%addr, "serving the admin API");
            let state = outboxd::admin::AdminState::new(pool, token, serve.rotation_grace);
            servers.push(tokio::spawn(outboxd::admin::serve(
                listener,
                state,
                servers_stop.clone(),
            )));
        }
    }

    let result = async {
        let client = tokio::select! {
            client = startup::wait_for_database(&database_url, database_wait, &startup) => {
                client.with_context(|| {
                    format!(
                        "the database did not accept a connection within \
                         WEBHOOK_DATABASE_WAIT_MS ({} ms), or refused it for good",
                        database_wait.as_millis()
                    )
                })?
            }
            _ = shutdown.cancelled() => return Ok(()),
        };
        let pending = schema::pending_migrations(&client).await?;
        if !pending.is_empty() {
            anyhow::bail!(
                "the database is not migrated (pending: {}); run `outboxd migrate` first",
                pending.join(", ")
            );
        }
        drop(client);
        startup.done();
        dispatcher.run(shutdown).await?;
        Ok(())
    }
    .await;
    servers_stop.cancel();
    for server in servers {
        if let Ok(Err(e)) = server.await {
            tracing::warn!(error = %e, "a server stopped with an error");
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token_is_the_trimmed_value() {
        let token = "0123456789abcdef-token";
        for raw in [
            token.to_owned(),
            format!("{token}\n"),
            format!("{token}\r\n"),
            format!("  {token}\t "),
        ] {
            assert_eq!(admin_token(&raw).unwrap(), token, "{raw:?}");
        }
        for (raw, word) in [
            ("", "16"),
            ("short-token\n\n\n\n\n\n\n", "16"),
            ("                        ", "16"),
            ("0123456789 abcdef-token", "printable"),
            ("0123456789abcdef-tökén", "printable"),
            ("0123456789abcdef\0token", "printable"),
        ] {
            let e = admin_token(raw).unwrap_err();
            assert_eq!(e.variable, "ADMIN_TOKEN");
            assert!(e.message.contains(word), "{raw:?}: {e}");
        }
    }

    #[test]
    fn debug_hides_the_token() {
        let secret = "0123456789abcdef-token";
        let args = ServeArgs {
            metrics_addr: None,
            admin_addr: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            admin_token: Some(secret.to_owned()),
            secret_rotation_grace: Duration::from_secs(60),
            worker_threads: None,
        };
        let shown = format!("{args:?}");
        assert!(!shown.contains(secret), "{shown}");
        let serve = args.validate().unwrap();
        let shown = format!("{serve:?} {serve:#?}");
        assert!(!shown.contains(secret), "{shown}");
        assert!(shown.contains("127.0.0.1:8080"), "{shown}");
    }
}
