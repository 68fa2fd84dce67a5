//! The frames of one socket write, laid out for a vectored write.
//!
//! A connection's writer sends everything pending in one write: control
//! frames, then the queued messages, then perhaps a close frame. Frame
//! headers, control frames and small payloads are copied into one small
//! buffer; a payload of [`SHARED_PAYLOAD_BYTES`] or more stays the shared
//! [`Bytes`] that the hub encoded once for every subscriber, and goes to the
//! kernel as its own `IoSlice`. So a large message costs each subscriber
//! neither an allocation nor a copy, and a writer waiting on a full socket
//! holds references to shared payloads instead of a private copy of them.
//!
//! Transports that cannot write vectored (`AsyncWrite::is_write_vectored`
//! is false) get the batch made contiguous first ([`WriteBatch::make_contiguous`]),
//! so that a batch is still one write rather than one per piece, which TLS
//! would turn into one record each.
//!
//! Pure: no I/O. The writer in `connection.rs` drives the writes.

use std::io::IoSlice;

use bytes::Bytes;

use crate::protocol::Opcode;

/// Payloads of at least this many bytes are written from the shared buffer;
/// smaller ones are copied next to their frame header, where a copy costs
/// less than an `IoSlice` of its own (BENCHMARKS.md, the criterion table).
pub const SHARED_PAYLOAD_BYTES: usize = 512;

/// What the inline buffer reserves when a batch starts, so that a batch of a
/// few small frames allocates once rather than growing step by step.
const FIRST_INLINE_BYTES: usize = 256;

/// The longest frame header a server writes.
pub const MAX_HEADER_BYTES: usize = 10;

