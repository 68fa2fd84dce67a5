//! One WebSocket client connection: TCP connect from a chosen source address,
//! the upgrade, the subscribe requests, and how it fails.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{
    Connector as TlsConnector, MaybeTlsStream, WebSocketStream, client_async_tls_with_config,
};

use crate::scan::contains;

/// A client WebSocket over TCP, or over TLS for `wss://` URLs.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The TCP socket under a client WebSocket, plain or TLS.
pub fn tcp(ws: &Ws) -> Option<&TcpStream> {
    match ws.get_ref() {
        MaybeTlsStream::Plain(tcp) => Some(tcp),
        MaybeTlsStream::Rustls(tls) => Some(tls.get_ref().0),
        _ => None,
    }
}

/// How long a graceful close may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long minted tokens stay valid.
const TOKEN_LIFETIME: Duration = Duration::from_secs(2 * 3600);

/// Tungstenite's default read buffer is 128 KiB per connection, which would
/// dominate the tool's memory at 20,000 connections; frames larger than this
/// still work, the buffer grows for them.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// How clients authenticate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Auth {
    /// No token: the server does not need one.
    None,
    /// Mint an HS256 token per connection with this secret.
    Secret(String),
    /// The same token for every connection.
    Token(String),
}

/// Everything needed to open client connections; serializable so that
/// workers receive it from the parent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientSpec {
    /// Gateway WebSocket URLs; connection `i` uses `urls[i % len]`.
    pub urls: Vec<String>,
    pub auth: Auth,
    /// Loopback source addresses to spread over; 1 means the default source.
    pub source_ips: usize,
    /// Limit from TCP connect start to subscription confirmed.
    pub connect_timeout: Duration,
    /// Subscribe request template with `{channel}` or `{channels}`.
    pub subscribe_frame: String,
    /// Substring of the frame that confirms a subscribe request.
    pub subscribed_match: String,
    /// Substring of a confirming frame that makes it a refusal; empty disables.
    pub subscribe_error_match: String,
    /// Name of the send-time field in deliveries.
    pub ts_field: String,
    /// Name of the sequence-number field in deliveries.
    pub seq_field: String,
    /// Extra PEM roots for `wss://` URLs.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The stage an attempt had reached when it timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tcp,
    Handshake,
    Subscribe,
}

/// Why a connection could not be established, or ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The server answered the upgrade with this HTTP status.
    Http(u16),
    /// The connect timeout expired during this stage.
    Timeout(Stage),
    /// A socket error.
    Io(std::io::ErrorKind),
    /// The server sent a close frame, with its code if it had one.
    Closed(Option<u16>),
    /// The connection ended without a close frame.
    Eof,
    /// The subscribe reply listed errors.
    SubscribeRefused,
    /// Anything else the WebSocket library reported.
    WebSocket(String),
    /// The token could not be minted.
    Token(String),
}

impl Failure {
    /// A short reason for reports, such as `http 429` or `closed 4002`.
    pub fn reason(&self) -> String {
        match self {
            Failure::Http(status) => format!("http {status}"),
            Failure::Timeout(Stage::Tcp) => "timeout (tcp connect)".to_owned(),
            Failure::Timeout(Stage::Handshake) => "timeout (handshake)".to_owned(),
            Failure::Timeout(Stage::Subscribe) => "timeout (subscribe)".to_owned(),
            Failure::Io(kind) => format!("io {kind:?}"),
            Failure::Closed(Some(code)) => format!("closed {code}"),
            Failure::Closed(None) => "closed without code".to_owned(),
            Failure::Eof => "eof without close".to_owned(),
            Failure::SubscribeRefused => "subscribe refused".to_owned(),
            Failure::WebSocket(message) => format!("websocket {message}"),
            Failure::Token(message) => format!("token {message}"),
        }
    }

