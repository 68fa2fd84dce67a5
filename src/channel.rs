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

    #[test]
    fn pathological_pattern_is_linear() {
        let pattern = Pattern::parse(&"a*".repeat(60)).unwrap();
        assert!(!pattern.matches(&"a".repeat(59)));
        assert!(pattern.matches(&"a".repeat(128)));
    }
}
