//! `herald-floor`: the floor server, the least a push server can do per
//! delivery, measured beside herald in the same run (`loadtest/bench.sh
//! floor`).
//!
//! Each published message is framed once; the fan-out loop then writes that
//! frame to every subscriber with one non-blocking `write` on the spot. Only
//! what the socket does not take is copied into the connection's backlog,
//! which a per-connection task flushes when the socket is writable again.
//! Nothing else: no authentication (the token is not read), no queue bounds
//! or slow-consumer policies, no pings, no limits, no metrics, one channel
//! map behind one lock. It speaks just enough of herald's protocol for
//! `herald-loadtest`:
//! - `GET /ws` upgrades; `{"op":"subscribe","id":N,"channels":[...]}` is
//!   answered `{"type":"reply","id":N,"channels":[...]}`; pings get pongs;
//!   a close is echoed;
//! - `POST /api/publish` with `{"channel":..,"data":..}` delivers
//!   `{"type":"message","channel":..,"data":..}` (keep-alive);
//! - `GET /readyz` and `GET /healthz` answer 200.
//!
//! Not a server to deploy: a yardstick.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};

use clap::Parser;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The largest request head or client frame read.
const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// A subscriber whose backlog grows past this is dropped.
const MAX_BACKLOG_BYTES: usize = 8 * 1024 * 1024;

#[derive(Parser)]
#[command(about = "The floor server: one non-blocking write per delivery, for herald-loadtest")]
struct Cli {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
}

/// One WebSocket connection, shared by its reader task and the fan-out.
struct Connection {
    stream: TcpStream,
    /// Bytes the socket has not taken yet, written before anything new.
    backlog: Mutex<Backlog>,
    /// Wakes the flush task when the backlog becomes non-empty.
    flush: Notify,
}

#[derive(Default)]
struct Backlog {
    bytes: Vec<u8>,
    dead: bool,
}

impl Connection {
    /// Writes `frame` now if nothing is waiting and the socket takes it; else
    /// keeps what is left for the flush task. Never waits.
    fn send(&self, frame: &[u8]) {
        let mut backlog = self.backlog.lock().expect("backlog lock");
        if backlog.dead {
            return;
        }
        if backlog.bytes.is_empty() {
            match self.stream.try_write(frame) {
                Ok(n) if n == frame.len() => return,
                Ok(n) => backlog.bytes.extend_from_slice(&frame[n..]),
                Err(error) if error.kind() == ErrorKind::WouldBlock => {
                    backlog.bytes.extend_from_slice(frame)
                }
                Err(_) => {
                    backlog.dead = true;
                    return;
                }
            }
            self.flush.notify_one();
        } else if backlog.bytes.len() + frame.len() > MAX_BACKLOG_BYTES {
            backlog.dead = true;
            self.flush.notify_one();
        } else {
            backlog.bytes.extend_from_slice(frame);
        }
    }

    /// Flushes the backlog whenever there is one, until the connection dies.
    async fn flush_loop(self: Arc<Self>) {
        loop {
            self.flush.notified().await;
            loop {
                if self.stream.writable().await.is_err() {
                    return;
                }
                let mut backlog = self.backlog.lock().expect("backlog lock");
                if backlog.dead {
                    return;
                }
                match self.stream.try_write(&backlog.bytes) {
                    Ok(n) => {
                        backlog.bytes.drain(..n);
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => continue,
                    Err(_) => {
                        backlog.dead = true;
                        return;
                    }
                }
                if backlog.bytes.is_empty() {
                    backlog.bytes = Vec::new();
                    break;
                }
            }
        }
    }
}

/// Channel name to its subscribers.
type Channels = RwLock<HashMap<String, Vec<Arc<Connection>>>>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let listener = TcpListener::bind(cli.listen).await?;
    eprintln!("herald-floor listening on {}", listener.local_addr()?);
    let channels: Arc<Channels> = Arc::default();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve(stream, channels.clone()));
    }
}

