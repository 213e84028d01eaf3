//! Text helpers with no knowledge of the rest of the crate: what several modules do to text a kernel or a
//! tool printed before a person or a model reads it.
//!
//! A leaf: it imports nothing of the crate, so any module may use it without an arrow running back up.

/// Removes terminal escape sequences (IPython colours its tracebacks, Deno and pip their errors): CSI
/// `ESC [ ... final` (final byte `@` to `~`), OSC `ESC ] ... BEL|ESC \`, and two-character escapes.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_colours_are_removed() {
        let tb = "\u{1b}[0;31mNameError\u{1b}[0m: name 'x' is not defined\u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{1b}\\";
        assert_eq!(strip_ansi(tb), "NameError: name 'x' is not definedlink");
        assert_eq!(strip_ansi("plain ✓"), "plain ✓");
        assert_eq!(strip_ansi("\u{1b}[0m\u{1b}[1m\u{1b}[31merror\u{1b}[0m: x"), "error: x");
    }

    #[test]
    fn a_sequence_ends_at_its_final_byte_even_when_that_is_not_a_letter() {
        // `ESC [ 2 ~` ends at `~`: the text after it is kept.
        assert_eq!(strip_ansi("a\u{1b}[2~b c"), "ab c");
    }
}
