//! The top-level members of a JSON object, found by its structure alone.
//!
//! A request body is read for a few top-level members (`model`, the output
//! token cap) and is otherwise the provider's to judge. A full parse
//! validates every byte of it, and on the large bodies of long
//! conversations nearly all of that time goes into message strings. Here
//! strings are skipped by searching for their closing quote with `memchr`
//! (vectorised), and nothing is checked
//! beyond what locates the members: quotes and escapes, the nesting and
//! matching of brackets, the colons and commas of the top level, and that
//! nothing follows the object. A body whose structure breaks anywhere
//! yields nothing.

use std::borrow::Cow;

/// The body is not a JSON object, or its structure breaks somewhere.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// Deepest nesting followed (serde_json's limit too).
const MAX_DEPTH: u32 = 128;

/// Calls `each` with every top-level member of the object `json`, in
/// order: its name and its value, both as written (a name with its quotes,
/// see [`string`]). On `Err`, the members before the break were passed
/// already and are to be disregarded.
pub fn each_member<'a>(
    json: &'a [u8],
    mut each: impl FnMut(&'a [u8], &'a [u8]),
) -> Result<(), Malformed> {
    let mut i = skip_ws(json, 0);
    expect(json, i, b'{')?;
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b'}') {
        return only_ws_after(json, i + 1);
    }
    loop {
        expect(json, i, b'"')?;
        let name_end = string_end(json, i)?;
        let name = &json[i..name_end];
        i = skip_ws(json, name_end);
        expect(json, i, b':')?;
        let start = skip_ws(json, i + 1);
        let end = value_end(json, start)?;
        each(name, &json[start..end]);
        i = skip_ws(json, end);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(b'}') => return only_ws_after(json, i + 1),
            _ => return Err(Malformed),
        }
    }
}

/// A JSON string as written (quotes included) decoded: borrowed unless it
/// holds escapes. `None` for anything else, or a string that does not
/// decode.
pub fn string(raw: &[u8]) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    if inner.contains(&b'\\') {
        serde_json::from_slice::<String>(raw).ok().map(Cow::Owned)
    } else {
        std::str::from_utf8(inner).ok().map(Cow::Borrowed)
    }
}

