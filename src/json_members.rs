//! The members of a JSON object (and the elements of an array), found by
//! following its structure.
//!
//! Two hot paths read JSON without needing all of it: a request body is read
//! for a few top-level members (`model`, the output token cap), and a
//! provider's answer has a few members rewritten (`id`, `model`, `usage`,
//! ...) and the rest copied byte for byte. A full parse validates every
//! byte, most of them in message strings and arrays nobody looks into; on
//! small answers its cost per member outweighs the rewrite itself.
//!
//! Here strings are skipped by searching for their closing quote with
//! `memchr` (vectorised), and what is checked is exactly what decides where
//! a member of the object read begins and ends:
//!
//! - at the level read: the quotes of names, colons and commas, and that a
//!   value that is not a string, object or array is `true`, `false`, `null`
//!   or made of a number's characters (`-2.5e3`), so no quote can hide
//!   inside one;
//! - below it: quotes and escapes, and the nesting and matching of
//!   brackets, to any depth;
//! - that nothing but whitespace follows the document.
//!
//! So in a valid JSON document the members found are the ones a JSON parser
//! finds, and a document cut short anywhere yields nothing. What a member's
//! value holds below the level read (a misplaced comma deep in `choices`)
//! is not judged here; a caller that goes on to read an object inside a
//! value reads it with the same rules.

use std::borrow::Cow;
use std::ops::Range;

/// The text is not a JSON object (or array), or its structure breaks
/// somewhere.
#[derive(Debug, PartialEq, Eq)]
pub struct Malformed;

/// A member's name as found in the document.
#[derive(Clone, Debug)]
pub struct Name {
    /// Where it is written, quotes included.
    pub raw: Range<usize>,
    /// It holds a backslash: it must be decoded to be read.
    escaped: bool,
}

impl Name {
    /// The name, from `written`, the text at `raw` (quotes included):
    /// borrowed unless it holds escapes, so a name without any is not
    /// searched for them again. `None` when it does not decode.
    pub fn decode<'a>(&self, written: &'a str) -> Option<Cow<'a, str>> {
        if self.escaped {
            string(written)
        } else {
            Some(Cow::Borrowed(&written[1..written.len() - 1]))
        }
    }
}

/// Calls `each` with every member of the object `json`, in order: its name
/// and where its value is. On `Err`, the members before the break were
/// passed already and are to be disregarded.
pub fn each_member(json: &[u8], mut each: impl FnMut(Name, Range<usize>)) -> Result<(), Malformed> {
    each_item(json, [b'{', b'}'], |at| {
        expect(json, at, b'"')?;
        let name = name_at(json, at)?;
        let colon = skip_ws(json, name.raw.end);
        expect(json, colon, b':')?;
        let start = skip_ws(json, colon + 1);
        let end = value_end(json, start)?;
        each(name, start..end);
        Ok(end)
    })
}

/// The name whose opening quote is at `at`. Names are short, and one search
/// for a quote or a backslash finds the end of one without escapes (nearly
/// all of them) and tells it needs no decoding.
fn name_at(json: &[u8], at: usize) -> Result<Name, Malformed> {
    let from = at + 1;
    let found =
        memchr::memchr2(b'"', b'\\', json.get(from..).ok_or(Malformed)?).ok_or(Malformed)?;
    if json[from + found] == b'"' {
        Ok(Name {
            raw: at..from + found + 1,
            escaped: false,
        })
    } else {
        Ok(Name {
            raw: at..string_end(json, at)?,
            escaped: true,
        })
    }
}

/// Calls `each` with where every element of the array `json` is, in order.
/// On `Err`, as for [`each_member`].
pub fn each_element(json: &[u8], mut each: impl FnMut(Range<usize>)) -> Result<(), Malformed> {
    each_item(json, [b'[', b']'], |at| {
        let end = value_end(json, at)?;
        each(at..end);
        Ok(end)
    })
}

/// Walks the comma-separated items between the `brackets` that make up
/// the whole of `json`; `item` reads the one at the given offset and says
/// where it ends.
fn each_item(
    json: &[u8],
    [open, close]: [u8; 2],
    mut item: impl FnMut(usize) -> Result<usize, Malformed>,
) -> Result<(), Malformed> {
    let mut i = skip_ws(json, 0);
    expect(json, i, open)?;
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&close) {
        return only_ws_after(json, i + 1);
    }
    loop {
        i = skip_ws(json, item(i)?);
        match json.get(i) {
            Some(b',') => i = skip_ws(json, i + 1),
            Some(&b) if b == close => return only_ws_after(json, i + 1),
            _ => return Err(Malformed),
        }
    }
}

