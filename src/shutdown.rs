//! Signals and the drain.
//!
//! SIGTERM or SIGINT starts the drain: `/readyz` fails at once, the listener
//! closes, every WebSocket is sent a 1001 close frame after what is already
//! queued for it, and the process waits for the tracked tasks up to
//! `shutdown.timeout`. Upgraded connections outlive hyper's own connection
//! futures, so they are tracked explicitly in the node's `TaskTracker`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn};

use crate::Node;

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Drains the node: stop admitting, close every connection, wait up to `deadline`.
pub(crate) async fn drain(node: &Node, deadline: Duration) {
    node.draining.store(true, Ordering::SeqCst);
    node.shutdown.cancel();
    node.tracker.close();
    info!(open = node.tracker.len(), "draining");
    if tokio::time::timeout(deadline, node.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = node.tracker.len(),
            "drain deadline passed; dropping what is left"
        );
    } else {
        info!("drained");
    }
}
