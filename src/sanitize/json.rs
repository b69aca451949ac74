//! Rewriting one JSON document from a provider: the provider's `id` becomes a
//! keyrouter id, `model` becomes the model the client asked for, fields that
//! identify the provider's account or deployment are dropped, and `usage`
//! token counts are read on the way through.
//!
//! Only what must change is touched: the document is split into its
//! top-level members as raw slices (`serde_json::value::RawValue`), the few
//! members that matter are rewritten (recursing into `message`, `response` and
//! `usage`, where Anthropic and the Responses API nest the same fields), and
//! everything else is copied byte for byte. Parsing the whole body into a
//! `Value` and serializing it again costs several times more per request.

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// What to write into a response.
pub struct Rewrite<'a> {
    /// The random part of this response's keyrouter id; the provider's id
    /// prefix (`chatcmpl-`, `msg_`, ...) is kept in front of it so SDKs that
    /// look at the prefix keep working.
    pub id_suffix: &'a str,
    /// The model the client asked for; `None` drops the provider's `model`.
    pub model: Option<&'a str>,
    pub strip_usage: bool,
}

/// Token counts seen in `usage` members. Streams report counts in several
/// events (Anthropic: input in `message_start`, cumulative output in
/// `message_delta`), so each count keeps its largest value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    fn absorb(&mut self, raw: &RawValue) {
        #[derive(serde::Deserialize)]
        struct Counts {
            prompt_tokens: Option<u64>,
            completion_tokens: Option<u64>,
            input_tokens: Option<u64>,
            output_tokens: Option<u64>,
        }
        if let Ok(c) = serde_json::from_str::<Counts>(raw.get()) {
            let prompt = c.prompt_tokens.or(c.input_tokens).unwrap_or(0);
            let completion = c.completion_tokens.or(c.output_tokens).unwrap_or(0);
            self.prompt = self.prompt.max(prompt);
            self.completion = self.completion.max(completion);
        }
    }
}

/// Members that name the provider's infrastructure, account tier or build
/// and are dropped wherever they appear in the rewritten objects.
fn is_provider_detail(key: &str) -> bool {
    matches!(
        key,
        "system_fingerprint" | "service_tier" | "obfuscation" | "modelVersion"
    ) || key.starts_with("x_")
        || key.starts_with("x-")
}

/// The top-level members of an object, in order, values as raw slices.
struct Members<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(12));
                while let Some((k, v)) = map.next_entry::<Cow<'de, str>, &'de RawValue>()? {
                    members.push((k, v));
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// Where in the document an object sits; decides which rules apply.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// The document itself, or `message` / `response` inside it.
    Object,
    /// A `usage` object: only provider details are dropped.
    Usage,
}

/// Rewrites `input` into `out`. Returns `false` (and writes nothing) when
/// `input` is not a JSON object; the caller then passes it on unchanged.
/// A top-level array (Gemini's non-SSE `streamGenerateContent`) has each of
/// its object elements rewritten.
pub fn rewrite(input: &[u8], rw: &Rewrite, out: &mut Vec<u8>, usage: &mut Usage) -> bool {
    out.reserve(input.len() + 16);
    if let Ok(members) = serde_json::from_slice::<Members>(input) {
        write_object(&members, Level::Object, 0, rw, out, usage);
        return true;
    }
    let Ok(items) = serde_json::from_slice::<Vec<&RawValue>>(input) else {
        return false;
    };
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&nested(item, Level::Object, 0, rw, usage));
    }
    out.push(b']');
    true
}

/// Nesting depth up to which `message`/`response` objects are rewritten.
const MAX_DEPTH: usize = 2;

