//! Signals: the first SIGTERM or SIGINT starts the dispatcher's drain, a second one
//! exits at once.

use futures_util::StreamExt as _;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal cut the drain short (128 + SIGINT, as shells do).
pub const FORCED_EXIT_CODE: i32 = 130;

/// Cancels `shutdown` on the first SIGTERM or SIGINT and exits the process at once
/// (status [`FORCED_EXIT_CODE`]) on the second. Returns once the handlers are installed.
pub fn cancel_on_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    tokio::spawn(async move {
        let mut received = 0;
        while let Some(signal) = signals.next().await {
            received += 1;
            if received == 1 {
                tracing::info!(
                    signal,
                    "shutdown requested: no new claims; draining in-flight deliveries"
                );
                shutdown.cancel();
            } else {
                tracing::warn!(
                    signal,
                    "second signal: exiting without waiting for the drain"
                );
                std::process::exit(FORCED_EXIT_CODE);
            }
        }
    });
    Ok(())
}
