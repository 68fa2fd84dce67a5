//! One connection's bounded outbound queue and its slow-consumer policies.
//!
//! Fan-out pushes into an [`Outbox`] synchronously and never waits: a push takes
//! a short, uncontended mutex, applies the channel's policy when the queue is
//! full, and wakes the connection's writer only when the queue goes from empty
//! to non-empty. The writer drains everything pending into one socket write.
//!
//! Bounds: at most `limits.queue_messages` entries and `limits.queue_bytes`
//! bytes (a lone entry is always admitted, whatever its size), plus at most one
//! pending entry per `conflate` channel and one held entry per rate-limited
//! channel, both bounded by `limits.max_channels_per_connection`. Frames are
//! shared [`Bytes`]: an entry costs a reference, not a copy of the payload.
//!
//! The lock is a `std::sync::Mutex`: it is held for a few pointer moves, never
//! across an `.await`, and contention is one fan-out thread against one writer.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use std::io::IoSlice;
use std::sync::Arc;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::SlowPolicy;
use crate::metrics::Metrics;
use crate::protocol::{CloseCode, Opcode};
use crate::session::write_batch::{MAX_HEADER_BYTES, frame_header};

/// Identifies a channel within a node (assigned by the hub), so that the
/// outbox can conflate and rate-limit per channel without comparing names.
pub type ChannelKey = u64;

/// How one channel's messages are treated when they cannot be written fast enough.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DeliveryPolicy {
    pub slow: SlowPolicy,
    /// From `max_rate_hz`: deliveries of this channel are at least this far apart.
    pub min_interval: Option<Duration>,
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        DeliveryPolicy {
            slow: SlowPolicy::Disconnect,
            min_interval: None,
        }
    }
}

/// Queue bounds, from `limits.queue_messages` and `limits.queue_bytes`.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub messages: usize,
    pub bytes: usize,
}

/// The close frame the writer must send last.
#[derive(Debug, Clone, PartialEq)]
pub enum Closing {
    /// The node closes with this code.
    Code(CloseCode),
    /// The client closed first; echo its close payload (RFC 6455 5.5.1).
    Echo(Bytes),
}

/// What the writer takes out of the outbox in one go.
#[derive(Debug, Default)]
pub struct Drained {
    /// The rest of a frame a push started writing on the spot: raw bytes,
    /// to be written before anything else.
    pub partial: Option<Bytes>,
    /// The drained frames are binary messages (only echo sessions queue
    /// them); otherwise text. One drain never mixes the two.
    pub binary: bool,
    /// Unanswered client pings' payloads, oldest first: one pong each.
    pub pongs: VecDeque<Bytes>,
    /// Set when the queue is empty and the connection is closing: send this, then stop.
    pub closing: Option<Closing>,
    /// How many of the drained frames are channel messages (not replies).
    pub messages: u64,
    /// Entries were left queued (the batch was full): drain again without
    /// waiting. Pushes to an empty queue wake the writer by themselves.
    pub more: bool,
    /// When the next held rate-limited message is due, if any.
    pub next_release: Option<Instant>,
}

pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the writer. A permit is stored when it is not waiting, so no wake-up is lost.
    notify: Notify,
    /// Milliseconds after `epoch` at which the client last sent a frame; read by
    /// the writer's ping-timeout check.
    last_activity_ms: AtomicU64,
    /// When the token (plus leeway) expires, in Unix seconds; moved by refresh.
    expires_at: AtomicU64,
    /// Reference point for `last_activity_ms`.
    epoch: Instant,
    limits: QueueLimits,
    metrics: Metrics,
}

struct State {
    queue: VecDeque<Entry>,
    /// Sum of the frame lengths in `queue`.
    bytes: usize,
    /// Payloads of unanswered client pings, at most [`MAX_PENDING_PONGS`] of
    /// 125 bytes; no allocation while there are none.
    pongs: VecDeque<Bytes>,
    closing: Option<Closing>,
    /// Rate-limited channels' last delivery time and newest held message.
    rated: Vec<RateSlot>,
    /// How many entries have left the front of `queue` since the outbox was
    /// made: `queue[i]` is entry number `popped + i`.
    popped: u64,
    /// Each `conflate` channel's pending entry, by entry number, so that a new
    /// message replaces it without scanning the queue. At most one per
    /// channel: bounded by `limits.max_channels_per_connection`. In queue
    /// order, so that the drain pops its front; searching a few pairs from the
    /// newest beats hashing.
    conflated: VecDeque<(ChannelKey, u64)>,
    /// `drop_oldest` messages queued, so that a full queue without any does
    /// not scan for one.
    drop_oldest_queued: usize,
    /// Direct delivery (plain TCP only): the connection's socket, while it is
    /// open.
    socket: Option<Arc<TcpStream>>,
    /// The writer waits with nothing to write, pending or partly written:
    /// until its next drain, a message pushed into the empty queue is
    /// written on the spot by the pushing thread.
    writer_idle: bool,
    /// What the socket did not take of a frame written on the spot: the
    /// writer writes it before anything else.
    partial: Option<Bytes>,
}

