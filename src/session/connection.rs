//! One WebSocket session: a reader and a writer around a bounded [`Outbox`].
//!
//! Both run in the session's one task, polled side by side by a `select!`
//! that never drops either while the other runs: reading a frame is not
//! cancel-safe, so the reader is never resumed from scratch, and it only ever
//! pushes into the outbox. The writer owns the socket's write half, the ping
//! timer, the token expiry and the drain; it is the only place that writes,
//! except a push that delivers directly while it is parked, and every frame
//! pending when it wakes goes out in one vectored write, large payloads
//! straight from the hub's shared buffers ([`WriteBatch`]).
//!
//! Per-connection memory, idle and subscribed: the outbox (~250 bytes, its
//! queue freed when drained), the session's channel map, the task's future,
//! and no read or write buffer (see ARCHITECTURE.md). Over TLS the stream's
//! own buffers are empty too ([`TlsStream`]); what remains is rustls's
//! connection state.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::future::Either;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, debug_span};

use crate::Node;
use crate::auth::Principal;
use crate::hub::ConnectionId;
use crate::metrics::Metrics;
use crate::protocol::{self, CloseCode, Opcode};
use crate::rate::TokenBucket;
pub(crate) use crate::session::Mode;
use crate::session::Session;
use crate::session::inbound::{FrameReader, Inbound, ReadError};
use crate::session::outbox::{Closing, Drained, Outbox, QueueLimits};
use crate::session::write_batch::WriteBatch;
use crate::transport::admission::Admitted;
use crate::transport::tls_stream::TlsStream;

/// How long the node waits for the client's answer to its close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The most bytes of queued frames the writer puts in one write.
const MAX_BATCH_BYTES: usize = 64 * 1024;

/// The most slices handed to one vectored write (Linux's `IOV_MAX` is 1024).
const MAX_WRITE_SLICES: usize = 64;

/// What a session starts from: everything the handshake decided, boxed, so
/// that the session's future (which every connection holds for life) keeps
/// a pointer to it rather than a second copy of each part beside the parts
/// it moved on to use.
pub(crate) struct Opening {
    pub node: Node,
    /// From the node's connection counter.
    pub id: ConnectionId,
    pub upgrade: fastwebsockets::upgrade::UpgradeFut,
    pub principal: Principal,
    pub peer: SocketAddr,
    pub mode: Mode,
    /// The admission slots, held for as long as the connection lives.
    pub admitted: Admitted,
}

/// The connection's log span. A debug span: at the default `info` level
/// there is none, since an enabled span is kept in the log subscriber's
/// registry, with its fields formatted, for as long as the connection lives
/// (568 bytes per idle connection, measured with
/// `LOG_LEVEL=info loadtest/bench.sh memory`). Nothing in a session logs above
/// debug. The caller instruments the session with it only when it is
/// enabled: a disabled span still takes 40 bytes in the future.
pub(crate) fn span(opening: &Opening) -> Span {
    debug_span!(
        "conn",
        node = %opening.node.id,
        conn = opening.id,
        user = %opening.principal.user,
        peer = %opening.peer
    )
}

/// Runs a session on an upgraded connection until it closes. Not an
/// `async fn`, for the reason given at [`run`].
#[allow(clippy::manual_async_fn)] // deliberate: see above
pub(crate) fn serve(opening: Box<Opening>) -> impl Future<Output = ()> + Send {
    async move {
        let Opening {
            node,
            id,
            upgrade,
            principal,
            peer: _,
            mode,
            admitted,
        } = unbox(opening);
        let _admitted = admitted;
        let upgraded = match upgrade.await {
            Ok(ws) => ws.into_inner().into_inner(),
            Err(error) => {
                debug!(%error, "upgrade failed");
                return;
            }
        };
        // The session's future is made here and awaited after the `let`:
        // awaited inside the `match`, it would keep the matched `Split` for
        // life beside the parts moved out of it.
        let who = Who {
            node,
            id,
            principal,
            mode,
        };
        let session = match split(upgraded) {
            Some(Split::Tcp(early, reader, writer, socket)) => Either::Left(run(Box::new(Start {
                who,
                early,
                reader,
                writer,
                socket: Some(socket),
            }))),
            Some(Split::Tls(early, reader, writer)) => Either::Right(run(Box::new(Start {
                who,
                early,
                reader,
                writer,
                socket: None,
            }))),
            None => {
                debug!("upgraded on a transport the listener does not make");
                return;
            }
        };
        session.await
    }
}

