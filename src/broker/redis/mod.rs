//! The Redis brokers: standalone Redis (`SUBSCRIBE`/`PUBLISH`) and Redis
//! Cluster (sharded pub/sub, `SSUBSCRIBE`/`SPUBLISH`). The only module that
//! speaks Redis.
//!
//! Each node holds one RESP3 connection (one per shard in cluster mode) on which
//! it subscribes to exactly the channels its local clients hold, and publishes.
//! Messages arrive as RESP3 pushes and are handed to [`Hub::deliver`] inside the
//! push callback, which only pushes into bounded outboxes: the Redis reader
//! never waits on a client, so Redis's output buffer limit is never approached
//! because of a slow client.
//!
//! A supervisor task owns the connection's life:
//! - it reconciles subscriptions with the hub: channels whose first local
//!   subscriber arrived or whose last one left since it last looked are
//!   subscribed or unsubscribed in batches, each decided from the hub's state at
//!   that moment, so racing joins and leaves converge on the truth;
//! - it publishes a probe to a node-specific channel every `probe_interval` and
//!   reconnects when the probe does not come back within `probe_timeout`, which
//!   catches connections that look healthy but no longer receive;
//! - on any loss it reconnects with exponential backoff and jitter, resubscribes
//!   every channel that still has local subscribers, and sends those
//!   subscribers a `gap` frame: delivery is at most once across an outage.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, ProtocolVersion, PushInfo, PushKind, RedisError, Value};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, warn};

