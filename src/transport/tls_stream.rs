//! The server side of a TLS connection over rustls's unbuffered API, so that
//! an idle `wss://` connection holds no TLS buffers.
//!
//! tokio-rustls drives rustls's buffered `ServerConnection`, which sizes its
//! receive buffer to 4 KiB before every read and never below, so every
//! connection keeps 4 KiB for life (BENCHMARKS.md, figure 9). Here herald owns
//! the buffers and rustls works on them in place
//! (`UnbufferedServerConnection::process_tls_records`):
//!
//! - The receive buffer holds ciphertext, decrypted in place. It is allocated
//!   when the socket is readable, grows as far as the record at its front
//!   needs (a record is at most [`MAX_RECORD`] bytes; a handshake message being
//!   joined from several records is bounded by rustls at 64 KiB, and the
//!   buffer by [`MAX_INCOMING`]), and is freed as soon as rustls has consumed
//!   all of it.
//! - Plaintext that does not fit the caller's buffer waits in a second buffer,
//!   freed once read. Every complete record is decrypted before a read returns,
//!   so it holds at most what one socket read brought: one record, or
//!   [`READ_SIZE`] bytes of small ones.
//! - The send buffer holds the records of one write (at most
//!   [`MAX_PLAINTEXT_PER_WRITE`] bytes of plaintext, gathered from all the
//!   caller's slices into one record), and rustls's own messages. A write
//!   returns once its plaintext is encrypted; what the socket did not take goes
//!   first in the next write, or in `flush`, which the writer calls after every
//!   batch. The buffer is freed once written.
//!
//! So between messages a connection holds its socket, rustls's connection
//! state (keys and the key schedule) and a few words of bookkeeping.
//!
//! The stream is shared by the session's reader and writer through
//! [`tokio::io::split`]. Only the writer waits for the socket to be writable:
//! what rustls answers while reading (an alert, the refusal of a TLS 1.2
//! renegotiation) is written without waiting, and what the socket does not take
//! then goes out with the next write, so the reader never takes over the
//! writer's wake-up. A TLS 1.3 KeyUpdate that asks for ours is answered by
//! rustls in front of the next record it encrypts, as RFC 8446 requires.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::pki_types::CertificateDer;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The longest TLS record on the wire: a 5-byte header and at most 16 KiB +
/// 2 KiB of payload. rustls refuses a longer one from its header.
pub const MAX_RECORD: usize = 5 + 16_384 + 2_048;

/// rustls's bound on one handshake message (a client's certificate chain,
/// say), which may arrive over several records.
const MAX_HANDSHAKE_MESSAGE: usize = 0xffff;

/// The most ciphertext buffered: a handshake message being joined, and the
/// record after it.
pub const MAX_INCOMING: usize = MAX_HANDSHAKE_MESSAGE + MAX_RECORD;

/// Bytes reserved for a read when the record at the front asks for no more.
pub const READ_SIZE: usize = 4096;

/// The most plaintext one write encrypts: one full record.
pub const MAX_PLAINTEXT_PER_WRITE: usize = 16_384;

/// Room reserved per record for its header, nonce, tag and content type, and
/// for a KeyUpdate rustls may put in front. A write that needs more is
/// encrypted again into the size rustls asks for.
const RECORD_OVERHEAD: usize = 64;

/// A TLS connection whose handshake is complete, read and written as a byte
/// stream. Made by [`TlsStream::accept`].
pub struct TlsStream {
    tcp: TcpStream,
    /// rustls's state: the keys, the key schedule, what the peer said.
    conn: UnbufferedServerConnection,
    /// Ciphertext read from the socket that rustls has not discarded yet;
    /// unallocated while nothing is pending.
    incoming: Vec<u8>,
    /// Decrypted bytes the caller's buffer had no room for, from
    /// `plaintext_read` on; unallocated once read.
    plaintext: Vec<u8>,
    plaintext_read: usize,
    /// TLS records encoded and not yet written, from `outgoing_written` on;
    /// unallocated once written.
    outgoing: Vec<u8>,
    outgoing_written: usize,
    /// The peer sent close_notify: reads end cleanly (rustls reports this
    /// once, to whichever half asks first).
    peer_closed: bool,
    /// The socket reached end of file.
    tcp_eof: bool,
    /// `poll_shutdown` queued our close_notify.
    close_notify_sent: bool,
    /// rustls reported an error. It is not asked again: after a fatal alert
    /// it must not process more records.
    failed: bool,
}

