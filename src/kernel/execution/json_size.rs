//! Sizes as compact JSON, the unit the output cap is counted in: what `serde_json` writes, counted without
//! building the text, so sizing a flood's output does not allocate it a second time.
//!
//! Pure functions over values and strings; they must not know about outputs or the budget (`cap.rs`).

use serde::Serialize;

/// Counts the bytes serialized into it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The size of `value` as compact JSON, as the response serializes it (without building the text).
pub(super) fn json_len<T: Serialize + ?Sized>(value: &T) -> usize {
    let mut counter = Counter(0);
    // These types always serialize; if one ever did not, it counts as too big to keep.
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// The size of `c` inside a JSON string, as `serde_json` escapes it.
fn json_char_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

/// The size of `s` as a JSON string, without its quotes.
pub(super) fn json_str_len(s: &str) -> usize {
    // Byte by byte: a UTF-8 sequence is never escaped, and each of its bytes counts one.
    s.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// The longest prefix of `s`, cut between characters, whose JSON (without quotes) is at most `max` bytes.
pub(super) fn json_prefix(s: &str, max: usize) -> &str {
    let mut size = 0;
    for (i, c) in s.char_indices() {
        size += json_char_len(c);
        if size > max {
            return &s[..i];
        }
    }
    s
}

/// The longest suffix of `s` whose JSON-escaped size is at most `max` (never splits a character).
pub(super) fn json_suffix(s: &str, max: usize) -> &str {
    let mut size = 0;
    for (i, c) in s.char_indices().rev() {
        size += json_char_len(c);
        if size > max {
            return &s[i + c.len_utf8()..];
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_sizes_match_what_serde_json_writes() {
        for s in
            ["", "plain", "é ü 漢字 🦀", "\"quoted\" \\ back", "\n\r\t\u{8}\u{c}", "\u{0}\u{1f}\u{7f}", "</script>"]
        {
            assert_eq!(json_str_len(s) + 2, serde_json::to_string(s).unwrap().len(), "{s:?}");
            assert_eq!(json_str_len(s), s.chars().map(json_char_len).sum::<usize>(), "{s:?}");
            for max in 0..=json_str_len(s) {
                let prefix = json_prefix(s, max);
                assert!(json_str_len(prefix) <= max && s.starts_with(prefix));
                let suffix = json_suffix(s, max);
                assert!(json_str_len(suffix) <= max && s.ends_with(suffix));
            }
        }
        let v = json!({"a": [1, 2.5, null, true], "b": {"c": "d\n"}});
        assert_eq!(json_len(&v), serde_json::to_string(&v).unwrap().len());
    }
}
