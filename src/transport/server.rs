//! The accept loop and the HTTP surface: `/ws`, `/api/publish`, `/healthz`,
//! `/readyz`, `/metrics`, and with `server.demo` the demo page's routes
//! ([`crate::transport::demo`]). Authentication and admission are decided here,
//! before any socket is upgraded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, debug, warn};

use crate::Node;
use crate::auth::AuthError;
use crate::channel;
use crate::config::ServerConfig;
use crate::protocol::{AUTH_SUBPROTOCOL_PREFIX, SUBPROTOCOL};
use crate::session::connection::{self, Mode};
use crate::transport::admission::Refusal;
use crate::transport::demo;
use crate::transport::http::{self, Body};

/// Accepts connections until shutdown, then drops the listener.
pub(crate) async fn accept_loop(listener: TcpListener, node: Node) {
    let cancelled = node.shutdown.cancelled();
    tokio::pin!(cancelled);
    loop {
        let accepted = tokio::select! {
            _ = &mut cancelled => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                tune_socket(&stream, &node.config.server);
                match node.http_slots.clone().try_acquire_owned() {
                    Ok(slot) => match node.tls.clone() {
                        None => {
                            let client = Client {
                                peer,
                                certificate_missing: false,
                            };
                            node.tracker
                                .spawn(serve_http(stream, client, node.clone(), slot));
                        }
                        Some(tls) => {
                            let node = node.clone();
                            node.tracker.clone().spawn(async move {
                                // A failed handshake is counted by reason; the
                                // connection simply closes.
                                if let Ok(stream) = tls.accept(stream).await {
                                    let identified = stream.peer_certificates().is_some();
                                    let client = Client {
                                        peer,
                                        certificate_missing: tls.requires_client_certificates()
                                            && !identified,
                                    };
                                    serve_http(stream, client, node, slot).await;
                                }
                            });
                        }
                    },
                    Err(_) => refuse_http(stream, &node),
                }
            }
            Err(error) => {
                // Usually out of file descriptors: back off instead of spinning.
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sets the options of an accepted socket. Nagle's delay is off: the writer
/// already puts everything pending into one write. The kernel's share of a
/// client's backlog is bounded (`server.max_unsent_bytes`, and
/// `server.send_buffer_bytes` when set), so that a client that stops reading
/// soon stops taking writes, and the outbox limits and `limits.write_timeout`
/// can act (BENCHMARKS.md, figure 6). An option the kernel refuses is logged
/// and left at its default; the connection is served anyway.
fn tune_socket(stream: &TcpStream, server: &ServerConfig) {
    let _ = stream.set_nodelay(true);
    let socket = socket2::SockRef::from(stream);
    if server.send_buffer_bytes > 0 {
        if let Err(error) = socket.set_send_buffer_size(server.send_buffer_bytes) {
            debug!(%error, "cannot set SO_SNDBUF (server.send_buffer_bytes)");
        }
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if server.max_unsent_bytes > 0 {
        // Validated to fit: at most 1 GiB.
        let bytes = server.max_unsent_bytes as u32;
        if let Err(error) = socket.set_tcp_notsent_lowat(bytes) {
            debug!(%error, "cannot set TCP_NOTSENT_LOWAT (server.max_unsent_bytes)");
        }
    }
}

/// The answer when `server.max_http_connections` are open: a 503 written
/// without waiting (the socket's buffer is empty, so it fits), then close.
fn refuse_http(stream: TcpStream, node: &Node) {
    const BODY: &str = r#"{"error":"too_many_connections","message":"the node has too many open HTTP connections"}"#;
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.try_write(response.as_bytes());
    node.metrics.http_connection_error("too_many_connections");
}

/// Requests in flight on one HTTP connection and when the last one ended, for
/// the idle timeout.
struct HttpActivity {
    in_flight: std::sync::atomic::AtomicUsize,
    /// Milliseconds after `since` at which the last request ended.
    last_ms: std::sync::atomic::AtomicU64,
    since: tokio::time::Instant,
}

impl HttpActivity {
    fn idle_since(&self) -> Option<tokio::time::Instant> {
        (self.in_flight.load(Ordering::SeqCst) == 0)
            .then(|| self.since + Duration::from_millis(self.last_ms.load(Ordering::SeqCst)))
    }
}

/// Who is on the other end of an HTTP connection.
#[derive(Clone, Copy)]
struct Client {
    peer: SocketAddr,
    /// `server.tls.client_ca_file` is set and the client presented no
    /// certificate: only the health and metrics endpoints answer it.
    certificate_missing: bool,
}

async fn serve_http<S>(
    stream: S,
    client: Client,
    node: Node,
    _slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(node.config.server.header_read_timeout)
        .max_buf_size(node.config.server.max_header_bytes);
    let activity = Arc::new(HttpActivity {
        in_flight: Default::default(),
        last_ms: Default::default(),
        since: tokio::time::Instant::now(),
    });
    let service_node = node.clone();
    let service_activity = activity.clone();
    let service = service_fn(move |request| {
        let node = service_node.clone();
        let activity = service_activity.clone();
        activity.in_flight.fetch_add(1, Ordering::SeqCst);
        async move {
            let response = route(request, node, client).await;
            let ended = activity.since.elapsed().as_millis() as u64;
            activity.last_ms.store(ended, Ordering::SeqCst);
            activity.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, Infallible>(response)
        }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(connection);
    let idle_timeout = node.config.server.http_idle_timeout;
    let idle = tokio::time::sleep(idle_timeout);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                let reason = if error.is_timeout() {
                    "header_timeout"
                } else if error.is_parse_too_large() {
                    "header_too_large"
                } else if error.is_parse() {
                    "malformed"
                } else {
                    "io"
                };
                node.metrics.http_connection_error(reason);
                debug!(%error, peer = %client.peer, reason, "http connection ended");
                }
                return;
            }
            _ = node.shutdown.cancelled() => {
                connection.as_mut().graceful_shutdown();
                let _ = connection.await;
                return;
            }
            _ = &mut idle => {
                match activity.idle_since() {
                    Some(since) if since + idle_timeout <= tokio::time::Instant::now() => {
                        node.metrics.http_connection_error("idle_timeout");
                        connection.as_mut().graceful_shutdown();
                        let _ = connection.await;
                        return;
                    }
                    Some(since) => idle.as_mut().reset(since + idle_timeout),
                    None => idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout),
                }
            }
        }
    }
}

/// Dispatches one request. The query string is never logged: it may hold a token.
async fn route(request: Request<Incoming>, node: Node, client: Client) -> Response<Body> {
    let peer = client.peer;
    let path = request.uri().path();
    if client.certificate_missing && !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        let response = http::error(
            StatusCode::FORBIDDEN,
            "client_certificate_required",
            "this node requires a client certificate (server.tls.client_ca_file)",
        );
        if path == "/ws" {
            node.metrics
                .connection_rejected("client_certificate_required");
        }
        node.metrics
            .http_request("other", response.status().as_u16());
        return response;
    }
    if node.config.server.demo_enabled() {
        let uri = request.uri();
        if let Some((name, response)) = demo::respond(
            request.method(),
            path,
            uri.query(),
            request.headers(),
            &node,
        ) {
            node.metrics.http_request(name, response.status().as_u16());
            return response;
        }
    }
    let (name, response) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/ws") => ("ws", websocket(request, &node, peer, Mode::Gateway).await),
        // Test only: release builds have no `/echo`.
        #[cfg(feature = "test-echo")]
        (&Method::GET, "/echo") => ("echo", websocket(request, &node, peer, Mode::Echo).await),
        (&Method::POST, "/api/publish") => ("publish", publish(request, &node).await),
        (&Method::GET, "/healthz") => (
            "healthz",
            http::json(StatusCode::OK, json!({"status": "ok"})),
        ),
        (&Method::GET, "/readyz") => ("readyz", readiness(&node)),
        (&Method::GET, "/metrics") => ("metrics", metrics(&node)),
        (_, "/ws" | "/api/publish" | "/healthz" | "/readyz" | "/metrics") => (
            "other",
            http::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            ),
        ),
        _ => (
            "other",
            http::error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        ),
    };
    node.metrics.http_request(name, response.status().as_u16());
    response
}

