//! Single-pass canonicalisation for the common case (see `canonical` for the form).
//!
//! Going through `serde_json::Value` allocates a tree (a map node per object,
//! a `String` per key, string and number) for every call. This parser writes
//! the canonical form straight into the output buffer instead; only objects
//! whose keys arrive out of order are rearranged, in place, from a reused
//! buffer. It is deliberately strict and returns `None` on anything it does
//! not accept, after which the caller asks serde (the authority on validity
//! and on error messages) to decide. So it must never accept what serde
//! refuses, and must write exactly what the serde path writes; the tests
//! below check both on generated and mutated inputs.

use std::ops::Range;

use crate::canonical::{write_escaped, write_number, MAX_DEPTH};

/// Append the canonical form of `input` to `out`, or `None` (with `out` in
/// any state) if this parser declines the input.
pub(crate) fn canonicalize(input: &[u8], out: &mut Vec<u8>) -> Option<()> {
    // Strings are then copied byte-wise; validating once up front is cheaper
    // than decoding each character.
    std::str::from_utf8(input).ok()?;
    let mut parser = Parser {
        input,
        pos: 0,
        out,
        members: Vec::new(),
        keys: Vec::new(),
        reorder: Vec::new(),
    };
    parser.skip_whitespace();
    parser.value(0)?;
    parser.skip_whitespace();
    (parser.pos == input.len()).then_some(())
}

struct Member {
    /// The decoded key, in `Parser::keys`.
    key: Range<usize>,
    /// `"key":value` in canonical form, in `out`.
    span: Range<usize>,
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
    out: &'a mut Vec<u8>,
    /// Members of the objects being parsed, innermost last.
    members: Vec<Member>,
    /// Their decoded keys, back to back.
    keys: Vec<u8>,
    /// Scratch for rearranging an object's members.
    reorder: Vec<u8>,
}

