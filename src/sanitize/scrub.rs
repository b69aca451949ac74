//! Removing anything that looks like key material from provider text that is
//! passed on to clients (the human message of a 400/404/413/422, an error
//! event inside a stream, a provider error in a successful JSON answer).
//!
//! The text is cut into tokens (runs of characters that occur in API keys and
//! their masked forms); a token is replaced by `[redacted]` when it looks like
//! a credential: a known key prefix (`sk-`, `sk_`, `AIza`, ...) at its start
//! or glued on by `=`, `/`, `+`, `.` or `*` (`key=sk-...`), a masked key
//! (`****`), an account id (`org-…`, `proj_…` with digits), or a long mix of
//! letters and digits. A token holding `%XX` escapes is also judged as it
//! reads decoded (`sk%2Dproj%2D…`, `key%3Dsk-…`); a lone `%` (`100%`) is
//! no escape. The served key itself, and its edges (see [`edges`]),
//! are searched for anywhere in the text, since key material may hold any
//! punctuation (`:`, `!`, `"`, ...) that ends a token: each place one is
//! quoted goes, with the token characters around it.
//!
//! A JSON document (an error event in a stream, a provider error in a
//! successful answer) is scrubbed as its reader reads it ([`scrub_document`]):
//! string by string, each decoded first, since an escape (`\u0073k-…`,
//! `sk-proj\/…`, a key's `"` written `\"`) hides nothing from the client's
//! parser.

use crate::json_members;
use crate::secret::Secret;
use memchr::memmem;
use std::borrow::Cow;
use std::ops::Range;

const REDACTED: &[u8] = b"[redacted]";

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'/' | b'=' | b'.' | b'*' | b'%')
}

/// Where the tokens of `text` are.
fn tokens(text: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut from = 0;
    std::iter::from_fn(move || {
        let start = from + text[from..].iter().position(|&b| is_token_byte(b))?;
        from = text[start..]
            .iter()
            .position(|&b| !is_token_byte(b))
            .map_or(text.len(), |len| start + len);
        Some(start..from)
    })
}

/// `span` grown over the token characters on either side of it: a quoted
/// edge goes with the rest of the key around it (`sk-proj-…wxyz.`).
fn widened(text: &[u8], span: Range<usize>) -> Range<usize> {
    let start = text[..span.start]
        .iter()
        .rposition(|&b| !is_token_byte(b))
        .map_or(0, |at| at + 1);
    let end = text[span.end..]
        .iter()
        .position(|&b| !is_token_byte(b))
        .map_or(text.len(), |len| span.end + len);
    start..end
}

/// Longest start of a key matched (OpenAI quotes `sk-proj-****wxyz`).
const HEAD: usize = 8;
/// The end matched: providers quote a key's last four characters.
const TAIL: usize = 4;
/// Shortest start matched: the first four characters of an operator-chosen
/// key are often a word (`test`, `prod`) that ordinary text contains.
const MIN_HEAD: usize = 5;

/// The parts of the served key that mark a token as quoting it: its last
/// four characters, and its first eight, or its first half when that is
/// shorter (a provider masking a short key shows less of it; key material
/// has at least ten characters, so at least five).
fn edges(key: &[u8]) -> Option<(&[u8], &[u8])> {
    let head = (key.len() / 2).min(HEAD);
    (head >= MIN_HEAD).then(|| (&key[..head], &key[key.len() - TAIL..]))
}

/// What marks text as quoting the served key: the whole key (its middle
/// may hold characters that end a token) and its edges.
fn key_parts(key: &[u8]) -> impl Iterator<Item = &[u8]> {
    let (head, tail) = edges(key).unzip();
    [Some(key), head, tail]
        .into_iter()
        .flatten()
        .filter(|part| !part.is_empty())
}

/// Where `text` quotes the served key, as written.
fn raw_quotes<'t>(text: &'t [u8], key: &'t [u8]) -> impl Iterator<Item = Range<usize>> + 't {
    key_parts(key)
        .flat_map(move |part| memmem::find_iter(text, part).map(move |at| at..at + part.len()))
}

