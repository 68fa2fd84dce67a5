//! herald: a horizontally scalable pub/sub push gateway.
//!
//! Backends publish to channels (through a broker or `POST /api/publish`);
//! WebSocket clients authenticated by JWT subscribe and receive every message.
//!
//! A tour of the crate, outside in:
//! - [`config`]: typed, defaulted, validated configuration; the only reader of the environment.
//! - [`transport`]: the accept loop, TLS and the HTTP routes; auth and admission before any upgrade.
//! - [`auth`]: JWT to [`auth::Principal`], with keys from a secret, a PEM file or a JWKS.
//! - [`session`]: one WebSocket connection: the protocol state machine, the reader and writer
//!   around a [`session::outbox::Outbox`], the frame reader and the write batch.
//! - [`hub`]: channel to local subscribers; encodes each message once; drives broker interest.
//! - [`broker`]: the [`broker::Broker`] trait and its implementations.
//! - [`protocol`]: client requests, server frames, close and error codes; pure.
//! - [`channel`]: channel names and glob patterns; pure.
//! - [`metrics`]: the only module that touches prometheus.
//! - [`shutdown`]: signals and the drain.
//! - [`history`] and [`presence`]: message history and recovery; who is subscribed.
//!
//! [`run`] takes a bound listener, a configuration and a shutdown future, so
//! tests start nodes on `127.0.0.1:0` and stop them at will.

#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod channel;
pub mod config;
#[doc(hidden)]
pub mod fuzzing;
pub mod history;
pub mod hub;
pub mod metrics;
pub mod presence;
pub mod protocol;
mod rate;
pub mod session;
pub mod shutdown;
pub mod transport;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info};

use crate::auth::Authenticator;
use crate::broker::Broker;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::config::{BrokerKind, Config, ConfigError};
use crate::hub::{ConnectionId, Hub};
use crate::metrics::Metrics;
use crate::session::outbox::Outbox;
use crate::transport::admission::Admission;

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Broker(#[from] crate::broker::redis::RedisStartError),
}

/// A running node's shared state; cheap to clone.
pub(crate) type Node = Arc<NodeState>;

pub(crate) struct NodeState {
    /// `node.id`, in logs, metrics and welcome frames.
    id: Arc<str>,
    config: Config,
    auth: Authenticator,
    hub: Hub,
    broker: Arc<dyn Broker>,
    metrics: Metrics,
    /// Set when the drain starts: `/readyz` fails and upgrades are refused.
    draining: AtomicBool,
    next_connection_id: AtomicU64,
    /// Origin, connection-count and connection-rate checks for upgrades.
    admission: Admission,
    /// Cancelled when the paced part of the drain is over (or skipped): every
    /// remaining connection closes at once, the listener closes and the broker
    /// stops.
    shutdown: CancellationToken,
    /// What every session's writer reads: pings, timeouts, the shutdown.
    writer: Arc<session::connection::WriterSettings>,
    /// Every open WebSocket session's outbox, so that the drain can close them
    /// one by one. Bounded by `limits.max_connections`.
    sessions: std::sync::Mutex<std::collections::HashMap<ConnectionId, Arc<Outbox>>>,
    /// Every HTTP connection and WebSocket session, for the drain.
    tracker: TaskTracker,
    /// The TLS acceptor, when `server.tls` is set.
    tls: Option<Arc<transport::tls::Tls>>,
    /// One permit per open HTTP connection not yet upgraded
    /// (`server.max_http_connections`).
    http_slots: Arc<tokio::sync::Semaphore>,
}

