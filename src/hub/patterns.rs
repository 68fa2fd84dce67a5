//! Pattern subscriptions (`prices.*`), indexed so that a delivery does not
//! scan every pattern.
//!
//! Patterns are grouped by their literal prefix (the text before the first
//! `*`), and within a prefix by their literal suffix (the text after the last
//! `*`); the index keeps the distinct prefix lengths, and each group its
//! distinct suffix lengths. A channel is looked up once per distinct prefix
//! length (`channel[..len]` in a hash map), then once per suffix length of
//! the group found, and only the patterns found so are matched against it in
//! full: those whose prefix and suffix it has. With 10,000 patterns, a
//! delivery costs a few hash lookups, not 10,000 matches (`benches/patterns.rs`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::channel::Pattern;
use crate::hub::{ConnectionId, Subscriber};

#[derive(Default)]
pub(super) struct Patterns {
    /// Pattern subscriptions by pattern text.
    entries: HashMap<Arc<str>, PatternEntry>,
    /// Pattern texts by literal prefix, then suffix.
    by_prefix: HashMap<Box<str>, PrefixGroup>,
    /// Each distinct prefix length, with how many prefixes have it.
    lengths: BTreeMap<usize, usize>,
}

#[derive(Default)]
struct PrefixGroup {
    /// Pattern texts by literal suffix.
    by_suffix: HashMap<Box<str>, Vec<Arc<str>>>,
    /// Each distinct suffix length, with how many suffixes have it.
    lengths: BTreeMap<usize, usize>,
}

impl PrefixGroup {
    fn is_empty(&self) -> bool {
        self.by_suffix.is_empty()
    }
}

/// The literal text after the last `*`.
fn literal_suffix(pattern: &Pattern) -> &str {
    let text = pattern.as_str();
    match text.rfind('*') {
        Some(star) => &text[star + 1..],
        None => "",
    }
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
        let suffix = literal_suffix(pattern);
        let names = group.by_suffix.entry(suffix.into()).or_default();
        if names.is_empty() {
            *group.lengths.entry(suffix.len()).or_default() += 1;
        }
        names.push(name.clone());
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
        let suffix = literal_suffix(&entry.pattern);
        if let Some(group) = self.by_prefix.get_mut(prefix) {
            if let Some(names) = group.by_suffix.get_mut(suffix) {
                names.retain(|n| *n != name);
                if names.is_empty() {
                    group.by_suffix.remove(suffix);
                    if let Some(count) = group.lengths.get_mut(&suffix.len()) {
                        *count -= 1;
                        if *count == 0 {
                            group.lengths.remove(&suffix.len());
                        }
                    }
                }
            }
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
            let rest = channel.len() - length;
            for &suffix_length in group.lengths.range(..=rest).map(|(l, _)| l) {
                let Some(names) = channel
                    .get(channel.len() - suffix_length..)
                    .and_then(|suffix| group.by_suffix.get(suffix))
                else {
                    continue;
                };
                for name in names {
                    let entry = &self.entries[name];
                    if entry.pattern.matches(channel) {
                        found.push((name, entry));
                    }
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
        for text in ["news.*.us", "news.*s", "news.a*b*s"] {
            patterns.entry(&Pattern::parse(text).unwrap());
        }
        assert_eq!(names(&patterns, "news.x.us"), ["*", "news.*.us", "news.*s"]);
        assert_eq!(
            names(&patterns, "news.abus"),
            ["*", "news.*s", "news.a*b*s"]
        );
        for text in ["news.*.us", "news.*s", "news.a*b*s"] {
            patterns.remove(text);
        }
        patterns.remove("*");
        patterns.remove("prices.A*");
        assert_eq!(names(&patterns, "prices.AAPL"), ["prices.*"]);
        assert!(names(&patterns, "p").is_empty());
        assert_eq!(patterns.lengths.len(), 3, "{:?}", patterns.lengths);
    }
}