/// Moves a value out of its box and frees the box there and then. After
/// `let value = *boxed;` the allocation is freed only when `boxed` goes out
/// of scope, which in a task's outermost future is the end of the
/// connection: the handshake's [`Opening`] (160 bytes) and [`Start`] (128)
/// were both kept for life that way (heaptrack, 10k idle connections).
#[allow(clippy::boxed_local)] // deliberate: freeing the box is the point
fn unbox<T>(boxed: Box<T>) -> T {
    *boxed
}

enum Split {
    /// The plain TCP case: the bytes that came behind the handshake, and the
    /// socket shared by the reader, the writer and the outbox (direct
    /// delivery), no lock between them.
    Tcp(BytesMut, SharedTcp, SharedTcp, Arc<TcpStream>),
    /// TLS: the stream holds rustls's state, which reading and writing both
    /// change, so the halves share it through a lock.
    Tls(
        BytesMut,
        tokio::io::ReadHalf<TlsStream>,
        tokio::io::WriteHalf<TlsStream>,
    ),
}

/// A TCP socket shared between the reader, the writer and direct delivery:
/// reads and writes go through readiness and non-blocking calls on
/// `&TcpStream`, so no half needs to own it. The outbox's protocol
/// ([`Outbox::park`]) ensures that the writer and a push never write at once.
pub(crate) struct SharedTcp(Arc<TcpStream>);

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            std::task::ready!(self.0.poll_read_ready(cx))?;
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(read) => {
                    buf.advance(read);
                    return std::task::Poll::Ready(Ok(()));
                }
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(error) => return std::task::Poll::Ready(Err(error)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            std::task::ready!(self.0.poll_write_ready(cx))?;
            match self.0.try_write_vectored(bufs) {
                Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => continue,
                result => return std::task::Poll::Ready(result),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let result = socket2::SockRef::from(&*self.0).shutdown(std::net::Shutdown::Write);
        std::task::Poll::Ready(match result {
            Err(error) if error.kind() == std::io::ErrorKind::NotConnected => Ok(()),
            other => other,
        })
    }
}

/// Takes the connection back from hyper: a plain socket or a TLS stream,
/// the two transports the listener makes.
fn split(upgraded: Upgraded) -> Option<Split> {
    // Bytes the client sent right behind its handshake are read first. They
    // are copied out: the slice would otherwise keep hyper's whole read
    // buffer alive for the life of the connection.
    let upgraded = match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => {
            let socket = Arc::new(parts.io.into_inner());
            let early = BytesMut::from(&parts.read_buf[..]);
            return Some(Split::Tcp(
                early,
                SharedTcp(socket.clone()),
                SharedTcp(socket.clone()),
                socket,
            ));
        }
        Err(upgraded) => upgraded,
    };
    let parts = upgraded.downcast::<TokioIo<TlsStream>>().ok()?;
    let early = BytesMut::from(&parts.read_buf[..]);
    let (read, write) = tokio::io::split(parts.io.into_inner());
    Some(Split::Tls(early, read, write))
}

/// Whose session it is, whatever the transport.
struct Who {
    node: Node,
    id: ConnectionId,
    principal: Principal,
    mode: Mode,
}

/// What a session's task runs on, boxed like [`Opening`] and unpacked at
/// once: a future keeps its arguments for life, so it keeps one pointer.
struct Start<R, W> {
    who: Who,
    /// What the client sent behind its handshake, read before `reader`.
    early: BytesMut,
    reader: R,
    writer: W,
    /// The plain TCP socket, for direct delivery.
    socket: Option<Arc<TcpStream>>,
}