fn readiness(node: &Node) -> Response<Body> {
    if node.draining.load(Ordering::Relaxed) {
        http::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining"}),
        )
    } else if !node.broker.is_ready() {
        http::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "broker_unavailable"}),
        )
    } else if !node.auth.is_ready() {
        http::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "jwks_unavailable"}),
        )
    } else {
        http::json(StatusCode::OK, json!({"status": "ready"}))
    }
}

fn metrics(node: &Node) -> Response<Body> {
    let mut response = Response::new(Body::new(Bytes::from(node.metrics.render())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    response
}

fn rejected(node: &Node, reason: &str, response: Response<Body>) -> Response<Body> {
    node.metrics.connection_rejected(reason);
    response
}

/// The answer to an upgrade that admission refused.
fn refused(node: &Node, refusal: Refusal) -> Response<Body> {
    let (status, message) = match refusal {
        Refusal::Origin => (StatusCode::FORBIDDEN, "this Origin may not connect"),
        Refusal::NodeFull => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the node is at its connection limit",
        ),
        Refusal::PerIp => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from this address",
        ),
        Refusal::Rate(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many new connections; retry later",
        ),
        Refusal::AttemptRate(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "too many connection attempts from this address; retry later",
        ),
    };
    let mut response = http::error(status, refusal.reason(), message);
    if let Some(seconds) = refusal.retry_after_secs() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    rejected(node, refusal.reason(), response)
}