/// Writes an unmasked, unfragmented frame header (RFC 6455 5.2), as
/// `protocol::write_frame` writes it, into `out`; returns its length.
pub fn frame_header(out: &mut [u8; MAX_HEADER_BYTES], opcode: Opcode, payload_len: usize) -> usize {
    out[0] = 0x80 | opcode as u8;
    if payload_len < 126 {
        out[1] = payload_len as u8;
        2
    } else if payload_len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// One batch of server frames, written in order, and how much of it has been
/// written.
#[derive(Debug, Default)]
pub struct WriteBatch {
    /// Frame headers, control frames and small payloads, in write order,
    /// with the shared payloads belonging between them at the offsets in
    /// `shared`.
    inline: Vec<u8>,
    /// Large payloads, each with the offset in `inline` before which it is
    /// written; offsets never decrease.
    shared: Vec<(usize, Bytes)>,
    /// Total bytes in the batch.
    len: usize,
    /// Bytes of the batch already written.
    written: usize,
}

impl WriteBatch {
    /// Appends a data frame (text or binary) carrying `payload`, sharing it
    /// when it is large.
    pub fn push(&mut self, opcode: Opcode, payload: Bytes) {
        if payload.len() < SHARED_PAYLOAD_BYTES {
            self.push_copied(opcode, &payload);
            return;
        }
        self.push_header(opcode, payload.len());
        self.len += payload.len();
        self.shared.push((self.inline.len(), payload));
    }

    /// Appends a frame whose payload is copied: control frames (at most 125
    /// bytes) and small messages.
    pub fn push_copied(&mut self, opcode: Opcode, payload: &[u8]) {
        self.push_header(opcode, payload.len());
        self.inline.extend_from_slice(payload);
        self.len += payload.len();
    }

    /// Appends bytes that are already framed: the rest of a frame that
    /// direct delivery started writing. They must come first in a batch.
    pub fn push_raw(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        if bytes.len() < SHARED_PAYLOAD_BYTES {
            self.inline.extend_from_slice(&bytes);
        } else {
            self.shared.push((self.inline.len(), bytes));
        }
    }

    fn push_header(&mut self, opcode: Opcode, payload_len: usize) {
        if self.inline.capacity() == 0 {
            self.inline.reserve(FIRST_INLINE_BYTES);
        }
        let mut header = [0u8; MAX_HEADER_BYTES];
        let used = frame_header(&mut header, opcode, payload_len);
        self.inline.extend_from_slice(&header[..used]);
        self.len += used;
    }

    /// Whether nothing is left to write.
    pub fn is_done(&self) -> bool {
        self.written == self.len
    }

    /// Bytes not written yet.
    pub fn remaining(&self) -> usize {
        self.len - self.written
    }

    /// Fills `slices` with the unwritten part of the batch, in order, and
    /// returns how many it used. When the batch has more pieces than
    /// `slices` holds, the rest follows in a later write.
    pub fn io_slices<'a>(&'a self, slices: &mut [IoSlice<'a>]) -> usize {
        let mut used = 0;
        // Where the current piece starts, in bytes from the batch's start.
        let mut position = 0;
        let mut inline_from = 0;
        let shared = self
            .shared
            .iter()
            .map(|(offset, payload)| (*offset, &payload[..]));
        let tail = std::iter::once((self.inline.len(), &[][..]));
        for (offset, payload) in shared.chain(tail) {
            for piece in [&self.inline[inline_from..offset], payload] {
                if used == slices.len() {
                    return used;
                }
                let end = position + piece.len();
                if end > self.written && !piece.is_empty() {
                    let skip = self.written.saturating_sub(position);
                    slices[used] = IoSlice::new(&piece[skip..]);
                    used += 1;
                }
                position = end;
            }
            inline_from = offset;
        }
        used
    }

    /// Records that the next `bytes` of the batch were written.
    pub fn advance(&mut self, bytes: usize) {
        assert!(bytes <= self.remaining(), "advanced past the batch");
        self.written += bytes;
    }

    /// Copies the shared payloads in, so that the unwritten part of the
    /// batch is one slice: for transports that do not write vectored.
    pub fn make_contiguous(&mut self) {
        if self.shared.is_empty() {
            return;
        }
        let mut contiguous = Vec::with_capacity(self.len);
        let mut inline_from = 0;
        for (offset, payload) in self.shared.drain(..) {
            contiguous.extend_from_slice(&self.inline[inline_from..offset]);
            contiguous.extend_from_slice(&payload);
            inline_from = offset;
        }
        contiguous.extend_from_slice(&self.inline[inline_from..]);
        self.inline = contiguous;
    }

    /// Empties the batch for the next one, keeping its buffers: for a writer
    /// that has more to write at once.
    pub fn clear(&mut self) {
        self.inline.clear();
        self.shared.clear();
        self.len = 0;
        self.written = 0;
    }

    /// Empties the batch and frees its buffers: for a writer about to wait,
    /// so that an idle connection holds none. The next batch allocates
    /// [`FIRST_INLINE_BYTES`] at its first frame.
    pub fn release(&mut self) {
        *self = WriteBatch::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol;

    /// The frames as `protocol::write_frame` encodes them, one after another.
    fn reference(frames: &[(Opcode, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (opcode, payload) in frames {
            protocol::write_frame(&mut out, *opcode, payload);
        }
        out
    }

    fn batch(frames: &[(Opcode, &[u8])]) -> WriteBatch {
        let mut batch = WriteBatch::default();
        for (opcode, payload) in frames {
            match opcode {
                Opcode::Text | Opcode::Binary => {
                    batch.push(*opcode, Bytes::copy_from_slice(payload))
                }
                _ => batch.push_copied(*opcode, payload),
            }
        }
        batch
    }

    /// Writes the batch `step` bytes at a time through at most `max_slices`
    /// slices per write, as a socket taking a few bytes per call would.
    fn drain(mut batch: WriteBatch, step: usize, max_slices: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !batch.is_done() {
            let mut slices = vec![IoSlice::new(&[]); max_slices];
            let used = batch.io_slices(&mut slices);
            assert!(used > 0, "slices left while bytes remain");
            let mut taken = 0;
            for slice in &slices[..used] {
                let take = (step - taken).min(slice.len());
                out.extend_from_slice(&slice[..take]);
                taken += take;
                if taken == step {
                    break;
                }
            }
            batch.advance(taken);
        }
        out
    }

    #[test]
    fn any_write_sizes_produce_the_reference_bytes() {
        let large = vec![b'L'; 70_000];
        let medium = vec![b'M'; 600];
        let small = vec![b's'; 130];
        let frames: &[(Opcode, &[u8])] = &[
            (Opcode::Ping, b""),
            (Opcode::Pong, b"ping-payload"),
            (Opcode::Text, &small),
            (Opcode::Text, &large),
            (Opcode::Text, &medium),
            (Opcode::Text, &medium),
            (Opcode::Text, b"tiny"),
            (Opcode::Text, &large[..SHARED_PAYLOAD_BYTES]),
            (Opcode::Close, &[0x03, 0xe9]),
        ];
        let expected = reference(frames);
        for step in [1, 2, 3, 7, 64, 599, 600, 601, 4096, usize::MAX] {
            for max_slices in [1, 2, 3, 64] {
                let step = step.min(expected.len());
                let out = drain(batch(frames), step, max_slices);
                assert!(out == expected, "step {step}, {max_slices} slices");
            }
        }
        let mut contiguous = batch(frames);
        contiguous.advance(5);
        contiguous.make_contiguous();
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(contiguous.io_slices(&mut slices), 1);
        assert_eq!(&slices[0][..], &expected[5..]);
    }

    #[test]
    fn large_payloads_are_shared_and_small_ones_copied() {
        let large = Bytes::from(vec![b'L'; 4096]);
        let mut batch = WriteBatch::default();
        batch.push(Opcode::Text, large.clone());
        batch.push(Opcode::Text, Bytes::from_static(b"small"));
        // The header, the shared payload, then the small frame.
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(batch.io_slices(&mut slices), 3);
        assert_eq!(slices[1].as_ptr(), large.as_ptr(), "not copied");
        assert_eq!(batch.inline.len(), 4 + 2 + 5);
        assert_eq!(batch.remaining(), 4 + 4096 + 2 + 5);
    }

    #[test]
    fn buffers_are_kept_while_busy_and_freed_before_waiting() {
        let mut batch = WriteBatch::default();
        for _ in 0..100 {
            batch.push(Opcode::Text, Bytes::from(vec![b's'; 100]));
            batch.push(Opcode::Text, Bytes::from(vec![b'L'; 1000]));
        }
        batch.advance(batch.remaining());
        batch.clear();
        assert!(batch.is_done());
        assert!(batch.inline.capacity() > 100 * 100, "kept while busy");
        assert!(batch.shared.capacity() >= 100);
        batch.release();
        assert!(batch.is_done());
        assert_eq!(batch.inline.capacity(), 0);
        assert_eq!(batch.shared.capacity(), 0);
        batch.push(Opcode::Text, Bytes::from_static(b"small"));
        assert_eq!(batch.inline.capacity(), FIRST_INLINE_BYTES);
    }
}