/// Not an `async fn`: one of those moves its arguments into locals beside
/// the slots they arrived in, and the future, which the connection holds for
/// life, keeps both; this block uses them where they were captured.
#[allow(clippy::manual_async_fn)] // deliberate: see above
fn run<R, W>(start: Box<Start<R, W>>) -> impl Future<Output = ()> + Send
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    async move {
        let Start {
            who:
                Who {
                    node,
                    id,
                    principal,
                    mode,
                },
            early,
            reader,
            writer,
            socket,
        } = unbox(start);
        let limits = &node.config.limits;
        let outbox = Arc::new(Outbox::new(
            QueueLimits {
                messages: limits.queue_messages,
                bytes: limits.queue_bytes,
            },
            principal.expires_at,
            node.metrics.clone(),
        ));
        // The principal moves into the session unborrowed, so that the future
        // keeps no second copy of it; the session sends the welcome.
        let mut session = Session::new(node.clone(), id, principal, mode, outbox.clone());
        session.welcome();
        if let Some(socket) = socket.filter(|_| node.config.server.direct_delivery) {
            outbox.attach_socket(socket);
        }
        let open = OpenConnection::new(&node.metrics);
        let _registered = Registered::new(&node, id, &outbox);

        // The writer runs beside the reader in this task, not in one of its own:
        // a task costs its header and a wake-up, and the `select!` below polls
        // both without ever dropping the reader mid-frame.
        let writer = write_loop(writer, outbox.clone(), node.writer.clone());
        tokio::pin!(writer);

        let requests = TokenBucket::new(
            limits.requests_per_second,
            limits.request_burst as f64,
            Instant::now(),
        );
        let mut frames = FrameReader::new(
            reader,
            limits.max_message_bytes,
            limits.frame_timeout,
            requests,
        )
        .with_received(early);

        let reason = {
            let reader = read_loop(&mut frames, &mut session);
            tokio::pin!(reader);
            tokio::select! {
                exit = &mut reader => {
                    let (code, reason) = match exit {
                        ReaderExit::ClientClosed => (CloseCode::Normal, "client_closed"),
                        ReaderExit::Lost => (CloseCode::Normal, "connection_lost"),
                        ReaderExit::Violation(code) => (code, code.reason()),
                    };
                    outbox.close(code);
                    // The timers are boxed: made once, at the close, they would
                    // otherwise be reserved in the future for its whole life.
                    let grace = limits.write_timeout + CLOSE_GRACE;
                    let _ = Box::pin(tokio::time::timeout(grace, &mut writer)).await;
                    reason
                }
                reason = &mut writer => {
                    // The node closed; let the client answer the close frame.
                    let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, &mut reader)).await;
                    reason
                }
            }
        };
        drop(session);
        // The hub may still hold the outbox for a moment; the socket must not
        // wait for it to close.
        outbox.detach_socket();
        debug!(reason, "closed");
        open.close(reason);
    }
}

/// Lists the session in the node's registry (for the paced drain) for as long
/// as it lives.
struct Registered {
    node: Node,
    id: ConnectionId,
}

impl Registered {
    fn new(node: &Node, id: ConnectionId, outbox: &Arc<Outbox>) -> Registered {
        let mut sessions = node.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.insert(id, outbox.clone());
        // A session that arrives once the drain has begun closes at once.
        if node.shutdown.is_cancelled() {
            outbox.close(CloseCode::GoingAway);
        }
        Registered {
            node: node.clone(),
            id,
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut sessions = self.node.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.remove(&self.id);
    }
}

/// Counts a connection open until it is closed with a reason, or dropped (a
/// panic), which counts as `internal_error`.
struct OpenConnection {
    metrics: Option<Metrics>,
}

impl OpenConnection {
    fn new(metrics: &Metrics) -> OpenConnection {
        metrics.connection_opened();
        OpenConnection {
            metrics: Some(metrics.clone()),
        }
    }