use crate::broker::{Broker, BrokerError, BrokerFuture};
use crate::config::{BrokerConfig, BrokerKind, ConfigError};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The link is down: subscribes are accepted at once and take effect (with a
/// `gap`) when it comes back.
const DOWN: u8 = 0;
/// Connected and resubscribing: new subscribes wait for their confirmation.
const RESUBSCRIBING: u8 = 1;
/// Connected and subscribed.
const UP: u8 = 2;

/// How many subscribe commands are in flight at once during a (re)subscribe.
const SUBSCRIBE_BATCH: usize = 500;

/// Checks the broker URLs without connecting.
pub fn check_config(config: &BrokerConfig) -> Result<(), ConfigError> {
    match config.kind {
        BrokerKind::Memory => Ok(()),
        BrokerKind::Redis => {
            let url = config.url.as_ref().ok_or_else(|| {
                ConfigError::invalid("broker.url", "is required when broker.kind = \"redis\"")
            })?;
            client_for(url.expose()).map(|_| ())
        }
        BrokerKind::RedisCluster => {
            if config.cluster_urls.is_empty() {
                return Err(ConfigError::invalid(
                    "broker.cluster_urls",
                    "must list at least one seed node when broker.kind = \"redis-cluster\"",
                ));
            }
            cluster_client(config).map(|_| ())
        }
    }
}

fn client_for(url: &str) -> Result<redis::Client, ConfigError> {
    let client = redis::Client::open(url).map_err(|e| {
        ConfigError::invalid(
            "broker.url",
            format!("not a valid redis://, rediss:// or unix:// URL: {e}"),
        )
    })?;
    let info = client.get_connection_info().clone();
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    redis::Client::open(info.set_redis_settings(settings))
        .map_err(|e| ConfigError::invalid("broker.url", e.to_string()))
}

fn cluster_client(config: &BrokerConfig) -> Result<ClusterClientParts, ConfigError> {
    let mut seeds = Vec::new();
    for url in &config.cluster_urls {
        let info = redis::Client::open(url.expose())
            .map_err(|e| {
                ConfigError::invalid(
                    "broker.cluster_urls",
                    format!("not a valid redis:// or rediss:// URL: {e}"),
                )
            })?
            .get_connection_info()
            .clone();
        seeds.push(info);
    }
    // Building the client checks that the seeds agree (credentials, TLS).
    redis::cluster::ClusterClientBuilder::new(seeds.clone())
        .build()
        .map_err(|e| ConfigError::invalid("broker.cluster_urls", e.to_string()))?;
    Ok(ClusterClientParts { seeds })
}

struct ClusterClientParts {
    seeds: Vec<redis::ConnectionInfo>,
}

/// A live connection of either kind. Both are cheap to clone handles onto one
/// multiplexed connection (per shard).
#[derive(Clone)]
enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn subscribe(&mut self, channels: Vec<String>) -> Result<(), RedisError> {
        self.change_subscriptions(true, channels).await
    }

    async fn unsubscribe(&mut self, channels: Vec<String>) -> Result<(), RedisError> {
        self.change_subscriptions(false, channels).await
    }

    /// (Un)subscribes in batches of [`SUBSCRIBE_BATCH`].
    async fn change_subscriptions(
        &mut self,
        subscribe: bool,
        channels: Vec<String>,
    ) -> Result<(), RedisError> {
        for chunk in channels.chunks(SUBSCRIBE_BATCH) {
            match self {
                Connection::Single(connection) if subscribe => connection.subscribe(chunk).await?,
                Connection::Single(connection) => connection.unsubscribe(chunk).await?,
                // One command per channel: a multi-channel SSUBSCRIBE must stay
                // in one slot. They are sent concurrently, so they pipeline.
                Connection::Cluster(connection) => {
                    let results = join_all(chunk.iter().map(|channel| {
                        let mut connection = connection.clone();
                        async move {
                            if subscribe {
                                connection.ssubscribe(channel).await
                            } else {
                                connection.sunsubscribe(channel).await
                            }
                        }
                    }))
                    .await;
                    results.into_iter().collect::<Result<Vec<()>, _>>()?;
                }
            }
        }
        Ok(())
    }

    async fn publish(&mut self, channel: &str, payload: &[u8]) -> Result<(), RedisError> {
        match self {
            Connection::Single(connection) => {
                redis::cmd("PUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async::<i64>(connection)
                    .await?;
            }
            Connection::Cluster(connection) => {
                redis::cmd("SPUBLISH")
                    .arg(channel)
                    .arg(payload)
                    .query_async::<i64>(connection)
                    .await?;
            }
        }
        Ok(())
    }
}

/// State shared by the broker handle, the supervisor and the push callback.
struct Shared {
    hub: Hub,
    metrics: Metrics,
    config: BrokerConfig,
    kind: BrokerKind,
    /// `broker.channel_prefix`.
    prefix: String,
    /// This node's probe channel. It contains `#`, which no client channel may,
    /// so no client can ever subscribe to it or make the node unsubscribe it.
    probe_channel: String,
    /// The connection to publish on, while connected.
    connection: Mutex<Option<Connection>>,
    /// [`DOWN`], [`RESUBSCRIBING`] or [`UP`].
    link: AtomicU8,
    /// Channels (client-visible names) confirmed subscribed at Redis.
    confirmed: Mutex<HashSet<Arc<str>>>,
    /// Bumped whenever `confirmed` or `connected` changes; subscribers wait on it.
    epoch: watch::Sender<u64>,
    /// Signalled by the push callback when the library reports a disconnection.
    lost: Notify,
    /// The generation of the newest connection reported lost; a wake-up for
    /// an older one (a permit left over from a replaced connection) is ignored.
    lost_generation: AtomicU64,
    /// Identifies the current connection (a new one is made after every loss,
    /// in cluster mode too), so that a late push from a replaced one is ignored.
    generation: AtomicU64,
    /// The sequence number of the last probe received.
    probe_seen: AtomicU64,
    /// Milliseconds since `started` at which the last probe was sent.
    probe_sent_ms: AtomicU64,
    started: Instant,
    shutdown: CancellationToken,
}

/// A handle to the Redis broker.
pub struct RedisBroker {
    shared: Arc<Shared>,
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisStartError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("Redis refused authentication: {0}")]
    Auth(String),
}

