//! The node's cursor on one history channel: what keeps the channel gap-free
//! for every local subscriber, with one cursor per channel, not one per client.
//!
//! The cursor knows the channel's epoch and the last offset it delivered. A
//! live message with the next offset is delivered; one at or below the cursor
//! is a duplicate and dropped; one further ahead waits in a bounded buffer
//! while the node fills the missing range from the stream. A fill (or a
//! client's join, which reads the stream anyway) hands the cursor a
//! [`Snapshot`]; the cursor delivers what it lacked in order, then whatever
//! waited, or, when the stream no longer holds the range, sends a `gap` and
//! continues from the stream's top.
//!
//! While a client joins with recovery the cursor is *paused*: nothing moves it,
//! so that the offset the joiner reads at the start still holds when its
//! recovered messages are queued; live messages wait in the buffer meanwhile.
//!
//! Pure: no I/O and no locks. The hub holds each cursor in a mutex and passes a
//! [`Sink`] that writes into the subscribers' outboxes.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::Snapshot;

/// The most messages one channel's buffer holds while a fill or a join is in
/// progress. When full, the newest arrival is dropped from the buffer (and
/// counted): the stream holds it, so the fill that follows delivers it.
pub const MAX_PENDING: usize = 1024;

/// Where a cursor's decisions go.
pub trait Sink {
    /// Delivers one message, in order, to the channel's subscribers.
    fn deliver(&mut self, epoch: &Arc<str>, offset: u64, payload: &Bytes);
    /// Tells the channel's subscribers that messages were lost for good.
    fn gap(&mut self);
}

/// What a cursor step asks of its caller besides deliveries.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// A fill from the stream is due (see [`Cursor::begin_fill`]).
    pub fill: bool,
    /// Live messages dropped as duplicates.
    pub duplicates: u64,
    /// Messages dropped because the buffer was full.
    pub overflowed: u64,
    /// Messages delivered from a snapshot (fetched to fill a gap).
    pub filled: u64,
}

#[derive(Debug)]
pub struct Cursor {
    /// The most messages one fill may replay before it gives up with a `gap`.
    recover_max: u64,
    /// False until the first join reads the store: there is nothing to
    /// deliver to before that.
    synced: bool,
    /// The channel's epoch; `None` while the store has no history for it.
    epoch: Option<Arc<str>>,
    /// The last offset delivered.
    last: u64,
    /// Joins in progress.
    paused: u32,
    /// A fill is in flight.
    filling: bool,
    /// A fill was wanted while paused or filling.
    fill_wanted: bool,
    /// Live messages that arrived early, by offset, with their epoch.
    pending: BTreeMap<u64, (Arc<str>, Bytes)>,
    /// The highest offset dropped from a full buffer: until the cursor
    /// passes it, a fill is due even when nothing newer arrives.
    dropped_up_to: u64,
}

impl Cursor {
    pub fn new(recover_max: u64) -> Cursor {
        Cursor {
            recover_max,
            synced: false,
            epoch: None,
            last: 0,
            paused: 0,
            filling: false,
            fill_wanted: false,
            pending: BTreeMap::new(),
            dropped_up_to: 0,
        }
    }

    /// The channel's position as subscribers see it: the epoch (empty while
    /// there is none) and the last offset delivered.
    pub fn position(&self) -> (Arc<str>, u64) {
        (
            self.epoch.clone().unwrap_or_else(|| Arc::from("")),
            self.last,
        )
    }

    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// Messages waiting in the buffer.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// A live message off the broker.
    pub fn live(
        &mut self,
        epoch: &str,
        offset: u64,
        payload: Bytes,
        sink: &mut impl Sink,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        if !self.synced || self.paused > 0 || self.filling {
            if self.synced && self.epoch.as_deref() == Some(epoch) && offset <= self.last {
                outcome.duplicates += 1;
            } else {
                self.buffer(epoch.into(), offset, payload, &mut outcome);
            }
            return outcome;
        }
        self.accept(epoch, offset, payload, sink, &mut outcome);
        self.drain(sink, &mut outcome);
        outcome
    }

    fn accept(
        &mut self,
        epoch: &str,
        offset: u64,
        payload: Bytes,
        sink: &mut impl Sink,
        outcome: &mut Outcome,
    ) {
        match &self.epoch {
            Some(current) if **current == *epoch => {}
            Some(_) => {
                // A new epoch: whatever the old one still had is gone.
                sink.gap();
                self.epoch = Some(epoch.into());
                self.last = 0;
                self.dropped_up_to = 0;
                self.pending.retain(|_, (e, _)| **e == *epoch);
            }
            None => {
                // The first epoch the node sees; nothing was delivered before.
                self.epoch = Some(epoch.into());
                self.last = 0;
            }
        }
        if offset <= self.last {
            outcome.duplicates += 1;
        } else if offset == self.last + 1 {
            let epoch = self.epoch.clone().expect("set above");
            sink.deliver(&epoch, offset, &payload);
            self.last = offset;
        } else {
            self.buffer(epoch.into(), offset, payload, outcome);
            outcome.fill = true;
        }
    }

