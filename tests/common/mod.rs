//! Test harness: real nodes on `127.0.0.1:0`, a real WebSocket client
//! (tokio-tungstenite, not the server's fastwebsockets), a raw-frame client for
//! misbehaving peers, and a small HTTP client.
#![allow(dead_code)]

pub mod redis_server;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use herald::config::{ChannelRule, Config, Secret, SlowPolicy};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{self, Message, protocol::CloseFrame};

pub const SECRET: &str = "test-secret-0123456789abcdef0123456789";
pub const API_KEY: &str = "test-api-key-0123456789";

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(5);

/// A configuration suitable for tests: known secrets, quick drain.
pub fn test_config() -> Config {
    let mut config = Config::default();
    config.node.id = Some("test-node".into());
    config.auth.hmac_secret = Some(Secret::new(SECRET));
    config.api.key = Some(Secret::new(API_KEY));
    config.shutdown.timeout = Duration::from_secs(5);
    // Close at once; the paced drain has its own tests.
    config.shutdown.drain_period = Duration::ZERO;
    // Every test client comes from 127.0.0.1; the per-address attempt limit
    // has its own tests.
    config.limits.connection_rate_per_ip = 0.0;
    // Every test also exercises direct delivery, which is off by default.
    config.server.direct_delivery = true;
    config
}

/// A node running in this test's runtime.
pub struct TestNode {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    hurry: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), herald::StartError>>,
}

impl TestNode {
    pub async fn start() -> TestNode {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> TestNode {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("HERALD_TEST_LOG").unwrap_or_else(|_| "warn".into()))
            .with_test_writer()
            .try_init();
        let mut config = test_config();
        adjust(&mut config);
        config.validate().expect("test configuration is valid");
        herald::check_config(&config).expect("test configuration is valid");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let (hurry, hurried) = oneshot::channel::<()>();
        let handle = tokio::spawn(herald::run_with_hurry(
            listener,
            config,
            async move {
                let _ = stopped.await;
            },
            async move {
                // A dropped sender is not a second signal.
                if hurried.await.is_err() {
                    std::future::pending::<()>().await;
                }
            },
        ));
        TestNode {
            addr,
            stop: Some(stop),
            hurry: Some(hurry),
            handle,
        }
    }

    /// Starts the drain and waits for `run` to return.
    pub async fn shutdown(mut self) -> Result<(), herald::StartError> {
        self.begin_shutdown();
        self.wait().await
    }

    /// Starts the drain, as a first SIGTERM does.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Skips the drain's pacing, as a second SIGTERM does.
    pub fn hurry(&mut self) {
        if let Some(hurry) = self.hurry.take() {
            let _ = hurry.send(());
        }
    }

    /// Waits for `run` to return.
    pub async fn wait(mut self) -> Result<(), herald::StartError> {
        (&mut self.handle).await.unwrap()
    }

    pub fn ws_url(&self, token: &str) -> String {
        format!("ws://{}/ws?token={token}", self.addr)
    }

    pub async fn client(&self, channels: &[&str]) -> Client {
        Client::connect(&self.ws_url(&token("user", channels))).await
    }

    pub async fn publish(&self, channel: &str, data: Value) -> (u16, Value) {
        let (status, body) = http(
            self.addr,
            "POST",
            "/api/publish",
            &[("authorization", &format!("Bearer {API_KEY}"))],
            json!({"channel": channel, "data": data}).to_string(),
        )
        .await;
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }

    pub async fn metrics(&self) -> String {
        http(self.addr, "GET", "/metrics", &[], String::new())
            .await
            .1
    }
}

/// Waits until the metric reaches `value`, for counters updated after a
/// connection finishes closing.
pub async fn eventually_metric(node: &TestNode, name_and_labels: &str, value: f64) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let current = metric(&node.metrics().await, name_and_labels);
        if current == value {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name_and_labels} is {current}, expected {value}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of a metric line such as `herald_frames_delivered_total{node="x"} 3`.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    // The sum over every series of the name that carries the given labels:
    // label values are pre-initialised at 0, so a partial match may be many.
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let (series, _) = line.rsplit_once(' ').unwrap();
            let name = series.split('{').next().unwrap();
            let wanted_name = name_and_labels.split('{').next().unwrap();
            name == wanted_name
                && name_and_labels
                    .split_once('{')
                    .map(|(_, labels)| {
                        labels
                            .trim_end_matches('}')
                            .split(',')
                            .all(|label| series.contains(label))
                    })
                    .unwrap_or(true)
        })
        .map(|line| line.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
        .sum()
}

/// An HS256 token for `sub` granting `channels`, valid for an hour.
pub fn token(sub: &str, channels: &[&str]) -> String {
    token_for(sub, channels, Duration::from_secs(3600))
}

pub fn token_for(sub: &str, channels: &[&str], ttl: Duration) -> String {
    let channels: Vec<String> = channels.iter().map(|c| c.to_string()).collect();
    herald::auth::mint_hs256(SECRET, sub, &channels, ttl)
}