/// The capacities of a stream's buffers, for tests that check what an idle
/// connection holds.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BufferCapacities {
    pub incoming: usize,
    pub plaintext: usize,
    pub outgoing: usize,
}

/// What to encrypt once rustls allows application data.
#[derive(Clone, Copy)]
enum Outbound<'a> {
    Nothing,
    /// The first `usize` bytes of the slices.
    Data(&'a [IoSlice<'a>], usize),
    CloseNotify,
}

/// What one run of rustls over the received ciphertext did.
#[derive(Default)]
struct Driven {
    /// Some plaintext arrived.
    plaintext: bool,
    /// The outbound data or close_notify was encrypted.
    encrypted: bool,
}

impl TlsStream {
    /// Completes the server side of a handshake on `tcp` with `config`.
    /// Errors are what tokio-rustls reports: `UnexpectedEof` when the client
    /// closes during the handshake, `InvalidData` around the [`rustls::Error`]
    /// when TLS fails, and the socket's own errors. Dropping the future closes
    /// the connection.
    pub async fn accept(tcp: TcpStream, config: Arc<ServerConfig>) -> io::Result<TlsStream> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut stream = TlsStream {
            tcp,
            conn,
            incoming: Vec::new(),
            plaintext: Vec::new(),
            plaintext_read: 0,
            outgoing: Vec::new(),
            outgoing_written: 0,
            peer_closed: false,
            tcp_eof: false,
            close_notify_sent: false,
            failed: false,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// The client's certificate chain, when it presented one (mutual TLS).
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// The protocol agreed through ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// The TLS version agreed.
    pub fn protocol_version(&self) -> Option<rustls::ProtocolVersion> {
        self.conn.protocol_version()
    }

    #[cfg(test)]
    pub(crate) fn buffer_capacities(&self) -> BufferCapacities {
        BufferCapacities {
            incoming: self.incoming.capacity(),
            plaintext: self.plaintext.capacity(),
            outgoing: self.outgoing.capacity(),
        }
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Err(error) = self.drive(None, Outbound::Nothing) {
                // rustls has queued an alert that tells the client why: one
                // try to send it.
                self.send_now();
                return Poll::Ready(Err(tls_error(error)));
            }
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.peer_closed || self.tcp_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            ready!(self.poll_receive(cx))?;
        }
    }

