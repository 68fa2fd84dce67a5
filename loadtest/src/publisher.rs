//! The open-loop publisher: message `i` is intended at `start + i / rate`,
//! carries that intended time as its `ts`, and is handed off without waiting
//! for any earlier message to be acknowledged.
//!
//! A dedicated thread keeps the schedule (a thread's sleep is far more
//! precise than tokio's millisecond timer) and hands messages to sinks:
//! pipelined keep-alive HTTP/1.1 connections to `POST /api/publish`, or one
//! multiplexed Redis connection sending `PUBLISH` or `FCALL herald_publish`
//! (herald's Redis Function for history channels). If a sink falls behind,
//! the hand-off blocks, the schedule slips, and because `ts` is the intended
//! time the delay shows up in the measured latency instead of being hidden.
//!
//! Every message's fate is recorded ([`Fate`]): accepted (with `PUBLISH`, by
//! how many subscribers), refused, or uncertain. The fault scenarios compare
//! each subscriber's missing messages with the ones that never reached the
//! gateway. A publish to a history channel also records where it landed
//! ([`Position`]: the epoch and offset that `herald_publish` or the API
//! answered), which is what subscribers' offsets are checked against. The
//! Redis sink reconnects after its connection is lost, so a publisher
//! outlives a Redis restart.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::http::Uri;

use crate::cli::{PublishArgs, PublishKind};
use crate::client::unix_nanos;
use crate::scan::FieldScanner;
use crate::stats::Reasons;

/// Messages waiting for each sink; when full, the schedule waits.
const SINK_QUEUE: usize = 4096;
/// Requests written to a socket in one go, at most.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Unacknowledged `PUBLISH` or `FCALL` commands allowed on the Redis connection.
const REDIS_IN_FLIGHT: usize = 8192;
/// How long to wait for outstanding acknowledgements after the last message.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `PUBLISH` or `FCALL` may wait for its reply. Longer than a Redis pause
/// a fault scenario applies, so that a paused publish is not counted as failed.
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a (re)connection to Redis may take.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The least time between two reconnection attempts of the Redis sink; in
/// between, messages are refused at once so that the schedule keeps going.
const REDIS_RECONNECT_INTERVAL: Duration = Duration::from_millis(50);

/// Where and how to publish.
#[derive(Debug, Clone)]
pub enum Publisher {
    Api(ApiTarget),
    Redis(RedisTarget),
}

/// `POST /api/publish` on one gateway.
#[derive(Debug, Clone)]
pub struct ApiTarget {
    /// The host name or address to connect to.
    host: String,
    port: u16,
    /// The `Host` header.
    authority: String,
    /// The request path, e.g. `/api/publish`.
    path: String,
    /// The bearer key.
    key: String,
    /// Pipelined keep-alive connections; channel `c` always uses connection
    /// `c % connections`, so each channel's messages stay in order.
    connections: usize,
}

/// A Redis server the gateways subscribe to.
#[derive(Debug, Clone)]
pub struct RedisTarget {
    /// Kept for reconnecting after the connection is lost.
    url: String,
    /// Prepended to channel names, like the gateways' `broker.channel_prefix`.
    prefix: String,
    /// Which command publishes.
    command: RedisCommand,
}

/// How the Redis sink publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisCommand {
    /// `PUBLISH <channel> <payload>`, answered with the number of receivers.
    Publish,
    /// `FCALL herald_publish 1 <channel> <payload>`, answered with
    /// `[epoch, offset]` (`["", 0]` on a channel without history).
    Function,
}

/// The name of herald's publishing function (`src/history/function.rs`).
pub const HERALD_PUBLISH: &str = "herald_publish";

/// What to publish and when.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Channel names; message `i` goes to `channels[i % len]`.
    pub channels: Vec<String>,
    /// Messages per second, in total.
    pub rate: f64,
    /// How many messages, warm-up included.
    pub total: u64,
    /// Size of each JSON payload in bytes.
    pub payload_bytes: usize,
    /// When message 0 is intended, in unix nanoseconds.
    pub start_unix_nanos: i64,
}

