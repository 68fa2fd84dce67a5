//! Command-line interface: global options, one subcommand per scenario, and
//! the hidden `worker` mode.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Serialize, Serializer};

/// The default subscribe request; `{channel}` is replaced per channel.
pub const DEFAULT_SUBSCRIBE_FRAME: &str = r#"{"op":"subscribe","id":1,"channels":["{channel}"]}"#;

#[derive(Debug, Parser)]
#[command(
    name = "herald-loadtest",
    version,
    about = "Load tester for herald and other WebSocket push servers"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Args, Serialize)]
pub struct GlobalArgs {
    /// Gateway WebSocket URL, repeatable (one per node); clients are spread
    /// round-robin over them.
    #[arg(long = "url", global = true, value_name = "URL")]
    pub urls: Vec<String>,
    /// HS256 secret: mint one token per connection (sub `load-<i>`, channels `["*"]`).
    #[arg(long, global = true, conflicts_with = "token")]
    #[serde(skip)]
    pub secret: Option<String>,
    /// One static token for every connection.
    #[arg(long, global = true)]
    #[serde(skip)]
    pub token: Option<String>,
    /// Bind client sockets round-robin to 127.0.0.2 ... 127.0.0.(N+1); 1 uses
    /// the default source address.
    #[arg(long, global = true, default_value_t = 1)]
    pub source_ips: usize,
    /// Client processes; each gets a slice of the connections.
    #[arg(long, global = true, default_value_t = 1)]
    pub workers: usize,
    /// Gateway process id, repeatable: its RSS and CPU time are sampled.
    #[arg(long = "pid", global = true, value_name = "PID")]
    pub pids: Vec<u32>,
    /// Write a JSON summary to this file.
    #[arg(long, global = true, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Subscribe request: `{channel}` is replaced per channel (one frame each),
    /// `{channels}` by a JSON array of all the connection's channels (one frame).
    #[arg(long, global = true, default_value = DEFAULT_SUBSCRIBE_FRAME)]
    pub subscribe_frame: String,
    /// A frame containing this confirms one subscribe request.
    #[arg(long, global = true, default_value = r#""type":"reply""#)]
    pub subscribed_match: String,
    /// A confirming frame that also contains this is a refusal (herald lists
    /// refused channels in `errors`). Empty disables the check.
    #[arg(long, global = true, default_value = r#""errors":[{"#)]
    pub subscribe_error_match: String,
    /// Field holding the intended send time (unix nanoseconds) in deliveries.
    #[arg(long, global = true, default_value = "ts")]
    pub ts_field: String,
    /// Field holding the per-channel sequence number in deliveries.
    #[arg(long, global = true, default_value = "seq")]
    pub seq_field: String,
    /// Limit from TCP connect start to subscription confirmed.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub connect_timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Open connections at a fixed rate, hold them, then close: handshake rate,
    /// connect latency, failures and gateway memory per connection.
    Connect(ConnectArgs),
    /// Subscribers over channels, a publisher at a fixed rate: delivery latency and loss.
    Fanout(FanoutArgs),
    /// Like fanout, with a fraction of subscribers that never read.
    Slow(SlowArgs),
    /// Drop many subscribed connections at once and reconnect them.
    Storm(StormArgs),
    /// Internal: run a slice of the clients for a parent process.
    #[command(hide = true)]
    Worker,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct ConnectArgs {
    /// Connections to open.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels each connection subscribes to.
    #[arg(long, default_value_t = 1)]
    pub channels_per_conn: usize,
    /// Distinct channels `load.0 ..`; defaults to --channels-per-conn.
    #[arg(long)]
    pub channel_count: Option<usize>,
    /// New connections per second (open loop: the i-th starts at i/rate).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to keep the connections open once all are attempted.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub hold: Duration,
}

/// Which way the publisher reaches the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PublishKind {
    /// `POST /api/publish` over pipelined keep-alive HTTP/1.1 connections.
    Api,
    /// `PUBLISH` on a multiplexed Redis connection.
    Redis,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct PublishArgs {
    /// Publisher; defaults to `api` when --api-url is given, else `redis`.
    #[arg(long)]
    pub publish: Option<PublishKind>,
    /// Redis URL for `--publish redis`.
    #[arg(long)]
    #[serde(skip)]
    pub redis_url: Option<String>,
    /// Prefix the gateways put before channel names in Redis (`broker.channel_prefix`).
    #[arg(long, default_value = "")]
    pub channel_prefix: String,
    /// `http://host:port/api/publish` for `--publish api`.
    #[arg(long)]
    pub api_url: Option<String>,
    /// Bearer key for the publish API.
    #[arg(long)]
    #[serde(skip)]
    pub api_key: Option<String>,
    /// Keep-alive HTTP connections for `--publish api`; a channel always uses
    /// the same one so that its messages stay in order.
    #[arg(long, default_value_t = 4)]
    pub api_connections: usize,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct FanoutArgs {
    /// Subscribing connections, spread over the channels.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,
    /// Channels `fanout.0 .. fanout.<C-1>`.
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Messages per second published, in total, round-robin over the channels.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Size of each published JSON payload in bytes (at least about 50).
    #[arg(long, default_value_t = 256)]
    pub payload: usize,
    /// How long to publish after the warm-up.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub duration: Duration,
    /// Publishing before the measurement; those messages are not counted.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub warmup: Duration,
    /// New subscriber connections per second while setting up.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    #[command(flatten)]
    pub publisher: PublishArgs,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct SlowArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub fanout: FanoutArgs,
    /// Fraction of subscribers (on every channel) that never read after subscribing.
    #[arg(long, default_value_t = 0.1)]
    pub slow_fraction: f64,
}

/// How the storm drops its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DropMode {
    /// Reset the TCP connection (SO_LINGER 0): the gateway sees an error.
    Rst,
    /// Close the socket without a WebSocket close frame: the gateway sees EOF.
    Fin,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct StormArgs {
    /// Subscribed connections to establish.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// How many of them to drop at once and reconnect.
    #[arg(long, default_value_t = 500)]
    pub drop: usize,
    /// Channels each connection subscribes to.
    #[arg(long, default_value_t = 1)]
    pub channels_per_conn: usize,
    /// Distinct channels `load.0 ..`; defaults to --channels-per-conn.
    #[arg(long)]
    pub channel_count: Option<usize>,
    /// New connections per second while establishing (not while reconnecting).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Reconnect attempts per dropped connection, with exponential backoff
    /// from 100 ms (plus jitter) between them.
    #[arg(long, default_value_t = 1)]
    pub attempts: u32,
    /// How a connection is dropped.
    #[arg(long, value_enum, default_value_t = DropMode::Rst)]
    pub drop_mode: DropMode,
}

/// Parses `250ms`, `1.5s`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 500ms, 10s or 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "us" | "µs" => value / 1_000_000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown duration unit {other:?} in {text:?}")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

fn seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Option<Duration>) {
        assert_eq!(parse_duration(input).ok(), expected, "{input}");
    }

