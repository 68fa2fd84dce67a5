//! Reading client frames (RFC 6455 section 5) with as little memory as an idle
//! connection allows.
//!
//! fastwebsockets does the upgrade handshake; this reader replaces its read
//! half, which keeps an 8 KiB buffer per connection for life (measured: it was
//! the largest part of an idle connection's cost). Here nothing is allocated
//! while the reader waits: the first bytes of a frame are read on the stack
//! and copied into a buffer of their size, which grows as the rest arrives
//! (at most [`READ_CHUNK`] ahead of it) and is freed once the frame is
//! consumed.
//!
//! The reader also enforces what fastwebsockets does not: client frames must be
//! masked (else 1002), and a fragmented message is capped in total, not only per
//! frame (else 1009). A declared length above the cap is refused from the
//! header, before anything is allocated for it. A fragmented text message is
//! checked for UTF-8 fragment by fragment, and refused (1007) at the first
//! fragment that cannot continue valid UTF-8.

use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::protocol::CloseCode;
use crate::rate::TokenBucket;
use tokio::time::Instant;

/// Bytes reserved for reading when nothing larger is needed.
pub const INITIAL_BUFFER: usize = 256;

/// The most the buffer grows by ahead of arriving bytes. A frame's declared
/// length is not reserved up front: a client trickling a large frame pins
/// only what it has actually sent, for at most `limits.frame_timeout`.
const READ_CHUNK: usize = 4096;

/// A complete client message or control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A text message, checked to be UTF-8.
    Text(Vec<u8>),
    Binary(Vec<u8>),
    /// A ping, with the payload the pong must echo.
    Ping(Vec<u8>),
    Pong,
    /// A close frame, with its raw payload (code and reason), already checked.
    Close(Vec<u8>),
}

/// Why reading stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadError {
    /// The socket closed or failed without a close frame.
    Lost,
    /// The client broke a rule; close with this code.
    Violation(CloseCode),
}

const CONTINUATION: u8 = 0x0;
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const PING: u8 = 0x9;
const PONG: u8 = 0xA;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    /// Header length in bytes.
    header_len: usize,
    payload_len: u64,
}

/// Parses a client frame header from the start of `bytes`. `Ok(None)` means
/// more bytes are needed. Pure.
fn parse_header(bytes: &[u8]) -> Result<Option<Header>, ReadError> {
    let protocol_error = Err(ReadError::Violation(CloseCode::ProtocolError));
    if bytes.len() < 2 {
        return Ok(None);
    }
    let fin = bytes[0] & 0x80 != 0;
    if bytes[0] & 0x70 != 0 {
        // No extension is negotiated, so the RSV bits must be zero.
        return protocol_error;
    }
    let opcode = bytes[0] & 0x0f;
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return protocol_error;
    }
    if bytes[1] & 0x80 == 0 {
        // RFC 6455 5.1: a server must close on an unmasked client frame.
        return protocol_error;
    }
    let (length_bytes, short) = match bytes[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        short => (0, Some(u64::from(short))),
    };
    let header_len = 2 + length_bytes + 4;
    if bytes.len() < header_len {
        return Ok(None);
    }
    let payload_len = match short {
        Some(length) => length,
        None => bytes[2..2 + length_bytes]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    };
    if opcode >= CLOSE && (!fin || payload_len > 125) {
        return protocol_error;
    }
    let mut mask = [0u8; 4];
    mask.copy_from_slice(&bytes[2 + length_bytes..header_len]);
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        payload_len,
    }))
}

/// Checks a close frame's payload: empty, or a valid code and a UTF-8 reason.
fn valid_close(payload: &[u8]) -> bool {
    match payload.len() {
        0 => true,
        1 => false,
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            matches!(code, 1000..=1003 | 1007..=1011 | 3000..=4999)
        }
    }
}

