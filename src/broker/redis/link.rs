//! One Redis connection that carries subscriptions: the unit of failure.
//!
//! Standalone Redis has one link for every channel. Redis Cluster has one link
//! per primary, carrying the shard channels of the slots that primary owns, so
//! that one shard's trouble touches only its own channels.
//!
//! A link's messages are delivered into the hub inside the push callback, which
//! the redis crate calls on the connection's own reader: nothing queues between
//! Redis and the bounded outboxes, and the reader never waits on a client.
//!
//! A supervisor task owns the link's life:
//! - it reconciles the link's subscriptions with the hub: channels whose first
//!   local subscriber arrived or whose last one left are (un)subscribed in
//!   batches, each decided from the hub's state at that moment, so racing joins
//!   and leaves converge on the truth;
//! - it publishes a probe to a node- and link-specific channel every
//!   `probe_interval` and rebuilds the connection when the probe does not come
//!   back within `probe_timeout`;
//! - on any loss (a disconnection, a missing probe, a failed command, or an
//!   unsubscribe Redis sent on its own, as it does for the channels of a slot a
//!   primary lost) it makes a fresh connection with backoff and jitter,
//!   subscribes exactly the channels it carries, and sends their subscribers a
//!   `gap` frame.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionInfo, PushInfo, PushKind, RedisError, Value};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cluster::Topology;
use super::sentinel::{self, Sentinel};
use crate::config::BrokerConfig;
use crate::history::{Position, Snapshot, function};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::Members;

/// The link is down: subscribes are accepted at once and take effect (with a
/// `gap`) when it comes back.
pub(super) const DOWN: u8 = 0;
/// Connected and resubscribing: new subscribes wait for their confirmation.
pub(super) const RESUBSCRIBING: u8 = 1;
/// Connected and subscribed.
pub(super) const UP: u8 = 2;

/// How many channels one batch of (un)subscribe commands covers.
const SUBSCRIBE_BATCH: usize = 500;

/// What every link of a node shares.
pub(super) struct Common {
    pub hub: Hub,
    pub metrics: Metrics,
    pub config: BrokerConfig,
    /// `broker.channel_prefix`.
    pub prefix: String,
    pub node_id: String,
    /// The `herald` Function library, when some channel has history or
    /// presence.
    pub library: Option<String>,
    /// `presence.ttl`.
    pub presence_ttl: Duration,
    pub shutdown: CancellationToken,
    /// Links in the UP state, and links that exist, for the metrics.
    pub links_up: AtomicI64,
    pub links: AtomicI64,
}

impl Common {
    pub fn redis_channel(&self, channel: &str) -> String {
        if channel.contains('*') {
            return format!("{}{channel}", self.redis_pattern_prefix());
        }
        format!("{}{channel}", self.prefix)
    }

    /// `broker.channel_prefix` with Redis's glob characters escaped, for
    /// `PSUBSCRIBE`. A client pattern's own characters need none: names
    /// allow only `*` of them.
    pub fn redis_pattern_prefix(&self) -> String {
        let mut escaped = String::with_capacity(self.prefix.len());
        for c in self.prefix.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
                escaped.push('\\');
            }
            escaped.push(c);
        }
        escaped
    }

    fn report_links(&self) {
        let up = self.links_up.load(Ordering::SeqCst);
        let total = self.links.load(Ordering::SeqCst);
        self.metrics.broker_links(up, total);
    }

    pub fn link_added(&self) {
        self.links.fetch_add(1, Ordering::SeqCst);
        self.report_links();
    }
}

/// Which channels a link carries.
pub(super) enum Scope {
    /// Standalone Redis: every channel, with `SUBSCRIBE`; interest changes
    /// come straight from the hub.
    Everything,
    /// One cluster primary: the channels whose slot it owns, with
    /// `SSUBSCRIBE`; interest changes are routed to it by the cluster.
    Shard(Shard),
}

pub(super) struct Shard {
    /// The primary's `host:port`, as the topology names it.
    pub address: Arc<str>,
    pub topology: Arc<Topology>,
    /// Channels routed to this link whose interest changed. Each appears once,
    /// so it is bounded by the channels with local subscribers, and it is
    /// emptied on every failed reconnect (the next resubscription reads the
    /// hub itself).
    pub dirty: Mutex<HashSet<Arc<str>>>,
    /// Channels that came to this shard from another one (a slot moved): their
    /// subscribers get a `gap` once this link confirms them.
    pub gap_due: Mutex<HashSet<Arc<str>>>,
    pub notify: Notify,
}

