//! The scenarios, one file each, named as `BENCH_SCENARIOS` names them. Each file's
//! `pub async fn run(ctx: &mut Ctx) -> anyhow::Result<()>` measures one thing on
//! databases of its own (`Ctx::with_db`), adds rows to `ctx.report` (the table) and a
//! detail under its own key (the JSON), and returns an error if a figure could not be
//! measured; the run goes on with the next scenario.
//!
//! The list below is the registry: it declares each module, gives `BENCH_SCENARIOS`
//! its names and a full run its order. Adding a scenario is a file here and a line in
//! it.

use crate::ctx::Ctx;

/// Declares the scenario modules and derives, from the one list, the names
/// `BENCH_SCENARIOS` accepts ([`ALL`], in run order) and [`run`], which runs one by name.
macro_rules! scenarios {
    ($($name:ident,)*) => {
        $(mod $name;)*

        /// Every scenario, in the order a full run executes them.
        pub const ALL: &[&str] = &[$(stringify!($name)),*];

        /// Runs one scenario by name.
        pub async fn run(ctx: &mut Ctx, name: &str) -> anyhow::Result<()> {
            match name {
                $(stringify!($name) => $name::run(ctx).await,)*
                other => anyhow::bail!("unknown scenario {other}"),
            }
        }
    };
}

scenarios! {
    burst,
    backlog,
    fanout,
    idle,
    steady,
    producer,
    scaleout,
    ceiling,
    history,
    statements,
    retention,
    noisy,
    endpoints,
    ordered,
    ordered_steady,
}
