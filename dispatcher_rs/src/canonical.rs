//! Canonical JSON for dedup keys.
//!
//! Two tool inputs are the same call when their canonical forms are equal
//! byte for byte. The canonical form is itself compact JSON:
//!
//! - object members sorted by key (by code point; UTF-8 byte order is the
//!   same order), no whitespace; a key given twice keeps its last value,
//!   like `json.loads`;
//! - arrays keep their order;
//! - strings are written from their decoded value, escaping only `"`, `\`
//!   and control characters (`\b \f \n \r \t`, others as lowercase `\u00xx`),
//!   exactly what Python's `json.dumps(s, ensure_ascii=False)` writes, so
//!   `"\u0041"` and `"A"` are one string;
//! - numbers are exact decimals normalised to `[-]digits[e<exp>]` with no
//!   leading or trailing zeros in `digits` (`1`, `1.0`, `1e0` and `10E-1` are
//!   all `1`; `-0` is `0`; `0.10` is `1e-1`). They never go through `f64`, so
//!   large integers compare exactly. The exponent of the normalised form must
//!   fit in an `i64`; beyond that the input is rejected rather than rounded.
//!
//! What is valid JSON is serde_json's call (with `arbitrary_precision`, so
//! number literals reach us verbatim), and so are its limits: a nesting depth
//! of at most [`MAX_DEPTH`] arrays/objects, paired surrogates only, no
//! `NaN`/`Infinity`. A strict single-pass parser (`canonical_fast`) handles
//! the inputs it can without building a `serde_json::Value`; whatever it
//! declines goes through serde, which accepts it or words the error.
//! The Python reference (`dispatch.dispatcher_ref`) implements the same form.

use std::fmt;

use serde_json::{Map, Value};

/// The deepest nesting of arrays and objects serde_json accepts (its
/// recursion limit of 128 counts the level that fails).
pub const MAX_DEPTH: usize = 127;

/// Why an input has no canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanonicalError {
    /// Not a JSON document; serde's message, with line and column.
    Syntax(String),
    /// A number whose normalised exponent does not fit in an `i64`.
    NumberOutOfRange(String),
}

impl fmt::Display for CanonicalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax(message) => f.write_str(message),
            Self::NumberOutOfRange(literal) => {
                write!(f, "number {literal} has an exponent out of range")
            }
        }
    }
}

impl std::error::Error for CanonicalError {}

/// Append the canonical form of the JSON document `input` to `out`.
///
/// On error `out` may hold a partial form; callers truncate it back.
pub fn canonicalize(input: &[u8], out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let start = out.len();
    if crate::canonical_fast::canonicalize(input, out).is_some() {
        return Ok(());
    }
    out.truncate(start);
    canonicalize_via_serde(input, out)
}

/// The reference path: parse into a `serde_json::Value`, then write it out.
/// It decides every input the single-pass parser declines, so serde alone
/// decides what is valid JSON and words the errors.
pub(crate) fn canonicalize_via_serde(
    input: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), CanonicalError> {
    let value: Value =
        serde_json::from_slice(input).map_err(|e| CanonicalError::Syntax(e.to_string()))?;
    write_value(&value, out)
}

/// The canonical form of `input` as a new buffer.
pub fn canonical_key(input: &[u8]) -> Result<Vec<u8>, CanonicalError> {
    let mut out = Vec::with_capacity(input.len());
    canonicalize(input, &mut out)?;
    Ok(out)
}

fn write_value(value: &Value, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => write_number(number.as_str(), out)?,
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(members) => write_object(members, out)?,
    }
    Ok(())
}

fn write_object(members: &Map<String, Value>, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    // serde_json's Map is a BTreeMap here (no `preserve_order`), so iteration
    // is already in key order; a later duplicate key has replaced the earlier.
    out.push(b'{');
    for (i, (key, value)) in members.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_string(key, out);
        out.push(b':');
        write_value(value, out)?;
    }
    out.push(b'}');
    Ok(())
}