impl RedisBroker {
    /// Connects (or, when Redis is down, starts retrying in the background)
    /// and starts the supervisor. A malformed URL or refused authentication is
    /// an error; an unreachable Redis is not.
    pub async fn start(
        config: &BrokerConfig,
        node_id: &str,
        hub: Hub,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<RedisBroker, RedisStartError> {
        check_config(config)?;
        let shared = Arc::new(Shared {
            hub,
            metrics,
            config: config.clone(),
            kind: config.kind,
            prefix: config.channel_prefix.clone(),
            probe_channel: format!("{}herald#probe#{node_id}", config.channel_prefix),
            connection: Mutex::new(None),
            link: AtomicU8::new(DOWN),
            lost_generation: AtomicU64::new(0),
            confirmed: Mutex::new(HashSet::new()),
            epoch: watch::Sender::new(0),
            lost: Notify::new(),
            generation: AtomicU64::new(0),
            probe_seen: AtomicU64::new(0),
            probe_sent_ms: AtomicU64::new(0),
            started: Instant::now(),
            shutdown,
        });
        let first = match shared.connect().await {
            Ok(connection) => Some(connection),
            Err(error)
                if error.kind() == redis::ErrorKind::AuthenticationFailed
                    || is_auth_error(&error) =>
            {
                return Err(RedisStartError::Auth(error.to_string()));
            }
            Err(error) => {
                warn!(%error, "Redis is unreachable; starting anyway and retrying");
                None
            }
        };
        let span = tracing::info_span!("broker", node = %node_id);
        tokio::spawn(supervise(shared.clone(), first).instrument(span));
        Ok(RedisBroker { shared })
    }
}

fn is_auth_error(error: &RedisError) -> bool {
    matches!(error.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM"))
        || error.to_string().contains("WRONGPASS")
        || error.to_string().contains("NOAUTH")
}

impl Shared {
    fn lock_connection(&self) -> std::sync::MutexGuard<'_, Option<Connection>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_confirmed(&self) -> std::sync::MutexGuard<'_, HashSet<Arc<str>>> {
        self.confirmed.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn redis_channel(&self, channel: &str) -> String {
        format!("{}{channel}", self.prefix)
    }

    /// Opens a connection whose pushes feed the hub.
    async fn connect(self: &Arc<Self>) -> Result<Connection, RedisError> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let weak = Arc::downgrade(self);
        let on_push = move |push: PushInfo| -> Result<(), std::convert::Infallible> {
            if let Some(shared) = weak.upgrade() {
                shared.on_push(push, generation);
            }
            Ok(())
        };
        let timeout = self.config.command_timeout;
        match self.kind {
            BrokerKind::RedisCluster => {
                let parts = cluster_client(&self.config).map_err(|e| {
                    RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "cluster config",
                        e.to_string(),
                    ))
                })?;
                let client = redis::cluster::ClusterClientBuilder::new(parts.seeds)
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .push_sender(on_push)
                    .build()?;
                Ok(Connection::Cluster(client.get_async_connection().await?))
            }
            BrokerKind::Redis | BrokerKind::Memory => {
                let url = self.config.url.as_ref().expect("checked by check_config");
                let client = client_for(url.expose()).map_err(|e| {
                    RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "broker.url",
                        e.to_string(),
                    ))
                })?;
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_push_sender(on_push);
                Ok(Connection::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
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
                    self.metrics.broker_stale_push();
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
                if channel == self.probe_channel {
                    self.on_probe(payload);
                } else if let Some(channel) = channel.strip_prefix(self.prefix.as_str()) {
                    self.hub.deliver(channel, payload);
                }
            }
            PushKind::Disconnection => {
                // In cluster mode, any shard's loss means messages may have
                // been missed on it: the whole connection is rebuilt.
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
        self.metrics
            .broker_roundtrip(Duration::from_millis(now.saturating_sub(sent)));
    }

    fn set_link(&self, link: u8, connection: Option<Connection>) {
        *self.lock_connection() = connection;
        self.link.store(link, Ordering::SeqCst);
        self.metrics.broker_connected(link == UP);
        if link == DOWN {
            self.lock_confirmed().clear();
        }
        self.epoch.send_modify(|epoch| *epoch += 1);
    }

    /// Whether the connection with `generation` has been reported lost.
    fn is_lost(&self, generation: u64) -> bool {
        self.lost_generation.load(Ordering::SeqCst) >= generation
    }

    /// Subscribes the probe channel and every channel with local subscribers.
    async fn subscribe_all(
        &self,
        connection: &mut Connection,
    ) -> Result<Vec<Arc<str>>, RedisError> {
        // Everything wanted now is covered below; earlier changes need no replay.
        self.hub.take_dirty();
        let channels = self.hub.channels();
        let mut names: Vec<String> = channels.iter().map(|c| self.redis_channel(c)).collect();
        names.push(self.probe_channel.clone());
        let started = Instant::now();
        connection.subscribe(names).await?;
        self.metrics.broker_roundtrip(started.elapsed());
        self.lock_confirmed().extend(channels.iter().cloned());
        Ok(channels)
    }

    /// Brings Redis in line with the hub for the channels that changed.
    async fn reconcile(&self, connection: &mut Connection) -> Result<(), RedisError> {
        let dirty = self.hub.take_dirty();
        if dirty.is_empty() {
            return Ok(());
        }
        let mut subscribe = Vec::new();
        let mut unsubscribe = Vec::new();
        {
            let mut confirmed = self.lock_confirmed();
            for channel in dirty {
                let wanted = self.hub.has_subscribers(&channel);
                let have = confirmed.contains(&channel);
                if wanted && !have {
                    subscribe.push(channel);
                } else if !wanted && have {
                    // Forgotten before the command is sent, so that a client
                    // subscribing meanwhile waits for the next SUBSCRIBE.
                    confirmed.remove(&channel);
                    unsubscribe.push(channel);
                }
            }
        }
        let started = Instant::now();
        if !unsubscribe.is_empty() {
            let names = unsubscribe.iter().map(|c| self.redis_channel(c)).collect();
            connection.unsubscribe(names).await?;
        }
        if !subscribe.is_empty() {
            let names = subscribe.iter().map(|c| self.redis_channel(c)).collect();
            connection.subscribe(names).await?;
            self.lock_confirmed().extend(subscribe);
        }
        self.metrics.broker_roundtrip(started.elapsed());
        self.epoch.send_modify(|epoch| *epoch += 1);
        Ok(())
    }
}

/// Why the steady state ended.
enum Lost {
    Shutdown,
    Error(String),
}

async fn supervise(shared: Arc<Shared>, mut connection: Option<Connection>) {
    let config = shared.config.clone();
    let mut backoff = config.reconnect_min;
    let mut connected_before = false;
    let mut probe_sequence = 0u64;
    loop {
        // Connect and subscribe, retrying with backoff.
        let (mut live, channels) = loop {
            if shared.shutdown.is_cancelled() {
                return;
            }
            // Always a fresh connection (cluster client included), so that no
            // subscription the library still tracks from before a loss survives
            // unwanted: only what `subscribe_all` asks for is subscribed.
            let attempt = match connection.take() {
                Some(existing) => Ok(existing),
                None => shared.connect().await,
            };
            let result = match attempt {
                Ok(mut live) => {
                    shared.set_link(RESUBSCRIBING, Some(live.clone()));
                    match shared.subscribe_all(&mut live).await {
                        Ok(channels) => Ok((live, channels)),
                        Err(error) => Err(error),
                    }
                }
                Err(error) => Err(error),
            };
            match result {
                Ok(ok) => break ok,
                Err(error) => {
                    shared.set_link(DOWN, None);
                    // Interest changes while down need no replay: the next
                    // `subscribe_all` takes the hub's state as it is then.
                    // Dropping them keeps the set bounded during an outage.
                    shared.hub.take_dirty();
                    let wait = jitter(backoff);
                    warn!(%error, retry_in = ?wait, "Redis unavailable");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shared.shutdown.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(config.reconnect_max);
                }
            }
        };
        backoff = config.reconnect_min;
        let generation = shared.generation.load(Ordering::SeqCst);
        shared.set_link(UP, Some(live.clone()));
        // Clients subscribed while the node was not connected (an outage, or
        // before the first connection) may have missed messages.
        let notified = shared.hub.send_gap(&channels);
        shared.metrics.gap_notices(notified as u64);
        if connected_before {
            shared.metrics.broker_reconnected(channels.len() as u64);
            info!(
                channels = channels.len(),
                notified, "reconnected to Redis and resubscribed"
            );
        } else {
            info!(channels = channels.len(), notified, "connected to Redis");
        }
        connected_before = true;

        let lost = steady(&shared, &mut live, &mut probe_sequence, generation).await;
        shared.set_link(DOWN, None);
        drop(live);
        match lost {
            Lost::Shutdown => return,
            Lost::Error(reason) => warn!(%reason, "lost the Redis connection; reconnecting"),
        }
    }
}

/// Serves a healthy connection until it fails, the probe goes missing, or the
/// node shuts down.
async fn steady(
    shared: &Arc<Shared>,
    live: &mut Connection,
    probe_sequence: &mut u64,
    generation: u64,
) -> Lost {
    let config = &shared.config;
    let mut next_probe = Instant::now() + config.probe_interval;
    let mut probe_due: Option<(u64, Instant)> = None;
    loop {
        // Changes that arrived while (re)subscribing are applied first.
        if let Err(error) = shared.reconcile(live).await {
            return Lost::Error(format!("subscribe failed: {error}"));
        }
        let deadline = match probe_due {
            Some((_, due)) => due.min(next_probe),
            None => next_probe,
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => return Lost::Shutdown,
            _ = shared.lost.notified() => {
                if shared.is_lost(generation) {
                    return Lost::Error("connection closed".into());
                }
            }
            _ = shared.hub.interest_changed() => {}
            _ = tokio::time::sleep_until(deadline) => {
                let now = Instant::now();
                if let Some((sequence, due)) = probe_due {
                    if shared.probe_seen.load(Ordering::SeqCst) >= sequence {
                        probe_due = None;
                    } else if now >= due {
                        shared.metrics.broker_probe_failed();
                        return Lost::Error(format!(
                            "probe {sequence} not received within {:?}",
                            config.probe_timeout
                        ));
                    }
                }
                if now >= next_probe {
                    next_probe = now + config.probe_interval;
                    if probe_due.is_none() {
                        *probe_sequence += 1;
                        shared
                            .probe_sent_ms
                            .store(shared.started.elapsed().as_millis() as u64, Ordering::SeqCst);
                        let payload = probe_sequence.to_string();
                        debug!(sequence = *probe_sequence, "probe sent");
                        if let Err(error) = live.publish(&shared.probe_channel, payload.as_bytes()).await {
                            shared.metrics.broker_probe_failed();
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

impl Broker for RedisBroker {
    fn publish<'a>(&'a self, channel: &'a str, payload: Bytes) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let connection = self.shared.lock_connection().clone();
            let Some(mut connection) = connection else {
                return Err(BrokerError::Unavailable("not connected to Redis".into()));
            };
            connection
                .publish(&self.shared.redis_channel(channel), &payload)
                .await
                .map_err(|e| BrokerError::Unavailable(e.to_string()))
        })
    }

    fn ensure_subscribed<'a>(&'a self, channels: &'a [Arc<str>]) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let shared = &self.shared;
            let mut epoch = shared.epoch.subscribe();
            let deadline = Instant::now() + shared.config.subscribe_timeout;
            loop {
                epoch.borrow_and_update();
                if shared.link.load(Ordering::SeqCst) == DOWN {
                    // Accepted now; takes effect when the node reconnects,
                    // followed by a gap frame.
                    return Ok(());
                }
                {
                    let confirmed = shared.lock_confirmed();
                    if channels.iter().all(|channel| confirmed.contains(channel)) {
                        return Ok(());
                    }
                }
                match tokio::time::timeout_at(deadline, epoch.changed()).await {
                    Ok(Ok(())) => continue,
                    _ => {
                        return Err(BrokerError::Unavailable(
                            "Redis did not confirm the subscription in time".into(),
                        ));
                    }
                }
            }
        })
    }

    fn is_ready(&self) -> bool {
        !self.shared.config.readiness_requires_broker
            || self.shared.link.load(Ordering::SeqCst) == UP
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::outbox::{Outbox, QueueLimits};

    fn shared(hub: Hub, metrics: Metrics) -> Arc<Shared> {
        let mut config = BrokerConfig::default();
        config.kind = BrokerKind::Redis;
        config.url = Some(crate::config::RedisUrl::new("redis://127.0.0.1:1"));
        Arc::new(Shared {
            hub,
            metrics,
            kind: config.kind,
            prefix: String::new(),
            probe_channel: "herald#probe#test".into(),
            connection: Mutex::new(None),
            link: AtomicU8::new(UP),
            confirmed: Mutex::new(HashSet::new()),
            epoch: watch::Sender::new(0),
            lost: Notify::new(),
            lost_generation: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            probe_seen: AtomicU64::new(0),
            probe_sent_ms: AtomicU64::new(0),
            started: Instant::now(),
            shutdown: CancellationToken::new(),
            config,
        })
    }

    fn message(channel: &str, payload: &str) -> PushInfo {
        PushInfo {
            kind: PushKind::Message,
            data: vec![
                Value::BulkString(channel.as_bytes().to_vec()),
                Value::BulkString(payload.as_bytes().to_vec()),
            ],
        }
    }

    #[tokio::test]
    async fn pushes_from_a_replaced_connection_are_dropped() {
        let metrics = Metrics::new("test");
        let hub = Hub::new(&Config::default(), metrics.clone(), true);
        let outbox = Arc::new(Outbox::new(
            QueueLimits {
                messages: 16,
                bytes: 1 << 20,
            },
            u64::MAX,
            metrics.clone(),
        ));
        hub.subscribe(1, &outbox, "news");
        let shared = shared(hub, metrics.clone());
        shared.generation.store(2, Ordering::SeqCst);
        shared.on_push(message("news", "\"old\""), 1);
        shared.on_push(message("news", "\"new\""), 2);
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
}