fn write_object(
    members: &Members,
    level: Level,
    depth: usize,
    rw: &Rewrite,
    out: &mut Vec<u8>,
    usage: &mut Usage,
) {
    out.push(b'{');
    let mut first = true;
    for (key, raw) in &members.0 {
        let key = key.as_ref();
        if is_provider_detail(key) {
            continue;
        }
        let value: Option<Cow<[u8]>> = match (level, key) {
            (Level::Object, "id") => Some(Cow::Owned(new_id(raw, rw.id_suffix))),
            (Level::Object, "model") => rw.model.map(|m| Cow::Owned(json_string(m))),
            (Level::Object, "usage") => {
                usage.absorb(raw);
                if rw.strip_usage {
                    None
                } else {
                    Some(nested(raw, Level::Usage, depth, rw, usage))
                }
            }
            (Level::Object, "message" | "response") if depth < MAX_DEPTH => {
                Some(nested(raw, Level::Object, depth, rw, usage))
            }
            _ => Some(Cow::Borrowed(raw.get().as_bytes())),
        };
        let Some(value) = value else { continue };
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&json_string(key));
        out.push(b':');
        out.extend_from_slice(&value);
    }
    out.push(b'}');
}

/// Rewrites a nested value when it is an object, else keeps it as it is.
fn nested<'r>(
    raw: &'r RawValue,
    level: Level,
    depth: usize,
    rw: &Rewrite,
    usage: &mut Usage,
) -> Cow<'r, [u8]> {
    match serde_json::from_str::<Members>(raw.get()) {
        Ok(members) => {
            let mut buf = Vec::with_capacity(raw.get().len());
            write_object(&members, level, depth + 1, rw, &mut buf, usage);
            Cow::Owned(buf)
        }
        Err(_) => Cow::Borrowed(raw.get().as_bytes()),
    }
}

/// The keyrouter id for a provider id: the provider's type prefix (letters up
/// to the first `-` or `_`, e.g. `chatcmpl-`, `msg_`, `resp_`) and our own
/// random part. Anything else about the provider's id is dropped.
fn new_id(raw: &RawValue, suffix: &str) -> Vec<u8> {
    let original: Option<&str> = serde_json::from_str(raw.get()).ok();
    let prefix = original
        .and_then(|id| {
            let end = id.find(['-', '_'])?;
            let p = &id[..=end];
            (p.len() <= 17 && id[..end].bytes().all(|b| b.is_ascii_alphabetic())).then_some(p)
        })
        .unwrap_or("");
    let mut id = String::with_capacity(prefix.len() + suffix.len());
    id.push_str(prefix);
    id.push_str(suffix);
    json_string(&id)
}

