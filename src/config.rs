//! Typed, documented, defaulted configuration.
//!
//! Layers, later ones winning: built-in defaults, then a TOML file, then
//! environment variables `HERALD_<SECTION>__<KEY>` (for example
//! `HERALD_AUTH__HMAC_SECRET`). This is the only module that reads the
//! environment. Unknown keys are errors, and [`Config::load`] validates every
//! value before anything binds a port; `docs/configuration.md` lists each key.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, Serializer};

use crate::channel::Pattern;

/// The exit status for invalid configuration (`EX_USAGE`).
pub const EXIT_INVALID_CONFIG: i32 = 64;

/// The environment variable prefix.
pub const ENV_PREFIX: &str = "HERALD";

/// The longest timeout or interval accepted. The node adds each to the
/// clock, which overflows (a panic) about 292 billion years out.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// The most clock skew `auth.leeway` may allow.
const MAX_LEEWAY: Duration = Duration::from_secs(86_400);

/// The largest socket buffer option accepted (1 GiB): the kernel takes a C
/// int, and doubles `SO_SNDBUF`.
const MAX_SOCKET_OPTION_BYTES: usize = 1 << 30;

/// Keys whose environment value is a comma-separated list.
const LIST_KEYS: &[&str] = &[
    "auth.algorithms",
    "auth.user_channels",
    "auth.user_publish",
    "server.allowed_origins",
    "server.trusted_proxies",
    "broker.cluster_urls",
    "broker.sentinels",
];

/// Invalid configuration. The message names the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(#[from] config::ConfigError),
    #[error("{key}: {problem}")]
    Invalid { key: String, problem: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// A secret string: never printed by `Debug` or serialized in clear.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("<redacted>")
    }
}

/// The whole configuration of a node.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Identity of this node in logs, metrics and the welcome frame.
    pub node: NodeConfig,
    /// The HTTP/WebSocket listener.
    pub server: ServerConfig,
    /// How client JWTs are verified.
    pub auth: AuthConfig,
    /// The HTTP publish API.
    pub api: ApiConfig,
    /// Where messages come from and go to.
    pub broker: BrokerConfig,
    /// WebSocket keepalive.
    pub ping: PingConfig,
    /// Who is subscribed to presence channels, across nodes.
    pub presence: PresenceConfig,
    /// Graceful shutdown.
    pub shutdown: ShutdownConfig,
    /// Bounds on everything a client can make the node hold or do.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Delivery policies per channel pattern; the first matching rule wins.
    pub channels: Vec<ChannelRule>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id. Default: the `HOSTNAME` environment variable (the pod name on
    /// Kubernetes), else `herald-` and 8 random hex digits.
    pub id: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the one listener serving WebSockets, the API, health and metrics.
    pub listen: SocketAddr,
    /// How long a client may take to send the request headers.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Open HTTP connections that are not (yet) WebSockets: handshakes in
    /// progress, API calls, probes and scrapes. Beyond it a new connection gets
    /// a 503 and is closed. Upgraded connections count against
    /// `limits.max_connections` instead.
    pub max_http_connections: usize,
    /// How long a kept-alive HTTP connection may sit between requests before
    /// the node closes it.
    #[serde(with = "humantime_serde")]
    pub http_idle_timeout: Duration,
    /// Origins allowed to open WebSockets: `https://app.example.com`,
    /// `https://*.example.com` (subdomains at any depth) or `*`. Empty allows
    /// all. Requests without an Origin header (non-browser clients) are allowed.
    pub allowed_origins: Vec<String>,
    /// A header such as `x-forwarded-for` carrying the client IP, honoured only
    /// from `trusted_proxies`.
    pub trusted_proxy_header: Option<String>,
    /// Peers (IPs or CIDRs) whose `trusted_proxy_header` is believed.
    pub trusted_proxies: Vec<String>,
    /// `SO_SNDBUF` of every accepted socket, in bytes: the kernel's send
    /// buffer, which holds the bytes sent and not yet acknowledged plus those
    /// not sent yet. 0 leaves Linux's autotuning on, which grows it up to
    /// `net.ipv4.tcp_wmem`'s maximum (4 MiB by default). A fixed value turns
    /// autotuning off for the socket and caps its throughput at this many
    /// bytes per round trip.
    pub send_buffer_bytes: usize,
    /// `TCP_NOTSENT_LOWAT` of every accepted socket (Linux): the bytes the
    /// kernel may hold for a client that it has not sent yet. A client that
    /// stops reading closes its TCP window, so everything written to it is
    /// unsent: beyond this many bytes the socket stops taking writes, and
    /// the outbox limits and `limits.write_timeout` act within seconds
    /// instead of after megabytes. Bytes in flight are not limited, so
    /// throughput on long, fast links is not either. 0 leaves the kernel's
    /// default (`net.ipv4.tcp_notsent_lowat`, no limit unless set).
    pub max_unsent_bytes: usize,
    /// Threads a delivery to many local subscribers (2,048 or more) is split
    /// across; 0 means one per core, 1 keeps every delivery on the thread
    /// that received the message.
    pub fanout_threads: usize,
    /// On plain TCP, a message for a connection whose writer is idle and
    /// whose queue is empty is written at once by the fan-out, with one
    /// non-blocking write, instead of waking the writer. Off by default: it
    /// moves every write onto the publishing path, which under a slow-client
    /// attack on a saturated core made healthy clients' p99 20 times worse
    /// (BENCHMARKS.md, figure 10).
    pub direct_delivery: bool,
    /// Native TLS: when set, the listener serves HTTPS and `wss://` only.
    pub tls: Option<TlsConfig>,
    /// Serve the live demo page at `/` and mint demo tokens at `/demo/token`.
    /// Unset means the command's default: on in `herald dev`, off in
    /// `herald serve`. Anyone who can reach the node can then get a token for
    /// the demo channels, so production nodes leave it off.
    pub demo: Option<bool>,
    /// Publish made-up prices on `prices.<SYMBOL>` a few times a second, so
    /// that the demo's stock board moves without a backend. Unset means the
    /// command's default: on in `herald dev` (unless `--no-feed`), off in
    /// `herald serve`.
    pub demo_feed: Option<bool>,
}