    /// Runs rustls over the ciphertext received so far until it needs more
    /// from the peer. Plaintext goes into `read` while it has room and into
    /// `self.plaintext` after that; the records rustls wants sent are appended
    /// to `self.outgoing`, and so is `outbound` once rustls allows it.
    fn drive(
        &mut self,
        mut read: Option<&mut ReadBuf<'_>>,
        outbound: Outbound<'_>,
    ) -> Result<Driven, rustls::Error> {
        if self.failed {
            return Err(rustls::Error::General("the TLS connection failed".into()));
        }
        let mut driven = Driven::default();
        loop {
            let UnbufferedStatus { mut discard, state } =
                self.conn.process_tls_records(&mut self.incoming);
            let stop = match state {
                Err(error) => {
                    self.fail();
                    return Err(error);
                }
                Ok(ConnectionState::ReadTraffic(mut traffic)) => {
                    while let Some(record) = traffic.next_record() {
                        // rustls decrypts while processing; this never fails.
                        let Ok(record) = record else {
                            break;
                        };
                        discard += record.discard;
                        driven.plaintext |= !record.payload.is_empty();
                        deliver(
                            record.payload,
                            &mut read,
                            &mut self.plaintext,
                            self.plaintext_read,
                        );
                    }
                    false
                }
                Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                    if let Err(error) = encode_into(&mut encode, &mut self.outgoing) {
                        self.failed = true;
                        return Err(error);
                    }
                    false
                }
                // The records are in `outgoing`, which is written in order.
                Ok(ConnectionState::TransmitTlsData(transmit)) => {
                    transmit.done();
                    false
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.peer_closed = true;
                    false
                }
                Ok(ConnectionState::Closed) => {
                    self.peer_closed = true;
                    true
                }
                Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                    let encrypted = match outbound {
                        Outbound::Nothing => Ok(false),
                        Outbound::Data(bufs, total) => {
                            encrypt_into(&mut traffic, bufs, total, &mut self.outgoing)
                        }
                        Outbound::CloseNotify => {
                            close_notify_into(&mut traffic, &mut self.outgoing)
                        }
                    };
                    match encrypted {
                        Ok(encrypted) => driven.encrypted = encrypted,
                        Err(error) => {
                            self.failed = true;
                            return Err(error);
                        }
                    }
                    true
                }
                Ok(ConnectionState::BlockedHandshake) => true,
                // Early data is off (`max_early_data_size` is 0), so rustls
                // reports nothing else.
                Ok(_) => {
                    self.failed = true;
                    return Err(rustls::Error::General(
                        "unexpected unbuffered TLS state".into(),
                    ));
                }
            };
            self.discard_incoming(discard);
            if stop {
                return Ok(driven);
            }
        }
    }

    /// Marks the connection failed, and moves the alert rustls queued for
    /// the peer, if any, into `outgoing`. rustls hands out queued records
    /// before it reads received ones, and a connection whose state failed
    /// processes no more; the one call is all the failed state gets, since
    /// rustls must not be made to send a second fatal alert.
    fn fail(&mut self) {
        self.failed = true;
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut self.incoming);
        if let Ok(ConnectionState::EncodeTlsData(mut encode)) = state {
            let _ = encode_into(&mut encode, &mut self.outgoing);
        }
        self.incoming = Vec::new();
    }

    /// Drops the ciphertext rustls is done with, and the buffer with it once
    /// nothing is left.
    fn discard_incoming(&mut self, discard: usize) {
        if discard > 0 {
            self.incoming.drain(..discard);
        }
        if self.incoming.is_empty() && self.incoming.capacity() > 0 {
            self.incoming = Vec::new();
        }
    }

    /// Copies pending plaintext into `buf`; true when there was some.
    fn take_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        let pending = &self.plaintext[self.plaintext_read..];
        if pending.is_empty() {
            return false;
        }
        let taken = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..taken]);
        self.plaintext_read += taken;
        if self.plaintext_read == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plaintext_read = 0;
        }
        true
    }

    /// Reads what the socket has into `incoming`: ready after some bytes or
    /// at end of file (`tcp_eof`). The buffer is reserved only once the
    /// socket is readable, and freed again if the readiness was stale.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            self.reserve_for_read()?;
            match self.tcp.try_read_buf(&mut self.incoming) {
                Ok(0) => {
                    self.tcp_eof = true;
                    return Poll::Ready(Ok(()));
                }
                Ok(_) => return Poll::Ready(Ok(())),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    self.discard_incoming(0);
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
    }

    /// Makes room for the next read: the rest of the record at the front, or
    /// at least [`READ_SIZE`] bytes when its header is not in yet or it is
    /// complete (a handshake message being joined from several records).
    fn reserve_for_read(&mut self) -> io::Result<()> {
        let used = self.incoming.len();
        let record_end = match self.incoming.get(..5) {
            Some(header) => 5 + usize::from(u16::from_be_bytes([header[3], header[4]])),
            None => 0,
        };
        let needed = if record_end > used {
            record_end
        } else {
            used + 1
        };
        if needed > MAX_INCOMING {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message buffer full",
            ));
        }
        if self.incoming.capacity() < needed {
            let target = needed.max(used + READ_SIZE).min(MAX_INCOMING);
            self.incoming.reserve_exact(target - used);
        }
        Ok(())
    }

    /// Writes `outgoing` until the socket has all of it, then frees it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.outgoing_written < self.outgoing.len() {
            let unsent = &self.outgoing[self.outgoing_written..];
            let written = ready!(Pin::new(&mut self.tcp).poll_write(cx, unsent))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.outgoing_written += written;
        }
        self.clear_outgoing();
        Poll::Ready(Ok(()))
    }

    /// Writes what the socket takes of `outgoing` without waiting, so that
    /// the reader never registers for writability. Errors show at the next
    /// write.
    fn send_now(&mut self) {
        while self.outgoing_written < self.outgoing.len() {
            match self.tcp.try_write(&self.outgoing[self.outgoing_written..]) {
                Ok(0) | Err(_) => return,
                Ok(written) => self.outgoing_written += written,
            }
        }
        self.clear_outgoing();
    }

    fn clear_outgoing(&mut self) {
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.outgoing_written = 0;
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.take_plaintext(buf) || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let driven = this.drive(Some(&mut *buf), Outbound::Nothing);
            this.send_now();
            match driven {
                Err(error) => return Poll::Ready(Err(tls_error(error))),
                Ok(driven) if driven.plaintext => return Poll::Ready(Ok(())),
                Ok(_) => {}
            }
            if this.peer_closed {
                // rustls reads nothing after close_notify.
                this.incoming = Vec::new();
                return Poll::Ready(Ok(()));
            }
            if this.tcp_eof {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            ready!(this.poll_receive(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    /// Encrypts up to [`MAX_PLAINTEXT_PER_WRITE`] bytes of all the slices
    /// together, into one record, once the previous write's records are all
    /// with the socket.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        let total = bufs
            .iter()
            .map(|buf| buf.len())
            .sum::<usize>()
            .min(MAX_PLAINTEXT_PER_WRITE);
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        if this.close_notify_sent {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "TLS stream written after shutdown",
            )));
        }
        match this.drive(None, Outbound::Data(bufs, total)) {
            Ok(driven) if driven.encrypted => {}
            Ok(_) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the TLS connection is closed",
                )));
            }
            Err(error) => {
                this.send_now();
                return Poll::Ready(Err(tls_error(error)));
            }
        }
        // The records start out now; what the socket does not take goes
        // first in the next write, or in `poll_flush`.
        if let Poll::Ready(Err(error)) = this.poll_send(cx) {
            return Poll::Ready(Err(error));
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    /// Sends close_notify, then shuts the socket's write side.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_notify_sent {
            this.close_notify_sent = true;
            // A connection that failed has queued its alert instead.
            let _ = this.drive(None, Outbound::CloseNotify);
        }
        ready!(this.poll_send(cx))?;
        match ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(error) if error.kind() == io::ErrorKind::NotConnected => Poll::Ready(Ok(())),
            other => Poll::Ready(other),
        }
    }
}