pub(super) struct Link {
    common: Arc<Common>,
    scope: Scope,
    /// Where to connect, with RESP3 set. With Sentinel, replaced by the
    /// primary's address before every connection attempt.
    target: Mutex<ConnectionInfo>,
    /// With `redis-sentinel`: where to ask for the primary.
    sentinel: Option<Sentinel>,
    /// With `redis-sentinel`: the `host:port` of the primary connected to.
    primary: Mutex<String>,
    /// The connection, while connected: publishes and probes use it too.
    connection: Mutex<Option<MultiplexedConnection>>,
    /// [`DOWN`], [`RESUBSCRIBING`] or [`UP`].
    state: AtomicU8,
    /// Channels (client-visible names) confirmed subscribed at Redis.
    confirmed: Mutex<HashSet<Arc<str>>>,
    /// Bumped whenever `confirmed` or `state` changes; subscribers wait on it.
    epoch: watch::Sender<u64>,
    /// Signalled by the push callback when the connection is lost.
    lost: Notify,
    /// The generation of the newest connection reported lost; a wake-up for an
    /// older one is ignored.
    lost_generation: AtomicU64,
    /// Identifies the current connection, so that a late push from a replaced
    /// one is ignored.
    generation: AtomicU64,
    /// The probe channel of the current connection (in cluster mode it must
    /// hash to a slot this primary owns, so it is chosen at each connect).
    probe_channel: Mutex<String>,
    /// The sequence number of the last probe received.
    probe_seen: AtomicU64,
    /// Milliseconds since `started` at which the last probe was sent.
    probe_sent_ms: AtomicU64,
    started: Instant,
    /// Cancelled when the node stops or the link is retired (its primary left
    /// the cluster topology).
    stop: CancellationToken,
}