impl ServerConfig {
    /// Whether the demo page and `/demo/token` are served.
    pub fn demo_enabled(&self) -> bool {
        self.demo.unwrap_or(false)
    }

    /// Whether the demo price feed runs.
    pub fn demo_feed_enabled(&self) -> bool {
        self.demo_feed.unwrap_or(false)
    }
}

/// `[server.tls]`: the listener's certificate and key, and optionally the CAs
/// whose client certificates are required (mutual TLS).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of the leaf certificate.
    pub key_file: PathBuf,
    /// PEM CA certificates; when set, clients must present a certificate
    /// they signed.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// A TLS handshake not complete within this long is dropped.
    #[serde(
        default = "TlsConfig::default_handshake_timeout",
        with = "humantime_serde"
    )]
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection beyond it is closed.
    #[serde(default = "TlsConfig::default_max_handshakes")]
    pub max_handshakes: usize,
    /// How often the files are read again to pick up a new certificate.
    #[serde(
        default = "TlsConfig::default_reload_interval",
        with = "humantime_serde"
    )]
    pub reload_interval: Duration,
}

impl TlsConfig {
    fn default_handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }

    fn default_max_handshakes() -> usize {
        1024
    }

    fn default_reload_interval() -> Duration {
        Duration::from_secs(10)
    }

    /// `[server.tls]` with these files and the defaults.
    pub fn with_files(cert_file: PathBuf, key_file: PathBuf) -> TlsConfig {
        TlsConfig {
            cert_file,
            key_file,
            client_ca_file: None,
            handshake_timeout: Self::default_handshake_timeout(),
            max_handshakes: Self::default_max_handshakes(),
            reload_interval: Self::default_reload_interval(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            max_http_connections: 4096,
            http_idle_timeout: Duration::from_secs(30),
            allowed_origins: Vec::new(),
            trusted_proxy_header: None,
            trusted_proxies: Vec::new(),
            send_buffer_bytes: 0,
            max_unsent_bytes: 16 * 1024,
            fanout_threads: 0,
            direct_delivery: false,
            tls: None,
            demo: None,
            demo_feed: None,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Shared secret for HS256/384/512 tokens; at least 32 bytes.
    pub hmac_secret: Option<Secret>,
    /// PEM public key for RS*, PS*, ES256/384 or EdDSA tokens.
    pub public_key_file: Option<PathBuf>,
    /// Accepted signature algorithms. The token header never widens this list.
    pub algorithms: Vec<String>,
    /// When set, tokens must carry this `iss`.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(with = "humantime_serde")]
    pub leeway: Duration,
    /// The claim listing the channel patterns a token may subscribe to.
    pub channels_claim: String,
    /// Patterns every authenticated user may subscribe to; `{sub}` is replaced by
    /// the token's subject, e.g. `user.{sub}.*`.
    pub user_channels: Vec<String>,
    /// The claim listing the channel patterns a token may publish to.
    pub publish_claim: String,
    /// Patterns every authenticated user may publish to, like `user_channels`.
    pub user_publish: Vec<String>,
    /// Tokens longer than this are refused without being decoded.
    pub max_token_bytes: usize,
    /// URL of a JSON Web Key Set: asymmetric tokens are verified with the key
    /// their `kid` names. Excludes `public_key_file`.
    pub jwks_url: Option<String>,
    /// How often the key set is fetched again.
    #[serde(with = "humantime_serde")]
    pub jwks_refresh_interval: Duration,
    /// The least time between two fetches caused by unknown `kid`s.
    #[serde(with = "humantime_serde")]
    pub jwks_min_refresh_interval: Duration,
    /// Deadline of one fetch: connect, TLS, request and body.
    #[serde(with = "humantime_serde")]
    pub jwks_timeout: Duration,
    /// Key sets larger than this are refused.
    pub jwks_max_bytes: usize,
    /// Extra PEM roots for an `https://` `jwks_url`, beside the system's.
    pub jwks_ca_file: Option<PathBuf>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            hmac_secret: None,
            public_key_file: None,
            algorithms: vec!["HS256".to_owned()],
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(5),
            channels_claim: "channels".to_owned(),
            user_channels: Vec::new(),
            publish_claim: "publish".to_owned(),
            user_publish: Vec::new(),
            max_token_bytes: 8 * 1024,
            jwks_url: None,
            jwks_refresh_interval: Duration::from_secs(300),
            jwks_min_refresh_interval: Duration::from_secs(30),
            jwks_timeout: Duration::from_secs(5),
            jwks_max_bytes: 1024 * 1024,
            jwks_ca_file: None,
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer key for `POST /api/publish`; at least 16 bytes. Unset disables the API.
    pub key: Option<Secret>,
}

/// Which broker carries messages between publishers and nodes.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BrokerKind {
    /// In-process: one node, no Redis. The default, for development.
    #[default]
    Memory,
    /// One Redis server (or a primary behind a stable address): SUBSCRIBE/PUBLISH.
    Redis,
    /// Redis Cluster with sharded pub/sub: SSUBSCRIBE/SPUBLISH.
    RedisCluster,
    /// A primary found through Redis Sentinel, followed across failovers.
    RedisSentinel,
}

/// A Redis URL: shown with its password redacted.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RedisUrl(String);

impl RedisUrl {
    pub fn new(url: impl Into<String>) -> RedisUrl {
        RedisUrl(url.into())
    }

    /// The URL with its credentials. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any `user:password@` and any `pass=`/`password=` query
    /// parameter replaced.
    pub fn redacted(&self) -> String {
        let (base, query) = match self.0.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (self.0.as_str(), None),
        };
        let mut out = match (base.find("://"), base.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}<redacted>{}", &base[..scheme_end + 3], &base[at..])
            }
            _ => base.to_owned(),
        };
        if let Some(query) = query {
            let pairs: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _))
                        if key.eq_ignore_ascii_case("pass")
                            || key.eq_ignore_ascii_case("password") =>
                    {
                        format!("{key}=<redacted>")
                    }
                    _ => pair.to_owned(),
                })
                .collect();
            out.push('?');
            out.push_str(&pairs.join("&"));
        }
        out
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.redacted())
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// `memory`, `redis`, `redis-cluster` or `redis-sentinel`.
    pub kind: BrokerKind,
    /// For `redis`: `redis://[user:password@]host:port[/db]` or `rediss://` for TLS.
    pub url: Option<RedisUrl>,
    /// For `redis-cluster`: seed node URLs.
    pub cluster_urls: Vec<RedisUrl>,
    /// For `redis-sentinel`: the Sentinels, as `host:port`.
    pub sentinels: Vec<String>,
    /// For `redis-sentinel`: the name under which the Sentinels monitor the
    /// primary.
    pub master_name: Option<String>,
    /// For `redis-sentinel`: the password of the Redis primary, if any.
    pub password: Option<Secret>,
    /// For `redis-sentinel`: the Sentinels' own password, if any.
    pub sentinel_password: Option<Secret>,
    /// Prepended to client-visible channel names to form Redis channel names.
    pub channel_prefix: String,
    /// How often (jittered by ±20%) the node reads the top of each history
    /// channel it carries, to catch a message lost at the end of a burst on a
    /// quiet channel, or a pub/sub link that died silently.
    #[serde(with = "humantime_serde")]
    pub history_check_interval: Duration,
    /// How often the node publishes a probe to its own probe channel.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe not received back within this long makes the node reconnect.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// How long a client's subscribe waits for Redis to confirm.
    #[serde(with = "humantime_serde")]
    pub subscribe_timeout: Duration,
    /// Connection and response timeout of Redis commands.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// First reconnect delay; doubles up to `reconnect_max`, with jitter.
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay.
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Whether `/readyz` fails while the broker is disconnected.
    pub readiness_requires_broker: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            kind: BrokerKind::Memory,
            url: None,
            cluster_urls: Vec::new(),
            sentinels: Vec::new(),
            master_name: None,
            password: None,
            sentinel_password: None,
            channel_prefix: String::new(),
            history_check_interval: Duration::from_secs(25),
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            subscribe_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            readiness_requires_broker: true,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceConfig {
    /// How often each node writes its members of every presence channel to
    /// Redis (one write per channel, whatever its connections).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A node whose entry is older than this is taken for dead: its members
    /// drop out of presence, and `leave` frames follow at the next heartbeat
    /// of any node. At least twice `heartbeat_interval`.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// The most users one `presence` reply lists.
    pub max_users: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat_interval: Duration::from_secs(10),
            ttl: Duration::from_secs(30),
            max_users: 1000,
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PingConfig {
    /// How often the node sends a WebSocket Ping.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long after a Ping the client has to send anything before it is closed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for PingConfig {
    fn default() -> Self {
        PingConfig {
            interval: Duration::from_secs(25),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// The longest the whole drain may take, from the signal to exit. Must
    /// cover `drain_period` plus [`CLOSE_ALLOWANCE`].
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Over how long open connections are closed on SIGTERM: each gets its
    /// own moment in the period, so that clients do not all reconnect to the
    /// other nodes at once. 0 closes them all at once.
    #[serde(with = "humantime_serde")]
    pub drain_period: Duration,
}

/// What `shutdown.timeout` must leave after `shutdown.drain_period`: time for
/// the last connections to flush, send their close frame and hear back.
pub const CLOSE_ALLOWANCE: Duration = Duration::from_secs(5);

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig {
            timeout: Duration::from_secs(30),
            drain_period: Duration::from_secs(20),
        }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open WebSocket connections per node.
    pub max_connections: usize,
    /// Open WebSocket connections per client IP; 0 (the default) for no limit.
    /// Behind a load balancer, set `server.trusted_proxy_header` first, or
    /// every client shares the balancer's address.
    pub max_connections_per_ip: usize,
    /// New WebSocket connections per second per node, on average.
    pub connection_rate: f64,
    /// New WebSocket connections allowed in a burst above `connection_rate`.
    pub connection_burst: usize,
    /// Upgrade attempts per second per client address (IPv6: per /64),
    /// charged before the token is checked; 0 turns it off. Behind a proxy,
    /// set `server.trusted_proxy_header`, or every client shares the proxy's
    /// budget.
    pub connection_rate_per_ip: f64,
    /// Upgrade attempts allowed in a burst above `connection_rate_per_ip`.
    pub connection_burst_per_ip: usize,
    /// Client messages (requests and pings) per second per connection, on average.
    pub requests_per_second: f64,
    /// Client messages allowed in a burst above `requests_per_second`.
    pub request_burst: usize,
    /// Messages a connection may publish per second, on average (the
    /// `publish` op; separate from `requests_per_second`).
    pub publish_per_second: f64,
    /// Publishes allowed in a burst above `publish_per_second`.
    pub publish_burst: usize,
    /// Bytes of published `data` a connection may send per second, on
    /// average; a burst may reach `max(publish_bytes_per_second,
    /// max_publish_bytes)`.
    pub publish_bytes_per_second: usize,
    /// Messages waiting in one connection's outbound queue.
    pub queue_messages: usize,
    /// Bytes waiting in one connection's outbound queue.
    pub queue_bytes: usize,
    /// The largest message a client may send (one frame, or a fragmented message in total).
    pub max_message_bytes: usize,
    /// The largest published payload; larger ones are refused (API) or dropped (broker).
    pub max_publish_bytes: usize,
    /// Channels one connection may subscribe to.
    pub max_channels_per_connection: usize,
    /// A socket write that makes no progress for this long closes the connection.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How long a client frame, or a fragmented message, may take to arrive
    /// in full once its first byte has; beyond it the connection closes with
    /// 4006. An idle connection has no such deadline.
    #[serde(with = "humantime_serde")]
    pub frame_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 20_000,
            max_connections_per_ip: 0,
            connection_rate: 10_000.0,
            connection_burst: 10_000,
            connection_rate_per_ip: 100.0,
            connection_burst_per_ip: 200,
            requests_per_second: 50.0,
            request_burst: 100,
            publish_per_second: 10.0,
            publish_burst: 20,
            publish_bytes_per_second: 64 * 1024,
            queue_messages: 1024,
            queue_bytes: 1024 * 1024,
            max_message_bytes: 64 * 1024,
            max_publish_bytes: 64 * 1024,
            max_channels_per_connection: 128,
            write_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(10),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `herald=debug`.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// What happens to a channel's messages when a connection cannot keep up.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SlowPolicy {
    /// Close the connection with the slow-consumer code; the client reconnects and resyncs.
    #[default]
    Disconnect,
    /// Drop the oldest queued messages of such channels to make room.
    DropOldest,
    /// Keep only the newest undelivered message of each channel.
    Conflate,
}

/// A delivery rule: `[[channels]]` in the file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelRule {
    /// Channel pattern, `*` matching any run of characters.
    pub pattern: String,
    /// Slow-consumer policy for matching channels.
    #[serde(default)]
    pub policy: SlowPolicy,
    /// At most this many deliveries per second per channel per connection; the newest wins.
    #[serde(default)]
    pub max_rate_hz: Option<f64>,
    /// Messages kept per channel for recovery (a Redis Stream, or a ring in
    /// the memory broker). 0, the default, means no history.
    #[serde(default)]
    pub history_size: u64,
    /// How long an idle channel's history is kept. Required when
    /// `history_size > 0`.
    #[serde(default, with = "humantime_serde")]
    pub history_ttl: Option<Duration>,
    /// The most messages one recovery (a client's `since`, or the node filling
    /// a gap) may replay. Default 300.
    #[serde(default = "default_recover_max")]
    pub recover_max: u64,
    /// Messages clients publish on matching channels carry the publisher's
    /// `sub` in the frame's `"from"`, set by the server.
    #[serde(default)]
    pub stamp_from: bool,
    /// Track who is subscribed to matching channels (`presence` and
    /// `presence_count` requests).
    #[serde(default)]
    pub presence: bool,
    /// Deliver `join` and `leave` frames to matching channels' subscribers.
    /// Requires `presence`.
    #[serde(default)]
    pub join_leave: bool,
}

fn default_recover_max() -> u64 {
    300
}

/// The largest `history_size` accepted.
pub const MAX_HISTORY_SIZE: u64 = 1_000_000;

impl Default for ChannelRule {
    fn default() -> Self {
        ChannelRule {
            pattern: "*".to_owned(),
            policy: SlowPolicy::default(),
            max_rate_hz: None,
            history_size: 0,
            history_ttl: None,
            recover_max: default_recover_max(),
            stamp_from: false,
            presence: false,
            join_leave: false,
        }
    }
}

impl Config {
    /// Loads defaults, then `file`, then the process environment, and validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars().collect())
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_with_env(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let config = Self::read_with_env(file, env)?;
        config.validate()?;
        Ok(config)
    }

    /// Reads the layers without validating, for `herald dev`, which fills in
    /// missing secrets before validating.
    pub fn read(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::read_with_env(file, std::env::vars().collect())
    }

    /// Reads and validates a configuration given as TOML text, as if from a
    /// file with no `HERALD_*` environment. For the fuzz target `config`.
    pub(crate) fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let file = config::File::from_str(text, config::FileFormat::Toml);
        let config = Self::read_layers(Some(file), HashMap::new())?;
        config.validate()?;
        Ok(config)
    }

    fn read_with_env(
        file: Option<&Path>,
        env: HashMap<String, String>,
    ) -> Result<Config, ConfigError> {
        let file = match file {
            Some(file) if !file.exists() => {
                return Err(ConfigError::invalid(
                    "--config",
                    format!("file {} does not exist", file.display()),
                ));
            }
            Some(file) => Some(config::File::from(file).format(config::FileFormat::Toml)),
            None => None,
        };
        Self::read_layers(file, env)
    }

    /// Defaults, then `file`, then `env`.
    fn read_layers<F>(file: Option<F>, env: HashMap<String, String>) -> Result<Config, ConfigError>
    where
        F: config::Source + Send + Sync + 'static,
    {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(file);
        }
        let hostname = env.get("HOSTNAME").cloned();
        let prefix = format!("{ENV_PREFIX}_");
        let mut scalars = HashMap::new();
        for (name, value) in env {
            let Some(rest) = name.strip_prefix(&prefix) else {
                continue;
            };
            let key = rest.to_lowercase().replace("__", ".");
            if LIST_KEYS.contains(&key.as_str()) {
                // Lists are comma-separated. Everything else stays a string
                // exactly as written (no guessing that "0042" is a number),
                // and serde converts it to the field's type.
                let items: Vec<String> = value
                    .split(',')
                    .map(str::trim)
                    .filter(|item| !item.is_empty())
                    .map(str::to_owned)
                    .collect();
                builder = builder.set_override(key, items)?;
            } else {
                scalars.insert(name, value);
            }
        }
        let environment = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(Some(scalars));
        let mut config: Config = builder.add_source(environment).build()?.try_deserialize()?;
        if config.node.id.is_none() {
            config.node.id = Some(hostname.unwrap_or_else(|| format!("herald-{}", random_hex(4))));
        }
        Ok(config)
    }

    /// Checks every value that deserialization alone cannot, without reading
    /// files or parsing what belongs to a component. `herald::check_config`
    /// does both.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |key: &str, value: Duration| {
            if value.is_zero() {
                Err(ConfigError::invalid(key, "must be greater than zero"))
            } else if value > MAX_DURATION {
                Err(ConfigError::invalid(key, "must be at most 365 days"))
            } else {
                Ok(())
            }
        };
        positive("ping.interval", self.ping.interval)?;
        positive("ping.timeout", self.ping.timeout)?;
        positive("shutdown.timeout", self.shutdown.timeout)?;
        if self.shutdown.timeout < self.shutdown.drain_period + CLOSE_ALLOWANCE {
            return Err(ConfigError::invalid(
                "shutdown.timeout",
                format!(
                    "must be at least shutdown.drain_period ({:?}) plus {:?} for the last close handshakes",
                    self.shutdown.drain_period, CLOSE_ALLOWANCE
                ),
            ));
        }
        positive(
            "server.header_read_timeout",
            self.server.header_read_timeout,
        )?;
        positive("limits.write_timeout", self.limits.write_timeout)?;
        positive("server.http_idle_timeout", self.server.http_idle_timeout)?;
        positive("limits.frame_timeout", self.limits.frame_timeout)?;
        if let Some(tls) = &self.server.tls {
            positive("server.tls.handshake_timeout", tls.handshake_timeout)?;
            positive("server.tls.reload_interval", tls.reload_interval)?;
            if tls.max_handshakes == 0 {
                return Err(ConfigError::invalid(
                    "server.tls.max_handshakes",
                    "must be at least 1",
                ));
            }
        }
        positive("broker.probe_interval", self.broker.probe_interval)?;
        positive(
            "presence.heartbeat_interval",
            self.presence.heartbeat_interval,
        )?;
        if self.presence.ttl < self.presence.heartbeat_interval * 2 {
            return Err(ConfigError::invalid(
                "presence.ttl",
                "must be at least twice presence.heartbeat_interval",
            ));
        }
        positive(
            "broker.history_check_interval",
            self.broker.history_check_interval,
        )?;
        positive("broker.probe_timeout", self.broker.probe_timeout)?;
        positive("broker.subscribe_timeout", self.broker.subscribe_timeout)?;
        positive("broker.command_timeout", self.broker.command_timeout)?;
        positive("broker.reconnect_min", self.broker.reconnect_min)?;
        positive("broker.reconnect_max", self.broker.reconnect_max)?;
        positive(
            "auth.jwks_refresh_interval",
            self.auth.jwks_refresh_interval,
        )?;
        positive("auth.jwks_timeout", self.auth.jwks_timeout)?;
        positive(
            "auth.jwks_min_refresh_interval",
            self.auth.jwks_min_refresh_interval,
        )?;
        if self.auth.jwks_min_refresh_interval > self.auth.jwks_refresh_interval {
            return Err(ConfigError::invalid(
                "auth.jwks_min_refresh_interval",
                "must not be longer than auth.jwks_refresh_interval",
            ));
        }
        if self.auth.leeway > MAX_LEEWAY {
            // jsonwebtoken computes `now - leeway` in u64.
            return Err(ConfigError::invalid("auth.leeway", "must be at most 1 day"));
        }
        if self.broker.reconnect_max < self.broker.reconnect_min {
            return Err(ConfigError::invalid(
                "broker.reconnect_max",
                "must not be shorter than broker.reconnect_min",
            ));
        }
        if self.broker.channel_prefix.len() > 64 {
            return Err(ConfigError::invalid(
                "broker.channel_prefix",
                "must be at most 64 bytes",
            ));
        }
        match self.broker.kind {
            BrokerKind::Redis if self.broker.url.is_none() => {
                return Err(ConfigError::invalid(
                    "broker.url",
                    "is required when broker.kind = \"redis\"",
                ));
            }
            BrokerKind::RedisCluster if self.broker.cluster_urls.is_empty() => {
                return Err(ConfigError::invalid(
                    "broker.cluster_urls",
                    "must list at least one seed node when broker.kind = \"redis-cluster\"",
                ));
            }
            BrokerKind::RedisSentinel => {
                if self.broker.sentinels.is_empty() {
                    return Err(ConfigError::invalid(
                        "broker.sentinels",
                        "must list at least one host:port when broker.kind = \"redis-sentinel\"",
                    ));
                }
                for sentinel in &self.broker.sentinels {
                    let valid = sentinel.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && port.parse::<u16>().is_ok()
                    });
                    if !valid {
                        return Err(ConfigError::invalid(
                            "broker.sentinels",
                            format!("{sentinel:?} is not host:port"),
                        ));
                    }
                }
                if self.broker.master_name.as_deref().is_none_or(str::is_empty) {
                    return Err(ConfigError::invalid(
                        "broker.master_name",
                        "is required when broker.kind = \"redis-sentinel\"",
                    ));
                }
            }
            _ => {}
        }
        let at_least = |key: &str, value: usize, min: usize| {
            if value < min {
                Err(ConfigError::invalid(key, format!("must be at least {min}")))
            } else {
                Ok(())
            }
        };
        at_least(
            "server.max_header_bytes",
            self.server.max_header_bytes,
            8192,
        )?;
        at_least("auth.max_token_bytes", self.auth.max_token_bytes, 64)?;
        at_least("auth.jwks_max_bytes", self.auth.jwks_max_bytes, 256)?;
        at_least("limits.max_connections", self.limits.max_connections, 1)?;
        if self.server.fanout_threads > 256 {
            return Err(ConfigError::invalid(
                "server.fanout_threads",
                "must be at most 256 (0 means one per core)",
            ));
        }
        at_least("presence.max_users", self.presence.max_users, 1)?;
        at_least(
            "server.max_http_connections",
            self.server.max_http_connections,
            1,
        )?;
        // Socket options take a C int, which SO_SNDBUF is doubled into.
        let zero_or_between = |key: &str, value: usize, min: usize| {
            if value != 0 && !(min..=MAX_SOCKET_OPTION_BYTES).contains(&value) {
                Err(ConfigError::invalid(
                    key,
                    format!(
                        "must be 0 (the kernel's default) or between {min} and {MAX_SOCKET_OPTION_BYTES}"
                    ),
                ))
            } else {
                Ok(())
            }
        };
        zero_or_between(
            "server.send_buffer_bytes",
            self.server.send_buffer_bytes,
            4096,
        )?;
        zero_or_between(
            "server.max_unsent_bytes",
            self.server.max_unsent_bytes,
            1024,
        )?;
        at_least("limits.connection_burst", self.limits.connection_burst, 1)?;
        at_least("limits.request_burst", self.limits.request_burst, 1)?;
        at_least("limits.publish_burst", self.limits.publish_burst, 1)?;
        at_least(
            "limits.publish_bytes_per_second",
            self.limits.publish_bytes_per_second,
            1,
        )?;
        for (key, rate) in [
            ("limits.publish_per_second", self.limits.publish_per_second),
            ("limits.connection_rate", self.limits.connection_rate),
            (
                "limits.requests_per_second",
                self.limits.requests_per_second,
            ),
        ] {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(ConfigError::invalid(key, "must be a positive number"));
            }
        }
        let per_ip = self.limits.connection_rate_per_ip;
        if !(per_ip.is_finite() && per_ip >= 0.0) {
            return Err(ConfigError::invalid(
                "limits.connection_rate_per_ip",
                "must be 0 (off) or a positive number",
            ));
        }
        at_least(
            "limits.connection_burst_per_ip",
            self.limits.connection_burst_per_ip,
            1,
        )?;
        at_least("limits.queue_messages", self.limits.queue_messages, 1)?;
        at_least("limits.queue_bytes", self.limits.queue_bytes, 1024)?;
        at_least(
            "limits.max_message_bytes",
            self.limits.max_message_bytes,
            1024,
        )?;
        at_least("limits.max_publish_bytes", self.limits.max_publish_bytes, 1)?;
        at_least(
            "limits.max_channels_per_connection",
            self.limits.max_channels_per_connection,
            1,
        )?;
        if let Some(id) = &self.node.id {
            if id.is_empty() || id.len() > 64 || id.chars().any(|c| c.is_whitespace() || c == '"') {
                return Err(ConfigError::invalid(
                    "node.id",
                    "must be 1 to 64 characters without whitespace or quotes",
                ));
            }
        }
        if self
            .log
            .level
            .split(',')
            .any(|directive| directive.trim() != directive)
        {
            // tracing-subscriber 0.3 slices each untrimmed directive with the
            // trimmed one's indices: a wrong target, or a panic when that
            // lands inside a character.
            return Err(ConfigError::invalid(
                "log.level",
                "directives must not begin or end with whitespace (write herald=debug,hyper=warn)",
            ));
        }
        if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return Err(ConfigError::invalid("log.level", error.to_string()));
        }
        if self.auth.publish_claim.is_empty() || self.auth.publish_claim == self.auth.channels_claim
        {
            return Err(ConfigError::invalid(
                "auth.publish_claim",
                "must not be empty nor the same as auth.channels_claim",
            ));
        }
        if self.auth.channels_claim.is_empty() {
            return Err(ConfigError::invalid(
                "auth.channels_claim",
                "must not be empty",
            ));
        }
        if self.server.demo_enabled() {
            // Demo tokens are HS256, signed with auth.hmac_secret (required
            // above whenever an HS algorithm is listed).
            if !self.auth.algorithms.iter().any(|a| a == "HS256") {
                return Err(ConfigError::invalid(
                    "server.demo",
                    "needs HS256 in auth.algorithms: demo tokens are HS256 tokens signed with auth.hmac_secret",
                ));
            }
            if !self.auth.user_channels.is_empty() {
                return Err(ConfigError::invalid(
                    "server.demo",
                    "must be off when auth.user_channels is set: /demo/token mints a token for any user name, which would grant that user's own channels",
                ));
            }
        }
        if let Some(key) = &self.api.key {
            if key.expose().len() < 16 {
                return Err(ConfigError::invalid("api.key", "must be at least 16 bytes"));
            }
        }
        for (index, rule) in self.channels.iter().enumerate() {
            Pattern::parse(&rule.pattern).map_err(|e| {
                ConfigError::invalid(format!("channels[{index}].pattern"), e.to_string())
            })?;
            if let Some(rate) = rule.max_rate_hz {
                if !(0.001..=10_000.0).contains(&rate) {
                    return Err(ConfigError::invalid(
                        format!("channels[{index}].max_rate_hz"),
                        "must be between 0.001 and 10000",
                    ));
                }
            }
            self.validate_history(index, rule)?;
            if rule.join_leave && !rule.presence {
                return Err(ConfigError::invalid(
                    format!("channels[{index}].join_leave"),
                    "requires presence = true",
                ));
            }
        }
        // Values that only a component can check (key files, URLs, CIDRs) are
        // checked by building the components: see `herald::check_config`.
        Ok(())
    }

    fn validate_history(&self, index: usize, rule: &ChannelRule) -> Result<(), ConfigError> {
        let key = |name: &str| format!("channels[{index}].{name}");
        if rule.history_size > MAX_HISTORY_SIZE {
            return Err(ConfigError::invalid(
                key("history_size"),
                format!("must be at most {MAX_HISTORY_SIZE}"),
            ));
        }
        match (rule.history_size, rule.history_ttl) {
            (0, Some(_)) => {
                return Err(ConfigError::invalid(
                    key("history_ttl"),
                    "is only meaningful with history_size > 0",
                ));
            }
            (0, None) => return Ok(()),
            (_, None) => {
                return Err(ConfigError::invalid(
                    key("history_ttl"),
                    "is required when history_size > 0",
                ));
            }
            (_, Some(ttl)) if ttl < Duration::from_secs(1) => {
                return Err(ConfigError::invalid(
                    key("history_ttl"),
                    "must be at least 1s",
                ));
            }
            _ => {}
        }
        if rule.recover_max == 0 {
            return Err(ConfigError::invalid(
                key("recover_max"),
                "must be at least 1",
            ));
        }
        if rule.recover_max > self.limits.queue_messages as u64 {
            return Err(ConfigError::invalid(
                key("recover_max"),
                "must not exceed limits.queue_messages: a recovery is queued at once",
            ));
        }
        if self.broker.channel_prefix.contains(['{', '}']) {
            return Err(ConfigError::invalid(
                "broker.channel_prefix",
                "may not contain { or }: history keys use the channel as a hash tag",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration serializes to TOML")
    }

    /// The node id (always set once loaded).
    pub fn node_id(&self) -> &str {
        self.node.id.as_deref().unwrap_or("herald")
    }
}

/// `bytes` random bytes as lowercase hex, from the OS generator.
pub fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random generator is available");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn environment_overrides_defaults() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("HERALD_AUTH__HMAC_SECRET", SECRET),
                ("HERALD_API__KEY", "00123456789012345678"),
                ("HERALD_AUTH__ALGORITHMS", "HS256,HS512"),
                ("HERALD_PING__INTERVAL", "3s"),
                ("HERALD_LIMITS__QUEUE_MESSAGES", "7"),
                ("HERALD_SERVER__LISTEN", "127.0.0.1:9000"),
                ("HOSTNAME", "pod-1"),
            ]),
        )
        .unwrap();
        assert_eq!(config.auth.hmac_secret.unwrap().expose(), SECRET);
        // A numeric-looking secret is kept exactly as written.
        assert_eq!(config.api.key.unwrap().expose(), "00123456789012345678");
        assert_eq!(config.auth.algorithms, ["HS256", "HS512"]);
        assert_eq!(config.ping.interval, Duration::from_secs(3));
        assert_eq!(config.limits.queue_messages, 7);
        assert_eq!(config.server.listen.port(), 9000);
        assert_eq!(config.node.id.as_deref(), Some("pod-1"));
    }

    #[test]
    fn socket_buffer_options_are_zero_or_in_range() {
        let load = |pairs: &[(&str, &str)]| {
            let mut all = vec![("HERALD_AUTH__HMAC_SECRET", SECRET)];
            all.extend_from_slice(pairs);
            Config::load_with_env(None, env(&all))
        };
        let defaults = load(&[]).unwrap();
        assert_eq!(defaults.server.send_buffer_bytes, 0);
        assert_eq!(defaults.server.max_unsent_bytes, 16 * 1024);
        let set = load(&[
            ("HERALD_SERVER__SEND_BUFFER_BYTES", "65536"),
            ("HERALD_SERVER__MAX_UNSENT_BYTES", "0"),
        ])
        .unwrap();
        assert_eq!(set.server.send_buffer_bytes, 65536);
        assert_eq!(set.server.max_unsent_bytes, 0);
        for (variable, value, key) in [
            (
                "HERALD_SERVER__SEND_BUFFER_BYTES",
                "4095",
                "server.send_buffer_bytes",
            ),
            (
                "HERALD_SERVER__SEND_BUFFER_BYTES",
                "1073741825",
                "server.send_buffer_bytes",
            ),
            (
                "HERALD_SERVER__MAX_UNSENT_BYTES",
                "1023",
                "server.max_unsent_bytes",
            ),
            (
                "HERALD_SERVER__MAX_UNSENT_BYTES",
                "1073741825",
                "server.max_unsent_bytes",
            ),
            ("HERALD_SERVER__MAX_UNSENT_BYTES", "-1", "max_unsent_bytes"),
        ] {
            let error = load(&[(variable, value)]).unwrap_err().to_string();
            assert!(error.contains(key), "{variable}={value}: {error}");
        }
    }

    #[test]
    fn unknown_environment_key_is_an_error() {
        let err = Config::load_with_env(
            None,
            env(&[
                ("HERALD_AUTH__HMAC_SECRET", SECRET),
                ("HERALD_PING__INTERVALL", "3s"),
            ]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("intervall"), "{err}");
    }

    #[test]
    fn secrets_are_redacted() {
        let config =
            Config::load_with_env(None, env(&[("HERALD_AUTH__HMAC_SECRET", SECRET)])).unwrap();
        let text = config.to_redacted_toml();
        assert!(!text.contains(SECRET));
        assert!(text.contains("<redacted>"));
        assert!(!format!("{config:?}").contains(SECRET));
    }

    #[test]
    fn a_log_level_in_whitespace_is_refused_without_a_panic() {
        // Found by the `config` fuzz target: a directive with a leading tab
        // and a non-ASCII character made validation panic inside
        // tracing-subscriber.
        for level in [
            "\tx\u{fffd}=debug",
            "info,\tx\u{fffd}=debug",
            " info",
            "info\n",
        ] {
            let text = format!("[log]\nlevel = {level:?}\n");
            let error = Config::from_toml(&text).unwrap_err().to_string();
            assert!(error.contains("log.level"), "{level:?}: {error}");
        }
        assert!(Config::from_toml("[log]\nlevel = \"herald=debug,info\"\n").is_ok());
    }

    #[test]
    fn durations_are_bounded() {
        // Both validated before, then broke the node: the first panicked on
        // `Instant::now() + interval` in every writer, the second made
        // jsonwebtoken compute `now - leeway` below zero (a panic in debug
        // builds; in release, every token was expired).
        let check = |text: &str, key: &str| {
            let error = Config::from_toml(text).unwrap_err().to_string();
            assert!(error.contains(key), "{text}: {error}");
        };
        check("[ping]\ninterval = \"400000000000y\"\n", "ping.interval");
        check(
            "[limits]\nframe_timeout = \"366d\"\n",
            "limits.frame_timeout",
        );
        check("[broker]\nreconnect_max = \"2y\"\n", "broker.reconnect_max");
        check("[auth]\nleeway = \"100y\"\n", "auth.leeway");
        check("[auth]\nleeway = \"25h\"\n", "auth.leeway");
        assert!(
            Config::from_toml("[auth]\nleeway = \"1d\"\n[ping]\ninterval = \"365d\"\n").is_ok()
        );
    }

    #[test]
    fn history_settings_are_validated_naming_the_key() {
        let check = |rule: &str, key: &str| {
            let text = format!("[[channels]]\npattern = \"notify.*\"\n{rule}");
            let error = Config::from_toml(&text).unwrap_err().to_string();
            assert!(error.contains(key), "{rule}: {error}");
        };
        check("history_size = 10\n", "channels[0].history_ttl");
        check("history_ttl = \"1h\"\n", "channels[0].history_ttl");
        check(
            "history_size = 10\nhistory_ttl = \"500ms\"\n",
            "channels[0].history_ttl",
        );
        check(
            "history_size = 2000000\nhistory_ttl = \"1h\"\n",
            "channels[0].history_size",
        );
        check(
            "history_size = 10\nhistory_ttl = \"1h\"\nrecover_max = 0\n",
            "channels[0].recover_max",
        );
        check(
            "history_size = 10\nhistory_ttl = \"1h\"\nrecover_max = 5000\n",
            "channels[0].recover_max",
        );
        let text = "[broker]\nchannel_prefix = \"{app}\"\n[[channels]]\npattern = \"n.*\"\nhistory_size = 10\nhistory_ttl = \"1h\"\n";
        let error = Config::from_toml(text).unwrap_err().to_string();
        assert!(error.contains("broker.channel_prefix"), "{error}");
        let config = Config::from_toml(
            "[[channels]]\npattern = \"n.*\"\nhistory_size = 10\nhistory_ttl = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(config.channels[0].recover_max, 300);
    }

    #[test]
    fn the_demo_is_off_by_default_and_refused_where_its_tokens_would_not_be_safe() {
        let secret = format!("[auth]\nhmac_secret = {SECRET:?}\n");
        let config = Config::from_toml(&secret).unwrap();
        assert!(!config.server.demo_enabled());
        assert!(!config.server.demo_feed_enabled());
        let on = format!("[server]\ndemo = true\ndemo_feed = true\n{secret}");
        let config = Config::from_toml(&on).unwrap();
        assert!(config.server.demo_enabled() && config.server.demo_feed_enabled());
        let check = |text: String, needle: &str| {
            let error = Config::from_toml(&text).unwrap_err().to_string();
            assert!(error.starts_with("server.demo:"), "{text}: {error}");
            assert!(error.contains(needle), "{text}: {error}");
        };
        check(
            format!("[server]\ndemo = true\n{secret}algorithms = [\"HS512\"]\n"),
            "HS256",
        );
        check(
            format!("[server]\ndemo = true\n{secret}user_channels = [\"user.{{sub}}.*\"]\n"),
            "auth.user_channels",
        );
        // Off, the same settings are fine.
        assert!(
            Config::from_toml(&format!(
                "[server]\ndemo = false\n{secret}user_channels = [\"user.{{sub}}.*\"]\n"
            ))
            .is_ok()
        );
    }

    #[test]
    fn config_is_the_bottom_floor() {
        // Configuration is read by every component and depends on none of
        // them: building components belongs where the node is assembled.
        let source = include_str!("config.rs");
        for component in ["auth", "transport", "broker", "session", "hub"] {
            let import = format!("crate::{component}");
            assert!(!source.contains(&import), "config.rs uses {import}");
        }
    }
}
