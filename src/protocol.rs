//! Client protocol v1: requests, server frames, close codes and error codes.
//! Pure: no I/O. `docs/PROTOCOL.md` is the prose version of this file.

use std::collections::BTreeMap;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Serialize;
use serde_json::Value;

use crate::history::Since;

/// The subprotocol herald speaks; echoed when the client offers it.
pub const SUBPROTOCOL: &str = "herald.v1";

/// Prefix of the subprotocol that carries a token: `herald.auth.<jwt>`.
pub const AUTH_SUBPROTOCOL_PREFIX: &str = "herald.auth.";

/// Why the node closes a WebSocket. Each code says whether the client should
/// reconnect; see `docs/PROTOCOL.md`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client asked to close.
    Normal,
    /// 1001: the node is shutting down. Reconnect (to another node) at once.
    GoingAway,
    /// 1002: the client broke RFC 6455. Fix the client.
    ProtocolError,
    /// 1007: a text message was not valid UTF-8.
    InvalidPayload,
    /// 1009: a client message was larger than `limits.max_message_bytes`.
    MessageTooBig,
    /// 4001: the token expired without a refresh. Get a new token, then reconnect.
    TokenExpired,
    /// 4002: the client did not read fast enough. Reconnect and resync.
    SlowConsumer,
    /// 4003: no frame arrived within `ping.timeout` of a ping. Reconnect.
    PingTimeout,
    /// 4004: a refresh presented another subject's token. Do not reconnect with it.
    Forbidden,
    /// 4005: the client exceeded a request limit. Reconnect after a backoff.
    PolicyViolation,
    /// 4006: a frame, or a fragmented message, did not arrive in full within
    /// `limits.frame_timeout` of its first byte. Reconnect after a backoff.
    FrameTimeout,
}

impl CloseCode {
    /// Every close code the node sends.
    pub const ALL: [CloseCode; 11] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidPayload,
        CloseCode::MessageTooBig,
        CloseCode::TokenExpired,
        CloseCode::SlowConsumer,
        CloseCode::PingTimeout,
        CloseCode::Forbidden,
        CloseCode::PolicyViolation,
        CloseCode::FrameTimeout,
    ];

    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidPayload => 1007,
            CloseCode::MessageTooBig => 1009,
            CloseCode::TokenExpired => 4001,
            CloseCode::SlowConsumer => 4002,
            CloseCode::PingTimeout => 4003,
            CloseCode::Forbidden => 4004,
            CloseCode::PolicyViolation => 4005,
            CloseCode::FrameTimeout => 4006,
        }
    }

    /// The reason text in the close frame, also the `reason` metric label.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::GoingAway => "shutdown",
            CloseCode::ProtocolError => "protocol_error",
            CloseCode::InvalidPayload => "invalid_payload",
            CloseCode::MessageTooBig => "message_too_big",
            CloseCode::TokenExpired => "token_expired",
            CloseCode::SlowConsumer => "slow_consumer",
            CloseCode::PingTimeout => "ping_timeout",
            CloseCode::Forbidden => "forbidden",
            CloseCode::PolicyViolation => "policy_violation",
            CloseCode::FrameTimeout => "frame_timeout",
        }
    }

    /// Whether a well-behaved client should reconnect after this close.
    pub fn should_reconnect(self) -> bool {
        !matches!(
            self,
            CloseCode::ProtocolError
                | CloseCode::InvalidPayload
                | CloseCode::MessageTooBig
                | CloseCode::Forbidden
        )
    }
}

/// Stable error codes in `error` frames and in per-channel reply errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The text frame was not JSON.
    InvalidJson,
    /// JSON, but not a request object of the right shape.
    InvalidRequest,
    /// The `op` is not one herald knows.
    UnknownOp,
    /// Binary frames are not part of protocol v1.
    UnsupportedFrame,
    /// The token does not grant this channel.
    Forbidden,
    /// The channel name breaks the naming rules.
    InvalidChannel,
    /// A per-connection limit (`limits.max_channels_per_connection`) was reached.
    LimitExceeded,
    /// A refresh token was refused.
    InvalidToken,
    /// The broker could not confirm the subscription, or take a publish.
    BrokerUnavailable,
    /// A published message is larger than `limits.max_publish_bytes`.
    TooLarge,
    /// A per-connection publish rate limit was reached.
    RateLimited,
    /// The node's broker cannot do this (pattern subscriptions on Redis
    /// Cluster).
    NotSupported,
}

