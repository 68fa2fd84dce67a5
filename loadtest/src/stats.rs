//! Measurement primitives: histograms that travel between processes, counts
//! by reason, and per-subscriber sequence tracking.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use serde::{
    Deserialize, Deserializer as SerdeDeserializer, Serialize, Serializer as SerdeSerializer,
};

/// The largest duration a histogram records, in microseconds (one hour).
/// Larger values are clamped to it.
const HIGHEST_MICROS: u64 = 3_600_000_000;

/// A histogram of durations in microseconds with 3 significant digits.
///
/// It serializes as base64 of HdrHistogram's V2 encoding, which is how
/// workers hand their histograms to the parent for merging.
#[derive(Debug, Clone)]
pub struct Micros(Histogram<u64>);

impl Default for Micros {
    fn default() -> Self {
        Micros(
            Histogram::new_with_bounds(1, HIGHEST_MICROS, 3)
                .expect("the histogram bounds are constants and valid"),
        )
    }
}

impl Micros {
    /// Records one duration; zero and negative durations count as 1 µs.
    pub fn record_micros(&mut self, micros: i64) {
        let value = u64::try_from(micros).unwrap_or(0).clamp(1, HIGHEST_MICROS);
        self.0.saturating_record(value);
    }

    pub fn record(&mut self, duration: Duration) {
        self.record_micros(i64::try_from(duration.as_micros()).unwrap_or(i64::MAX));
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Micros) {
        // Both sides have the same fixed bounds, so this cannot fail; saturate anyway.
        if self.0.add(&other.0).is_err() {
            for value in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(value.value_iterated_to(), value.count_at_value());
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    /// The value at `quantile` (0.0 to 1.0) in milliseconds; 0 when empty.
    pub fn quantile_ms(&self, quantile: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// The `rank`-th smallest value (1-based) in milliseconds; `None` when
    /// fewer values were recorded.
    pub fn rank_ms(&self, rank: u64) -> Option<f64> {
        let count = self.count();
        if rank == 0 || rank > count {
            return None;
        }
        // Half a rank below, so that rounding up inside the histogram lands on `rank`.
        let quantile = (rank as f64 - 0.5) / count as f64;
        Some(self.0.value_at_quantile(quantile) as f64 / 1000.0)
    }

    pub fn max_ms(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.max() as f64 / 1000.0
    }

    /// p50, p90, p99, p99.9 and max, in milliseconds.
    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            count: self.count(),
            p50: self.quantile_ms(0.50),
            p90: self.quantile_ms(0.90),
            p99: self.quantile_ms(0.99),
            p999: self.quantile_ms(0.999),
            max: self.max_ms(),
        }
    }
}

impl Serialize for Micros {
    fn serialize<S: SerdeSerializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.0, &mut bytes)
            .map_err(serde::ser::Error::custom)?;
        serializer.serialize_str(&BASE64.encode(bytes))
    }
}

impl<'de> Deserialize<'de> for Micros {
    fn deserialize<D: SerdeDeserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let bytes = BASE64.decode(text).map_err(serde::de::Error::custom)?;
        let decoded: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(serde::de::Error::custom)?;
        // Re-record into the standard bounds so merges never fail.
        let mut histogram = Micros::default();
        for value in decoded.iter_recorded() {
            histogram
                .0
                .saturating_record_n(value.value_iterated_to(), value.count_at_value());
        }
        Ok(histogram)
    }
}

/// Latency quantiles in milliseconds, as they appear in reports.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LatencySummary {
    /// How many values were recorded.
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Event counts keyed by a short reason such as `http 429` or `closed 4002`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Reasons(BTreeMap<String, u64>);

impl Reasons {
    pub fn add(&mut self, reason: impl Into<String>) {
        self.add_count(reason, 1);
    }

    pub fn add_count(&mut self, reason: impl Into<String>, count: u64) {
        if count > 0 {
            *self.0.entry(reason.into()).or_default() += count;
        }
    }