/// A command a link runs for a caller; channels are Redis names.
pub(super) enum Command<'a> {
    /// `PUBLISH`, or `SPUBLISH` on a shard.
    Publish(&'a str, &'a [u8]),
    /// `FCALL herald_publish`.
    PublishHistory(&'a str, &'a [u8]),
    /// `FCALL_RO herald_read`, from an offset, at most a count of entries.
    ReadHistory(&'a str, u64, usize),
    /// `FCALL herald_presence` with this node's members (JSON).
    PresenceSync(&'a str, &'a str),
    /// The presence hash of a channel.
    PresenceRead(&'a str),
}

/// What a [`Command`] returns.
pub(super) enum Reply {
    Published(Option<Position>),
    Snapshot(Snapshot),
    Members(Members),
    Done,
}

/// A connection attempt that Redis refused for its credentials.
pub(super) fn is_auth_error(error: &RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || error.to_string().contains("WRONGPASS")
        || error.to_string().contains("NOAUTH")
}

/// A redirection: the command was not run because the slot lives elsewhere.
pub(super) fn is_redirect(error: &RedisError) -> bool {
    matches!(
        error.code(),
        Some("MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN")
    )
}

impl Link {
    pub fn new(
        common: Arc<Common>,
        scope: Scope,
        target: ConnectionInfo,
        sentinel: Option<Sentinel>,
    ) -> Arc<Link> {
        let stop = common.shutdown.child_token();
        common.link_added();
        Arc::new(Link {
            scope,
            target: Mutex::new(target),
            sentinel,
            primary: Mutex::new(String::new()),
            connection: Mutex::new(None),
            state: AtomicU8::new(DOWN),
            confirmed: Mutex::new(HashSet::new()),
            epoch: watch::Sender::new(0),
            lost: Notify::new(),
            lost_generation: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            probe_channel: Mutex::new(String::new()),
            probe_seen: AtomicU64::new(0),
            probe_sent_ms: AtomicU64::new(0),
            started: Instant::now(),
            stop,
            common,
        })
    }

    pub fn label(&self) -> String {
        match &self.scope {
            Scope::Everything if self.sentinel.is_some() => {
                format!("sentinel primary {}", lock(&self.primary))
            }
            Scope::Everything => "redis".to_owned(),
            Scope::Shard(shard) => shard.address.to_string(),
        }
    }

    fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_confirmed(&self) -> std::sync::MutexGuard<'_, HashSet<Arc<str>>> {
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    /// The connection, while the link is connected.
    pub fn connection(&self) -> Option<MultiplexedConnection> {
        self.lock_connection().clone()
    }

    /// Whether this link carries `channel` now.
    fn carries(&self, channel: &str) -> bool {
        match &self.scope {
            Scope::Everything => true,
            Scope::Shard(shard) => shard
                .topology
                .owner(&self.common.redis_channel(channel))
                .is_some_and(|owner| owner == shard.address),
        }
    }

    /// Stops the link for good: its primary left the topology.
    pub fn retire(&self) {
        self.stop.cancel();
    }

    /// Routes an interest change to this link (cluster mode).
    pub fn mark_dirty(&self, channel: Arc<str>, gap: bool) {
        if let Scope::Shard(shard) = &self.scope {
            if gap {
                lock(&shard.gap_due).insert(channel.clone());
            }
            lock(&shard.dirty).insert(channel);
            shard.notify.notify_one();
        }
    }

    fn take_dirty(&self) -> Vec<Arc<str>> {
        match &self.scope {
            Scope::Everything => self.common.hub.take_dirty(),
            Scope::Shard(shard) => lock(&shard.dirty).drain().collect(),
        }
    }

    async fn interest_changed(&self) {
        match &self.scope {
            Scope::Everything => self.common.hub.interest_changed().await,
            Scope::Shard(shard) => shard.notify.notified().await,
        }
    }

    /// Asks the cluster to read its topology again (a redirection, a lost
    /// slot, a primary that does not answer). Nothing in standalone mode.
    fn topology_suspect(&self) {
        if let Scope::Shard(shard) = &self.scope {
            shard.topology.request_refresh();
        }
    }

    /// Resolves when each of `channels` is confirmed, or the link is down
    /// (then they take effect with a `gap` when it comes back), or `deadline`
    /// passes.
    pub async fn wait_confirmed(&self, channels: &[Arc<str>], deadline: Instant) -> bool {
        let mut epoch = self.epoch.subscribe();
        loop {
            epoch.borrow_and_update();
            if self.state() == DOWN {
                return true;
            }
            {
                let confirmed = self.lock_confirmed();
                if channels.iter().all(|channel| confirmed.contains(channel)) {
                    return true;
                }
            }
            match tokio::time::timeout_at(deadline, epoch.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// Opens a connection whose pushes feed the hub.
    pub async fn connect(self: &Arc<Self>) -> Result<MultiplexedConnection, RedisError> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let weak: Weak<Link> = Arc::downgrade(self);
        let on_push = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            if let Some(link) = weak.upgrade() {
                link.on_push(push, generation);
            }
            Ok(())
        };
        let timeout = self.common.config.command_timeout;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_push_sender(on_push);
        if let Some(sentinel) = &self.sentinel {
            let (address, target) = sentinel.primary().await?;
            *lock(&self.target) = target;
            *lock(&self.primary) = address;
        }
        let target = lock(&self.target).clone();
        let client = redis::Client::open(target)?;
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        if self.sentinel.is_some() && !sentinel::is_primary(&mut connection).await? {
            return Err(RedisError::from((
                redis::ErrorKind::Io,
                "the node the Sentinels named is not a primary (yet)",
            )));
        }
        *lock(&self.probe_channel) = self.choose_probe_channel();
        Ok(connection)
    }

    /// This node's probe channel on this link. It contains `#`, which no client
    /// channel may, so no client can subscribe to it or make the node drop it.
    fn choose_probe_channel(&self) -> String {
        let base = format!("{}herald#probe#{}", self.common.prefix, self.common.node_id);
        match &self.scope {
            Scope::Everything => base,
            Scope::Shard(shard) => (0u32..100_000)
                .map(|i| format!("{base}#{{p{i}}}"))
                .find(|name| {
                    shard
                        .topology
                        .owner(name)
                        .is_some_and(|owner| owner == shard.address)
                })
                .unwrap_or(base),
        }
    }

    /// Runs on the connection's reader: must never block.
    fn on_push(&self, push: PushInfo, generation: u64) {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {
                // A replaced connection may still hand over what it had
                // buffered (after a stall clears, say): those messages would
                // arrive after the new connection's, duplicated and out of
                // order. The replacement's subscribers were sent a gap instead.
                if generation != self.generation.load(Ordering::SeqCst) {
                    self.common.metrics.broker_stale_push();
                    return;
                }
                let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
                    (push.data.first(), push.data.get(1))
                else {
                    return;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    return;
                };
                if *lock(&self.probe_channel) == channel {
                    self.on_probe(payload);
                } else if let Some(channel) = channel.strip_prefix(self.common.prefix.as_str()) {
                    self.common.hub.deliver(channel, payload);
                }
            }
            PushKind::PMessage => {
                if generation != self.generation.load(Ordering::SeqCst) {
                    self.common.metrics.broker_stale_push();
                    return;
                }
                let (
                    Some(Value::BulkString(pattern)),
                    Some(Value::BulkString(channel)),
                    Some(Value::BulkString(payload)),
                ) = (push.data.first(), push.data.get(1), push.data.get(2))
                else {
                    return;
                };
                let pattern = std::str::from_utf8(pattern)
                    .ok()
                    .and_then(|p| p.strip_prefix(self.common.redis_pattern_prefix().as_str()))
                    .map(str::to_owned);
                let channel = std::str::from_utf8(channel)
                    .ok()
                    .and_then(|c| c.strip_prefix(self.common.prefix.as_str()));
                if let (Some(pattern), Some(channel)) = (pattern, channel) {
                    self.common
                        .hub
                        .deliver_patterns(channel, payload, Some(&pattern));
                }
            }
            PushKind::Unsubscribe | PushKind::SUnsubscribe | PushKind::PUnsubscribe => {
                // The node forgets a channel before it unsubscribes, so a
                // channel still confirmed was unsubscribed by Redis itself: a
                // cluster primary that lost the channel's slot (a migration or
                // a failover). The channel would go silent for good. And the
                // redis crate may have taken this push for the reply to a
                // command in flight, so the connection's replies may now be
                // out of step: the link is rebuilt, and the topology re-read.
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    return;
                };
                let prefix = match push.kind {
                    PushKind::PUnsubscribe => self.common.redis_pattern_prefix(),
                    _ => self.common.prefix.clone(),
                };
                let Some(channel) = std::str::from_utf8(channel)
                    .ok()
                    .and_then(|c| c.strip_prefix(prefix.as_str()))
                else {
                    return;
                };
                if generation == self.generation.load(Ordering::SeqCst)
                    && self.lock_confirmed().contains(channel)
                {
                    warn!(
                        link = %self.label(),
                        channel,
                        "Redis unsubscribed a wanted channel on its own; rebuilding the link"
                    );
                    self.common.metrics.broker_unsolicited_unsubscribe();
                    self.topology_suspect();
                    self.lost_generation.fetch_max(generation, Ordering::SeqCst);
                    self.lost.notify_one();
                }
            }
            PushKind::Disconnection => {
                self.lost_generation.fetch_max(generation, Ordering::SeqCst);
                self.lost.notify_one();
            }
            _ => {}
        }
    }

    fn on_probe(&self, payload: &[u8]) {
        let Some(sequence) = std::str::from_utf8(payload)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        else {
            return;
        };
        self.probe_seen.fetch_max(sequence, Ordering::SeqCst);
        debug!(sequence, "probe received");
        let sent = self.probe_sent_ms.load(Ordering::SeqCst);
        let now = self.started.elapsed().as_millis() as u64;
        self.common
            .metrics
            .broker_roundtrip(Duration::from_millis(now.saturating_sub(sent)));
    }

    fn set_state(&self, state: u8, connection: Option<MultiplexedConnection>) {
        *self.lock_connection() = connection;
        let before = self.state.swap(state, Ordering::SeqCst);
        if (before == UP) != (state == UP) {
            let delta = if state == UP { 1 } else { -1 };
            self.common.links_up.fetch_add(delta, Ordering::SeqCst);
            self.common.report_links();
        }
        if state == DOWN {
            self.lock_confirmed().clear();
        }
        self.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Whether the connection with `generation` has been reported lost.
    fn is_lost(&self, generation: u64) -> bool {
        self.lost_generation.load(Ordering::SeqCst) >= generation
    }

    /// (Un)subscribes `channels` (Redis names), in batches.
    async fn change_subscriptions(
        &self,
        connection: &mut MultiplexedConnection,
        subscribe: bool,
        channels: Vec<String>,
    ) -> Result<(), RedisError> {
        for chunk in channels.chunks(SUBSCRIBE_BATCH) {
            let (patterns, channels): (Vec<&String>, Vec<&String>) =
                chunk.iter().partition(|name| self.is_pattern(name));
            match &self.scope {
                Scope::Everything if subscribe => {
                    if !channels.is_empty() {
                        connection.subscribe(channels).await?;
                    }
                    if !patterns.is_empty() {
                        connection.psubscribe(patterns).await?;
                    }
                }
                Scope::Everything => {
                    if !channels.is_empty() {
                        connection.unsubscribe(channels).await?;
                    }
                    if !patterns.is_empty() {
                        connection.punsubscribe(patterns).await?;
                    }
                }
                // One command per channel: the crate pairs a raw command with
                // exactly one reply, and a sharded (un)subscribe confirms each
                // channel with its own push. Sent concurrently, they pipeline.
                Scope::Shard(_) => {
                    let command = if subscribe {
                        "SSUBSCRIBE"
                    } else {
                        "SUNSUBSCRIBE"
                    };
                    let results = join_all(chunk.iter().map(|channel| {
                        let mut connection = connection.clone();
                        async move {
                            redis::cmd(command)
                                .arg(channel)
                                .query_async::<Value>(&mut connection)
                                .await
                        }
                    }))
                    .await;
                    for result in results {
                        if let Err(error) = result {
                            if is_redirect(&error) {
                                self.topology_suspect();
                            }
                            return Err(error);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether a Redis name is a client pattern's (the probe channel, whose
    /// name has no `*`, is not).
    fn is_pattern(&self, redis_name: &str) -> bool {
        redis_name[self.common.prefix.len().min(redis_name.len())..].contains('*')
    }

    /// Publishes on this link's connection: `PUBLISH`, or `SPUBLISH` on a
    /// shard. Never retried: after an I/O error Redis may have run it.
    pub async fn publish(
        &self,
        connection: &mut MultiplexedConnection,
        channel: &str,
        payload: &[u8],
    ) -> Result<(), RedisError> {
        let command = match self.scope {
            Scope::Everything => "PUBLISH",
            Scope::Shard(_) => "SPUBLISH",
        };
        redis::cmd(command)
            .arg(channel)
            .arg(payload)
            .query_async::<i64>(connection)
            .await?;
        Ok(())
    }

    /// Runs a command for a caller (the publish API, a history read).
    pub async fn run(
        &self,
        connection: &mut MultiplexedConnection,
        command: &Command<'_>,
    ) -> Result<Reply, RedisError> {
        match *command {
            Command::Publish(channel, payload) => self
                .publish(connection, channel, payload)
                .await
                .map(|()| Reply::Published(None)),
            Command::PublishHistory(channel, payload) => self
                .publish_history(connection, channel, payload)
                .await
                .map(Reply::Published),
            Command::ReadHistory(channel, from, count) => self
                .read_history(connection, channel, from, count)
                .await
                .map(Reply::Snapshot),
            Command::PresenceSync(channel, members) => {
                let ttl = self.common.presence_ttl.as_millis() as u64;
                redis::cmd("FCALL")
                    .arg(function::PRESENCE)
                    .arg(1)
                    .arg(channel)
                    .arg(&self.common.node_id)
                    .arg(members)
                    .arg(crate::presence::unix_ms())
                    .arg(ttl)
                    .query_async::<Value>(connection)
                    .await
                    .map(|_| Reply::Done)
            }
            Command::PresenceRead(channel) => {
                let fields: Vec<Vec<u8>> = redis::cmd("HVALS")
                    .arg(format!("{{{channel}}}:p"))
                    .query_async(connection)
                    .await?;
                Ok(Reply::Members(crate::presence::merge_fields(
                    fields.iter().map(Vec::as_slice),
                    crate::presence::unix_ms(),
                    self.common.presence_ttl,
                )))
            }
        }
    }

    /// Publishes on a history channel through `herald_publish`: appended to
    /// the stream and published with its offset, atomically. Never retried.
    pub async fn publish_history(
        &self,
        connection: &mut MultiplexedConnection,
        channel: &str,
        payload: &[u8],
    ) -> Result<Option<Position>, RedisError> {
        let (epoch, offset): (String, u64) = redis::cmd("FCALL")
            .arg(function::PUBLISH)
            .arg(1)
            .arg(channel)
            .arg(payload)
            .query_async(connection)
            .await?;
        Ok((offset > 0).then(|| Position {
            epoch: epoch.into(),
            offset,
        }))
    }

    /// Reads a history channel through `herald_read`.
    pub async fn read_history(
        &self,
        connection: &mut MultiplexedConnection,
        channel: &str,
        from: u64,
        count: usize,
    ) -> Result<Snapshot, RedisError> {
        let reply: Vec<Value> = redis::cmd("FCALL_RO")
            .arg(function::READ)
            .arg(1)
            .arg(channel)
            .arg(from)
            .arg(count)
            .query_async(connection)
            .await?;
        parse_snapshot(reply).ok_or_else(|| {
            RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "herald_read returned an unexpected reply",
            ))
        })
    }

    /// Loads the `herald` Function library, when some channel has history.
    /// A failure (Redis older than 7, an ACL without FUNCTION) is logged and
    /// counted, not fatal: plain channels keep working, and history publishes
    /// report the error to their callers.
    async fn load_library(&self, connection: &mut MultiplexedConnection) {
        let Some(library) = &self.common.library else {
            return;
        };
        let loaded: Result<Value, RedisError> = redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(library)
            .query_async(connection)
            .await;
        if let Err(error) = loaded {
            self.common.metrics.broker_function_load_failed();
            warn!(link = %self.label(), %error, "could not load the herald Redis Function library; history channels cannot be published");
        }
    }

    /// With Sentinel: whether the Sentinels now name another primary than the
    /// one connected to. A Sentinel that cannot be asked changes nothing.
    async fn primary_moved(&self) -> Option<String> {
        let sentinel = self.sentinel.as_ref()?;
        let (address, _) = sentinel.primary().await.ok()?;
        let current = lock(&self.primary).clone();
        (address != current)
            .then(|| format!("the Sentinels moved the primary from {current} to {address}"))
    }

    /// Subscribes the probe channel and every channel this link carries.
    async fn subscribe_all(
        &self,
        connection: &mut MultiplexedConnection,
    ) -> Result<Vec<Arc<str>>, RedisError> {
        // Everything wanted now is covered below; earlier changes need no replay.
        self.take_dirty();
        if let Scope::Shard(shard) = &self.scope {
            lock(&shard.gap_due).clear();
        }
        let channels: Vec<Arc<str>> = self
            .common
            .hub
            .channels()
            .into_iter()
            .filter(|channel| self.carries(channel))
            .collect();
        let mut names: Vec<String> = channels
            .iter()
            .map(|c| self.common.redis_channel(c))
            .collect();
        names.push(lock(&self.probe_channel).clone());
        self.load_library(connection).await;
        let started = Instant::now();
        self.change_subscriptions(connection, true, names).await?;
        self.common.metrics.broker_roundtrip(started.elapsed());
        self.lock_confirmed().extend(channels.iter().cloned());
        Ok(channels)
    }

    /// Brings Redis in line with the hub for the channels that changed.
    async fn reconcile(&self, connection: &mut MultiplexedConnection) -> Result<(), RedisError> {
        let dirty = self.take_dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        {
            let mut confirmed = self.lock_confirmed();
            for channel in dirty {
                let carried = self.carries(&channel);
                let wanted = carried && self.common.hub.has_subscribers(&channel);
                let have = confirmed.contains(&channel);
                if wanted && !have {
                    subscribe.push(channel);
                } else if !wanted && have {
                    // Forgotten before the command is sent, so that a client
                    // subscribing meanwhile waits for the next SUBSCRIBE.
                    confirmed.remove(&channel);
                    // A channel whose slot moved away was already dropped by
                    // Redis, and this primary would answer MOVED.
                    if carried {
                        unsubscribe.push(channel);
                    }
                }
            }
        }
        let started = Instant::now();
        if !unsubscribe.is_empty() {
            let names = unsubscribe
                .iter()
                .map(|c| self.common.redis_channel(c))
                .collect();
            self.change_subscriptions(connection, false, names).await?;
        }
        if !subscribe.is_empty() {
            let names = subscribe
                .iter()
                .map(|c| self.common.redis_channel(c))
                .collect();
            self.change_subscriptions(connection, true, names).await?;
            self.lock_confirmed().extend(subscribe.iter().cloned());
            if let Scope::Shard(shard) = &self.scope {
                let moved: Vec<Arc<str>> = {
                    let mut due = lock(&shard.gap_due);
                    subscribe
                        .iter()
                        .filter(|channel| due.remove(*channel))
                        .cloned()
                        .collect()
                };
                if !moved.is_empty() {
                    let notified = self.common.hub.lost(&moved);
                    self.common.metrics.gap_notices(notified as u64);
                }
            }
        }
        self.common.metrics.broker_roundtrip(started.elapsed());
        self.epoch.send_modify(|epoch| *epoch += 1);
        Ok(())
    }
}

/// Reads `herald_read`'s reply: `[epoch, top, offset, payload, ...]`.
fn parse_snapshot(reply: Vec<Value>) -> Option<Snapshot> {
    fn text(value: &Value) -> Option<&[u8]> {
        match value {
            Value::BulkString(bytes) => Some(bytes),
            Value::SimpleString(text) => Some(text.as_bytes()),
            _ => None,
        }
    }
    fn integer(value: &Value) -> Option<u64> {
        match value {
            Value::Int(n) => u64::try_from(*n).ok(),
            other => std::str::from_utf8(text(other)?).ok()?.parse().ok(),
        }
    }
    let mut values = reply.into_iter();
    let epoch = values.next()?;
    let epoch = text(&epoch)?;
    let top = integer(&values.next()?)?;
    if epoch.is_empty() {
        return Some(Snapshot::default());
    }
    let epoch = std::str::from_utf8(epoch).ok()?;
    let mut entries = Vec::new();
    while let Some(offset) = values.next() {
        let offset = integer(&offset)?;
        let payload = match values.next()? {
            Value::BulkString(bytes) => bytes::Bytes::from(bytes),
            _ => return None,
        };
        entries.push((offset, payload));
    }
    Some(Snapshot {
        epoch: Some(epoch.into()),
        top,
        entries,
    })
}

/// Locks a mutex whose data stays consistent across a panic.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the steady state ended.
enum Lost {
    Stopped,
    Error(String),
}

/// Runs a link until the node stops or the link is retired. `first` is a
/// connection made at startup, if any.
pub(super) async fn supervise(link: Arc<Link>, mut first: Option<MultiplexedConnection>) {
    let config = link.common.config.clone();
    let mut backoff = config.reconnect_min;
    let mut connected_before = false;
    let mut probe_sequence = 0u64;
    loop {
        // Connect and subscribe, retrying with backoff.
        let (mut live, channels) = loop {
            if link.stop.is_cancelled() {
                link.set_state(DOWN, None);
                return;
            }
            // Always a fresh connection, so that nothing subscribed before a
            // loss survives unwanted: only what `subscribe_all` asks for is.
            let attempt = match first.take() {
                Some(existing) => Ok(existing),
                None => link.connect().await,
            };
            let result = match attempt {
                Ok(mut live) => {
                    link.set_state(RESUBSCRIBING, Some(live.clone()));
                    link.subscribe_all(&mut live).await.map(|c| (live, c))
                }
                Err(error) => Err(error),
            };
            match result {
                Ok(ok) => break ok,
                Err(error) => {
                    link.set_state(DOWN, None);
                    // Interest changes while down need no replay: the next
                    // `subscribe_all` takes the hub's state as it is then.
                    // Dropping them keeps the set bounded during an outage.
                    link.take_dirty();
                    // A primary that does not answer may have been failed over.
                    link.topology_suspect();
                    let wait = jitter(backoff);
                    warn!(link = %link.label(), %error, retry_in = ?wait, "Redis unavailable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = link.stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(config.reconnect_max);
                }
            }
        };
        backoff = config.reconnect_min;
        let generation = link.generation.load(Ordering::SeqCst);
        link.set_state(UP, Some(live.clone()));
        // Clients subscribed while the link was not connected (an outage, or
        // before the first connection) may have missed messages.
        let notified = link.common.hub.lost(&channels);
        link.common.metrics.gap_notices(notified as u64);
        if connected_before {
            link.common
                .metrics
                .broker_reconnected(channels.len() as u64);
            info!(link = %link.label(), channels = channels.len(), notified, "reconnected to Redis and resubscribed");
        } else {
            info!(link = %link.label(), channels = channels.len(), notified, "connected to Redis");
        }
        connected_before = true;

        let lost = steady(&link, &mut live, &mut probe_sequence, generation).await;
        link.set_state(DOWN, None);
        drop(live);
        match lost {
            Lost::Stopped => return,
            Lost::Error(reason) => {
                warn!(link = %link.label(), %reason, "lost the Redis connection; reconnecting")
            }
        }
    }
}

/// Serves a healthy connection until it fails, the probe goes missing, or the
/// link stops.
async fn steady(
    link: &Arc<Link>,
    live: &mut MultiplexedConnection,
    probe_sequence: &mut u64,
    generation: u64,
) -> Lost {
    let config = &link.common.config;
    let mut next_probe = Instant::now() + config.probe_interval;
    let mut probe_due: Option<(u64, Instant)> = None;
    loop {
        if link.is_lost(generation) {
            return Lost::Error("connection closed".into());
        }
        // Changes that arrived while (re)subscribing are applied first.
        if let Err(error) = link.reconcile(live).await {
            return Lost::Error(format!("subscribe failed: {error}"));
        }
        let deadline = match probe_due {
            Some((_, due)) => due.min(next_probe),
            None => next_probe,
        };
        tokio::select! {
            _ = link.stop.cancelled() => return Lost::Stopped,
            _ = link.lost.notified() => {}
            _ = link.interest_changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if let Some((sequence, due)) = probe_due {
                    if link.probe_seen.load(Ordering::SeqCst) >= sequence {
                        probe_due = None;
                    } else if now >= due {
                        link.common.metrics.broker_probe_failed();
                        return Lost::Error(format!(
                            "probe {sequence} not received within {:?}",
                            config.probe_timeout
                        ));
                    }
                }
                if now >= next_probe {
                    next_probe = now + config.probe_interval;
                    if let Some(moved) = link.primary_moved().await {
                        return Lost::Error(moved);
                    }
                    if probe_due.is_none() {
                        *probe_sequence += 1;
                        link.probe_sent_ms
                            .store(link.started.elapsed().as_millis() as u64, Ordering::SeqCst);
                        let payload = probe_sequence.to_string();
                        let channel = lock(&link.probe_channel).clone();
                        debug!(sequence = *probe_sequence, "probe sent");
                        // A stalled connection does not answer the PUBLISH
                        // either: it is bounded by the probe timeout, not the
                        // (longer) command timeout, so that a stall is seen
                        // within probe_interval + probe_timeout.
                        let published = tokio::time::timeout(
                            config.probe_timeout,
                            link.publish(live, &channel, payload.as_bytes()),
                        )
                        .await;
                        let error = match published {
                            Ok(Ok(())) => None,
                            Ok(Err(error)) => {
                                if is_redirect(&error) {
                                    link.topology_suspect();
                                }
                                Some(error.to_string())
                            }
                            Err(_) => Some(format!(
                                "no reply within the probe timeout ({:?})",
                                config.probe_timeout
                            )),
                        };
                        if let Some(error) = error {
                            link.common.metrics.broker_probe_failed();
                            return Lost::Error(format!("probe publish failed: {error}"));
                        }
                        probe_due = Some((*probe_sequence, now + config.probe_timeout));
                    }
                }
            }
        }
    }
}

/// `base` scaled by a random factor in [0.5, 1.5).
fn jitter(base: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = getrandom::fill(&mut byte);
    base.mul_f64(0.5 + f64::from(byte[0]) / 256.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::session::outbox::{Outbox, QueueLimits};

    fn link(hub: Hub, metrics: Metrics) -> Arc<Link> {
        let common = Arc::new(Common {
            hub,
            metrics,
            config: BrokerConfig::default(),
            prefix: String::new(),
            node_id: "test".into(),
            library: None,
            presence_ttl: Duration::from_secs(30),
            shutdown: CancellationToken::new(),
            links_up: AtomicI64::new(0),
            links: AtomicI64::new(0),
        });
        let target = redis::Client::open("redis://127.0.0.1:1")
            .unwrap()
            .get_connection_info()
            .clone();
        Link::new(common, Scope::Everything, target, None)
    }

    fn push(kind: PushKind, channel: &str, payload: Value) -> PushInfo {
        PushInfo {
            kind,
            data: vec![Value::BulkString(channel.as_bytes().to_vec()), payload],
        }
    }

    fn outbox(metrics: &Metrics) -> Arc<Outbox> {
        Arc::new(Outbox::new(
            QueueLimits {
                messages: 16,
                bytes: 1 << 20,
            },
            u64::MAX,
            metrics.clone(),
        ))
    }

    #[tokio::test]
    async fn pushes_from_a_replaced_connection_are_dropped() {
        let metrics = Metrics::new("test");
        let hub = Hub::new(&Config::default(), metrics.clone(), true);
        let outbox = outbox(&metrics);
        hub.subscribe(1, &outbox, "news");
        let link = link(hub, metrics.clone());
        link.generation.store(2, Ordering::SeqCst);
        let message = |text: &str| Value::BulkString(text.as_bytes().to_vec());
        link.on_push(push(PushKind::Message, "news", message("\"old\"")), 1);
        link.on_push(push(PushKind::Message, "news", message("\"new\"")), 2);
        let mut frames = Vec::new();
        outbox.drain(&mut frames, usize::MAX, Instant::now());
        assert_eq!(frames.len(), 1);
        assert!(String::from_utf8_lossy(&frames[0]).contains("\"new\""));
        assert!(
            metrics
                .render()
                .contains("herald_broker_stale_pushes_total{node=\"test\"} 1")
        );
    }

    #[tokio::test]
    async fn an_unsolicited_unsubscribe_of_a_wanted_channel_is_a_loss() {
        let metrics = Metrics::new("test");
        let hub = Hub::new(&Config::default(), metrics.clone(), true);
        let link = link(hub, metrics.clone());
        link.generation.store(1, Ordering::SeqCst);
        link.lock_confirmed().insert("news".into());
        // An unsubscribe the node asked for: the channel was forgotten first.
        link.on_push(push(PushKind::SUnsubscribe, "sports", Value::Int(1)), 1);
        assert!(!link.is_lost(1));
        // One Redis sent on its own.
        link.on_push(push(PushKind::SUnsubscribe, "news", Value::Int(0)), 1);
        assert!(link.is_lost(1));
        assert!(
            metrics
                .render()
                .contains("herald_broker_unsolicited_unsubscribes_total{node=\"test\"} 1")
        );
    }
}
