//! Loss accounting by offset on history channels, and what a subscriber
//! needs to resume one with `since`.
//!
//! herald numbers the messages of a history channel: within an epoch, each
//! message's offset is one more than the previous one's. The publisher learns
//! each measured message's offset from `herald_publish`'s or the API's answer
//! ([`crate::publisher::Position`]); the parent turns those into the ranges
//! of offsets every subscriber of the channel must receive
//! ([`expected_ranges`]). Each subscriber records every `(epoch, offset)` it
//! receives ([`OffsetTracker`]), across its reconnections, and at the end
//! counts the offsets of those ranges it never received, the ones it
//! received twice, and the ones that came after a higher offset of the same
//! epoch or after a later epoch ([`analyse`]).
//!
//! This does not rely on the sequence numbers the tool puts in payloads; it
//! checks the gateway's own promise: every offset exactly once, in order.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::publisher::Record;
use crate::stats::{Micros, Reasons};

/// The widest span of offsets one epoch's bitset covers (8 MiB of bits);
/// offsets further from the first one seen are ignored and counted.
const MAX_SPAN: u64 = 1 << 26;

/// The offsets of one epoch that subscribers of a channel must receive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpectedRange {
    pub epoch: String,
    /// The first and last offset, inclusive.
    pub first: u64,
    pub last: u64,
}

impl ExpectedRange {
    pub fn len(&self) -> u64 {
        self.last + 1 - self.first
    }
}

/// The ranges of offsets that the measured publishes of one channel landed
/// in (`records` from the first measured one on), one per epoch in the order
/// they were used.
///
/// Every offset between the lowest and the highest of an epoch counts, even
/// one whose publish failed after it was sent: offsets are consecutive, so
/// it ran after all. Publishes without a position (refused, failed, or to a
/// channel without history) add nothing.
pub fn expected_ranges<'a>(records: impl IntoIterator<Item = &'a Record>) -> Vec<ExpectedRange> {
    let mut ranges: Vec<ExpectedRange> = Vec::new();
    for record in records {
        let Some(position) = &record.position else {
            continue;
        };
        match ranges.last_mut() {
            Some(range) if range.epoch == *position.epoch => {
                range.first = range.first.min(position.offset);
                range.last = range.last.max(position.offset);
            }
            _ => ranges.push(ExpectedRange {
                epoch: position.epoch.to_string(),
                first: position.offset,
                last: position.offset,
            }),
        }
    }
    ranges
}

/// What one received offset turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetArrival {
    /// New, and after every earlier arrival: the same epoch's offsets were
    /// all lower, or its epoch is new.
    InOrder,
    /// New, but a higher offset of its epoch, or a later epoch, came first.
    OutOfOrder,
    /// Received before.
    Duplicate,
    /// Too far from the other offsets of its epoch to be tracked.
    Ignored,
}

/// The offsets one subscriber received, per epoch.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Every epoch seen, in the order first seen.
    epochs: Vec<EpochSeen>,
    /// The epoch of the latest arrival in order: later arrivals in an
    /// earlier epoch are out of order.
    current: Option<usize>,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Offsets too far from the rest of their epoch to be tracked.
    pub ignored: u64,
}

#[derive(Debug)]
struct EpochSeen {
    epoch: Box<str>,
    /// The offset of bit 0 of `seen`, a multiple of 64.
    base: u64,
    /// Bit `n` is set once offset `base + n` arrived.
    seen: Vec<u64>,
    /// The highest offset that arrived.
    highest: u64,
}

impl EpochSeen {
    fn new(epoch: &str, offset: u64) -> EpochSeen {
        EpochSeen {
            epoch: epoch.into(),
            base: offset - offset % 64,
            seen: Vec::new(),
            highest: offset,
        }
    }

    /// Marks `offset`; returns whether it was already marked, or `None` when
    /// it is out of the trackable span.
    fn mark(&mut self, offset: u64) -> Option<bool> {
        if offset < self.base {
            let new_base = offset - offset % 64;
            let span = self.base - new_base + self.seen.len() as u64 * 64;
            if span > MAX_SPAN {
                return None;
            }
            let words = ((self.base - new_base) / 64) as usize;
            self.seen.splice(0..0, std::iter::repeat_n(0, words));
            self.base = new_base;
        } else if offset - self.base >= MAX_SPAN {
            return None;
        }
        let bit = offset - self.base;
        let word = (bit / 64) as usize;
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        let mask = 1u64 << (bit % 64);
        let before = self.seen[word] & mask != 0;
        self.seen[word] |= mask;
        Some(before)
    }

