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
use tracing::warn;

use crate::channel::Pattern;
use crate::config::Config;
use crate::history::cursor::{Cursor, Outcome, Sink};
use crate::history::{HistoryRule, Since, Snapshot, Unrecoverable};
use crate::metrics::Metrics;
use crate::presence::{Event, Members};
use crate::protocol;
use crate::session::outbox::{ChannelKey, DeliveryPolicy, Outbox};
use patterns::Patterns;

mod fanout;
mod patterns;

/// A connection's id, unique within a node.
pub type ConnectionId = u64;

const SHARDS: usize = 64;

/// A cheap-to-clone handle to the node's hub.
#[derive(Clone)]
pub struct Hub {
    shared: Arc<Shared>,
}

/// A `[[channels]]` rule, as the hub uses it.
struct Rule {
    pattern: Pattern,
    policy: DeliveryPolicy,
    history: Option<HistoryRule>,
    /// Client publishes carry their publisher.
    stamp_from: bool,
    /// Presence, with whether `join`/`leave` frames are delivered.
    presence: Option<bool>,
}

/// One slice of the channel map.
type Shard = RwLock<HashMap<Arc<str>, ChannelEntry>>;

struct Shared {
    shards: Box<[Shard]>,
    /// Picks a shard for a channel name.
    hasher: std::collections::hash_map::RandomState,
    /// `[[channels]]` rules, first match wins.
    rules: Vec<Rule>,
    /// Pattern subscriptions, indexed by literal prefix. One lock: pattern
    /// subscribes are rare next to deliveries, which take it shared.
    patterns: RwLock<Patterns>,
    /// Source of [`ChannelKey`]s: every subscription gets a new one, so that
    /// nothing an outbox holds for a past subscription (a pending conflated
    /// entry, a held rate-limited one) is taken for the current one.
    next_key: AtomicU64,
    /// Present when the broker subscribes upstream per channel.
    interest: Option<Interest>,
    /// Payloads larger than this are dropped, not delivered.
    max_publish_bytes: usize,
    /// `limits.queue_bytes`: a recovery larger than this is refused.
    queue_bytes: usize,
    /// History channels whose cursor wants a fill from the stream. Each
    /// appears once, so it is bounded by the history channels with local
    /// subscribers.
    fills: Mutex<HashSet<Arc<str>>>,
    fills_due: Notify,
    /// When the last unsequenced message on a history channel was logged, in
    /// milliseconds since `started`: the warning is rate-limited.
    unsequenced_logged_ms: AtomicU64,
    started: std::time::Instant,
    metrics: Metrics,
    /// Spreads large deliveries over `server.fanout_threads`.
    fanout: fanout::FanOut,
}

struct ChannelEntry {
    policy: DeliveryPolicy,
    /// The subscribers, shared with the deliveries in progress.
    subscribers: Arc<Vec<Subscriber>>,
    /// Each connection's index in `subscribers`, for O(1) removal.
    positions: HashMap<ConnectionId, usize>,
    /// History channels: the node's one cursor on the channel, shared with
    /// the deliveries, fills and joins in progress. Lock order: a cursor, then
    /// a shard, never the reverse.
    history: Option<(HistoryRule, Arc<Mutex<Cursor>>)>,
    /// Connections joining with recovery: they keep the channel wanted before
    /// they are in `subscribers`.
    joining: u32,
    /// Presence channels: whether `join`/`leave` frames are delivered, and
    /// this node's connections per user.
    presence: Option<(bool, HashMap<Arc<str>, u32>)>,
}

impl ChannelEntry {
    fn is_empty(&self) -> bool {
        self.subscribers.is_empty() && self.joining == 0
    }
}