    pub fn merge(&mut self, other: &Reasons) {
        for (reason, count) in &other.0 {
            *self.0.entry(reason.clone()).or_default() += count;
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// The count for one reason.
    pub fn count(&self, reason: &str) -> u64 {
        self.0.get(reason).copied().unwrap_or(0)
    }

    /// `reason: count` pairs joined by commas, or `none`.
    pub fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".to_owned();
        }
        self.0
            .iter()
            .map(|(reason, count)| format!("{reason}: {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// What one received sequence number turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// Seen for the first time, and higher than every number seen before.
    InOrder,
    /// Seen for the first time, but after a higher number.
    OutOfOrder,
    /// Seen before.
    Duplicate,
}

/// Tracks the sequence numbers one subscriber received on its channel.
///
/// A bitset (one bit per sequence number) tells duplicates from late
/// arrivals exactly, and at the end the unset bits below the published count
/// are the missing messages, whether lost in the middle or never delivered.
#[derive(Debug, Default)]
pub struct SeqTracker {
    /// Bit `n` is set once sequence number `n` arrived.
    seen: Vec<u64>,
    /// The highest number seen so far, for out-of-order detection.
    highest: Option<u64>,
    pub duplicates: u64,
    pub out_of_order: u64,
}

impl SeqTracker {
    /// Sequence numbers from here up are ignored (by the caller) so that a
    /// garbage frame cannot make the bitset allocate more than 8 MiB.
    pub const MAX_SEQ: u64 = 1 << 26;

    pub fn observe(&mut self, seq: u64) -> Arrival {
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if word >= self.seen.len() {
            self.seen.resize(word + 1, 0);
        }
        if self.seen[word] & bit != 0 {
            self.duplicates += 1;
            return Arrival::Duplicate;
        }
        self.seen[word] |= bit;
        match self.highest {
            Some(highest) if seq < highest => {
                self.out_of_order += 1;
                Arrival::OutOfOrder
            }
            _ => {
                self.highest = Some(seq);
                Arrival::InOrder
            }
        }
    }

    /// Whether `seq` arrived.
    pub fn has(&self, seq: u64) -> bool {
        self.seen
            .get((seq / 64) as usize)
            .is_some_and(|word| word & (1u64 << (seq % 64)) != 0)
    }

    /// The highest number that arrived, if any did.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// How many numbers in `from..to` never arrived.
    pub fn missing_in(&self, from: u64, to: u64) -> u64 {
        to.saturating_sub(from) - self.present_in(from, to)
    }

    /// How many numbers in `from..to` arrived, counted a word at a time.
    fn present_in(&self, from: u64, to: u64) -> u64 {
        let mut present = 0;
        let mut seq = from;
        while seq < to {
            let word = seq / 64;
            let first_bit = seq % 64;
            let end_bit = (to - word * 64).min(64);
            let upper = if end_bit == 64 {
                u64::MAX
            } else {
                (1u64 << end_bit) - 1
            };
            let mask = upper & (u64::MAX << first_bit);
            let bits = self.seen.get(word as usize).copied().unwrap_or(0);
            present += u64::from((bits & mask).count_ones());
            seq = word * 64 + end_bit;
        }
        present
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_survive_serialization_and_merge() {
        let mut first = Micros::default();
        for micros in 1..=1000 {
            first.record_micros(micros);
        }
        let text = serde_json::to_string(&first).unwrap();
        let mut decoded: Micros = serde_json::from_str(&text).unwrap();
        assert_eq!(decoded.count(), 1000);
        let mut second = Micros::default();
        second.record(Duration::from_secs(2));
        second.record_micros(-5);
        decoded.merge(&second);
        assert_eq!(decoded.count(), 1002);
        assert!((decoded.max_ms() - 2000.0).abs() < 2.0);
        assert!((decoded.quantile_ms(0.5) - 0.5).abs() < 0.01);
        assert_eq!(decoded.rank_ms(1), Some(0.001));
        assert_eq!(decoded.rank_ms(1000), Some(0.999));
        assert_eq!(decoded.rank_ms(1003), None);
        assert_eq!(decoded.rank_ms(0), None);
    }

    #[test]
    fn sequence_tracking_tells_gaps_duplicates_and_reordering_apart() {
        let mut tracker = SeqTracker::default();
        let arrivals: Vec<Arrival> = [0, 1, 3, 2, 3, 70, 5]
            .into_iter()
            .map(|seq| tracker.observe(seq))
            .collect();
        assert_eq!(
            arrivals,
            [
                Arrival::InOrder,
                Arrival::InOrder,
                Arrival::InOrder,
                Arrival::OutOfOrder,
                Arrival::Duplicate,
                Arrival::InOrder,
                Arrival::OutOfOrder,
            ]
        );
        assert_eq!(tracker.duplicates, 1);
        assert_eq!(tracker.out_of_order, 2);
        assert!(tracker.has(70) && tracker.has(0) && !tracker.has(4) && !tracker.has(1000));
        assert_eq!(tracker.highest(), Some(70));
        // 0..80 published: 4 and 6..=69 and 71..80 never arrived.
        assert_eq!(tracker.missing_in(0, 80), 1 + 64 + 9);
        // Warm-up numbers below 2 are left out.
        assert_eq!(tracker.missing_in(2, 80), 1 + 64 + 9);
        assert_eq!(tracker.missing_in(0, 4), 0);
        assert_eq!(tracker.missing_in(64, 128), 63);
        assert_eq!(tracker.missing_in(5, 5), 0);
    }

    #[test]
    fn reasons_merge_and_describe() {
        let mut reasons = Reasons::default();
        reasons.add("http 429");
        reasons.add("timeout");
        let mut other = Reasons::default();
        other.add("http 429");
        reasons.merge(&other);
        assert_eq!(reasons.total(), 3);
        assert_eq!(reasons.describe(), "http 429: 2, timeout: 1");
        assert_eq!(Reasons::default().describe(), "none");
    }
}
