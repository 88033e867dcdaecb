//! The state a run carries from scenario to scenario: the settings, the admin connection
//! that creates each scenario's database, the receiver, the processes whose CPU is
//! sampled, and the figures one scenario leaves for another (fan-out compares itself
//! with the push burst).

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::Client;

use crate::dispatcher::{self, Mode, Running};
use crate::pg;
use crate::receiver::Receiver;
use crate::report::Report;
use crate::settings::Settings;
use crate::sys::{PgProcs, Probe};

/// Shared state of a run.
pub struct Ctx {
    pub s: Settings,
    pub admin_url: String,
    pub admin: Client,
    pub receiver: Receiver,
    pub pg: Option<PgProcs>,
    pub outboxd_bin: PathBuf,
    /// `WEBHOOK_WORKER_THREADS` for the `outboxd run` processes started next (unset:
    /// the binary's default, the CPUs available to it).
    pub outboxd_threads: Option<u16>,
    pub report: Report,
    /// The push burst's median rate, for the fan-out comparison.
    pub burst_push_rate: Option<f64>,
    /// In-process VmHWM after the push burst.
    pub inproc_hwm_kib: Option<u64>,
    db_seq: u32,
}

impl Ctx {
    pub fn new(
        s: Settings,
        admin_url: String,
        admin: Client,
        receiver: Receiver,
        pg: Option<PgProcs>,
        outboxd_bin: PathBuf,
    ) -> Self {
        Self {
            s,
            admin_url,
            admin,
            receiver,
            pg,
            outboxd_bin,
            outboxd_threads: None,
            report: Report::default(),
            burst_push_rate: None,
            inproc_hwm_kib: None,
            db_seq: 0,
        }
    }

    fn db_name(&mut self, tag: &str) -> String {
        self.db_seq += 1;
        format!("outboxd_bench_{}_{}", self.db_seq, tag)
    }

    /// Runs `f` on a fresh, migrated database named for `tag` (its URL and a connection
    /// to it), then drops the database whether `f` succeeded or not, so no scenario sees
    /// another's rows, statistics or bloat.
    pub async fn with_db<T>(
        &mut self,
        tag: &str,
        f: impl AsyncFnOnce(&mut Ctx, &str, &mut Client) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let name = self.db_name(tag);
        let (url, mut client) = pg::create_db(&self.admin, &self.admin_url, &name).await?;
        let result = f(self, &url, &mut client).await;
        drop(client);
        pg::drop_db(&self.admin, &name).await?;
        result
    }

    /// Registers the receiver's endpoint 0, forgets what it received before, and starts
    /// the dispatchers of `mode`: the setting of every single-endpoint scenario.
    pub async fn start_one_endpoint(
        &mut self,
        url: &str,
        client: &Client,
        mode: Mode,
    ) -> anyhow::Result<Running> {
        pg::add_endpoints(client, [self.receiver.url(0)]).await?;
        self.receiver.take().await?;
        dispatcher::start(self, url, client, mode).await
    }

    /// CPU sampling of the receiver, PostgreSQL and the given `outboxd run` processes.
    pub fn probe(&self, outboxd: Vec<u32>) -> Probe {
        Probe {
            receiver: self.receiver.pid(),
            pg: self.pg,
            outboxd,
        }
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.s.poll_interval_ms)
    }
}
