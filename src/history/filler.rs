//! The filler: one task per node that brings history cursors up to their
//! streams.
//!
//! It runs the fills the hub schedules (a hole in the offsets, a reconnect,
//! a buffer that overflowed), and, every `broker.history_check_interval`
//! (jittered), schedules one for every history channel, which catches a
//! message lost at the end of a burst on a quiet channel and a pub/sub link
//! that died silently: a fill whose stream holds nothing new costs one read.
//!
//! Reads run concurrently, at most [`CONCURRENT_READS`] at once; on Redis
//! they pipeline on the channel's connection. After a round with a failed
//! read the task backs off (50 ms doubling to 1 s), so a Redis outage does
//! not make it spin.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::hub::Hub;

/// The most stream reads in flight at once.
pub const CONCURRENT_READS: usize = 32;

/// The pause after a round in which a read failed, doubled after each such
/// round up to [`RETRY_MAX`], and reset by a round without failure.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Runs until `shutdown`.
pub async fn run(
    hub: Hub,
    broker: Arc<dyn Broker>,
    check_interval: Duration,
    shutdown: CancellationToken,
) {
    let mut next_check = Instant::now() + jitter(check_interval);
    let mut retry = RETRY_MIN;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = hub.fills_due() => {}
            _ = tokio::time::sleep_until(next_check) => {
                for channel in hub.history_channels() {
                    hub.schedule_fill(&channel);
                }
                next_check = Instant::now() + jitter(check_interval);
            }
        }
        let due = hub.take_fills();
        let failed = futures_util::stream::iter(due)
            .map(|channel| {
                let hub = &hub;
                let broker = &broker;
                async move {
                    let (from, count) = hub.begin_fill(&channel)?;
                    let snapshot = broker.read_history(&channel, from, count).await.ok();
                    let failed = snapshot.is_none();
                    hub.complete_fill(&channel, snapshot.as_ref());
                    Some(failed)
                }
            })
            .buffer_unordered(CONCURRENT_READS)
            // Every started fill must complete (or its cursor would wait for
            // it forever), so the whole stream is consumed.
            .fold(false, |any, failed| {
                std::future::ready(any || failed == Some(true))
            })
            .await;
        if failed {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(retry) => {}
            }
            retry = (retry * 2).min(RETRY_MAX);
        } else {
            retry = RETRY_MIN;
        }
    }
}

/// `base` scaled by a random factor in [0.8, 1.2).
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    base.mul_f64(0.8 + 0.4 * f64::from(byte[0]) / 256.0)
}
