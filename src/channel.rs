//! Channel names and channel patterns. Pure: no I/O.
//!
//! A channel name is 1 to [`MAX_CHANNEL_LEN`] bytes of ASCII letters, digits and
//! `. _ - : @ / =`. The character set leaves out `*` (the pattern wildcard),
//! quotes and backslashes (so names never need escaping in JSON), whitespace and
//! anything outside ASCII.
//!
//! A pattern is a channel name in which `*` matches any run of characters,
//! including an empty run and including dots, as in Redis glob patterns:
//! `prices.*` matches `prices.AAPL` and `prices.us.AAPL`, `*` matches everything.

use std::fmt;

/// The longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name contains a character outside A-Z a-z 0-9 . _ - : @ / =")]
    BadCharacter,
}

/// Checks a client-visible channel name.
pub fn validate_name(name: &str) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelNameError::TooLong);
    }
    if !name.bytes().all(is_name_byte) {
        return Err(ChannelNameError::BadCharacter);
    }
    Ok(())
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-' | b':' | b'@' | b'/' | b'=')
}

/// A channel pattern such as `prices.*`.
#[derive(Clone, PartialEq, Eq)]
pub struct Pattern(Box<str>);

impl Pattern {
    /// Parses a pattern: a channel name that may also contain `*`.
    pub fn parse(text: &str) -> Result<Pattern, ChannelNameError> {
        if text.is_empty() {
            return Err(ChannelNameError::Empty);
        }
        if text.len() > MAX_CHANNEL_LEN {
            return Err(ChannelNameError::TooLong);
        }
        if !text.bytes().all(|b| b == b'*' || is_name_byte(b)) {
            return Err(ChannelNameError::BadCharacter);
        }
        Ok(Pattern(text.into()))
    }

