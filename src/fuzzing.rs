//! Entry points for the fuzz targets in `fuzz/`, and for
//! `tests/fuzz_corpora.rs`, which replays their committed corpora under a
//! plain `cargo test`. Not part of herald's API.
//!
//! Each function takes the fuzzer's bytes, drives one part of herald with
//! them and panics when a property does not hold; returning means the input
//! was fine. Inputs made of several strings separate them with `0xFF`, a byte
//! that never occurs in UTF-8 (see [`parts`]).

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::header::HeaderValue;
use serde_json::json;
use tokio::io::{AsyncRead, ReadBuf};

use crate::auth::{Authenticator, jwks, mint_hs256};
use crate::channel::{self, Pattern, SubjectTemplate};
use crate::config::{AuthConfig, Config, ConfigError, Secret};
use crate::protocol::{self, AUTH_SUBPROTOCOL_PREFIX, CloseCode, Request};
use crate::rate::TokenBucket;
use crate::session::inbound::{FrameReader, Inbound, ReadError};
use crate::transport::server;

/// The HMAC secret of the authenticator behind [`token`]. Corpus seeds with a
/// valid signature are minted with it.
pub const TOKEN_SECRET: &str = "fuzzing-secret-0123456789abcdef0123456789";

/// Splits `data` at its first `N - 1` `0xFF` bytes; missing parts are empty.
pub fn parts<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut parts = [&data[..0]; N];
    let mut rest = data;
    for part in parts.iter_mut().take(N - 1) {
        match rest.iter().position(|&byte| byte == 0xFF) {
            Some(at) => {
                *part = &rest[..at];
                rest = &rest[at + 1..];
            }
            None => {
                *part = rest;
                rest = &rest[rest.len()..];
            }
        }
    }
    parts[N - 1] = rest;
    parts
}

// ---------------------------------------------------------------------------
// The frame reader.

/// Target `frame_reader`: the first byte picks the limits and how the stream
/// is cut into reads; the rest is what a client sends after the handshake.
///
/// Properties: [`FrameReader`] yields exactly what a whole-buffer reference
/// reader yields ([`reference_frames`], the same RFC 6455 rules written the
/// simple way), however the bytes are split into reads; every text message is
/// UTF-8, no message exceeds the limit, and reading ends.
pub fn frame_reader(data: &[u8]) {
    let Some((&settings, stream)) = data.split_first() else {
        return;
    };
    let max_message = [125, 1024, 65_536][usize::from(settings & 0x03) % 3];
    // Pings and data frames take request tokens: sometimes few enough to run out.
    let tokens = if settings & 0x04 == 0 {
        usize::MAX
    } else {
        usize::from(settings >> 3)
    };
    let expected = reference_frames(stream, max_message, tokens);
    for item in &expected {
        match item {
            Ok(Inbound::Text(bytes)) => {
                assert!(std::str::from_utf8(bytes).is_ok() && bytes.len() <= max_message)
            }
            Ok(Inbound::Binary(bytes)) => assert!(bytes.len() <= max_message),
            Ok(Inbound::Ping(payload)) => assert!(payload.len() <= 125),
            _ => {}
        }
    }
    let whole = read_frames(stream, ReadSizes::Whole, max_message, tokens);
    assert_eq!(whole, expected, "whole stream");
    let chunked = read_frames(
        stream,
        ReadSizes::Varied(u32::from(settings) + 1),
        max_message,
        tokens,
    );
    assert_eq!(chunked, expected, "varied reads");
    let bytewise = read_frames(stream, ReadSizes::Bytewise, max_message, tokens);
    assert_eq!(bytewise, expected, "one byte per read");
}

type Outcome = Result<Inbound, ReadError>;

/// How an in-memory stream is cut into reads.
#[derive(Clone, Copy)]
enum ReadSizes {
    Whole,
    Bytewise,
    /// Sizes from 1 to 64 from a xorshift generator with this seed.
    Varied(u32),
}

/// An in-memory client: never pending, then end of stream.
struct Client {
    data: Vec<u8>,
    at: usize,
    sizes: ReadSizes,
}

