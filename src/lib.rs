//! # outboxd
//!
//! A PostgreSQL transactional-outbox webhook dispatcher. Applications write events
//! into `webhook_outbox` inside their own transactions; outboxd delivers each event to
//! every subscribed endpoint as a signed HTTP POST ([Standard Webhooks]), at least once.
//!
//! The crate is the whole product: the `outboxd` binary only wires it to a command
//! line. A Rust application can migrate the schema, register endpoints, enqueue events
//! inside its own transaction and run a dispatcher in-process:
//!
//! ```no_run
//! # async fn example() -> Result<(), outboxd::Error> {
//! let url = "postgres://app@localhost/app";
//! let mut client = outboxd::db::connect(url).await?;
//! outboxd::schema::migrate(&mut client).await?;
//!
//! // Producer side: the event commits or rolls back with the business change.
//! let tx = client.transaction().await?;
//! let payload = serde_json::json!({"order_id": 42});
//! outboxd::enqueue(&tx, &outboxd::NewEvent::new("order.created", &payload)).await?;
//! tx.commit().await?;
//!
//! // Dispatcher side: deliver until the token is cancelled, then drain.
//! let shutdown = tokio_util::sync::CancellationToken::new();
//! let dispatcher = outboxd::Dispatcher::new(url, outboxd::Config::default())?;
//! let report = dispatcher.run(shutdown).await?;
//! # let _ = report; Ok(()) }
//! ```
//!
//! The stages of a delivery's life each have a module: [`outbox`] (enqueue),
//! [`listener`] (wake-ups), [`claim`] (fan-out and leasing), [`deliver`] with [`sign`]
//! and [`target`] (the HTTP attempt), [`retry`] (what an outcome means), [`settle`]
//! (writing it back) and [`shutdown`] (draining). [`dispatcher`] ties them together.
//!
//! [Standard Webhooks]: https://www.standardwebhooks.com/

pub mod admin;
pub mod claim;
pub mod config;
pub mod db;
pub mod deliver;
pub mod dispatcher;
pub mod endpoint;
pub mod error;
pub mod health;
pub mod housekeeping;
pub mod inspect;
pub mod listener;
pub mod metrics;
pub mod outbox;
pub mod pooler;
pub mod redrive;
pub mod retention;
pub mod retry;
pub mod schema;
pub mod settle;
pub mod shutdown;
pub mod sign;
pub mod startup;
pub mod status;
pub mod target;
pub mod time_format;

pub use config::{Config, ConfigError};
pub use dispatcher::{Dispatcher, Report};
pub use endpoint::{Endpoint, NewEndpoint};
pub use error::{Error, Result};
pub use outbox::{NewEvent, enqueue};