impl NodeState {
    pub(crate) fn next_connection_id(&self) -> ConnectionId {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Checks what only the components can: key files, algorithms, grant
/// templates, Redis URLs, CIDRs and Origin rules, by building each component
/// without starting it. [`Config::load`] checks the rest. The binary calls both
/// before binding, so a bad value exits 64 naming its key.
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    Authenticator::from_config(&config.auth)?;
    Admission::from_config(config)?;
    crate::broker::redis::check_config(&config.broker)?;
    if let Some(tls) = &config.server.tls {
        transport::tls::Tls::new(tls, Metrics::new("check"))?;
    }
    Ok(())
}

async fn start(config: Config) -> Result<Node, StartError> {
    let id: Arc<str> = config.node_id().into();
    let auth = Authenticator::from_config(&config.auth)?;
    let metrics = Metrics::new(&id);
    let shutdown = CancellationToken::new();
    auth.spawn_refresher(metrics.clone(), shutdown.clone());
    let tls = match &config.server.tls {
        Some(tls_config) => {
            let tls = Arc::new(transport::tls::Tls::new(tls_config, metrics.clone())?);
            tokio::spawn(tls.clone().watch(shutdown.clone()));
            Some(tls)
        }
        None => None,
    };
    let (hub, broker): (Hub, Arc<dyn Broker>) = match config.broker.kind {
        BrokerKind::Memory => {
            let hub = Hub::new(&config, metrics.clone(), false);
            metrics.broker_connected(true);
            (hub.clone(), Arc::new(MemoryBroker::new(hub)))
        }
        BrokerKind::Redis | BrokerKind::RedisCluster | BrokerKind::RedisSentinel => {
            // rediss:// needs a process-wide TLS crypto provider; a second
            // install (another node in this process) is harmless.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let hub = Hub::new(&config, metrics.clone(), true);
            let library = config
                .channels
                .iter()
                .any(|rule| history::HistoryRule::from_config(rule).is_some() || rule.presence)
                .then(|| {
                    history::function::library(
                        &config,
                        config.broker.kind == BrokerKind::RedisCluster,
                    )
                });
            let broker = RedisBroker::start(
                &config.broker,
                library,
                config.presence.ttl,
                &id,
                hub.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await?;
            (hub, Arc::new(broker))
        }
    };
    if config.channels.iter().any(|rule| rule.presence) {
        tokio::spawn(presence::heartbeat(
            hub.clone(),
            broker.clone(),
            config.presence.heartbeat_interval,
            shutdown.clone(),
        ));
    }
    tokio::spawn(history::filler::run(
        hub.clone(),
        broker.clone(),
        config.broker.history_check_interval,
        shutdown.clone(),
    ));
    let writer = Arc::new(session::connection::WriterSettings {
        ping_interval: config.ping.interval,
        ping_timeout: config.ping.timeout,
        write_timeout: config.limits.write_timeout,
        shutdown: shutdown.clone(),
        metrics: metrics.clone(),
    });
    Ok(Arc::new(NodeState {
        id,
        auth,
        hub,
        broker,
        metrics,
        writer,
        draining: AtomicBool::new(false),
        next_connection_id: AtomicU64::new(1),
        admission: Admission::from_config(&config)?,
        shutdown,
        tracker: TaskTracker::new(),
        sessions: Default::default(),
        tls: tls.clone(),
        http_slots: Arc::new(tokio::sync::Semaphore::new(
            config.server.max_http_connections,
        )),
        config,
    }))
}

/// Runs a node on `listener` until `shutdown` resolves, then drains (paced
/// over `shutdown.drain_period`, within `shutdown.timeout`) and returns.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    run_with_hurry(listener, config, shutdown, std::future::pending()).await
}

/// Like [`run`]; `hurry` resolving during the drain (a second signal) skips
/// the pacing and closes every connection at once.
pub async fn run_with_hurry(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
    hurry: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let span = tracing::info_span!("node", node = %config.node_id());
    async move {
        let node = start(config).await?;
        let address = listener.local_addr().ok();
        let accept =
            tokio::spawn(transport::server::accept_loop(listener, node.clone()).in_current_span());
        if node.config.server.demo_feed_enabled() {
            tokio::spawn(transport::demo::feed(node.clone()).in_current_span());
        }
        info!(?address, broker = ?node.config.broker.kind, "herald is listening");
        shutdown.await;
        shutdown::drain(&node, hurry).await;
        accept.abort();
        Ok(())
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::RedisUrl;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// Loads like the binary does: the configuration, then its components.
    fn load(
        file: Option<&std::path::Path>,
        env: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let config = Config::load_with_env(file, env)?;
        check_config(&config)?;
        Ok(config)
    }

    #[test]
    fn redis_urls_are_checked_and_redacted() {
        let base = [
            ("HERALD_AUTH__HMAC_SECRET", SECRET),
            ("HERALD_BROKER__KIND", "redis"),
        ];
        let err = load(None, env(&base)).unwrap_err().to_string();
        assert!(err.contains("broker.url"), "{err}");
        let mut bad = base.to_vec();
        bad.push(("HERALD_BROKER__URL", "http://nope"));
        let err = load(None, env(&bad)).unwrap_err().to_string();
        assert!(err.contains("broker.url"), "{err}");
        let mut good = base.to_vec();
        good.push((
            "HERALD_BROKER__URL",
            "redis://app:hunter2@redis.internal:6380/2",
        ));
        let config = load(None, env(&good)).unwrap();
        let text = config.to_redacted_toml();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(
            text.contains("redis://<redacted>@redis.internal:6380/2"),
            "{text}"
        );
        let socket = RedisUrl::new("unix:///run/redis.sock?db=1&pass=hunter2");
        assert_eq!(
            socket.redacted(),
            "unix:///run/redis.sock?db=1&pass=<redacted>"
        );
        let cluster = [
            ("HERALD_AUTH__HMAC_SECRET", SECRET),
            ("HERALD_BROKER__KIND", "redis-cluster"),
            (
                "HERALD_BROKER__CLUSTER_URLS",
                "redis://a:7000,redis://b:7001",
            ),
        ];
        let config = load(None, env(&cluster)).unwrap();
        assert_eq!(config.broker.cluster_urls.len(), 2);
    }

    #[test]
    fn invalid_values_name_their_key() {
        let check = |pairs: &[(&str, &str)], key: &str| {
            let mut all = vec![("HERALD_AUTH__HMAC_SECRET", SECRET)];
            all.extend_from_slice(pairs);
            let err = load(None, env(&all)).unwrap_err().to_string();
            assert!(err.contains(key), "expected {key} in {err}");
        };
        check(&[("HERALD_PING__INTERVAL", "0s")], "ping.interval");
        check(&[("HERALD_PING__TIMEOUT", "soon")], "ping.timeout");
        check(&[("HERALD_AUTH__HMAC_SECRET", "short")], "auth.hmac_secret");
        check(&[("HERALD_AUTH__ALGORITHMS", "none")], "auth.algorithms");
        check(&[("HERALD_API__KEY", "x")], "api.key");
        check(
            &[("HERALD_LIMITS__QUEUE_MESSAGES", "0")],
            "limits.queue_messages",
        );
        check(&[("HERALD_SERVER__LISTEN", "nowhere")], "server.listen");
    }
}
