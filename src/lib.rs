//! # outboxd
//!
//! A PostgreSQL transactional-outbox webhook dispatcher. Applications write events
//! into `webhook_outbox` inside their own transactions; outboxd delivers each event to
//! every subscribed endpoint as a signed HTTP POST ([Standard Webhooks]), at least once.
//!
//! The `outboxd` binary runs it from the command line; this crate lets a Rust
//! application do the same in-process.
//!
//! ## Quick start
//!
//! ```no_run
//! use outboxd::{Config, Dispatcher, NewEndpoint, NewEvent};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn example() -> Result<(), outboxd::Error> {
//! let url = "postgres://app@localhost/app";
//!
//! // Once, or at every start (it is safe to repeat and to run from several processes):
//! // the tables, the insert trigger, the settle function.
//! let mut client = outboxd::db::connect(url).await?;
//! outboxd::schema::migrate(&mut client).await?;
//!
//! // Register a consumer. Its secret is shown here only: hand it to the consumer.
//! let (endpoint, secret) = outboxd::endpoint::add(
//!     &client,
//!     NewEndpoint {
//!         url: "https://consumer.example/webhooks".to_owned(),
//!         event_types: vec!["order.*".to_owned()],
//!         ..NewEndpoint::default()
//!     },
//! )
//! .await?;
//!
//! // Producer side: the event commits or rolls back with the business change.
//! let tx = client.transaction().await?;
//! // ... the business change, on `tx` ...
//! let payload = serde_json::json!({"order_id": 42});
//! outboxd::enqueue(&tx, &NewEvent::new("order.created", &payload)).await?;
//! tx.commit().await?;
//!
//! // Dispatcher side: deliver until the token is cancelled, then drain.
//! let shutdown = CancellationToken::new();
//! let dispatcher = Dispatcher::new(url, Config::default())?;
//! let running = tokio::spawn(dispatcher.run(shutdown.clone()));
//! // ... later, at shutdown:
//! shutdown.cancel();
//! let report = running.await.expect("the dispatcher task")?;
//! println!("delivered {}", report.totals.delivered);
//! # let _ = (endpoint, secret); Ok(()) }
//! ```
//!
//! ## What is public
//!
//! - Running a dispatcher: [`Dispatcher`] with its [`Config`] (defaults in
//!   [`config::defaults`], errors as [`ConfigError`] naming the variable), the
//!   [`Report`] it returns, and the [`Metrics`] it records.
//! - Producing: [`enqueue`] a [`NewEvent`] on the application's own transaction (or the
//!   plain `INSERT` the README shows, from any language).
//! - The schema: [`schema::migrate`], [`schema::pending_migrations`].
//! - Connections: [`db::connect`], [`db::admin_pool`]; they read the connection string
//!   as libpq does, TLS included.
//! - Operating: the endpoint registry ([`endpoint`]), read-only views ([`inspect`]) and
//!   repairs: re-driving dead deliveries, replaying an event, a test event
//!   ([`redrive`]).
//! - Serving them: the admin HTTP API ([`admin`]) and the status server with
//!   `/metrics`, `/healthz` and `/readyz` ([`status`]), as `outboxd run` does.
//! - Consumers: [`sign::verify`] checks a request's signature.
//! - One error type, [`Error`].
//!
//! Everything else (claiming, sending, settling, the wake-up protocol, housekeeping,
//! the SQL) is internal and may change in any release. The `internals` feature makes
//! it public for this crate's own benchmark and tests; an application never needs it.
//!
//! ## Guarantees
//!
//! Every event committed to `webhook_outbox` is delivered to each endpoint whose
//! filter matches at least once, as long as the endpoint eventually answers 2xx within
//! [`Config::max_attempts`] attempts; no transaction is held across an HTTP request;
//! any number of dispatchers may run against one database. `docs/webhooks.md` has the
//! states, retries, ordering and failure cases; `docs/architecture.md` how an event
//! becomes a request.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

// Every statement must work behind a transaction-mode pooler: see clippy.toml.
#![warn(clippy::disallowed_methods)]

/// Declares internal modules: crate-private, or public but hidden from the docs with
/// the `internals` feature (for the benchmark and the integration tests that drive
/// internals).
macro_rules! internal {
    ($($name:ident),* $(,)?) => {$(
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub mod $name;
        #[cfg(not(feature = "internals"))]
        pub(crate) mod $name;
    )*};
}

/// Re-exports internal items the way [`internal!`] declares modules.
macro_rules! internal_use {
    ($($tree:tt)*) => {
        #[cfg(feature = "internals")]
        #[doc(hidden)]
        pub use {$($tree)*};
        #[cfg(not(feature = "internals"))]
        #[allow(unused_imports)]
        pub(crate) use {$($tree)*};
    };
}

pub mod admin;
pub mod circuit;
pub mod config;
pub mod db;
pub mod endpoint;
pub mod error;
pub mod inspect;
pub mod redrive;
pub mod schema;
pub mod sign;
pub mod status;

internal!(
    claim,
    deliver,
    dispatcher,
    health,
    housekeeping,
    listener,
    metrics,
    ordering,
    outbox,
    pooler,
    retention,
    retry,
    settle,
    shutdown,
    target,
    time_format,
);

#[cfg(test)]
mod sql_check;

pub use config::{Config, ConfigError};
pub use dispatcher::{Dispatcher, Report};
pub use endpoint::{Endpoint, NewEndpoint};
pub use error::{Error, Result};
pub use metrics::Metrics;
pub use outbox::{NewEvent, enqueue};
pub use settle::SettleTotals;
pub use shutdown::Drained;