    fn buffer(&mut self, epoch: Arc<str>, offset: u64, payload: Bytes, outcome: &mut Outcome) {
        if self.pending.len() >= MAX_PENDING {
            // Keep the lowest offsets, which are delivered first: the dropped
            // one is in the stream, and the buffer's own gap makes a fill
            // fetch it.
            let highest = *self.pending.keys().next_back().expect("full");
            outcome.overflowed += 1;
            if offset > highest {
                self.dropped_up_to = self.dropped_up_to.max(offset);
                return;
            }
            self.pending.remove(&highest);
            self.dropped_up_to = self.dropped_up_to.max(highest);
        }
        self.pending.insert(offset, (epoch, payload));
    }

    /// Delivers the buffer's run that continues the cursor; asks for a fill
    /// when something remains with a hole before it.
    fn drain(&mut self, sink: &mut impl Sink, outcome: &mut Outcome) {
        while let Some(entry) = self.pending.first_entry() {
            let offset = *entry.key();
            let (epoch, payload) = entry.remove();
            let current = self.epoch.as_deref() == Some(&*epoch);
            if current && offset <= self.last {
                outcome.duplicates += 1;
            } else if current && offset == self.last + 1 {
                sink.deliver(&epoch, offset, &payload);
                self.last = offset;
            } else {
                // A hole (or another epoch): the stream decides.
                self.pending.insert(offset, (epoch, payload));
                outcome.fill = true;
                break;
            }
        }
        if self.last < self.dropped_up_to {
            outcome.fill = true;
        }
    }

    /// Starts a fill: returns the offset to read the stream from, or `None`
    /// when no fill may run now (one is in flight, a join holds the cursor, or
    /// there is nothing to deliver to yet). A refused fill is remembered and
    /// asked for again by the step that unblocks it.
    pub fn begin_fill(&mut self) -> Option<u64> {
        if !self.synced {
            return None;
        }
        if self.paused > 0 || self.filling {
            self.fill_wanted = true;
            return None;
        }
        self.filling = true;
        self.fill_wanted = false;
        Some(self.last + 1)
    }

    /// Ends a fill with what the stream held, or with `None` when reading it
    /// failed (the fill is wanted again).
    pub fn complete_fill(&mut self, snapshot: Option<&Snapshot>, sink: &mut impl Sink) -> Outcome {
        self.filling = false;
        let mut outcome = Outcome::default();
        match snapshot {
            Some(snapshot) if self.paused == 0 => {
                outcome = self.apply(snapshot, sink);
            }
            // A join started meanwhile: it reads the stream itself.
            Some(_) => self.fill_wanted = true,
            None => outcome.fill = true,
        }
        if self.fill_wanted && self.paused == 0 {
            self.fill_wanted = false;
            outcome.fill = true;
        }
        outcome
    }

    /// Pauses the cursor for a join; returns the last offset delivered, which
    /// holds until [`Cursor::resume`].
    pub fn pause(&mut self) -> u64 {
        self.paused += 1;
        self.last
    }

    /// Ends a join's pause; delivers what waited once no join remains.
    pub fn resume(&mut self, sink: &mut impl Sink) -> Outcome {
        let mut outcome = Outcome::default();
        self.paused = self.paused.saturating_sub(1);
        if self.paused == 0 && self.synced && !self.filling {
            self.drain(sink, &mut outcome);
            if self.fill_wanted {
                self.fill_wanted = false;
                outcome.fill = true;
            }
        }
        outcome
    }