    /// What a WebSocket library error means.
    pub fn from_ws(error: tungstenite::Error) -> Failure {
        match error {
            tungstenite::Error::Http(response) => Failure::Http(response.status().as_u16()),
            // rustls reports a refused certificate or a bad record this way.
            tungstenite::Error::Io(error)
                if error.kind() == std::io::ErrorKind::InvalidData && error.get_ref().is_some() =>
            {
                Failure::WebSocket(format!("tls {error}"))
            }
            tungstenite::Error::Io(error) => Failure::Io(error.kind()),
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                Failure::Eof
            }
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            ) => Failure::Eof,
            other => Failure::WebSocket(other.to_string()),
        }
    }

    /// What a received close frame means.
    pub fn from_close(frame: Option<tungstenite::protocol::CloseFrame>) -> Failure {
        Failure::Closed(frame.map(|frame| u16::from(frame.code)))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reason())
    }
}

/// An established, subscribed connection.
pub struct Session {
    pub ws: Ws,
    /// From TCP connect start to the last subscribe confirmation.
    pub subscribed: Duration,
    /// The confirming frames, when asked for ([`Connector::open_keeping`]).
    pub confirmations: Vec<Vec<u8>>,
    /// Other frames that arrived before the last confirmation, in order,
    /// when asked for: deliveries that the caller must not lose.
    pub early: Vec<Vec<u8>>,
}

/// What a subscribe keeps of the frames it reads.
#[derive(Default)]
struct Kept {
    confirmations: Vec<Vec<u8>>,
    early: Vec<Vec<u8>>,
}

/// A completed WebSocket upgrade.
#[derive(Debug, Clone, Copy)]
pub struct Upgrade {
    /// From TCP connect start to the HTTP 101.
    pub latency: Duration,
    /// When the 101 arrived, in unix nanoseconds.
    pub at_unix_nanos: i64,
}

/// The outcome of one connection attempt.
pub struct Attempt {
    /// Set when the upgrade completed, even if subscribing then failed.
    pub upgrade: Option<Upgrade>,
    pub result: Result<Session, Failure>,
}

/// One gateway: where to connect and what to ask for.
#[derive(Debug, Clone)]
struct Target {
    /// The WebSocket URL without the token.
    url: String,
    /// The resolved address, looked up once.
    address: SocketAddr,
}

/// Opens connections as described by a [`ClientSpec`].
pub struct Connector {
    targets: Vec<Target>,
    auth: Auth,
    /// Source addresses to bind to, round-robin; empty for the default source.
    sources: Vec<IpAddr>,
    timeout: Duration,
    subscribe_frame: String,
    subscribed_match: Vec<u8>,
    subscribe_error_match: Vec<u8>,
    ws_config: WebSocketConfig,
    /// For `wss://` URLs.
    tls: Option<TlsConnector>,
}

