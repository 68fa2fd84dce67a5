//! The hub: which local connections subscribe to which channel, and fan-out.
//!
//! The map is sharded by channel name so that subscribes on different channels
//! and deliveries rarely meet on one lock. Each shard is a `std::sync::RwLock`
//! held only for map operations: a delivery takes it shared just long enough
//! to clone the channel's subscriber list (an `Arc`, one atomic increment),
//! then pushes into the outboxes without it, so a 10k-subscriber fan-out never
//! makes a subscribe on the same shard wait. Subscribe and unsubscribe take it
//! exclusively; they change the list in place unless a delivery holds it at
//! that moment, in which case they copy it (copy-on-write).
//!
//! A delivery is encoded into its frame once, then every subscriber's outbox
//! gets a reference to the same [`Bytes`].
//!
//! When a channel gains its first local subscriber or loses its last one, the
//! hub marks it "dirty" for the broker (when the broker subscribes upstream, as
//! Redis does). The broker reads the hub's current state for each dirty channel,
//! so it converges on the truth whatever order the changes raced in.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use crate::channel::Pattern;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::outbox::{ChannelKey, DeliveryPolicy, Outbox};
use crate::protocol;

/// A connection's id, unique within a node.
pub type ConnectionId = u64;

const SHARDS: usize = 64;

/// A cheap-to-clone handle to the node's hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// One slice of the channel map.
type Shard = RwLock<HashMap<Arc<str>, ChannelEntry>>;

struct Shared {
    shards: Box<[Shard]>,
    /// Picks a shard for a channel name.
    hasher: std::collections::hash_map::RandomState,
    /// `[[channels]]` rules, first match wins.
    rules: Vec<(Pattern, DeliveryPolicy)>,
    /// Source of [`ChannelKey`]s: every subscription gets a new one, so that
    /// nothing an outbox holds for a past subscription (a pending conflated
    /// entry, a held rate-limited one) is taken for the current one.
    next_key: AtomicU64,
    /// Present when the broker subscribes upstream per channel.
    interest: Option<Interest>,
    /// Payloads larger than this are dropped, not delivered.
    max_publish_bytes: usize,
    metrics: Metrics,
}

struct ChannelEntry {
    policy: DeliveryPolicy,
    /// The subscribers, shared with the deliveries in progress.
    subscribers: Arc<Vec<Subscriber>>,
    /// Each connection's index in `subscribers`, for O(1) removal.
    positions: HashMap<ConnectionId, usize>,
}

/// One connection's subscription to a channel.
#[derive(Clone)]
struct Subscriber {
    connection: ConnectionId,
    outbox: Arc<Outbox>,
    /// This subscription's key in the connection's outbox.
    key: ChannelKey,
}

/// Channels whose local interest changed since the broker last looked.
struct Interest {
    /// Bounded by the number of distinct channels with local subscribers or
    /// recently without: each name appears once.
    dirty: Mutex<HashSet<Arc<str>>>,
    notify: Notify,
}

/// The result of [`Hub::subscribe`].
pub struct Subscribed {
    /// The hub's shared copy of the channel name.
    pub channel: Arc<str>,
    /// This subscription's key: new for every subscribe, the same for a
    /// repeated subscribe of a channel the connection already holds.
    pub key: ChannelKey,
}