/// Write `s` as a JSON string the way `json.dumps(s, ensure_ascii=False)` does.
pub(crate) fn write_string(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    write_escaped(s.as_bytes(), out);
    out.push(b'"');
}

/// The body of a canonical string: UTF-8 `bytes` with `"`, `\` and control
/// characters escaped (only ASCII bytes change, so UTF-8 stays UTF-8).
pub(crate) fn write_escaped(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut plain_from = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[plain_from..i]);
        plain_from = i + 1;
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0x0f)]);
        } else {
            out.extend_from_slice(short);
        }
    }
    out.extend_from_slice(&bytes[plain_from..]);
}

/// Exponent literals with more significant digits than this are out of range
/// whatever the rest of the number is (10^38 is far beyond `i64`, and the
/// adjustments below are bounded by the input's length).
const MAX_EXPONENT_DIGITS: usize = 38;

/// Write a JSON number literal (as serde_json validated it) in normal form.
pub(crate) fn write_number(literal: &str, out: &mut Vec<u8>) -> Result<(), CanonicalError> {
    let malformed = || CanonicalError::Syntax(format!("malformed number {literal}"));
    let bytes = literal.as_bytes();
    let (negative, unsigned) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    let mantissa_len = unsigned
        .iter()
        .position(|&b| b == b'e' || b == b'E')
        .unwrap_or(unsigned.len());
    let (mantissa, exponent_part) = unsigned.split_at(mantissa_len);
    let (int_part, frac_part) = match mantissa.iter().position(|&b| b == b'.') {
        Some(dot) => (&mantissa[..dot], &mantissa[dot + 1..]),
        None => (mantissa, &mantissa[mantissa.len()..]),
    };
    if int_part.is_empty() || !int_part.iter().chain(frac_part).all(u8::is_ascii_digit) {
        return Err(malformed());
    }

    let digit = |i: usize| {
        if i < int_part.len() {
            int_part[i]
        } else {
            frac_part[i - int_part.len()]
        }
    };
    let total = int_part.len() + frac_part.len();
    let Some(first) = (0..total).find(|&i| digit(i) != b'0') else {
        // Zero, whatever its sign and exponent.
        out.push(b'0');
        return Ok(());
    };
    let last = (first..total)
        .rev()
        .find(|&i| digit(i) != b'0')
        .unwrap_or(first);

    let exponent = parse_exponent(exponent_part)
        .ok_or_else(malformed)?
        .ok_or_else(|| CanonicalError::NumberOutOfRange(literal.to_owned()))?;
    // Both lengths are bounded by the input's size, far below 2^64.
    let trailing_zeros = (total - 1 - last) as i128;
    let exponent = exponent - frac_part.len() as i128 + trailing_zeros;
    let exponent = i64::try_from(exponent)
        .map_err(|_| CanonicalError::NumberOutOfRange(literal.to_owned()))?;

    if negative {
        out.push(b'-');
    }
    out.extend((first..=last).map(digit));
    if exponent != 0 {
        out.push(b'e');
        write_i64(exponent, out);
    }
    Ok(())
}