/// `GET /ws`: checks the handshake, admission and the token, then upgrades.
/// `GET /echo` (the `test-echo` feature) does the same without a token.
async fn websocket(
    mut request: Request<Incoming>,
    node: &Node,
    peer: SocketAddr,
    mode: Mode,
) -> Response<Body> {
    if !fastwebsockets::upgrade::is_upgrade_request(&request) {
        return rejected(
            node,
            "bad_handshake",
            http::error(
                StatusCode::BAD_REQUEST,
                "bad_handshake",
                "expected a WebSocket upgrade (Connection: Upgrade, Upgrade: websocket)",
            ),
        );
    }
    if node.draining.load(Ordering::Relaxed) {
        let mut response = http::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the node is shutting down",
        );
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return rejected(node, "draining", response);
    }
    let offered = offered_subprotocols(request.headers().get_all("sec-websocket-protocol"));
    if !offered.is_empty() && !offered.iter().any(|p| p == SUBPROTOCOL) {
        return rejected(
            node,
            "bad_handshake",
            http::error(
                StatusCode::BAD_REQUEST,
                "unsupported_subprotocol",
                format!("offer the {SUBPROTOCOL} subprotocol"),
            ),
        );
    }
    let client = node.admission.client_ip(peer.ip(), request.headers());
    // Cheap checks first; the node's connection budget is charged only once
    // the token is good, so that a tokenless flood cannot starve real clients.
    if let Err(refusal) = node
        .admission
        .check_origin(request.headers())
        .and_then(|()| node.admission.check_attempt(client))
    {
        return refused(node, refusal);
    }
    let authenticated = match mode {
        Mode::Gateway => match find_token(
            request.headers().get(AUTHORIZATION),
            request.uri().query(),
            &offered,
        ) {
            Ok(token) => node.auth.authenticate_waiting(token).await,
            Err(error) => Err(error),
        },
        #[cfg(feature = "test-echo")]
        Mode::Echo => Ok(crate::auth::Principal {
            user: "echo".into(),
            grants: Arc::from([]),
            publish_grants: Arc::from([]),
            expires_at: u64::MAX,
        }),
    };
    let principal = match authenticated {
        Ok(principal) => principal,
        Err(error) => {
            node.metrics.auth_failed(&error);
            let mut response = http::error(StatusCode::UNAUTHORIZED, error.code(), &error);
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return rejected(node, "unauthorized", response);
        }
    };
    let admitted = match node.admission.admit(client) {
        Ok(admitted) => admitted,
        Err(refusal) => return refused(node, refusal),
    };
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut request) {
        Ok(parts) => parts,
        Err(error) => {
            return rejected(
                node,
                "bad_handshake",
                http::error(StatusCode::BAD_REQUEST, "bad_handshake", error),
            );
        }
    };
    let (mut parts, _) = response.into_parts();
    if !offered.is_empty() {
        parts.headers.insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(SUBPROTOCOL),
        );
    }
    let opening = Box::new(connection::Opening {
        node: node.clone(),
        id: node.next_connection_id(),
        upgrade,
        principal,
        peer,
        mode,
        admitted,
    });
    let span = connection::span(&opening);
    // Two task types: the one without a span is 40 bytes smaller, and is the
    // one at the default log level.
    if span.is_disabled() {
        node.tracker.spawn(connection::serve(opening));
    } else {
        node.tracker
            .spawn(connection::serve(opening).instrument(span));
    }
    Response::from_parts(parts, Body::default())
}

