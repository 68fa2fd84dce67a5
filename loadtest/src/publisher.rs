//! The open-loop publisher: message `i` is intended at `start + i / rate`,
//! carries that intended time as its `ts`, and is handed off without waiting
//! for any earlier message to be acknowledged.
//!
//! A dedicated thread keeps the schedule (a thread's sleep is far more
//! precise than tokio's millisecond timer) and hands messages to sinks:
//! pipelined keep-alive HTTP/1.1 connections to `POST /api/publish`, or one
//! multiplexed Redis connection sending `PUBLISH`. If a sink falls behind, the
//! hand-off blocks, the schedule slips, and because `ts` is the intended time
//! the delay shows up in the measured latency instead of being hidden.

use std::sync::Arc;
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
use crate::stats::Reasons;

/// Messages waiting for each sink; when full, the schedule waits.
const SINK_QUEUE: usize = 4096;
/// Requests written to a socket in one go, at most.
const WRITE_BATCH_BYTES: usize = 64 * 1024;
/// Unacknowledged `PUBLISH` commands allowed on the Redis connection.
const REDIS_IN_FLIGHT: usize = 8192;
/// How long to wait for outstanding acknowledgements after the last message.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

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
    url: String,
    /// Prepended to channel names, like the gateways' `broker.channel_prefix`.
    prefix: String,
}

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
    /// The worst delay between a message's intended time and its hand-off.
    pub max_lag: Duration,
}

/// One connection's share of the work and what came of it.
struct Sink {
    queue: mpsc::Sender<Outgoing>,
    done: tokio::task::JoinHandle<SinkReport>,
}

#[derive(Debug, Default)]
struct SinkReport {
    acknowledged: u64,
    errors: Reasons,
}

/// One message on its way to a sink.
struct Outgoing {
    channel: usize,
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
            PublishKind::Redis => Ok(Publisher::Redis(RedisTarget {
                url: args
                    .redis_url
                    .clone()
                    .context("--publish redis needs --redis-url")?,
                prefix: args.channel_prefix.clone(),
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
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(Duration::from_secs(5)))
                    .set_response_timeout(Some(ACK_TIMEOUT));
                let connection = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await
                    .context("connecting to Redis")?;
                let names: Vec<String> = channels
                    .iter()
                    .map(|channel| format!("{}{channel}", target.prefix))
                    .collect();
                let (queue, receiver) = mpsc::channel(SINK_QUEUE);
                let done = tokio::spawn(redis_connection(connection, names, receiver));
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
        let mut report = tokio::task::spawn_blocking(move || keep_schedule(&schedule, queues))
            .await
            .context("the publisher's schedule thread failed")?;
        for sink in done {
            let sink = sink.await.context("a publisher connection task failed")?;
            report.acknowledged += sink.acknowledged;
            report.errors.merge(&sink.errors);
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
/// finish.
fn keep_schedule(schedule: &Schedule, queues: Vec<mpsc::Sender<Outgoing>>) -> PublishReport {
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
        }
        report.max_lag = report.max_lag.max(due.elapsed());
    }
    report
}

/// One pipelined HTTP/1.1 connection: a writer sends requests as they come,
/// a reader counts responses; neither waits for the other.
async fn api_connection(
    stream: TcpStream,
    target: ApiTarget,
    channels: Arc<Vec<String>>,
    mut queue: mpsc::Receiver<Outgoing>,
) -> SinkReport {
    let (reader, mut writer) = stream.into_split();
    let (written_sender, written) = watch::channel(None);
    let responses = tokio::spawn(read_responses(reader, written));
    let mut report = SinkReport::default();
    let mut buffer = Vec::with_capacity(WRITE_BATCH_BYTES);
    let mut written_count = 0u64;
    let mut lost = 0u64;
    while let Some(message) = queue.recv().await {
        let mut batch = 1;
        encode_request(
            &target,
            &channels[message.channel],
            &message.payload,
            &mut buffer,
        );
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
            batch += 1;
        }
        if let Err(error) = writer.write_all(&buffer).await {
            report.errors.add(format!("api io {:?}", error.kind()));
            lost += batch;
            // Count whatever is still queued as lost too.
            queue.close();
            while queue.recv().await.is_some() {
                lost += 1;
            }
            break;
        }
        written_count += batch;
        buffer.clear();
    }
    report.errors.add_count("api connection failed", lost);
    let _ = written_sender.send(Some(written_count));
    match responses.await {
        Ok(responses) => {
            report.acknowledged += responses.acknowledged;
            report.errors.merge(&responses.errors);
        }
        Err(_) => report.errors.add("api response reader failed"),
    }
    report
}

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
) -> SinkReport {
    let mut report = SinkReport::default();
    let mut buffer = Vec::with_capacity(16 * 1024);
    let mut received = 0u64;
    let mut deadline: Option<Instant> = None;
    loop {
        loop {
            match parse_response(&buffer) {
                Ok(Some((status, used))) => {
                    buffer.drain(..used);
                    received += 1;
                    if (200..300).contains(&status) {
                        report.acknowledged += 1;
                    } else {
                        report.errors.add(format!("http {status}"));
                    }
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

/// Parses one HTTP/1.1 response with a `Content-Length` body at the start of
/// `buffer`: `(status, bytes used)`, or `None` if it is not complete yet.
pub fn parse_response(buffer: &[u8]) -> Result<Option<(u16, usize)>, &'static str> {
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
    Ok((buffer.len() >= total).then_some((status, total)))
}

/// Sends `PUBLISH` for every message on one multiplexed connection, keeping
/// up to [`REDIS_IN_FLIGHT`] unacknowledged. Commands are first polled in the
/// order they were pushed, so they reach Redis in order.
async fn redis_connection(
    connection: redis::aio::MultiplexedConnection,
    channels: Vec<String>,
    mut queue: mpsc::Receiver<Outgoing>,
) -> SinkReport {
    let mut report = SinkReport::default();
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    while open || !in_flight.is_empty() {
        tokio::select! {
            biased;
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                tally_redis(&mut report, result);
            }
            message = queue.recv(), if open && in_flight.len() < REDIS_IN_FLIGHT => match message {
                Some(message) => {
                    let mut connection = connection.clone();
                    let command = redis::cmd("PUBLISH")
                        .arg(&channels[message.channel])
                        .arg(message.payload)
                        .to_owned();
                    in_flight.push(async move {
                        command.query_async::<i64>(&mut connection).await
                    });
                }
                None => open = false,
            },
        }
    }
    report
}

fn tally_redis(report: &mut SinkReport, result: redis::RedisResult<i64>) {
    match result {
        Ok(_) => report.acknowledged += 1,
        Err(error) => report.errors.add(format!("redis {:?}", error.kind())),
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
        let (status, used) = parse_response(two).unwrap().unwrap();
        assert_eq!(status, 200);
        let (status, rest) = parse_response(&two[used..]).unwrap().unwrap();
        assert_eq!((status, used + rest), (503, two.len()));
        assert_eq!(parse_response(&two[..20]).unwrap(), None);
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"ok\"").unwrap(),
            None
        );
        assert!(parse_response(b"nonsense\r\n\r\n").is_err());
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