    /// Brings the cursor up to what `snapshot` holds: delivers the offsets it
    /// lacked when the snapshot has them, or sends a `gap` and jumps to the
    /// stream's top when it does not (the epoch changed, the range was
    /// trimmed, or more than `recover_max` are missing). Works while paused:
    /// a join applies its own read before it queues its recovery.
    pub fn apply(&mut self, snapshot: &Snapshot, sink: &mut impl Sink) -> Outcome {
        let mut outcome = Outcome::default();
        if !self.synced {
            // Nobody was subscribed: the store's position is the start.
            self.synced = true;
            self.epoch = snapshot.epoch.clone();
            self.last = snapshot.top;
        } else if snapshot.epoch != self.epoch {
            match &snapshot.epoch {
                // The store lost its history (a restart without persistence,
                // an expiry) and nothing new came yet: keep the position, the
                // next message starts a new epoch.
                None => {}
                Some(epoch) => {
                    if self.epoch.is_some() || self.last > 0 {
                        sink.gap();
                    }
                    self.epoch = Some(epoch.clone());
                    self.last = 0;
                    self.dropped_up_to = 0;
                    self.catch_up(snapshot, sink, &mut outcome);
                }
            }
        } else {
            self.catch_up(snapshot, sink, &mut outcome);
        }
        if let Some(epoch) = &self.epoch {
            let epoch = epoch.clone();
            self.pending.retain(|_, (e, _)| *e == epoch);
        }
        if self.paused == 0 && !self.filling {
            self.drain(sink, &mut outcome);
        }
        outcome
    }

    /// Within one epoch: delivers `last+1 ..= top` from the snapshot.
    fn catch_up(&mut self, snapshot: &Snapshot, sink: &mut impl Sink, outcome: &mut Outcome) {
        if snapshot.top <= self.last {
            return;
        }
        let epoch = self
            .epoch
            .clone()
            .expect("an epoch is set before catching up");
        let missing = snapshot.top - self.last;
        let next = snapshot
            .entries
            .iter()
            .position(|(offset, _)| *offset > self.last);
        let holds_next = next.is_some_and(|i| snapshot.entries[i].0 == self.last + 1);
        if missing > self.recover_max || !holds_next {
            sink.gap();
            self.last = snapshot.top;
            return;
        }
        for (offset, payload) in &snapshot.entries[next.expect("checked")..] {
            if *offset != self.last + 1 {
                break;
            }
            sink.deliver(&epoch, *offset, payload);
            self.last = *offset;
            outcome.filled += 1;
        }
        if self.last < snapshot.top {
            // The read was cut short (its count); the rest comes by a fill.
            outcome.fill = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<String>);

    impl Sink for Recorder {
        fn deliver(&mut self, epoch: &Arc<str>, offset: u64, payload: &Bytes) {
            self.0.push(format!(
                "{epoch}:{offset}:{}",
                String::from_utf8_lossy(payload)
            ));
        }
        fn gap(&mut self) {
            self.0.push("gap".into());
        }
    }

    /// No entries.
    const NONE: std::ops::Range<u64> = 0..0;

    fn snapshot(epoch: Option<&str>, top: u64, offsets: impl Iterator<Item = u64>) -> Snapshot {
        Snapshot {
            epoch: epoch.map(Arc::from),
            top,
            entries: offsets.map(|o| (o, Bytes::from(format!("m{o}")))).collect(),
        }
    }

    fn synced(epoch: &str, last: u64) -> Cursor {
        let mut cursor = Cursor::new(300);
        cursor.apply(&snapshot(Some(epoch), last, NONE), &mut Recorder::default());
        cursor
    }

    fn live(cursor: &mut Cursor, sink: &mut Recorder, epoch: &str, offset: u64) -> Outcome {
        cursor.live(epoch, offset, Bytes::from(format!("m{offset}")), sink)
    }

    #[test]
    fn in_order_messages_are_delivered_and_duplicates_dropped() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        live(&mut cursor, &mut sink, "E", 6);
        live(&mut cursor, &mut sink, "E", 7);
        let outcome = live(&mut cursor, &mut sink, "E", 7);
        assert_eq!(outcome.duplicates, 1);
        assert_eq!(sink.0, ["E:6:m6", "E:7:m7"]);
        assert_eq!(cursor.position(), ("E".into(), 7));
    }