/// What the publisher did.
#[derive(Debug, Clone, Default)]
pub struct PublishReport {
    /// Messages the gateway (HTTP 2xx) or Redis acknowledged.
    pub acknowledged: u64,
    /// Messages that failed, by reason.
    pub errors: Reasons,
    /// Messages handed off per channel; sequence numbers `0..n` were used.
    pub sent_per_channel: Vec<u64>,
    /// What became of each message: `records[channel][seq]`.
    pub records: Vec<Vec<Record>>,
    /// Accepted messages that Redis delivered to nobody (`PUBLISH` answered 0).
    pub unheard: u64,
    /// The worst delay between a message's intended time and its hand-off.
    pub max_lag: Duration,
    /// When the last answer or failure came, in unix nanoseconds; 0 if none did.
    pub last_settled_unix_nanos: i64,
}

/// What became of one message, as far as the publisher can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fate {
    /// No answer came before the run ended.
    #[default]
    Unanswered,
    /// Accepted: an HTTP 2xx (`receivers` unknown), or Redis's reply to
    /// `PUBLISH`: how many subscribers, that is gateway nodes, received it.
    Accepted { receivers: Option<u64> },
    /// Refused before it could run: an HTTP 4xx, or no connection to send it on.
    Refused,
    /// Failed after it was sent, so it may have run: an I/O error, a
    /// timeout, or an HTTP 5xx (herald answers 503 when its own `PUBLISH`
    /// failed, which Redis may have run).
    Uncertain,
}

impl Fate {
    /// Whether the message certainly reached the gateways: accepted, and
    /// (with Redis) heard by at least one subscriber.
    pub fn reached(self) -> bool {
        match self {
            Fate::Accepted { receivers } => receivers != Some(0),
            Fate::Unanswered | Fate::Refused | Fate::Uncertain => false,
        }
    }

    /// Whether it is unknown if the message reached the gateways.
    pub fn uncertain(self) -> bool {
        matches!(self, Fate::Unanswered | Fate::Uncertain)
    }
}

/// One message's fate and when it was settled.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub fate: Fate,
    /// When the answer or the failure came, in unix nanoseconds; 0 while unanswered.
    pub settled_at_unix_nanos: i64,
    /// Where an accepted publish to a history channel landed.
    pub position: Option<Position>,
}

/// Where a publish to a history channel landed: the channel's epoch and the
/// message's offset in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// Shared by every record of one epoch.
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// A message's place: its channel index and sequence number.
type Slot = (usize, u64);

/// One connection's share of the work and what came of it.
struct Sink {
    queue: mpsc::Sender<Outgoing>,
    done: tokio::task::JoinHandle<SinkReport>,
}

#[derive(Debug, Default)]
struct SinkReport {
    acknowledged: u64,
    errors: Reasons,
    /// Fates of the messages this sink settled.
    settled: Vec<(Slot, Record)>,
    /// The epoch of the last position settled, so that records share it.
    last_epoch: Option<Arc<str>>,
}

impl SinkReport {
    fn settle(&mut self, slot: Slot, fate: Fate) {
        self.settle_at(slot, fate, None);
    }

    /// Settles a message with where it landed (`epoch`, `offset`), if it
    /// went to a history channel.
    fn settle_at(&mut self, slot: Slot, fate: Fate, landed: Option<(&str, u64)>) {
        let position = landed.map(|(epoch, offset)| {
            let epoch = match &self.last_epoch {
                Some(last) if **last == *epoch => last.clone(),
                _ => {
                    let epoch: Arc<str> = epoch.into();
                    self.last_epoch = Some(epoch.clone());
                    epoch
                }
            };
            Position { epoch, offset }
        });
        self.settled.push((
            slot,
            Record {
                fate,
                settled_at_unix_nanos: unix_nanos(),
                position,
            },
        ));
    }