/// The error a TLS failure is reported as, as tokio-rustls does: callers find
/// the [`rustls::Error`] inside.
fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, error)
}

/// Puts a record's plaintext into `read` while it has room, and the rest
/// after what is already pending. Pending bytes come first, so nothing goes
/// to `read` while some wait.
fn deliver(
    payload: &[u8],
    read: &mut Option<&mut ReadBuf<'_>>,
    plaintext: &mut Vec<u8>,
    plaintext_read: usize,
) {
    let mut rest = payload;
    if plaintext.len() == plaintext_read {
        if let Some(read) = read {
            let taken = rest.len().min(read.remaining());
            read.put_slice(&rest[..taken]);
            rest = &rest[taken..];
        }
    }
    plaintext.extend_from_slice(rest);
}

/// Appends a record rustls wants sent (handshake messages, alerts).
fn encode_into(
    encode: &mut EncodeTlsData<'_, ServerConnectionData>,
    outgoing: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let start = outgoing.len();
    // An empty buffer tells the size without encoding anything.
    let required = match encode.encode(&mut []) {
        // An empty record: nothing to send.
        Ok(_) => return Ok(()),
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            required_size
        }
        Err(EncodeError::AlreadyEncoded) => return Ok(()),
    };
    outgoing.resize(start + required, 0);
    match encode.encode(&mut outgoing[start..]) {
        Ok(written) => {
            outgoing.truncate(start + written);
            Ok(())
        }
        Err(error) => {
            outgoing.truncate(start);
            Err(rustls::Error::General(error.to_string()))
        }
    }
}

