//! JSON, just enough for the descriptor and the connection file: a parser, a writer that prints like
//! Python's `json.dumps` (the files it writes are read by Python kernels, and `--describe` printed the
//! same bytes when the supervisor was a Python program), and the few accessors the supervisor needs.

#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number's text, as written.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    /// In document order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    pub fn set(&mut self, key: &str, value: Json) {
        if let Json::Obj(fields) = self {
            match fields.iter_mut().find(|(k, _)| k == key) {
                Some(field) => field.1 = value,
                None => fields.push((key.to_owned(), value)),
            }
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    /// A value as Python's `str()` would put it in the environment.
    pub fn to_env_string(&self) -> String {
        match self {
            Json::Str(s) => s.clone(),
            Json::Num(n) => n.clone(),
            Json::Bool(true) => "True".into(),
            Json::Bool(false) => "False".into(),
            Json::Null => "None".into(),
            other => other.dump(None),
        }
    }
    /// An integer port, from a number or a string of digits.
    pub fn as_port(&self) -> Option<u16> {
        match self {
            Json::Num(n) | Json::Str(n) => n.trim().parse().ok(),
            _ => None,
        }
    }

    /// Compact (`, ` and `: ` as Python writes) or indented; non-ASCII escaped, like `json.dumps`.
    pub fn dump(&self, indent: Option<usize>) -> String {
        let mut out = String::new();
        self.write_to(&mut out, indent, 0);
        out
    }

    fn write_to(&self, out: &mut String, indent: Option<usize>, level: usize) {
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(n),
            Json::Str(s) => write_json_str(out, s),
            Json::Arr(items) => {
                write_items(out, indent, level, "[]", items, |out, v| v.write_to(out, indent, level + 1))
            }
            Json::Obj(fields) => write_items(out, indent, level, "{}", fields, |out, (k, v)| {
                write_json_str(out, k);
                out.push_str(": ");
                v.write_to(out, indent, level + 1);
            }),
        }
    }
}

/// An array's or an object's items between its `brackets` ("[]" or "{}"), each written by `write_item`;
/// indented, one a line.
fn write_items<T>(
    out: &mut String,
    indent: Option<usize>,
    level: usize,
    brackets: &str,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T),
) {
    if items.is_empty() {
        out.push_str(brackets);
        return;
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let sep = if indent.is_some() { "," } else { ", " };
    let (open, close) = brackets.split_at(1);
    out.push_str(open);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(sep);
        }
        newline(out, level + 1);
        write_item(out, item);
    }
    newline(out, level);
    out.push_str(close);
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04x}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

pub fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing data at byte {}", p.i));
    }
    Ok(v)
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{} at byte {}", what, self.i))
    }
    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }
    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 64 {
            return self.err("too deep");
        }
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'{') => self
                .items("}", |p| {
                    p.ws();
                    if p.s.get(p.i) != Some(&b'"') {
                        return p.err("expected a key");
                    }
                    let k = p.string()?;
                    p.ws();
                    if !p.eat(":") {
                        return p.err("expected ':'");
                    }
                    Ok((k, p.value(depth + 1)?))
                })
                .map(Json::Obj),
            Some(b'[') => self.items("]", |p| p.value(depth + 1)).map(Json::Arr),
            Some(b'"') => self.string().map(Json::Str),
            Some(_) if self.eat("null") => Ok(Json::Null),
            Some(_) if self.eat("true") => Ok(Json::Bool(true)),
            Some(_) if self.eat("false") => Ok(Json::Bool(false)),
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                if text.is_empty() || text.parse::<f64>().is_err() {
                    self.i = start;
                    return self.err("unexpected character");
                }
                Ok(Json::Num(text.to_owned()))
            }
        }
    }
    /// An array's or an object's items, from its opening bracket to `close`, each read by `item`.
    fn items<T>(
        &mut self,
        close: &str,
        mut item: impl FnMut(&mut Self) -> Result<T, String>,
    ) -> Result<Vec<T>, String> {
        self.i += 1; // the opening bracket
        let mut items = Vec::new();
        self.ws();
        if self.eat(close) {
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            self.ws();
            if self.eat(",") {
                continue;
            }
            if self.eat(close) {
                return Ok(items);
            }
            return self.err(&format!("expected ',' or '{}'", close));
        }
    }
    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).and_then(|h| std::str::from_utf8(h).ok());
        match h.and_then(|h| u32::from_str_radix(h, 16).ok()) {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.err("bad \\u escape"),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = match self.s.get(self.i) {
                None => return self.err("unterminated string"),
                Some(c) => *c,
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = match self.s.get(self.i) {
                        None => return self.err("unterminated string"),
                        Some(e) => *e,
                    };
                    self.i += 1;
                    let simple = match e {
                        b'"' => Some('"'),
                        b'\\' => Some('\\'),
                        b'/' => Some('/'),
                        b'b' => Some('\u{8}'),
                        b'f' => Some('\u{c}'),
                        b'n' => Some('\n'),
                        b'r' => Some('\r'),
                        b't' => Some('\t'),
                        b'u' => None,
                        _ => return self.err("bad escape"),
                    };
                    let ch = match simple {
                        Some(ch) => ch,
                        None => {
                            let mut u = self.hex4()?;
                            if (0xD800..0xDC00).contains(&u) && self.eat("\\u") {
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                                }
                            }
                            char::from_u32(u).unwrap_or('\u{fffd}')
                        }
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| "invalid UTF-8".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_what_the_descriptors_hold() {
        let text = r#"{"a": [1, -2.5e3, "x\"\\\n\u00e9\ud83d\ude00"], "b": {"c": null, "d": true}, "e": {}}"#;
        let v = parse_json(text).unwrap();
        assert_eq!(parse_json(&v.dump(None)).unwrap(), v);
        assert_eq!(parse_json(&v.dump(Some(2))).unwrap(), v);
        assert_eq!(v.get("a").map(|a| a.dump(None)).unwrap(), r#"[1, -2.5e3, "x\"\\\n\u00e9\ud83d\ude00"]"#);
        assert!(parse_json("{\"a\": 1,}").is_err());
        assert!(parse_json("[1] x").is_err());
    }
}