/// One connection's subscription to a channel or a pattern.
#[derive(Clone)]
pub(crate) struct Subscriber {
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
                Rule {
                    pattern,
                    policy,
                    history: HistoryRule::from_config(rule),
                    stamp_from: rule.stamp_from,
                    presence: rule.presence.then_some(rule.join_leave),
                }
            })
            .collect();
        Hub {
            shared: Arc::new(Shared {
                shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
                hasher: Default::default(),
                rules,
                next_key: AtomicU64::new(1),
                patterns: RwLock::new(Patterns::default()),
                interest: track_interest.then(|| Interest {
                    dirty: Mutex::new(HashSet::new()),
                    notify: Notify::new(),
                }),
                max_publish_bytes: config.limits.max_publish_bytes,
                queue_bytes: config.limits.queue_bytes,
                fills: Mutex::new(HashSet::new()),
                fills_due: Notify::new(),
                unsequenced_logged_ms: AtomicU64::new(0),
                started: std::time::Instant::now(),
                metrics,
                fanout: fanout::FanOut::new(config.server.fanout_threads),
            }),
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        let index = self.shared.hasher.hash_one(channel) as usize % SHARDS;
        &self.shared.shards[index]
    }

    /// The delivery policy `[[channels]]` gives `channel`.
    pub fn policy_for(&self, channel: &str) -> DeliveryPolicy {
        self.rule_for(channel).0
    }

    /// The history settings `[[channels]]` give `channel`, if it has history.
    pub fn history_rule(&self, channel: &str) -> Option<HistoryRule> {
        self.rule_for(channel).1
    }

    /// Whether client publishes on `channel` carry their publisher's `sub`.
    pub fn stamps_from(&self, channel: &str) -> bool {
        self.shared
            .rules
            .iter()
            .find(|rule| rule.pattern.matches(channel))
            .is_some_and(|rule| rule.stamp_from)
    }

    fn rule_for(&self, channel: &str) -> (DeliveryPolicy, Option<HistoryRule>) {
        self.shared
            .rules
            .iter()
            .find(|rule| rule.pattern.matches(channel))
            .map(|rule| (rule.policy, rule.history))
            .unwrap_or_default()
    }

    fn new_entry(&self, channel: &str) -> ChannelEntry {
        let (policy, history) = self.rule_for(channel);
        ChannelEntry {
            policy,
            subscribers: Arc::new(Vec::new()),
            positions: HashMap::new(),
            history: history
                .map(|rule| (rule, Arc::new(Mutex::new(Cursor::new(rule.recover_max))))),
            joining: 0,
            presence: self
                .presence_rule(channel)
                .map(|join_leave| (join_leave, HashMap::new())),
        }
    }

    /// For a presence channel, whether `join`/`leave` frames are delivered;
    /// `None` for other channels.
    pub fn presence_rule(&self, channel: &str) -> Option<bool> {
        self.shared
            .rules
            .iter()
            .find(|rule| rule.pattern.matches(channel))
            .and_then(|rule| rule.presence)
    }

    /// Counts a connection of `user` on the presence channel `channel`;
    /// returns the node's members when it is the user's first here.
    pub fn presence_add(&self, channel: &str, user: &Arc<str>) -> Option<Members> {
        let mut shard = write(self.shard(channel));
        let (_, users) = shard.get_mut(channel)?.presence.as_mut()?;
        let count = users.entry(user.clone()).or_default();
        *count += 1;
        (*count == 1).then(|| users.iter().map(|(u, c)| (u.clone(), *c)).collect())
    }

    /// Uncounts a connection of `user`; returns the node's members when it was
    /// the user's last here.
    pub fn presence_remove(&self, channel: &str, user: &str) -> Option<Members> {
        let mut shard = write(self.shard(channel));
        let (_, users) = shard.get_mut(channel)?.presence.as_mut()?;
        let count = users.get_mut(user)?;
        *count -= 1;
        if *count > 0 {
            return None;
        }
        users.remove(user);
        Some(users.iter().map(|(u, c)| (u.clone(), *c)).collect())
    }

    /// This node's members of a presence channel.
    pub fn local_members(&self, channel: &str) -> Members {
        read(self.shard(channel))
            .get(channel)
            .and_then(|entry| entry.presence.as_ref())
            .map(|(_, users)| users.iter().map(|(u, c)| (u.clone(), *c)).collect())
            .unwrap_or_default()
    }

    /// Presence channels with members on this node, for the heartbeat.
    pub fn presence_channels(&self) -> Vec<Arc<str>> {
        self.shared
            .shards
            .iter()
            .flat_map(|shard| {
                read(shard)
                    .iter()
                    .filter(|(_, entry)| {
                        entry
                            .presence
                            .as_ref()
                            .is_some_and(|(_, users)| !users.is_empty())
                    })
                    .map(|(name, _)| name.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Delivers a `join` or `leave` frame to a channel's subscribers, when its
    /// rule asks for them.
    fn deliver_presence_event(&self, channel: &str, event: Event<'_>) -> usize {
        let (subscribers, policy) = {
            let shard = read(self.shard(channel));
            let Some(entry) = shard.get(channel) else {
                return 0;
            };
            if !matches!(entry.presence, Some((true, _))) {
                return 0;
            }
            (entry.subscribers.clone(), entry.policy)
        };
        let frame = match event {
            Event::Join(user) => protocol::ServerFrame::Join { channel, user },
            Event::Leave(user) => protocol::ServerFrame::Leave { channel, user },
        }
        .encode();
        self.shared.fanout.push(&subscribers, &frame, &policy);
        subscribers.len()
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
                let entry = self.new_entry(channel);
                self.shared.metrics.channels_changed(1);
                self.mark_dirty(&name);
                let entry = shard.entry(name.clone()).or_insert(entry);
                (name, entry)
            }
        };
        let key = self.add_subscriber(entry, connection, outbox);
        Subscribed { channel: name, key }
    }

    fn add_subscriber(
        &self,
        entry: &mut ChannelEntry,
        connection: ConnectionId,
        outbox: &Arc<Outbox>,
    ) -> ChannelKey {
        match entry.positions.get(&connection) {
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
        }
    }

    /// Adds a connection's subscription to a pattern (`prices.*`).
    /// Idempotent per connection and pattern. The caller checked the grants
    /// and that the broker supports patterns.
    pub fn subscribe_pattern(
        &self,
        connection: ConnectionId,
        outbox: &Arc<Outbox>,
        pattern: &Pattern,
    ) -> Subscribed {
        let mut patterns = write(&self.shared.patterns);
        let (name, entry, created) = patterns.entry(pattern);
        if created {
            self.shared.metrics.channels_changed(1);
            self.mark_dirty(&name);
        }
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

    fn unsubscribe_pattern(&self, connection: ConnectionId, pattern: &str) {
        let mut patterns = write(&self.shared.patterns);
        let Some(entry) = patterns.get_mut(pattern) else {
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
            if let Some(name) = patterns.remove(pattern) {
                self.shared.metrics.channels_changed(-1);
                self.mark_dirty(&name);
            }
        }
    }

    /// Fans a message out to the pattern subscriptions matching `channel`:
    /// all of them (`only` is `None`, the memory broker), or those of one
    /// pattern (a Redis `pmessage` for it). A connection gets the message
    /// once: not through a pattern when it also subscribes to the channel
    /// itself, and through the first of its matching patterns only (in name
    /// order), so that a `pmessage` per pattern does not repeat it. Rate
    /// limits (`max_rate_hz`) do not apply to pattern subscriptions; the
    /// other policies apply per concrete channel. Returns the deliveries.
    pub fn deliver_patterns(&self, channel: &str, payload: &[u8], only: Option<&str>) -> usize {
        let targets: Vec<(Arc<Outbox>, ChannelKey)> = {
            let patterns = read(&self.shared.patterns);
            if patterns.is_empty() {
                return 0;
            }
            let matching = patterns.matching(channel);
            if matching.is_empty() {
                return 0;
            }
            let exact: HashSet<ConnectionId> = read(self.shard(channel))
                .get(channel)
                .map(|entry| entry.positions.keys().copied().collect())
                .unwrap_or_default();
            let channel_hash = self.shared.hasher.hash_one(channel) as u32;
            let mut targets = Vec::new();
            for (i, (name, entry)) in matching.iter().enumerate() {
                if only.is_some_and(|only| only != &***name) {
                    continue;
                }
                for subscriber in entry.subscribers.iter() {
                    let earlier = matching[..i]
                        .iter()
                        .any(|(_, e)| e.positions.contains_key(&subscriber.connection));
                    if exact.contains(&subscriber.connection) || earlier {
                        continue;
                    }
                    targets.push((
                        subscriber.outbox.clone(),
                        pattern_delivery_key(subscriber.key, channel_hash),
                    ));
                }
            }
            targets
        };
        if targets.is_empty() {
            return 0;
        }
        let (policy, _) = self.rule_for(channel);
        let policy = DeliveryPolicy {
            min_interval: None,
            ..policy
        };
        let (payload, position) = match crate::history::parse_envelope(payload) {
            Some(envelope) => (envelope.payload, Some((envelope.offset, envelope.epoch))),
            None => (payload, None),
        };
        if protocol::split_from(payload).1.len() > self.shared.max_publish_bytes {
            return 0;
        }
        let frame = match position {
            Some((offset, epoch)) => protocol::encode_sequenced(channel, payload, offset, epoch),
            None => protocol::encode_message(channel, payload),
        };
        for (outbox, key) in &targets {
            outbox.push_message(&frame, *key, &policy);
        }
        targets.len()
    }

    /// Removes a subscriber; the channel goes when its last subscriber does.
    pub fn unsubscribe(&self, connection: ConnectionId, channel: &str) {
        if channel.contains('*') {
            return self.unsubscribe_pattern(connection, channel);
        }
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
        if entry.is_empty() {
            if let Some((name, _)) = shard.remove_entry(channel) {
                self.shared.metrics.channels_changed(-1);
                self.mark_dirty(&name);
            }
        }
    }

    /// Fans a message off the broker out to the local subscribers of
    /// `channel`: a sequenced one (in the history envelope) through the
    /// channel's cursor, a raw one at once. Encodes once, never waits on a
    /// connection. Returns the subscriber count.
    pub fn deliver(&self, channel: &str, payload: &[u8]) -> usize {
        if let Some(event) = crate::presence::parse_event(payload) {
            return self.deliver_presence_event(channel, event);
        }
        if let Some(envelope) = crate::history::parse_envelope(payload) {
            return self.deliver_sequenced(
                channel,
                envelope.epoch,
                envelope.offset,
                Bytes::copy_from_slice(envelope.payload),
            );
        }
        self.shared.metrics.message_received();
        let (subscribers, policy, history) = {
            let shard = read(self.shard(channel));
            let Some(entry) = shard.get(channel) else {
                if self.history_rule(channel).is_some() {
                    self.unsequenced(channel);
                }
                return 0;
            };
            (
                entry.subscribers.clone(),
                entry.policy,
                entry.history.is_some(),
            )
        };
        if history {
            self.unsequenced(channel);
        }
        if protocol::split_from(payload).1.len() > self.shared.max_publish_bytes {
            self.shared
                .metrics
                .message_dropped("too_large", Some(policy.slow));
            return 0;
        }
        let frame: Bytes = protocol::encode_message(channel, payload);
        self.shared.fanout.push(&subscribers, &frame, &policy);
        subscribers.len()
    }

    /// A raw message on a history channel: delivered live without an offset,
    /// counted, and logged at most once a minute.
    fn unsequenced(&self, channel: &str) {
        self.shared.metrics.message_unsequenced();
        let now = self.shared.started.elapsed().as_millis() as u64;
        let logged = self.shared.unsequenced_logged_ms.load(Ordering::Relaxed);
        if (logged == 0 || now.saturating_sub(logged) >= 60_000)
            && self
                .shared
                .unsequenced_logged_ms
                .compare_exchange(logged, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!(
                channel,
                "a raw PUBLISH reached a history channel: delivered without an offset, and \
                 not recoverable; publish with FCALL herald_publish (logged at most once a minute)"
            );
        }
    }

    /// Delivers a sequenced message through the channel's cursor, which keeps
    /// the channel gap-free: in order, without duplicates, filling holes from
    /// the stream. Returns the subscriber count.
    pub fn deliver_sequenced(
        &self,
        channel: &str,
        epoch: &str,
        offset: u64,
        payload: Bytes,
    ) -> usize {
        self.shared.metrics.message_received();
        let (cursor, policy) = {
            let shard = read(self.shard(channel));
            let Some(entry) = shard.get(channel) else {
                return 0;
            };
            match &entry.history {
                Some((_, cursor)) => (cursor.clone(), entry.policy),
                None => {
                    // This node has no history for the channel (its rules
                    // differ from the publisher's): deliver it as it is.
                    drop(shard);
                    return self.deliver_plain(channel, &payload);
                }
            }
        };
        let mut sink = HubSink::new(self, channel, policy);
        let outcome = lock(&cursor).live(epoch, offset, payload, &mut sink);
        self.after_step(channel, outcome);
        sink.subscribers.map(|s| s.len()).unwrap_or(0)
    }

    fn deliver_plain(&self, channel: &str, payload: &[u8]) -> usize {
        let (subscribers, policy) = {
            let shard = read(self.shard(channel));
            let Some(entry) = shard.get(channel) else {
                return 0;
            };
            (entry.subscribers.clone(), entry.policy)
        };
        let frame: Bytes = protocol::encode_message(channel, payload);
        self.shared.fanout.push(&subscribers, &frame, &policy);
        subscribers.len()
    }

    /// Counts what a cursor step did and schedules the fill it asked for.
    fn after_step(&self, channel: &str, outcome: Outcome) {
        let metrics = &self.shared.metrics;
        if outcome.duplicates > 0 {
            metrics.history_duplicates(outcome.duplicates);
        }
        if outcome.overflowed > 0 {
            metrics.history_buffer_overflowed(outcome.overflowed);
        }
        if outcome.filled > 0 {
            metrics.history_filled(outcome.filled);
        }
        if outcome.fill {
            self.schedule_fill(channel);
        }
    }

    /// Asks the filler to bring `channel`'s cursor up to the stream.
    pub fn schedule_fill(&self, channel: &str) {
        let name: Arc<str> = match read(self.shard(channel)).get_key_value(channel) {
            Some((name, entry)) if entry.history.is_some() => name.clone(),
            _ => return,
        };
        lock(&self.shared.fills).insert(name);
        self.shared.fills_due.notify_one();
    }

    /// Takes the channels due for a fill.
    pub fn take_fills(&self) -> Vec<Arc<str>> {
        lock(&self.shared.fills).drain().collect()
    }

    /// Waits until a fill is scheduled. Cancel-safe.
    pub async fn fills_due(&self) {
        self.shared.fills_due.notified().await
    }

    /// Starts a fill of `channel`: the offset to read from and how many
    /// entries, or `None` when none may run now.
    pub fn begin_fill(&self, channel: &str) -> Option<(u64, usize)> {
        let (rule, cursor) = self.cursor(channel)?;
        let from = lock(&cursor).begin_fill()?;
        Some((from, rule.recover_max as usize + 1))
    }

    /// Ends a fill with what the stream held (`None`: the read failed).
    pub fn complete_fill(&self, channel: &str, snapshot: Option<&Snapshot>) {
        let Some((_, cursor)) = self.cursor(channel) else {
            return;
        };
        let policy = self.policy_for(channel);
        let mut sink = HubSink::new(self, channel, policy);
        let outcome = lock(&cursor).complete_fill(snapshot, &mut sink);
        self.after_step(channel, outcome);
    }

    fn cursor(&self, channel: &str) -> Option<(HistoryRule, Arc<Mutex<Cursor>>)> {
        let shard = read(self.shard(channel));
        let (rule, cursor) = shard.get(channel)?.history.as_ref()?;
        Some((*rule, cursor.clone()))
    }

    /// Every history channel with local subscribers, for the periodic check.
    pub fn history_channels(&self) -> Vec<Arc<str>> {
        self.shared
            .shards
            .iter()
            .flat_map(|shard| {
                read(shard)
                    .iter()
                    .filter(|(_, entry)| entry.history.is_some())
                    .map(|(name, _)| name.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// After the broker lost `channels` for a while (a reconnect, a stall, a
    /// moved slot): history channels are filled from their streams, and the
    /// others' subscribers get a `gap`. Returns how many connections got one.
    pub fn lost(&self, channels: &[Arc<str>]) -> usize {
        let mut plain = Vec::new();
        for channel in channels {
            if self.history_rule(channel).is_some() {
                self.schedule_fill(channel);
            } else {
                plain.push(channel.clone());
            }
        }
        self.send_gap(&plain)
    }

    /// The position of `channel` for a connection already subscribed to it.
    pub fn position(&self, channel: &str) -> Option<(Arc<str>, u64)> {
        let (_, cursor) = self.cursor(channel)?;
        let position = lock(&cursor).position();
        Some(position)
    }

    /// Starts a connection's subscription to a history channel: the channel
    /// becomes wanted at the broker, and its cursor is paused until the join
    /// is finished (or dropped), so that the recovery read from the stream
    /// lines up with live delivery.
    pub fn begin_join(&self, connection: ConnectionId, channel: &str) -> Join {
        let (name, rule, cursor) = {
            let mut shard = write(self.shard(channel));
            if !shard.contains_key(channel) {
                let name: Arc<str> = channel.into();
                self.shared.metrics.channels_changed(1);
                self.mark_dirty(&name);
                shard.insert(name, self.new_entry(channel));
            }
            let (name, entry) = shard.get_key_value(channel).expect("just inserted");
            let name = name.clone();
            let (rule, cursor) = entry.history.clone().expect("a history channel");
            shard.get_mut(channel).expect("present").joining += 1;
            (name, rule, cursor)
        };
        let (paused_at, synced) = {
            let mut cursor = lock(&cursor);
            (cursor.pause(), cursor.is_synced())
        };
        Join {
            hub: self.clone(),
            connection,
            channel: name,
            rule,
            cursor,
            paused_at,
            synced,
            finished: false,
        }
    }

    /// Finishes joins whose stream reads are done: each cursor is brought up
    /// to its read, the connection becomes a subscriber, `reply` queues the
    /// subscribe reply (with the positions in `outcomes`), then each recovery
    /// is queued, and only then do the cursors move on. All of it holds the
    /// joins' cursors, so no live message of these channels can come between.
    ///
    /// Returns the indices of joins whose read is stale (another join moved
    /// the cursor past it): nothing was done, read them again and call this
    /// again. `last_try` finishes them anyway, as well as it can.
    pub fn finish_joins(
        &self,
        outbox: &Arc<Outbox>,
        joins: &mut [JoinRead],
        last_try: bool,
        reply: impl FnOnce(&[JoinOutcome]),
    ) -> Vec<usize> {
        let cursors: Vec<Arc<Mutex<Cursor>>> =
            joins.iter().map(|read| read.join.cursor.clone()).collect();
        let mut order: Vec<usize> = (0..joins.len()).collect();
        order.sort_by_key(|&i| Arc::as_ptr(&cursors[i]) as usize);
        let mut guards: Vec<Option<std::sync::MutexGuard<'_, Cursor>>> =
            (0..joins.len()).map(|_| None).collect();
        for &i in &order {
            guards[i] = Some(lock(&cursors[i]));
        }
        if !last_try {
            let stale: Vec<usize> = (0..joins.len())
                .filter(|&i| {
                    let cursor = guards[i].as_ref().expect("locked");
                    let read = &joins[i];
                    read.since.is_some()
                        && cursor.is_synced()
                        && read.snapshot.epoch.as_deref() == Some(&*cursor.position().0)
                        && cursor.position().1 > read.snapshot.top
                })
                .collect();
            if !stale.is_empty() {
                return stale;
            }
        }
        let mut outcomes = Vec::with_capacity(joins.len());
        let mut recoveries: Vec<(ChannelKey, DeliveryPolicy, Vec<Bytes>)> = Vec::new();
        for (i, read) in joins.iter_mut().enumerate() {
            let cursor = guards[i].as_mut().expect("locked");
            let join = &mut read.join;
            let policy = self.policy_for(&join.channel);
            let mut sink = HubSink::new(self, &join.channel, policy);
            let outcome = cursor.apply(&read.snapshot, &mut sink);
            self.after_step(&join.channel, outcome);
            let (epoch, last) = cursor.position();
            let recovery = read.since.as_ref().map(|since| {
                self.recover(
                    &join.channel,
                    since,
                    &read.snapshot,
                    &epoch,
                    last,
                    join.rule,
                )
            });
            let key = {
                let mut shard = write(self.shard(&join.channel));
                let entry = shard.get_mut(&*join.channel).expect("kept by the join");
                entry.joining -= 1;
                self.add_subscriber(entry, join.connection, outbox)
            };
            join.finished = true;
            let recovered = match &recovery {
                Some(Ok(frames)) => {
                    self.shared.metrics.history_recovery(None);
                    recoveries.push((key, policy, frames.clone()));
                    Some(Ok(()))
                }
                Some(Err(reason)) => {
                    self.shared.metrics.history_recovery(Some(*reason));
                    Some(Err(*reason))
                }
                None => None,
            };
            outcomes.push(JoinOutcome {
                channel: join.channel.clone(),
                key,
                epoch,
                offset: last,
                recovered,
            });
        }
        reply(&outcomes);
        for (key, policy, frames) in recoveries {
            for frame in &frames {
                outbox.push_message(frame, key, &policy);
            }
        }
        for (i, read) in joins.iter().enumerate() {
            let cursor = guards[i].as_mut().expect("locked");
            let policy = self.policy_for(&read.join.channel);
            let mut sink = HubSink::new(self, &read.join.channel, policy);
            let outcome = cursor.resume(&mut sink);
            self.after_step(&read.join.channel, outcome);
        }
        Vec::new()
    }

    /// The frames that bring a client from `since` to the cursor's `last`,
    /// or why that cannot be done.
    fn recover(
        &self,
        channel: &str,
        since: &Since,
        snapshot: &Snapshot,
        epoch: &Arc<str>,
        last: u64,
        rule: HistoryRule,
    ) -> Result<Vec<Bytes>, Unrecoverable> {
        // A client that subscribed before the channel's first message holds
        // the position (0, ""): it is in every epoch's start.
        let from_the_start = since.epoch.is_empty() && since.offset == 0;
        let Some(store_epoch) = &snapshot.epoch else {
            return match from_the_start {
                true => Ok(Vec::new()),
                false => Err(Unrecoverable::UnknownChannel),
            };
        };
        let same_epoch = *since.epoch == **store_epoch || from_the_start;
        if !same_epoch || *store_epoch != *epoch || since.offset > last {
            return Err(Unrecoverable::EpochChanged);
        }
        if last - since.offset > rule.recover_max {
            return Err(Unrecoverable::TooMany);
        }
        let wanted = since.offset + 1..=last;
        let entries: Vec<&(u64, Bytes)> = snapshot
            .entries
            .iter()
            .filter(|(offset, _)| wanted.contains(offset))
            .collect();
        let complete = entries.len() as u64 == last - since.offset
            && entries
                .iter()
                .zip(wanted)
                .all(|((offset, _), expected)| *offset == expected);
        if !complete {
            return Err(Unrecoverable::Trimmed);
        }
        let mut bytes = 0;
        let mut frames = Vec::with_capacity(entries.len());
        for (offset, payload) in entries {
            let frame = protocol::encode_sequenced(channel, payload, *offset, epoch);
            bytes += frame.len();
            if bytes > self.shared.queue_bytes / 2 {
                return Err(Unrecoverable::TooMany);
            }
            frames.push(frame);
        }
        self.shared
            .metrics
            .history_recovered_messages(frames.len() as u64);
        Ok(frames)
    }

    fn abort_join(&self, join: &Join) {
        {
            let policy = self.policy_for(&join.channel);
            let mut sink = HubSink::new(self, &join.channel, policy);
            let outcome = lock(&join.cursor).resume(&mut sink);
            self.after_step(&join.channel, outcome);
        }
        let mut shard = write(self.shard(&join.channel));
        let Some(entry) = shard.get_mut(&*join.channel) else {
            return;
        };
        entry.joining -= 1;
        if entry.is_empty() {
            if let Some((name, _)) = shard.remove_entry(&*join.channel) {
                self.shared.metrics.channels_changed(-1);
                self.mark_dirty(&name);
            }
        }
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

    /// Whether any local connection subscribes to `channel` (or, for a name
    /// with `*`, to that pattern).
    pub fn has_subscribers(&self, channel: &str) -> bool {
        if channel.contains('*') {
            return read(&self.shared.patterns).get(channel).is_some();
        }
        read(self.shard(channel)).contains_key(channel)
    }

    /// Every channel and pattern with a local subscriber.
    pub fn channels(&self) -> Vec<Arc<str>> {
        let mut channels: Vec<Arc<str>> = self
            .shared
            .shards
            .iter()
            .flat_map(|shard| read(shard).keys().cloned().collect::<Vec<_>>())
            .collect();
        channels.extend(read(&self.shared.patterns).names().cloned());
        channels
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

/// The outbox key of a pattern subscription's delivery on one channel:
/// conflation and the queue policies then act per concrete channel. The top
/// bit keeps these apart from the keys of exact subscriptions.
fn pattern_delivery_key(subscription: ChannelKey, channel_hash: u32) -> ChannelKey {
    (1 << 63) | ((subscription & 0x7fff_ffff) << 32) | u64::from(channel_hash)
}

/// A join in progress (see [`Hub::begin_join`]). Dropped unfinished (the
/// read failed, or the connection went away meanwhile), it lets the channel go.
pub struct Join {
    hub: Hub,
    connection: ConnectionId,
    pub channel: Arc<str>,
    pub rule: HistoryRule,
    cursor: Arc<Mutex<Cursor>>,
    /// The cursor's last offset when the join paused it.
    paused_at: u64,
    /// Whether the cursor had read the store before.
    synced: bool,
    finished: bool,
}

impl Join {
    /// Where the join's read of the stream starts, and how many entries it
    /// takes: enough for the client's recovery and for the cursor to catch up.
    pub fn read_range(&self, since: Option<&Since>) -> (u64, usize) {
        let count = self.rule.recover_max as usize + 1;
        match (since, self.synced) {
            (Some(since), true) => (since.offset.min(self.paused_at).saturating_add(1), count),
            (Some(since), false) => (since.offset.saturating_add(1), count),
            (None, true) => (self.paused_at + 1, count),
            // Only the position is needed.
            (None, false) => (1, 0),
        }
    }
}

impl Drop for Join {
    fn drop(&mut self) {
        if !self.finished {
            self.hub.clone().abort_join(self);
        }
    }
}

/// A join with its read of the stream, ready for [`Hub::finish_joins`].
pub struct JoinRead {
    pub join: Join,
    pub since: Option<Since>,
    pub snapshot: Snapshot,
}

/// What a finished join gives the subscribe reply.
#[derive(Debug)]
pub struct JoinOutcome {
    pub channel: Arc<str>,
    pub key: ChannelKey,
    /// The channel's epoch (empty while it has no history) and top offset.
    pub epoch: Arc<str>,
    pub offset: u64,
    /// For a join with `since`: whether it was recovered, or why not.
    pub recovered: Option<Result<(), Unrecoverable>>,
}

/// Writes a cursor's decisions into the channel's subscribers' outboxes. The
/// subscriber list is read once per step, under the cursor's lock, so a join
/// (which adds its subscriber under that lock) is either wholly before or
/// wholly after the step.
struct HubSink<'a> {
    hub: &'a Hub,
    channel: &'a str,
    policy: DeliveryPolicy,
    subscribers: Option<Arc<Vec<Subscriber>>>,
}

impl<'a> HubSink<'a> {
    fn new(hub: &'a Hub, channel: &'a str, policy: DeliveryPolicy) -> HubSink<'a> {
        HubSink {
            hub,
            channel,
            policy,
            subscribers: None,
        }
    }

    fn subscribers(&mut self) -> Arc<Vec<Subscriber>> {
        self.subscribers
            .get_or_insert_with(|| {
                read(self.hub.shard(self.channel))
                    .get(self.channel)
                    .map(|entry| entry.subscribers.clone())
                    .unwrap_or_default()
            })
            .clone()
    }
}

impl Sink for HubSink<'_> {
    fn deliver(&mut self, epoch: &Arc<str>, offset: u64, payload: &Bytes) {
        let subscribers = self.subscribers();
        if subscribers.is_empty() {
            return;
        }
        if protocol::split_from(payload).1.len() > self.hub.shared.max_publish_bytes {
            // The cursor moves past it: a fill would fetch it again.
            self.hub
                .shared
                .metrics
                .message_dropped("too_large", Some(self.policy.slow));
            return;
        }
        let frame = protocol::encode_sequenced(self.channel, payload, offset, epoch);
        self.hub
            .shared
            .fanout
            .push(&subscribers, &frame, &self.policy);
    }

    fn gap(&mut self) {
        tracing::info!(
            channel = self.channel,
            "history channel lost messages for good: gap"
        );
        let subscribers = self.subscribers();
        let channels = [self.channel.to_owned()];
        let frame = protocol::ServerFrame::Gap {
            channels: &channels,
        }
        .encode();
        for subscriber in subscribers.iter() {
            subscriber.outbox.push_reply(frame.clone());
        }
        self.hub
            .shared
            .metrics
            .gap_notices(subscribers.len() as u64);
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
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
    use crate::session::outbox::QueueLimits;

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
    fn a_parallel_fan_out_keeps_every_connection_in_order() {
        let mut config = Config::default();
        config.server.fanout_threads = 4;
        let hub = Hub::new(&config, Metrics::new("test"), false);
        let outboxes: Vec<Arc<Outbox>> = (0..fanout::PARALLEL_MIN_SUBSCRIBERS as u64 + 7)
            .map(|id| {
                let outbox = Arc::new(Outbox::new(
                    QueueLimits {
                        messages: 1024,
                        bytes: 1 << 20,
                    },
                    u64::MAX,
                    Metrics::new("test"),
                ));
                hub.subscribe(id, &outbox, "news");
                outbox
            })
            .collect();
        let messages = 50;
        for seq in 0..messages {
            assert_eq!(
                hub.deliver("news", format!("{seq}").as_bytes()),
                outboxes.len()
            );
        }
        let expected: Vec<Bytes> = (0..messages)
            .map(|seq| protocol::encode_message("news", format!("{seq}").as_bytes()))
            .collect();
        for outbox in &outboxes {
            let mut frames = Vec::new();
            outbox.drain(&mut frames, usize::MAX, tokio::time::Instant::now());
            assert_eq!(frames, expected);
        }
    }

    #[test]
    fn a_resubscribe_is_a_new_subscription_for_conflation() {
        let mut config = Config::default();
        config.channels.push(crate::config::ChannelRule {
            pattern: "prices.*".into(),
            policy: crate::config::SlowPolicy::Conflate,
            ..Default::default()
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