fn skip_ws(json: &[u8], mut i: usize) -> usize {
    while matches!(json.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

fn expect(json: &[u8], i: usize, byte: u8) -> Result<(), Malformed> {
    if json.get(i) == Some(&byte) {
        Ok(())
    } else {
        Err(Malformed)
    }
}

fn only_ws_after(json: &[u8], i: usize) -> Result<(), Malformed> {
    if skip_ws(json, i) == json.len() {
        Ok(())
    } else {
        Err(Malformed)
    }
}

/// Where the string whose opening quote is at `at` ends (after its closing
/// quote). Only quotes are searched for: a quote after an odd number of
/// backslashes is escaped (they pair up before it), so the many `\n` of a
/// long message cost nothing.
fn string_end(json: &[u8], at: usize) -> Result<usize, Malformed> {
    let mut from = at + 1;
    loop {
        let quote =
            from + memchr::memchr(b'"', json.get(from..).ok_or(Malformed)?).ok_or(Malformed)?;
        let backslashes = json[at + 1..quote]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Ok(quote + 1);
        }
        from = quote + 1;
    }
}

/// Where the value that starts at `at` ends.
fn value_end(json: &[u8], at: usize) -> Result<usize, Malformed> {
    match json.get(at) {
        None => Err(Malformed),
        Some(b'"') => string_end(json, at),
        Some(b'{' | b'[') => container_end(json, at),
        // A number or a literal: up to what may follow a value.
        Some(_) => {
            let len = json[at..]
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(json.len() - at);
            if len == 0 {
                Err(Malformed)
            } else {
                Ok(at + len)
            }
        }
    }
}

/// Where the object or array opening at `at` closes. Open brackets are a
/// stack of bits (1 for an object) so each closing bracket is checked
/// against its opening one.
fn container_end(json: &[u8], at: usize) -> Result<usize, Malformed> {
    let mut open: u128 = 0;
    let mut depth = 0;
    let mut i = at;
    loop {
        match *json.get(i).ok_or(Malformed)? {
            b'"' => {
                i = string_end(json, i)?;
                continue;
            }
            opening @ (b'{' | b'[') => {
                if depth == MAX_DEPTH {
                    return Err(Malformed);
                }
                open = (open << 1) | u128::from(opening == b'{');
                depth += 1;
            }
            closing @ (b'}' | b']') => {
                if depth == 0 || (open & 1 == 1) != (closing == b'}') {
                    return Err(Malformed);
                }
                open >>= 1;
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            _ => {}
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(json: &str) -> Result<Vec<(String, String)>, Malformed> {
        let mut found = Vec::new();
        each_member(json.as_bytes(), |name, value| {
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).unwrap();
            found.push((text(name), text(value)));
        })?;
        Ok(found)
    }

    const DOCUMENT: &str = r#" {"messages": [{"role":"user","content":"a \"quoted\" }] {[ \\"},
        {"content": "\u00e9\\\"", "n": [1, -2.5e3, true, null, {}, []]}],
      "model" :"gpt-4o", "max_tokens":100 ,"empty":{}, "tail":"\\"}
    "#;

    #[test]
    fn finds_each_member_with_its_raw_value() {
        let found = members(DOCUMENT).unwrap();
        let names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "\"messages\"",
                "\"model\"",
                "\"max_tokens\"",
                "\"empty\"",
                "\"tail\""
            ]
        );
        assert!(found[0].1.starts_with("[{\"role\""));
        assert!(found[0].1.ends_with("{}, []]}]"));
        assert_eq!(found[1].1, "\"gpt-4o\"");
        assert_eq!(found[2].1, "100");
        assert_eq!(found[3].1, "{}");
        assert_eq!(found[4].1, r#""\\""#);
        // Each raw value is what serde_json reads there.
        let parsed: serde_json::Value = serde_json::from_str(DOCUMENT).unwrap();
        for (name, raw) in &found {
            let name: String = serde_json::from_str(name).unwrap();
            let value: serde_json::Value = serde_json::from_str(raw).unwrap();
            assert_eq!(parsed[&name], value, "{name}");
        }
        // Quotes after an odd number of backslashes are escaped.
        let escapes = r#"{"s":"x\\\"y\\\\","t":1}"#;
        let found = members(escapes).unwrap();
        assert_eq!(found[0].1, r#""x\\\"y\\\\""#);
        assert_eq!(found[1].1, "1");
        assert_eq!(members("{}").unwrap(), []);
        assert_eq!(members(" { } ").unwrap(), []);
    }

    #[test]
    fn a_document_cut_short_anywhere_yields_nothing() {
        for cut in 0..DOCUMENT.trim_end().len() {
            assert_eq!(members(&DOCUMENT[..cut]), Err(Malformed), "cut at {cut}");
        }
    }

    #[test]
    fn broken_structure_yields_nothing() {
        for broken in [
            "",
            "[]",
            "\"model\"",
            r#"{"a":[1}"#,
            r#"{"a":{"b":1]}"#,
            r#"{"a":1]"#,
            r#"{"a" 1}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":1 "b":2}"#,
            r#"{a:1}"#,
            r#"{"a":1} x"#,
            r#"{"a":1}}"#,
            r#"{"a":"\"}"#,
        ] {
            assert_eq!(members(broken), Err(Malformed), "{broken}");
        }
        let deep = |n| format!(r#"{{"a":{}{}}}"#, "[".repeat(n), "]".repeat(n));
        assert!(members(&deep(MAX_DEPTH as usize)).is_ok());
        assert_eq!(members(&deep(MAX_DEPTH as usize + 1)), Err(Malformed));
    }

    #[test]
    fn strings_decode_escapes_only_when_there_are_some() {
        assert!(matches!(
            string(br#""gpt-4o""#),
            Some(Cow::Borrowed("gpt-4o"))
        ));
        assert_eq!(string(br#""gpt\u002d4o""#).as_deref(), Some("gpt-4o"));
        assert_eq!(string(br#""bad \x""#), None);
        assert_eq!(string(b"12"), None);
        assert_eq!(string(b"\"\xff\""), None);
    }
}