impl Parser<'_> {
    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(word.len())?;
        (self.input.get(self.pos..end)? == word).then(|| {
            self.pos = end;
            self.out.extend_from_slice(word);
        })
    }

    /// `depth` counts the arrays/objects around this value.
    fn value(&mut self, depth: usize) -> Option<()> {
        match self.peek()? {
            b'{' => self.object(depth + 1),
            b'[' => self.array(depth + 1),
            b'"' => {
                self.pos += 1;
                self.string_value()
            }
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            b'n' => self.literal(b"null"),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn array(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'[');
        self.skip_whitespace();
        if self.peek()? == b']' {
            self.pos += 1;
            self.out.push(b']');
            return Some(());
        }
        loop {
            self.skip_whitespace();
            self.value(depth)?;
            self.skip_whitespace();
            match self.peek()? {
                b',' => {
                    self.pos += 1;
                    self.out.push(b',');
                }
                b']' => {
                    self.pos += 1;
                    self.out.push(b']');
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    fn object(&mut self, depth: usize) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.pos += 1;
        self.out.push(b'{');
        let body_start = self.out.len();
        let members_base = self.members.len();
        let keys_base = self.keys.len();
        self.skip_whitespace();
        if self.peek()? == b'}' {
            self.pos += 1;
            self.out.push(b'}');
            return Some(());
        }
        let mut in_order = true;
        loop {
            self.skip_whitespace();
            self.expect(b'"')?;
            let key_start = self.keys.len();
            self.string_key()?;
            let key = key_start..self.keys.len();
            if let Some(previous) = self.members[members_base..].last() {
                // Strictly ascending keys need no rearranging (nor dedup).
                in_order &= self.keys[previous.key.clone()] < self.keys[key.clone()];
                self.out.push(b',');
            }
            self.skip_whitespace();
            self.expect(b':')?;
            self.skip_whitespace();
            let span_start = self.out.len();
            write_str_bytes(&self.keys[key.clone()], self.out);
            self.out.push(b':');
            self.value(depth)?;
            self.members.push(Member {
                key,
                span: span_start..self.out.len(),
            });
            self.skip_whitespace();
            match self.peek()? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    break;
                }
                _ => return None,
            }
        }
        if !in_order {
            self.rearrange(body_start, members_base);
        }
        self.out.push(b'}');
        self.members.truncate(members_base);
        self.keys.truncate(keys_base);
        Some(())
    }

    /// Rewrite the members of the object whose body starts at `body_start`
    /// sorted by key; of equal keys only the last one stays (as in serde and
    /// `json.loads`).
    fn rearrange(&mut self, body_start: usize, members_base: usize) {
        let (keys, members) = (&self.keys, &mut self.members[members_base..]);
        members.sort_by(|a, b| keys[a.key.clone()].cmp(&keys[b.key.clone()])); // stable
        self.reorder.clear();
        self.reorder.extend_from_slice(&self.out[body_start..]);
        self.out.truncate(body_start);
        let mut first = true;
        for (i, member) in members.iter().enumerate() {
            let superseded = members
                .get(i + 1)
                .is_some_and(|next| keys[next.key.clone()] == keys[member.key.clone()]);
            if superseded {
                continue;
            }
            if !first {
                self.out.push(b',');
            }
            first = false;
            let span = member.span.start - body_start..member.span.end - body_start;
            self.out.extend_from_slice(&self.reorder[span]);
        }
    }

    fn number(&mut self) -> Option<()> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.required_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.required_digits()?;
        }
        let literal = std::str::from_utf8(&self.input[start..self.pos]).ok()?;
        write_number(literal, self.out).ok()
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn required_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    /// A string value (after its opening quote), written out canonically.
    fn string_value(&mut self) -> Option<()> {
        self.out.push(b'"');
        loop {
            let run = self.plain_run();
            self.out.extend_from_slice(&self.input[run]);
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    self.out.push(b'"');
                    return Some(());
                }
                b'\\' => {
                    let c = self.escape()?;
                    let mut buf = [0u8; 4];
                    write_escaped(c.encode_utf8(&mut buf).as_bytes(), self.out);
                }
                _ => return None, // a raw control character
            }
        }
    }

    /// A key (after its opening quote), decoded into `keys`.
    fn string_key(&mut self) -> Option<()> {
        loop {
            let run = self.plain_run();
            self.keys.extend_from_slice(&self.input[run]);
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(());
                }
                b'\\' => {
                    let c = self.escape()?;
                    let mut buf = [0u8; 4];
                    self.keys
                        .extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                _ => return None,
            }
        }
    }

    /// Bytes up to the next quote, backslash or control character (which
    /// are the only bytes a canonical string escapes, so the run is copied
    /// as is).
    fn plain_run(&mut self) -> Range<usize> {
        let start = self.pos;
        while let Some(&b) = self.input.get(self.pos) {
            if b == b'"' || b == b'\\' || b < 0x20 {
                break;
            }
            self.pos += 1;
        }
        start..self.pos
    }

    /// The character an escape sequence (at its backslash) stands for.
    fn escape(&mut self) -> Option<char> {
        let kind = *self.input.get(self.pos + 1)?;
        self.pos += 2;
        let c = match kind {
            b'"' => '"',
            b'\\' => '\\',
            b'/' => '/',
            b'b' => '\u{8}',
            b'f' => '\u{c}',
            b'n' => '\n',
            b'r' => '\r',
            b't' => '\t',
            b'u' => {
                let unit = self.hex4()?;
                match unit {
                    0xD800..=0xDBFF => {
                        // A high surrogate must be followed by an escaped low one.
                        if self.input.get(self.pos..self.pos + 2)? != b"\\u" {
                            return None;
                        }
                        self.pos += 2;
                        let low = self.hex4()?;
                        if !(0xDC00..=0xDFFF).contains(&low) {
                            return None;
                        }
                        let code = 0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00);
                        char::from_u32(code)?
                    }
                    _ => char::from_u32(unit)?, // None for a lone low surrogate
                }
            }
            _ => return None,
        };
        Some(c)
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.input.get(self.pos..self.pos + 4)?;
        let mut value = 0;
        for &d in digits {
            value = value * 16 + char::from(d).to_digit(16)?;
        }
        self.pos += 4;
        Some(value)
    }
}