/// Appends the records of the first `total` bytes of `bufs`, one record for
/// all the slices, copied together first when they are several.
fn encrypt_into(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    bufs: &[IoSlice<'_>],
    total: usize,
    outgoing: &mut Vec<u8>,
) -> Result<bool, rustls::Error> {
    let records = total.div_ceil(MAX_PLAINTEXT_PER_WRITE);
    let room = total + records * RECORD_OVERHEAD;
    let single = bufs
        .iter()
        .find(|buf| !buf.is_empty())
        .filter(|first| first.len() >= total);
    match single {
        Some(first) => seal_into(outgoing, room, 0, |sealed, _| {
            traffic.encrypt(&first[..total], sealed)
        }),
        None => seal_into(outgoing, room, total, |sealed, staged| {
            gather(bufs, staged);
            traffic.encrypt(staged, sealed)
        }),
    }
}

/// Appends the close_notify alert.
fn close_notify_into(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    outgoing: &mut Vec<u8>,
) -> Result<bool, rustls::Error> {
    seal_into(outgoing, RECORD_OVERHEAD, 0, |sealed, _| {
        traffic.queue_close_notify(sealed)
    })
}

/// Appends what `seal` writes into `room` bytes at the end of `outgoing`,
/// growing the room for as long as rustls asks for more. `seal` is also
/// given `staging` bytes after the room, for plaintext it gathers itself.
fn seal_into(
    outgoing: &mut Vec<u8>,
    mut room: usize,
    staging: usize,
    mut seal: impl FnMut(&mut [u8], &mut [u8]) -> Result<usize, EncryptError>,
) -> Result<bool, rustls::Error> {
    let start = outgoing.len();
    loop {
        outgoing.resize(start + room + staging, 0);
        let (sealed, staged) = outgoing[start..].split_at_mut(room);
        match seal(sealed, staged) {
            Ok(written) => {
                outgoing.truncate(start + written);
                return Ok(true);
            }
            Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(EncryptError::EncryptExhausted) => {
                outgoing.truncate(start);
                return Err(rustls::Error::EncryptError);
            }
        }
    }
}

/// Copies the slices, in order, until `into` is full.
fn gather(bufs: &[IoSlice<'_>], into: &mut [u8]) {
    let mut filled = 0;
    for buf in bufs {
        if filled == into.len() {
            break;
        }
        let taken = buf.len().min(into.len() - filled);
        into[filled..filled + taken].copy_from_slice(&buf[..taken]);
        filled += taken;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio_rustls::client::TlsStream as ClientStream;

    use super::*;

    type Client = ClientStream<TcpStream>;

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// A server and a client configuration for `localhost`, with `version`
    /// the only one the client offers.
    fn configs(
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let certificate = generated.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            generated.signing_key.serialize_der(),
        ));
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![certificate.clone()], key)
            .unwrap();
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        server.send_tls13_tickets = 0;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certificate).unwrap();
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        // To read the client's record sequence numbers after a KeyUpdate.
        client.enable_secret_extraction = true;
        (Arc::new(server), Arc::new(client))
    }

    /// A handshake over a loopback socket pair.
    async fn connected(version: &'static rustls::SupportedProtocolVersion) -> (TlsStream, Client) {
        let (server_config, client_config) = configs(version);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let client = async {
            let tcp = TcpStream::connect(address).await.unwrap();
            tokio_rustls::TlsConnector::from(client_config)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        };
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsStream::accept(tcp, server_config).await.unwrap()
        };
        let (server, client) = tokio::join!(server, client);
        assert_eq!(server.protocol_version(), Some(version.version));
        assert_eq!(server.alpn_protocol(), Some(&b"http/1.1"[..]));
        (server, client)
    }

    fn pattern(length: usize, seed: u8) -> Vec<u8> {
        (0..length)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Reads exactly `length` bytes through a buffer of `chunk` bytes, the
    /// way a frame reader with a small buffer does.
    async fn read_in_chunks(stream: &mut TlsStream, length: usize, chunk: usize) -> Vec<u8> {
        let mut received = Vec::new();
        let mut buffer = vec![0u8; chunk];
        while received.len() < length {
            let read = stream.read(&mut buffer).await.unwrap();
            assert!(read > 0, "end of stream after {} bytes", received.len());
            received.extend_from_slice(&buffer[..read]);
            // What did not fit waits, bounded by one record.
            assert!(stream.buffer_capacities().plaintext <= MAX_PLAINTEXT_PER_WRITE.max(READ_SIZE));
        }
        received
    }

    /// Asserts that a read now waits, and that the stream then holds no buffer.
    async fn assert_idle(server: &mut TlsStream) {
        let mut byte = [0u8; 1];
        let waited = tokio::time::timeout(Duration::from_millis(50), server.read(&mut byte)).await;
        assert!(waited.is_err(), "the read did not wait");
        assert_eq!(
            server.buffer_capacities(),
            BufferCapacities {
                incoming: 0,
                plaintext: 0,
                outgoing: 0,
            }
        );
    }

    #[tokio::test]
    async fn records_larger_than_the_callers_buffer_round_trip_both_ways() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut server, mut client) = connected(version).await;
            // Three records each way, read through buffers far smaller.
            let upload = pattern(40_000, 1);
            client.write_all(&upload).await.unwrap();
            client.flush().await.unwrap();
            assert_eq!(read_in_chunks(&mut server, upload.len(), 100).await, upload);
            assert_idle(&mut server).await;

            let download = pattern(50_000, 2);
            server.write_all(&download).await.unwrap();
            server.flush().await.unwrap();
            let mut received = vec![0u8; download.len()];
            client.read_exact(&mut received).await.unwrap();
            assert_eq!(received, download);
            assert_idle(&mut server).await;
        }
    }

    #[tokio::test]
    async fn many_small_writes_arrive_in_order_and_slices_share_a_record() {
        let (mut server, mut client) = connected(&rustls::version::TLS13).await;
        let mut expected = Vec::new();
        for i in 0..2_000u32 {
            let message = format!("message {i};");
            server.write_all(message.as_bytes()).await.unwrap();
            expected.extend_from_slice(message.as_bytes());
        }
        server.flush().await.unwrap();
        let mut received = vec![0u8; expected.len()];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(received, expected);

        // 64 slices are taken by one write, so they go out as one record.
        let slices: Vec<Vec<u8>> = (0..64).map(|i| pattern(10, i)).collect();
        let io_slices: Vec<IoSlice<'_>> = slices.iter().map(|s| IoSlice::new(s)).collect();
        let written = server.write_vectored(&io_slices).await.unwrap();
        assert_eq!(written, 640);
        server.flush().await.unwrap();
        let mut received = vec![0u8; 640];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(received, slices.concat());
        assert_idle(&mut server).await;
    }

    #[tokio::test]
    async fn a_key_update_from_the_client_is_followed_and_answered() {
        let (mut server, mut client) = connected(&rustls::version::TLS13).await;
        server.write_all(b"before").await.unwrap();
        server.write_all(b"update").await.unwrap();
        server.flush().await.unwrap();
        let mut received = [0u8; 12];
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"beforeupdate");

        // The client asks for new keys and sends with its own new ones.
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"new keys").await.unwrap();
        client.flush().await.unwrap();
        let mut received = [0u8; 8];
        server.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"new keys");

        // The answer goes out in front of the next record.
        server.write_all(b"answered").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut received).await.unwrap();
        assert_eq!(&received, b"answered");
        assert_idle(&mut server).await;
        let (_, connection) = client.into_inner();
        let secrets = connection.dangerous_extract_secrets().unwrap();
        // The client's receive sequence restarted at the server's KeyUpdate:
        // one record since, where three came with the first keys.
        assert_eq!(secrets.rx.0, 1, "the server did not update its keys");
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_cleanly_both_ways() {
        let (mut server, mut client) = connected(&rustls::version::TLS13).await;
        client.write_all(b"last words").await.unwrap();
        client.shutdown().await.unwrap();
        let mut received = Vec::new();
        server.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"last words");
        // The write side is still open after the peer's close_notify.
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut received = Vec::new();
        // An error here would mean the socket closed without close_notify.
        client.read_to_end(&mut received).await.unwrap();
        assert_eq!(received, b"reply");
        assert!(server.write_all(b"late").await.is_err());
    }

    #[tokio::test]
    async fn a_connection_closed_without_close_notify_is_an_unexpected_eof() {
        let (mut server, client) = connected(&rustls::version::TLS13).await;
        let (tcp, _) = client.into_inner();
        drop(tcp);
        let mut byte = [0u8; 1];
        let error = server.read(&mut byte).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn handshake_failures_carry_what_classifies_them() {
        let (server_config, _) = configs(&rustls::version::TLS13);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();

        // Not TLS: a rustls error inside.
        let mut plain = TcpStream::connect(address).await.unwrap();
        plain.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let error = TlsStream::accept(tcp, server_config.clone())
            .await
            .err()
            .unwrap();
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            error
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .is_some()
        );

        // Closed during the handshake.
        let silent = TcpStream::connect(address).await.unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        drop(silent);
        let error = TlsStream::accept(tcp, server_config).await.err().unwrap();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }
}