impl Hub {
    /// A hub for `config`. `track_interest` is true when the broker needs to be
    /// told about first and last subscribers.
    pub fn new(config: &Config, metrics: Metrics, track_interest: bool) -> Hub {
        let rules = config
            .channels
            .iter()
            .map(|rule| {
                let pattern = Pattern::parse(&rule.pattern).expect("validated with the config");
                let policy = DeliveryPolicy {
                    slow: rule.policy,
                    min_interval: rule.max_rate_hz.map(|hz| Duration::from_secs_f64(1.0 / hz)),
                };
                (pattern, policy)
            })
            .collect();
        Hub {
            shared: Arc::new(Shared {
                shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
                hasher: Default::default(),
                rules,
                next_key: AtomicU64::new(1),
                interest: track_interest.then(|| Interest {
                    dirty: Mutex::new(HashSet::new()),
                    notify: Notify::new(),
                }),
                max_publish_bytes: config.limits.max_publish_bytes,
                metrics,
            }),
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let index = self.shared.hasher.hash_one(channel) as usize % SHARDS;
        &self.shared.shards[index]
    }

    /// The delivery policy `[[channels]]` gives `channel`.
    pub fn policy_for(&self, channel: &str) -> DeliveryPolicy {
        self.shared
            .rules
            .iter()
            .find(|(pattern, _)| pattern.matches(channel))
            .map(|(_, policy)| *policy)
            .unwrap_or_default()
    }

    /// Adds a subscriber. Idempotent per connection and channel.
    pub fn subscribe(
        &self,
        connection: ConnectionId,
        outbox: &Arc<Outbox>,
        channel: &str,
    ) -> Subscribed {
        let mut shard = write(self.shard(channel));
        let (name, entry) = match shard.get_key_value(channel) {
            Some((name, _)) => {
                let name = name.clone();
                let entry = shard.get_mut(channel).expect("just found");
                (name, entry)
            }
            None => {
                let name: Arc<str> = channel.into();
                let entry = ChannelEntry {
                    policy: self.policy_for(channel),
                    subscribers: Arc::new(Vec::new()),
                    positions: HashMap::new(),
                };
                self.shared.metrics.channels_changed(1);
                self.mark_dirty(&name);
                let entry = shard.entry(name.clone()).or_insert(entry);
                (name, entry)
            }
        };
        let key = match entry.positions.get(&connection) {
            Some(&index) => entry.subscribers[index].key,
            None => {
                self.shared.metrics.subscriptions_changed(1);
                let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
                let subscribers = Arc::make_mut(&mut entry.subscribers);
                entry.positions.insert(connection, subscribers.len());
                subscribers.push(Subscriber {
                    connection,
                    outbox: outbox.clone(),
                    key,
                });
                key
            }
        };
        Subscribed { channel: name, key }
    }

    /// Removes a subscriber; the channel goes when its last subscriber does.
    pub fn unsubscribe(&self, connection: ConnectionId, channel: &str) {
        let mut shard = write(self.shard(channel));
        let Some(entry) = shard.get_mut(channel) else {
            return;
        };
        if let Some(index) = entry.positions.remove(&connection) {
            self.shared.metrics.subscriptions_changed(-1);
            let subscribers = Arc::make_mut(&mut entry.subscribers);
            subscribers.swap_remove(index);
            if let Some(moved) = subscribers.get(index) {
                entry.positions.insert(moved.connection, index);
            }
        }
        if entry.subscribers.is_empty() {
            if let Some((name, _)) = shard.remove_entry(channel) {
                self.shared.metrics.channels_changed(-1);
                self.mark_dirty(&name);
            }
        }
    }

    /// Fans a published payload out to the local subscribers of `channel`.
    /// Encodes once, never waits on a connection. Returns the subscriber count.
    pub fn deliver(&self, channel: &str, payload: &[u8]) -> usize {
        self.shared.metrics.message_received();
        let (subscribers, policy) = {
            let shard = read(self.shard(channel));
            let Some(entry) = shard.get(channel) else {
                return 0;
            };
            (entry.subscribers.clone(), entry.policy)
        };
        if payload.len() > self.shared.max_publish_bytes {
            self.shared
                .metrics
                .message_dropped("too_large", Some(policy.slow));
            return 0;
        }
        let frame: Bytes = protocol::encode_message(channel, payload);
        for subscriber in subscribers.iter() {
            subscriber
                .outbox
                .push_message(&frame, subscriber.key, &policy);
        }
        subscribers.len()
    }

    /// Tells every local subscriber of `channels` that messages may have been
    /// missed: one `gap` frame per connection listing its affected channels.
    /// Returns how many connections were told.
    pub fn send_gap(&self, channels: &[Arc<str>]) -> usize {
        let mut affected: HashMap<ConnectionId, (Arc<Outbox>, Vec<String>)> = HashMap::new();
        for channel in channels {
            let shard = read(self.shard(channel));
            if let Some(entry) = shard.get(&**channel) {
                for subscriber in entry.subscribers.iter() {
                    affected
                        .entry(subscriber.connection)
                        .or_insert_with(|| (subscriber.outbox.clone(), Vec::new()))
                        .1
                        .push(channel.to_string());
                }
            }
        }
        for (outbox, channels) in affected.values() {
            outbox.push_reply(protocol::ServerFrame::Gap { channels }.encode());
        }
        affected.len()
    }

    /// Whether any local connection subscribes to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        read(self.shard(channel)).contains_key(channel)
    }

    /// Every channel with a local subscriber.
    pub fn channels(&self) -> Vec<Arc<str>> {
        self.shared
            .shards
            .iter()
            .flat_map(|shard| read(shard).keys().cloned().collect::<Vec<_>>())
            .collect()
    }

    fn mark_dirty(&self, channel: &Arc<str>) {
        if let Some(interest) = &self.shared.interest {
            let mut dirty = interest.dirty.lock().unwrap_or_else(|p| p.into_inner());
            dirty.insert(channel.clone());
            drop(dirty);
            interest.notify.notify_one();
        }
    }

    /// Takes the channels whose interest changed. Empty unless built with
    /// `track_interest`.
    pub fn take_dirty(&self) -> Vec<Arc<str>> {
        match &self.shared.interest {
            Some(interest) => {
                let mut dirty = interest.dirty.lock().unwrap_or_else(|p| p.into_inner());
                dirty.drain().collect()
            }
            None => Vec::new(),
        }
    }