    fn close(mut self, reason: &str) {
        if let Some(metrics) = self.metrics.take() {
            metrics.connection_closed(reason);
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        if let Some(metrics) = self.metrics.take() {
            metrics.connection_closed("internal_error");
        }
    }
}

/// Why the reader stopped.
enum ReaderExit {
    /// The client sent a close frame (already echoed through the outbox).
    ClientClosed,
    /// The socket ended or failed without a close frame.
    Lost,
    /// The client broke a rule; close with this code.
    Violation(CloseCode),
}

/// Not an `async fn`, for the reason given at [`run`].
#[allow(clippy::manual_async_fn)] // deliberate: see above
fn read_loop<'a, R>(
    frames: &'a mut FrameReader<R>,
    session: &'a mut Session,
) -> impl Future<Output = ReaderExit> + 'a
where
    R: AsyncRead + Unpin,
{
    async move {
        let outbox = session.outbox.clone();
        let mut activity = || outbox.touch();
        loop {
            let inbound = match frames.next(&mut activity).await {
                Ok(inbound) => inbound,
                Err(ReadError::Lost) => return ReaderExit::Lost,
                Err(ReadError::Violation(code)) => return ReaderExit::Violation(code),
            };
            match inbound {
                // Boxed: a request's state (its parsed form, a reply being
                // built) takes memory only while it is handled.
                Inbound::Text(text) => Box::pin(session.on_text(text)).await,
                Inbound::Binary(bytes) => session.on_binary(bytes),
                Inbound::Ping(payload) => session.outbox.pong(Bytes::from(payload)),
                Inbound::Pong => {}
                Inbound::Close(payload) => {
                    session.outbox.echo_close(Bytes::from(payload));
                    return ReaderExit::ClientClosed;
                }
            }
        }
    }
}

/// What every writer of a node reads and none changes: shared, so that a
/// connection's future keeps one pointer instead of a copy of each.
pub(crate) struct WriterSettings {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    pub write_timeout: Duration,
    /// The node's shutdown: once cancelled, a writer closes with 1001 after
    /// what it holds. A writer checks it on each pass and does not wait on
    /// it: whoever cancels it closes the registered outboxes too
    /// ([`crate::shutdown::drain`]).
    pub shutdown: CancellationToken,
    pub metrics: Metrics,
}

/// The writer's state between passes, apart from its timer, its batch and
/// the socket.
struct WriterState {
    shutting_down: bool,
    next_ping: Instant,
    /// When the outstanding ping was sent, and when its answer is due.
    awaiting_pong: Option<(Instant, Instant)>,
    /// The frames a drain hands over, reused while busy.
    frames: Vec<Bytes>,
}

/// What one pass of the writer found to do, once its batch is filled.
struct Pass {
    /// Messages in the batch, counted once it is written.
    messages: u64,
    /// Set when the batch ends with a close frame: the close reason.
    reason: Option<&'static str>,
    /// More is queued: go round at once.
    more: bool,
    /// When the writer must wake if nothing is pushed.
    deadline: Instant,
}

impl WriterState {
    /// Checks the deadlines, drains the outbox and fills `batch`: everything
    /// the writer does between its waits, in a plain fn, so that none of its
    /// temporaries takes room in the future the connection holds for life.
    fn pass(
        &mut self,
        outbox: &Outbox,
        settings: &WriterSettings,
        batch: &mut WriteBatch,
        now: Instant,
    ) -> Pass {
        // Checked on every pass, not only in the writer's `select!`: a writer
        // with a standing backlog goes round without waiting, and must still
        // start its close (after flushing what is queued) when the node drains.
        if !self.shutting_down && settings.shutdown.is_cancelled() {
            self.shutting_down = true;
            outbox.close(CloseCode::GoingAway);
        }
        let ping = now >= self.next_ping;
        if ping {
            if self.awaiting_pong.is_none() {
                self.awaiting_pong = Some((now, now + settings.ping_timeout));
            }
            self.next_ping = now + settings.ping_interval;
        }
        if let Some((sent, due)) = self.awaiting_pong {
            if outbox.last_activity() >= sent {
                self.awaiting_pong = None;
            } else if now >= due {
                outbox.close(CloseCode::PingTimeout);
            }
        }
        let expiry = unix_to_instant(outbox.expires_at(), now);
        if now >= expiry {
            outbox.close(CloseCode::TokenExpired);
        }
        let Drained {
            partial,
            binary,
            pongs,
            closing,
            messages,
            more,
            next_release,
        } = outbox.drain(&mut self.frames, MAX_BATCH_BYTES, now);
        // The rest of a frame a push began writing goes first: nothing may
        // come between its bytes, a control frame no more than another.
        if let Some(partial) = partial {
            batch.push_raw(partial);
        }
        if ping {
            batch.push_copied(Opcode::Ping, b"");
        }
        for payload in pongs {
            batch.push_copied(Opcode::Pong, &payload);
        }
        let opcode = if binary { Opcode::Binary } else { Opcode::Text };
        for frame in self.frames.drain(..) {
            batch.push(opcode, frame);
        }
        let reason = closing.map(|closing| match closing {
            Closing::Code(code) => {
                batch.push_copied(Opcode::Close, &protocol::close_payload(code));
                code.reason()
            }
            Closing::Echo(payload) => {
                batch.push_copied(Opcode::Close, &payload);
                "client_closed"
            }
        });
        let mut deadline = self.next_ping.min(expiry);
        if let Some((_, due)) = self.awaiting_pong {
            deadline = deadline.min(due);
        }
        if let Some(due) = next_release {
            deadline = deadline.min(due);
        }
        Pass {
            messages,
            reason,
            more,
            deadline,
        }
    }
}

/// Writes everything the connection sends. Returns the close reason.
///
/// Not an `async fn`, for the reason given at [`run`]. One timer serves every
/// deadline the writer has (ping, pong, token expiry, a held message, a write
/// that makes no progress, the close), so the future reserves one; what a
/// pass computes lives in [`WriterState::pass`] or in a block that ends
/// before the writer waits, so the future reserves no room for it either.
#[allow(clippy::manual_async_fn)] // deliberate: see above
fn write_loop<W>(
    mut io: W,
    outbox: Arc<Outbox>,
    settings: Arc<WriterSettings>,
) -> impl Future<Output = &'static str>
where
    W: AsyncWrite + Unpin,
{
    async move {
        let mut state = WriterState {
            shutting_down: false,
            next_ping: Instant::now() + settings.ping_interval,
            awaiting_pong: None,
            frames: Vec::new(),
        };
        let mut batch = WriteBatch::default();
        let timer = tokio::time::sleep_until(state.next_ping);
        tokio::pin!(timer);
        let mut timer_fired = false;

        loop {
            let deadline = {
                let pass = state.pass(&outbox, &settings, &mut batch, Instant::now());
                if !batch.is_done() {
                    let written = write_with_progress(
                        &mut io,
                        &mut batch,
                        timer.as_mut(),
                        settings.write_timeout,
                    );
                    match written.await {
                        Ok(()) => settings.metrics.frames_delivered(pass.messages),
                        Err(WriteFailure::Lost) => return "connection_lost",
                        // The socket is stuck, so no close frame can be sent either.
                        Err(WriteFailure::Stalled) => return CloseCode::SlowConsumer.reason(),
                    }
                }
                if let Some(reason) = pass.reason {
                    let shutdown = std::future::poll_fn(|cx| Pin::new(&mut io).poll_shutdown(cx));
                    let _ = within(timer.as_mut(), CLOSE_GRACE, shutdown).await;
                    return reason;
                }
                if pass.more {
                    // Busy: the buffers are reused for the next batch at once.
                    batch.clear();
                    continue;
                }
                pass.deadline
            };
            // About to wait: an idle connection holds no write buffer.
            batch.release();
            state.frames = Vec::new();
            // Re-arming the timer costs a timer-wheel update, so it is done only
            // when the deadline moved or the timer has fired.
            if timer_fired || timer.deadline() != deadline {
                timer.as_mut().reset(deadline);
            }
            timer_fired = false;
            // From here until the next drain, pushes may write on the spot.
            outbox.park();
            // No wait on the node's shutdown token here (80 bytes per
            // writer): the drain closes every registered outbox once it
            // cancels the token, which wakes a waiting writer, and a busy one
            // sees the token on its next pass.
            tokio::select! {
                biased;
                _ = outbox.changed() => {}
                _ = &mut timer => timer_fired = true,
            }
        }
    }
}

enum WriteFailure {
    Lost,
    Stalled,
}

/// Writes all of `batch`, failing when a single write makes no progress for
/// `timeout` (`limits.write_timeout`), however long the whole takes. Large
/// payloads go to the kernel from the hub's shared buffers, in one vectored
/// write with the headers; a transport that does not write vectored (the
/// trait's fallback writes only the first slice, so TLS would send a tiny
/// record per header) gets the batch copied into one buffer first. The
/// transport is flushed at the end: a TLS stream takes a write once it is
/// encrypted, and what the socket has not taken yet goes out in the flush.
async fn write_with_progress<W>(
    io: &mut W,
    batch: &mut WriteBatch,
    mut timer: Pin<&mut Sleep>,
    timeout: Duration,
) -> Result<(), WriteFailure>
where
    W: AsyncWrite + Unpin,
{
    if !io.is_write_vectored() {
        batch.make_contiguous();
    }
    while !batch.is_done() {
        let write = std::future::poll_fn(|cx| {
            let mut slices = [IoSlice::new(&[]); MAX_WRITE_SLICES];
            let used = batch.io_slices(&mut slices);
            Pin::new(&mut *io).poll_write_vectored(cx, &slices[..used])
        });
        match within(timer.as_mut(), timeout, write).await {
            Some(Ok(0)) | Some(Err(_)) => return Err(WriteFailure::Lost),
            Some(Ok(written)) => batch.advance(written),
            None => return Err(WriteFailure::Stalled),
        }
    }
    let flush = std::future::poll_fn(|cx| Pin::new(&mut *io).poll_flush(cx));
    match within(timer, timeout, flush).await {
        Some(Ok(())) => Ok(()),
        Some(Err(_)) => Err(WriteFailure::Lost),
        None => Err(WriteFailure::Stalled),
    }
}

/// `future`, or `None` once it has waited `timeout`: `tokio::time::timeout`
/// on the writer's own timer, which is armed only when `future` first waits
/// (as `Timeout` arms its own), so a write the socket takes at once touches
/// no timer. The caller re-arms the timer for its next deadline.
fn within<F>(
    mut timer: Pin<&mut Sleep>,
    timeout: Duration,
    mut future: F,
) -> impl Future<Output = Option<F::Output>>
where
    F: Future + Unpin,
{
    let mut armed = false;
    std::future::poll_fn(move |cx| {
        if let Poll::Ready(output) = Pin::new(&mut future).poll(cx) {
            return Poll::Ready(Some(output));
        }
        if !armed {
            timer.as_mut().reset(Instant::now() + timeout);
            armed = true;
        }
        timer.as_mut().poll(cx).map(|()| None)
    })
}

/// Converts a Unix time in seconds into a deadline on the tokio clock.
fn unix_to_instant(unix_secs: u64, now: Instant) -> Instant {
    let now_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let left = Duration::from_secs(unix_secs).saturating_sub(now_unix);
    // Far enough to never fire, near enough not to overflow.
    now.checked_add(left.min(Duration::from_secs(86_400 * 365)))
        .unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;
    use crate::config::SlowPolicy;
    use crate::session::outbox::DeliveryPolicy;

    fn test_settings(metrics: Metrics, shutdown: Option<CancellationToken>) -> Arc<WriterSettings> {
        Arc::new(WriterSettings {
            ping_interval: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(10),
            shutdown: shutdown.unwrap_or_default(),
            metrics,
        })
    }

    /// Reads one unmasked server frame: (opcode, payload).
    async fn read_server_frame(io: &mut (impl AsyncRead + Unpin)) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await.unwrap();
        let length = match head[1] & 0x7f {
            126 => u64::from(io.read_u16().await.unwrap()),
            127 => io.read_u64().await.unwrap(),
            short => u64::from(short),
        };
        let mut payload = vec![0u8; length as usize];
        io.read_exact(&mut payload).await.unwrap();
        (head[0] & 0x0f, payload)
    }