/// Where `text` quotes the served key, each place widened to the token
/// around it. The quotes are taken in order and joined where they touch
/// (`sk-proj-sk-proj-…` repeats the key's head), and one that ends inside
/// the span already taken adds nothing, so long tokens cost one pass.
fn key_quotes(text: &[u8], key: &[u8]) -> Vec<Range<usize>> {
    let mut taken = 0;
    merged(raw_quotes(text, key).collect())
        .into_iter()
        .filter_map(|quote| {
            if quote.end <= taken {
                return None;
            }
            let span = widened(text, quote.start.max(taken)..quote.end);
            taken = span.end;
            Some(span)
        })
        .collect()
}

/// Where a key may begin inside a token: at its start, or after a
/// character that glues it to what precedes it (`key=sk-…`, `…/sk-…`).
/// Not after `-` or `_`, which join the words of a name (`api-key-header`).
fn starts(token: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::once(token).chain(
        token
            .iter()
            .enumerate()
            .filter(|(_, b)| matches!(b, b'=' | b'/' | b'+' | b'.' | b'*'))
            .map(move |(i, _)| &token[i + 1..]),
    )
}

/// An organisation, project or user id (`org-…`, `proj_…`, `user-…`):
/// letters and digits after the prefix, at least one a digit, so that
/// words such as `org-wide` stay.
fn is_account_id(start: &[u8]) -> bool {
    const ACCOUNTS: [&[u8]; 5] = [b"org-", b"org_", b"proj_", b"user-", b"user_"];
    ACCOUNTS.iter().any(|p| {
        start.strip_prefix(*p).is_some_and(|rest| {
            let id = rest.iter().take_while(|b| b.is_ascii_alphanumeric());
            id.clone().count() >= 8 && id.clone().any(u8::is_ascii_digit)
        })
    })
}

/// Whether a token has the shape of a credential, whoever's it is.
fn has_secret_shape(token: &[u8]) -> bool {
    const PREFIXES: [&[u8]; 6] = [b"sk-", b"sk_", b"AIza", b"key-", b"rk_", b"pk_"];
    let keyed =
        |start: &[u8]| PREFIXES.iter().any(|p| start.starts_with(p)) || is_account_id(start);
    if starts(token).any(keyed) || token.windows(3).any(|w| w == b"***") {
        return true;
    }
    let has_digit = token.iter().any(u8::is_ascii_digit);
    let has_alpha = token.iter().any(u8::is_ascii_alphabetic);
    token.len() >= 24 && has_digit && has_alpha
}

/// How many times an escape is decoded (`%252D` is `-` encoded twice):
/// enough for text that went through a URL twice, and bounded, as each
/// round copies the token (`%252525…` would take one round per `25`).
const DECODE_ROUNDS: usize = 3;

/// `token` with its `%XX` escapes decoded, again while the result holds
/// some, up to [`DECODE_ROUNDS`] times; `None` when it holds none.
fn percent_decoded(token: &[u8]) -> Option<Vec<u8>> {
    let mut decoded: Option<Vec<u8>> = None;
    for _ in 0..DECODE_ROUNDS {
        let text = decoded.as_deref().unwrap_or(token);
        match Cow::from(percent_encoding::percent_decode(text)) {
            Cow::Borrowed(_) => break,
            Cow::Owned(again) => decoded = Some(again),
        }
    }
    decoded
}

/// Whether a token is credential-like as written, or as it reads once its
/// escapes are decoded: then any of its decoded tokens may be, and it may
/// quote the served key.
fn looks_secret(token: &[u8], key: Option<&[u8]>) -> bool {
    has_secret_shape(token)
        || percent_decoded(token).is_some_and(|text| {
            tokens(&text).any(|t| has_secret_shape(&text[t]))
                || key.is_some_and(|k| key_parts(k).any(|part| memmem::find(&text, part).is_some()))
        })
}

/// The places to redact, in order and without overlaps (a token that both
/// looks secret and quotes the key goes once).
fn merged(mut spans: Vec<Range<usize>>) -> Vec<Range<usize>> {
    spans.sort_unstable_by_key(|span| span.start);
    let mut out: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for span in spans {
        match out.last_mut() {
            Some(last) if span.start <= last.end => last.end = last.end.max(span.end),
            _ => out.push(span),
        }
    }
    out
}