/// One HTTP connection: requests until it upgrades or closes.
async fn serve(mut stream: TcpStream, channels: Arc<Channels>) {
    let mut buffer = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buffer).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
        buffer.drain(..head_end + 4);
        let request_line = head.lines().next().unwrap_or_default();
        let header = |name: &str| {
            head.lines().skip(1).find_map(|line| {
                let (key, value) = line.split_once(':')?;
                key.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| value.trim().to_owned())
            })
        };
        let path = request_line.split(' ').nth(1).unwrap_or_default();
        let path = path.split('?').next().unwrap_or_default();
        if request_line.starts_with("GET ") && path == "/ws" {
            let Some(key) = header("sec-websocket-key") else {
                let _ = respond(&mut stream, 400, "{\"error\":\"bad_handshake\"}").await;
                return;
            };
            let accept = derive_accept_key(key.as_bytes());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
            return websocket(stream, buffer, channels).await;
        }
        if request_line.starts_with("POST ") && path == "/api/publish" {
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if length > MAX_REQUEST_BYTES {
                let _ = respond(&mut stream, 413, "{\"error\":\"too_large\"}").await;
                return;
            }
            while buffer.len() < length {
                if read_more(&mut stream, &mut buffer).await.is_none() {
                    return;
                }
            }
            let body: Vec<u8> = buffer.drain(..length).collect();
            let (status, reply) = match publish(&body, &channels) {
                Some(delivered) => (200, format!("{{\"delivered\":{delivered}}}")),
                None => (400, "{\"error\":\"invalid_json\"}".to_owned()),
            };
            if respond(&mut stream, status, &reply).await.is_err() {
                return;
            }
            continue;
        }
        let (status, body) = match path {
            "/readyz" | "/healthz" => (200, "{\"status\":\"ready\"}"),
            _ => (404, "{\"error\":\"not_found\"}"),
        };
        let _ = respond(&mut stream, status, body).await;
    }
}

/// Frames `{"type":"message",...}` once and writes it to every subscriber.
fn publish(body: &[u8], channels: &Channels) -> Option<usize> {
    let request: Value = serde_json::from_slice(body).ok()?;
    let channel = request.get("channel")?.as_str()?;
    let data = request.get("data")?;
    let text = json!({"type": "message", "channel": channel, "data": data}).to_string();
    let frame = encode_frame(0x1, text.as_bytes());
    let channels = channels.read().expect("channels lock");
    let subscribers = channels.get(channel).map_or(&[][..], Vec::as_slice);
    for connection in subscribers {
        connection.send(&frame);
    }
    Some(subscribers.len())
}