impl State {
    /// Empties the queue (a close that discards what is queued).
    fn discard_queue(&mut self) {
        self.popped += self.queue.len() as u64;
        self.queue = VecDeque::new();
        self.bytes = 0;
        self.conflated = VecDeque::new();
        self.drop_oldest_queued = 0;
    }
}

struct Entry {
    frame: Bytes,
    kind: Kind,
}

/// What an entry is. The tag lives in `SlowPolicy`'s spare values, so an
/// entry is a `Bytes` and 16 bytes whichever the kind (see the size test).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A reply or another protocol frame, sent as text; never dropped or conflated.
    Reply,
    /// A reply sent as a binary frame: the echo of a binary message (echo
    /// sessions only, the `test-echo` feature). Treated like a reply.
    BinaryReply,
    /// A channel message, under its channel's slow-consumer policy.
    Message(ChannelKey, SlowPolicy),
}

struct RateSlot {
    channel: ChannelKey,
    slow: SlowPolicy,
    interval: Duration,
    next_allowed: Instant,
    held: Option<Bytes>,
}

/// Unanswered client pings answered one by one; beyond this many only the
/// latest are. Pings also take request tokens (`limits.requests_per_second`).
pub const MAX_PENDING_PONGS: usize = 16;

impl Outbox {
    pub fn new(limits: QueueLimits, expires_at: u64, metrics: Metrics) -> Outbox {
        Outbox {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                pongs: VecDeque::new(),
                closing: None,
                rated: Vec::new(),
                popped: 0,
                conflated: VecDeque::new(),
                drop_oldest_queued: 0,
                socket: None,
                writer_idle: false,
                partial: None,
            }),
            notify: Notify::new(),
            last_activity_ms: AtomicU64::new(0),
            expires_at: AtomicU64::new(expires_at),
            epoch: Instant::now(),
            limits,
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves the queue consistent (every
        // mutation is a single push, pop or replace), so poisoning is ignored.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a channel message under the channel's policy. Never blocks.
    pub fn push_message(&self, frame: &Bytes, channel: ChannelKey, policy: &DeliveryPolicy) {
        let mut state = self.lock();
        if state.closing.is_some() {
            return;
        }
        if let Some(interval) = policy.min_interval {
            let now = Instant::now();
            match state.rated.iter_mut().find(|slot| slot.channel == channel) {
                Some(slot) if slot.held.is_some() || now < slot.next_allowed => {
                    let had_held = slot.held.replace(frame.clone()).is_some();
                    drop(state);
                    if had_held {
                        self.metrics
                            .message_dropped("rate_limited", Some(policy.slow));
                    } else {
                        // A new deadline for the writer to sleep until.
                        self.notify.notify_one();
                    }
                    return;
                }
                Some(slot) => slot.next_allowed = now + interval,
                None => state.rated.push(RateSlot {
                    channel,
                    slow: policy.slow,
                    interval,
                    next_allowed: now + interval,
                    held: None,
                }),
            }
        }
        if state.writer_idle && state.queue.is_empty() {
            if let Some(socket) = &state.socket {
                match write_now(socket, frame) {
                    Direct::Written => {
                        drop(state);
                        self.metrics.frames_delivered(1);
                        return;
                    }
                    Direct::Partly(rest) => {
                        state.partial = Some(rest);
                        state.writer_idle = false;
                        drop(state);
                        self.metrics.frames_delivered(1);
                        self.notify.notify_one();
                        return;
                    }
                    // Full, or failing: the writer takes over, and meets the
                    // error itself if there is one.
                    Direct::NotWritten => state.writer_idle = false,
                }
            }
        }
        self.enqueue(&mut state, frame.clone(), channel, policy.slow);
    }

    /// Lets pushes write channel messages to `socket` themselves while the
    /// writer is idle ([`Outbox::park`]). Plain TCP only: a TLS session's
    /// state belongs to its writer.
    pub fn attach_socket(&self, socket: Arc<TcpStream>) {
        self.lock().socket = Some(socket);
    }

    /// Ends direct delivery, so that the socket closes with the connection.
    pub fn detach_socket(&self) {
        let mut state = self.lock();
        state.socket = None;
        state.writer_idle = false;
    }

    /// The writer is about to wait, with everything written: until its next
    /// [`Outbox::drain`], a message pushed into the empty queue may be
    /// written at once by the pushing thread.
    pub fn park(&self) {
        let mut state = self.lock();
        state.writer_idle = state.socket.is_some()
            && state.queue.is_empty()
            && state.pongs.is_empty()
            && state.partial.is_none()
            && state.closing.is_none();
    }

    fn enqueue(&self, state: &mut State, frame: Bytes, channel: ChannelKey, slow: SlowPolicy) {
        if state.closing.is_some() {
            // Decided to close (perhaps by the previous release): queue nothing more.
            return;
        }
        let len = frame.len();
        if slow == SlowPolicy::Conflate {
            let pending = state
                .conflated
                .iter()
                .rev()
                .find(|(key, _)| *key == channel);
            if let Some(&(_, number)) = pending {
                let index = (number - state.popped) as usize;
                let entry = &mut state.queue[index];
                debug_assert!(matches!(entry.kind, Kind::Message(key, _) if key == channel));
                let replaced = std::mem::replace(&mut entry.frame, frame);
                state.bytes = state.bytes - replaced.len() + len;
                self.metrics.message_dropped("conflated", Some(slow));
                return;
            }
        }
        if self.is_full(state, len) {
            match slow {
                SlowPolicy::Disconnect => {
                    self.fail(state, CloseCode::SlowConsumer);
                    return;
                }
                SlowPolicy::DropOldest => {
                    while self.is_full(state, len) {
                        self.metrics.message_dropped("queue_full", Some(slow));
                        // The scan stops at the first drop_oldest entry, and
                        // is skipped when there is none.
                        let oldest = (state.drop_oldest_queued > 0)
                            .then(|| {
                                state.queue.iter().position(|entry| {
                                    matches!(entry.kind, Kind::Message(_, SlowPolicy::DropOldest))
                                })
                            })
                            .flatten();
                        let Some(index) = oldest else {
                            // Only other policies' messages are queued: this one yields.
                            return;
                        };
                        let evicted = state.queue.remove(index).expect("found above");
                        state.bytes -= evicted.frame.len();
                        state.drop_oldest_queued -= 1;
                        // Entries behind it moved up one place.
                        let removed = state.popped + index as u64;
                        for (_, number) in state.conflated.iter_mut() {
                            if *number > removed {
                                *number -= 1;
                            }
                        }
                    }
                }
                // Admitted over the limit: a conflate channel has at most one
                // pending entry, so this is bounded by the channel count.
                SlowPolicy::Conflate => {}
            }
        }
        self.append(
            state,
            Entry {
                frame,
                kind: Kind::Message(channel, slow),
            },
        );
    }

    /// Queues a reply or another protocol frame. Replies are never dropped: a
    /// client whose queue is full is closed as a slow consumer instead.
    pub fn push_reply(&self, frame: Bytes) {
        self.push_unconflated(frame, Kind::Reply);
    }

    /// Queues a reply to be sent as a binary frame, like [`Outbox::push_reply`].
    /// Only echo sessions (the `test-echo` feature) send binary frames.
    pub fn push_binary_reply(&self, frame: Bytes) {
        self.push_unconflated(frame, Kind::BinaryReply);
    }

    fn push_unconflated(&self, frame: Bytes, kind: Kind) {
        let mut state = self.lock();
        if state.closing.is_some() {
            return;
        }
        if self.is_full(&state, frame.len()) {
            self.fail(&mut state, CloseCode::SlowConsumer);
            return;
        }
        self.append(&mut state, Entry { frame, kind });
    }

    fn is_full(&self, state: &State, len: usize) -> bool {
        !state.queue.is_empty()
            && (state.queue.len() >= self.limits.messages || state.bytes + len > self.limits.bytes)
    }

    fn append(&self, state: &mut State, entry: Entry) {
        let was_empty = state.queue.is_empty();
        state.bytes += entry.frame.len();
        match entry.kind {
            Kind::Message(channel, SlowPolicy::Conflate) => {
                let number = state.popped + state.queue.len() as u64;
                state.conflated.push_back((channel, number));
            }
            Kind::Message(_, SlowPolicy::DropOldest) => state.drop_oldest_queued += 1,
            _ => {}
        }
        state.queue.push_back(entry);
        if was_empty {
            self.notify.notify_one();
        }
    }

    /// Closes because the client cannot keep up: what is queued is discarded.
    fn fail(&self, state: &mut State, code: CloseCode) {
        if state.closing.is_none() {
            state.closing = Some(Closing::Code(code));
        }
        state.discard_queue();
        state.rated = Vec::new();
        self.notify.notify_one();
    }

    /// Starts closing with `code`. The first close wins.
    ///
    /// What is already queued is flushed first on shutdown (1001), token
    /// expiry (4001) and when the client broke a rule (1002, 1007, 1009, 4005,
    /// 4006): the replies to its earlier requests still reach it, whatever
    /// the writer had taken when the reader found the fault. It is discarded
    /// for a slow consumer (4002, the queue is the problem), a client that
    /// stopped answering (4003), a refresh for another subject (4004) and a
    /// lost connection (1000).
    pub fn close(&self, code: CloseCode) {
        let mut state = self.lock();
        if state.closing.is_some() {
            return;
        }
        let flush = match code {
            CloseCode::GoingAway
            | CloseCode::TokenExpired
            | CloseCode::ProtocolError
            | CloseCode::InvalidPayload
            | CloseCode::MessageTooBig
            | CloseCode::PolicyViolation
            | CloseCode::FrameTimeout => true,
            CloseCode::Normal
            | CloseCode::SlowConsumer
            | CloseCode::PingTimeout
            | CloseCode::Forbidden => false,
        };
        if flush {
            state.closing = Some(Closing::Code(code));
            state.rated = Vec::new();
            self.notify.notify_one();
        } else {
            self.fail(&mut state, code);
        }
    }

    /// The client sent a close frame: echo it and stop.
    pub fn echo_close(&self, payload: Bytes) {
        let mut state = self.lock();
        if state.closing.is_none() {
            state.closing = Some(Closing::Echo(payload));
        }
        state.discard_queue();
        self.notify.notify_one();
    }

    /// Answers a client ping. Pongs go out ahead of queued frames, one per
    /// ping, up to [`MAX_PENDING_PONGS`] unanswered pings; beyond that the
    /// oldest go unanswered (RFC 6455 5.5.3 allows answering only the latest).
    pub fn pong(&self, payload: Bytes) {
        let mut state = self.lock();
        if state.pongs.len() == MAX_PENDING_PONGS {
            state.pongs.pop_front();
        }
        state.pongs.push_back(payload);
        // A pong never waits behind a message written on the spot.
        state.writer_idle = false;
        drop(state);
        self.notify.notify_one();
    }

    /// Forgets a channel's rate-limit state after an unsubscribe, so that a held
    /// message is not delivered later.
    pub fn forget(&self, channel: ChannelKey) {
        let mut state = self.lock();
        state.rated.retain(|slot| slot.channel != channel);
    }

    /// Moves rate-limited messages whose time has come into the queue, and
    /// returns when the next one is due.
    fn release_due(&self, state: &mut State, now: Instant) -> Option<Instant> {
        if state.rated.is_empty() || state.closing.is_some() {
            return None;
        }
        let mut next: Option<Instant> = None;
        let mut due = Vec::new();
        for slot in state.rated.iter_mut() {
            if slot.held.is_none() {
                continue;
            }
            if slot.next_allowed <= now {
                let frame = slot.held.take().expect("checked above");
                slot.next_allowed = now + slot.interval;
                due.push((frame, slot.channel, slot.slow));
            } else {
                next = Some(next.map_or(slot.next_allowed, |n| n.min(slot.next_allowed)));
            }
        }
        for (frame, channel, slow) in due {
            self.enqueue(state, frame, channel, slow);
        }
        next
    }

    /// Releases rate-limited messages that are due at `now`, then takes queued
    /// frames, oldest first, until `max_bytes` is reached or the next frame's
    /// opcode differs (text and binary frames go out in separate drains). One
    /// lock per call: this is the writer's whole view of the outbox.
    pub fn drain(&self, frames: &mut Vec<Bytes>, max_bytes: usize, now: Instant) -> Drained {
        let mut state = self.lock();
        // The writer is busy from here on: nothing is written past it.
        state.writer_idle = false;
        let next_release = self.release_due(&mut state, now);
        let mut drained = Drained {
            partial: state.partial.take(),
            pongs: std::mem::take(&mut state.pongs),
            next_release,
            ..Drained::default()
        };
        let mut taken = 0;
        let first = frames.len();
        while let Some(entry) = state.queue.front() {
            let binary = entry.kind == Kind::BinaryReply;
            if frames.len() == first {
                drained.binary = binary;
            } else if binary != drained.binary {
                break;
            }
            if taken > 0 && taken + entry.frame.len() > max_bytes {
                break;
            }
            let entry = state.queue.pop_front().expect("front exists");
            state.popped += 1;
            match entry.kind {
                Kind::Message(channel, SlowPolicy::Conflate) => {
                    // Entries leave in queue order: this one is the oldest.
                    let front = state.conflated.pop_front();
                    debug_assert_eq!(front.map(|(key, _)| key), Some(channel));
                }
                Kind::Message(_, SlowPolicy::DropOldest) => state.drop_oldest_queued -= 1,
                _ => {}
            }
            taken += entry.frame.len();
            state.bytes -= entry.frame.len();
            if matches!(entry.kind, Kind::Message(..)) {
                drained.messages += 1;
            }
            frames.push(entry.frame);
        }
        if state.queue.is_empty() {
            // An idle connection keeps no queue buffer: the 4 entries the
            // first push reserves are 192 bytes per connection for life, and
            // the next push's allocation is cheap beside its write.
            state.queue = VecDeque::new();
            state.conflated = VecDeque::new();
            drained.closing = state.closing.clone();
        } else {
            drained.more = true;
        }
        drained
    }

    /// Whether anything is queued or a pong is pending.
    #[cfg(test)]
    fn has_pending(&self) -> bool {
        let state = self.lock();
        !state.queue.is_empty() || !state.pongs.is_empty()
    }

    /// Waits until something is pushed. Cancel-safe: a wake-up that arrives
    /// while nobody waits is kept as a permit.
    pub async fn changed(&self) {
        self.notify.notified().await
    }

    /// Records that the client sent a frame. Rounded up to the next
    /// millisecond, so that an answer arriving within the millisecond of a
    /// ping still counts as after it.
    pub fn touch(&self) {
        let elapsed = self.epoch.elapsed().as_millis() as u64 + 1;
        self.last_activity_ms.store(elapsed, Ordering::Relaxed);
    }

    /// When the client last sent a frame (the connection's start if never).
    pub fn last_activity(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_activity_ms.load(Ordering::Relaxed))
    }

