//! Removing anything that looks like key material from provider text that is
//! passed on to clients (the human message of a 400/404/413/422, an error
//! event inside a stream).
//!
//! The text is cut into tokens (runs of characters that occur in API keys and
//! their masked forms); a token is replaced by `[redacted]` when it looks like
//! a credential: a known key prefix (`sk-`, `sk_`, `AIza`, ...), a masked key
//! (`****`), a long mix of letters and digits, or a token containing the
//! served key's own first 8 or last 4 characters. Structural JSON characters
//! are never part of a token, so scrubbing a JSON document keeps it valid.

use crate::secret::Secret;
use std::borrow::Cow;

const REDACTED: &[u8] = b"[redacted]";

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'/' | b'=' | b'.' | b'*')
}

fn looks_secret(token: &[u8], key: Option<&[u8]>) -> bool {
    const PREFIXES: [&[u8]; 6] = [b"sk-", b"sk_", b"AIza", b"key-", b"rk_", b"pk_"];
    if PREFIXES.iter().any(|p| token.starts_with(p)) || token.windows(3).any(|w| w == b"***") {
        return true;
    }
    let has_digit = token.iter().any(u8::is_ascii_digit);
    let has_alpha = token.iter().any(u8::is_ascii_alphabetic);
    if token.len() >= 24 && has_digit && has_alpha {
        return true;
    }
    if let Some(key) = key.filter(|k| k.len() >= 16) {
        let (head, tail) = (&key[..8], &key[key.len() - 4..]);
        let contains = |needle: &[u8]| token.windows(needle.len()).any(|w| w == needle);
        return contains(head) || contains(tail);
    }
    false
}

/// `text` with every credential-looking token replaced. `key` is the
/// provider key that served the request, when known.
pub fn scrub<'a>(text: &'a [u8], key: Option<&Secret>) -> Cow<'a, [u8]> {
    // Comparing against the key's own edges needs its bytes; nothing is kept.
    let key = key.map(|k| k.expose().as_bytes());
    let mut out: Option<Vec<u8>> = None;
    let mut i = 0;
    let mut copied = 0;
    while i < text.len() {
        if !is_token_byte(text[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && is_token_byte(text[i]) {
            i += 1;
        }
        if looks_secret(&text[start..i], key) {
            let buf = out.get_or_insert_with(|| Vec::with_capacity(text.len()));
            buf.extend_from_slice(&text[copied..start]);
            buf.extend_from_slice(REDACTED);
            copied = i;
        }
    }
    match out {
        None => Cow::Borrowed(text),
        Some(mut buf) => {
            buf.extend_from_slice(&text[copied..]);
            Cow::Owned(buf)
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
    fn the_keys_own_edges_go() {
        let key = "zzzzFAKEKEY0000000000wxyz";
        assert_eq!(
            s("key ending in wxyz was refused", Some(key)),
            "key ending in [redacted] was refused"
        );
        assert_eq!(s("begins zzzzFAKE", Some(key)), "begins [redacted]");
    }

    #[test]
    fn ordinary_messages_stay() {
        let msg = "Invalid value for 'temperature': must be <= 2.0 (model gpt-4o-mini).";
        assert_eq!(s(msg, None), msg);
        assert!(matches!(scrub(msg.as_bytes(), None), Cow::Borrowed(_)));
    }

    #[test]
    fn json_stays_valid() {
        let doc = r#"{"error":{"message":"bad key sk-abc123def456","type":"x"}}"#;
        let out = s(doc, None);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["error"]["message"], "bad key [redacted]");
    }
}