    fn merge(&mut self, other: SinkReport) {
        self.acknowledged += other.acknowledged;
        self.errors.merge(&other.errors);
        self.settled.extend(other.settled);
    }
}

/// One message on its way to a sink.
struct Outgoing {
    channel: usize,
    seq: u64,
    payload: Vec<u8>,
}

impl Publisher {
    /// Chooses and checks the publisher from the command line.
    pub fn from_args(args: &PublishArgs) -> anyhow::Result<Publisher> {
        let kind = match args.publish {
            Some(kind) => kind,
            None if args.api_url.is_some() => PublishKind::Api,
            None if args.redis_url.is_some() => PublishKind::Redis,
            None => bail!("choose a publisher: --api-url URL --api-key KEY, or --redis-url URL"),
        };
        match kind {
            PublishKind::Api => {
                let url = args
                    .api_url
                    .as_deref()
                    .context("--publish api needs --api-url")?;
                let key = args
                    .api_key
                    .clone()
                    .context("--publish api needs --api-key")?;
                let uri: Uri = url
                    .parse()
                    .with_context(|| format!("invalid --api-url {url:?}"))?;
                if uri.scheme_str() != Some("http") {
                    bail!("--api-url must be http:// (no TLS)");
                }
                let host = uri.host().context("--api-url has no host")?;
                Ok(Publisher::Api(ApiTarget {
                    host: host
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_owned(),
                    port: uri.port_u16().unwrap_or(80),
                    authority: uri
                        .authority()
                        .map(|authority| authority.to_string())
                        .unwrap_or_else(|| host.to_owned()),
                    path: uri
                        .path_and_query()
                        .map(|path| path.to_string())
                        .unwrap_or_else(|| "/api/publish".to_owned()),
                    key,
                    connections: args.api_connections.max(1),
                }))
            }
            PublishKind::Redis | PublishKind::Function => Ok(Publisher::Redis(RedisTarget {
                url: args
                    .redis_url
                    .clone()
                    .context("--publish redis and --publish function need --redis-url")?,
                prefix: args.channel_prefix.clone(),
                command: if kind == PublishKind::Function {
                    RedisCommand::Function
                } else {
                    RedisCommand::Publish
                },
            })),
        }
    }

    /// Connects to the gateway or Redis before the schedule starts, so that
    /// connecting is not measured.
    pub async fn connect(&self, channels: &[String]) -> anyhow::Result<Connected> {
        let channels = Arc::new(channels.to_vec());
        let sinks = match self {
            Publisher::Api(target) => {
                let address = tokio::net::lookup_host((target.host.as_str(), target.port))
                    .await
                    .with_context(|| format!("resolving {}", target.host))?
                    .next()
                    .with_context(|| format!("{} has no address", target.host))?;
                let used = target.connections.min(channels.len()).max(1);
                let mut sinks = Vec::with_capacity(used);
                for _ in 0..used {
                    let stream = TcpStream::connect(address)
                        .await
                        .with_context(|| format!("connecting to {address}"))?;
                    stream.set_nodelay(true).context("setting TCP_NODELAY")?;
                    let (queue, receiver) = mpsc::channel(SINK_QUEUE);
                    let done = tokio::spawn(api_connection(
                        stream,
                        target.clone(),
                        channels.clone(),
                        receiver,
                    ));
                    sinks.push(Sink { queue, done });
                }
                sinks
            }
            Publisher::Redis(target) => {
                let client =
                    redis::Client::open(target.url.as_str()).context("invalid --redis-url")?;
                let connection = redis_connect(&client)
                    .await
                    .context("connecting to Redis")?;
                let names: Vec<String> = channels
                    .iter()
                    .map(|channel| format!("{}{channel}", target.prefix))
                    .collect();
                let (queue, receiver) = mpsc::channel(SINK_QUEUE);
                let done = tokio::spawn(redis_connection(
                    client,
                    connection,
                    target.command,
                    names,
                    receiver,
                ));
                vec![Sink { queue, done }]
            }
        };
        Ok(Connected { sinks })
    }
}

