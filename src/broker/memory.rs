//! The in-process broker: one node, no Redis. Publishing is a direct call into
//! the hub, so every subscription is confirmed at once and nothing is lost
//! while the process runs.
//!
//! History channels keep a bounded ring of their last `history_size`
//! messages, with the same semantics as the Redis streams: offsets grow by one
//! per message, and the epoch is chosen when the process starts (a channel
//! whose ring expired after `history_ttl` idle starts again from offset 1 in a
//! new epoch). A restart loses every ring, so a client resuming across one is
//! told `epoch_changed`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::broker::{Broker, BrokerFuture};
use crate::history::{Position, Snapshot};
use crate::hub::Hub;
use crate::presence::{Event, Members};

pub struct MemoryBroker {
    hub: Hub,
    /// One ring per history channel that has been published to and has not
    /// expired. Bounded by the history channels published within one
    /// `history_ttl`: expired rings are swept at most once a second.
    rings: Mutex<HashMap<Arc<str>, Arc<Mutex<Ring>>>>,
    /// The epoch every ring starts in.
    epoch: Arc<str>,
    /// Rings created after an expiry take this epoch with a counter appended.
    generation: AtomicU64,
    last_sweep: Mutex<Instant>,
}

struct Ring {
    epoch: Arc<str>,
    top: u64,
    entries: VecDeque<(u64, Bytes)>,
    last_publish: Instant,
    ttl: Duration,
}

impl Ring {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last_publish) >= self.ttl
    }
}

impl MemoryBroker {
    pub fn new(hub: Hub) -> MemoryBroker {
        MemoryBroker {
            hub,
            rings: Mutex::new(HashMap::new()),
            epoch: crate::history::new_epoch(),
            generation: AtomicU64::new(0),
            last_sweep: Mutex::new(Instant::now()),
        }
    }

    fn sweep(&self, now: Instant) {
        {
            let mut last = lock(&self.last_sweep);
            if now.duration_since(*last) < Duration::from_secs(1) {
                return;
            }
            *last = now;
        }
        lock(&self.rings).retain(|_, ring| !lock(ring).expired(now));
    }

    fn ring(&self, channel: &str, ttl: Duration, now: Instant) -> Arc<Mutex<Ring>> {
        let mut rings = lock(&self.rings);
        if let Some(ring) = rings.get(channel) {
            if !lock(ring).expired(now) {
                return ring.clone();
            }
        }
        let epoch = match rings.contains_key(channel) {
            // It expired: a new epoch, as Redis begins one when the meta hash
            // is gone.
            true => format!(
                "{}{:x}",
                self.epoch,
                self.generation.fetch_add(1, Ordering::Relaxed) + 1
            )
            .into(),
            false => self.epoch.clone(),
        };
        let ring = Arc::new(Mutex::new(Ring {
            epoch,
            top: 0,
            entries: VecDeque::new(),
            last_publish: now,
            ttl,
        }));
        rings.insert(channel.into(), ring.clone());
        ring
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BrokerFuture<'a, Option<Position>> {
        let Some(rule) = self.hub.history_rule(channel) else {
            self.hub.deliver(channel, &payload);
            self.hub.deliver_patterns(channel, &payload, None);
            return Box::pin(std::future::ready(Ok(None)));
        };
        let now = Instant::now();
        self.sweep(now);
        let ring = self.ring(channel, rule.ttl, now);
        // The ring's lock is held through the delivery, so that concurrent
        // publishes reach the hub in offset order.
        let mut ring = lock(&ring);
        ring.top += 1;
        ring.last_publish = now;
        let offset = ring.top;
        ring.entries.push_back((offset, payload.clone()));
        while ring.entries.len() as u64 > rule.size {
            ring.entries.pop_front();
        }
        let epoch = ring.epoch.clone();
        self.hub
            .deliver_sequenced(channel, &epoch, offset, payload.clone());
        self.hub.deliver_patterns(channel, &payload, None);
        Box::pin(std::future::ready(Ok(Some(Position { epoch, offset }))))
    }

    fn read_history<'a>(
        &'a self,
        channel: &'a str,
        from: u64,
        count: usize,
    ) -> BrokerFuture<'a, Snapshot> {
        let now = Instant::now();
        let ring = lock(&self.rings).get(channel).cloned();
        let snapshot = match ring {
            Some(ring) => {
                let ring = lock(&ring);
                if ring.expired(now) {
                    Snapshot::default()
                } else {
                    Snapshot {
                        epoch: Some(ring.epoch.clone()),
                        top: ring.top,
                        entries: ring
                            .entries
                            .iter()
                            .filter(|(offset, _)| *offset >= from)
                            .take(count)
                            .cloned()
                            .collect(),
                    }
                }
            }
            None => Snapshot::default(),
        };
        Box::pin(std::future::ready(Ok(snapshot)))
    }

    fn presence_sync<'a>(
        &'a self,
        channel: &'a str,
        _members: &'a Members,
        change: Option<Event<'a>>,
    ) -> BrokerFuture<'a, ()> {
        // One node: its members are everyone, and a change is an event.
        if let Some(event) = change {
            self.hub
                .deliver(channel, &crate::presence::encode_event(event));
        }
        Box::pin(std::future::ready(Ok(())))
    }

    fn presence_read<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Members> {
        Box::pin(std::future::ready(Ok(self.hub.local_members(channel))))
    }

    fn ensure_subscribed<'a>(&'a self, _channels: &'a [Arc<str>]) -> BrokerFuture<'a, ()> {
        Box::pin(std::future::ready(Ok(())))
    }

    fn is_ready(&self) -> bool {
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