impl ErrorCode {
    /// Every error code.
    pub const ALL: [ErrorCode; 12] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidRequest,
        ErrorCode::UnknownOp,
        ErrorCode::UnsupportedFrame,
        ErrorCode::Forbidden,
        ErrorCode::InvalidChannel,
        ErrorCode::LimitExceeded,
        ErrorCode::InvalidToken,
        ErrorCode::BrokerUnavailable,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotSupported,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::UnsupportedFrame => "unsupported_frame",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::BrokerUnavailable => "broker_unavailable",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotSupported => "not_supported",
        }
    }
}

/// A request id: the client's correlation number, echoed in the reply.
pub type RequestId = u64;

/// A client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Subscribe {
        id: Option<RequestId>,
        channels: Vec<String>,
        /// The positions the client already has, for recovery on history
        /// channels.
        since: Vec<(String, Since)>,
    },
    Unsubscribe {
        id: Option<RequestId>,
        channels: Vec<String>,
    },
    Ping {
        id: Option<RequestId>,
    },
    Refresh {
        id: Option<RequestId>,
        token: String,
    },
    Publish {
        id: Option<RequestId>,
        channel: String,
        /// The message, as compact JSON text.
        data: String,
    },
    Presence {
        id: Option<RequestId>,
        channel: String,
    },
    PresenceCount {
        id: Option<RequestId>,
        channel: String,
    },
}

/// A request that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestError {
    /// The request's id, when it could be read.
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

impl RequestError {
    fn new(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> Self {
        RequestError {
            id,
            code,
            message: message.into(),
        }
    }
}

/// Parses one client text message.
pub fn parse_request(text: &[u8]) -> Result<Request, RequestError> {
    let value: Value = serde_json::from_slice(text).map_err(|e| {
        RequestError::new(None, ErrorCode::InvalidJson, format!("invalid JSON: {e}"))
    })?;
    let Value::Object(mut object) = value else {
        return Err(RequestError::new(
            None,
            ErrorCode::InvalidRequest,
            "a request is a JSON object",
        ));
    };
    let id = match object.get("id") {
        None | Some(Value::Null) => None,
        Some(value) => Some(value.as_u64().ok_or_else(|| {
            RequestError::new(
                None,
                ErrorCode::InvalidRequest,
                "id must be a non-negative integer",
            )
        })?),
    };
    let op = match object.get("op") {
        Some(Value::String(op)) => op.clone(),
        _ => {
            return Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "op must be a string",
            ));
        }
    };
    let mut channels = || -> Result<Vec<String>, RequestError> {
        let bad = || {
            RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "channels must be a non-empty array of strings",
            )
        };
        match object.remove("channels") {
            Some(Value::Array(items)) if !items.is_empty() => items
                .into_iter()
                .map(|item| match item {
                    Value::String(name) => Ok(name),
                    _ => Err(bad()),
                })
                .collect(),
            _ => Err(bad()),
        }
    };
    match op.as_str() {
        "subscribe" => {
            let channels = channels()?;
            let since = parse_since(id, object.remove("since"))?;
            Ok(Request::Subscribe {
                id,
                channels,
                since,
            })
        }
        "unsubscribe" => Ok(Request::Unsubscribe {
            id,
            channels: channels()?,
        }),
        "ping" => Ok(Request::Ping { id }),
        "presence" | "presence_count" => {
            let channel = match object.remove("channel") {
                Some(Value::String(channel)) => channel,
                _ => {
                    return Err(RequestError::new(
                        id,
                        ErrorCode::InvalidRequest,
                        "channel must be a string",
                    ));
                }
            };
            Ok(match op.as_str() {
                "presence" => Request::Presence { id, channel },
                _ => Request::PresenceCount { id, channel },
            })
        }
        "publish" => {
            let channel = match object.remove("channel") {
                Some(Value::String(channel)) => channel,
                _ => {
                    return Err(RequestError::new(
                        id,
                        ErrorCode::InvalidRequest,
                        "channel must be a string",
                    ));
                }
            };
            let data = match object.remove("data") {
                Some(data) => data.to_string(),
                None => {
                    return Err(RequestError::new(
                        id,
                        ErrorCode::InvalidRequest,
                        "data is required (any JSON value)",
                    ));
                }
            };
            Ok(Request::Publish { id, channel, data })
        }
        "refresh" => match object.remove("token") {
            Some(Value::String(token)) => Ok(Request::Refresh { id, token }),
            _ => Err(RequestError::new(
                id,
                ErrorCode::InvalidRequest,
                "token must be a string",
            )),
        },
        other => Err(RequestError::new(
            id,
            ErrorCode::UnknownOp,
            format!(
                "unknown op {:?}; expected subscribe, unsubscribe, publish, presence, presence_count, ping or refresh",
                truncate(other, 32)
            ),
        )),
    }
}