/// The WebSocket part of a connection: client frames until a close or EOF.
async fn websocket(stream: TcpStream, mut buffer: Vec<u8>, channels: Arc<Channels>) {
    let connection = Arc::new(Connection {
        stream,
        backlog: Mutex::default(),
        flush: Notify::new(),
    });
    let flusher = tokio::spawn(connection.clone().flush_loop());
    let mut subscribed: Vec<String> = Vec::new();
    'frames: loop {
        let (opcode, payload, used) = loop {
            match parse_frame(&buffer) {
                Ok(Some(frame)) => break frame,
                Ok(None) => {}
                Err(()) => break 'frames,
            }
            if buffer.len() > MAX_REQUEST_BYTES
                || read_shared(&connection, &mut buffer).await.is_none()
            {
                break 'frames;
            }
        };
        buffer.drain(..used);
        match opcode {
            0x1 => {
                let Ok(request) = serde_json::from_slice::<Value>(&payload) else {
                    continue;
                };
                if request["op"] != "subscribe" {
                    continue;
                }
                let names: Vec<String> = request["channels"]
                    .as_array()
                    .map(|names| {
                        names
                            .iter()
                            .filter_map(|n| n.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                {
                    let mut map = channels.write().expect("channels lock");
                    for name in &names {
                        if !subscribed.contains(name) {
                            map.entry(name.clone())
                                .or_default()
                                .push(connection.clone());
                            subscribed.push(name.clone());
                        }
                    }
                }
                let reply = json!({"type": "reply", "id": request["id"], "channels": names});
                connection.send(&encode_frame(0x1, reply.to_string().as_bytes()));
            }
            0x8 => {
                connection.send(&encode_frame(0x8, &payload[..payload.len().min(2)]));
                break;
            }
            0x9 => connection.send(&encode_frame(0xA, &payload)),
            _ => {}
        }
    }
    {
        let mut map = channels.write().expect("channels lock");
        for name in &subscribed {
            if let Some(list) = map.get_mut(name) {
                list.retain(|other| !Arc::ptr_eq(other, &connection));
            }
        }
    }
    // Let a queued close frame go out, then stop the flusher.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    flusher.abort();
}

/// A whole client frame at the start of `buffer`: opcode, unmasked payload
/// and the bytes it used; `Ok(None)` while incomplete.
#[allow(clippy::type_complexity)]
fn parse_frame(buffer: &[u8]) -> Result<Option<(u8, Vec<u8>, usize)>, ()> {
    if buffer.len() < 2 {
        return Ok(None);
    }
    let opcode = buffer[0] & 0x0F;
    let masked = buffer[1] & 0x80 != 0;
    let (length, mut at) = match buffer[1] & 0x7F {
        126 if buffer.len() >= 4 => (u16::from_be_bytes([buffer[2], buffer[3]]) as usize, 4),
        127 if buffer.len() >= 10 => (
            u64::from_be_bytes(buffer[2..10].try_into().expect("8 bytes")) as usize,
            10,
        ),
        126 | 127 => return Ok(None),
        short => (short as usize, 2),
    };
    if length > MAX_REQUEST_BYTES {
        return Err(());
    }
    let mask = if masked {
        if buffer.len() < at + 4 {
            return Ok(None);
        }
        at += 4;
        Some([
            buffer[at - 4],
            buffer[at - 3],
            buffer[at - 2],
            buffer[at - 1],
        ])
    } else {
        None
    };
    if buffer.len() < at + length {
        return Ok(None);
    }
    let mut payload = buffer[at..at + length].to_vec();
    if let Some(mask) = mask {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }
    Ok(Some((opcode, payload, at + length)))
}

/// A final, unmasked server frame.
fn encode_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n < 65536 => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

/// Reads until `buffer` holds a request head; the index of its `\r\n\r\n`.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        if buffer.len() > MAX_REQUEST_BYTES {
            return None;
        }
        read_more(stream, buffer).await?;
    }
}

async fn read_more(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk).await {
        Ok(0) | Err(_) => None,
        Ok(n) => {
            buffer.extend_from_slice(&chunk[..n]);
            Some(n)
        }
    }
}

/// Like [`read_more`] on a stream the fan-out also writes to.
async fn read_shared(connection: &Connection, buffer: &mut Vec<u8>) -> Option<usize> {
    let mut chunk = [0u8; 4096];
    loop {
        connection.stream.readable().await.ok()?;
        match connection.stream.try_read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => {
                buffer.extend_from_slice(&chunk[..n]);
                return Some(n);
            }
            Err(error) if error.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => return None,
        }
    }
}

async fn respond(stream: &mut TcpStream, status: u16, body: &str) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        for length in [0, 5, 125, 126, 65535, 65536] {
            let payload = vec![7u8; length];
            let frame = encode_frame(0x1, &payload);
            let (opcode, parsed, used) = parse_frame(&frame).unwrap().unwrap();
            assert_eq!((opcode, parsed, used), (0x1, payload, frame.len()));
            assert_eq!(parse_frame(&frame[..frame.len() - 1]).unwrap(), None);
        }
        // A masked client frame.
        let mask = [1, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | 3];
        frame.extend_from_slice(&mask);
        frame.extend(b"abc".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        assert_eq!(
            parse_frame(&frame).unwrap(),
            Some((0x1, b"abc".to_vec(), frame.len()))
        );
    }
}
