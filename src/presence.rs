//! Presence: who is subscribed to a presence channel, across nodes, and the
//! `join` and `leave` events.
//!
//! Each node counts its own connections per user per presence channel (in the
//! hub). A user joins a channel when its first connection on any node
//! subscribes, and leaves when its last one, on every node, is gone: two tabs
//! of one user join once and leave once.
//!
//! With Redis, each presence channel `<c>` has a hash `{<c>}:p` with one field
//! per node: `{"u": {"<user>": <connections>, ...}, "t": <unix ms>}`. The
//! Function `herald_presence` replaces a node's field with its current members
//! and, atomically, compares the channel's users before and after across the
//! live fields, publishing a `join` or `leave` event (on the channel itself)
//! for each user who appeared or disappeared. It also removes the fields of
//! nodes that stopped writing for `presence.ttl`, with their users' `leave`s.
//! Every node calls it when a user's first or last local connection comes or
//! goes, and for every presence channel it carries each
//! `presence.heartbeat_interval`: the Redis traffic grows with channels, not
//! connections, and nothing is done per message.
//!
//! With the memory broker the node's counts are the whole truth.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::hub::Hub;

/// The first bytes of a presence event on the broker: `\xffP1:j:<user>` or
/// `\xffP1:l:<user>`.
pub const EVENT_MAGIC: &[u8] = b"\xffP1:";

/// A user's arrival or departure on a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    Join(&'a str),
    Leave(&'a str),
}

/// Encodes an event as the Function publishes it.
pub fn encode_event(event: Event<'_>) -> Vec<u8> {
    let (kind, user) = match event {
        Event::Join(user) => (b'j', user),
        Event::Leave(user) => (b'l', user),
    };
    let mut out = Vec::with_capacity(EVENT_MAGIC.len() + 2 + user.len());
    out.extend_from_slice(EVENT_MAGIC);
    out.push(kind);
    out.push(b':');
    out.extend_from_slice(user.as_bytes());
    out
}

/// Reads a presence event; `None` for anything else.
pub fn parse_event(message: &[u8]) -> Option<Event<'_>> {
    let rest = message.strip_prefix(EVENT_MAGIC)?;
    let (kind, user) = (rest.first()?, rest.get(2..)?);
    if rest.get(1) != Some(&b':') {
        return None;
    }
    let user = std::str::from_utf8(user).ok()?;
    match kind {
        b'j' => Some(Event::Join(user)),
        b'l' => Some(Event::Leave(user)),
        _ => None,
    }
}

/// A channel's members: user to connection count, in user order.
pub type Members = BTreeMap<Arc<str>, u32>;

/// Merges the node fields of a presence hash, skipping those older than
/// `ttl` at `now_ms`.
pub fn merge_fields<'a>(
    fields: impl Iterator<Item = &'a [u8]>,
    now_ms: u64,
    ttl: Duration,
) -> Members {
    #[derive(serde::Deserialize)]
    struct Field {
        u: BTreeMap<String, u32>,
        t: u64,
    }
    let mut members = Members::new();
    for field in fields {
        let Ok(field) = serde_json::from_slice::<Field>(field) else {
            continue;
        };
        if field.t + ttl.as_millis() as u64 <= now_ms {
            continue;
        }
        for (user, connections) in field.u {
            *members.entry(user.into()).or_default() += connections;
        }
    }
    members
}

/// Runs the heartbeat until `shutdown`: every `interval`, each presence
/// channel with local members has its node field written again.
pub async fn heartbeat(
    hub: Hub,
    broker: Arc<dyn Broker>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        for channel in hub.presence_channels() {
            let members = hub.local_members(&channel);
            let _ = broker.presence_sync(&channel, &members, None).await;
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_and_nothing_else_parses() {
        for event in [Event::Join("alice"), Event::Leave("a:b"), Event::Join("")] {
            assert_eq!(parse_event(&encode_event(event)), Some(event));
        }
        assert_eq!(parse_event(b"{\"a\":1}"), None);
        assert_eq!(parse_event(b"\xffP1:x:alice"), None);
        assert_eq!(parse_event(b"\xffP1:j"), None);
    }

    #[test]
    fn fields_merge_and_stale_nodes_drop_out() {
        let fields: Vec<&[u8]> = vec![
            br#"{"u":{"alice":2,"bob":1},"t":10000}"#,
            br#"{"u":{"alice":1},"t":9500}"#,
            br#"{"u":{"carol":1},"t":1000}"#,
            b"garbage",
        ];
        let members = merge_fields(fields.into_iter(), 10_000, Duration::from_secs(5));
        let members: Vec<(&str, u32)> = members.iter().map(|(u, c)| (&**u, *c)).collect();
        assert_eq!(members, [("alice", 3), ("bob", 1)]);
    }
}