/// `text` with every credential-looking token, and every quote of the
/// served key, replaced. `key` is the provider key that served the
/// request, when known.
pub fn scrub<'a>(text: &'a [u8], key: Option<&Secret>) -> Cow<'a, [u8]> {
    // Searching for the key and its edges needs its bytes; nothing is kept.
    let key = key.map(|k| k.expose().as_bytes());
    let mut spans = key.map_or_else(Vec::new, |k| key_quotes(text, k));
    spans.extend(tokens(text).filter(|t| looks_secret(&text[t.clone()], key)));
    replace(text, merged(spans), REDACTED)
}

/// What goes in place of a value outside a JSON document's strings (a
/// number holding the key's last four digits): a string, so the document
/// still parses.
const REDACTED_VALUE: &[u8] = b"\"[redacted]\"";

/// What lies between a JSON document's strings (structure, numbers,
/// literals) scrubbed: each number or literal that looks secret or is part
/// of a quote of the key becomes `"[redacted]"`. Structure (`:`, `,`,
/// brackets) is never replaced, even inside a quote of a key that holds
/// such characters, so the document keeps its shape.
fn scrub_structure<'a>(text: &'a [u8], key: Option<&[u8]>) -> Cow<'a, [u8]> {
    let quotes = merged(key.map_or_else(Vec::new, |k| raw_quotes(text, k).collect()));
    let mut quotes = quotes.iter().peekable();
    let spans = tokens(text)
        .filter(|t| {
            while quotes.next_if(|q| q.end <= t.start).is_some() {}
            quotes.peek().is_some_and(|q| q.start < t.end) || looks_secret(&text[t.clone()], key)
        })
        .collect();
    replace(text, spans, REDACTED_VALUE)
}

/// `text` with each of `spans` (in order, apart) replaced by `marker`.
fn replace<'a>(text: &'a [u8], spans: Vec<Range<usize>>, marker: &[u8]) -> Cow<'a, [u8]> {
    if spans.is_empty() {
        return Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len());
    let mut copied = 0;
    for span in spans {
        out.extend_from_slice(&text[copied..span.start]);
        out.extend_from_slice(marker);
        copied = span.end;
    }
    out.extend_from_slice(&text[copied..]);
    Cow::Owned(out)
}

/// `doc` scrubbed as its reader reads it. A JSON document (one opening
/// with `{`, `[` or `"`) is read string by string, member names included:
/// each is decoded, scrubbed, and written again escaped when something in
/// it went; what lies between its strings is scrubbed by
/// [`scrub_structure`]. Strings are found by their quotes alone, as the
/// sanitizer finds them, so this holds for any document it passes on, to
/// any depth, and leaves everything that stays byte for byte as it was.
/// Anything else is scrubbed as text.
pub fn scrub_document<'a>(doc: &'a [u8], key: Option<&Secret>) -> Cow<'a, [u8]> {
    if !matches!(doc.trim_ascii_start().first(), Some(b'{' | b'[' | b'"')) {
        return scrub(doc, key);
    }
    let exposed = key.map(|k| k.expose().as_bytes());
    let mut out = Vec::with_capacity(doc.len());
    let mut changed = false;
    let mut add = |piece: Cow<[u8]>| {
        changed |= matches!(piece, Cow::Owned(_));
        out.extend_from_slice(&piece);
    };
    let mut at = 0;
    while let Some(open) = memchr::memchr(b'"', &doc[at..]).map(|n| at + n) {
        let Ok(end) = json_members::string_end(doc, open) else {
            break; // unterminated: the rest is text
        };
        add(scrub_structure(&doc[at..open], exposed));
        add(scrub_string(&doc[open..end], key));
        at = end;
    }
    add(scrub_structure(&doc[at..], exposed));
    if changed {
        Cow::Owned(out)
    } else {
        Cow::Borrowed(doc)
    }
}