/// Reads client frames from `io`, assembling fragmented messages.
pub struct FrameReader<R> {
    io: R,
    buffer: BytesMut,
    /// `limits.max_message_bytes`, inclusive, for a frame or a whole message.
    max_message: usize,
    /// A fragmented message being assembled.
    /// Boxed: rare, and every idle connection would keep room for it.
    fragments: Option<Box<Fragments>>,
    /// `limits.requests_per_second`: every data frame and ping takes a token,
    /// so a flood of empty fragments is as limited as a flood of requests.
    requests: TokenBucket,
    /// `limits.frame_timeout`: how long a started frame, or a started
    /// fragmented message, may take to arrive in full.
    frame_timeout: Duration,
    /// When the frame or message now arriving began; `None` while idle.
    partial_since: Option<Instant>,
}

/// Reads what has arrived into `buffer`, which is empty, without allocating
/// it first: the bytes land in a buffer on the stack of the one poll that
/// finds them, and `buffer` is allocated to their size. So an idle reader,
/// which spends its life waiting here, holds no read buffer.
fn read_unbuffered<R: AsyncRead + Unpin>(
    io: &mut R,
    buffer: &mut BytesMut,
) -> impl Future<Output = std::io::Result<usize>> {
    std::future::poll_fn(move |cx| {
        // Uninitialised: a transport that finds nothing to read (the common
        // case: the task woke to write) costs no memset.
        let mut stack = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut stack);
        ready!(Pin::new(&mut *io).poll_read(cx, &mut read))?;
        buffer.extend_from_slice(read.filled());
        Poll::Ready(Ok(read.filled().len()))
    })
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(
        io: R,
        max_message: usize,
        frame_timeout: Duration,
        requests: TokenBucket,
    ) -> FrameReader<R> {
        FrameReader {
            io,
            buffer: BytesMut::new(),
            max_message,
            fragments: None,
            requests,
            frame_timeout,
            partial_since: None,
        }
    }

    /// Starts with `bytes` already received (what came behind the upgrade
    /// handshake), read before anything from the transport.
    pub fn with_received(mut self, bytes: BytesMut) -> FrameReader<R> {
        self.buffer = bytes;
        self
    }

    /// Reads until at least `wanted` bytes are buffered, calling `activity`
    /// whenever bytes arrive (a slow upload is still a live client). While a
    /// frame or fragmented message is under way, it must be complete within
    /// `frame_timeout` of its first byte, else 4006.
    ///
    /// Not an `async fn`, like [`FrameReader::next`]: one of those keeps its
    /// arguments twice, and every idle connection waits in here.
    #[allow(clippy::manual_async_fn)] // deliberate: see above
    fn fill(
        &mut self,
        wanted: usize,
        activity: &mut impl FnMut(),
    ) -> impl Future<Output = Result<(), ReadError>> {
        async move {
            while self.buffer.len() < wanted {
                let read = if self.buffer.is_empty() && self.fragments.is_none() {
                    // Idle: waiting for a new frame has no deadline, and holds no
                    // buffer until bytes arrive.
                    self.partial_since = None;
                    read_unbuffered(&mut self.io, &mut self.buffer).await
                } else {
                    let missing = wanted - self.buffer.len();
                    let spare = self.buffer.capacity() - self.buffer.len();
                    if spare < missing.min(INITIAL_BUFFER) {
                        self.buffer
                            .reserve(missing.clamp(INITIAL_BUFFER, READ_CHUNK));
                    }
                    let since = *self.partial_since.get_or_insert_with(Instant::now);
                    // `read_buf` is cancel-safe: on timeout nothing was consumed.
                    // Boxed, so that the deadline's timer takes memory only while a
                    // frame is under way, not in every idle reader's future.
                    match Box::pin(tokio::time::timeout_at(
                        since + self.frame_timeout,
                        self.io.read_buf(&mut self.buffer),
                    ))
                    .await
                    {
                        Ok(read) => read,
                        Err(_) => return Err(ReadError::Violation(CloseCode::FrameTimeout)),
                    }
                };
                match read {
                    Ok(0) | Err(_) => return Err(ReadError::Lost),
                    Ok(_) => activity(),
                }
            }
            Ok(())
        }
    }

    /// The next message or control frame. Not cancel-safe: a partly read frame
    /// is lost if the future is dropped, so the reader runs on its own.
    ///
    /// Not an `async fn`: one of those moves its arguments into locals beside
    /// the slots they arrived in and keeps both, and every idle connection's
    /// future holds this one.
    #[allow(clippy::manual_async_fn)] // deliberate: see above
    pub fn next(
        &mut self,
        activity: &mut impl FnMut(),
    ) -> impl Future<Output = Result<Inbound, ReadError>> {
        async move {
            loop {
                let header = loop {
                    if let Some(header) = parse_header(&self.buffer)? {
                        break header;
                    }
                    let have = self.buffer.len();
                    self.fill(have + 1, activity).await?;
                };
                if matches!(header.opcode, CONTINUATION | TEXT | BINARY | PING)
                    && !self.requests.try_take(Instant::now())
                {
                    return Err(ReadError::Violation(CloseCode::PolicyViolation));
                }
                let assembled = self
                    .fragments
                    .as_ref()
                    .map_or(0, |fragments| fragments.bytes.len());
                let data = matches!(header.opcode, CONTINUATION | TEXT | BINARY);
                if header.payload_len > self.max_message as u64
                    || (data && assembled as u64 + header.payload_len > self.max_message as u64)
                {
                    return Err(ReadError::Violation(CloseCode::MessageTooBig));
                }
                let frame_len = header.header_len + header.payload_len as usize;
                self.fill(frame_len, activity).await?;
                let payload: Vec<u8> = self.buffer[header.header_len..frame_len]
                    .iter()
                    .enumerate()
                    .map(|(index, byte)| byte ^ header.mask[index % 4])
                    .collect();
                self.buffer.advance(frame_len);
                if self.buffer.is_empty() {
                    // Nothing else refers to the allocation now: free it, so an
                    // idle connection holds no read buffer whatever it last sent.
                    self.buffer = BytesMut::new();
                }
                if let Some(message) = self.frame(header, payload)? {
                    if matches!(message, Inbound::Text(_) | Inbound::Binary(_)) {
                        // A whole message arrived: the next one has its own deadline.
                        self.partial_since = None;
                    }
                    return Ok(message);
                }
            }
        }
    }

    /// Applies one unmasked frame; returns a message when one is complete.
    fn frame(&mut self, header: Header, payload: Vec<u8>) -> Result<Option<Inbound>, ReadError> {
        let protocol_error = Err(ReadError::Violation(CloseCode::ProtocolError));
        match header.opcode {
            PING => Ok(Some(Inbound::Ping(payload))),
            PONG => Ok(Some(Inbound::Pong)),
            CLOSE => {
                if !valid_close(&payload) {
                    protocol_error
                } else if payload.len() > 2 && std::str::from_utf8(&payload[2..]).is_err() {
                    Err(ReadError::Violation(CloseCode::InvalidPayload))
                } else {
                    Ok(Some(Inbound::Close(payload)))
                }
            }
            TEXT | BINARY => {
                if self.fragments.is_some() {
                    return protocol_error;
                }
                let mut message = Fragments {
                    opcode: header.opcode,
                    bytes: payload,
                    checked: 0,
                };
                if header.fin {
                    message.complete().map(Some)
                } else {
                    message.check_utf8()?;
                    self.fragments = Some(Box::new(message));
                    Ok(None)
                }
            }
            CONTINUATION => {
                let Some(message) = self.fragments.as_mut() else {
                    return protocol_error;
                };
                message.bytes.extend_from_slice(&payload);
                if header.fin {
                    let message = self.fragments.take().expect("checked above");
                    message.complete().map(Some)
                } else {
                    message.check_utf8()?;
                    Ok(None)
                }
            }
            _ => protocol_error,
        }
    }
}

