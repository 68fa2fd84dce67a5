//! Command-line interface: global options, one subcommand per scenario, and
//! the hidden `worker` mode.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Serialize, Serializer};

use crate::scrape::Expectation;

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
    /// PEM CA certificates to trust for wss:// URLs, beside the system's
    /// roots: for example the certificate `herald dev --tls` writes.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
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
    /// Connect and disconnect in waves, watching the gateway's memory and
    /// open-connection metrics for leaks.
    Churn(ChurnArgs),
    /// Stop one gateway with SIGTERM while its clients reconnect to the
    /// others: the reconnect rate the others see.
    Drain(DrainArgs),
    /// Render `fanout` or `slow` JSON summaries as an SVG chart: p50, p90
    /// and p99 latency against the delivery rate, one colour per server.
    Chart(ChartArgs),
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
    /// `FCALL herald_publish 1 <channel> <payload>` on a multiplexed Redis
    /// connection: herald's Redis Function, which appends the message to a
    /// history channel's stream and publishes it with its offset.
    Function,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct PublishArgs {
    /// Publisher; defaults to `api` when --api-url is given, else `redis`.
    #[arg(long)]
    pub publish: Option<PublishKind>,
    /// Redis URL for `--publish redis` and `--publish function`.
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
    /// A frame containing this is a `gap` notice (messages may have been lost).
    #[arg(long, default_value = r#""type":"gap""#)]
    pub gap_match: String,
    #[command(flatten)]
    pub publisher: PublishArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub history: HistoryArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub faults: FaultArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub metrics: MetricsArgs,
}

/// History channels (herald's `[[channels]]` with `history_size`): loss
/// accounting by offset, and resuming with `since` after a disconnection.
#[derive(Debug, Clone, Args, Serialize)]
pub struct HistoryArgs {
    /// The channels have history: account every subscriber's deliveries by
    /// their `offset` and `epoch` against the offsets the publishes landed
    /// at (needs `--publish function` or `api`), and resubscribe every
    /// subscriber that loses its connection with `since` its last offset.
    #[arg(long)]
    pub history: bool,
    /// Fraction of each channel's subscribers that disconnect every
    /// --reconnect-every and resubscribe with `since` (on the next --url,
    /// so that with several gateways they recover on another node).
    #[arg(long, default_value_t = 0.0, requires = "history")]
    pub reconnect_fraction: f64,
    /// How often each of those subscribers disconnects; the first time is
    /// spread over one period.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub reconnect_every: Duration,
}

/// Faults injected while `fanout` or `slow` measures, attackers beside the
/// subscribers, and the assertions that decide the exit status.
#[derive(Debug, Clone, Args, Serialize)]
pub struct FaultArgs {
    /// Run `CLIENT KILL TYPE pubsub` on Redis every DURATION while publishing
    /// after the warm-up, killing every gateway's subscriber connection.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "optional_seconds")]
    pub kill_pubsub_every: Option<Duration>,
    /// Redis for --kill-pubsub-every; defaults to --redis-url.
    #[arg(long)]
    #[serde(skip)]
    pub fault_redis_url: Option<String>,
    /// `AT=COMMAND`: run COMMAND with `sh -c` AT after the measurement starts,
    /// e.g. `5s=kill -9 1234`. Repeatable.
    #[arg(long = "fault-exec", value_name = "AT=COMMAND", value_parser = parse_timed_command)]
    pub fault_exec: Vec<TimedCommand>,
    /// Send SIGTERM to every --pid this long after the measurement starts,
    /// and time how long each takes to exit.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "optional_seconds")]
    pub sigterm_at: Option<Duration>,
    /// Fail unless every process signalled by --sigterm-at exits within this
    /// long of the signal.
    #[arg(long, value_parser = parse_duration, requires = "sigterm_at")]
    #[serde(serialize_with = "optional_seconds")]
    pub exit_within: Option<Duration>,
    /// Stalled readers: extra subscribers (beyond --subscribers) that never
    /// read, with a small receive buffer, so that they stall at once.
    #[arg(long, default_value_t = 0)]
    pub stalled: usize,
    /// SO_RCVBUF of each stalled reader, in bytes.
    #[arg(long, default_value_t = 4096)]
    pub stalled_rcvbuf: u32,
    /// Slowloris sockets: each sends an upgrade request head one byte at a
    /// time and never finishes it; reopened whenever the gateway closes it.
    #[arg(long, default_value_t = 0)]
    pub slowloris: usize,
    /// The pause between two bytes of a slowloris socket.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub slowloris_interval: Duration,
    /// An assertion on the outcome; the tool exits 1 if any fails. Repeatable.
    #[arg(long = "check", value_enum)]
    pub checks: Vec<Check>,
}