/// A canonical string from its decoded UTF-8 bytes.
fn write_str_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.push(b'"');
    write_escaped(bytes, out);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canonical::canonicalize_via_serde;

    fn both(input: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        let mut fast = Vec::new();
        let fast = canonicalize(input, &mut fast).map(|()| fast);
        let mut slow = Vec::new();
        let slow = canonicalize_via_serde(input, &mut slow).ok().map(|()| slow);
        (fast, slow)
    }

    fn assert_agrees(input: &[u8]) {
        let (fast, slow) = both(input);
        if let Some(fast) = fast {
            assert_eq!(
                Some(&fast),
                slow.as_ref(),
                "fast path accepted {:?} differently",
                String::from_utf8_lossy(input)
            );
        }
    }

    const CORPUS: &[&str] = &[
        r#"{"path": "src/main.rs", "offset": 10, "limit": 200}"#,
        r#"{"b": 1, "a": {"d": [1, 2.50, -0, 1e3], "c": null}, "a": true}"#,
        r#"{"z": 1, "y": 2, "x": 3, "y": 4}"#,
        r#"{"": 0, "\u0000": 1, "a\"b": "q\\\/\b\f\n\r\t\u001f\u007f\u00e9\ud83d\ude00"}"#,
        r#"[true, false, null, "", [], {}, [[{}]], 0.000, -12.5E-3]"#,
        "\t\n\r {\"k\" : [ 1 , 2 ] } \r\n",
        r#""\ud800""#,
        r#""\udc00""#,
        r#""\ud800\u0041""#,
        r#"{"a":1,}"#,
        "[1,]",
        "01",
        "-",
        "1.",
        "1e",
        "1e+",
        ".5",
        "tru",
        "nulll",
        "\"a\u{1}b\"",
        "\u{feff}{}",
        "{\"\u{e9}\": 1, \"e\": 2}",
        "1e9223372036854775808",
        "",
        " ",
    ];

    #[test]
    fn agrees_with_serde_on_the_corpus() {
        for input in CORPUS {
            assert_agrees(input.as_bytes());
        }
        assert_agrees(b"\"\xff\"");
        assert_agrees(b"\"\xed\xa0\x80\"");
    }

    #[test]
    fn takes_the_common_inputs() {
        for input in [
            r#"{"path": "src/main.rs", "offset": 10, "limit": 200}"#,
            r#"{"command": "ls -la \"dir\"\n", "timeout": 1.5}"#,
        ] {
            let (fast, slow) = both(input.as_bytes());
            assert!(fast.is_some(), "{input}");
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn depth_limit_matches_serde() {
        for depth in [MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1] {
            let arrays = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
            let objects = format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth));
            for input in [arrays, objects] {
                let (fast, slow) = both(input.as_bytes());
                assert_eq!(fast, slow, "depth {depth}");
            }
        }
    }

    /// Deterministic pseudo-random numbers, so the crate needs no test deps.
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, bound: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) % bound as u64) as usize
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    fn random_json(rng: &mut Lcg, depth: usize, out: &mut String) {
        const WS: &[&str] = &["", "", " ", "\n", "\t", "\r\n "];
        const NUMBERS: &[&str] = &[
            "0",
            "-0",
            "1",
            "10",
            "1.0",
            "0.10",
            "1e2",
            "1E-2",
            "-3.25e+1",
            "123456789012345678901234567890",
            "0.0001",
            "5e-0",
        ];
        const STRINGS: &[&str] = &[
            "\"\"",
            "\"a\"",
            "\"b\"",
            "\"\\u0061\"",
            "\"\\n\"",
            "\"\\\"\"",
            "\"\u{e9}\"",
            "\"\\ud83d\\ude00\"",
            "\"\\/\"",
            "\"x y\"",
        ];
        out.push_str(rng.pick(WS));
        match if depth > 3 {
            rng.below(4)
        } else {
            rng.below(6)
        } {
            0 => out.push_str(rng.pick(NUMBERS)),
            1 => out.push_str(rng.pick(STRINGS)),
            2 => out.push_str(rng.pick(&["true", "false", "null"])),
            3 => out.push_str(rng.pick(STRINGS)),
            4 => {
                out.push('[');
                for i in 0..rng.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    random_json(rng, depth + 1, out);
                }
                out.push(']');
            }
            _ => {
                out.push('{');
                for i in 0..rng.below(5) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(rng.pick(WS));
                    out.push_str(rng.pick(STRINGS));
                    out.push_str(rng.pick(WS));
                    out.push(':');
                    random_json(rng, depth + 1, out);
                }
                out.push('}');
            }
        }
        out.push_str(rng.pick(WS));
    }

    #[test]
    fn agrees_with_serde_on_generated_and_mutated_inputs() {
        const NOISE: &[u8] = b"{}[]\":,.-+eE0123456789 \\u/tfnrl\x00\x7f\xc3\xa9\xff";
        let mut rng = Lcg(1);
        for _ in 0..20_000 {
            let mut text = String::new();
            random_json(&mut rng, 0, &mut text);
            let (fast, slow) = both(text.as_bytes());
            assert!(slow.is_some(), "generator made invalid JSON: {text}");
            assert_eq!(fast, slow, "{text}");

            let mut bytes = text.into_bytes();
            for _ in 0..=rng.below(3) {
                let at = rng.below(bytes.len() + 1);
                let noise = NOISE[rng.below(NOISE.len())];
                match rng.below(3) {
                    0 => bytes.insert(at, noise),
                    1 if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    _ if at < bytes.len() => bytes[at] = noise,
                    _ => {}
                }
            }
            assert_agrees(&bytes);
        }
    }
}
