//! Checks on the raw bytes a client sends, before fastwebsockets parses them.
//!
//! fastwebsockets accepts unmasked client frames, which RFC 6455 section 5.1
//! forbids. [`MaskGuard`] wraps the socket's read half and follows the frame
//! boundaries in the byte stream: a frame header without the mask bit fails
//! the read with [`UnmaskedFrame`] before the frame is parsed, and the session
//! closes with 1002. Following boundaries costs a few bytes of state and no
//! buffer: payload bytes are counted, never copied.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// The error a [`MaskGuard`] read fails with.
#[derive(Debug, thiserror::Error)]
#[error("unmasked client frame")]
pub struct UnmaskedFrame;

/// Where the guard is in the frame stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a header: its bytes so far (at most 14) and how many.
    Header { bytes: [u8; 14], have: u8 },
    /// Skipping payload bytes.
    Payload { remaining: u64 },
}

/// Follows frame boundaries; pure, so it is tested on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameTracker {
    state: State,
}

impl Default for FrameTracker {
    fn default() -> Self {
        FrameTracker {
            state: State::Header {
                bytes: [0; 14],
                have: 0,
            },
        }
    }
}

impl FrameTracker {
    /// Consumes `data`; fails on the first unmasked frame header.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), UnmaskedFrame> {
        while !data.is_empty() {
            match &mut self.state {
                State::Payload { remaining } => {
                    let skip = (*remaining).min(data.len() as u64);
                    *remaining -= skip;
                    data = &data[skip as usize..];
                    if *remaining == 0 {
                        self.state = State::Header {
                            bytes: [0; 14],
                            have: 0,
                        };
                    }
                }
                State::Header { bytes, have } => {
                    bytes[*have as usize] = data[0];
                    *have += 1;
                    data = &data[1..];
                    if *have == 2 && bytes[1] & 0x80 == 0 {
                        return Err(UnmaskedFrame);
                    }
                    if let Some(payload) = header_complete(bytes, *have) {
                        self.state = if payload == 0 {
                            State::Header {
                                bytes: [0; 14],
                                have: 0,
                            }
                        } else {
                            State::Payload { remaining: payload }
                        };
                    }
                }
            }
        }
        Ok(())
    }
}

/// The payload length once `have` bytes complete the header, else `None`.
fn header_complete(bytes: &[u8; 14], have: u8) -> Option<u64> {
    if have < 2 {
        return None;
    }
    let (length_bytes, short) = match bytes[1] & 0x7f {
        126 => (2, None),
        127 => (8, None),
        short => (0, Some(u64::from(short))),
    };
    // Client frames carry a 4-byte mask after the length.
    if usize::from(have) < 2 + length_bytes + 4 {
        return None;
    }
    Some(match short {
        Some(length) => length,
        None => bytes[2..2 + length_bytes]
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    })
}

/// An [`AsyncRead`] that fails on unmasked client frames.
pub struct MaskGuard<R> {
    inner: R,
    tracker: FrameTracker,
}

impl<R> MaskGuard<R> {
    pub fn new(inner: R) -> MaskGuard<R> {
        MaskGuard {
            inner,
            tracker: FrameTracker::default(),
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for MaskGuard<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let fresh = &buf.filled()[before..];
                if let Err(error) = this.tracker.feed(fresh) {
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
                }
                Poll::Ready(Ok(()))
            }
            other => other,
        }
    }
}

/// Whether an I/O error is a [`MaskGuard`] refusal.
pub fn is_unmasked_frame(error: &io::Error) -> bool {
    error
        .get_ref()
        .is_some_and(|inner| inner.is::<UnmaskedFrame>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(masked: bool, payload_len: usize) -> Vec<u8> {
        let mut out = vec![0x81];
        let mask_bit = if masked { 0x80 } else { 0 };
        if payload_len < 126 {
            out.push(mask_bit | payload_len as u8);
        } else if payload_len <= 0xffff {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(payload_len as u64).to_be_bytes());
        }
        if masked {
            out.extend_from_slice(&[1, 2, 3, 4]);
        }
        out.extend(std::iter::repeat_n(b'x', payload_len));
        out
    }

    fn check(stream: &[u8], chunk: usize, expected_ok: bool) {
        let mut tracker = FrameTracker::default();
        let result = stream
            .chunks(chunk.max(1))
            .try_for_each(|c| tracker.feed(c));
        assert_eq!(result.is_ok(), expected_ok, "chunk {chunk}");
    }

    #[test]
    fn follows_frame_boundaries_in_any_chunking() {
        let mut stream = Vec::new();
        for len in [0, 5, 125, 126, 300, 70_000] {
            stream.extend(frame(true, len));
        }
        for chunk in [1, 2, 3, 7, 64, 4096, stream.len()] {
            check(&stream, chunk, true);
        }
        let mut bad = stream.clone();
        bad.extend(frame(false, 3));
        for chunk in [1, 5, 4096] {
            check(&bad, chunk, false);
        }
        check(&frame(false, 0), 1, false);
    }
}