/// What `--check` can assert about a `fanout` or `slow` run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    /// Nothing missing, duplicated or reordered, and no subscriber lost its connection.
    Lossless,
    /// Every subscriber missed exactly the messages that never reached the
    /// gateway (refused, failed, or heard by no subscriber in Redis), except
    /// ones whose publish failed after it was sent, which may have run, and
    /// heard ones freed with a killed connection where an announced outage
    /// begins; and nothing was duplicated or reordered.
    LossOnlyInOutage,
    /// Every run of missing messages was followed by a `gap` notice.
    LossAnnounced,
    /// Every subscriber that reads received at least one `gap`.
    GapEverySubscriber,
    /// Every subscriber received a `gap` for each `CLIENT KILL` that killed a connection.
    GapPerKill,
    /// No subscriber that reads lost its connection.
    NoDisconnects,
    /// Each subscriber received a gapless prefix of its channel's messages,
    /// including every message acknowledged before the --sigterm-at signal:
    /// what was queued was flushed before the close.
    FlushedBeforeClose,
    /// Every subscriber that reads was closed by the gateway with 1001.
    #[value(name = "closed-1001")]
    #[serde(rename = "closed-1001")]
    Closed1001,
    /// With --history: every subscriber received every offset its channel's
    /// measured publishes landed at, exactly once and in order, and every
    /// delivery carried an offset.
    OffsetsExact,
    /// No subscriber received a `gap` notice.
    NoGap,
    /// With --history: at least one subscriber resumed with `since`, and
    /// every resume was answered `recovered: true` and replayed what it promised.
    Recovered,
}

/// `--metrics-url` and `--expect-metric`.
#[derive(Debug, Clone, Args, Serialize)]
pub struct MetricsArgs {
    /// A gateway's Prometheus endpoint (`http://HOST:PORT/metrics`), scraped
    /// before and after the run. Repeatable; expectations sum over them.
    #[arg(long = "metrics-url", value_name = "URL")]
    pub metrics_urls: Vec<String>,
    /// An assertion on the gateways' metrics, `[increase(]NAME[{label="v"}][)]`
    /// then an operator (`>=`, `<=`, `==`, `>` or `<`) and a number: on the
    /// last scrape, or on the increase between the two. The tool exits 1 if
    /// any fails. Repeatable.
    #[arg(long = "expect-metric", value_name = "EXPR")]
    pub expect_metrics: Vec<Expectation>,
}

/// A shell command and when to run it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimedCommand {
    #[serde(serialize_with = "seconds")]
    pub at: Duration,
    pub command: String,
}