    /// How many offsets in `first..=last` arrived, counted a word at a time.
    fn present_in(&self, first: u64, last: u64) -> u64 {
        let from = first.max(self.base);
        let to = last
            .saturating_add(1)
            .min(self.base + self.seen.len() as u64 * 64);
        let mut present = 0;
        let mut offset = from;
        while offset < to {
            let bit = offset - self.base;
            let word = bit / 64;
            let first_bit = bit % 64;
            let end_bit = (to - self.base - word * 64).min(64);
            let upper = if end_bit == 64 {
                u64::MAX
            } else {
                (1u64 << end_bit) - 1
            };
            let mask = upper & (u64::MAX << first_bit);
            present += u64::from((self.seen[word as usize] & mask).count_ones());
            offset = self.base + word * 64 + end_bit;
        }
        present
    }
}

impl OffsetTracker {
    pub fn observe(&mut self, epoch: &str, offset: u64) -> OffsetArrival {
        let (index, new_epoch) = match self.epochs.iter().position(|seen| *seen.epoch == *epoch) {
            Some(index) => (index, false),
            None => {
                self.epochs.push(EpochSeen::new(epoch, offset));
                (self.epochs.len() - 1, true)
            }
        };
        let seen = &mut self.epochs[index];
        let Some(before) = seen.mark(offset) else {
            self.ignored += 1;
            return OffsetArrival::Ignored;
        };
        if before {
            self.duplicates += 1;
            return OffsetArrival::Duplicate;
        }
        // A new epoch begins after every earlier one; within the current
        // epoch, each offset must top the last.
        let in_order = new_epoch || (self.current == Some(index) && offset > seen.highest);
        if !in_order {
            self.out_of_order += 1;
            return OffsetArrival::OutOfOrder;
        }
        seen.highest = offset;
        self.current = Some(index);
        OffsetArrival::InOrder
    }

    /// Where the subscriber stands: the latest epoch that arrived in order
    /// and its highest offset. What a resume sends as `since`.
    pub fn position(&self) -> Option<(&str, u64)> {
        let seen = &self.epochs[self.current?];
        Some((&seen.epoch, seen.highest))
    }

    /// Epochs seen.
    pub fn epochs(&self) -> usize {
        self.epochs.len()
    }

    /// How many offsets of `range` never arrived.
    pub fn missing_in(&self, range: &ExpectedRange) -> u64 {
        let present = self
            .epochs
            .iter()
            .find(|seen| *seen.epoch == *range.epoch)
            .map_or(0, |seen| seen.present_in(range.first, range.last));
        range.len() - present
    }
}

/// One subscriber's offsets judged against its channel's expected ranges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffsetLoss {
    /// Offsets in the expected ranges.
    pub expected: u64,
    /// Of those, never received.
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
}

pub fn analyse(tracker: &OffsetTracker, ranges: &[ExpectedRange]) -> OffsetLoss {
    OffsetLoss {
        expected: ranges.iter().map(ExpectedRange::len).sum(),
        missing: ranges.iter().map(|range| tracker.missing_in(range)).sum(),
        duplicates: tracker.duplicates,
        out_of_order: tracker.out_of_order,
    }
}

/// A channel's entry in a subscribe reply's `positions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyPosition {
    pub epoch: String,
    /// The channel's top when the client subscribed.
    pub offset: u64,
    /// Present for channels named in `since`.
    pub recovered: Option<bool>,
    /// Why not, when `recovered` is false.
    pub reason: Option<String>,
}