type Stream = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// A well-behaved WebSocket client.
pub struct Client {
    pub ws: Stream,
    next_id: u64,
    pub welcome: Value,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        Self::try_connect(url).await.expect("upgrade succeeds")
    }

    /// Connects, returning the HTTP status and JSON body on refusal.
    pub async fn try_connect(url: &str) -> Result<Client, (u16, Value)> {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => {
                let mut client = Client {
                    ws,
                    next_id: 1,
                    welcome: Value::Null,
                };
                client.welcome = client.next_json().await;
                assert_eq!(client.welcome["type"], "welcome");
                Ok(client)
            }
            Err(tungstenite::Error::Http(response)) => {
                let body = response
                    .body()
                    .as_ref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                Err((response.status().as_u16(), body))
            }
            Err(error) => panic!("connect failed: {error}"),
        }
    }

    pub async fn send_json(&mut self, value: Value) {
        self.ws
            .send(Message::text(value.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.unwrap();
    }

    /// The next JSON text frame, skipping control frames.
    pub async fn next_json(&mut self) -> Value {
        self.try_next_json(PATIENCE)
            .await
            .expect("a frame arrives in time")
    }

    /// The next JSON frame within `wait`, or `None` if nothing arrives.
    pub async fn try_next_json(&mut self, wait: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let message = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .ok()?;
            match message {
                Some(Ok(Message::Text(text))) => return Some(serde_json::from_str(&text).unwrap()),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Sends a request with a fresh id and returns the reply with that id.
    pub async fn request(&mut self, mut request: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        request["id"] = json!(id);
        self.send_json(request).await;
        loop {
            let frame = self.next_json().await;
            if frame["id"] == json!(id) {
                return frame;
            }
        }
    }

    pub async fn subscribe(&mut self, channels: &[&str]) -> Value {
        self.request(json!({"op": "subscribe", "channels": channels}))
            .await
    }

    pub async fn unsubscribe(&mut self, channels: &[&str]) -> Value {
        self.request(json!({"op": "unsubscribe", "channels": channels}))
            .await
    }

    /// Reads until the server's close frame; returns its code and reason.
    pub async fn expect_close(&mut self) -> (u16, String) {
        self.expect_close_within(PATIENCE).await
    }

    pub async fn expect_close_within(&mut self, wait: Duration) -> (u16, String) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => panic!("no close frame within {wait:?}"),
                Ok(Some(Ok(Message::Close(Some(CloseFrame { code, reason }))))) => {
                    return (code.into(), reason.to_string());
                }
                Ok(Some(Ok(Message::Close(None)))) => return (1005, String::new()),
                Ok(Some(Ok(_))) => continue,
                Ok(other) => panic!("connection ended without a close frame: {other:?}"),
            }
        }
    }
}