/// A message being assembled, or a whole one from a single frame.
struct Fragments {
    opcode: u8,
    bytes: Vec<u8>,
    /// For text, how many leading bytes are known to be valid UTF-8. A
    /// character may straddle two fragments, so up to three bytes at the end
    /// can wait for the next fragment.
    checked: usize,
}

impl Fragments {
    /// Fails fast: a text message is refused (1007) at the first fragment
    /// that makes it invalid UTF-8, not only when it ends. Each byte is
    /// checked once, however many fragments there are.
    fn check_utf8(&mut self) -> Result<(), ReadError> {
        if self.opcode != TEXT {
            return Ok(());
        }
        match std::str::from_utf8(&self.bytes[self.checked..]) {
            Ok(_) => self.checked = self.bytes.len(),
            // Only an unfinished character at the end: wait for the rest.
            Err(error) if error.error_len().is_none() => self.checked += error.valid_up_to(),
            Err(_) => return Err(ReadError::Violation(CloseCode::InvalidPayload)),
        }
        Ok(())
    }

    fn complete(self) -> Result<Inbound, ReadError> {
        if self.opcode == BINARY {
            return Ok(Inbound::Binary(self.bytes));
        }
        if std::str::from_utf8(&self.bytes[self.checked..]).is_err() {
            return Err(ReadError::Violation(CloseCode::InvalidPayload));
        }
        Ok(Inbound::Text(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            out.push(0x80 | len as u8);
        } else if len <= 0xffff {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    /// Feeds `stream` in `chunk`-byte reads and collects what the reader yields.
    async fn read_all(
        stream: Vec<u8>,
        chunk: usize,
        max: usize,
    ) -> Vec<Result<Inbound, ReadError>> {
        let (mut client, server) = tokio::io::duplex(chunk.max(1));
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for piece in stream.chunks(chunk.max(1)) {
                if client.write_all(piece).await.is_err() {
                    return;
                }
            }
        });
        let requests = TokenBucket::new(1e9, 1e9, Instant::now());
        let mut reader = FrameReader::new(server, max, Duration::from_secs(60), requests);
        let mut out = Vec::new();
        loop {
            let item = reader.next(&mut || {}).await;
            let stop = item.is_err();
            out.push(item);
            if stop {
                return out;
            }
        }
    }

    async fn check(stream: Vec<u8>, max: usize, expected: Vec<Result<Inbound, ReadError>>) {
        for chunk in [1, 3, 7, 4096] {
            let mut want = expected.clone();
            if want.last().is_none_or(|last| last.is_ok()) {
                want.push(Err(ReadError::Lost));
            }
            assert_eq!(
                read_all(stream.clone(), chunk, max).await,
                want,
                "chunk {chunk}"
            );
        }
    }

    use CloseCode::*;
    use Inbound::*;

    #[tokio::test]
    async fn messages_and_control_frames() {
        let mut stream = frame(true, TEXT, b"hello");
        stream.extend(frame(true, PING, b"p"));
        stream.extend(frame(true, BINARY, &[0, 1, 2]));
        stream.extend(frame(true, PONG, b""));
        stream.extend(frame(true, TEXT, &vec![b'a'; 300]));
        stream.extend(frame(true, TEXT, &vec![b'b'; 70_000]));
        stream.extend(frame(true, CLOSE, &[0x03, 0xe8, b'o', b'k']));
        check(
            stream,
            100_000,
            vec![
                Ok(Text(b"hello".to_vec())),
                Ok(Ping(b"p".to_vec())),
                Ok(Binary(vec![0, 1, 2])),
                Ok(Pong),
                Ok(Text(vec![b'a'; 300])),
                Ok(Text(vec![b'b'; 70_000])),
                Ok(Close(vec![0x03, 0xe8, b'o', b'k'])),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn fragments_with_interleaved_control_frames() {
        let mut stream = frame(false, TEXT, b"he");
        stream.extend(frame(true, PING, b""));
        stream.extend(frame(false, CONTINUATION, b"ll"));
        stream.extend(frame(true, CONTINUATION, b"o"));
        check(
            stream,
            100,
            vec![Ok(Ping(vec![])), Ok(Text(b"hello".to_vec()))],
        )
        .await;
        // UTF-8 split across fragments is fine; invalid UTF-8 is not.
        let euro = "€".as_bytes();
        let mut stream = frame(false, TEXT, &euro[..1]);
        stream.extend(frame(true, CONTINUATION, &euro[1..]));
        check(stream, 100, vec![Ok(Text(euro.to_vec()))]).await;
        check(
            frame(true, TEXT, &[0xff]),
            100,
            vec![Err(ReadError::Violation(InvalidPayload))],
        )
        .await;
        // A character split over three fragments.
        let grin = "😀".as_bytes();
        let mut stream = frame(false, TEXT, &grin[..1]);
        stream.extend(frame(false, CONTINUATION, &grin[1..2]));
        stream.extend(frame(true, CONTINUATION, &grin[2..]));
        check(stream, 100, vec![Ok(Text(grin.to_vec()))]).await;
        // An unfinished character is refused when the message ends there.
        let mut stream = frame(false, TEXT, b"a");
        stream.extend(frame(true, CONTINUATION, &grin[..3]));
        check(stream, 100, vec![Err(ReadError::Violation(InvalidPayload))]).await;
    }

    #[tokio::test]
    async fn invalid_utf8_fails_at_its_fragment_not_at_the_end() {
        // Autobahn 6.4.1: the second fragment cannot start valid UTF-8
        // (U+110000), and no further fragment arrives.
        let mut stream = frame(false, TEXT, "κόσμε".as_bytes());
        stream.extend(frame(false, CONTINUATION, &[0xf4, 0x90, 0x80, 0x80]));
        check(stream, 100, vec![Err(ReadError::Violation(InvalidPayload))]).await;
        // The same bytes are fine in a binary message.
        let mut stream = frame(false, BINARY, &[0xf4]);
        stream.extend(frame(false, CONTINUATION, &[0x90, 0x80, 0x80]));
        stream.extend(frame(true, CONTINUATION, b""));
        check(stream, 100, vec![Ok(Binary(vec![0xf4, 0x90, 0x80, 0x80]))]).await;
    }

    #[tokio::test]
    async fn size_limits_are_inclusive_and_cover_whole_messages() {
        check(
            frame(true, TEXT, &[b'x'; 100]),
            100,
            vec![Ok(Text(vec![b'x'; 100]))],
        )
        .await;
        check(
            frame(true, TEXT, &[b'x'; 101]),
            100,
            vec![Err(ReadError::Violation(MessageTooBig))],
        )
        .await;
        let mut stream = frame(false, TEXT, &[b'x'; 60]);
        stream.extend(frame(true, CONTINUATION, &[b'x'; 41]));
        check(stream, 100, vec![Err(ReadError::Violation(MessageTooBig))]).await;
        // A huge declared length is refused from the header alone.
        let mut huge = vec![0x81, 0x80 | 127];
        huge.extend_from_slice(&(1u64 << 40).to_be_bytes());
        huge.extend_from_slice(&[1, 2, 3, 4]);
        check(huge, 100, vec![Err(ReadError::Violation(MessageTooBig))]).await;
    }

    #[tokio::test]
    async fn protocol_errors() {
        let error = || vec![Err(ReadError::Violation(ProtocolError))];
        let mut unmasked = frame(true, TEXT, b"hi");
        unmasked[1] &= 0x7f;
        check(unmasked, 100, error()).await;
        let mut rsv = frame(true, TEXT, b"hi");
        rsv[0] |= 0x40;
        check(rsv, 100, error()).await;
        check(frame(true, 0x3, b""), 100, error()).await;
        check(frame(false, PING, b""), 100, error()).await;
        check(frame(true, PING, &[0; 126]), 1000, error()).await;
        check(frame(true, CONTINUATION, b"x"), 100, error()).await;
        let mut twice = frame(false, TEXT, b"a");
        twice.extend(frame(true, TEXT, b"b"));
        check(twice, 100, error()).await;
        check(frame(true, CLOSE, &[0x03]), 100, error()).await;
        check(frame(true, CLOSE, &[0x03, 0xed]), 100, error()).await;
        let invalid_reason = frame(true, CLOSE, &[0x03, 0xe8, 0xff]);
        check(
            invalid_reason,
            100,
            vec![Err(ReadError::Violation(InvalidPayload))],
        )
        .await;
    }

    #[tokio::test]
    async fn the_buffer_is_released_after_every_frame() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let requests = TokenBucket::new(1e9, 1e9, Instant::now());
        let mut reader = FrameReader::new(server, 1 << 20, Duration::from_secs(60), requests);
        assert_eq!(reader.buffer.capacity(), 0);
        client
            .write_all(&frame(true, TEXT, &[b'x'; 60_000]))
            .await
            .unwrap();
        let mut reads = 0;
        assert!(reader.next(&mut || reads += 1).await.is_ok());
        assert!(reads > 0, "arriving bytes count as activity");
        assert_eq!(reader.buffer.capacity(), 0, "no buffer kept while idle");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_reader_waits_without_a_buffer() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let requests = TokenBucket::new(1e9, 1e9, Instant::now());
        let mut reader = FrameReader::new(server, 1 << 20, Duration::from_secs(60), requests);
        let waited = tokio::time::timeout(Duration::from_secs(1), reader.next(&mut || {})).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(reader.buffer.capacity(), 0, "no buffer while waiting");
        // A frame that arrives whole is read in one go.
        let mut reads = 0;
        client
            .write_all(&frame(true, TEXT, b"hello"))
            .await
            .unwrap();
        assert_eq!(
            reader.next(&mut || reads += 1).await,
            Ok(Inbound::Text(b"hello".to_vec()))
        );
        assert_eq!(reads, 1);
    }

    #[tokio::test]
    async fn every_data_frame_and_ping_takes_a_token() {
        use tokio::io::AsyncWriteExt;
        let mut stream = frame(false, TEXT, b"a");
        for _ in 0..3 {
            stream.extend(frame(false, CONTINUATION, b""));
        }
        let (mut client, server) = tokio::io::duplex(4096);
        client.write_all(&stream).await.unwrap();
        let requests = TokenBucket::new(0.001, 2.0, Instant::now());
        let mut reader = FrameReader::new(server, 100, Duration::from_secs(60), requests);
        let result = reader.next(&mut || {}).await;
        assert_eq!(result, Err(ReadError::Violation(PolicyViolation)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_frame_pins_only_what_arrived_and_times_out() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let requests = TokenBucket::new(1e9, 1e9, Instant::now());
        let mut reader = FrameReader::new(server, 1 << 20, Duration::from_secs(10), requests);
        // A header declaring 60,000 bytes, then a trickle.
        let whole = frame(true, TEXT, &[b'x'; 60_000]);
        client.write_all(&whole[..20]).await.unwrap();
        let trickle = tokio::spawn(async move {
            for byte in &whole[20..100] {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if client.write_all(&[*byte]).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let started = Instant::now();
        let mut reads = 0;
        let result = tokio::time::timeout(Duration::from_secs(60), reader.next(&mut || reads += 1))
            .await
            .expect("the frame has a deadline");
        assert_eq!(result, Err(ReadError::Violation(CloseCode::FrameTimeout)));
        // Every arriving byte was activity, yet the frame had its deadline.
        assert!(reads > 10);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        assert!(
            reader.buffer.capacity() <= READ_CHUNK + INITIAL_BUFFER,
            "reserved {} bytes for a frame that sent 30",
            reader.buffer.capacity()
        );
        trickle.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_covers_a_whole_fragmented_message() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let requests = TokenBucket::new(1e9, 1e9, Instant::now());
        let mut reader = FrameReader::new(server, 1 << 20, Duration::from_secs(10), requests);
        let feeder = tokio::spawn(async move {
            client.write_all(&frame(false, TEXT, b"a")).await.unwrap();
            // Each fragment and ping arrives whole, but the message never ends.
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                if client
                    .write_all(&frame(false, CONTINUATION, b"b"))
                    .await
                    .is_err()
                    || client.write_all(&frame(true, PING, b"")).await.is_err()
                {
                    return;
                }
            }
        });
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match reader.next(&mut || {}).await {
                    Ok(Inbound::Ping(_)) => continue,
                    other => break other,
                }
            }
        })
        .await
        .expect("the message has a deadline");
        assert_eq!(outcome, Err(ReadError::Violation(CloseCode::FrameTimeout)));
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        // And an idle connection has no deadline at all.
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_reader_has_no_deadline() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let requests = TokenBucket::new(1e9, 1e9, Instant::now());
        let mut reader = FrameReader::new(server, 1 << 20, Duration::from_secs(10), requests);
        client.write_all(&frame(true, TEXT, b"1")).await.unwrap();
        assert!(reader.next(&mut || {}).await.is_ok());
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            client.write_all(&frame(true, TEXT, b"2")).await.unwrap();
            client
        });
        assert_eq!(
            reader.next(&mut || {}).await,
            Ok(Inbound::Text(b"2".to_vec()))
        );
        drop(writer);
    }
}
