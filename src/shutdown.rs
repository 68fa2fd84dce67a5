//! Signals and the drain.
//!
//! SIGTERM or SIGINT starts the drain:
//! 1. `/readyz` fails at once and new upgrades get `503` with `Retry-After`;
//!    the listener stays open, so probes, scrapes and publishes still work.
//! 2. Open connections are closed over `shutdown.drain_period`, not all at
//!    once: each gets its own moment in the period (see [`close_schedule`]),
//!    and each close flushes what is queued for it, then sends 1001. Messages
//!    published meanwhile still reach the connections not yet closed.
//! 3. Then whatever is left (connections opened during the drain, or all of
//!    them when a second signal skips the pacing) is closed at once, the
//!    listener and the HTTP connections close, and the broker stops.
//! 4. The process waits for every tracked task, up to `shutdown.timeout` from
//!    the first signal. Upgraded connections outlive hyper's own connection
//!    futures, so they are tracked explicitly in the node's `TaskTracker`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::Node;
use crate::protocol::CloseCode;
use crate::session::outbox::Outbox;

/// Resolves on a SIGTERM or SIGINT (each call waits for the next one).
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

/// When, after the start of the drain, each of `count` connections is closed:
/// the period is cut into `count` equal slots, and each connection (taken in a
/// random order) closes at a uniformly random moment of its own slot. Each
/// connection's moment is uniform over the period, and no two closes are
/// more than two slots apart, so the closes never bunch up: any window holds
/// about `count * window / period` of them.
pub fn close_schedule(
    count: usize,
    period: Duration,
    mut random: impl FnMut() -> f64,
) -> Vec<Duration> {
    if count == 0 {
        return Vec::new();
    }
    let slot = period.as_secs_f64() / count as f64;
    (0..count)
        .map(|index| Duration::from_secs_f64(slot * (index as f64 + random().clamp(0.0, 1.0))))
        .collect()
}

/// A random number in [0, 1) from the OS generator.
pub(crate) fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// The outboxes of the sessions open now, taken out of the registry's lock.
fn registered(node: &Node) -> Vec<Arc<Outbox>> {
    let sessions = node.sessions.lock().unwrap_or_else(|p| p.into_inner());
    sessions.values().cloned().collect()
}

/// Drains the node; see the module documentation.
pub(crate) async fn drain(node: &Node, hurry: impl std::future::Future<Output = ()>) {
    let started = Instant::now();
    let config = &node.config.shutdown;
    node.draining.store(true, Ordering::SeqCst);
    let mut sessions = registered(node);
    // A random order, so that no group of clients (say, the oldest) always
    // goes first.
    for index in (1..sessions.len()).rev() {
        let other = (random_unit() * (index + 1) as f64) as usize;
        sessions.swap(index, other.min(index));
    }
    info!(
        connections = sessions.len(),
        period = ?config.drain_period,
        "draining"
    );
    let schedule = close_schedule(sessions.len(), config.drain_period, random_unit);
    let paced = async {
        for (outbox, after) in sessions.iter().zip(schedule) {
            tokio::time::sleep_until(started + after).await;
            outbox.close(CloseCode::GoingAway);
        }
    };
    tokio::select! {
        _ = paced => {}
        _ = hurry => info!("second signal: closing every connection now"),
    }
    node.shutdown.cancel();
    // Every session still open queues its 1001 now, after what it holds: a
    // waiting writer is woken by the close (writers do not wait on the token
    // itself), and a session that registers from here on sees the token and
    // closes itself (`Registered::new` checks it under the same lock).
    for outbox in registered(node) {
        outbox.close(CloseCode::GoingAway);
    }
    node.tracker.close();
    let deadline = started + config.timeout;
    if tokio::time::timeout_at(deadline, node.tracker.wait())
        .await
        .is_err()
    {
        warn!(
            open = node.tracker.len(),
            "drain deadline passed; dropping what is left"
        );
    } else {
        info!(took = ?started.elapsed(), "drained");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_evenly_over_the_period() {
        let period = Duration::from_secs(4);
        let schedule = close_schedule(2000, period, random_unit);
        assert!(schedule.iter().all(|at| *at <= period));
        assert!(schedule.windows(2).all(|pair| pair[0] <= pair[1]));
        let mut windows = [0usize; 20];
        for at in &schedule {
            windows[((at.as_secs_f64() / 0.2) as usize).min(19)] += 1;
        }
        // 100 per 200 ms window on average; stratified, never far from it.
        assert!(
            windows.iter().all(|&n| (98..=102).contains(&n)),
            "{windows:?}"
        );
        // The extremes of the random draw stay inside their slots.
        let first = close_schedule(4, period, || 0.0);
        let last = close_schedule(4, period, || 1.0);
        assert_eq!(first[0], Duration::ZERO);
        assert_eq!(last[3], period);
        assert!(close_schedule(0, period, random_unit).is_empty());
    }
}