    /// A socket that takes at most `step` bytes per write and is not ready
    /// on every other call, vectored or not, keeping what it was given.
    struct Trickle {
        written: Vec<u8>,
        step: usize,
        vectored: bool,
        calls: usize,
    }

    impl Trickle {
        fn ready(&mut self, cx: &mut std::task::Context<'_>) -> bool {
            self.calls += 1;
            if self.calls % 2 == 0 {
                cx.waker().wake_by_ref();
                return false;
            }
            true
        }
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if !self.ready(cx) {
                return std::task::Poll::Pending;
            }
            let take = buf.len().min(self.step);
            self.written.extend_from_slice(&buf[..take]);
            std::task::Poll::Ready(Ok(take))
        }

        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if !self.vectored {
                // The trait's fallback: the first non-empty slice only.
                let first = bufs.iter().find(|buf| !buf.is_empty());
                return self.poll_write(cx, first.map_or(&[][..], |buf| &buf[..]));
            }
            if !self.ready(cx) {
                return std::task::Poll::Pending;
            }
            let mut taken = 0;
            for buf in bufs {
                let take = buf.len().min(self.step - taken);
                self.written.extend_from_slice(&buf[..take]);
                taken += take;
                if taken == self.step {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(taken))
        }

        fn is_write_vectored(&self) -> bool {
            self.vectored
        }