/// One JSON string as written (quotes included), scrubbed as it decodes.
/// One that does not decode strictly may still decode in a lenient client
/// (JavaScript's and Python's parsers take a lone surrogate, `\ud800`):
/// if it holds escapes they could hide key text behind, it goes whole;
/// otherwise it is scrubbed as written.
fn scrub_string<'a>(raw: &'a [u8], key: Option<&Secret>) -> Cow<'a, [u8]> {
    let Some(text) = std::str::from_utf8(raw).ok().and_then(json_members::string) else {
        return if raw.contains(&b'\\') {
            Cow::Owned(REDACTED_VALUE.to_vec())
        } else {
            scrub(raw, key)
        };
    };
    match scrub(text.as_bytes(), key) {
        Cow::Borrowed(_) => Cow::Borrowed(raw),
        Cow::Owned(scrubbed) => {
            // Only ASCII runs were replaced: the text is still UTF-8.
            let scrubbed = String::from_utf8_lossy(&scrubbed);
            let mut out = Vec::with_capacity(scrubbed.len() + 2);
            serde_json::to_writer(&mut out, &*scrubbed)
                .expect("a str always serializes into a Vec");
            Cow::Owned(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str, key: Option<&str>) -> String {
        let key = key.map(|k| Secret::new(k.into()));
        String::from_utf8(scrub(text.as_bytes(), key.as_ref()).into_owned()).unwrap()
    }

    #[test]
    fn key_like_tokens_go() {
        assert_eq!(
            s(
                "Incorrect API key provided: sk-proj-****************abcd.",
                None
            ),
            "Incorrect API key provided: [redacted]"
        );
        assert_eq!(s("token AIzaSyA1b2C3 bad", None), "token [redacted] bad");
        assert_eq!(
            s("id dGhpcyBpcyBhIHNlY3JldCB0b2tlbjEyMw== end", None),
            "id [redacted] end"
        );
    }

    #[test]
    fn keys_glued_to_a_name_go() {
        for text in [
            "key=sk-1234567890abcdef",
            "key=sk-abcd...wxyz",
            "previous key=sk-proj-ab12...yz89 was rotated",
            "path/sk-proj-Ab12Cd34",
        ] {
            let out = s(text, None);
            assert!(!out.contains("sk-"), "{out} from {text}");
        }
        // Dashes and underscores join words; `sk-` after them is not a key.
        let msg = "the x-api-key-header and risk-free task-sk-like_names";
        assert_eq!(s(msg, None), msg);
    }

    #[test]
    fn percent_encoded_keys_go() {
        for text in [
            "bad key sk%2Dproj%2DAb12Cd34",
            "the query said key%3Dsk-1234567890abcdef",
            "twice encoded sk%252Dproj%252DAb12Cd34",
            "url ?token=org%2DSECRETORG123",
        ] {
            let out = s(text, None);
            assert!(out.ends_with("[redacted]"), "{out} from {text}");
        }
        // The served key's start, encoded as it would be in a URL.
        let key = "pass:word!1234567890";
        assert_eq!(
            s("key pass%3Awor... was refused", Some(key)),
            "key [redacted] was refused"
        );
    }

    #[test]
    fn percent_signs_in_ordinary_text_stay() {
        let key = "zzzzFAKEKEY0000000000wxyz";
        for msg in [
            "You have used 100% of the quota; 50% of it in the last minute.",
            "a 20%-off discount, %s placeholders and %% signs",
            "top_p must be within 0%-100%",
        ] {
            assert_eq!(s(msg, Some(key)), msg);
        }
    }

    #[test]
    fn account_ids_go() {
        assert_eq!(
            s(
                "organization org-SECRETORG123 project proj_abcdefgh1234.",
                None
            ),
            "organization [redacted] project [redacted]"
        );
        assert_eq!(
            s("user user-abc123def456 said", None),
            "user [redacted] said"
        );
        assert_eq!(s("owner=org-abc12345", None), "[redacted]");
        let msg = "an org-wide limit for user-defined proj_settings";
        assert_eq!(s(msg, None), msg);
    }

    #[test]
    fn the_keys_own_edges_go() {
        let key = "zzzzFAKEKEY0000000000wxyz";
        assert_eq!(
            s("key ending in wxyz was refused", Some(key)),
            "key ending in [redacted] was refused"
        );
        assert_eq!(s("begins zzzzFAKE", Some(key)), "begins [redacted]");
    }

    #[test]
    fn a_short_keys_edges_go_too() {
        let key = "Zq7sh0rtK3y9";
        assert_eq!(
            s("key Zq7sh0.. ending in K3y9 was throttled", Some(key)),
            "key [redacted] ending in [redacted] was throttled"
        );
        // The shortest key there is: ten characters.
        let key = "abcd123456";
        assert_eq!(s("abcd1.. / 3456", Some(key)), "[redacted] / [redacted]");
        assert_eq!(s("abcd 456 abc1 2345", Some(key)), "abcd 456 abc1 2345");
    }

    #[test]
    fn a_key_with_punctuation_goes_wherever_it_is_quoted() {
        let key = r#"Ab:cd%Ef!gh~Ij@kl"mn\op"#;
        for (text, expected) in [
            (
                r#"Incorrect API key provided: Ab:cd%Ef!gh~Ij@kl"mn\op."#,
                "Incorrect API key provided: [redacted]",
            ),
            ("key Ab:cd%Ef.. was refused", "key [redacted] was refused"),
            (
                r#"key ending in "mn\op" was refused"#,
                r#"key ending in "[redacted]" was refused"#,
            ),
            (r#"(last four: n\op)"#, "(last four: [redacted])"),
        ] {
            assert_eq!(s(text, Some(key)), expected, "{text}");
        }
    }

    #[test]
    fn ordinary_words_survive_a_keys_edges() {
        let key = "zzzzFAKEKEY0000000000wxyz";
        let msg = "Invalid value for 'temperature': must be <= 2.0 (model gpt-4o-mini).";
        assert_eq!(s(msg, Some(key)), msg);
        let short = "test01key9";
        let msg = "the latest request for model gpt-4o was too long";
        assert_eq!(s(msg, Some(short)), msg);
    }

    #[test]
    fn ordinary_messages_stay() {
        let msg = "Invalid value for 'temperature': must be <= 2.0 (model gpt-4o-mini).";
        assert_eq!(s(msg, None), msg);
        assert!(matches!(scrub(msg.as_bytes(), None), Cow::Borrowed(_)));
    }

    proptest::proptest! {
        /// Wherever a provider quotes the served key's start or end, in
        /// whatever text, neither reaches the client.
        #[test]
        fn quoted_edges_never_survive(
            key in "[!-~]{10,64}",
            before in "[a-z ,.:'()]{0,30}",
            after in "[a-z ,.:'()]{0,30}",
            glue in "[A-Za-z0-9*]{0,3}",
        ) {
            let head = &key[..(key.len() / 2).min(HEAD)];
            let tail = &key[key.len() - TAIL..];
            let text = format!("{before}{glue}{head}{glue} ... {tail}{after}");
            // The marker's own letters may spell part of a key.
            let out = s(&text, Some(&key)).replace("[redacted]", "\0");
            proptest::prop_assert!(!out.contains(head), "{} from {}", out, text);
            proptest::prop_assert!(!out.contains(tail), "{} from {}", out, text);
        }

        /// Nor in a JSON error document, however its message is escaped:
        /// what a client decodes holds neither.
        #[test]
        fn escaped_edges_never_survive(
            key in "[!-~]{10,64}",
            before in "[a-z ,.:'()]{0,30}",
            every_char_escaped in proptest::bool::ANY,
        ) {
            let head = &key[..(key.len() / 2).min(HEAD)];
            let tail = &key[key.len() - TAIL..];
            let message = format!("{before}{head}... ending {tail}; whole {key}");
            let quoted = if every_char_escaped {
                let escaped: String = message.chars().map(|c| format!("\\u{:04x}", c as u32)).collect();
                format!("\"{escaped}\"")
            } else {
                serde_json::to_string(&message).unwrap()
            };
            let document = format!(r#"{{"error":{{"message":{quoted}}}}}"#);
            let out = message_of(&document, Some(&key)).replace("[redacted]", "\0");
            proptest::prop_assert!(!out.contains(head), "{} from {}", out, document);
            proptest::prop_assert!(!out.contains(tail), "{} from {}", out, document);
        }
    }

    fn doc(text: &str, key: Option<&str>) -> String {
        let key = key.map(|k| Secret::new(k.into()));
        String::from_utf8(scrub_document(text.as_bytes(), key.as_ref()).into_owned()).unwrap()
    }

    /// The message of an error document scrubbed, as a client decodes it.
    fn message_of(document: &str, key: Option<&str>) -> String {
        let out = doc(document, key);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        v["error"]["message"].as_str().unwrap().to_owned()
    }

    #[test]
    fn json_stays_valid() {
        let document = r#"{"error":{"message":"bad key sk-abc123def456","type":"x"}}"#;
        assert_eq!(message_of(document, None), "bad key [redacted]");
    }

    #[test]
    fn a_number_quoting_the_key_leaves_the_document_valid() {
        let key = "zzzzFAKEKEY00000001234";
        let out = doc(
            r#"{"error":{"code":91234,"message":"key ...1234 refused","retry":[1234.5]}}"#,
            Some(key),
        );
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(v["error"]["code"], "[redacted]");
        assert_eq!(v["error"]["retry"][0], "[redacted]");
        assert_eq!(v["error"]["message"], "key [redacted] refused");
    }

    #[test]
    fn escapes_are_decoded_a_bounded_number_of_times() {
        // `%25` decodes to `%`: each round takes one `25` off.
        let token = format!("%{}2D", "25".repeat(1000));
        let decoded = percent_decoded(token.as_bytes()).unwrap();
        assert_eq!(decoded.len(), token.len() - 2 * DECODE_ROUNDS);
        assert_eq!(
            percent_decoded(b"sk%252Dproj").as_deref(),
            Some(&b"sk-proj"[..])
        );
    }

    #[test]
    fn a_key_quoted_over_and_over_in_one_token_is_one_place() {
        let key = b"sk-proj-Zq7abc0123456789wxyz";
        let text = "sk-proj-".repeat(20_000);
        assert_eq!(key_quotes(text.as_bytes(), key).len(), 1);
        assert_eq!(s(&text, Some("sk-proj-Zq7abc0123456789wxyz")), "[redacted]");
    }

    #[test]
    fn a_string_only_a_lenient_parser_reads_goes_whole() {
        // A lone surrogate: serde_json refuses it, browsers and Python read
        // the key's edges behind the escapes that follow it.
        let key = "zzzzFAKEKEY0000000000wxyz";
        let document = r#"{"error":{"message":"\ud800 key \u007azzzFAKE... ending \u0077xyz"}}"#;
        assert_eq!(
            doc(document, Some(key)),
            r#"{"error":{"message":"[redacted]"}}"#
        );
    }

    #[test]
    fn a_key_holding_structure_leaves_the_structure() {
        for (key, document, path) in [
            (
                "acct42.secretpart:123",
                r#"{"error":{"message":"quota","code":1234}}"#,
                "/error/code",
            ),
            (
                "acct42.secretpart1,2]",
                r#"{"error":{"message":"x","retry":[1,2]}}"#,
                "/error/retry/1",
            ),
        ] {
            let out = doc(document, Some(key));
            let v: serde_json::Value =
                serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!(v.pointer(path).unwrap(), "[redacted]", "{out}");
        }
    }

    #[test]
    fn json_escapes_hide_nothing() {
        let key = r#"Ab:cd%Ef!gh~Ij@kl"mn\op"#;
        for (message, leak) in [
            (r#"bad key \u0073k-proj-Ab12Cd"#, "Ab12Cd"),
            (r#"bad key sk-proj\/Ab12Cd34Ef56"#, "Ab12Cd34Ef56"),
            (r#"served key Ab:cd%Ef!gh~Ij@kl\"mn\\op"#, "Ab:cd%Ef"),
            (r#"key ending in n\\op"#, r#"n\op"#),
            (r#"key \u0041b:cd%Ef.. refused"#, "b:cd%Ef"),
        ] {
            let document = format!(r#"{{"error":{{"message":"{message}","type":"x"}}}}"#);
            let out = message_of(&document, Some(key));
            assert!(
                out.contains("[redacted]") && !out.contains(leak),
                "{out} from {document}"
            );
        }
        // Member names are strings too.
        let named = doc(r#"{"error":{"sk\u002dAb12Cd34":1}}"#, None);
        assert_eq!(named, r#"{"error":{"[redacted]":1}}"#);
    }

    #[test]
    fn documents_change_only_where_something_goes() {
        let fine = r#"{"error": {"message": "no \"model\" given\n", "code": 400}}"#;
        assert!(matches!(
            scrub_document(fine.as_bytes(), None),
            Cow::Borrowed(_)
        ));
        assert_eq!(
            doc(
                r#"{"error": {"message": "bad\tkey sk-abcdef0123456789", "code": 400}}"#,
                None
            ),
            r#"{"error": {"message": "bad\tkey [redacted]", "code": 400}}"#
        );
        // Text that is not JSON is scrubbed as written; a string whose
        // escapes do not decode goes whole.
        assert_eq!(doc("oops sk-abcdef0123456789", None), "oops [redacted]");
        assert_eq!(
            doc(r#"{"m":"\q sk-abcdef0123456789"}"#, None),
            r#"{"m":"[redacted]"}"#
        );
    }
}
