//! Finds integer and plain string fields in received frames without parsing
//! them as JSON.
//!
//! Every delivery passes through here, so the scan must stay cheap: it looks
//! for the bytes `"NAME"`, then optional whitespace, a colon, optional
//! whitespace and an integer. It does not care where in the frame the field
//! sits (top level or nested inside `data`), which is what lets the tool
//! drive servers other than herald.

/// Looks up one integer field by name in raw frames.
#[derive(Debug, Clone)]
pub struct FieldScanner {
    /// `"NAME"` including both quotes, so that `"xseq"` never matches `seq`.
    quoted_name: Vec<u8>,
}

impl FieldScanner {
    /// A scanner for the field called `name` (without quotes).
    pub fn new(name: &str) -> FieldScanner {
        let mut quoted_name = Vec::with_capacity(name.len() + 2);
        quoted_name.push(b'"');
        quoted_name.extend_from_slice(name.as_bytes());
        quoted_name.push(b'"');
        FieldScanner { quoted_name }
    }

    /// The value of the first occurrence of the field that holds an integer.
    ///
    /// Occurrences of `"NAME"` that are not followed by a colon (a string
    /// value that happens to equal the name) or whose value is not an integer
    /// (a string, a float, an object, a number too large for `i64`) are
    /// skipped, and the scan goes on.
    pub fn find(&self, frame: &[u8]) -> Option<i64> {
        let first = self.quoted_name[0];
        let mut start = 0;
        while let Some(offset) = frame[start..].iter().position(|&byte| byte == first) {
            let at = start + offset;
            if frame[at..].starts_with(&self.quoted_name) {
                if let Some(value) = integer_after_name(&frame[at + self.quoted_name.len()..]) {
                    return Some(value);
                }
            }
            start = at + 1;
        }
        None
    }

    /// The bytes of the first occurrence of the field that holds a string
    /// without escapes (such as herald's `"epoch":"Kx3d"`), quotes excluded.
    /// Occurrences holding anything else are skipped, as in [`FieldScanner::find`].
    pub fn find_string<'a>(&self, frame: &'a [u8]) -> Option<&'a [u8]> {
        let first = self.quoted_name[0];
        let mut start = 0;
        while let Some(offset) = frame[start..].iter().position(|&byte| byte == first) {
            let at = start + offset;
            if frame[at..].starts_with(&self.quoted_name) {
                let value_at = at + self.quoted_name.len();
                if let Some(value) = string_after_name(&frame[value_at..]) {
                    return Some(value);
                }
            }
            start = at + 1;
        }
        None
    }
}

/// Parses `: "<text without escapes>"` at the start of `rest`.
fn string_after_name(rest: &[u8]) -> Option<&[u8]> {
    let mut position = skip_whitespace(rest, 0);
    if rest.get(position) != Some(&b':') {
        return None;
    }
    position = skip_whitespace(rest, position + 1);
    if rest.get(position) != Some(&b'"') {
        return None;
    }
    let text = &rest[position + 1..];
    let end = text
        .iter()
        .position(|&byte| byte == b'"' || byte == b'\\')?;
    (text[end] == b'"').then_some(&text[..end])
}

/// Whether `needle` occurs in `haystack`; an empty needle never does.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    let Some(&first) = needle.first() else {
        return false;
    };
    let mut start = 0;
    while let Some(offset) = haystack[start..].iter().position(|&byte| byte == first) {
        let at = start + offset;
        if haystack[at..].starts_with(needle) {
            return true;
        }
        start = at + 1;
    }
    false
}