/// Reads `positions.<channel>` from a subscribe reply; `None` when the reply
/// is not JSON or has no position for the channel.
pub fn reply_position(reply: &[u8], channel: &str) -> Option<ReplyPosition> {
    let reply: Value = serde_json::from_slice(reply).ok()?;
    let position = reply.get("positions")?.get(channel)?;
    Some(ReplyPosition {
        epoch: position.get("epoch")?.as_str()?.to_owned(),
        offset: position.get("offset")?.as_u64()?,
        recovered: position.get("recovered").and_then(Value::as_bool),
        reason: position
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

/// herald's subscribe request for `channel` resuming after `offset` of `epoch`.
pub fn resume_frame(channel: &str, epoch: &str, offset: u64) -> String {
    serde_json::json!({
        "op": "subscribe",
        "id": 1,
        "channels": [channel],
        "since": {channel: {"offset": offset, "epoch": epoch}},
    })
    .to_string()
}

/// The history accounting of a group's reading subscribers, or of all.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HistoryStats {
    /// Subscribers accounted.
    pub subscribers: u64,
    /// Offsets they had to receive, summed over them.
    pub expected: u64,
    pub missing: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Deliveries without an offset and epoch (a raw `PUBLISH` to a history
    /// channel, or a channel without history).
    pub unsequenced: u64,
    /// Offsets too far apart to be tracked.
    pub ignored: u64,
    /// Subscribers with something missing, duplicated or out of order.
    pub subscribers_with_loss: u64,
    pub max_missing_per_subscriber: u64,
    /// Subscribers that saw more than one epoch.
    pub subscribers_with_epoch_change: u64,
    /// Disconnections the tool made itself (`--reconnect-fraction`).
    pub forced_disconnects: u64,
    /// Resubscriptions with `since` that were confirmed.
    pub resumes: u64,
    /// Of those, answered `recovered: true`.
    pub recovered: u64,
    /// Answered `recovered: false`, by `reason`.
    pub not_recovered: Reasons,
    /// Resubscriptions without `since`: no position was known yet.
    pub resubscribed_plain: u64,
    /// Messages that arrived as recoveries (offsets up to the reply's top).
    pub recovered_messages: u64,
    /// What the recovered replies promised: the reply's offset minus `since`'s.
    pub promised_messages: u64,
    /// Reconnection attempts that failed (retried), by reason.
    pub resume_failures: Reasons,
    /// From a disconnection to the reply of the resubscription.
    pub resume_time: Micros,
}

impl HistoryStats {
    /// Adds one subscriber's accounting.
    pub fn add(&mut self, loss: &OffsetLoss, tracker: &OffsetTracker) {
        self.subscribers += 1;
        self.expected += loss.expected;
        self.missing += loss.missing;
        self.duplicates += loss.duplicates;
        self.out_of_order += loss.out_of_order;
        self.ignored += tracker.ignored;
        self.subscribers_with_loss +=
            u64::from(loss.missing + loss.duplicates + loss.out_of_order > 0);
        self.max_missing_per_subscriber = self.max_missing_per_subscriber.max(loss.missing);
        self.subscribers_with_epoch_change += u64::from(tracker.epochs() > 1);
    }

    pub fn merge(&mut self, other: &HistoryStats) {
        self.subscribers += other.subscribers;
        self.expected += other.expected;
        self.missing += other.missing;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.unsequenced += other.unsequenced;
        self.ignored += other.ignored;
        self.subscribers_with_loss += other.subscribers_with_loss;
        self.max_missing_per_subscriber = self
            .max_missing_per_subscriber
            .max(other.max_missing_per_subscriber);
        self.subscribers_with_epoch_change += other.subscribers_with_epoch_change;
        self.forced_disconnects += other.forced_disconnects;
        self.resumes += other.resumes;
        self.recovered += other.recovered;
        self.not_recovered.merge(&other.not_recovered);
        self.resubscribed_plain += other.resubscribed_plain;
        self.recovered_messages += other.recovered_messages;
        self.promised_messages += other.promised_messages;
        self.resume_failures.merge(&other.resume_failures);
        self.resume_time.merge(&other.resume_time);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::publisher::{Fate, Position};

    fn tracker(arrivals: &[(&str, u64)]) -> (OffsetTracker, Vec<OffsetArrival>) {
        let mut tracker = OffsetTracker::default();
        let kinds = arrivals
            .iter()
            .map(|&(epoch, offset)| tracker.observe(epoch, offset))
            .collect();
        (tracker, kinds)
    }

    fn range(epoch: &str, first: u64, last: u64) -> ExpectedRange {
        ExpectedRange {
            epoch: epoch.to_owned(),
            first,
            last,
        }
    }

    fn check(arrivals: &[(&str, u64)], ranges: &[ExpectedRange], expected: OffsetLoss) {
        let (tracker, _) = tracker(arrivals);
        assert_eq!(analyse(&tracker, ranges), expected, "{arrivals:?}");
    }

    use OffsetArrival::{Duplicate, InOrder, OutOfOrder};

    #[test]
    fn arrivals_are_in_order_duplicated_or_late() {
        let (tracker, kinds) = tracker(&[
            ("A", 5),
            ("A", 6),
            ("A", 8),
            ("A", 7),
            ("A", 8),
            ("A", 9),
            ("B", 1),
            ("A", 10),
            ("B", 2),
            ("B", 1),
        ]);
        assert_eq!(
            kinds,
            [
                InOrder, InOrder, InOrder, OutOfOrder, Duplicate, InOrder,
                // A new epoch, then a late one from the old epoch.
                InOrder, OutOfOrder, InOrder, Duplicate,
            ]
        );
        assert_eq!((tracker.duplicates, tracker.out_of_order), (2, 2));
        assert_eq!(tracker.position(), Some(("B", 2)));
        assert_eq!(tracker.epochs(), 2);
    }

    #[test]
    fn an_exact_run_loses_nothing() {
        let arrivals: Vec<(&str, u64)> = (1..=300).map(|offset| ("E", offset)).collect();
        // Offsets 1..=100 were the warm-up: not expected, received anyway.
        check(
            &arrivals,
            &[range("E", 101, 300)],
            OffsetLoss {
                expected: 200,
                ..OffsetLoss::default()
            },
        );
    }

    #[test]
    fn missing_offsets_are_counted_in_every_range() {
        // 103 and 150..=199 never arrived; the new epoch lacks its 1.
        let arrivals: Vec<(&str, u64)> = (100..=300)
            .filter(|offset| *offset != 103 && !(150..200).contains(offset))
            .map(|offset| ("E", offset))
            .chain((2..=10).map(|offset| ("F", offset)))
            .collect();
        check(
            &arrivals,
            &[range("E", 101, 300), range("F", 1, 10)],
            OffsetLoss {
                expected: 210,
                missing: 1 + 50 + 1,
                ..OffsetLoss::default()
            },
        );
        // An epoch never seen is missing entirely.
        check(
            &[("E", 1)],
            &[range("G", 1, 64)],
            OffsetLoss {
                expected: 64,
                missing: 64,
                ..OffsetLoss::default()
            },
        );
    }

    #[test]
    fn offsets_below_the_first_one_seen_are_tracked() {
        // 200 arrives first, then 3 (far below, another bitset word) and 130.
        let (tracker, kinds) = tracker(&[("E", 200), ("E", 3), ("E", 130), ("E", 3)]);
        assert_eq!(kinds, [InOrder, OutOfOrder, OutOfOrder, Duplicate]);
        assert_eq!(tracker.missing_in(&range("E", 1, 200)), 200 - 3);
        assert_eq!(tracker.missing_in(&range("E", 3, 3)), 0);
        assert_eq!(tracker.missing_in(&range("E", 201, 260)), 60);
        assert_eq!(tracker.position(), Some(("E", 200)));
    }

    #[test]
    fn wild_offsets_are_ignored_not_allocated() {
        let (tracker, kinds) = tracker(&[("E", 1), ("E", 1 << 40), ("E", 2)]);
        assert_eq!(kinds, [InOrder, OffsetArrival::Ignored, InOrder]);
        assert_eq!(tracker.ignored, 1);
        assert_eq!(tracker.position(), Some(("E", 2)));
    }

    #[test]
    fn ranges_come_from_the_positions_of_measured_publishes() {
        let epoch = |text: &str| -> Arc<str> { text.into() };
        let record = |position: Option<(&Arc<str>, u64)>| Record {
            fate: Fate::Accepted { receivers: None },
            settled_at_unix_nanos: 0,
            position: position.map(|(epoch, offset)| Position {
                epoch: epoch.clone(),
                offset,
            }),
        };
        let (a, b) = (epoch("A"), epoch("B"));
        let records = [
            record(Some((&a, 11))),
            // An uncertain publish that ran: its offset is still expected.
            Record {
                fate: Fate::Uncertain,
                ..Record::default()
            },
            record(Some((&a, 13))),
            record(None),
            record(Some((&b, 1))),
            record(Some((&b, 2))),
        ];
        assert_eq!(
            expected_ranges(&records),
            [range("A", 11, 13), range("B", 1, 2)]
        );
        assert!(expected_ranges(&records[3..4]).is_empty());
    }

    #[test]
    fn reply_positions_and_resume_requests() {
        let reply = br#"{"type":"reply","id":1,"channels":["n"],"errors":[],"positions":{"n":{"offset":45,"epoch":"Kx3d","recovered":false,"reason":"trimmed"}}}"#;
        assert_eq!(
            reply_position(reply, "n"),
            Some(ReplyPosition {
                epoch: "Kx3d".to_owned(),
                offset: 45,
                recovered: Some(false),
                reason: Some("trimmed".to_owned()),
            })
        );
        assert_eq!(reply_position(reply, "other"), None);
        assert_eq!(
            reply_position(br#"{"type":"reply","id":1,"channels":["n"]}"#, "n"),
            None
        );
        let first = br#"{"positions":{"n":{"offset":0,"epoch":""}}}"#;
        assert_eq!(reply_position(first, "n").unwrap().recovered, None);
        let frame: Value = serde_json::from_str(&resume_frame("n", "Kx3d", 41)).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"op": "subscribe", "id": 1, "channels": ["n"],
                               "since": {"n": {"offset": 41, "epoch": "Kx3d"}}})
        );
    }
}