/// Where the first element of the array `json` is, reading no further: an
/// array can be megabytes long. `None` for an empty array, or one whose
/// structure breaks before its first element ends.
pub fn first_element(json: &[u8]) -> Option<Range<usize>> {
    let mut i = skip_ws(json, 0);
    expect(json, i, b'[').ok()?;
    i = skip_ws(json, i + 1);
    if json.get(i) == Some(&b']') {
        return None;
    }
    let end = value_end(json, i).ok()?;
    Some(i..end)
}

/// A JSON string as written (quotes included) decoded: borrowed unless it
/// holds escapes. `None` for anything else, or a string that does not
/// decode.
pub fn string(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
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
pub fn string_end(json: &[u8], at: usize) -> Result<usize, Malformed> {
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
        // A literal or a number, a word of letters, digits and `+-.`: what
        // follows it must then be a delimiter, so no quote or bracket is
        // taken into a value it does not belong to.
        Some(_) => {
            let len = json[at..]
                .iter()
                .position(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
                .unwrap_or(json.len() - at);
            let word = &json[at..at + len];
            let number = matches!(word.first(), Some(b'-' | b'0'..=b'9'))
                && word
                    .iter()
                    .all(|b| matches!(b, b'0'..=b'9' | b'+' | b'-' | b'.' | b'e' | b'E'));
            if number || matches!(word, b"true" | b"false" | b"null") {
                Ok(at + len)
            } else {
                Err(Malformed)
            }
        }
    }
}

/// Where the object or array opening at `at` closes. Open brackets are a
/// stack of bits (1 for an object) so each closing bracket is checked
/// against its opening one: 128 levels in a register, deeper ones spilled
/// to the heap. There is no depth limit, as clients' parsers (Python's,
/// JavaScript's) have none that a provider's answer could be kept within:
/// a limit here would refuse, or leave unread, what they read.
fn container_end(json: &[u8], at: usize) -> Result<usize, Malformed> {
    const WORD: u32 = u128::BITS;
    let mut open: u128 = 0;
    let mut spilled: Vec<u128> = Vec::new();
    let mut depth: u32 = 0;
    let mut i = at;
    loop {
        match *json.get(i).ok_or(Malformed)? {
            b'"' => {
                i = string_end(json, i)?;
                continue;
            }
            opening @ (b'{' | b'[') => {
                if depth > 0 && depth.is_multiple_of(WORD) {
                    spilled.push(open);
                    open = 0;
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
                if depth.is_multiple_of(WORD) {
                    open = spilled.pop().ok_or(Malformed)?;
                }
            }
            _ => {}
        }
        i += 1;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    /// Any JSON value.
    pub(crate) fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                proptest::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever an object or array holds, written compactly or pretty,
        /// the members and elements found are the ones serde_json reads.
        #[test]
        fn members_and_elements_are_what_a_parser_reads(
            object in proptest::collection::btree_map(".{0,8}", any_json(), 0..6),
            items in proptest::collection::vec(any_json(), 0..6),
            pretty in any::<bool>(),
        ) {
            let write = |v: &Value| if pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() };
            let object = Value::Object(object.into_iter().collect());
            let text = write(&object);
            let mut found = serde_json::Map::new();
            each_member(text.as_bytes(), |name, value| {
                let name = name.decode(&text[name.raw.clone()]).unwrap().into_owned();
                found.insert(name, serde_json::from_str(&text[value]).unwrap());
            }).unwrap();
            let parsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(Value::Object(found), parsed);

            let array = Value::from(items);
            let text = write(&array);
            let mut found = Vec::new();
            each_element(text.as_bytes(), |item| found.push(serde_json::from_str::<Value>(&text[item]).unwrap())).unwrap();
            let parsed: Value = serde_json::from_str(&text).unwrap();
            prop_assert_eq!(Value::from(found), parsed);
        }
    }

    fn members(json: &str) -> Result<Vec<(String, String)>, Malformed> {
        let mut found = Vec::new();
        each_member(json.as_bytes(), |name, value| {
            found.push((json[name.raw].to_owned(), json[value].to_owned()));
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
            // A quote cannot hide inside a bare value, taking the member
            // after it out of sight.
            r#"{"a":tru"id":"chatcmpl-1"}"#,
            r#"{"a":1"id":"chatcmpl-1"}"#,
            r#"{"a":nul{"id":"chatcmpl-1"}}"#,
            r#"{"a":undefined}"#,
            r#"{"a":1e5x}"#,
        ] {
            assert_eq!(members(broken), Err(Malformed), "{broken}");
        }
    }

    #[test]
    fn nesting_has_no_depth_limit_and_every_bracket_is_matched() {
        // Around and well past the 128 levels kept in a register.
        for depth in [1, 127, 128, 129, 255, 256, 257, 1000] {
            let opening: String = (0..depth)
                .map(|d| if d % 3 == 0 { '{' } else { '[' })
                .collect();
            let inner: String = (0..depth)
                .map(|d| if d % 3 == 0 { r#""k":"# } else { "" })
                .zip(opening.chars())
                .map(|(name, bracket)| format!("{bracket}{name}"))
                .collect();
            let closing: String = opening
                .chars()
                .rev()
                .map(|b| if b == '{' { '}' } else { ']' })
                .collect();
            let document = format!(r#"{{"a":{inner}1{closing},"b":2}}"#);
            let found = members(&document).unwrap();
            assert_eq!(found[0].1, format!("{inner}1{closing}"), "depth {depth}");
            assert_eq!(
                found[1],
                ("\"b\"".to_owned(), "2".to_owned()),
                "depth {depth}"
            );
            // One bracket swapped at any level is caught.
            for level in [0, depth / 2, depth - 1] {
                let mut wrong: Vec<char> = closing.chars().collect();
                let at = depth - 1 - level;
                wrong[at] = if wrong[at] == '}' { ']' } else { '}' };
                let wrong: String = wrong.into_iter().collect();
                let document = format!(r#"{{"a":{inner}1{wrong},"b":2}}"#);
                assert_eq!(
                    members(&document),
                    Err(Malformed),
                    "depth {depth}, level {level}"
                );
            }
        }
    }

    fn elements(json: &str) -> Result<Vec<String>, Malformed> {
        let mut found = Vec::new();
        each_element(json.as_bytes(), |element| {
            found.push(json[element].to_owned())
        })?;
        Ok(found)
    }

    #[test]
    fn arrays_yield_their_elements() {
        let array = r#" [{"a":[1,"]"]}, "x\"y", -1.5e3 ,null,[], {}] "#;
        assert_eq!(
            elements(array).unwrap(),
            [
                r#"{"a":[1,"]"]}"#,
                r#""x\"y""#,
                "-1.5e3",
                "null",
                "[]",
                "{}"
            ]
        );
        assert_eq!(elements("[]").unwrap(), Vec::<String>::new());
        for cut in 0..array.trim_end().len() {
            assert_eq!(elements(&array[..cut]), Err(Malformed), "cut at {cut}");
        }
        for broken in [
            "{}",
            "[1,]",
            "[,1]",
            "[1 2]",
            "[1]]",
            r#"[tru"e"]"#,
            "[DONE]",
            "[1x]",
        ] {
            assert_eq!(elements(broken), Err(Malformed), "{broken}");
        }
        let first = |json: &str| first_element(json.as_bytes()).map(|r| json[r].to_owned());
        assert_eq!(first(array).as_deref(), Some(r#"{"a":[1,"]"]}"#));
        // Only the first element is read: what follows it is not judged.
        assert_eq!(
            first(r#"[{"object":"embedding"}, oops"#).as_deref(),
            Some(r#"{"object":"embedding"}"#)
        );
        assert_eq!(first("[]"), None);
        assert_eq!(first(r#"[{"a":1"#), None);
    }

    #[test]
    fn names_are_borrowed_unless_they_hold_escapes() {
        let json = r#"{"plain":1,"we\"ird":2,"mod\u0065l":3,"tail\\":4, "x" :5}"#;
        let mut names = Vec::new();
        each_member(json.as_bytes(), |name, _| {
            names.push(name.decode(&json[name.raw.clone()]).unwrap())
        })
        .unwrap();
        assert_eq!(names, ["plain", "we\"ird", "model", "tail\\", "x"]);
        let borrowed = names.iter().map(|n| matches!(n, Cow::Borrowed(_)));
        assert_eq!(
            borrowed.collect::<Vec<_>>(),
            [true, false, false, false, true]
        );
    }

    #[test]
    fn strings_decode_escapes_only_when_there_are_some() {
        assert!(matches!(
            string(r#""gpt-4o""#),
            Some(Cow::Borrowed("gpt-4o"))
        ));
        assert_eq!(string(r#""gpt\u002d4o""#).as_deref(), Some("gpt-4o"));
        assert_eq!(string(r#""bad \x""#), None);
        assert_eq!(string("12"), None);
    }
}