/// Reads `"since": {"<channel>": {"offset": 41, "epoch": "Kx3d"}, ...}`.
fn parse_since(
    id: Option<RequestId>,
    since: Option<Value>,
) -> Result<Vec<(String, Since)>, RequestError> {
    let bad = || {
        RequestError::new(
            id,
            ErrorCode::InvalidRequest,
            "since maps channels to {\"offset\": <integer>, \"epoch\": <string>}",
        )
    };
    let entries = match since {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Object(entries)) => entries,
        Some(_) => return Err(bad()),
    };
    entries
        .into_iter()
        .map(|(channel, position)| {
            let Value::Object(position) = position else {
                return Err(bad());
            };
            let offset = position
                .get("offset")
                .and_then(Value::as_u64)
                .ok_or_else(bad)?;
            let epoch = match position.get("epoch") {
                Some(Value::String(epoch))
                    if epoch.is_empty() || crate::history::is_epoch(epoch.as_bytes()) =>
                {
                    epoch.as_str()
                }
                _ => return Err(bad()),
            };
            Ok((
                channel,
                Since {
                    epoch: epoch.into(),
                    offset,
                },
            ))
        })
        .collect()
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

/// A per-channel error in a subscribe reply.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChannelError {
    pub channel: String,
    pub code: ErrorCode,
    pub message: String,
}

/// A request-level error in a reply.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplyError {
    pub code: ErrorCode,
    pub message: String,
}

/// A history channel's position in a subscribe reply.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReplyPosition {
    /// The channel's top offset when the client subscribed.
    pub offset: u64,
    /// The channel's epoch; empty while the channel has no history.
    pub epoch: String,
    /// Present for channels named in `since`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// Why the recovery failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

/// Frames the node sends, other than deliveries (see [`encode_message`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Welcome {
        connection_id: u64,
        node_id: &'a str,
        user: &'a str,
        protocol: &'static str,
        ping_interval_ms: u64,
        expires_at: u64,
    },
    Reply {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channels: Option<&'a [String]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        errors: Option<&'a [ChannelError]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        positions: Option<&'a BTreeMap<String, ReplyPosition>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        presence: Option<&'a [PresenceUser<'a>]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        users: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        connections: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        revoked: Option<&'a [String]>,
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<ReplyError>,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        code: ErrorCode,
        message: &'a str,
    },
    Gap {
        channels: &'a [String],
    },
    Join {
        channel: &'a str,
        user: &'a str,
    },
    Leave {
        channel: &'a str,
        user: &'a str,
    },
}

/// One user in a `presence` reply.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PresenceUser<'a> {
    pub user: &'a str,
    pub connections: u32,
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("server frames serialize"))
    }
}

/// How a payload is embedded in a delivery frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadEncoding {
    /// Valid JSON: embedded verbatim.
    Json,
    /// UTF-8 but not JSON: embedded as a JSON string.
    Text,
    /// Not UTF-8: embedded as a base64 string, with `"encoding":"base64"`.
    Base64,
}

/// Classifies a published payload.
pub fn payload_encoding(payload: &[u8]) -> PayloadEncoding {
    match std::str::from_utf8(payload) {
        Err(_) => PayloadEncoding::Base64,
        Ok(text) => {
            if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                PayloadEncoding::Json
            } else {
                PayloadEncoding::Text
            }
        }
    }
}

/// Encodes a delivery frame `{"type":"message","channel":...,"data":...}`.
/// Called once per published message per node; the result is shared by every
/// subscriber.
pub fn encode_message(channel: &str, payload: &[u8]) -> Bytes {
    encode_delivery(channel, payload, None)
}

/// Encodes a delivery frame of a history channel, with its position:
/// `{"type":"message","channel":...,"data":...,"offset":42,"epoch":"Kx3d"}`.
pub fn encode_sequenced(channel: &str, payload: &[u8], offset: u64, epoch: &str) -> Bytes {
    encode_delivery(channel, payload, Some((offset, epoch)))
}

/// The first bytes of a message a client published on a channel whose rule
/// sets `stamp_from`: `\xffF1:<length of sub>:<sub><data>`. The node that took
/// the publish writes it; every node turns it into the frame's `"from"`.
const FROM_MAGIC: &[u8] = b"\xffF1:";