/// A client that writes raw frames and reads the server's frames itself:
/// it never answers pings on its own, and can send what a library refuses to.
pub struct RawClient {
    pub stream: TcpStream,
    buffer: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, path_and_query: &str) -> RawClient {
        Self::connect_with(addr, path_and_query, None).await
    }

    /// Connects with `SO_RCVBUF` set to `receive_buffer` bytes when given: a
    /// client that stops reading then stalls its socket after a few KiB, as
    /// the load tester's stalled readers do.
    pub async fn connect_with(
        addr: SocketAddr,
        path_and_query: &str,
        receive_buffer: Option<u32>,
    ) -> RawClient {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(bytes) = receive_buffer {
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        let mut stream = socket.connect(addr).await.unwrap();
        let request = format!(
            "GET {path_and_query} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut buffer = Vec::new();
        let head_end = loop {
            let mut chunk = [0u8; 1024];
            let n = tokio::time::timeout(PATIENCE, stream.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed during the handshake");
            buffer.extend_from_slice(&chunk[..n]);
            if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        buffer.drain(..head_end);
        RawClient { stream, buffer }
    }

    /// A raw client on `node` subscribed to `channel` (the reply has been
    /// read); it reads nothing more unless the test asks.
    pub async fn subscribed(node: &TestNode, channel: &str) -> RawClient {
        Self::subscribed_with(node, channel, None).await
    }

    /// [`RawClient::subscribed`] with the receive buffer of
    /// [`RawClient::connect_with`].
    pub async fn subscribed_with(
        node: &TestNode,
        channel: &str,
        receive_buffer: Option<u32>,
    ) -> RawClient {
        Self::subscribed_as(node.addr, "u", channel, receive_buffer).await
    }

    /// A raw client at `addr` for the user `sub`, granted every channel and
    /// subscribed to `channel`: the reply has been read, and refused nothing.
    pub async fn subscribed_as(
        addr: SocketAddr,
        sub: &str,
        channel: &str,
        receive_buffer: Option<u32>,
    ) -> RawClient {
        let path = format!("/ws?token={}", token(sub, &["*"]));
        let mut raw = RawClient::connect_with(addr, &path, receive_buffer).await;
        let request = json!({"op": "subscribe", "id": 1, "channels": [channel]}).to_string();
        raw.send_frame(true, 0x1, request.as_bytes(), true).await;
        loop {
            let (_, payload) = raw.read_frame().await.expect("the subscribe reply");
            let frame: Value = serde_json::from_slice(&payload).unwrap();
            if frame["type"] == "reply" {
                assert_eq!(frame["errors"], json!([]), "{frame}");
                return raw;
            }
        }
    }

    /// Sends one frame, masked as RFC 6455 requires unless `masked` is false.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8], masked: bool) {
        let mut frame = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let mask_bit = if masked { 0x80 } else { 0 };
        let len = payload.len();
        if len < 126 {
            frame.push(mask_bit | len as u8);
        } else if len <= u16::MAX as usize {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            let key = [0x12, 0x34, 0x56, 0x78];
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        // The peer may close mid-write; that is what some tests expect.
        let _ = self.stream.write_all(&frame).await;
    }

    /// Reads one server frame: (opcode, payload). `None` at end of stream.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buffer) {
                self.buffer.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buffer.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until a close frame; returns its code. Panics on timeout.
    pub async fn expect_close(&mut self, wait: Duration) -> u16 {
        tokio::time::timeout(wait, async {
            loop {
                match self.read_frame().await {
                    Some((0x8, payload)) => return u16::from_be_bytes([payload[0], payload[1]]),
                    Some(_) => continue,
                    None => panic!("stream ended without a close frame"),
                }
            }
        })
        .await
        .expect("close frame in time")
    }
}

fn parse_server_frame(buffer: &[u8]) -> Option<((u8, Vec<u8>), usize)> {
    if buffer.len() < 2 {
        return None;
    }
    assert_eq!(buffer[1] & 0x80, 0, "server frames are never masked");
    let opcode = buffer[0] & 0x0f;
    let (len, start) = match buffer[1] & 0x7f {
        126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
        127 if buffer.len() >= 10 => (
            u64::from_be_bytes(buffer[2..10].try_into().unwrap()) as usize,
            10,
        ),
        126 | 127 => return None,
        short => (short as usize, 2),
    };
    if buffer.len() < start + len {
        return None;
    }
    Some(((opcode, buffer[start..start + len].to_vec()), start + len))
}

/// One HTTP/1.1 request on a fresh connection: (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, String) {
    let (status, _, body) = http_full(addr, method, path, headers, body).await;
    (status, body)
}

/// Like [`http`], also returning the response headers.
pub async fn http_full(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> (u16, hyper::HeaderMap, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).to_string())
}

/// A `[[channels]]` rule.
pub fn rule(pattern: &str, policy: SlowPolicy, max_rate_hz: Option<f64>) -> ChannelRule {
    ChannelRule {
        pattern: pattern.into(),
        policy,
        max_rate_hz,
        ..Default::default()
    }
}

/// A `[[channels]]` rule with history.
pub fn history_rule(pattern: &str, size: u64, recover_max: u64) -> ChannelRule {
    ChannelRule {
        pattern: pattern.into(),
        history_size: size,
        history_ttl: Some(Duration::from_secs(600)),
        recover_max,
        ..Default::default()
    }
}

/// Reads a raw client's message frames until `done` says stop; panics on a close frame.
pub async fn read_messages_until(
    raw: &mut RawClient,
    mut done: impl FnMut(&Value) -> bool,
) -> usize {
    let mut count = 0;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let (opcode, payload) = raw.read_frame().await.expect("still connected");
            assert_ne!(opcode, 0x8, "closed: {:?}", &payload.get(..2));
            if opcode != 0x1 {
                continue;
            }
            let frame: Value = serde_json::from_slice(&payload).unwrap();
            if frame["type"] == "message" {
                count += 1;
                if done(&frame) {
                    return;
                }
            }
        }
    })
    .await
    .expect("the newest message arrives");
    count
}

/// Connects with `token` and expects a 401 whose `error` is `reason`, with a
/// message.
pub async fn expect_unauthorized(node: &TestNode, token: &str, reason: &str) {
    match Client::try_connect(&node.ws_url(token)).await {
        Ok(_) => panic!("token accepted, expected {reason}"),
        Err((status, body)) => {
            assert_eq!(status, 401, "{body}");
            assert_eq!(body["error"], reason, "{body}");
            assert!(body["message"].is_string(), "{body}");
        }
    }
}

/// `GET /readyz`: (status, body).
pub async fn readyz(node: &TestNode) -> (u16, String) {
    http(node.addr, "GET", "/readyz", &[], String::new()).await
}

/// Waits until `/readyz` says `ready` (200) or not.
pub async fn eventually_ready(node: &TestNode, ready: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(node).await;
        if (status == 200) == ready {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "readyz stayed {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