impl Connector {
    /// Checks the URLs and resolves their hosts.
    pub async fn new(spec: &ClientSpec) -> anyhow::Result<Connector> {
        if spec.urls.is_empty() {
            bail!("give at least one --url ws://HOST:PORT/ws");
        }
        let mut targets = Vec::with_capacity(spec.urls.len());
        for url in &spec.urls {
            let uri: Uri = url
                .parse()
                .with_context(|| format!("invalid URL {url:?}"))?;
            let default_port = match uri.scheme_str() {
                Some("ws") => 80,
                Some("wss") => 443,
                _ => bail!("{url:?}: use a ws:// or wss:// URL"),
            };
            let host = uri.host().context("the URL has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(default_port);
            let address = tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .find(|address| spec.source_ips <= 1 || address.is_ipv4())
                .with_context(|| format!("{host} has no usable address"))?;
            targets.push(Target {
                url: url.clone(),
                address,
            });
        }
        if let Auth::Secret(secret) = &spec.auth {
            mint_token(secret, "load-check").context("minting a token with --secret")?;
        }
        let sources = if spec.source_ips <= 1 {
            Vec::new()
        } else {
            let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
            (0..spec.source_ips as u32)
                .map(|k| IpAddr::V4(Ipv4Addr::from(first + k)))
                .collect()
        };
        Ok(Connector {
            targets,
            auth: spec.auth.clone(),
            sources,
            timeout: spec.connect_timeout,
            subscribe_frame: spec.subscribe_frame.clone(),
            subscribed_match: spec.subscribed_match.as_bytes().to_vec(),
            subscribe_error_match: spec.subscribe_error_match.as_bytes().to_vec(),
            ws_config: WebSocketConfig::default().read_buffer_size(READ_BUFFER_BYTES),
            tls: match spec.urls.iter().any(|url| url.starts_with("wss:")) {
                true => Some(tls_connector(spec.ca_file.as_deref())?),
                false => None,
            },
        })
    }

    /// Connects client `index` and subscribes it to `channels`, within the
    /// connect timeout.
    pub async fn open(&self, index: u64, channels: &[String]) -> Attempt {
        self.open_with(index, channels, None).await
    }

    /// Like [`Connector::open`], with the socket's receive buffer
    /// (`SO_RCVBUF`) set to `recv_buffer` bytes before connecting, if given.
    pub async fn open_with(
        &self,
        index: u64,
        channels: &[String],
        recv_buffer: Option<u32>,
    ) -> Attempt {
        let frames = subscribe_frames(&self.subscribe_frame, channels);
        self.open_frames(index, 0, &frames, recv_buffer, None).await
    }

    /// The subscribe requests for `channels`, from `--subscribe-frame`.
    pub fn requests(&self, channels: &[String]) -> Vec<String> {
        subscribe_frames(&self.subscribe_frame, channels)
    }

    /// Connects client `index` to the gateway `shift` places after its own
    /// (`--url` `index + shift` mod n), sends `frames` and waits for one
    /// confirmation each. The session keeps the confirming frames and every
    /// other frame that arrived before the last of them.
    pub async fn open_keeping(&self, index: u64, shift: u64, frames: &[String]) -> Attempt {
        let mut kept = Kept::default();
        let mut attempt = self
            .open_frames(index, shift, frames, None, Some(&mut kept))
            .await;
        if let Ok(session) = &mut attempt.result {
            session.confirmations = kept.confirmations;
            session.early = kept.early;
        }
        attempt
    }

    async fn open_frames(
        &self,
        index: u64,
        shift: u64,
        frames: &[String],
        recv_buffer: Option<u32>,
        kept: Option<&mut Kept>,
    ) -> Attempt {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut upgrade = None;
        let target =
            &self.targets[(index.wrapping_add(shift) % self.targets.len() as u64) as usize];
        let result = self
            .try_open(
                index,
                target,
                frames,
                recv_buffer,
                (start, deadline),
                &mut upgrade,
                kept,
            )
            .await;
        Attempt { upgrade, result }
    }

    /// A plain TCP connection for client `index`, from its source address to
    /// its gateway, within the connect timeout; nothing is sent.
    pub async fn connect_raw(&self, index: u64) -> Result<TcpStream, Failure> {
        let target = &self.targets[index as usize % self.targets.len()];
        timeout(self.timeout, self.tcp_connect(index, target.address, None))
            .await
            .map_err(|_| Failure::Timeout(Stage::Tcp))?
    }

    /// The start of an upgrade request for client `index`'s gateway, without
    /// the blank line that would end it.
    pub fn unfinished_request_head(&self, index: u64) -> String {
        let target = &self.targets[index as usize % self.targets.len()];
        let path = target
            .url
            .parse::<Uri>()
            .ok()
            .and_then(|uri| uri.path_and_query().map(|path| path.to_string()))
            .unwrap_or_else(|| "/".to_owned());
        format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nX-Slow: ",
            target.address
        )
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_open(
        &self,
        index: u64,
        target: &Target,
        frames: &[String],
        recv_buffer: Option<u32>,
        (start, deadline): (Instant, Instant),
        upgrade: &mut Option<Upgrade>,
        kept: Option<&mut Kept>,
    ) -> Result<Session, Failure> {
        let stream = timeout_at(
            deadline,
            self.tcp_connect(index, target.address, recv_buffer),
        )
        .await
        .map_err(|_| Failure::Timeout(Stage::Tcp))??;
        let request = self.request_url(index, &target.url)?;
        let (mut ws, _response) = timeout_at(
            deadline,
            client_async_tls_with_config(request, stream, Some(self.ws_config), self.tls.clone()),
        )
        .await
        .map_err(|_| Failure::Timeout(Stage::Handshake))?
        .map_err(Failure::from_ws)?;
        let handshake = start.elapsed();
        *upgrade = Some(Upgrade {
            latency: handshake,
            at_unix_nanos: unix_nanos(),
        });
        timeout_at(deadline, self.subscribe(&mut ws, frames, kept))
            .await
            .map_err(|_| Failure::Timeout(Stage::Subscribe))??;
        Ok(Session {
            ws,
            subscribed: start.elapsed(),
            confirmations: Vec::new(),
            early: Vec::new(),
        })
    }

    async fn tcp_connect(
        &self,
        index: u64,
        address: SocketAddr,
        recv_buffer: Option<u32>,
    ) -> Result<TcpStream, Failure> {
        let io = |error: std::io::Error| Failure::Io(error.kind());
        let socket = if address.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(io)?;
        if let Some(bytes) = recv_buffer {
            // Set before connecting, so that the window offered in the
            // handshake is already small.
            socket.set_recv_buffer_size(bytes).map_err(io)?;
        }
        if !self.sources.is_empty() {
            let source = self.sources[index as usize % self.sources.len()];
            // Without IP_BIND_ADDRESS_NO_PORT, bind() picks the port itself by
            // scanning the ports in use, which takes milliseconds per call at
            // tens of thousands of connections and stalls this runtime. With
            // it, connect() picks the port per destination, as usual.
            #[cfg(target_os = "linux")]
            nix::sys::socket::setsockopt(
                &socket,
                nix::sys::socket::sockopt::IpBindAddressNoPort,
                &true,
            )
            .map_err(|errno| io(std::io::Error::from(errno)))?;
            socket.bind(SocketAddr::new(source, 0)).map_err(io)?;
        }
        let stream = socket.connect(address).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        Ok(stream)
    }

    fn request_url(&self, index: u64, url: &str) -> Result<String, Failure> {
        let token = match &self.auth {
            Auth::None => return Ok(url.to_owned()),
            Auth::Token(token) => token.clone(),
            Auth::Secret(secret) => mint_token(secret, &format!("load-{index}"))
                .map_err(|error| Failure::Token(error.to_string()))?,
        };
        let separator = if url.contains('?') { '&' } else { '?' };
        Ok(format!("{url}{separator}token={token}"))
    }

    /// Sends the subscribe requests and waits for one confirmation each;
    /// keeps the frames read when `kept` is given.
    async fn subscribe(
        &self,
        ws: &mut Ws,
        frames: &[String],
        mut kept: Option<&mut Kept>,
    ) -> Result<(), Failure> {
        if frames.is_empty() {
            return Ok(());
        }
        for frame in frames {
            ws.feed(Message::text(frame.as_str()))
                .await
                .map_err(Failure::from_ws)?;
        }
        ws.flush().await.map_err(Failure::from_ws)?;
        let mut confirmed = 0;
        while confirmed < frames.len() {
            let frame = match ws.next().await {
                Some(Ok(Message::Text(text))) => text.as_bytes().to_vec(),
                Some(Ok(Message::Binary(bytes))) => bytes.to_vec(),
                Some(Ok(Message::Close(frame))) => return Err(Failure::from_close(frame)),
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(Failure::from_ws(error)),
                None => return Err(Failure::Eof),
            };
            if contains(&frame, &self.subscribed_match) {
                if contains(&frame, &self.subscribe_error_match) {
                    return Err(Failure::SubscribeRefused);
                }
                confirmed += 1;
                if let Some(kept) = kept.as_deref_mut() {
                    kept.confirmations.push(frame);
                }
            } else if let Some(kept) = kept.as_deref_mut() {
                kept.early.push(frame);
            }
        }
        Ok(())
    }
}

/// A rustls client with the system's roots and the certificates of `ca_file`.
fn tls_connector(ca_file: Option<&std::path::Path>) -> anyhow::Result<TlsConnector> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(certificate);
    }
    if let Some(path) = ca_file {
        for certificate in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading --ca-file {}", path.display()))?
        {
            roots
                .add(certificate.with_context(|| format!("--ca-file {}", path.display()))?)
                .context("adding a --ca-file certificate")?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::Rustls(std::sync::Arc::new(config)))
}