fn json_string(s: &str) -> Vec<u8> {
    // Serializing a str cannot fail.
    serde_json::to_vec(s).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn run(input: &Value, model: Option<&str>, strip_usage: bool) -> (Value, Usage) {
        let rw = Rewrite {
            id_suffix: "kr0123456789",
            model,
            strip_usage,
        };
        let mut out = Vec::new();
        let mut usage = Usage::default();
        assert!(rewrite(
            input.to_string().as_bytes(),
            &rw,
            &mut out,
            &mut usage
        ));
        (serde_json::from_slice(&out).unwrap(), usage)
    }

    #[test]
    fn openai_chat_completion() {
        let body = json!({
            "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT",
            "object": "chat.completion",
            "created": 1741569952,
            "model": "gpt-4o-2024-08-06",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi \"there\""}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
            "service_tier": "default",
            "system_fingerprint": "fp_fc9f1d7035",
            "x_groq": {"id": "req_01"}
        });
        let (v, usage) = run(&body, Some("gpt-4o"), false);
        assert_eq!(v["id"], "chatcmpl-kr0123456789");
        assert_eq!(v["model"], "gpt-4o");
        assert_eq!(v["choices"], body["choices"]);
        assert_eq!(v["usage"], body["usage"]);
        assert_eq!(v["created"], 1741569952);
        for gone in ["service_tier", "system_fingerprint", "x_groq"] {
            assert!(v.get(gone).is_none(), "{gone}");
        }
        assert_eq!(
            usage,
            Usage {
                prompt: 19,
                completion: 10
            }
        );
    }

    #[test]
    fn anthropic_message_start_nests_the_same_fields() {
        let body = json!({
            "type": "message_start",
            "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
                "model": "claude-3-5-sonnet-20241022", "content": [],
                "usage": {"input_tokens": 25, "output_tokens": 1, "service_tier": "standard"}
            }
        });
        let (v, usage) = run(&body, Some("claude-3-5-sonnet-latest"), false);
        assert_eq!(v["message"]["id"], "msg_kr0123456789");
        assert_eq!(v["message"]["model"], "claude-3-5-sonnet-latest");
        assert_eq!(
            v["message"]["usage"],
            json!({"input_tokens": 25, "output_tokens": 1})
        );
        assert_eq!(
            usage,
            Usage {
                prompt: 25,
                completion: 1
            }
        );
    }

    #[test]
    fn responses_api_event_nests_the_response() {
        let body = json!({
            "type": "response.completed",
            "sequence_number": 9,
            "response": {
                "id": "resp_67ccd2bed1ec8190b14f964abc054267",
                "object": "response",
                "model": "gpt-4o-2024-08-06",
                "service_tier": "default",
                "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]}],
                "usage": {"input_tokens": 36, "output_tokens": 87, "total_tokens": 123}
            }
        });
        let (v, usage) = run(&body, Some("gpt-4o"), false);
        assert_eq!(v["response"]["id"], "resp_kr0123456789");
        assert_eq!(v["response"]["model"], "gpt-4o");
        assert!(v["response"].get("service_tier").is_none());
        assert_eq!(v["response"]["output"], body["response"]["output"]);
        assert_eq!(v["sequence_number"], 9);
        assert_eq!(
            usage,
            Usage {
                prompt: 36,
                completion: 87
            }
        );
    }

    #[test]
    fn strip_usage_and_missing_model() {
        let body = json!({"id": "cmpl-1", "model": "m-snap", "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
        let (v, usage) = run(&body, None, true);
        assert!(v.get("usage").is_none());
        assert!(v.get("model").is_none());
        assert_eq!(
            usage,
            Usage {
                prompt: 3,
                completion: 4
            }
        );
    }

    #[test]
    fn odd_ids_lose_everything_but_a_plain_prefix() {
        let (v, _) = run(&json!({"id": "org-secret/abc"}), None, false);
        assert_eq!(v["id"], "org-kr0123456789");
        let (v, _) = run(&json!({"id": "123-456"}), None, false);
        assert_eq!(v["id"], "kr0123456789");
        let (v, _) = run(&json!({"id": 42}), None, false);
        assert_eq!(v["id"], "kr0123456789");
    }

    #[test]
    fn escaped_keys_and_values_survive() {
        let body = json!({"we\"ird": "a\nb\u{1F600}", "list": [1, {"id": "inner-keeps"}]});
        let (v, _) = run(&body, None, false);
        assert_eq!(v, body);
    }

    #[test]
    fn arrays_have_each_object_rewritten() {
        let body = json!([{"id": "a-1", "model": "snap", "system_fingerprint": "fp"}, 7]);
        let rw = Rewrite {
            id_suffix: "kr1",
            model: Some("m"),
            strip_usage: false,
        };
        let mut out = Vec::new();
        assert!(rewrite(
            body.to_string().as_bytes(),
            &rw,
            &mut out,
            &mut Usage::default()
        ));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v, json!([{"id": "a-kr1", "model": "m"}, 7]));
    }

    #[test]
    fn non_objects_are_left_alone() {
        let rw = Rewrite {
            id_suffix: "x",
            model: None,
            strip_usage: false,
        };
        let mut out = Vec::new();
        let mut usage = Usage::default();
        assert!(!rewrite(b"{not json", &rw, &mut out, &mut usage));
        assert!(!rewrite(b"\"text\"", &rw, &mut out, &mut usage));
        assert!(out.is_empty());
    }
}