        fn poll_flush(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn partial_writes_produce_byte_exact_frames() {
        // Messages on both sides of the shared-payload threshold and of the
        // header's length forms, one larger than a batch, a pong first and
        // the close last.
        let sizes = [
            0, 5, 125, 126, 511, 512, 600, 4096, 65_535, 65_536, 70_000, 3,
        ];
        let messages: Vec<Bytes> = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| Bytes::from(vec![b'a' + i as u8; size]))
            .collect();
        let mut expected = Vec::new();
        protocol::write_frame(&mut expected, Opcode::Pong, b"are you there");
        for message in &messages {
            protocol::write_frame(&mut expected, Opcode::Text, message);
        }
        protocol::write_frame(
            &mut expected,
            Opcode::Close,
            &protocol::close_payload(CloseCode::GoingAway),
        );
        for vectored in [true, false] {
            for step in [1, 2, 7, 100, 1500, usize::MAX] {
                let metrics = Metrics::new("test");
                let outbox = Arc::new(Outbox::new(
                    QueueLimits {
                        messages: 100,
                        bytes: 1 << 20,
                    },
                    u64::MAX,
                    metrics.clone(),
                ));
                outbox.pong(Bytes::from_static(b"are you there"));
                for message in &messages {
                    outbox.push_message(message, 1, &DeliveryPolicy::default());
                }
                outbox.close(CloseCode::GoingAway);
                let mut socket = Trickle {
                    written: Vec::new(),
                    step,
                    vectored,
                    calls: 0,
                };
                let reason = write_loop(&mut socket, outbox, test_settings(metrics, None)).await;
                assert_eq!(reason, "shutdown");
                assert!(
                    socket.written == expected,
                    "vectored {vectored}, step {step}: {} bytes written, {} expected",
                    socket.written.len(),
                    expected.len()
                );
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_writer_still_sees_shutdown() {
        let metrics = Metrics::new("test");
        let outbox = Arc::new(Outbox::new(
            QueueLimits {
                messages: 1000,
                bytes: 1 << 20,
            },
            u64::MAX,
            metrics.clone(),
        ));
        let (mut client, server) = tokio::io::duplex(16 * 1024);
        let shutdown = CancellationToken::new();
        let writer = tokio::spawn(write_loop(
            server,
            outbox.clone(),
            test_settings(metrics, Some(shutdown.clone())),
        ));
        // The queue stays full: more than one batch is always waiting. The
        // feeder is a thread of its own, so it never lets the queue run dry.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let feeder = {
            let outbox = outbox.clone();
            let stop = stop.clone();
            let frame = Bytes::from(vec![b'x'; 1024]);
            let policy = DeliveryPolicy {
                slow: SlowPolicy::DropOldest,
                min_interval: None,
            };
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    outbox.push_message(&frame, 1, &policy);
                }
            })
        };
        for _ in 0..200 {
            assert_eq!(read_server_frame(&mut client).await.0, 0x1);
        }
        shutdown.cancel();
        // The client reads at about 4 MB/s, so the writer always has a
        // backlog of up to 1 MB to work through.
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            for frame in 0u64.. {
                let (opcode, payload) = read_server_frame(&mut client).await;
                if opcode == 0x8 {
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                if frame % 4 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            unreachable!()
        })
        .await
        .expect("a close frame while the backlog stands");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        feeder.join().unwrap();
        assert_eq!(closed, 1001);
        let reason = tokio::time::timeout(Duration::from_secs(5), writer)
            .await
            .expect("the writer ends")
            .unwrap();
        assert_eq!(reason, "shutdown");
    }
}
