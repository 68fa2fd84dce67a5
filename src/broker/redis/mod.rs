//! The Redis brokers: standalone Redis (`SUBSCRIBE`/`PUBLISH`) and Redis
//! Cluster (sharded pub/sub, `SSUBSCRIBE`/`SPUBLISH`). The only module that
//! speaks Redis.
//!
//! The unit of subscription and of failure is a [`link::Link`]: one RESP3
//! connection whose pushes are delivered into the hub inside the callback the
//! redis crate calls on that connection's reader, so the Redis reader never
//! waits on a client and nothing queues between Redis and the bounded outboxes.
//! Standalone Redis has one link; Redis Cluster has one per primary, routed by
//! hash slot ([`cluster`]).
//!
//! Delivery on a channel without history is at most once across an outage:
//! after any loss a link resubscribes and sends the affected subscribers a
//! `gap` frame. History channels are filled from their streams instead
//! ([`crate::history`]).

mod cluster;
mod link;
mod sentinel;

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use bytes::Bytes;
use redis::{ConnectionInfo, ProtocolVersion};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, warn};

use crate::broker::{Broker, BrokerError, BrokerFuture};
use crate::config::{BrokerConfig, BrokerKind, ConfigError};
use crate::history::{Position, Snapshot};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::presence::{Event, Members};
use cluster::Cluster;
use link::{Command, Common, Link, Reply, Scope};
use sentinel::Sentinel;

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
            cluster_seeds(config).map(|_| ())
        }
        BrokerKind::RedisSentinel => Sentinel::from_config(config).map(|_| ()),
    }
}

fn client_for(url: &str) -> Result<redis::Client, ConfigError> {
    let client = redis::Client::open(url).map_err(|e| {
        ConfigError::invalid(
            "broker.url",
            format!("not a valid redis://, rediss:// or unix:// URL: {e}"),
        )
    })?;
    redis::Client::open(resp3(client.get_connection_info().clone()))
        .map_err(|e| ConfigError::invalid("broker.url", e.to_string()))
}

/// The cluster's seed nodes, with RESP3 set.
fn cluster_seeds(config: &BrokerConfig) -> Result<Vec<ConnectionInfo>, ConfigError> {
    config
        .cluster_urls
        .iter()
        .map(|url| {
            let info = redis::Client::open(url.expose())
                .map_err(|e| {
                    ConfigError::invalid(
                        "broker.cluster_urls",
                        format!("not a valid redis:// or rediss:// URL: {e}"),
                    )
                })?
                .get_connection_info()
                .clone();
            Ok(resp3(info))
        })
        .collect()
}

fn resp3(info: ConnectionInfo) -> ConnectionInfo {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(ProtocolVersion::RESP3);
    info.set_redis_settings(settings)
}

/// A handle to the Redis broker.
pub struct RedisBroker {
    inner: Inner,
    common: Arc<Common>,
}