/// The subprotocols offered in the `Sec-WebSocket-Protocol` header values, in
/// order: comma-separated, trimmed, empty entries and non-ASCII values left
/// out. Pure.
pub(crate) fn offered_subprotocols<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> Vec<String> {
    values
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|protocol| protocol.trim().to_owned())
        .filter(|protocol| !protocol.is_empty())
        .collect()
}

/// The token, from the `Authorization: Bearer` header, then `?token=` in the
/// query string, then the `herald.auth.<jwt>` subprotocol; nothing is decoded
/// or checked yet. Pure: the fuzz target `token` drives it with arbitrary
/// header values, queries and subprotocols.
pub(crate) fn find_token<'a>(
    authorization: Option<&'a HeaderValue>,
    query: Option<&'a str>,
    offered: &'a [String],
) -> Result<&'a str, AuthError> {
    if let Some(value) = authorization {
        return bearer(value).ok_or(AuthError::Malformed);
    }
    if let Some(query) = query {
        let found = query
            .split('&')
            .find_map(|pair| pair.strip_prefix("token="));
        if let Some(token) = found {
            // JWTs are base64url and dots: nothing to percent-decode.
            return Ok(token);
        }
    }
    offered
        .iter()
        .find_map(|protocol| protocol.strip_prefix(AUTH_SUBPROTOCOL_PREFIX))
        .ok_or(AuthError::Missing)
}