/// Wraps a client's published `data` with its publisher's `sub`.
pub fn stamp_from(user: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(FROM_MAGIC.len() + 8 + user.len() + data.len());
    out.extend_from_slice(FROM_MAGIC);
    out.extend_from_slice(user.len().to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(user.as_bytes());
    out.extend_from_slice(data);
    out
}

/// Splits a stamped payload into its publisher and data.
pub fn split_from(payload: &[u8]) -> (Option<&str>, &[u8]) {
    let parsed = (|| {
        let rest = payload.strip_prefix(FROM_MAGIC)?;
        let colon = rest.iter().take(6).position(|&b| b == b':')?;
        let length: usize = std::str::from_utf8(&rest[..colon]).ok()?.parse().ok()?;
        let rest = &rest[colon + 1..];
        let user = std::str::from_utf8(rest.get(..length)?).ok()?;
        Some((user, &rest[length..]))
    })();
    match parsed {
        Some((user, data)) => (Some(user), data),
        None => (None, payload),
    }
}

fn encode_delivery(channel: &str, payload: &[u8], position: Option<(u64, &str)>) -> Bytes {
    const HEAD: &[u8] = br#"{"type":"message","channel":"#;
    let (from, payload) = split_from(payload);
    let mut out = BytesMut::with_capacity(HEAD.len() + channel.len() + payload.len() + 96);
    out.put_slice(HEAD);
    write_json_string(&mut out, channel);
    out.put_slice(br#","data":"#);
    match payload_encoding(payload) {
        PayloadEncoding::Json => out.put_slice(payload),
        PayloadEncoding::Text => {
            // Checked to be UTF-8 just above.
            write_json_string(&mut out, std::str::from_utf8(payload).unwrap_or_default())
        }
        PayloadEncoding::Base64 => {
            use base64::Engine;
            out.put_u8(b'"');
            out.put_slice(
                base64::engine::general_purpose::STANDARD
                    .encode(payload)
                    .as_bytes(),
            );
            out.put_slice(br#"","encoding":"base64""#);
        }
    }
    if let Some(from) = from {
        out.put_slice(br#","from":"#);
        write_json_string(&mut out, from);
    }
    if let Some((offset, epoch)) = position {
        out.put_slice(br#","offset":"#);
        out.put_slice(offset.to_string().as_bytes());
        out.put_slice(br#","epoch":"#);
        write_json_string(&mut out, epoch);
    }
    out.put_u8(b'}');
    out.freeze()
}

fn write_json_string(out: &mut BytesMut, text: &str) {
    let writer = &mut out.writer();
    serde_json::to_writer(writer, text).expect("writing to memory cannot fail");
}

/// WebSocket opcodes the node writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    Text = 0x1,
    /// Only echo sessions (the `test-echo` feature) send binary frames.
    Binary = 0x2,
    Close = 0x8,
    Ping = 0x9,
    Pong = 0xA,
}

/// Appends one unmasked, unfragmented server frame to `out` (RFC 6455 5.2).
pub fn write_frame(out: &mut Vec<u8>, opcode: Opcode, payload: &[u8]) {
    out.push(0x80 | opcode as u8);
    let len = payload.len();
    if len < 126 {
        out.push(len as u8);
    } else if len <= u16::MAX as usize {
        out.push(126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
}

/// The payload of a close frame: the code, then the reason.
pub fn close_payload(code: CloseCode) -> Vec<u8> {
    let mut payload = code.code().to_be_bytes().to_vec();
    payload.extend_from_slice(code.reason().as_bytes());
    payload
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<Request, (Option<u64>, ErrorCode)>) {
        let got = parse_request(input.as_bytes()).map_err(|e| (e.id, e.code));
        assert_eq!(got, expected, "{input}");
    }

    #[test]
    fn requests() {
        check(
            r#"{"op":"subscribe","id":1,"channels":["prices.AAPL","news"]}"#,
            Ok(Request::Subscribe {
                id: Some(1),
                channels: vec!["prices.AAPL".into(), "news".into()],
                since: Vec::new(),
            }),
        );
        check(
            r#"{"op":"subscribe","id":1,"channels":["n"],"since":{"n":{"offset":41,"epoch":"Kx3d"}}}"#,
            Ok(Request::Subscribe {
                id: Some(1),
                channels: vec!["n".into()],
                since: vec![(
                    "n".into(),
                    Since {
                        epoch: "Kx3d".into(),
                        offset: 41,
                    },
                )],
            }),
        );
        for bad in [
            r#""since":[]"#,
            r#""since":{"n":41}"#,
            r#""since":{"n":{"offset":-1,"epoch":"K"}}"#,
            r#""since":{"n":{"offset":1}}"#,
            r#""since":{"n":{"offset":1,"epoch":"K x"}}"#,
        ] {
            check(
                &format!(r#"{{"op":"subscribe","id":2,"channels":["n"],{bad}}}"#),
                Err((Some(2), ErrorCode::InvalidRequest)),
            );
        }
        check(
            r#"{"op":"unsubscribe","channels":["news"]}"#,
            Ok(Request::Unsubscribe {
                id: None,
                channels: vec!["news".into()],
            }),
        );
        check(r#"{"op":"ping","id":3}"#, Ok(Request::Ping { id: Some(3) }));
        check(
            r#"{"op":"refresh","id":4,"token":"t","extra":1}"#,
            Ok(Request::Refresh {
                id: Some(4),
                token: "t".into(),
            }),
        );
        check("{", Err((None, ErrorCode::InvalidJson)));
        check("[1]", Err((None, ErrorCode::InvalidRequest)));
        check(
            r#"{"id":"x","op":"ping"}"#,
            Err((None, ErrorCode::InvalidRequest)),
        );
        check(r#"{"id":5}"#, Err((Some(5), ErrorCode::InvalidRequest)));
        check(
            r#"{"op":"dance","id":6}"#,
            Err((Some(6), ErrorCode::UnknownOp)),
        );
        check(
            r#"{"op":"subscribe","id":7,"channels":[]}"#,
            Err((Some(7), ErrorCode::InvalidRequest)),
        );
        check(
            r#"{"op":"subscribe","id":8,"channels":"news"}"#,
            Err((Some(8), ErrorCode::InvalidRequest)),
        );
        check(
            r#"{"op":"subscribe","id":9,"channels":[1]}"#,
            Err((Some(9), ErrorCode::InvalidRequest)),
        );
        check(
            r#"{"op":"refresh","id":10}"#,
            Err((Some(10), ErrorCode::InvalidRequest)),
        );
    }

    #[test]
    fn deliveries_embed_json_verbatim_and_everything_else_safely() {
        let check = |payload: &[u8], expected: &str| {
            let frame = encode_message("prices.AAPL", payload);
            assert_eq!(std::str::from_utf8(&frame).unwrap(), expected);
            serde_json::from_slice::<Value>(&frame).expect("delivery is valid JSON");
        };
        check(
            br#"{"price":187.2}"#,
            r#"{"type":"message","channel":"prices.AAPL","data":{"price":187.2}}"#,
        );
        check(
            b"42",
            r#"{"type":"message","channel":"prices.AAPL","data":42}"#,
        );
        check(
            b"hello \"world\"",
            r#"{"type":"message","channel":"prices.AAPL","data":"hello \"world\""}"#,
        );
        check(
            b"{\"a\":1} trailing",
            r#"{"type":"message","channel":"prices.AAPL","data":"{\"a\":1} trailing"}"#,
        );
        check(
            &[0xff, 0x00, 0x01],
            r#"{"type":"message","channel":"prices.AAPL","data":"/wAB","encoding":"base64"}"#,
        );
        check(
            b"",
            r#"{"type":"message","channel":"prices.AAPL","data":""}"#,
        );
    }

    #[test]
    fn close_codes_match_the_protocol_doc() {
        let doc = include_str!("../docs/PROTOCOL.md");
        for code in CloseCode::ALL {
            let prefix = format!("| {} | `{}` |", code.code(), code.reason());
            let row = doc
                .lines()
                .find(|line| line.starts_with(&prefix))
                .unwrap_or_else(|| panic!("PROTOCOL.md has no row {prefix}"));
            let advice = row.trim_end_matches('|').rsplit('|').next().unwrap().trim();
            assert_eq!(
                advice.starts_with("Yes"),
                code.should_reconnect(),
                "{code:?}: {advice}"
            );
        }
    }

    #[test]
    fn frames() {
        let mut out = Vec::new();
        write_frame(&mut out, Opcode::Text, b"hi");
        assert_eq!(out, [0x81, 2, b'h', b'i']);
        out.clear();
        write_frame(&mut out, Opcode::Text, &[0; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 1, 44]);
        // 2 bytes of header plus a 16-bit length.
        assert_eq!(out.len(), 300 + 4);
        out.clear();
        write_frame(
            &mut out,
            Opcode::Close,
            &close_payload(CloseCode::SlowConsumer),
        );
        assert_eq!(&out[..4], &[0x88, 15, 0x0f, 0xa2]);
    }
}
