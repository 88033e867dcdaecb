//! outboxd's end-to-end benchmark: `make bench`.
//!
//! Needs `DATABASE_URL` (an admin connection that may CREATE DATABASE); `make bench`
//! starts a throwaway PostgreSQL with durability defaults (fsync and synchronous_commit
//! on) and runs this program under it. Every scenario gets a fresh database; webhooks
//! go to a hyper receiver in a child process (this binary re-executed with
//! `OUTBOXD_BENCH_ROLE=receiver`). The dispatcher runs in-process through the library,
//! except for scale-out, which runs real `outboxd run` processes.
//!
//! Prints one table (and where the CPU went) and writes the same figures as JSON to
//! `target/bench/latest.json`.
//!
//! Environment: `BENCH_SCENARIOS=burst,idle,...` (default all, in the order of the list
//! in `scenarios/mod.rs`), `BENCH_QUICK=1` (smaller counts), and
//! per-figure overrides such as `BENCH_BURST_EVENTS`, `BENCH_HISTORY_ROWS`,
//! `BENCH_STEADY_RATES=500,2000` (see `Settings::from_env`); `BENCH_MAX_SECONDS`
//! bounds the whole run (default 1800). `BENCH_AB_BIN=<another outboxd>` repeats each
//! scale-out burst with that binary, round by round (alternating which goes first), and
//! reports the binary under test relative to it: +5% means the binary under test was
//! 5% faster.
//!
//! Layout: this file wires the run (settings, header, the scenarios in turn, the table
//! and the JSON). Each scenario is a file of its own in `scenarios/`, whose opening
//! comment says what it measures and why that way; the machinery they share sits
//! beside this file: `settings` (the `BENCH_*` knobs), `ctx` (the run's state and a
//! fresh database per measurement), `pg` (databases, producers, prefills),
//! `receiver` (the receiver process), `dispatcher` (in-process and `outboxd run`
//! dispatchers, their modes and readiness), `bursts` (one burst measurement, shared by
//! burst, fan-out, scale-out and history), `latency` (receipts to latencies and
//! stalls), `order` (checking ordered delivery from the receipts), `interleave` (round
//! orders and paired ratios), `sys` (CPU and memory sampling, child processes) and
//! `report` (the table and the JSON).
//!
//! Adding a scenario: write `scenarios/<name>.rs` with an opening comment and
//! `pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()>`, which measures on its own
//! database (`ctx.with_db`), adds rows with `ctx.report.target`/`info`/`cpu` and its
//! JSON with `ctx.report.detail`; then add `<name>,` to the list at the end of
//! `scenarios/mod.rs` (its place there is its place in a full run). Its knobs go in
//! `settings.rs` (`env_u64`, with a quick-mode default) and in docs/performance.md.

// The machinery every scenario shares.
mod bursts;
mod ctx;
mod dispatcher;
mod interleave;
mod latency;
mod order;
mod pg;
mod receiver;
mod report;
mod settings;
mod sys;

// The scenarios, one file each, and the list of them.
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use serde_json::{Map, Value, json};

use ctx::Ctx;
use settings::Settings;

/// The same allocator as the `outboxd` binary, so in-process figures match it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    if std::env::var(receiver::ROLE_ENV).as_deref() == Ok("receiver") {
        return receiver::serve_main();
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("bench: {e:#}");
            return ExitCode::from(2);
        }
    };
    // Whatever happens, the run ends by itself.
    let limit = Duration::from_secs(settings.max_seconds);
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("bench: BENCH_MAX_SECONDS ({limit:?}) reached; killing children and exiting");
        sys::kill_children();
        std::process::exit(3);
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(sys::nproc().max(2))
        .thread_name("bench-main")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(settings)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    };
    runtime.shutdown_timeout(Duration::from_secs(5));
    sys::kill_children();
    code
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                manifest_dir().join(p)
            }
        })
        .unwrap_or_else(|| manifest_dir().join("target"))
}