    /// Waits until some channel's interest changes. Cancel-safe.
    pub async fn interest_changed(&self) {
        match &self.shared.interest {
            Some(interest) => interest.notify.notified().await,
            None => std::future::pending().await,
        }
    }
}

// The maps stay consistent across a panic (each update is one insert or
// remove), so a poisoned lock is still used.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::QueueLimits;

    fn outbox() -> Arc<Outbox> {
        Arc::new(Outbox::new(
            QueueLimits {
                messages: 16,
                bytes: 1 << 20,
            },
            u64::MAX,
            Metrics::new("test"),
        ))
    }

    #[test]
    fn first_and_last_subscriber_mark_the_channel_dirty() {
        let hub = Hub::new(&Config::default(), Metrics::new("test"), true);
        let (a, b) = (outbox(), outbox());
        hub.subscribe(1, &a, "news");
        hub.subscribe(2, &b, "news");
        assert_eq!(hub.take_dirty(), vec![Arc::<str>::from("news")]);
        hub.unsubscribe(1, "news");
        assert!(hub.take_dirty().is_empty());
        assert!(hub.has_subscribers("news"));
        hub.unsubscribe(2, "news");
        assert_eq!(hub.take_dirty(), vec![Arc::<str>::from("news")]);
        assert!(!hub.has_subscribers("news"));
    }

    #[test]
    fn delivery_shares_one_encoded_frame() {
        let hub = Hub::new(&Config::default(), Metrics::new("test"), false);
        let (a, b) = (outbox(), outbox());
        hub.subscribe(1, &a, "news");
        hub.subscribe(2, &b, "news");
        assert_eq!(hub.deliver("news", b"{\"x\":1}"), 2);
        assert_eq!(hub.deliver("other", b"1"), 0);
        let (mut fa, mut fb) = (Vec::new(), Vec::new());
        a.drain(&mut fa, usize::MAX, tokio::time::Instant::now());
        b.drain(&mut fb, usize::MAX, tokio::time::Instant::now());
        assert_eq!(
            fa[0].as_ptr(),
            fb[0].as_ptr(),
            "one allocation shared by both"
        );
    }

    #[test]
    fn a_resubscribe_is_a_new_subscription_for_conflation() {
        let mut config = Config::default();
        config.channels.push(crate::config::ChannelRule {
            pattern: "prices.*".into(),
            policy: crate::config::SlowPolicy::Conflate,
            max_rate_hz: None,
        });
        let hub = Hub::new(&config, Metrics::new("test"), false);
        let (a, b) = (outbox(), outbox());
        // `b` keeps the channel alive while `a` leaves and comes back.
        hub.subscribe(2, &b, "prices.X");
        let first = hub.subscribe(1, &a, "prices.X");
        hub.deliver("prices.X", b"1");
        hub.unsubscribe(1, "prices.X");
        a.forget(first.key);
        a.push_reply(Bytes::from_static(b"unsubscribed"));
        let second = hub.subscribe(1, &a, "prices.X");
        assert_ne!(first.key, second.key);
        a.push_reply(Bytes::from_static(b"subscribed"));
        hub.deliver("prices.X", b"2");
        let mut frames = Vec::new();
        a.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
        let frames: Vec<String> = frames
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        // The message of the new subscription comes after both replies; the
        // old one was not overtaken by it.
        assert_eq!(frames.len(), 4, "{frames:?}");
        assert!(frames[0].contains("\"data\":1"), "{frames:?}");
        assert_eq!(frames[1], "unsubscribed");
        assert_eq!(frames[2], "subscribed");
        assert!(frames[3].contains("\"data\":2"), "{frames:?}");
        // A repeated subscribe keeps its key.
        assert_eq!(hub.subscribe(1, &a, "prices.X").key, second.key);
    }

    #[test]
    fn removal_keeps_every_other_subscriber_reachable() {
        let hub = Hub::new(&Config::default(), Metrics::new("test"), false);
        let outboxes: Vec<Arc<Outbox>> = (0..100).map(|_| outbox()).collect();
        for (id, outbox) in outboxes.iter().enumerate() {
            hub.subscribe(id as ConnectionId, outbox, "news");
        }
        // A delivery in flight holds the list while connections leave.
        let held = read(hub.shard("news"))
            .get("news")
            .unwrap()
            .subscribers
            .clone();
        for id in (0..100).rev().filter(|id| id % 3 != 0) {
            hub.unsubscribe(id as ConnectionId, "news");
        }
        assert_eq!(held.len(), 100, "the held list is not changed under it");
        drop(held);
        hub.unsubscribe(1, "news");
        hub.subscribe(1, &outboxes[1], "news");
        assert_eq!(hub.deliver("news", b"1"), 35);
        for (id, outbox) in outboxes.iter().enumerate() {
            let mut frames = Vec::new();
            outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
            let expected = id % 3 == 0 || id == 1;
            assert_eq!(frames.len(), usize::from(expected), "connection {id}");
        }
    }
}