impl AsyncRead for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let size = match &mut self.sizes {
            ReadSizes::Whole => usize::MAX,
            ReadSizes::Bytewise => 1,
            ReadSizes::Varied(state) => {
                *state ^= *state << 13;
                *state ^= *state >> 17;
                *state ^= *state << 5;
                (*state % 64) as usize + 1
            }
        };
        let end = self
            .data
            .len()
            .min(self.at.saturating_add(size))
            .min(self.at + buf.remaining());
        buf.put_slice(&self.data[self.at..end]);
        self.at = end;
        Poll::Ready(Ok(()))
    }
}

/// Reads `stream` as a session does: until an error or a close frame.
/// Must not be called from inside a tokio runtime.
fn read_frames(stream: &[u8], sizes: ReadSizes, max_message: usize, tokens: usize) -> Vec<Outcome> {
    RUNTIME.with(|runtime| {
        runtime.block_on(async {
            let client = Client {
                data: stream.to_vec(),
                at: 0,
                sizes,
            };
            // Time stands still for the bucket: refilling one token would take
            // thirty years.
            let requests = TokenBucket::new(1e-9, tokens as f64, tokio::time::Instant::now());
            let mut reader =
                FrameReader::new(client, max_message, Duration::from_secs(60), requests);
            let mut out = Vec::new();
            // Every frame takes at least 6 bytes, so this many reads must end it.
            for _ in 0..=stream.len() / 6 + 1 {
                let item = reader.next(&mut || {}).await;
                let last = matches!(item, Err(_) | Ok(Inbound::Close(_)));
                out.push(item);
                if last {
                    return out;
                }
            }
            panic!("the reader did not end: {out:?}");
        })
    })
}

thread_local! {
    /// One runtime per thread for all inputs: the reader's deadlines need a timer.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a current-thread runtime");
}