fn bearer(value: &HeaderValue) -> Option<&str> {
    let value = value.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares API keys in constant time. Both are hashed first: comparing the
/// raw bytes would end early on a length mismatch and reveal the key's length.
fn keys_match(given: &str, expected: &str) -> bool {
    use sha2::{Digest, Sha256};
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    bool::from(given[..].ct_eq(&expected[..]))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    channel: String,
    data: Box<serde_json::value::RawValue>,
}

/// `POST /api/publish` with `{"channel": ..., "data": <any JSON>}`.
async fn publish(request: Request<Incoming>, node: &Node) -> Response<Body> {
    let Some(key) = &node.config.api.key else {
        return http::error(
            StatusCode::FORBIDDEN,
            "api_disabled",
            "set api.key to enable the publish API",
        );
    };
    let authorized = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(bearer)
        .map(|given| keys_match(given, key.expose()))
        .unwrap_or(false);
    if !authorized {
        let mut response = http::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong API key",
        );
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let max_payload = node.config.limits.max_publish_bytes;
    let body = match Limited::new(request.into_body(), max_payload + 1024)
        .collect()
        .await
    {
        Ok(body) => body.to_bytes(),
        Err(error) if error.is::<http_body_util::LengthLimitError>() => {
            return http::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("data is limited to {max_payload} bytes"),
            );
        }
        Err(error) => return http::error(StatusCode::BAD_REQUEST, "bad_body", error),
    };
    let body: PublishBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(error) => {
            return http::error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("expected {{\"channel\": \"...\", \"data\": <JSON>}}: {error}"),
            );
        }
    };
    if let Err(error) = channel::validate_name(&body.channel) {
        return http::error(StatusCode::BAD_REQUEST, "invalid_channel", error);
    }
    let data = body.data.get();
    if data.len() > max_payload {
        return http::error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("data is limited to {max_payload} bytes"),
        );
    }
    match node
        .broker
        .publish(&body.channel, Bytes::copy_from_slice(data.as_bytes()))
        .await
    {
        Ok(None) => {
            node.metrics.message_published();
            http::json(StatusCode::OK, json!({"ok": true}))
        }
        Ok(Some(position)) => {
            node.metrics.message_published();
            http::json(
                StatusCode::OK,
                json!({"ok": true, "offset": position.offset, "epoch": &*position.epoch}),
            )
        }
        Err(error) => http::error(StatusCode::SERVICE_UNAVAILABLE, "broker_unavailable", error),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpSocket, TcpStream};

    use super::*;

    /// Accepts a connection from a client with a 4 KiB receive buffer that
    /// never reads, tunes the accepted socket, and counts the bytes it takes
    /// in 200-byte writes (a small delivery frame each) before it stays
    /// unwritable. The client is returned so that it outlives the count.
    async fn bytes_taken_by_a_stalled_reader(server: &ServerConfig) -> (usize, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpSocket::new_v4().unwrap();
        client.set_recv_buffer_size(4096).unwrap();
        let client = client
            .connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        tune_socket(&stream, server);
        let frame = [b'x'; 200];
        let mut taken = 0;
        // The kernel's maximum send buffer is a few MiB; stop well past it.
        while taken < 64 << 20 {
            match stream.try_write(&frame) {
                Ok(written) => taken += written,
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                    let writable = stream.writable();
                    if tokio::time::timeout(Duration::from_millis(200), writable)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Err(error) => panic!("write failed: {error}"),
            }
        }
        (taken, client)
    }

    #[tokio::test]
    async fn a_stalled_reader_takes_at_most_about_max_unsent_bytes() {
        let bounded = ServerConfig::default();
        assert_eq!(bounded.max_unsent_bytes, 16 * 1024);
        let (taken, _client) = bytes_taken_by_a_stalled_reader(&bounded).await;
        // The unsent limit, what the client's receive buffer holds, and
        // the segment being filled when the limit is reached.
        assert!(taken < 48 * 1024, "{taken} bytes taken");

        // Without it, Linux grows the send buffer for a peer that reads
        // nothing, and every write succeeds for megabytes.
        let autotuned = ServerConfig {
            max_unsent_bytes: 0,
            ..ServerConfig::default()
        };
        let (taken_autotuned, _client) = bytes_taken_by_a_stalled_reader(&autotuned).await;
        assert!(
            taken_autotuned > 8 * taken,
            "{taken_autotuned} bytes without the limit, {taken} with it"
        );

        let small_buffer = ServerConfig {
            send_buffer_bytes: 8192,
            max_unsent_bytes: 0,
            ..ServerConfig::default()
        };
        let (taken_small, _client) = bytes_taken_by_a_stalled_reader(&small_buffer).await;
        assert!(
            taken_small < 48 * 1024,
            "{taken_small} bytes with SO_SNDBUF 8192"
        );
    }
}