/// The subscribe requests for `channels` from `template`: one per channel
/// with `{channel}`, one for all with `{channels}`, the template itself once
/// without either, none without channels.
pub fn subscribe_frames(template: &str, channels: &[String]) -> Vec<String> {
    if channels.is_empty() {
        Vec::new()
    } else if template.contains("{channels}") {
        let list = serde_json::to_string(channels).unwrap_or_else(|_| "[]".to_owned());
        vec![template.replace("{channels}", &list)]
    } else if template.contains("{channel}") {
        channels
            .iter()
            .map(|channel| template.replace("{channel}", channel))
            .collect()
    } else {
        vec![template.to_owned()]
    }
}

/// An HS256 token for `sub` granting every channel, valid for two hours.
pub fn mint_token(secret: &str, sub: &str) -> jsonwebtoken::errors::Result<String> {
    let expires = unix_nanos() / 1_000_000_000 + TOKEN_LIFETIME.as_secs() as i64;
    let claims = serde_json::json!({"sub": sub, "exp": expires, "channels": ["*"]});
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Reads and discards frames until `phase` satisfies `stop`, keeping the
/// connection alive (tungstenite answers pings while it is read).
///
/// Returns `Ok` when stopped, or the failure that ended the connection first.
pub async fn idle_until<P: Clone>(
    ws: &mut Ws,
    phase: &mut watch::Receiver<P>,
    stop: impl Fn(&P) -> bool,
) -> Result<(), Failure> {
    loop {
        if stop(&phase.borrow_and_update()) {
            return Ok(());
        }
        tokio::select! {
            changed = phase.changed() => {
                if changed.is_err() {
                    // The group is gone: nobody will ever stop us, so stop now.
                    return Ok(());
                }
            }
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(frame))) => return Err(Failure::from_close(frame)),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(Failure::from_ws(error)),
                None => return Err(Failure::Eof),
            },
        }
    }
}