/// A publisher with its connections open, ready to run a schedule.
pub struct Connected {
    sinks: Vec<Sink>,
}

impl Connected {
    /// Publishes `schedule` (whose channels must be those given to
    /// [`Publisher::connect`]), then waits for the acknowledgements.
    pub async fn run(self, schedule: Schedule) -> anyhow::Result<PublishReport> {
        let (queues, done): (Vec<_>, Vec<_>) = self
            .sinks
            .into_iter()
            .map(|sink| (sink.queue, sink.done))
            .unzip();
        let (mut report, refused) =
            tokio::task::spawn_blocking(move || keep_schedule(&schedule, queues))
                .await
                .context("the publisher's schedule thread failed")?;
        let mut settled = refused;
        for sink in done {
            settled.merge(sink.await.context("a publisher connection task failed")?);
        }
        report.acknowledged = settled.acknowledged;
        report.errors.merge(&settled.errors);
        report.records = report
            .sent_per_channel
            .iter()
            .map(|&sent| vec![Record::default(); sent as usize])
            .collect();
        for ((channel, seq), record) in settled.settled {
            if let Fate::Accepted { receivers: Some(0) } = record.fate {
                report.unheard += 1;
            }
            report.last_settled_unix_nanos = report
                .last_settled_unix_nanos
                .max(record.settled_at_unix_nanos);
            if let Some(slot) = report
                .records
                .get_mut(channel)
                .and_then(|records| records.get_mut(seq as usize))
            {
                *slot = record;
            }
        }
        Ok(report)
    }
}

