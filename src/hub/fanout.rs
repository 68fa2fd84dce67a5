//! Pushing one encoded frame into many outboxes, in parallel when there are
//! many (`server.fanout_threads`).
//!
//! A delivery to fewer than [`PARALLEL_MIN_SUBSCRIBERS`] subscribers, or with
//! one fan-out thread, runs on the thread that received the message. A
//! larger one is split into two chunks per fan-out thread, which the
//! receiving thread and one helper per other fan-out thread (a rayon pool)
//! take in turn from a shared counter, so that a helper that wakes late
//! takes fewer. The receiving thread waits for all of them: what the loop
//! would have taken alone, divided, plus a helper's wake-up. Because a
//! delivery returns only once every push is done, the next message of the
//! channel starts after it: per-connection order holds exactly as with the
//! plain loop. A push never waits on a connection, so neither does a chunk.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

use super::Subscriber;
use crate::session::outbox::DeliveryPolicy;

/// Deliveries to fewer subscribers run on the receiving thread: splitting
/// them costs more than it saves.
pub(crate) const PARALLEL_MIN_SUBSCRIBERS: usize = 2048;

/// The fewest subscribers in a unit of work of a parallel delivery, which
/// has two units per fan-out thread.
const MIN_CHUNK: usize = 512;

/// How a delivery is spread over threads.
pub(crate) struct FanOut {
    /// Absent with one fan-out thread.
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl FanOut {
    /// `threads` fan-out threads; 0 means one per core.
    pub(crate) fn new(threads: usize) -> FanOut {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        // The receiving thread takes one chunk itself.
        let pool = (threads > 1).then(|| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads - 1)
                .thread_name(|i| format!("herald-fanout-{i}"))
                .build()
                .expect("the fan-out threads start")
        });
        FanOut { pool, threads }
    }

    /// Pushes `frame` into every subscriber's outbox under `policy`.
    pub(crate) fn push(&self, subscribers: &[Subscriber], frame: &Bytes, policy: &DeliveryPolicy) {
        let push_all = |chunk: &[Subscriber], frame: &Bytes| {
            for subscriber in chunk {
                subscriber
                    .outbox
                    .push_message(frame, subscriber.key, policy);
            }
        };
        match &self.pool {
            Some(pool) if subscribers.len() >= PARALLEL_MIN_SUBSCRIBERS => {
                // Chunks are taken from a shared counter, by the receiving
                // thread and by one helper per other thread, so that a
                // helper that wakes late takes fewer.
                let size = subscribers.len().div_ceil(2 * self.threads).max(MIN_CHUNK);
                let chunks: Vec<&[Subscriber]> = subscribers.chunks(size).collect();
                let next = AtomicUsize::new(0);
                let work = |frame: &Bytes| {
                    while let Some(chunk) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
                        push_all(chunk, frame);
                    }
                };
                pool.in_place_scope(|scope| {
                    for _ in 1..self.threads {
                        // Each helper shares its own copy of the encoded
                        // frame: every push takes a reference, and thousands
                        // of reference-count increments on one cache line
                        // from several cores cost more than the split saves.
                        // The message is still encoded once.
                        scope.spawn(|_| work(&Bytes::copy_from_slice(frame)));
                    }
                    work(frame);
                });
            }
            _ => push_all(subscribers, frame),
        }
    }
}
