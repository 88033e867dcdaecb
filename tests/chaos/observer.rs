//! The suite's own view of the database: one connection (application name
//! `chaos-observer`, so backend faults never hit it) that reconnects across restarts.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

/// A (event id, endpoint id) pair: one delivery.
pub type Pair = (i64, i64);

/// How long a query keeps retrying while the database is unreachable (a restart takes
/// seconds; crash recovery on a loaded machine a little more).
const REACH_BOUND: Duration = Duration::from_secs(120);

pub struct Observer {
    url: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

/// Whether an error means the connection or the server went away (and retrying on a
/// new connection may succeed), rather than that the statement itself was refused.
pub fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        // 57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now;
        // class 08: connection exceptions.
        Some(code) => code.code().starts_with("57P") || code.code().starts_with("08"),
        // No SQLSTATE: an I/O error, a closed connection, a refused connect.
        None => true,
    }
}

/// Connects to `url` with `application_name` set, driving the connection in a task.
pub async fn connect(url: &str, application_name: &str) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    config
        .application_name(application_name)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

impl Observer {
    pub fn new(url: String) -> Self {
        Self {
            url,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// Runs `sql`, reconnecting and retrying while the database is unreachable.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> anyhow::Result<Vec<Row>> {
        let deadline = Instant::now() + REACH_BOUND;
        let mut guard = self.client.lock().await;
        loop {
            let error = match guard.as_ref() {
                Some(client) => match client.query(sql, params).await {
                    Ok(rows) => return Ok(rows),
                    Err(e) if is_connection_error(&e) => {
                        *guard = None;
                        e
                    }
                    Err(e) => return Err(e).with_context(|| format!("query: {sql}")),
                },
                None => match connect(&self.url, "chaos-observer").await {
                    Ok(client) => {
                        *guard = Some(client);
                        continue;
                    }
                    Err(e) => e,
                },
            };
            if Instant::now() > deadline {
                bail!("the database stayed unreachable for {REACH_BOUND:?}: {error}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deliveries leased right now (pending with a lease holder), to the given
    /// dispatcher incarnations or, with `None`, to anyone.
    pub async fn leased(&self, workers: Option<&[String]>) -> anyhow::Result<Vec<Pair>> {
        let rows = match workers {
            Some(workers) => {
                let workers: Vec<&str> = workers.iter().map(String::as_str).collect();
                self.query(
                    "SELECT event_id, endpoint_id FROM webhook_deliveries
                     WHERE state = 'pending' AND locked_by = ANY($1)",
                    &[&workers],
                )
                .await?
            }
            None => {
                self.query(
                    "SELECT event_id, endpoint_id FROM webhook_deliveries
                     WHERE state = 'pending' AND locked_by IS NOT NULL",
                    &[],
                )
                .await?
            }
        };
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }
}
