//! Partial JSON: what can be kept of a `content` frame that was cut at the wire limit, or that holds too
//! many values to parse whole. The top-level members that are complete in the prefix and fit a count of
//! values are kept (an `execute_reply` keeps its `status`), and a `stream`'s cut `text` is decoded as far
//! as it goes (the part a user wants most from a flood of print output).
//!
//! It owns only the scanning of JSON bytes (`json_values`, `salvage`). It must not touch frames, the HMAC or
//! the limits: `wire.rs` decides *when* a content is salvaged, after the signature is checked, and passes
//! the count of values allowed in. Pure functions over bytes, so every cut is a plain unit test; where
//! complete values end is found without recursion, so a prefix of `[[[[…` cannot grow the stack.

use serde_json::{Map, Value};

/// How many JSON values `json` holds at most: one, plus one per comma, colon and opening bracket outside
/// strings. A cheap bound on what parsing it would allocate.
pub(super) fn json_values(json: &[u8]) -> usize {
    let (mut count, mut in_string, mut escaped) = (1usize, false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b',' | b':' | b'[' | b'{' => count += 1,
                _ => {}
            }
        }
    }
    count
}

/// What can be kept of a content frame cut after `prefix` (or too rich to parse whole): every top-level
/// member whose value is complete in the prefix and fits in `max_values` JSON values altogether (so an
/// `execute_reply` keeps its `status`, an `error` its `ename`), and for a `stream` message the `text` as
/// far as it goes. Anything unreadable ends the salvage; the result is an object.
pub(super) fn salvage(msg_type: &str, prefix: &[u8], max_values: usize) -> Value {
    let mut out = Map::new();
    let mut budget = max_values;
    let mut scan = Scan { s: prefix, i: 0 };
    scan.ws();
    if scan.peek() != Some(b'{') {
        return Value::Object(out);
    }
    scan.i += 1;
    loop {
        scan.ws();
        let Some(key_end) = scan.value_end().filter(|_| scan.peek() == Some(b'"')) else { break };
        let Ok(key) = serde_json::from_slice::<String>(&prefix[scan.i..key_end]) else { break };
        scan.i = key_end;
        scan.ws();
        if scan.peek() != Some(b':') {
            break;
        }
        scan.i += 1;
        scan.ws();
        match scan.value_end() {
            Some(end) => {
                let span = &prefix[scan.i..end];
                let values = json_values(span);
                if values <= budget {
                    let Ok(value) = serde_json::from_slice::<Value>(span) else { break };
                    budget -= values;
                    out.insert(key, value);
                }
                scan.i = end;
            }
            None => {
                if msg_type == "stream" && key == "text" && scan.peek() == Some(b'"') {
                    out.insert(key, Value::String(partial_string(&prefix[scan.i + 1..])));
                }
                break;
            }
        }
        scan.ws();
        if scan.peek() != Some(b',') {
            break;
        }
        scan.i += 1;
    }
    Value::Object(out)
}

/// A cursor over a JSON prefix that finds where complete values end, without recursion.
struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// Where the value starting at the cursor ends, if it is complete in the prefix (its syntax is left to
    /// serde_json).
    fn value_end(&self) -> Option<usize> {
        let s = self.s;
        let mut i = self.i;
        let mut depth = 0usize;
        loop {
            match *s.get(i)? {
                b'"' => i = string_end(s, i + 1)?,
                b'{' | b'[' => {
                    depth += 1;
                    i += 1;
                }
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    i += 1;
                }
                _ if depth == 0 => {
                    // A scalar: it ends at a delimiter, which must be in the prefix (a cut number is not).
                    let len =
                        s[i..].iter().position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))?;
                    return Some(i + len);
                }
                _ => i += 1,
            }
            if depth == 0 {
                return Some(i);
            }
        }
    }
}