/// The payload of message `seq` intended at `ts`: a JSON object padded with
/// `x` to `bytes` in total (or a little more when `bytes` is tiny).
pub fn payload(seq: u64, ts: i64, bytes: usize) -> Vec<u8> {
    let head = format!(r#"{{"seq":{seq},"ts":{ts},"pad":""#);
    let pad = bytes.saturating_sub(head.len() + 2);
    let mut out = Vec::with_capacity(head.len() + pad + 2);
    out.extend_from_slice(head.as_bytes());
    out.resize(head.len() + pad, b'x');
    out.extend_from_slice(b"\"}");
    out
}

/// The schedule thread: sleeps until each message is due and hands it to
/// its channel's sink. Dropping the queues at the end tells the sinks to
/// finish. Also returns the messages no sink would take.
fn keep_schedule(
    schedule: &Schedule,
    queues: Vec<mpsc::Sender<Outgoing>>,
) -> (PublishReport, SinkReport) {
    let mut refused = SinkReport::default();
    let channels = schedule.channels.len().max(1);
    let mut report = PublishReport {
        sent_per_channel: vec![0; channels],
        ..PublishReport::default()
    };
    let ahead = schedule.start_unix_nanos.saturating_sub(unix_nanos());
    let start = std::time::Instant::now() + Duration::from_nanos(u64::try_from(ahead).unwrap_or(0));
    let interval_nanos = 1e9 / schedule.rate;
    for index in 0..schedule.total {
        let offset = Duration::from_nanos((index as f64 * interval_nanos) as u64);
        let due = start + offset;
        let now = std::time::Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let channel = index as usize % channels;
        let seq = index / channels as u64;
        let ts = schedule.start_unix_nanos + offset.as_nanos() as i64;
        let message = Outgoing {
            channel,
            seq,
            payload: payload(seq, ts, schedule.payload_bytes),
        };
        // The sequence number is used whether or not the hand-off works, so
        // that a failure shows up as missing messages.
        report.sent_per_channel[channel] += 1;
        if queues[channel % queues.len()]
            .blocking_send(message)
            .is_err()
        {
            report.errors.add("publisher connection lost");
            refused.settle((channel, seq), Fate::Refused);
        }
        report.max_lag = report.max_lag.max(due.elapsed());
    }
    (report, refused)
}

/// One pipelined HTTP/1.1 connection: a writer sends requests as they come,
/// a reader counts responses; neither waits for the other. Responses come
/// in request order, so the reader settles the oldest request written.
async fn api_connection(
    stream: TcpStream,
    target: ApiTarget,
    channels: Arc<Vec<String>>,
    mut queue: mpsc::Receiver<Outgoing>,
) -> SinkReport {
    let (reader, mut writer) = stream.into_split();
    let (written_sender, written) = watch::channel(None);
    let pending: Pending = Arc::default();
    let responses = tokio::spawn(read_responses(reader, written, pending.clone()));
    let mut report = SinkReport::default();
    let mut buffer = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut batch: Vec<Slot> = Vec::new();
    let mut written_count = 0u64;
    let mut lost = 0u64;
    while let Some(message) = queue.recv().await {
        encode_request(
            &target,
            &channels[message.channel],
            &message.payload,
            &mut buffer,
        );
        batch.push((message.channel, message.seq));
        while buffer.len() < WRITE_BATCH_BYTES {
            let Ok(message) = queue.try_recv() else {
                break;
            };
            encode_request(
                &target,
                &channels[message.channel],
                &message.payload,
                &mut buffer,
            );
            batch.push((message.channel, message.seq));
        }
        // Listed before they are written, so that a fast response finds them.
        pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(batch.iter().copied());
        if let Err(error) = writer.write_all(&buffer).await {
            report.errors.add(format!("api io {:?}", error.kind()));
            lost += batch.len() as u64;
            // Part of the batch may have gone out; the reader settles it as
            // uncertain. Whatever is still queued never went out.
            queue.close();
            while let Some(message) = queue.recv().await {
                lost += 1;
                report.settle((message.channel, message.seq), Fate::Refused);
            }
            written_count += batch.len() as u64;
            break;
        }
        written_count += batch.len() as u64;
        batch.clear();
        buffer.clear();
    }
    report.errors.add_count("api connection failed", lost);
    let _ = written_sender.send(Some(written_count));
    match responses.await {
        Ok(responses) => report.merge(responses),
        Err(_) => report.errors.add("api response reader failed"),
    }
    // Requests that never got a response may or may not have run.
    for slot in pending
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .drain(..)
    {
        report.settle(slot, Fate::Uncertain);
    }
    report
}

/// Requests written on one API connection and not yet answered, oldest first.
type Pending = Arc<Mutex<VecDeque<Slot>>>;

fn encode_request(target: &ApiTarget, channel: &str, payload: &[u8], out: &mut Vec<u8>) {
    let body_head = br#"{"channel":""#;
    let body_middle = br#"","data":"#;
    let length = body_head.len() + channel.len() + body_middle.len() + payload.len() + 1;
    out.extend_from_slice(
        format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n",
            target.path, target.authority, target.key
        )
        .as_bytes(),
    );
    out.extend_from_slice(body_head);
    out.extend_from_slice(channel.as_bytes());
    out.extend_from_slice(body_middle);
    out.extend_from_slice(payload);
    out.push(b'}');
}

