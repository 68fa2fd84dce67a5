//! Message history and recovery: the pure parts.
//!
//! A channel whose `[[channels]]` rule sets `history_size` keeps its last
//! messages in the broker (a Redis Stream beside a meta hash holding the
//! channel's epoch and top offset, or a ring in the memory broker). Every
//! message published through the broker's history path carries its offset, an
//! integer that grows by exactly one per message within an epoch.
//!
//! - [`cursor`]: the node's one cursor per history channel, which keeps the
//!   channel gap-free for every local subscriber: it delivers the next offset,
//!   drops duplicates, buffers what arrives early (bounded), and asks for a fill
//!   from the stream when an offset is missing.
//! - [`function`]: the Redis Function library (`herald_publish`,
//!   `herald_read`) that appends, trims, expires and publishes atomically.
//! - [`filler`]: the task that runs the fills and the periodic top checks.
//!
//! The envelope: on Redis, a sequenced message travels as
//! `\xffH1:<epoch>:<offset>:<payload>`. The first byte is never the start of a
//! UTF-8 text, so no JSON or text payload of a raw `PUBLISH` is mistaken for
//! one.

pub mod cursor;
pub mod filler;
pub mod function;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::ChannelRule;

/// A channel's history settings, from its `[[channels]]` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryRule {
    /// Messages kept per channel.
    pub size: u64,
    /// How long an idle channel's history is kept.
    pub ttl: Duration,
    /// The most messages one recovery or fill may replay.
    pub recover_max: u64,
}

impl HistoryRule {
    /// The rule's history settings, when it has history.
    pub fn from_config(rule: &ChannelRule) -> Option<HistoryRule> {
        match (rule.history_size, rule.history_ttl) {
            (0, _) | (_, None) => None,
            (size, Some(ttl)) => Some(HistoryRule {
                size,
                ttl,
                recover_max: rule.recover_max,
            }),
        }
    }
}

/// What the broker's history holds for a channel: its epoch and top offset,
/// and the entries read from some offset on, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// `None` when the store has no history for the channel (never published
    /// through the history path, expired, or lost by a Redis restart).
    pub epoch: Option<Arc<str>>,
    /// The offset of the newest message; 0 without history.
    pub top: u64,
    /// `(offset, payload)`, ascending, consecutive unless the stream was
    /// trimmed past the first one asked for.
    pub entries: Vec<(u64, Bytes)>,
}

/// Where a publish through the history path landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// A client's position on a channel, from the `since` of its subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Since {
    pub epoch: Arc<str>,
    pub offset: u64,
}

/// Why a recovery could not be made: the `reason` of a reply position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecoverable {
    /// The store's epoch is not the one the client names: the history the
    /// client knew was lost (a Redis restart without persistence, an expiry),
    /// or diverged from it.
    EpochChanged,
    /// The stream no longer holds the first message the client lacks.
    Trimmed,
    /// More than `recover_max` messages (or more bytes than a connection's
    /// queue holds) are missing.
    TooMany,
    /// The store has no history for the channel at all.
    UnknownChannel,
}

impl Unrecoverable {
    pub const ALL: [Unrecoverable; 4] = [
        Unrecoverable::EpochChanged,
        Unrecoverable::Trimmed,
        Unrecoverable::TooMany,
        Unrecoverable::UnknownChannel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Unrecoverable::EpochChanged => "epoch_changed",
            Unrecoverable::Trimmed => "trimmed",
            Unrecoverable::TooMany => "too_many",
            Unrecoverable::UnknownChannel => "unknown_channel",
        }
    }
}

/// The first bytes of a sequenced message on Redis.
pub const ENVELOPE_MAGIC: &[u8] = b"\xffH1:";

/// The longest epoch accepted in an envelope or a client's `since`.
pub const MAX_EPOCH_LEN: usize = 32;

/// A sequenced message read off Redis.
#[derive(Debug, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub epoch: &'a str,
    pub offset: u64,
    pub payload: &'a [u8],
}

/// Reads the envelope of a sequenced message; `None` for a raw payload.
pub fn parse_envelope(message: &[u8]) -> Option<Envelope<'_>> {
    let rest = message.strip_prefix(ENVELOPE_MAGIC)?;
    let colon = rest.iter().position(|&b| b == b':')?;
    let (epoch, rest) = (&rest[..colon], &rest[colon + 1..]);
    if !is_epoch(epoch) {
        return None;
    }
    let colon = rest.iter().position(|&b| b == b':')?;
    let (offset, payload) = (&rest[..colon], &rest[colon + 1..]);
    if offset.is_empty() || offset.len() > 19 || !offset.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let offset: u64 = std::str::from_utf8(offset).ok()?.parse().ok()?;
    if offset == 0 {
        return None;
    }
    Some(Envelope {
        epoch: std::str::from_utf8(epoch).ok()?,
        offset,
        payload,
    })
}

/// Encodes a sequenced message the way `herald_publish` does.
pub fn encode_envelope(epoch: &str, offset: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENVELOPE_MAGIC.len() + epoch.len() + 22 + payload.len());
    out.extend_from_slice(ENVELOPE_MAGIC);
    out.extend_from_slice(epoch.as_bytes());
    out.push(b':');
    out.extend_from_slice(offset.to_string().as_bytes());
    out.push(b':');
    out.extend_from_slice(payload);
    out
}

/// Whether `epoch` is a well-formed epoch: 1 to [`MAX_EPOCH_LEN`] ASCII
/// letters and digits.
pub fn is_epoch(epoch: &[u8]) -> bool {
    !epoch.is_empty() && epoch.len() <= MAX_EPOCH_LEN && epoch.iter().all(u8::is_ascii_alphanumeric)
}

/// A new random epoch: 8 letters and digits.
pub fn new_epoch() -> Arc<str> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 8];
    let _ = getrandom::fill(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect::<String>()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &[u8], expected: Option<(&str, u64, &[u8])>) {
        let parsed = parse_envelope(input).map(|e| (e.epoch, e.offset, e.payload));
        assert_eq!(parsed, expected, "{:?}", String::from_utf8_lossy(input));
    }

    #[test]
    fn envelopes() {
        check(
            b"\xffH1:Kx3d:42:{\"a\":1}",
            Some(("Kx3d", 42, b"{\"a\":1}")),
        );
        check(b"\xffH1:Kx3d:1:", Some(("Kx3d", 1, b"")));
        check(b"\xffH1:Kx3d:7:a:b", Some(("Kx3d", 7, b"a:b")));
        check(b"{\"a\":1}", None);
        check(b"\xffH1::1:x", None);
        check(b"\xffH1:K-x:1:x", None);
        check(b"\xffH1:K:0:x", None);
        check(b"\xffH1:K:-1:x", None);
        check(b"\xffH1:K:99999999999999999999:x", None);
        check(b"\xffH1:K:12", None);
        let encoded = encode_envelope("Kx3d", 42, b"hello");
        check(&encoded, Some(("Kx3d", 42, b"hello")));
    }

    #[test]
    fn new_epochs_are_well_formed_and_differ() {
        let a = new_epoch();
        assert!(is_epoch(a.as_bytes()), "{a}");
        assert_ne!(a, new_epoch());
    }
}
