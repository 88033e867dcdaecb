//! The `outboxd` command: wires the library to a command line.

use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context as _;
use clap::{Args as _, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use outboxd::config::RunArgs;
use outboxd::{Dispatcher, Error, NewEndpoint, NewEvent, db, endpoint, schema, shutdown};
use tokio_util::sync::CancellationToken;

/// PostgreSQL transactional-outbox webhook dispatcher.
///
/// Every setting is an environment variable with a matching --flag; run
/// `outboxd run --help` for the dispatcher's settings and their defaults.
#[derive(Debug, Parser)]
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Create or upgrade the schema and the notify trigger (safe to repeat, and to run from several processes at once)
    Migrate,
    /// Deliver webhooks until SIGTERM/SIGINT, then drain and exit 0
    Run(RunArgs),
    /// Manage consumer endpoints
    #[command(subcommand)]
    Endpoint(EndpointCommand),
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
    },
}

#[derive(Debug, Subcommand)]
enum EndpointCommand {
    /// Register an endpoint; prints its id and signing secret
    Add {
        /// http(s) URL deliveries are POSTed to
        #[arg(long)]
        url: String,
        /// Event-type filter: an exact name, a prefix such as order.*, or *; repeatable; none means every event
        #[arg(long = "event-type")]
        event_types: Vec<String>,
        /// Signing secret (whsec_ + base64 of 24 to 64 bytes); generated when omitted
        #[arg(long, env = "ENDPOINT_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Free text for operators
        #[arg(long, default_value = "")]
        description: String,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List endpoints
    List {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Stop deliveries to an endpoint; its pending deliveries are parked
    Disable {
        /// Endpoint id
        id: i64,
        /// Why, recorded as disabled_reason
        #[arg(long, default_value = "disabled by operator")]
        reason: String,
    },
    /// Resume an endpoint; its parked deliveries become due at once
    Enable {
        /// Endpoint id
        id: i64,
    },
    /// Remove an endpoint (its history is kept; pending deliveries are parked)
    Remove {
        /// Endpoint id
        id: i64,
    },
}

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s).map_err(|e| format!("{e} (expected RFC 3339)"))
}

/// The dispatcher's variables and defaults, taken from the `run` flags themselves so
/// the top-level help can never drift from them.
fn settings_help() -> String {
    let run = RunArgs::augment_args(clap::Command::new("run"));
    let mut text = String::from("Dispatcher settings (environment variable = default):\n");
    for arg in run.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let default = arg
            .get_default_values()
            .first()
            .map(|v| v.to_string_lossy().into_owned())
            .unwrap_or_else(|| "(see description)".to_owned());
        let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
        text.push_str(&format!(
            "  {} = {}\n      {}\n",
            env.to_string_lossy(),
            default,
            help
        ));
    }
    text.push_str("  RUST_LOG = info\n      Log filter, e.g. outboxd=debug or warn\n");
    text
}

fn main() -> ExitCode {
    let matches = Cli::command().after_help(settings_help()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(execute(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // Bad input (configuration, URL, secret, filter, event) exits 2, like a
            // usage error; anything else exits 1.
            let input = e.downcast_ref::<Error>().is_some_and(|e| {
                matches!(
                    e,
                    Error::Config(_) | Error::InvalidEndpoint(_) | Error::InvalidEvent(_)
                )
            }) || e.downcast_ref::<outboxd::ConfigError>().is_some();
            ExitCode::from(if input { 2 } else { 1 })
        }
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

async fn execute(cli: Cli) -> anyhow::Result<()> {
    let database_url = || {
        cli.database_url
            .clone()
            .context("DATABASE_URL is not set (pass --database-url or set the variable)")
    };
    match cli.command {
        Command::Migrate => {
            let mut client = db::connect(&database_url()?).await?;
            let applied = schema::migrate(&mut client).await?;
            if applied.is_empty() {
                println!("schema is up to date");
            } else {
                println!("applied: {}", applied.join(", "));
            }
        }
        Command::Run(args) => {
            // Validate before touching the database, so a bad value exits 2 at once.
            let config = args.into_config().map_err(Error::from)?;
            let dispatcher = Dispatcher::new(database_url()?, config)?;
            let shutdown = CancellationToken::new();
            shutdown::cancel_on_signals(shutdown.clone())
                .context("cannot install signal handlers")?;
            let client = db::connect(&database_url()?).await?;
            let pending = schema::pending_migrations(&client).await?;
            if !pending.is_empty() {
                anyhow::bail!(
                    "the database is not migrated (pending: {}); run `outboxd migrate` first",
                    pending.join(", ")
                );
            }
            drop(client);
            dispatcher.run(shutdown).await?;
        }
        Command::Endpoint(command) => {
            let client = db::connect(&database_url()?).await?;
            endpoint_command(&client, command).await?;
        }
        Command::Enqueue {
            event_type,
            payload,
            idempotency_key,
            deliver_after,
        } => {
            let payload: serde_json::Value = serde_json::from_str(&payload)
                .map_err(|e| Error::InvalidEvent(format!("--payload is not valid JSON: {e}")))?;
            let client = db::connect(&database_url()?).await?;
            let event = NewEvent {
                event_type: &event_type,
                payload: &payload,
                idempotency_key: idempotency_key.as_deref(),
                deliver_after,
            };
            match outboxd::enqueue(&client, &event).await? {
                Some(id) => println!("id: {id}"),
                None => println!("duplicate: an event with this idempotency key exists"),
            }
        }
    }
    Ok(())
}

async fn endpoint_command(
    client: &tokio_postgres::Client,
    command: EndpointCommand,
) -> anyhow::Result<()> {
    match command {
        EndpointCommand::Add {
            url,
            event_types,
            secret,
            description,
            json,
        } => {
            let new = NewEndpoint {
                url,
                event_types,
                secret,
                description,
            };
            let (endpoint, secret) = endpoint::add(client, new).await?;
            if json {
                let mut value = serde_json::to_value(&endpoint)?;
                value["secret"] = serde_json::Value::String(secret);
                println!("{value}");
            } else {
                println!("id: {}", endpoint.id);
                println!("secret: {secret}");
                println!("url: {}", endpoint.url);
                println!("event_types: {}", filters(&endpoint.event_types));
            }
        }
        EndpointCommand::List { json } => {
            let endpoints = endpoint::list(client).await?;
            if json {
                println!("{}", serde_json::to_string(&endpoints)?);
            } else {
                println!("{:>6}  {:<8}  {:<24}  URL", "ID", "STATE", "EVENT TYPES");
                for e in endpoints {
                    let state = if e.active { "active" } else { "disabled" };
                    println!(
                        "{:>6}  {:<8}  {:<24}  {}",
                        e.id,
                        state,
                        filters(&e.event_types),
                        e.url
                    );
                }
            }
        }
        EndpointCommand::Disable { id, reason } => {
            let parked = endpoint::disable(client, id, &reason).await?;
            println!("endpoint {id} disabled; {parked} pending deliveries parked");
        }
        EndpointCommand::Enable { id } => {
            let resumed = endpoint::enable(client, id).await?;
            println!("endpoint {id} enabled; {resumed} parked deliveries resumed");
        }
        EndpointCommand::Remove { id } => {
            endpoint::remove(client, id).await?;
            println!("endpoint {id} removed");
        }
    }
    Ok(())
}

fn filters(event_types: &[String]) -> String {
    if event_types.is_empty() {
        "*".to_owned()
    } else {
        event_types.join(",")
    }
}