/// Counts responses until as many arrived as requests were written (known
/// once the writer is done), the connection ends, or [`ACK_TIMEOUT`] passes
/// after the writer is done.
async fn read_responses(
    mut reader: OwnedReadHalf,
    mut written: watch::Receiver<Option<u64>>,
    pending: Pending,
) -> SinkReport {
    let mut report = SinkReport::default();
    let mut buffer = Vec::with_capacity(16 * 1024);
    let mut received = 0u64;
    let mut deadline: Option<Instant> = None;
    loop {
        loop {
            match parse_response(&buffer) {
                Ok(Some(response)) => {
                    received += 1;
                    let mut landed = None;
                    let fate = if (200..300).contains(&response.status) {
                        report.acknowledged += 1;
                        landed = landed_in(&buffer[response.body.clone()]);
                        Fate::Accepted { receivers: None }
                    } else {
                        report.errors.add(format!("http {}", response.status));
                        if response.status >= 500 {
                            Fate::Uncertain
                        } else {
                            Fate::Refused
                        }
                    };
                    let slot = pending
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .pop_front();
                    if let Some(slot) = slot {
                        let landed = landed
                            .as_ref()
                            .map(|(epoch, offset)| (epoch.as_str(), *offset));
                        report.settle_at(slot, fate, landed);
                    }
                    buffer.drain(..response.used);
                }
                Ok(None) => break,
                Err(problem) => {
                    report.errors.add(format!("api {problem}"));
                    return finish_responses(report, received, *written.borrow());
                }
            }
        }
        let total = *written.borrow_and_update();
        if let Some(total) = total {
            if received >= total {
                return report;
            }
            deadline.get_or_insert_with(|| Instant::now() + ACK_TIMEOUT);
        }
        tokio::select! {
            read = reader.read_buf(&mut buffer) => match read {
                Ok(0) | Err(_) => {
                    let total = wait_for_total(&mut written).await;
                    return finish_responses(report, received, Some(total));
                }
                Ok(_) => {}
            },
            changed = written.changed(), if total.is_none() => {
                if changed.is_err() {
                    return finish_responses(report, received, None);
                }
            }
            _ = sleep_until_option(deadline) => {
                return finish_responses(report, received, total);
            }
        }
    }
}

/// Records requests that never got a response.
fn finish_responses(mut report: SinkReport, received: u64, written: Option<u64>) -> SinkReport {
    report.errors.add_count(
        "no response",
        written.unwrap_or(received).saturating_sub(received),
    );
    report
}

async fn wait_for_total(written: &mut watch::Receiver<Option<u64>>) -> u64 {
    loop {
        if let Some(total) = *written.borrow_and_update() {
            return total;
        }
        if written.changed().await.is_err() {
            return 0;
        }
    }
}

async fn sleep_until_option(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// One HTTP/1.1 response at the start of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of the buffer the response takes, head and body.
    pub used: usize,
    /// Where its body lies in the buffer.
    pub body: std::ops::Range<usize>,
}

/// The position in a publish API answer on a history channel,
/// `{"ok":true,"offset":N,"epoch":"..."}`; `None` for a plain channel's `{"ok":true}`.
fn landed_in(body: &[u8]) -> Option<(String, u64)> {
    let offset = FieldScanner::new("offset").find(body)?;
    let epoch = FieldScanner::new("epoch").find_string(body)?;
    Some((
        String::from_utf8_lossy(epoch).into_owned(),
        u64::try_from(offset).ok()?,
    ))
}

/// Parses one HTTP/1.1 response with a `Content-Length` body at the start of
/// `buffer`, or `None` if it is not complete yet.
pub fn parse_response(buffer: &[u8]) -> Result<Option<Response>, &'static str> {
    let Some(head_end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head =
        std::str::from_utf8(&buffer[..head_end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or("malformed status line")?;
    let mut length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = value.trim().parse().map_err(|_| "bad content-length")?;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked responses are not supported");
        }
    }
    let total = head_end + 4 + length;
    Ok((buffer.len() >= total).then_some(Response {
        status,
        used: total,
        body: head_end + 4..total,
    }))
}