/// The value of an exponent part (`""` or `e[+-]digits`): `None` if it is
/// malformed, `Some(None)` if it has too many digits to be in range.
fn parse_exponent(part: &[u8]) -> Option<Option<i128>> {
    let Some((marker, rest)) = part.split_first() else {
        return Some(Some(0));
    };
    if !matches!(marker, b'e' | b'E') {
        return None;
    }
    let (negative, digits) = match rest.split_first() {
        Some((b'-', digits)) => (true, digits),
        Some((b'+', digits)) => (false, digits),
        _ => (false, rest),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let significant = &digits[digits.iter().take_while(|&&b| b == b'0').count()..];
    if significant.len() > MAX_EXPONENT_DIGITS {
        return Some(None);
    }
    let magnitude = significant
        .iter()
        .fold(0i128, |acc, &b| acc * 10 + i128::from(b - b'0'));
    Some(Some(if negative { -magnitude } else { magnitude }))
}

fn write_i64(value: i64, out: &mut Vec<u8>) {
    if value < 0 {
        out.push(b'-');
    }
    let mut magnitude = value.unsigned_abs();
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[at..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(input: &str) -> String {
        String::from_utf8(canonical_key(input.as_bytes()).expect("valid JSON")).expect("UTF-8")
    }

    #[test]
    fn objects_are_sorted_and_compact() {
        assert_eq!(
            key(r#" { "b" : [1, 2] , "a" : {"y": null, "x": true} } "#),
            r#"{"a":{"x":true,"y":null},"b":[1,2]}"#
        );
    }

    #[test]
    fn later_duplicate_key_wins() {
        assert_eq!(key(r#"{"a": 1, "a": 2}"#), r#"{"a":2}"#);
    }

    #[test]
    fn arrays_keep_order() {
        assert_ne!(key("[1, 2]"), key("[2, 1]"));
    }

    #[test]
    fn strings_compare_by_decoded_value() {
        assert_eq!(key(r#""\u0041\/""#), r#""A/""#);
        assert_eq!(key(r#""\ud83d\ude00""#), "\"\u{1F600}\"");
        assert_eq!(
            key(r#""a\"b\\c\n\u0001\u007f""#),
            "\"a\\\"b\\\\c\\n\\u0001\u{7f}\""
        );
        assert_eq!(key(r#"{"\u00e9": 1}"#), "{\"\u{e9}\":1}");
    }

    #[test]
    fn numbers_are_exact_decimals() {
        for spelling in ["1", "1.0", "1e0", "10E-1", "0.1e1", "1.000E+0"] {
            assert_eq!(key(spelling), "1", "{spelling}");
        }
        assert_eq!(key("0.1"), key("0.10"));
        assert_eq!(key("-0"), "0");
        assert_eq!(key("-0.0e-7"), "0");
        assert_eq!(key("100"), "1e2");
        assert_eq!(key("-12.50"), "-125e-1");
        assert_eq!(key("0.001"), "1e-3");
        assert_ne!(key("0.1"), key("0.2"));
    }

    #[test]
    fn large_integers_compare_exactly() {
        // Equal as f64, different as numbers.
        assert_ne!(key("9007199254740993"), key("9007199254740992"));
        assert_ne!(
            key("100000000000000000000000000000001"),
            key("100000000000000000000000000000000")
        );
        assert_eq!(key("1e400"), "1e400");
    }

    #[test]
    fn exponents_beyond_i64_are_rejected_not_rounded() {
        assert_eq!(key("1e9223372036854775807"), "1e9223372036854775807");
        assert_eq!(key("1e-9223372036854775808"), "1e-9223372036854775808");
        assert!(matches!(
            canonical_key(b"1e9223372036854775808"),
            Err(CanonicalError::NumberOutOfRange(_))
        ));
        assert!(matches!(
            canonical_key(b"[1e1000000000000000000000000000000000000000]"),
            Err(CanonicalError::NumberOutOfRange(_))
        ));
        // Fraction digits and trailing zeros move the exponent back into range.
        assert_eq!(key("0.1e-9223372036854775807"), "1e-9223372036854775808");
        assert_eq!(key("10e9223372036854775806"), "1e9223372036854775807");
        // Zero needs no exponent.
        assert_eq!(key("0e99999999999999999999999999999999999999999"), "0");
    }

    #[test]
    fn syntax_errors_carry_serde_position() {
        let err = canonical_key(b"{\"a\": 1,\n  }").expect_err("trailing comma");
        assert!(
            matches!(&err, CanonicalError::Syntax(m) if m.contains("line 2 column 3")),
            "{err}"
        );
        for bad in [
            "",
            "NaN",
            "[1,]",
            "01",
            "1.",
            "\"\\ud800\"",
            "{\"a\"}",
            "[] []",
            "\u{feff}1",
        ] {
            assert!(canonical_key(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(canonical_key(b"\"\xff\"").is_err());
    }

    #[test]
    fn nesting_limit() {
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        assert!(canonical_key(deep(MAX_DEPTH).as_bytes()).is_ok());
        assert!(canonical_key(deep(MAX_DEPTH + 1).as_bytes()).is_err());
    }
}