enum Inner {
    Standalone(Arc<Link>),
    Cluster(Arc<Cluster>),
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
    /// and starts the supervisors. A malformed URL or refused authentication
    /// is an error; an unreachable Redis is not.
    /// `library` is the `herald` Redis Function library
    /// ([`crate::history::function`]), loaded on every connection when some
    /// channel has history.
    pub async fn start(
        config: &BrokerConfig,
        library: Option<String>,
        presence_ttl: std::time::Duration,
        node_id: &str,
        hub: Hub,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<RedisBroker, RedisStartError> {
        check_config(config)?;
        let common = Arc::new(Common {
            hub,
            metrics,
            config: config.clone(),
            prefix: config.channel_prefix.clone(),
            node_id: node_id.to_owned(),
            library,
            presence_ttl,
            shutdown,
            links_up: AtomicI64::new(0),
            links: AtomicI64::new(0),
        });
        let span = tracing::info_span!("broker", node = %node_id);
        let inner = match config.kind {
            BrokerKind::RedisCluster => {
                let seeds = cluster_seeds(config)?;
                let cluster = Cluster::start(common.clone(), seeds)
                    .instrument(span)
                    .await
                    .map_err(|e| RedisStartError::Auth(e.to_string()))?;
                Inner::Cluster(cluster)
            }
            BrokerKind::Redis | BrokerKind::RedisSentinel | BrokerKind::Memory => {
                let (target, sentinel) = match config.kind {
                    BrokerKind::RedisSentinel => (
                        // Replaced by the primary the Sentinels name before each connect.
                        client_for("redis://127.0.0.1:6379")?
                            .get_connection_info()
                            .clone(),
                        Some(Sentinel::from_config(config)?),
                    ),
                    _ => {
                        let url = config.url.as_ref().expect("checked by check_config");
                        (
                            client_for(url.expose())?.get_connection_info().clone(),
                            None,
                        )
                    }
                };
                let link = Link::new(common.clone(), Scope::Everything, target, sentinel);
                let first = match link.connect().await {
                    Ok(connection) => Some(connection),
                    Err(error) if link::is_auth_error(&error) => {
                        return Err(RedisStartError::Auth(error.to_string()));
                    }
                    Err(error) => {
                        warn!(%error, "Redis is unreachable; starting anyway and retrying");
                        None
                    }
                };
                tokio::spawn(link::supervise(link.clone(), first).instrument(span));
                Inner::Standalone(link)
            }
        };
        Ok(RedisBroker { inner, common })
    }

    /// The link carrying `channel`, if one is known.
    fn link_for(&self, channel: &str) -> Option<Arc<Link>> {
        match &self.inner {
            Inner::Standalone(link) => Some(link.clone()),
            Inner::Cluster(cluster) => cluster.link_for(channel),
        }
    }
}

impl RedisBroker {
    /// Runs `command` on the connection that carries `channel`.
    async fn on_channel(&self, channel: &str, command: &Command<'_>) -> Result<Reply, BrokerError> {
        match &self.inner {
            Inner::Standalone(link) => {
                let Some(mut connection) = link.connection() else {
                    return Err(BrokerError::Unavailable("not connected to Redis".into()));
                };
                link.run(&mut connection, command)
                    .await
                    .map_err(|e| BrokerError::Unavailable(e.to_string()))
            }
            Inner::Cluster(cluster) => cluster
                .on_owner(channel, command)
                .await
                .map_err(BrokerError::Unavailable),
        }
    }
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BrokerFuture<'a, Option<Position>> {
        Box::pin(async move {
            let name = self.common.redis_channel(channel);
            let command = if self.common.hub.history_rule(channel).is_some() {
                Command::PublishHistory(&name, &payload)
            } else {
                Command::Publish(&name, &payload)
            };
            match self.on_channel(channel, &command).await? {
                Reply::Published(position) => Ok(position),
                _ => unreachable!("a publish replies with a position"),
            }
        })
    }

    fn read_history<'a>(
        &'a self,
        channel: &'a str,
        from: u64,
        count: usize,
    ) -> BrokerFuture<'a, Snapshot> {
        Box::pin(async move {
            let name = self.common.redis_channel(channel);
            let started = Instant::now();
            let reply = self
                .on_channel(channel, &Command::ReadHistory(&name, from, count))
                .await;
            self.common.metrics.history_fetch(started.elapsed());
            match reply? {
                Reply::Snapshot(snapshot) => Ok(snapshot),
                _ => unreachable!("a read replies with a snapshot"),
            }
        })
    }

    fn ensure_subscribed<'a>(&'a self, channels: &'a [Arc<str>]) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let deadline = Instant::now() + self.common.config.subscribe_timeout;
            for channel in channels {
                // A channel no link carries yet (the cluster topology is not
                // known) is accepted like one on a link that is down.
                let Some(link) = self.link_for(channel) else {
                    continue;
                };
                if !link
                    .wait_confirmed(std::slice::from_ref(channel), deadline)
                    .await
                {
                    return Err(BrokerError::Unavailable(
                        "Redis did not confirm the subscription in time".into(),
                    ));
                }
            }
            Ok(())
        })
    }

    fn presence_sync<'a>(
        &'a self,
        channel: &'a str,
        members: &'a Members,
        _change: Option<Event<'a>>,
    ) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let name = self.common.redis_channel(channel);
            let members: std::collections::BTreeMap<&str, u32> = members
                .iter()
                .map(|(user, count)| (&**user, *count))
                .collect();
            let members = serde_json::to_string(&members).expect("members serialize");
            let command = Command::PresenceSync(&name, &members);
            self.on_channel(channel, &command).await.map(|_| ())
        })
    }

    fn presence_read<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Members> {
        Box::pin(async move {
            let name = self.common.redis_channel(channel);
            match self
                .on_channel(channel, &Command::PresenceRead(&name))
                .await?
            {
                Reply::Members(members) => Ok(members),
                _ => unreachable!("a presence read replies with members"),
            }
        })
    }

    fn supports_patterns(&self) -> bool {
        matches!(self.inner, Inner::Standalone(_))
    }

    fn is_ready(&self) -> bool {
        if !self.common.config.readiness_requires_broker {
            return true;
        }
        match &self.inner {
            Inner::Standalone(link) => link.state() == link::UP,
            Inner::Cluster(cluster) => cluster.is_ready(),
        }
    }
}