async fn redis_connect(
    client: &redis::Client,
) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    // Room for every command in flight in the connection's queue: a send
    // then never waits, so commands are queued in the order they were
    // pushed. With the default of 50, sends that waited for room overtook
    // one another and Redis ran them out of order under saturation.
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_CONNECT_TIMEOUT))
        .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
        .set_pipeline_buffer_size(REDIS_IN_FLIGHT);
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// Sends `PUBLISH` or `FCALL` for every message on one multiplexed connection, keeping
/// up to [`REDIS_IN_FLIGHT`] unacknowledged. Commands are first polled in the
/// order they were pushed, so they reach Redis in order.
///
/// When the connection breaks, nothing new is sent on it; once the commands
/// in flight have failed, a new connection is tried (at most every
/// [`REDIS_RECONNECT_INTERVAL`]), and messages that arrive while there is
/// none are refused at once, so that the schedule keeps going and the order
/// of what is sent is kept.
async fn redis_connection(
    client: redis::Client,
    first: redis::aio::MultiplexedConnection,
    kind: RedisCommand,
    channels: Vec<String>,
    mut queue: mpsc::Receiver<Outgoing>,
) -> SinkReport {
    let mut report = SinkReport::default();
    let mut connection = Some(first);
    let mut next_attempt = Instant::now();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some((slot, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if let Err(error) = &result {
                    if broken(error) {
                        connection = None;
                    }
                }
                tally_redis(&mut report, slot, result);
            }
            message = queue.recv(), if open && in_flight.len() < REDIS_IN_FLIGHT => match message {
                Some(message) => {
                    let slot = (message.channel, message.seq);
                    if connection.is_none() && in_flight.is_empty() && Instant::now() >= next_attempt {
                        next_attempt = Instant::now() + REDIS_RECONNECT_INTERVAL;
                        connection = redis_connect(&client).await.ok();
                    }
                    let Some(connection) = connection.clone() else {
                        report.errors.add("redis not connected");
                        report.settle(slot, Fate::Refused);
                        continue;
                    };
                    let mut connection = connection;
                    let command = redis_command(kind, &channels[message.channel], message.payload);
                    // Outside tokio's cooperative budget: a send that the
                    // budget made yield was woken to the back of
                    // `in_flight`'s queue, behind commands not yet polled,
                    // which then reached Redis first (the order test failed
                    // about one run in three).
                    in_flight.push(tokio::task::unconstrained(async move {
                        let answer = match kind {
                            RedisCommand::Publish => command
                                .query_async::<u64>(&mut connection)
                                .await
                                .map(Answer::Receivers),
                            RedisCommand::Function => command
                                .query_async::<(String, u64)>(&mut connection)
                                .await
                                .map(|(epoch, offset)| Answer::Landed(epoch, offset)),
                        };
                        (slot, answer)
                    }));
                }
                None => open = false,
            },
        }
    }
    report
}

/// Whether an error means the connection is gone.
fn broken(error: &redis::RedisError) -> bool {
    error.is_io_error() || error.is_unrecoverable_error() || error.is_connection_dropped()
}

/// The command that publishes `payload` on `channel` (its Redis name).
fn redis_command(kind: RedisCommand, channel: &str, payload: Vec<u8>) -> redis::Cmd {
    match kind {
        RedisCommand::Publish => redis::cmd("PUBLISH").arg(channel).arg(payload).to_owned(),
        RedisCommand::Function => redis::cmd("FCALL")
            .arg(HERALD_PUBLISH)
            .arg(1)
            .arg(channel)
            .arg(payload)
            .to_owned(),
    }
}

/// Redis's answer to one publish.
enum Answer {
    /// `PUBLISH`: how many subscribers (gateway nodes) received it.
    Receivers(u64),
    /// `herald_publish`: the epoch and offset; `""` and 0 without history.
    Landed(String, u64),
}