/// The postmaster's pid, read from its data directory (needs the server on this
/// machine and permission to read the directory; otherwise PostgreSQL CPU is unknown).
async fn postmaster(admin: &tokio_postgres::Client) -> Option<sys::PgProcs> {
    let dir: String = admin
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .ok()?
        .get(0);
    let text = std::fs::read_to_string(PathBuf::from(dir).join("postmaster.pid")).ok()?;
    let pid = text.lines().next()?.trim().parse().ok()?;
    Some(sys::PgProcs { postmaster: pid })
}

/// Runs the selected scenarios; Ok(false) when one of them failed.
async fn run(settings: Settings) -> anyhow::Result<bool> {
    let wall = Instant::now();
    let started_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let admin_url = std::env::var("DATABASE_URL").context(
        "DATABASE_URL is not set: run `make bench`, which starts a throwaway PostgreSQL",
    )?;
    let admin = pg::connect(&admin_url)
        .await
        .context("connecting to DATABASE_URL")?;
    let server = pg::server_info(&admin).await?;
    let pg_procs = postmaster(&admin).await;
    if pg_procs.is_none() {
        eprintln!("bench: PostgreSQL's processes are not visible; its CPU will show as '?'");
    }
    let outboxd_bin = std::env::var_os("BENCH_OUTBOXD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("release").join("outboxd"));
    let git = |args: &[&str]| {
        let dir = manifest_dir();
        let mut full = vec!["-C", dir.to_str().unwrap_or(".")];
        full.extend_from_slice(args);
        sys::command_line("git", &full)
    };
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(manifest_dir())
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty());
    let mut header = Map::new();
    header.insert("started_at".into(), Value::String(started_at));
    header.insert("machine".into(), sys::machine());
    header.insert(
        "versions".into(),
        json!({
            "outboxd": env!("CARGO_PKG_VERSION"),
            "git_head": git(&["rev-parse", "HEAD"]),
            "git_dirty": dirty,
            "rustc": sys::command_line("rustc", &["--version"]),
            "postgres": server.get("server_version"),
        }),
    );
    header.insert("postgres_settings".into(), server.clone());
    header.insert("settings".into(), settings.json());
    header.insert(
        "outboxd_binary".into(),
        Value::String(outboxd_bin.display().to_string()),
    );
    eprintln!(
        "bench: PostgreSQL {} (fsync={}, synchronous_commit={}), scenarios: {}{}",
        server["server_version"].as_str().unwrap_or("?"),
        server["fsync"].as_str().unwrap_or("?"),
        server["synchronous_commit"].as_str().unwrap_or("?"),
        settings.scenarios.join(","),
        if settings.quick { " (quick)" } else { "" }
    );

    let receiver = receiver::Receiver::spawn().await?;
    let names = settings.scenarios.clone();
    let mut ctx = Ctx::new(settings, admin_url, admin, receiver, pg_procs, outboxd_bin);
    let mut timings = Map::new();
    for name in &names {
        eprintln!("bench: == {name}");
        let t = Instant::now();
        if let Err(e) = scenarios::run(&mut ctx, name).await {
            eprintln!("bench: {name} failed: {e:#}");
            ctx.report.error(name, &e);
        }
        let secs = t.elapsed().as_secs_f64();
        eprintln!("bench: {name} took {secs:.1} s");
        timings.insert(name.clone(), json!(secs));
    }
    let wall_s = wall.elapsed().as_secs_f64();
    header.insert("scenario_seconds".into(), Value::Object(timings));
    header.insert("wall_seconds".into(), json!(wall_s));

    println!();
    print!("{}", ctx.report.render());
    println!(
        "\nPostgreSQL {}, fsync={}, synchronous_commit={}; {} x {}; wall time {:.0} s",
        server["server_version"].as_str().unwrap_or("?"),
        server["fsync"].as_str().unwrap_or("?"),
        server["synchronous_commit"].as_str().unwrap_or("?"),
        sys::nproc(),
        header["machine"]["cpu_model"].as_str().unwrap_or("?"),
        wall_s
    );
    let json = ctx.report.json(header);
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("latest.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("JSON: {}", path.display());
    Ok(!ctx.report.has_errors())
}