/// The index after the closing quote of a string whose body starts at `i`.
fn string_end(s: &[u8], mut i: usize) -> Option<usize> {
    loop {
        match *s.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}

/// The text of a JSON string body that is cut: escapes decoded, stopping before a cut escape or a cut
/// UTF-8 character.
fn partial_string(body: &[u8]) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(body.len());
    let mut i = 0;
    let hex4 = |at: usize| -> Option<u32> {
        let digits = std::str::from_utf8(body.get(at..at + 4)?).ok()?;
        u32::from_str_radix(digits, 16).ok()
    };
    while i < body.len() {
        let b = body[i];
        if b == b'"' {
            break;
        }
        if b != b'\\' {
            // Copy a run of plain bytes at once.
            let run = body[i..].iter().position(|&c| c == b'"' || c == b'\\').unwrap_or(body.len() - i);
            out.extend_from_slice(&body[i..i + run]);
            i += run;
            continue;
        }
        let Some(&escape) = body.get(i + 1) else { break };
        let ch = match escape {
            b'n' => '\n',
            b't' => '\t',
            b'r' => '\r',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'u' => {
                let Some(unit) = hex4(i + 2) else { break };
                if (0xD800..0xDC00).contains(&unit) {
                    // A surrogate pair: both halves must be in the prefix.
                    if i + 12 > body.len() {
                        break;
                    }
                    let low = (&body[i + 6..i + 8] == b"\\u").then(|| hex4(i + 8)).flatten();
                    match low {
                        Some(low @ 0xDC00..0xE000) => {
                            let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                            push_char(&mut out, char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER));
                            i += 12;
                        }
                        // A lone high surrogate; what follows is read on its own.
                        _ => {
                            push_char(&mut out, char::REPLACEMENT_CHARACTER);
                            i += 6;
                        }
                    }
                    continue;
                }
                i += 6;
                push_char(&mut out, char::from_u32(unit).unwrap_or(char::REPLACEMENT_CHARACTER));
                continue;
            }
            other => other as char,
        };
        push_char(&mut out, ch);
        i += 2;
    }
    match String::from_utf8(out) {
        Ok(text) => text,
        // A character cut at the end of the prefix is left out; anything else invalid is replaced.
        Err(e) if e.utf8_error().error_len().is_none() => {
            let valid = e.utf8_error().valid_up_to();
            let mut bytes = e.into_bytes();
            bytes.truncate(valid);
            String::from_utf8(bytes).expect("valid up to here")
        }
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

fn push_char(out: &mut Vec<u8>, c: char) {
    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn salvage_decodes_escapes_and_never_splits_a_character() {
        let cut = |raw: &str| salvage("stream", raw.as_bytes(), 1000);
        assert_eq!(
            cut(r#"{"name":"stderr","text":"a\nb\"c\u00e9\ud83d\ude00d"#)["text"],
            "a\nb\"céd".replace("d", "😀d")
        );
        assert_eq!(cut(r#"{"name":"stdout","text":"ab\"#)["text"], "ab");
        assert_eq!(cut(r#"{"name":"stdout","text":"ab\u00"#)["text"], "ab");
        assert_eq!(cut(r#"{"name":"stdout","text":"ab\ud83d"#)["text"], "ab");
        assert_eq!(cut(r#"{"name": "stdout" , "text" : "x"#), json!({"name": "stdout", "text": "x"}));
        let e_acute = "{\"text\":\"\u{e9}";
        assert_eq!(salvage("stream", &e_acute.as_bytes()[..e_acute.len() - 1], 1000)["text"], "");
        assert_eq!(cut(r#"{"name":"std"#), json!({}));
        assert_eq!(cut(r#"{"n":12"#), json!({}), "a cut number is not kept");
        assert_eq!(cut(r#"{"n":12,"a":[1,{"b":"]"}],"text":"#), json!({"n": 12, "a": [1, {"b": "]"}]}));
        assert_eq!(cut("not json"), json!({}));
        assert_eq!(cut(""), json!({}));
        assert_eq!(cut("{}}}}"), json!({}));
        assert_eq!(cut(&format!("{{\"x\":{}", "[".repeat(10_000))), json!({}));
    }
}