    #[test]
    fn a_hole_buffers_and_a_fill_closes_it_in_order() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        assert!(live(&mut cursor, &mut sink, "E", 8).fill);
        assert!(sink.0.is_empty());
        assert_eq!(cursor.begin_fill(), Some(6));
        // Live messages during the fill wait, then follow it.
        assert!(!live(&mut cursor, &mut sink, "E", 9).fill);
        let outcome = cursor.complete_fill(Some(&snapshot(Some("E"), 8, 6..=8)), &mut sink);
        assert_eq!(outcome.filled, 3);
        assert_eq!(outcome.duplicates, 1, "8 came from the stream and live");
        assert!(!outcome.fill);
        assert_eq!(sink.0, ["E:6:m6", "E:7:m7", "E:8:m8", "E:9:m9"]);
    }

    #[test]
    fn a_trimmed_range_or_too_many_missing_is_a_gap_then_the_top() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        cursor.begin_fill();
        cursor.complete_fill(Some(&snapshot(Some("E"), 20, 10..=20)), &mut sink);
        assert_eq!(sink.0, ["gap"]);
        assert_eq!(cursor.position(), ("E".into(), 20));

        let mut cursor = Cursor::new(3);
        cursor.apply(&snapshot(Some("E"), 5, NONE), &mut sink);
        sink.0.clear();
        cursor.begin_fill();
        cursor.complete_fill(Some(&snapshot(Some("E"), 9, 6..=9)), &mut sink);
        assert_eq!(sink.0, ["gap"], "4 missing, recover_max 3");
        assert_eq!(cursor.position(), ("E".into(), 9));
    }

    #[test]
    fn a_new_epoch_is_a_gap_and_restarts_the_offsets() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        live(&mut cursor, &mut sink, "F", 1);
        live(&mut cursor, &mut sink, "F", 2);
        assert_eq!(sink.0, ["gap", "F:1:m1", "F:2:m2"]);
        // A new epoch seen first by a fill.
        let mut sink = Recorder::default();
        cursor.begin_fill();
        cursor.complete_fill(Some(&snapshot(Some("G"), 2, 1..=2)), &mut sink);
        assert_eq!(sink.0, ["gap", "G:1:m1", "G:2:m2"]);
    }

    #[test]
    fn a_channel_without_history_adopts_its_first_epoch_without_a_gap() {
        let mut cursor = Cursor::new(300);
        let mut sink = Recorder::default();
        cursor.apply(&snapshot(None, 0, NONE), &mut sink);
        assert_eq!(cursor.position(), ("".into(), 0));
        live(&mut cursor, &mut sink, "E", 1);
        assert_eq!(sink.0, ["E:1:m1"]);
    }

    #[test]
    fn a_pause_freezes_the_cursor_until_the_last_join_resumes() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        assert_eq!(cursor.pause(), 5);
        assert_eq!(cursor.pause(), 5);
        live(&mut cursor, &mut sink, "E", 6);
        live(&mut cursor, &mut sink, "E", 7);
        assert_eq!(cursor.begin_fill(), None);
        assert!(sink.0.is_empty());
        cursor.resume(&mut sink);
        assert!(sink.0.is_empty(), "one join still holds it");
        let outcome = cursor.resume(&mut sink);
        assert_eq!(sink.0, ["E:6:m6", "E:7:m7"]);
        assert!(outcome.fill, "the refused fill is asked for again");
    }

    #[test]
    fn a_join_applies_its_read_while_paused() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        cursor.pause();
        live(&mut cursor, &mut sink, "E", 9);
        // The joiner read 6..=8; the node delivers them to its subscribers.
        cursor.apply(&snapshot(Some("E"), 8, 6..=8), &mut sink);
        assert_eq!(sink.0, ["E:6:m6", "E:7:m7", "E:8:m8"]);
        cursor.resume(&mut sink);
        assert_eq!(sink.0.last().unwrap(), "E:9:m9");
    }

    #[test]
    fn the_buffer_is_bounded_and_keeps_the_lowest_offsets() {
        let mut cursor = synced("E", 0);
        let mut sink = Recorder::default();
        cursor.pause();
        let mut overflowed = 0;
        for offset in (2..=(MAX_PENDING as u64 + 11)).rev() {
            overflowed += live(&mut cursor, &mut sink, "E", offset).overflowed;
        }
        assert_eq!(overflowed, 10);
        assert_eq!(cursor.pending_len(), MAX_PENDING);
        let outcome = cursor.resume(&mut sink);
        assert!(sink.0.is_empty(), "offset 1 is missing");
        assert!(outcome.fill);
        assert_eq!(cursor.begin_fill(), Some(1));
        let top = MAX_PENDING as u64 + 11;
        let outcome = cursor.complete_fill(Some(&snapshot(Some("E"), 1, 1..=1)), &mut sink);
        assert_eq!(sink.0.len(), MAX_PENDING + 1);
        assert!(outcome.fill, "the overflowed tail is fetched next");
        assert_eq!(cursor.begin_fill(), Some(MAX_PENDING as u64 + 2));
        cursor.complete_fill(
            Some(&snapshot(Some("E"), top, MAX_PENDING as u64 + 2..=top)),
            &mut sink,
        );
        let offsets: Vec<u64> = sink
            .0
            .iter()
            .map(|s| s.split(':').nth(1).unwrap().parse().unwrap())
            .collect();
        assert_eq!(offsets, (1..=top).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_fill_is_wanted_again() {
        let mut cursor = synced("E", 5);
        let mut sink = Recorder::default();
        live(&mut cursor, &mut sink, "E", 7);
        cursor.begin_fill();
        assert!(cursor.complete_fill(None, &mut sink).fill);
    }
}