/// The frame rules of RFC 6455 as herald applies them, over a whole buffer:
/// what `inbound::FrameReader` must yield, whatever the reads.
fn reference_frames(stream: &[u8], max_message: usize, mut tokens: usize) -> Vec<Outcome> {
    use CloseCode::{InvalidPayload, MessageTooBig, PolicyViolation, ProtocolError};
    let mut out = Vec::new();
    let mut rest = stream;
    // A fragmented message under way: its opcode and bytes so far.
    let mut message: Option<(u8, Vec<u8>)> = None;
    let fail = |mut out: Vec<Outcome>, error: ReadError| {
        out.push(Err(error));
        out
    };
    loop {
        if rest.len() < 2 {
            return fail(out, ReadError::Lost);
        }
        let fin = rest[0] & 0x80 != 0;
        let opcode = rest[0] & 0x0f;
        let reserved_bits = rest[0] & 0x70 != 0;
        let known_opcode = matches!(opcode, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xA);
        let masked = rest[1] & 0x80 != 0;
        if reserved_bits || !known_opcode || !masked {
            return fail(out, ReadError::Violation(ProtocolError));
        }
        let control = opcode >= 0x8;
        let data = opcode <= 0x2;
        let length_bytes = match rest[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + length_bytes + 4;
        if rest.len() < header_len {
            return fail(out, ReadError::Lost);
        }
        let length = if length_bytes == 0 {
            u64::from(rest[1] & 0x7f)
        } else {
            let mut bytes = [0u8; 8];
            bytes[8 - length_bytes..].copy_from_slice(&rest[2..2 + length_bytes]);
            u64::from_be_bytes(bytes)
        };
        if control && (!fin || length > 125) {
            return fail(out, ReadError::Violation(ProtocolError));
        }
        if data || opcode == 0x9 {
            if tokens == 0 {
                return fail(out, ReadError::Violation(PolicyViolation));
            }
            tokens -= 1;
        }
        let assembled = message.as_ref().map_or(0, |(_, bytes)| bytes.len()) as u64;
        if length > max_message as u64 || (data && assembled + length > max_message as u64) {
            return fail(out, ReadError::Violation(MessageTooBig));
        }
        let length = length as usize;
        if rest.len() < header_len + length {
            return fail(out, ReadError::Lost);
        }
        let mask = &rest[header_len - 4..header_len];
        let payload: Vec<u8> = rest[header_len..header_len + length]
            .iter()
            .zip(mask.iter().cycle())
            .map(|(byte, key)| byte ^ key)
            .collect();
        rest = &rest[header_len + length..];
        let starts_utf8 = |bytes: &[u8]| match std::str::from_utf8(bytes) {
            Ok(_) => true,
            Err(error) => error.error_len().is_none(),
        };
        let whole = |opcode: u8, bytes: Vec<u8>| -> Outcome {
            if opcode == 0x2 {
                Ok(Inbound::Binary(bytes))
            } else if std::str::from_utf8(&bytes).is_ok() {
                Ok(Inbound::Text(bytes))
            } else {
                Err(ReadError::Violation(InvalidPayload))
            }
        };
        match opcode {
            0x9 => out.push(Ok(Inbound::Ping(payload))),
            0xA => out.push(Ok(Inbound::Pong)),
            0x8 => {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                let allowed = match code {
                    None => payload.is_empty(),
                    Some(code) => matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999),
                };
                if !allowed {
                    return fail(out, ReadError::Violation(ProtocolError));
                }
                if payload.len() > 2 && std::str::from_utf8(&payload[2..]).is_err() {
                    return fail(out, ReadError::Violation(InvalidPayload));
                }
                out.push(Ok(Inbound::Close(payload)));
                return out;
            }
            0x1 | 0x2 => {
                if message.is_some() {
                    return fail(out, ReadError::Violation(ProtocolError));
                }
                if fin {
                    match whole(opcode, payload) {
                        Ok(inbound) => out.push(Ok(inbound)),
                        Err(error) => return fail(out, error),
                    }
                } else if opcode == 0x1 && !starts_utf8(&payload) {
                    return fail(out, ReadError::Violation(InvalidPayload));
                } else {
                    message = Some((opcode, payload));
                }
            }
            _ => {
                let Some((first, mut bytes)) = message.take() else {
                    return fail(out, ReadError::Violation(ProtocolError));
                };
                bytes.extend_from_slice(&payload);
                if fin {
                    match whole(first, bytes) {
                        Ok(inbound) => out.push(Ok(inbound)),
                        Err(error) => return fail(out, error),
                    }
                } else if first == 0x1 && !starts_utf8(&bytes) {
                    return fail(out, ReadError::Violation(InvalidPayload));
                } else {
                    message = Some((first, bytes));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Client requests.

/// Target `request`: one client text message.
///
/// Properties: parsing never panics; an error message stays short whatever
/// the request (no reply amplification); a subscribe or unsubscribe names at
/// least one channel; a parsed request, written back as JSON, parses to
/// itself.
pub fn request(data: &[u8]) {
    match protocol::parse_request(data) {
        Ok(request) => {
            let encoded = match &request {
                Request::Subscribe {
                    id,
                    channels,
                    since,
                } => {
                    assert!(!channels.is_empty());
                    let since: serde_json::Map<String, serde_json::Value> = since
                        .iter()
                        .map(|(channel, position)| {
                            (
                                channel.clone(),
                                json!({"offset": position.offset, "epoch": &*position.epoch}),
                            )
                        })
                        .collect();
                    json!({"op": "subscribe", "id": id, "channels": channels, "since": since})
                }
                Request::Unsubscribe { id, channels } => {
                    assert!(!channels.is_empty());
                    json!({"op": "unsubscribe", "id": id, "channels": channels})
                }
                Request::Ping { id } => json!({"op": "ping", "id": id}),
                Request::Publish { id, channel, data } => {
                    let data: serde_json::Value =
                        serde_json::from_str(data).expect("data is JSON text");
                    json!({"op": "publish", "id": id, "channel": channel, "data": data})
                }
                Request::Presence { id, channel } => {
                    json!({"op": "presence", "id": id, "channel": channel})
                }
                Request::PresenceCount { id, channel } => {
                    json!({"op": "presence_count", "id": id, "channel": channel})
                }
                Request::Refresh { id, token } => {
                    json!({"op": "refresh", "id": id, "token": token})
                }
            };
            let again = protocol::parse_request(encoded.to_string().as_bytes());
            assert_eq!(again.as_ref(), Ok(&request), "{encoded}");
        }
        Err(error) => assert!(
            error.message.len() <= 512,
            "a {}-byte error message",
            error.message.len()
        ),
    }
}

// ---------------------------------------------------------------------------
// Tokens in the upgrade request.

/// Target `token`: four parts, the `Authorization` header value, the query
/// string, and two `Sec-WebSocket-Protocol` header values. A part is present
/// when it is not empty; its first byte is dropped, so that an empty value can
/// be present too.
///
/// Properties: extraction never panics; the token is a slice of the source
/// that the precedence rule picks (bearer header, then `token=` in the query,
/// then a `herald.auth.` subprotocol); offered subprotocols are trimmed,
/// non-empty and comma-free; decoding the token (header, algorithm, claims,
/// before and after the signature check) never panics.
pub fn token(data: &[u8]) {
    let [authorization, query, first, second] = parts::<4>(data);
    let present = |part: &[u8]| part.split_first().map(|(_, value)| value.to_vec());
    let authorization = present(authorization).and_then(|v| HeaderValue::from_bytes(&v).ok());
    let query = present(query).map(|bytes| String::from_utf8_lossy(&bytes).into_owned());
    let protocols: Vec<HeaderValue> = [first, second]
        .into_iter()
        .filter_map(present)
        .filter_map(|bytes| HeaderValue::from_bytes(&bytes).ok())
        .collect();
    let offered = server::offered_subprotocols(&protocols);
    for protocol in &offered {
        assert!(
            !protocol.is_empty() && !protocol.contains(','),
            "{protocol:?}"
        );
        assert_eq!(protocol.trim(), protocol);
    }
    let Ok(found) = server::find_token(authorization.as_ref(), query.as_deref(), &offered) else {
        return;
    };
    let in_query = query
        .as_deref()
        .filter(|query| query.split('&').any(|pair| pair.starts_with("token=")));
    match (&authorization, in_query) {
        (Some(value), _) => {
            let value = value.to_str().expect("a bearer value is visible ASCII");
            assert!(value.contains(found) && found.trim() == found, "{found:?}");
        }
        (None, Some(query)) => {
            assert!(!found.contains('&'), "{found:?}");
            assert!(
                query
                    .split('&')
                    .any(|pair| pair == format!("token={found}"))
            );
        }
        (None, None) => assert!(
            offered
                .iter()
                .any(|protocol| protocol.strip_prefix(AUTH_SUBPROTOCOL_PREFIX) == Some(found)),
            "{found:?}"
        ),
    }
    if let Ok(principal) = token_authenticator().authenticate(found) {
        // Only a seed minted with TOKEN_SECRET gets here.
        assert!(!principal.user.is_empty());
        assert!(principal.expires_at > 0);
    }
}

fn token_authenticator() -> &'static Authenticator {
    static AUTHENTICATOR: OnceLock<Authenticator> = OnceLock::new();
    AUTHENTICATOR.get_or_init(|| {
        let config = AuthConfig {
            hmac_secret: Some(Secret::new(TOKEN_SECRET)),
            algorithms: vec!["HS256".into(), "HS384".into(), "HS512".into()],
            user_channels: vec!["user.{sub}.*".into()],
            ..AuthConfig::default()
        };
        Authenticator::from_config(&config).expect("the fuzzing authenticator builds")
    })
}

// ---------------------------------------------------------------------------
// Channel names and patterns.

/// Target `channel`: two parts, a pattern and a channel.
///
/// Properties: name and pattern validation agree with the rules written out
/// plainly; `Pattern::matches` agrees with a dynamic-programming glob matcher,
/// both on the texts as given and on the texts folded into a four-letter
/// alphabet (`a b . *`), where matches are common.
pub fn channel(data: &[u8]) {
    let [pattern, name] = parts::<2>(data);
    let pattern = String::from_utf8_lossy(pattern);
    let name = String::from_utf8_lossy(name);
    assert_eq!(
        channel::validate_name(&name).is_ok(),
        reference_valid(&name, false),
        "{name:?}"
    );
    let parsed = Pattern::parse(&pattern);
    assert_eq!(
        parsed.is_ok(),
        reference_valid(&pattern, true),
        "{pattern:?}"
    );
    if let Ok(parsed) = &parsed {
        assert_eq!(
            parsed.matches(&name),
            reference_glob(pattern.as_bytes(), name.as_bytes()),
            "{pattern:?} ~ {name:?}"
        );
    }
    let fold = |text: &str, alphabet: &[u8]| -> String {
        text.bytes()
            .take(channel::MAX_CHANNEL_LEN)
            .map(|byte| char::from(alphabet[usize::from(byte) % alphabet.len()]))
            .collect()
    };
    let pattern = fold(&pattern, b"ab.*");
    let name = fold(&name, b"ab.");
    if let Ok(parsed) = Pattern::parse(&pattern) {
        assert_eq!(
            parsed.matches(&name),
            reference_glob(pattern.as_bytes(), name.as_bytes()),
            "{pattern:?} ~ {name:?}"
        );
    }
}

/// The naming rules, spelled out: 1 to 128 bytes of ASCII letters, digits and
/// `. _ - : @ / =`, and `*` in patterns.
fn reference_valid(text: &str, pattern: bool) -> bool {
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || "._-:@/=".contains(c) || (pattern && c == '*');
    (1..=128).contains(&text.len()) && text.chars().all(allowed)
}

/// Whether `pattern` (with `*` for any run of bytes) matches all of `text`:
/// `matched[i][j]` says whether the first `i` pattern bytes match the first
/// `j` text bytes.
fn reference_glob(pattern: &[u8], text: &[u8]) -> bool {
    let mut matched = vec![vec![false; text.len() + 1]; pattern.len() + 1];
    matched[0][0] = true;
    for i in 1..=pattern.len() {
        for j in 0..=text.len() {
            matched[i][j] = if pattern[i - 1] == b'*' {
                matched[i - 1][j] || (j > 0 && matched[i][j - 1])
            } else {
                j > 0 && pattern[i - 1] == text[j - 1] && matched[i - 1][j - 1]
            };
        }
    }
    matched[pattern.len()][text.len()]
}

// ---------------------------------------------------------------------------
// Subjects in channel templates.

/// Target `subject`: four parts, a `{sub}` template, two subjects and the
/// text that fills the template's wildcards.
///
/// Properties: `escape_subject` yields only `A-Z a-z 0-9 _ - @ =` (no
/// separator, no `*`) and can be undone, so it is injective; and a channel
/// granted by a template with `{sub}` to one subject is granted to no other
/// subject.
pub fn subject(data: &[u8]) {
    let [template, first, second, fill] = parts::<4>(data);
    let first = String::from_utf8_lossy(first);
    let second = String::from_utf8_lossy(second);
    for subject in [&first, &second] {
        let escaped = channel::escape_subject(subject);
        assert!(
            escaped
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'@' | b'=')),
            "{escaped:?}"
        );
        assert_eq!(unescape(&escaped).as_deref(), Some(subject.as_bytes()));
    }
    assert_eq!(
        first == second,
        channel::escape_subject(&first) == channel::escape_subject(&second)
    );
    let Ok(template) = SubjectTemplate::parse(&String::from_utf8_lossy(template)) else {
        return;
    };
    if !template.as_str().contains(channel::SUBJECT_PLACEHOLDER) {
        // The same channels for every user, by design.
        return;
    }
    let Some(granted) = template.instantiate(&first) else {
        return;
    };
    // A channel of `first`: its pattern with every `*` replaced by channel
    // characters, separators included.
    let fill: String = fill
        .iter()
        .map(|byte| char::from(b"a.:/=@x-"[usize::from(*byte) % 8]))
        .collect();
    let name = granted.as_str().replace('*', &fill);
    if channel::validate_name(&name).is_err() {
        return;
    }
    assert!(granted.matches(&name), "{granted:?} ~ {name:?}");
    if let Some(other) = template.instantiate(&second) {
        assert!(
            !other.matches(&name) || first == second,
            "{template:?} grants {name:?} to {first:?} and to {second:?}"
        );
    }
}

/// Undoes `escape_subject`: `=XX` is the byte with hex value `XX`.
fn unescape(escaped: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut bytes = escaped.bytes();
    while let Some(byte) = bytes.next() {
        if byte == b'=' {
            let hex = [bytes.next()?, bytes.next()?];
            out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
        } else {
            out.push(byte);
        }
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Configuration.

/// Target `config`: a TOML configuration file.
///
/// Properties: reading and validating never panics; for a configuration that
/// validates, building its components (as `herald check-config` does, when no
/// key file is named) never panics, `check-config`'s redacted output reads
/// back, every duration can be added to the clock (the node adds each to
/// `Instant::now()`), and, with an HMAC secret and no issuer or audience
/// rule, a freshly minted token is accepted.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::from_toml(&text) else {
        return;
    };
    let rendered = config.to_redacted_toml();
    match Config::from_toml(&rendered) {
        Ok(_) => {}
        // Redacted secrets are too short to be keys: expected.
        Err(ConfigError::Invalid { key, .. }) if key == "api.key" => {}
        Err(error) => panic!("check-config output does not read back: {error}\n{rendered}"),
    }
    let now = std::time::Instant::now();
    for (key, duration) in durations(&config) {
        assert!(
            now.checked_add(duration).is_some(),
            "{key} = {duration:?} validates but overflows the clock"
        );
    }
    if config.auth.public_key_file.is_some() {
        // Building the authenticator would read that file.
        return;
    }
    if crate::check_config(&config).is_err() {
        return;
    }
    let auth = &config.auth;
    let Some(secret) = &auth.hmac_secret else {
        return;
    };
    if !auth.algorithms.iter().any(|a| a == "HS256")
        || auth.issuer.is_some()
        || auth.audience.is_some()
        || auth.channels_claim != "channels"
    {
        return;
    }
    let authenticator = Authenticator::from_config(auth).expect("check_config built it");
    let token = mint_hs256(secret.expose(), "fuzz", &[], Duration::from_secs(600));
    if let Err(error) = authenticator.authenticate(&token) {
        panic!("a fresh token is refused ({error}) with\n{rendered}");
    }
}

/// Every duration in the configuration, by key.
fn durations(config: &Config) -> HashMap<&'static str, Duration> {
    HashMap::from([
        (
            "server.header_read_timeout",
            config.server.header_read_timeout,
        ),
        ("server.http_idle_timeout", config.server.http_idle_timeout),
        ("auth.leeway", config.auth.leeway),
        ("broker.probe_interval", config.broker.probe_interval),
        ("broker.probe_timeout", config.broker.probe_timeout),
        ("broker.subscribe_timeout", config.broker.subscribe_timeout),
        ("broker.command_timeout", config.broker.command_timeout),
        ("broker.reconnect_min", config.broker.reconnect_min),
        ("broker.reconnect_max", config.broker.reconnect_max),
        ("ping.interval", config.ping.interval),
        ("ping.timeout", config.ping.timeout),
        ("shutdown.timeout", config.shutdown.timeout),
        ("limits.write_timeout", config.limits.write_timeout),
        ("limits.frame_timeout", config.limits.frame_timeout),
    ])
}

// ---------------------------------------------------------------------------
// JSON Web Key Sets.

/// Target `jwks`: a key set document, as `auth.jwks_url` serves it.
///
/// Properties: parsing never panics; a parsed set keeps between 1 and
/// [`jwks::MAX_KEYS`] keys, each found under the `kid` it was listed with,
/// of the family of a configured algorithm and never symmetric; kept plus
/// skipped is the number of entries listed.
pub fn jwks(data: &[u8]) {
    use jsonwebtoken::{Algorithm, AlgorithmFamily};
    let algorithms = [Algorithm::RS256, Algorithm::ES256, Algorithm::EdDSA];
    let Ok((set, skipped)) = jwks::KeySet::parse(data, &algorithms) else {
        return;
    };
    assert!((1..=jwks::MAX_KEYS).contains(&set.len()));
    let listed: Vec<serde_json::Value> = serde_json::from_slice::<serde_json::Value>(data)
        .expect("a parsed set is JSON")["keys"]
        .as_array()
        .expect("a parsed set has a keys array")
        .clone();
    assert_eq!(set.len() + skipped, listed.len());
    let mut found = 0;
    for entry in &listed {
        let Some(key) = entry["kid"].as_str().and_then(|kid| set.get(kid)) else {
            continue;
        };
        found += 1;
        assert_ne!(key.key.family(), AlgorithmFamily::Hmac);
        assert!(algorithms.iter().any(|a| a.family() == key.key.family()));
    }
    assert!(found >= set.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_split_at_0xff() {
        assert_eq!(
            parts::<3>(b"a\xffb\xffc\xffd"),
            [&b"a"[..], b"b", b"c\xffd"]
        );
        assert_eq!(parts::<3>(b"a"), [&b"a"[..], b"", b""]);
        assert_eq!(parts::<1>(b"a\xffb"), [&b"a\xffb"[..]]);
    }

    #[test]
    fn the_reference_glob_is_a_glob() {
        assert!(reference_glob(b"a*b", b"axxb"));
        assert!(reference_glob(b"*", b""));
        assert!(!reference_glob(b"a*b", b"axxc"));
        assert!(!reference_glob(b"", b"a"));
    }
}
