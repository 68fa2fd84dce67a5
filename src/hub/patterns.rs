//! Pattern subscriptions (`prices.*`), indexed so that a delivery does not
//! scan every pattern.
//!
//! Patterns are grouped by their literal prefix (the text before the first
//! `*`), and the index keeps the distinct prefix lengths. A channel is looked
//! up once per distinct length (`channel[..len]` in a hash map), and only the
//! patterns of the groups found are matched against it in full. With 10,000
//! patterns under a handful of prefix lengths, a delivery costs a handful of
//! hash lookups plus the matches of the patterns that share its prefix.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::channel::Pattern;
use crate::hub::{ConnectionId, Subscriber};

#[derive(Default)]
pub(super) struct Patterns {
    /// Pattern subscriptions by pattern text.
    entries: HashMap<Arc<str>, PatternEntry>,
    /// Pattern texts by literal prefix.
    by_prefix: HashMap<Box<str>, Vec<Arc<str>>>,
    /// Each distinct prefix length, with how many prefixes have it.
    lengths: BTreeMap<usize, usize>,
}

pub(super) struct PatternEntry {
    pub pattern: Pattern,
    /// The subscribers, shared with the deliveries in progress.
    pub subscribers: Arc<Vec<Subscriber>>,
    /// Each connection's index in `subscribers`.
    pub positions: HashMap<ConnectionId, usize>,
}

impl Patterns {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&PatternEntry> {
        self.entries.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.entries.keys()
    }

    /// The entry for `pattern`, made if new; the flag says it was made.
    pub fn entry(&mut self, pattern: &Pattern) -> (Arc<str>, &mut PatternEntry, bool) {
        if let Some((name, _)) = self.entries.get_key_value(pattern.as_str()) {
            let name = name.clone();
            let entry = self.entries.get_mut(&name).expect("just found");
            return (name, entry, false);
        }
        let name: Arc<str> = pattern.as_str().into();
        let prefix = pattern.literal_prefix();
        let group = self.by_prefix.entry(prefix.into()).or_default();
        if group.is_empty() {
            *self.lengths.entry(prefix.len()).or_default() += 1;
        }
        group.push(name.clone());
        let entry = self.entries.entry(name.clone()).or_insert(PatternEntry {
            pattern: pattern.clone(),
            subscribers: Arc::new(Vec::new()),
            positions: HashMap::new(),
        });
        (name, entry, true)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut PatternEntry> {
        self.entries.get_mut(name)
    }

    /// Removes an entry that has no subscribers left; returns its name.
    pub fn remove(&mut self, name: &str) -> Option<Arc<str>> {
        let (name, entry) = self.entries.remove_entry(name)?;
        let prefix = entry.pattern.literal_prefix();
        if let Some(group) = self.by_prefix.get_mut(prefix) {
            group.retain(|n| *n != name);
            if group.is_empty() {
                self.by_prefix.remove(prefix);
                if let Some(count) = self.lengths.get_mut(&prefix.len()) {
                    *count -= 1;
                    if *count == 0 {
                        self.lengths.remove(&prefix.len());
                    }
                }
            }
        }
        Some(name)
    }

    /// Every pattern matching `channel`, in name order.
    pub fn matching(&self, channel: &str) -> Vec<(&Arc<str>, &PatternEntry)> {
        let mut found = Vec::new();
        for &length in self.lengths.range(..=channel.len()).map(|(l, _)| l) {
            let Some(group) = channel
                .get(..length)
                .and_then(|prefix| self.by_prefix.get(prefix))
            else {
                continue;
            };
            for name in group {
                let entry = &self.entries[name];
                if entry.pattern.matches(channel) {
                    found.push((name, entry));
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(b.0));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_find_exactly_the_matching_patterns() {
        let mut patterns = Patterns::default();
        for text in ["prices.*", "prices.A*", "*", "news.*.eu", "other.*"] {
            patterns.entry(&Pattern::parse(text).unwrap());
        }
        fn names(patterns: &Patterns, channel: &str) -> Vec<String> {
            patterns
                .matching(channel)
                .iter()
                .map(|(name, _)| name.to_string())
                .collect()
        }
        assert_eq!(
            names(&patterns, "prices.AAPL"),
            ["*", "prices.*", "prices.A*"]
        );
        assert_eq!(names(&patterns, "prices.MSFT"), ["*", "prices.*"]);
        assert_eq!(names(&patterns, "news.x.eu"), ["*", "news.*.eu"]);
        assert_eq!(names(&patterns, "news.x.us"), ["*"]);
        patterns.remove("*");
        patterns.remove("prices.A*");
        assert_eq!(names(&patterns, "prices.AAPL"), ["prices.*"]);
        assert!(names(&patterns, "p").is_empty());
        assert_eq!(patterns.lengths.len(), 3, "{:?}", patterns.lengths);
    }
}
