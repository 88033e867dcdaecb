//! The `outboxd` command: wires the library to a command line.
//!
//! Exit status: 0 success; 1 runtime failure (database unreachable, ...); 2 invalid
//! input or configuration (the message names the variable or flag); 3 not found;
//! 4 nothing was done (e.g. `retry` of deliveries that are not dead).

// Every statement must work behind a transaction-mode pooler: see clippy.toml.
#![warn(clippy::disallowed_methods)]

mod manage;
mod run;
mod settings;
mod signals;
mod startup;

use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args as _, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use outboxd::Error;
use settings::{RunArgs, ServeArgs};

/// mimalloc instead of glibc malloc: a delivery burst allocates and frees from many
/// threads, and glibc's arena locks showed in its profile. It is built with `no_thp`
/// (Cargo.toml): with transparent huge pages in `madvise` mode, as on Debian, mimalloc
/// advises its arenas onto 2 MiB pages and a dispatcher's RSS grows with them for no
/// gain. The measurements of both are in docs/performance.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// PostgreSQL transactional-outbox webhook dispatcher.
///
/// Every setting is an environment variable with a matching --flag; run
/// `outboxd run --help` for the dispatcher's settings and their defaults.
// No Debug: it holds DATABASE_URL, password included, and endpoint secrets.
#[derive(Parser)]
#[command(name = "outboxd", version, about, long_about = None)]
struct Cli {
    /// PostgreSQL connection string (URL or key=value form)
    #[arg(
        long,
        env = "DATABASE_URL",
        value_name = "DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// Log format: text or json
    #[arg(long, env = "LOG_FORMAT", value_name = "LOG_FORMAT", global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

// No Debug: `endpoint add` and `rotate-secret` carry a secret.
#[derive(Subcommand)]
enum Command {
    /// Create or upgrade the schema and the notify trigger (safe to repeat, and to run from several processes at once)
    Migrate,
    /// Deliver webhooks until SIGTERM/SIGINT, then drain and exit 0
    Run {
        #[command(flatten)]
        dispatcher: RunArgs,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Manage consumer endpoints
    #[command(subcommand)]
    Endpoint(manage::EndpointCommand),
    /// Inspect and re-drive deliveries
    #[command(subcommand)]
    Deliveries(manage::DeliveriesCommand),
    /// List and re-drive dead deliveries
    #[command(subcommand)]
    Dead(manage::DeadCommand),
    /// Ordered keys blocked behind a dead head: list them, re-drive or discard the head
    #[command(subcommand)]
    Ordering(manage::OrderingCommand),
    /// Deliver an event again (same webhook-id) to one or all of its endpoints
    Replay {
        /// The event id
        event_id: i64,
        /// Only to this endpoint (also one that had no delivery of the event)
        #[arg(long = "endpoint")]
        endpoint_id: Option<i64>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// Queue depth by state, oldest pending age, last hour's deliveries and failures, per endpoint
    Stats {
        /// Print JSON instead of tables
        #[arg(long)]
        json: bool,
    },
    /// Enqueue one event (what an application does with INSERT INTO webhook_outbox)
    Enqueue {
        /// Event type, such as order.created
        #[arg(long)]
        event_type: String,
        /// JSON payload, delivered verbatim as the body's "data"
        #[arg(long)]
        payload: String,
        /// A second event with the same key is ignored
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Not delivered before this RFC 3339 time, e.g. 2030-01-01T00:00:00Z
        #[arg(long, value_parser = parse_time)]
        deliver_after: Option<SystemTime>,
        /// Delivered to each endpoint after the earlier events of this key, one at a time
        #[arg(long)]
        ordering_key: Option<String>,
    },
}

/// Parses an RFC 3339 time for flags.
pub(crate) fn parse_time(s: &str) -> Result<SystemTime, String> {
    outboxd::inspect::parse_time(s)
        .ok_or_else(|| format!("expected an RFC 3339 time such as 2030-01-01T00:00:00Z, got {s:?}"))
}

/// The dispatcher's variables and defaults, taken from the `run` flags themselves so
/// the top-level help can never drift from them.
fn settings_help() -> String {
    let run = ServeArgs::augment_args(RunArgs::augment_args(clap::Command::new("run")));
    let mut text = String::from("Settings (environment variable = default):\n");
    for arg in run.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let default = arg
            .get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_else(|| "(unset)".to_owned());
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        text.push_str(&format!(
            "  {} = {}\n      {}\n",
            env.to_string_lossy(),
            default,
            help
        ));
    }
    text.push_str("  RUST_LOG = info\n      Log filter, e.g. outboxd=debug or warn\n");
    text.push_str(
        "\nExit status: 0 success, 1 failure, 2 invalid input or configuration, 3 not found, \
         4 nothing to do.\n",
    );
    text
}

/// The async runtime: `threads` workers, by default as many as the CPUs available to
/// the process (a container's CPU quota included). `TOKIO_WORKER_THREADS` is not read:
/// `WEBHOOK_WORKER_THREADS` is the one setting, checked like the others. A `serving`
/// process logs which scheduler it runs.
fn runtime(threads: Option<u16>, serving: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = threads
        .map(usize::from)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if serving {
        tracing::info!(
            worker_threads = threads,
            scheduler = if threads == 1 {
                "current_thread"
            } else {
                "multi_thread"
            },
            "async runtime"
        );
    }
    let mut builder = if threads == 1 {
        // One worker: tokio's current-thread scheduler runs the same tasks without the
        // work-stealing machinery (no cross-thread queues or wake-ups to synchronise),
        // for less CPU per delivery (measured in docs/performance.md).
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

fn main() -> ExitCode {
    let matches = Cli::command().after_help(settings_help()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let json_logs = cli.log_format == "json";
    init_logging(&cli.log_format);
    log_panics_without_their_message();
    let (threads, serving) = match &cli.command {
        Command::Run { serve, .. } => (serve.worker_threads, true),
        _ => (None, false),
    };
    let runtime = match runtime(threads, serving) {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(code) => code,
        Err(e) => {
            // With structured logs the line that explains the exit must be JSON too.
            if json_logs {
                tracing::error!(error = format!("{e:#}"), "outboxd stopped with an error");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(exit_status(&e))
        }
    }
}

/// Maps an error to the documented exit status.
fn exit_status(e: &anyhow::Error) -> u8 {
    // A ConfigError reaches here as Error::Config: settings are converted on the way.
    match e.downcast_ref::<Error>() {
        Some(
            Error::Config(_)
            | Error::InvalidEndpoint(_)
            | Error::InvalidEvent(_)
            | Error::InvalidInput(_),
        ) => 2,
        Some(Error::NotFound(_)) => 3,
        _ => 1,
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Replaces the default panic output, which prints the panic's message: a message may
/// quote whatever the panicking code held, a webhook payload or a secret included (a
/// string slicing panic quotes the string). Where it happened is enough to find the
/// bug; the dispatcher records a send that panics as `internal` and goes on.
fn log_panics_without_their_message() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        tracing::error!(
            location,
            "panicked (the message is not logged: it may quote a payload or a secret)"
        );
    }));
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let database_url = cli.database_url.clone();
    let database_url = move || {
        database_url.ok_or_else(|| {
            anyhow::Error::from(Error::Config(outboxd::ConfigError {
                variable: "DATABASE_URL",
                message: "is not set (pass --database-url or set the variable)".to_owned(),
            }))
        })
    };
    match cli.command {
        Command::Migrate => {
            let mut client = outboxd::db::connect(&database_url()?).await?;
            let applied = outboxd::schema::migrate(&mut client).await?;
            if applied.is_empty() {
                println!("schema is up to date");
            } else {
                println!("applied: {}", applied.join(", "));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { dispatcher, serve } => {
            // Validate everything before touching the database, so a bad value exits 2
            // at once.
            let listen_url = dispatcher.listen_database_url.clone();
            let config = dispatcher.into_config().map_err(Error::from)?;
            let serve = serve.validate().map_err(Error::from)?;
            run::run(database_url()?, listen_url, config, serve).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Endpoint(command) => {
            let mut client = outboxd::db::connect(&database_url()?).await?;
            manage::endpoint(&mut client, command).await
        }
        Command::Deliveries(command) => {
            let client = outboxd::db::connect(&database_url()?).await?;
            manage::deliveries(&client, command).await
        }
        Command::Dead(command) => {
            let client = outboxd::db::connect(&database_url()?).await?;
            manage::dead(&client, command).await
        }
        Command::Ordering(command) => {
            let mut client = outboxd::db::connect(&database_url()?).await?;
            manage::ordering(&mut client, command).await
        }
        Command::Replay {
            event_id,
            endpoint_id,
            json,
        } => {
            let client = outboxd::db::connect(&database_url()?).await?;
            manage::replay(&client, event_id, endpoint_id, json).await
        }
        Command::Stats { json } => {
            let client = outboxd::db::connect(&database_url()?).await?;
            manage::stats(&client, json).await
        }
        Command::Enqueue {
            event_type,
            payload,
            idempotency_key,
            deliver_after,
            ordering_key,
        } => {
            let payload: serde_json::Value = serde_json::from_str(&payload)
                .map_err(|e| Error::InvalidEvent(format!("--payload is not valid JSON: {e}")))?;
            let client = outboxd::db::connect(&database_url()?).await?;
            let event = outboxd::NewEvent {
                event_type: &event_type,
                payload: &payload,
                idempotency_key: idempotency_key.as_deref(),
                deliver_after,
                ordering_key: ordering_key.as_deref(),
            };
            match outboxd::enqueue(&client, &event).await? {
                Some(id) => println!("id: {id}"),
                None => println!("duplicate: an event with this idempotency key exists"),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