fn tally_redis(report: &mut SinkReport, slot: Slot, result: redis::RedisResult<Answer>) {
    match result {
        Ok(Answer::Receivers(receivers)) => {
            report.acknowledged += 1;
            report.settle(
                slot,
                Fate::Accepted {
                    receivers: Some(receivers),
                },
            );
        }
        Ok(Answer::Landed(epoch, offset)) => {
            report.acknowledged += 1;
            // Nobody tells how many nodes heard it; on a history channel a
            // node that missed it fetches it from the stream.
            let landed = (offset > 0).then_some((epoch.as_str(), offset));
            report.settle_at(slot, Fate::Accepted { receivers: None }, landed);
        }
        Err(error) => {
            report.errors.add(format!("redis {:?}", error.kind()));
            report.settle(slot, Fate::Uncertain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_have_the_requested_size_and_fields() {
        let text = payload(12, 1_700_000_000_000_000_000, 100);
        assert_eq!(text.len(), 100);
        let value: serde_json::Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(value["seq"], 12);
        assert_eq!(value["ts"], 1_700_000_000_000_000_000i64);
        let tiny = payload(1, 2, 1);
        assert_eq!(tiny, br#"{"seq":1,"ts":2,"pad":""}"#);
    }

    #[test]
    fn responses_are_parsed_one_at_a_time() {
        let two = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\":true}HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
        let first = parse_response(two).unwrap().unwrap();
        assert_eq!(first.status, 200);
        assert_eq!(&two[first.body.clone()], br#"{"ok":true}"#);
        let second = parse_response(&two[first.used..]).unwrap().unwrap();
        assert_eq!((second.status, first.used + second.used), (503, two.len()));
        assert!(second.body.is_empty());
        assert_eq!(parse_response(&two[..20]).unwrap(), None);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\"").unwrap(),
            None
        );
        assert!(parse_response(b"nonsense\r\n\r\n").is_err());
    }

    #[test]
    fn api_answers_on_history_channels_carry_a_position() {
        assert_eq!(
            landed_in(br#"{"ok":true,"offset":42,"epoch":"Kx3d"}"#),
            Some(("Kx3d".to_owned(), 42))
        );
        assert_eq!(landed_in(br#"{"ok":true}"#), None);
        assert_eq!(landed_in(br#"{"ok":true,"offset":42}"#), None);
    }

    #[test]
    fn redis_commands_follow_the_mode() {
        let packed = |kind| {
            String::from_utf8(
                redis_command(kind, "lt:fanout.0", b"{}".to_vec()).get_packed_command(),
            )
            .unwrap()
        };
        assert_eq!(
            packed(RedisCommand::Publish),
            "*3\r\n$7\r\nPUBLISH\r\n$11\r\nlt:fanout.0\r\n$2\r\n{}\r\n"
        );
        assert_eq!(
            packed(RedisCommand::Function),
            "*5\r\n$5\r\nFCALL\r\n$14\r\nherald_publish\r\n$1\r\n1\r\n$11\r\nlt:fanout.0\r\n$2\r\n{}\r\n"
        );
    }

    #[test]
    fn positions_of_one_epoch_share_their_text() {
        let mut report = SinkReport::default();
        report.settle_at((0, 0), Fate::Accepted { receivers: None }, Some(("E1", 1)));
        report.settle_at((0, 1), Fate::Accepted { receivers: None }, Some(("E1", 2)));
        report.settle_at((0, 2), Fate::Accepted { receivers: None }, Some(("E2", 1)));
        report.settle((0, 3), Fate::Refused);
        let positions: Vec<Option<Position>> = report
            .settled
            .iter()
            .map(|(_, record)| record.position.clone())
            .collect();
        let first = positions[0].clone().unwrap();
        let second = positions[1].clone().unwrap();
        assert!(Arc::ptr_eq(&first.epoch, &second.epoch));
        assert_eq!((&*second.epoch, second.offset), ("E1", 2));
        assert_eq!(positions[2].as_ref().map(|p| &*p.epoch), Some("E2"));
        assert_eq!(positions[3], None);
    }

    #[test]
    fn requests_carry_the_channel_and_payload() {
        let target = ApiTarget {
            host: "127.0.0.1".to_owned(),
            port: 1,
            authority: "127.0.0.1:1".to_owned(),
            path: "/api/publish".to_owned(),
            key: "k".to_owned(),
            connections: 1,
        };
        let mut out = Vec::new();
        encode_request(&target, "fanout.0", br#"{"seq":0}"#, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("POST /api/publish HTTP/1.1\r\n"));
        assert!(head.contains(&format!("Content-Length: {}", body.len())));
        assert_eq!(body, r#"{"channel":"fanout.0","data":{"seq":0}}"#);
    }
}