/// Sends a close frame (bounded by a short timeout) and drops the connection.
pub async fn close(mut ws: Ws) {
    let _ = timeout(CLOSE_TIMEOUT, ws.close(None)).await;
}

/// Nanoseconds since the Unix epoch; the clock deliveries are stamped with.
pub fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channels(names: &[&str]) -> Vec<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn subscribe_frames_follow_the_template() {
        let default = crate::cli::DEFAULT_SUBSCRIBE_FRAME;
        assert_eq!(
            subscribe_frames(default, &channels(&["a", "b"])),
            [
                r#"{"op":"subscribe","id":1,"channels":["a"]}"#,
                r#"{"op":"subscribe","id":1,"channels":["b"]}"#
            ]
        );
        assert_eq!(
            subscribe_frames(r#"{"sub":{channels}}"#, &channels(&["a", "b"])),
            [r#"{"sub":["a","b"]}"#]
        );
        assert_eq!(subscribe_frames("hello", &channels(&["a", "b"])), ["hello"]);
        assert!(subscribe_frames(default, &[]).is_empty());
    }

    #[test]
    fn failures_have_short_reasons() {
        assert_eq!(Failure::Http(429).reason(), "http 429");
        assert_eq!(Failure::Closed(Some(4002)).reason(), "closed 4002");
        assert_eq!(
            Failure::Io(std::io::ErrorKind::ConnectionRefused).reason(),
            "io ConnectionRefused"
        );
    }

    #[test]
    fn minted_tokens_are_hs256_jwts() {
        let token = mint_token("0123456789abcdef0123456789abcdef", "load-1").unwrap();
        assert_eq!(token.split('.').count(), 3);
        assert!(token.starts_with("eyJ"));
    }
}
