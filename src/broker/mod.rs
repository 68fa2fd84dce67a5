//! Brokers carry published messages to every node that has subscribers.
//!
//! A broker delivers into the [`Hub`](crate::hub::Hub) by calling
//! [`Hub::deliver`](crate::hub::Hub::deliver), which never blocks. The memory
//! broker is the embedded default; the Redis brokers come with cross-node fan-out.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

use crate::history::{Position, Snapshot};
use crate::presence::{Event, Members};

/// A boxed broker future: brokers are used as trait objects.
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    /// The broker cannot be reached now; the node retries by itself.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// The interface between a node and whatever carries messages between nodes.
pub trait Broker: Send + Sync + 'static {
    /// Publishes `payload` on `channel` to every node.
    ///
    /// Guarantee on a channel without history: at most once. `Ok` means the
    /// broker accepted the message; nodes subscribed at that moment receive it
    /// once, in publish order per channel. A node that is disconnected from
    /// the broker misses it and tells its clients with a `gap` frame after
    /// reconnecting.
    ///
    /// On a history channel the message is appended to the channel's history
    /// and published with its offset in one atomic step (`herald_publish` on
    /// Redis), and `Ok` carries that position. A node that misses it fetches it
    /// from the history while the history holds it.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: Bytes,
    ) -> BrokerFuture<'a, Option<Position>>;

    /// Reads a history channel: its epoch and top offset, and up to `count`
    /// entries from offset `from` on. A channel without history reads as an
    /// empty [`Snapshot`].
    fn read_history<'a>(
        &'a self,
        channel: &'a str,
        from: u64,
        count: usize,
    ) -> BrokerFuture<'a, Snapshot>;

    /// Resolves when messages published on each of `channels` from now on reach
    /// this node. The hub already lists the channels as wanted; this waits for
    /// the broker to confirm. Cancel-safe: dropping it leaves the subscription
    /// wanted.
    fn ensure_subscribed<'a>(&'a self, channels: &'a [Arc<str>]) -> BrokerFuture<'a, ()>;

    /// Records this node's `members` of the presence channel `channel`, and
    /// publishes a `join` or `leave` for each user who appeared on or left the
    /// channel across all nodes. `change` is the user whose connections on
    /// this node went from or to zero, if any (the heartbeat has none).
    fn presence_sync<'a>(
        &'a self,
        channel: &'a str,
        members: &'a Members,
        change: Option<Event<'a>>,
    ) -> BrokerFuture<'a, ()>;

    /// The members of a presence channel across all nodes.
    fn presence_read<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Members>;

    /// Whether clients may subscribe to patterns (`prices.*`): not on Redis
    /// Cluster, whose sharded pub/sub has no pattern form.
    fn supports_patterns(&self) -> bool {
        true
    }

    /// Whether the broker is connected, for `/readyz`.
    fn is_ready(&self) -> bool;
}