    #[test]
    fn durations() {
        check("1s", Some(Duration::from_secs(1)));
        check("0.5s", Some(Duration::from_millis(500)));
        check("250ms", Some(Duration::from_millis(250)));
        check("2m", Some(Duration::from_secs(120)));
        check("1h", Some(Duration::from_secs(3600)));
        check("3", Some(Duration::from_secs(3)));
        check("10us", Some(Duration::from_micros(10)));
        check("soon", None);
        check("1d", None);
        check("", None);
    }

    #[test]
    fn global_options_may_follow_the_subcommand() {
        let cli = Cli::try_parse_from([
            "herald-loadtest",
            "fanout",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--url",
            "ws://127.0.0.1:2/ws",
            "--secret",
            "s",
            "--duration",
            "1s",
            "--api-url",
            "http://127.0.0.1:1/api/publish",
        ])
        .unwrap();
        assert_eq!(cli.global.urls.len(), 2);
        let Command::Fanout(fanout) = cli.command else {
            panic!("expected fanout");
        };
        assert_eq!(fanout.duration, Duration::from_secs(1));
        assert_eq!(fanout.warmup, Duration::from_secs(1));
    }

    #[test]
    fn secret_and_token_conflict() {
        let parsed = Cli::try_parse_from([
            "herald-loadtest",
            "connect",
            "--secret",
            "a",
            "--token",
            "b",
        ]);
        assert!(parsed.is_err());
    }
}