/// Parses `AT=COMMAND`.
pub fn parse_timed_command(text: &str) -> Result<TimedCommand, String> {
    let (at, command) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected AT=COMMAND, e.g. 5s=kill -9 1234"))?;
    if command.trim().is_empty() {
        return Err(format!("{text:?}: the command is empty"));
    }
    Ok(TimedCommand {
        at: parse_duration(at)?,
        command: command.to_owned(),
    })
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

#[derive(Debug, Clone, Args, Serialize)]
pub struct ChurnArgs {
    /// Waves of connections; each wave connects, then disconnects, all of its connections.
    #[arg(long, default_value_t = 20)]
    pub waves: usize,
    /// Connections per wave. The gateway's memory after the first wave is
    /// the baseline the last wave is compared with.
    #[arg(long, default_value_t = 10_000)]
    pub wave_connections: usize,
    /// Channels each connection subscribes to.
    #[arg(long, default_value_t = 1)]
    pub channels_per_conn: usize,
    /// Distinct channels `load.0 ..`; defaults to --channels-per-conn.
    #[arg(long)]
    pub channel_count: Option<usize>,
    /// New connections per second within a wave.
    #[arg(long, default_value_t = 5000.0)]
    pub rate: f64,
    /// How long each wave's connections stay open once all are attempted
    /// (the gateway is sampled at the end of it).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub hold: Duration,
    /// The pause after each wave's disconnects before the gateway is sampled.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "seconds")]
    pub settle: Duration,
    /// Fail if the gateway's RSS after the last wave exceeds its RSS after
    /// the first by more than this fraction, with the wave's connections
    /// open or once they are closed. Needs --pid.
    #[arg(long)]
    pub rss_tolerance: Option<f64>,
    #[command(flatten)]
    #[serde(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Debug, Clone, Args, Serialize)]
pub struct DrainArgs {
    /// Connections opened to the gateways of --url (the one to stop).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Channels each connection subscribes to.
    #[arg(long, default_value_t = 1)]
    pub channels_per_conn: usize,
    /// Distinct channels `load.0 ..`; defaults to --channels-per-conn.
    #[arg(long)]
    pub channel_count: Option<usize>,
    /// New connections per second while establishing.
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Where a closed connection reconnects (repeatable): connection `i`
    /// uses URL `i mod n`.
    #[arg(long = "reconnect-url", value_name = "URL", required = true)]
    pub reconnect_urls: Vec<String>,
    /// The gateway to stop with SIGTERM once every connection is up.
    #[arg(long, value_name = "PID")]
    pub signal_pid: u32,
    /// Reconnect attempts per connection, with exponential backoff from
    /// 100 ms (plus jitter) between them.
    #[arg(long, default_value_t = 5)]
    pub attempts: u32,
    /// Fail if any 200 ms window holds more than this many times the mean
    /// number of reconnects per 200 ms over the drain.
    #[arg(long)]
    pub max_window_ratio: Option<f64>,
    /// Fail unless the stopped gateway exits within this long of the signal.
    #[arg(long, value_parser = parse_duration)]
    #[serde(serialize_with = "optional_seconds")]
    pub exit_within: Option<Duration>,
    #[command(flatten)]
    #[serde(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ChartArgs {
    /// `NAME=FILE[,FILE...]`: one server's summaries, one point each.
    /// Repeatable, one colour per server; a name may appear once.
    #[arg(long = "series", value_name = "NAME=FILES", value_parser = parse_series, required = true)]
    pub series: Vec<SeriesFiles>,
    /// What the x axis shows.
    #[arg(long, value_enum, default_value_t = ChartX::Deliveries)]
    pub x: ChartX,
    /// The chart's title; by default it names the axes.
    #[arg(long)]
    pub title: Option<String>,
    /// The SVG file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

/// One server's name and its summary files, from `--series NAME=FILE,FILE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesFiles {
    pub name: String,
    pub files: Vec<PathBuf>,
}

/// The quantity on a chart's x axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ChartX {
    /// Deliveries per second measured (`results.deliveries_per_sec`).
    Deliveries,
    /// Publishes per second asked for (`config.rate`).
    Publishes,
}

/// Parses `NAME=FILE[,FILE...]`.
pub fn parse_series(text: &str) -> Result<SeriesFiles, String> {
    let (name, files) = text.split_once('=').ok_or_else(|| {
        format!("{text:?}: expected NAME=FILE[,FILE...], e.g. herald=a.json,b.json")
    })?;
    let name = name.trim();
    if name.is_empty() {
        return Err(format!("{text:?}: the series name is empty"));
    }
    let files: Vec<PathBuf> = files
        .split(',')
        .filter(|file| !file.trim().is_empty())
        .map(PathBuf::from)
        .collect();
    if files.is_empty() {
        return Err(format!("{text:?}: no summary files"));
    }
    Ok(SeriesFiles {
        name: name.to_owned(),
        files,
    })
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

fn optional_seconds<S: Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => serializer.serialize_f64(duration.as_secs_f64()),
        None => serializer.serialize_none(),
    }
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
    fn timed_commands() {
        assert_eq!(
            parse_timed_command("5s=kill -9 12"),
            Ok(TimedCommand {
                at: Duration::from_secs(5),
                command: "kill -9 12".to_owned()
            })
        );
        assert_eq!(
            parse_timed_command("1.5s=a=b").unwrap().command,
            "a=b".to_owned()
        );
        assert!(parse_timed_command("5s").is_err());
        assert!(parse_timed_command("5s= ").is_err());
        assert!(parse_timed_command("soon=true").is_err());
    }

    #[test]
    fn fault_options_parse() {
        let cli = Cli::try_parse_from([
            "herald-loadtest",
            "fanout",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--redis-url",
            "redis://127.0.0.1:2",
            "--kill-pubsub-every",
            "2s",
            "--fault-exec",
            "3s=true",
            "--check",
            "loss-only-in-outage",
            "--check",
            "closed-1001",
            "--expect-metric",
            "increase(herald_broker_reconnects_total)>=1",
        ])
        .unwrap();
        let Command::Fanout(fanout) = cli.command else {
            panic!("expected fanout");
        };
        assert_eq!(
            fanout.faults.kill_pubsub_every,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            fanout.faults.checks,
            [Check::LossOnlyInOutage, Check::Closed1001]
        );
        assert_eq!(fanout.metrics.expect_metrics.len(), 1);
        let json = serde_json::to_value(&fanout).unwrap();
        assert_eq!(json["kill_pubsub_every"], 2.0);
        assert_eq!(json["checks"][1], "closed-1001");
    }

    #[test]
    fn history_options_parse() {
        let cli = Cli::try_parse_from([
            "herald-loadtest",
            "fanout",
            "--url",
            "ws://127.0.0.1:1/ws",
            "--publish",
            "function",
            "--redis-url",
            "redis://127.0.0.1:2",
            "--history",
            "--reconnect-fraction",
            "0.1",
            "--reconnect-every",
            "1.5s",
            "--check",
            "offsets-exact",
            "--check",
            "no-gap",
            "--check",
            "recovered",
        ])
        .unwrap();
        let Command::Fanout(fanout) = cli.command else {
            panic!("expected fanout");
        };
        assert_eq!(fanout.publisher.publish, Some(PublishKind::Function));
        assert!(fanout.history.history);
        assert_eq!(fanout.history.reconnect_every, Duration::from_millis(1500));
        assert_eq!(
            fanout.faults.checks,
            [Check::OffsetsExact, Check::NoGap, Check::Recovered]
        );
        let json = serde_json::to_value(&fanout).unwrap();
        assert_eq!(json["reconnect_fraction"], 0.1);
        assert_eq!(json["checks"][0], "offsets-exact");
        assert_eq!(json["publisher"]["publish"], "function");
        // Reconnecting subscribers resume with since: history only.
        let without =
            Cli::try_parse_from(["herald-loadtest", "fanout", "--reconnect-fraction", "0.1"]);
        assert!(without.is_err());
    }

    #[test]
    fn chart_series_parse() {
        assert_eq!(
            parse_series("herald=a.json,b.json"),
            Ok(SeriesFiles {
                name: "herald".to_owned(),
                files: vec![PathBuf::from("a.json"), PathBuf::from("b.json")],
            })
        );
        assert_eq!(parse_series("floor=c.json,").unwrap().files.len(), 1);
        assert!(parse_series("a.json").is_err());
        assert!(parse_series("=a.json").is_err());
        assert!(parse_series("herald=").is_err());
        let cli = Cli::try_parse_from([
            "herald-loadtest",
            "chart",
            "--series",
            "herald=a.json",
            "--series",
            "floor=b.json",
            "--out",
            "x.svg",
        ])
        .unwrap();
        let Command::Chart(chart) = cli.command else {
            panic!("expected chart");
        };
        assert_eq!(chart.series.len(), 2);
        assert_eq!(chart.x, ChartX::Deliveries);
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