/// Parses `: <integer>` (whitespace allowed around the colon) at the start of `rest`.
fn integer_after_name(rest: &[u8]) -> Option<i64> {
    let mut position = skip_whitespace(rest, 0);
    if rest.get(position) != Some(&b':') {
        return None;
    }
    position = skip_whitespace(rest, position + 1);
    let negative = rest.get(position) == Some(&b'-');
    if negative {
        position += 1;
    }
    let digits_start = position;
    let mut magnitude: i64 = 0;
    while let Some(&byte) = rest.get(position) {
        if !byte.is_ascii_digit() {
            break;
        }
        let digit = i64::from(byte - b'0');
        // Accumulate negatively so that i64::MIN parses too.
        magnitude = magnitude.checked_mul(10)?.checked_sub(digit)?;
        position += 1;
    }
    if position == digits_start {
        return None;
    }
    // `1.5` or `1e9` is a number, but not an integer.
    if matches!(rest.get(position), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    if negative {
        Some(magnitude)
    } else {
        magnitude.checked_neg()
    }
}

fn skip_whitespace(bytes: &[u8], mut position: usize) -> usize {
    while matches!(bytes.get(position), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        position += 1;
    }
    position
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(field: &str, frame: &str, expected: Option<i64>) {
        assert_eq!(
            FieldScanner::new(field).find(frame.as_bytes()),
            expected,
            "field {field:?} in {frame}"
        );
    }

    #[test]
    fn finds_top_level_and_nested_fields() {
        check("seq", r#"{"seq":7,"ts":1}"#, Some(7));
        check(
            "ts",
            r#"{"seq":7,"ts":1700000000000000000}"#,
            Some(1_700_000_000_000_000_000),
        );
        check(
            "seq",
            r#"{"type":"message","channel":"fanout.0","data":{"seq":42,"ts":5,"pad":"xx"}}"#,
            Some(42),
        );
        check("seq", r#"{"a":{"b":[{"seq":3}]}}"#, Some(3));
        check("seq", "{\"seq\" :\n 9}", Some(9));
    }

    #[test]
    fn reads_negative_and_extreme_values() {
        check("ts", r#"{"ts":-5}"#, Some(-5));
        check("ts", r#"{"ts":-9223372036854775808}"#, Some(i64::MIN));
        check("ts", r#"{"ts":9223372036854775807}"#, Some(i64::MAX));
        check("ts", r#"{"ts":9223372036854775808}"#, None);
        check("ts", r#"{"ts":-}"#, None);
    }

    #[test]
    fn missing_fields_are_none() {
        check("seq", r#"{"type":"welcome"}"#, None);
        check("seq", "", None);
        check("seq", r#"{"seq"}"#, None);
        check("seq", r#"{"seq":}"#, None);
    }

    #[test]
    fn prefix_and_suffix_collisions_do_not_match() {
        check("seq", r#"{"xseq":1}"#, None);
        check("seq", r#"{"seqx":1}"#, None);
        check("seq", r#"{"xseq":1,"seq":2}"#, Some(2));
        check("ts", r#"{"tsx":1,"ats":2,"ts":3}"#, Some(3));
    }

    #[test]
    fn finds_plain_string_fields() {
        let epoch = |frame: &str| {
            FieldScanner::new("epoch")
                .find_string(frame.as_bytes())
                .map(|bytes| String::from_utf8(bytes.to_vec()).unwrap())
        };
        assert_eq!(
            epoch(r#"{"type":"message","data":{"seq":1},"offset":42,"epoch":"Kx3d"}"#).as_deref(),
            Some("Kx3d")
        );
        assert_eq!(epoch(r#"{"epoch" : "a","x":1}"#).as_deref(), Some("a"));
        assert_eq!(epoch(r#"{"epoch":""}"#).as_deref(), Some(""));
        // Not a string, an escape, an unterminated string, a name as a value.
        assert_eq!(epoch(r#"{"epoch":1}"#), None);
        assert_eq!(epoch(r#"{"epoch":"a\"b"}"#), None);
        assert_eq!(epoch(r#"{"epoch":"abc"#), None);
        assert_eq!(
            epoch(r#"{"name":"epoch","epoch":"E"}"#).as_deref(),
            Some("E")
        );
    }

    #[test]
    fn substring_search() {
        assert!(contains(
            br#"{"type":"reply","id":1}"#,
            br#""type":"reply""#
        ));
        assert!(!contains(br#"{"type":"welcome"}"#, br#""type":"reply""#));
        assert!(!contains(b"anything", b""));
        assert!(contains(b"aab", b"ab"));
    }

    #[test]
    fn non_integer_occurrences_are_skipped() {
        check("seq", r#"{"name":"seq","seq":4}"#, Some(4));
        check("seq", r#"{"seq":"4"}"#, None);
        check("seq", r#"{"seq":1.5}"#, None);
        check("seq", r#"{"seq":1e3,"data":{"seq":8}}"#, Some(8));
        check("seq", r#"{"seq":{"seq":6}}"#, Some(6));
    }
}