    /// Whether `channel` matches this pattern.
    pub fn matches(&self, channel: &str) -> bool {
        glob_match(self.0.as_bytes(), channel.as_bytes())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern has a wildcard (else it names one channel).
    pub fn is_wildcard(&self) -> bool {
        self.0.contains('*')
    }

    /// The literal text before the first `*`: every channel the pattern
    /// matches starts with it.
    pub fn literal_prefix(&self) -> &str {
        match self.0.find('*') {
            Some(star) => &self.0[..star],
            None => &self.0,
        }
    }

    /// Whether every channel `other` can match is matched by this pattern.
    ///
    /// Exact: `other`'s `*`s are replaced by a byte no pattern contains, and
    /// this pattern matches the result only if its own `*`s absorb each of
    /// them, which is when any text in their place matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        let text: Vec<u8> = other
            .0
            .bytes()
            .map(|b| if b == b'*' { 0x01 } else { b })
            .collect();
        glob_match(self.0.as_bytes(), &text)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Glob matching with `*` as the only wildcard, in linear time: on a mismatch the
/// last `*` absorbs one more byte, so no input makes it backtrack exponentially.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// The placeholder for the token's subject in `auth.user_channels`.
pub const SUBJECT_PLACEHOLDER: &str = "{sub}";

/// Characters that separate the segments of a channel name.
const SEPARATORS: &[u8] = b".:/";

/// Why a `{sub}` template was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("`{{sub}}` must be a whole segment, between `.`, `:`, `/` or the ends")]
    PartialSegment,
    #[error("`*` may not come before `{{sub}}`: the subject's position must be fixed")]
    WildcardBeforeSubject,
    #[error("{0}")]
    Pattern(#[from] ChannelNameError),
}

/// A per-user grant such as `user.{sub}.*`.
///
/// The rule that makes it exact: the subject is escaped so that it contains no
/// separator (`.`, `:`, `/`), `*` or `=` ([`escape_subject`]); `{sub}` must be a
/// whole segment; and no `*` may come before it. Then the literal text before
/// `{sub}` fixes where the subject starts, the next separator where it ends, and
/// a channel matches the template of at most one subject: with `user.{sub}.*`,
/// `alice` is granted `user.alice.inbox` but never `user.alice=2Ebob.inbox`,
/// which is the channel of `alice.bob`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubjectTemplate(Box<str>);

impl SubjectTemplate {
    pub fn parse(text: &str) -> Result<SubjectTemplate, TemplateError> {
        Pattern::parse(&text.replace(SUBJECT_PLACEHOLDER, "x"))?;
        let bytes = text.as_bytes();
        for (start, _) in text.match_indices(SUBJECT_PLACEHOLDER) {
            let end = start + SUBJECT_PLACEHOLDER.len();
            let bounded_before = start == 0 || SEPARATORS.contains(&bytes[start - 1]);
            let bounded_after = end == bytes.len() || SEPARATORS.contains(&bytes[end]);
            if !bounded_before || !bounded_after {
                return Err(TemplateError::PartialSegment);
            }
            if text[..start].contains('*') {
                return Err(TemplateError::WildcardBeforeSubject);
            }
        }
        Ok(SubjectTemplate(text.into()))
    }

    /// The pattern for `subject`, or `None` when the subject is empty or the
    /// result would be longer than [`MAX_CHANNEL_LEN`].
    pub fn instantiate(&self, subject: &str) -> Option<Pattern> {
        if subject.is_empty() {
            return None;
        }
        Pattern::parse(
            &self
                .0
                .replace(SUBJECT_PLACEHOLDER, &escape_subject(subject)),
        )
        .ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Escapes a token subject for use as one channel segment: ASCII letters,
/// digits, `_`, `-` and `@` stay as they are; every other byte of its UTF-8
/// form becomes `=XX` (two upper-case hex digits). The escape is injective and
/// its output never contains a separator or `*`. Backends that publish to a
/// user's channel apply the same function: `alice.b@x.io` → `alice=2Eb@x=2Eio`.
pub fn escape_subject(subject: &str) -> String {
    let mut escaped = String::with_capacity(subject.len());
    for byte in subject.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'@') {
            escaped.push(char::from(byte));
        } else {
            escaped.push_str(&format!("={byte:02X}"));
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, channel: &str, expected: bool) {
        let parsed = Pattern::parse(pattern).unwrap();
        assert_eq!(parsed.matches(channel), expected, "{pattern} ~ {channel}");
    }

    #[test]
    fn glob_patterns() {
        check("prices.*", "prices.AAPL", true);
        check("prices.*", "prices.us.AAPL", true);
        check("prices.*", "prices.", true);
        check("prices.*", "prices", false);
        check("prices.*", "xprices.AAPL", false);
        check("*", "anything.at:all", true);
        check("news", "news", true);
        check("news", "news2", false);
        check("a*b*c", "aXXbYYc", true);
        check("a*b*c", "aXXbYY", false);
        check("user.*.inbox", "user.42.inbox", true);
        check("user.*.inbox", "user.42.outbox", false);
        check("**", "", true);
        check("a*", "a", true);
    }

    #[test]
    fn coverage_of_one_pattern_by_another() {
        let check = |grant: &str, pattern: &str, expected: bool| {
            let (grant, pattern) = (
                Pattern::parse(grant).unwrap(),
                Pattern::parse(pattern).unwrap(),
            );
            assert_eq!(grant.covers(&pattern), expected, "{grant} covers {pattern}");
        };
        check("prices.*", "prices.*", true);
        check("prices.*", "prices.A*", true);
        check("prices.A*", "prices.*", false);
        check("*", "anything.*.x", true);
        check("prices.*", "prices", false);
        check("prices.*.x", "prices.*", false);
        check("a*b", "a*", false);
        check("a*", "a*b", true);
        check("a*b*c", "a*b*c", true);
        check("a*c", "a*b*c", true);
        check("news", "news", true);
        check("news", "news*", false);
        assert_eq!(
            Pattern::parse("prices.A*").unwrap().literal_prefix(),
            "prices.A"
        );
        assert!(!Pattern::parse("news").unwrap().is_wildcard());
    }

    #[test]
    fn names() {
        assert_eq!(validate_name("prices.AAPL"), Ok(()));
        assert_eq!(validate_name("user:42/inbox@eu=1_x-y"), Ok(()));
        assert_eq!(validate_name(""), Err(ChannelNameError::Empty));
        assert_eq!(validate_name("a b"), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_name("a*"), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_name("q\"x"), Err(ChannelNameError::BadCharacter));
        assert_eq!(validate_name("é"), Err(ChannelNameError::BadCharacter));
        assert_eq!(
            validate_name(&"x".repeat(MAX_CHANNEL_LEN + 1)),
            Err(ChannelNameError::TooLong)
        );
        assert_eq!(validate_name(&"x".repeat(MAX_CHANNEL_LEN)), Ok(()));
    }

    fn grants(template: &str, subject: &str, channel: &str) -> bool {
        SubjectTemplate::parse(template)
            .unwrap()
            .instantiate(subject)
            .is_some_and(|pattern| pattern.matches(channel))
    }

    #[test]
    fn a_substituted_subject_matches_only_itself() {
        let template = "user.{sub}.*";
        assert!(grants(template, "alice", "user.alice.inbox"));
        assert!(grants(template, "alice", "user.alice.a.b"));
        // `alice` must not read the channels of `alice.bob`, whichever way
        // they are spelled.
        assert!(!grants(template, "alice", "user.alice=2Ebob.inbox"));
        assert!(grants(template, "alice.bob", "user.alice=2Ebob.inbox"));
        assert!(!grants(template, "alice.bob", "user.alice.bob.inbox"));
        // A wildcard in the subject is a literal.
        assert!(!grants(template, "alice*", "user.alice.inbox"));
        assert!(!grants(template, "alice*", "user.alicebob.inbox"));
        assert!(grants(template, "alice*", "user.alice=2A.inbox"));
        assert!(!grants(template, "*", "user.eve.inbox"));
        // Other separators.
        assert!(!grants(template, "a/b", "user.a/b.x"));
        assert!(!grants(template, "a/b", "user.a.x"));
        assert!(grants(template, "a/b", "user.a=2Fb.x"));
        assert!(!grants("user:{sub}:*", "a:b", "user:a:b:x"));
        // An empty subject is granted nothing.
        assert!(!grants(template, "", "user..inbox"));
        assert!(
            SubjectTemplate::parse(template)
                .unwrap()
                .instantiate("")
                .is_none()
        );
        // Non-ASCII subjects are escaped byte by byte.
        assert_eq!(escape_subject("é"), "=C3=A9");
        assert_eq!(escape_subject("a=b"), "a=3Db");
    }

    #[test]
    fn every_channel_belongs_to_at_most_one_subject() {
        let subjects = [
            "alice",
            "alice.bob",
            "alice*",
            "a/b",
            "a",
            "b",
            "a.b",
            "a=2Eb",
            "@",
            "alice bob",
        ];
        let channels = [
            "user.alice.inbox",
            "user.alice.bob.inbox",
            "user.alice=2Ebob.inbox",
            "user.a.b.x",
            "user.a=2Eb.x",
            "user.a=3D2Eb.x",
            "user.a=2Fb.x",
            "user.@.x",
            "user.alice=20bob.x",
        ];
        for template in ["user.{sub}.*", "user.{sub}", "{sub}.*", "user/{sub}/{sub}"] {
            for channel in channels {
                let owners: Vec<_> = subjects
                    .iter()
                    .filter(|subject| grants(template, subject, channel))
                    .collect();
                assert!(
                    owners.len() <= 1,
                    "{template} grants {channel} to {owners:?}"
                );
            }
        }
    }

    #[test]
    fn templates_must_fix_the_subject_segment() {
        let check = |text: &str, expected: Result<(), TemplateError>| {
            assert_eq!(SubjectTemplate::parse(text).map(|_| ()), expected, "{text}");
        };
        check("user.{sub}.*", Ok(()));
        check("{sub}", Ok(()));
        check("user:{sub}/inbox", Ok(()));
        check("user.{sub}*", Err(TemplateError::PartialSegment));
        check("user.x{sub}", Err(TemplateError::PartialSegment));
        check("*.{sub}", Err(TemplateError::WildcardBeforeSubject));
        check("user.*.{sub}.*", Err(TemplateError::WildcardBeforeSubject));
        check(
            "user {sub}",
            Err(TemplateError::Pattern(ChannelNameError::BadCharacter)),
        );
    }

    #[test]
    fn pathological_pattern_is_linear() {
        let pattern = Pattern::parse(&"a*".repeat(60)).unwrap();
        assert!(!pattern.matches(&"a".repeat(59)));
        assert!(pattern.matches(&"a".repeat(128)));
    }
}