    pub fn expires_at(&self) -> u64 {
        self.expires_at.load(Ordering::Relaxed)
    }

    pub fn set_expires_at(&self, unix_secs: u64) {
        self.expires_at.store(unix_secs, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

/// What a write on the spot did.
enum Direct {
    Written,
    /// Part of it went out; this is the rest.
    Partly(Bytes),
    /// Nothing went out (the socket is full, or failing).
    NotWritten,
}

/// Writes `frame` as a text frame with one non-blocking vectored write.
fn write_now(socket: &TcpStream, frame: &Bytes) -> Direct {
    let mut header = [0u8; MAX_HEADER_BYTES];
    let used = frame_header(&mut header, Opcode::Text, frame.len());
    let total = used + frame.len();
    match socket.try_write_vectored(&[IoSlice::new(&header[..used]), IoSlice::new(frame)]) {
        Ok(written) if written == total => Direct::Written,
        Ok(written) if written >= used => Direct::Partly(frame.slice(written - used..)),
        Ok(written) => {
            let mut rest = Vec::with_capacity(total - written);
            rest.extend_from_slice(&header[written..used]);
            rest.extend_from_slice(frame);
            Direct::Partly(Bytes::from(rest))
        }
        Err(_) => Direct::NotWritten,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(messages: usize, bytes: usize) -> Outbox {
        Outbox::new(
            QueueLimits { messages, bytes },
            u64::MAX,
            Metrics::new("test"),
        )
    }

    fn policy(slow: SlowPolicy) -> DeliveryPolicy {
        DeliveryPolicy {
            slow,
            min_interval: None,
        }
    }

    fn drain_all(outbox: &Outbox) -> (Vec<Bytes>, Drained) {
        let mut frames = Vec::new();
        let drained = outbox.drain(&mut frames, usize::MAX, Instant::now());
        (frames, drained)
    }

    /// A connected pair on loopback: the server's end, shared as the
    /// connection shares it, and the client's.
    async fn socket_pair() -> (Arc<TcpStream>, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (Arc::new(server), client)
    }

    fn text_frame(payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        crate::protocol::write_frame(&mut frame, Opcode::Text, payload);
        frame
    }

    #[tokio::test]
    async fn a_push_to_an_idle_writer_is_written_on_the_spot() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = socket_pair().await;
        let outbox = outbox(16, 1 << 20);
        outbox.attach_socket(server);
        let message = Bytes::from_static(b"{\"type\":\"message\"}");
        // A busy writer (not parked): queued for it.
        outbox.push_message(&message, 1, &policy(SlowPolicy::Disconnect));
        let (frames, _) = drain_all(&outbox);
        assert_eq!(frames, vec![message.clone()]);
        // An idle writer: on the wire at once, nothing queued.
        outbox.park();
        outbox.push_message(&message, 1, &policy(SlowPolicy::Disconnect));
        let expected = text_frame(&message);
        let mut received = vec![0u8; expected.len()];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(received, expected);
        let (frames, drained) = drain_all(&outbox);
        assert!(frames.is_empty() && drained.partial.is_none());
        // The drain made the writer busy again: the next push is queued.
        outbox.push_message(&message, 1, &policy(SlowPolicy::Disconnect));
        assert_eq!(drain_all(&outbox).0, vec![message.clone()]);
        // Nothing is written past a pending pong or a close.
        outbox.park();
        outbox.pong(Bytes::new());
        outbox.push_message(&message, 1, &policy(SlowPolicy::Disconnect));
        assert_eq!(drain_all(&outbox).0, vec![message.clone()]);
        outbox.detach_socket();
        outbox.park();
        outbox.push_message(&message, 1, &policy(SlowPolicy::Disconnect));
        assert_eq!(drain_all(&outbox).0, vec![message]);
    }

    #[tokio::test]
    async fn the_rest_of_a_partly_written_frame_goes_first() {
        use tokio::io::AsyncReadExt;
        let (server, mut client) = socket_pair().await;
        socket2::SockRef::from(&*server)
            .set_send_buffer_size(4096)
            .unwrap();
        let outbox = outbox(16, 16 << 20);
        outbox.attach_socket(server);
        // Larger than anything loopback buffers take without a reader.
        let message = Bytes::from(vec![b'x'; 8 << 20]);
        outbox.park();
        outbox.push_message(&message, 1, &policy(SlowPolicy::Disconnect));
        let next = Bytes::from_static(b"next");
        outbox.push_message(&next, 1, &policy(SlowPolicy::Disconnect));
        let (frames, drained) = drain_all(&outbox);
        let rest = drained.partial.expect("the socket took part of it");
        let expected = text_frame(&message);
        assert!(rest.len() < expected.len());
        assert_eq!(&rest[..], &expected[expected.len() - rest.len()..]);
        // The next message waited in the queue, behind the rest.
        assert_eq!(frames, vec![next]);
        let mut received = vec![0u8; expected.len() - rest.len()];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(received, expected[..received.len()]);
    }

    #[test]
    fn a_drained_queue_keeps_no_buffer() {
        let outbox = outbox(16, 1 << 20);
        for i in 0..3 {
            outbox.push_message(
                &Bytes::from(format!("m{i}")),
                i,
                &policy(SlowPolicy::Conflate),
            );
        }
        assert!(outbox.lock().queue.capacity() > 0);
        let (frames, _) = drain_all(&outbox);
        assert_eq!(frames.len(), 3);
        let state = outbox.lock();
        assert_eq!(state.queue.capacity(), 0, "an idle outbox holds no queue");
        assert_eq!(state.conflated.capacity(), 0);
    }

    #[test]
    fn disconnect_policy_closes_when_full() {
        let outbox = outbox(2, 1 << 20);
        for i in 0..3 {
            outbox.push_message(
                &Bytes::from(format!("m{i}")),
                1,
                &policy(SlowPolicy::Disconnect),
            );
        }
        let (frames, drained) = drain_all(&outbox);
        assert!(frames.is_empty());
        assert_eq!(
            drained.closing,
            Some(Closing::Code(CloseCode::SlowConsumer))
        );
    }

    #[test]
    fn drop_oldest_keeps_the_newest() {
        let outbox = outbox(2, 1 << 20);
        for i in 0..5 {
            outbox.push_message(
                &Bytes::from(format!("m{i}")),
                1,
                &policy(SlowPolicy::DropOldest),
            );
        }
        let (frames, drained) = drain_all(&outbox);
        assert_eq!(frames, ["m3", "m4"]);
        assert_eq!(drained.closing, None);
    }

    #[test]
    fn conflate_keeps_one_newest_per_channel() {
        let outbox = outbox(1, 1 << 20);
        for i in 0..100 {
            outbox.push_message(
                &Bytes::from(format!("a{i}")),
                1,
                &policy(SlowPolicy::Conflate),
            );
            outbox.push_message(
                &Bytes::from(format!("b{i}")),
                2,
                &policy(SlowPolicy::Conflate),
            );
        }
        let (frames, drained) = drain_all(&outbox);
        assert_eq!(frames, ["a99", "b99"]);
        assert_eq!(drained.closing, None);
    }

    #[test]
    fn byte_limit_counts_and_lone_large_frame_is_admitted() {
        let outbox = outbox(100, 10);
        outbox.push_message(
            &Bytes::from(vec![b'x'; 50]),
            1,
            &policy(SlowPolicy::Disconnect),
        );
        assert!(outbox.has_pending());
        outbox.push_message(
            &Bytes::from_static(b"y"),
            1,
            &policy(SlowPolicy::Disconnect),
        );
        let (_, drained) = drain_all(&outbox);
        assert_eq!(
            drained.closing,
            Some(Closing::Code(CloseCode::SlowConsumer))
        );
    }

    #[test]
    fn an_entry_costs_the_same_whatever_its_kind() {
        // A `Bytes` (32) and the kind (16): the binary kind added nothing.
        assert_eq!(std::mem::size_of::<Entry>(), 48);
    }

    #[test]
    fn text_and_binary_frames_are_drained_in_separate_runs() {
        let outbox = outbox(10, 1 << 20);
        outbox.push_reply(Bytes::from_static(b"t1"));
        outbox.push_reply(Bytes::from_static(b""));
        outbox.push_binary_reply(Bytes::from_static(b"b1"));
        outbox.push_binary_reply(Bytes::from_static(b"b2"));
        outbox.push_reply(Bytes::from_static(b"t2"));
        outbox.close(CloseCode::GoingAway);
        let mut runs = Vec::new();
        loop {
            let (frames, drained) = drain_all(&outbox);
            runs.push((drained.binary, frames));
            if !drained.more {
                assert_eq!(drained.closing, Some(Closing::Code(CloseCode::GoingAway)));
                break;
            }
        }
        assert_eq!(
            runs,
            [
                (false, vec![Bytes::from_static(b"t1"), Bytes::new()]),
                (
                    true,
                    vec![Bytes::from_static(b"b1"), Bytes::from_static(b"b2")]
                ),
                (false, vec![Bytes::from_static(b"t2")]),
            ]
        );
    }

    #[test]
    fn every_ping_is_answered_up_to_a_bound() {
        let outbox = outbox(10, 1 << 20);
        for i in 0..10 {
            outbox.pong(Bytes::from(format!("p{i}")));
        }
        let (_, drained) = drain_all(&outbox);
        let expected: Vec<Bytes> = (0..10).map(|i| Bytes::from(format!("p{i}"))).collect();
        assert_eq!(drained.pongs, expected);
        for i in 0..MAX_PENDING_PONGS + 5 {
            outbox.pong(Bytes::from(format!("q{i}")));
        }
        let (_, drained) = drain_all(&outbox);
        let newest: Vec<Bytes> = (5..MAX_PENDING_PONGS + 5)
            .map(|i| Bytes::from(format!("q{i}")))
            .collect();
        assert_eq!(drained.pongs, newest);
        assert!(!outbox.has_pending());
    }

    #[test]
    fn closes_flush_or_discard_by_cause() {
        let check = |code: CloseCode, flushed: bool| {
            let outbox = outbox(10, 1 << 20);
            outbox.push_reply(Bytes::from_static(b"reply"));
            outbox.close(code);
            let (frames, drained) = drain_all(&outbox);
            assert_eq!(frames.len(), usize::from(flushed), "{code:?}");
            assert_eq!(drained.closing, Some(Closing::Code(code)));
        };
        // The client broke a rule: the replies to its earlier requests
        // still go out, then the close.
        check(CloseCode::ProtocolError, true);
        check(CloseCode::InvalidPayload, true);
        check(CloseCode::MessageTooBig, true);
        check(CloseCode::PolicyViolation, true);
        check(CloseCode::FrameTimeout, true);
        check(CloseCode::GoingAway, true);
        check(CloseCode::TokenExpired, true);
        check(CloseCode::SlowConsumer, false);
        check(CloseCode::PingTimeout, false);
        check(CloseCode::Forbidden, false);
    }

    #[test]
    fn shutdown_flushes_before_closing() {
        let outbox = outbox(10, 1 << 20);
        outbox.push_reply(Bytes::from_static(b"r"));
        outbox.close(CloseCode::GoingAway);
        outbox.push_reply(Bytes::from_static(b"late"));
        let (frames, drained) = drain_all(&outbox);
        assert_eq!(frames, ["r"]);
        assert_eq!(drained.closing, Some(Closing::Code(CloseCode::GoingAway)));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_holds_the_newest() {
        let outbox = outbox(10, 1 << 20);
        let limited = DeliveryPolicy {
            slow: SlowPolicy::Disconnect,
            min_interval: Some(Duration::from_millis(100)),
        };
        for i in 0..5 {
            outbox.push_message(&Bytes::from(format!("m{i}")), 7, &limited);
        }
        let (frames, drained) = drain_all(&outbox);
        assert_eq!(frames, ["m0"]);
        let due = drained.next_release.expect("a held message");
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(due <= Instant::now());
        let (frames, drained) = drain_all(&outbox);
        assert_eq!(drained.next_release, None);
        assert_eq!(frames, ["m4"]);
    }

    /// The indexed conflation and eviction against a model that scans, as
    /// the outbox once did, over a long pseudo-random run of pushes, replies
    /// and partial drains.
    #[test]
    fn indexed_conflation_matches_a_scanning_model() {
        #[derive(Clone, Copy, PartialEq, Debug)]
        enum Model {
            Reply,
            Message(ChannelKey, SlowPolicy),
        }
        let outbox = outbox(12, 1 << 20);
        let mut model: VecDeque<(Model, Bytes)> = VecDeque::new();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut delivered = Vec::new();
        let mut expected = Vec::new();
        for step in 0..20_000u64 {
            let frame = Bytes::from(step.to_string());
            match next() % 10 {
                0..=3 => {
                    let channel = next() % 4;
                    outbox.push_message(&frame, channel, &policy(SlowPolicy::Conflate));
                    match model
                        .iter_mut()
                        .rev()
                        .find(|(kind, _)| *kind == Model::Message(channel, SlowPolicy::Conflate))
                    {
                        Some(pending) => pending.1 = frame,
                        None => {
                            model.push_back((Model::Message(channel, SlowPolicy::Conflate), frame))
                        }
                    }
                }
                4..=6 => {
                    let channel = 10 + next() % 3;
                    outbox.push_message(&frame, channel, &policy(SlowPolicy::DropOldest));
                    let kind = Model::Message(channel, SlowPolicy::DropOldest);
                    let mut yielded = false;
                    while model.len() >= 12 {
                        match model.iter().position(|(k, _)| {
                            matches!(k, Model::Message(_, SlowPolicy::DropOldest))
                        }) {
                            Some(index) => {
                                model.remove(index);
                            }
                            None => {
                                yielded = true;
                                break;
                            }
                        }
                    }
                    if !yielded {
                        model.push_back((kind, frame));
                    }
                }
                7 => {
                    // A reply into a full queue would close the connection;
                    // the model keeps to what both agree on.
                    if model.len() < 12 {
                        outbox.push_reply(frame.clone());
                        model.push_back((Model::Reply, frame));
                    }
                }
                _ => {
                    let mut frames = Vec::new();
                    let budget = (next() % 4) as usize * 6;
                    outbox.drain(&mut frames, budget, Instant::now());
                    delivered.extend(frames.iter().cloned());
                    for _ in 0..frames.len() {
                        expected.push(model.pop_front().unwrap().1);
                    }
                }
            }
        }
        let (rest, _) = drain_all(&outbox);
        delivered.extend(rest);
        expected.extend(model.into_iter().map(|(_, frame)| frame));
        assert_eq!(delivered, expected);
        assert!(outbox.lock().conflated.is_empty());
        assert_eq!(outbox.lock().drop_oldest_queued, 0);
    }
}
