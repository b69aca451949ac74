//! Rewriting one JSON document from a provider. What changes depends on
//! what the document is, read from its `object` / `type` member:
//!
//! - a generated answer (chat completion and chunk, text completion,
//!   Responses API `response`, Anthropic `message`, moderation, and an
//!   untyped object with `choices`, as some OpenAI-compatible servers send
//!   their completions) gets a keyrouter `id` and the `model` the client
//!   asked for, loses a `provider` naming the upstream that served it (as
//!   routers such as OpenRouter add), and its `usage` is counted; stream
//!   events that carry one (Anthropic `message_start`,
//!   Responses `response.*`) have the nested answer rewritten the same way;
//! - a Gemini `generateContent` answer gets a keyrouter `responseId`, the
//!   requested model as `modelVersion`, and its `usageMetadata` counted;
//! - an embeddings list gets the requested `model` (its items carry no id);
//! - an Ollama native answer (`/api/chat`, `/api/generate`, `/api/embed`:
//!   untyped, naming its `model`, with `created_at` and a `done` flag or
//!   with `embeddings`) gets the requested `model` (it carries no id), and
//!   its token counts (`prompt_eval_count`, `eval_count`) are counted;
//! - a resource (any other `object`: a model, file, batch, fine-tuning job,
//!   assistant, thread, run, ...) keeps its `id` and `model`, which the
//!   client reuses in later calls (`gpt-4o`, `file-abc`, `ftjob-abc`); a
//!   resource list has each of its items treated as a resource;
//! - anything else (a stream event that is not an answer, an untyped result
//!   such as a transcription) keeps its ids too; its `usage` is counted.
//!
//! Every object walked, whatever its kind, loses the fields that describe the
//! provider's deployment (`system_fingerprint`, `service_tier`, `x_*`) or
//! account (`organization`, `organization_id`, `project_id`, an `owned_by`
//! naming a user or organisation). The objects walked are the document, the
//! items of a resource list, a nested answer and `usage`; generated content
//! (messages, tool arguments, resource `metadata`) is never walked, so a
//! tool argument named `project_id` reaches the client intact.
//!
//! Only what must change is touched: an object is split into its members as
//! raw slices by following its structure ([`json_members`]), the few
//! members that matter are rewritten, and everything else is copied byte
//! for byte. Parsing the whole body into a `Value` and serializing it again
//! costs several times more per request, and even splitting it with a
//! validating parser costs more than the rest of the rewrite.

use super::scrub;
use crate::json_members;
use crate::secret::Secret;
use std::borrow::Cow;

/// What to write into a response.
pub struct Rewrite<'a> {
    /// The random part of this response's keyrouter id; the provider's id
    /// prefix (`chatcmpl-`, `msg_`, ...) is kept in front of it so SDKs that
    /// look at the prefix keep working.
    pub id_suffix: &'a str,
    /// The model the client asked for; `None` drops the provider's `model`.
    pub model: Option<&'a str>,
    pub strip_usage: bool,
    /// The key serving the response: it and its edges are scrubbed from
    /// the provider errors a stream or a JSON answer carries.
    pub key: Option<&'a Secret>,
}

/// Token counts seen in `usage` members (Gemini's `usageMetadata`, an
/// Ollama answer's own counts). Streams report counts in several
/// events (Anthropic: input in `message_start`, cumulative output in
/// `message_delta`), so each count keeps its largest value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    /// Reads the counts of a `usage` / `usageMetadata` object (or of an
    /// Ollama answer, which carries them among its own members), whose
    /// members are already split (the object is walked for output anyway).
    fn absorb(&mut self, members: &Members) {
        let count = |name: &str| members.get(name).and_then(|v| v.parse::<u64>().ok());
        // OpenAI, Anthropic and Gemini spellings of the same counts.
        let prompt = count("prompt_tokens")
            .or_else(|| count("input_tokens"))
            .or_else(|| count("promptTokenCount"))
            .or_else(|| count("prompt_eval_count"));
        // Gemini's thinking tokens are output tokens apart from the answer's
        // (billed as output; OpenAI's `completion_tokens` include its
        // reasoning tokens the same way).
        let gemini_output = match (count("candidatesTokenCount"), count("thoughtsTokenCount")) {
            (None, None) => None,
            (answer, thoughts) => Some(answer.unwrap_or(0) + thoughts.unwrap_or(0)),
        };
        let completion = count("completion_tokens")
            .or_else(|| count("output_tokens"))
            .or(gemini_output)
            .or_else(|| count("eval_count"));
        self.prompt = self.prompt.max(prompt.unwrap_or(0));
        self.completion = self.completion.max(completion.unwrap_or(0));
    }
}

/// Members that name the provider's infrastructure, account tier, build or
/// account, dropped from every object walked.
fn is_provider_detail(key: &str) -> bool {
    matches!(
        key,
        "system_fingerprint"
            | "service_tier"
            | "obfuscation"
            | "organization"
            | "organization_id"
            | "project_id"
    ) || key.starts_with("x_")
        || key.starts_with("x-")
}

/// What an `owned_by` naming a user or organisation becomes: OpenAI's own
/// word for models that belong to the caller's organisation.
const ACCOUNT_OWNER: &str = "organization-owner";

/// Whether an `owned_by` value names an account (`user-…`, `org-…`) rather
/// than a vendor (`openai`, `system`).
fn names_account(owner: &str) -> bool {
    ["user-", "user_", "org-", "org_"]
        .iter()
        .any(|p| owner.starts_with(p))
}

/// The members of an object, in order: names decoded (borrowed from the
/// document unless they have escapes), values as written.
struct Members<'a>(Vec<(Cow<'a, str>, &'a str)>);

impl<'a> Members<'a> {
    /// The members of `json` when it is one object.
    fn parse(json: &'a str) -> Option<Self> {
        let mut members = Vec::with_capacity(12);
        let mut names_decode = true;
        json_members::each_member(json.as_bytes(), |name, value| {
            match name.decode(&json[name.raw.clone()]) {
                Some(name) => members.push((name, &json[value])),
                None => names_decode = false,
            }
        })
        .ok()?;
        names_decode.then_some(Members(members))
    }

    /// The value of the last member named `name`: the one a client's
    /// parser keeps when a name is given twice.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// A member's value when it is a string.
    fn text(&self, name: &str) -> Option<Cow<'a, str>> {
        self.get(name).and_then(json_members::string)
    }
}

/// The elements of `json` when it is an array, as written.
fn elements(json: &str) -> Option<Vec<&str>> {
    let mut items = Vec::new();
    json_members::each_element(json.as_bytes(), |item| items.push(&json[item])).ok()?;
    Some(items)
}

/// What an object is; decides which of its members change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A generated answer: new `id`, requested `model`, `usage` counted.
    Answer,
    /// A Gemini answer: new `responseId`, requested model as
    /// `modelVersion`, `usageMetadata` counted.
    Gemini,
    /// An embeddings list: requested `model`, `usage` counted; no id.
    Embeddings,
    /// An Ollama native answer: requested `model`, the counts among its
    /// own members counted (and dropped with `strip_usage`); no id.
    Ollama,
    /// A list of resources (`object: "list"`): each item of `data` is walked.
    List,
    /// A resource (any other `object`): `id` and `model` kept, and its
    /// `usage` is its own record (a batch's, a run's), neither counted nor
    /// stripped.
    Resource,
    /// Neither: a stream event (Anthropic `message_start`, `message_delta`,
    /// Responses `response.*`), an error, an untyped result (a
    /// transcription, an image). Ids and `model` kept, `usage` counted, and
    /// a nested `message` / `response` that is an answer rewritten as one.
    Other,
}

impl Kind {
    /// The kind of a document (or of an element of a top-level array).
    fn of(members: &Members) -> Kind {
        if let Some(object) = members.text("object") {
            return match object.as_ref() {
                "chat.completion" | "chat.completion.chunk" | "text_completion" | "response" => {
                    Kind::Answer
                }
                "list" if first_item_is(members.get("data"), "embedding") => Kind::Embeddings,
                "list" => Kind::List,
                _ => Kind::Resource,
            };
        }
        match members.text("type").as_deref() {
            Some("message") => return Kind::Answer,
            Some(_) => return Kind::Other,
            None => {}
        }
        // Some OpenAI-compatible servers leave `object` out of their
        // completions; their `choices` mark them.
        if members.get("choices").is_some_and(|c| c.starts_with('[')) {
            return Kind::Answer;
        }
        // Moderation results carry no `object`; their `modr-` id marks them.
        if members.text("id").is_some_and(|id| id.starts_with("modr-")) {
            return Kind::Answer;
        }
        // Nor do Gemini answers; these members are theirs alone.
        let gemini = [
            "candidates",
            "promptFeedback",
            "usageMetadata",
            "modelVersion",
            "responseId",
        ];
        if members.0.iter().any(|(k, _)| gemini.contains(&k.as_ref())) {
            return Kind::Gemini;
        }
        // Nor do Ollama's native answers, which always name their model: a
        // chat or generate answer (or stream line) has its `created_at` and
        // `done` flag, an embeddings answer its `embeddings`. (A Google
        // long-running operation has a `done` flag too, but neither of the
        // others.)
        let has =
            |name: &str, opening: &str| members.get(name).is_some_and(|v| v.starts_with(opening));
        let done_flag = matches!(members.get("done"), Some("true" | "false"));
        let generated = done_flag && has("created_at", "\"");
        if has("model", "\"") && (generated || has("embeddings", "[")) {
            return Kind::Ollama;
        }
        Kind::Other
    }

    /// The kind of a `message` / `response` inside another object (a
    /// stream event): an answer when it says so, else a plain resource, so
    /// nesting stays one level deep.
    fn of_nested(members: &Members) -> Kind {
        match Kind::of(members) {
            Kind::Answer => Kind::Answer,
            _ => Kind::Resource,
        }
    }
}

/// Whether the first element of the array `data` is an object whose
/// `object` is `kind`. Reads only that element: an embeddings list can be
/// megabytes of numbers, scanned once already.
fn first_item_is(data: Option<&str>, kind: &str) -> bool {
    let Some(data) = data else {
        return false;
    };
    json_members::first_element(data.as_bytes())
        .and_then(|first| Members::parse(&data[first]))
        .is_some_and(|item| item.text("object").as_deref() == Some(kind))
}

/// What a rewritten document was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rewritten {
    /// Anything but an error.
    Document,
    /// A provider error: OpenAI's and Gemini's `{"error": …}`, Anthropic's
    /// `{"type": "error"}`, the Responses API's `{"type": "error"}` and
    /// `{"type": "response.failed"}`; or a top-level array holding one
    /// (Gemini's non-SSE `streamGenerateContent` ends in `{"error": …}`
    /// when the stream fails after its first chunks).
    Error,
}

impl Rewritten {
    fn of(members: &Members) -> Rewritten {
        let error_member = members.get("error").is_some_and(|e| e != "null");
        let error_type = matches!(
            members.text("type").as_deref(),
            Some("error" | "response.failed")
        );
        if error_member || error_type {
            Rewritten::Error
        } else {
            Rewritten::Document
        }
    }
}

/// Why a document was left as it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unrewritten {
    /// Not a JSON object or array (`[DONE]`, a bare string, plain text):
    /// passed on unchanged.
    NotJson,
    /// Opens as a JSON object (or an array of them) but does not parse: cut
    /// short, or not UTF-8. It may carry the provider's id and model
    /// snapshot, so it must not be passed on.
    Broken,
}

/// Rewrites `input` into `out` (which stays untouched when it fails). A
/// top-level array (Gemini's non-SSE `streamGenerateContent`) has each of
/// its object elements rewritten, and is an error when one of them is.
pub fn rewrite(
    input: &[u8],
    rw: &Rewrite,
    out: &mut Vec<u8>,
    usage: &mut Usage,
) -> Result<Rewritten, Unrewritten> {
    // Whatever opens as an object or an array may hold what must not pass;
    // of the arrays, only the stream sentinel `[DONE]` is not one.
    let failed = || match input.trim_ascii() {
        b"[DONE]" => Unrewritten::NotJson,
        [b'{' | b'[', ..] => Unrewritten::Broken,
        _ => Unrewritten::NotJson,
    };
    // Checked once here, the text is not checked again member by member.
    let input_text = std::str::from_utf8(input).map_err(|_| failed())?;
    out.reserve(input.len() + 16);
    let start = out.len();
    let written = match Members::parse(input_text) {
        Some(members) => write_object(&members, Kind::of(&members), rw, out, usage)
            .map(|()| Rewritten::of(&members)),
        None => {
            let items = elements(input_text).ok_or_else(failed)?;
            write_items(&items, Kind::of, rw, out, usage)
        }
    };
    written.map_err(|Garbled| {
        out.truncate(start);
        Unrewritten::Broken
    })
}

/// A document that [`rewrite`] found to be an error, scrubbed of key
/// material ([`scrub::scrub_document`]). Of an array, only the elements
/// that are errors: the answer chunks before a failure reach the client as
/// the provider wrote them, and a long answer is not scanned for nothing.
pub fn scrub_error<'a>(doc: &'a [u8], key: Option<&Secret>) -> Cow<'a, [u8]> {
    let items = std::str::from_utf8(doc)
        .ok()
        .filter(|text| text.trim_start().starts_with('['))
        .and_then(elements);
    let Some(items) = items else {
        return scrub::scrub_document(doc, key);
    };
    let mut out = Vec::with_capacity(doc.len());
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let error = Members::parse(item).is_some_and(|m| Rewritten::of(&m) == Rewritten::Error);
        if error {
            out.extend_from_slice(&scrub::scrub_document(item.as_bytes(), key));
        } else {
            out.extend_from_slice(item.as_bytes());
        }
    }
    out.push(b']');
    Cow::Owned(out)
}

/// An object (or list) inside the document, among those rewritten, opens
/// as one but breaks. Its members cannot be told apart, and it may hold
/// what must not pass, so the whole document is refused: copying it as it
/// is would show it to any lenient parser (Python's reads `NaN`).
struct Garbled;

/// What becomes of one member.
enum Member<'r> {
    /// Left out, name and all.
    Dropped,
    /// Copied byte for byte.
    Kept(&'r str),
    /// Replaced by this string.
    Text(&'r str),
    /// A keyrouter id, with the provider id's type prefix when it has one.
    NewId(&'r str),
    /// An object walked as `kind_of` says (anything else copied).
    Walked(&'r str, fn(&Members) -> Kind),
    /// A `usage` object: counted, then walked.
    Usage(&'r str),
    /// A resource list's items, each walked as a resource.
    Items(&'r str),
}

fn resource(_: &Members) -> Kind {
    Kind::Resource
}

fn member<'r>(
    kind: Kind,
    key: &str,
    raw: &'r str,
    rw: &Rewrite<'r>,
    usage: &mut Usage,
) -> Member<'r> {
    if is_provider_detail(key) {
        return Member::Dropped;
    }
    match (kind, key) {
        (_, "owned_by") => match json_members::string(raw) {
            Some(owner) if names_account(&owner) => Member::Text(ACCOUNT_OWNER),
            _ => Member::Kept(raw),
        },
        (Kind::Answer, "id") => Member::NewId(raw),
        // Routers such as OpenRouter name the upstream that served it.
        (Kind::Answer, "provider") => Member::Dropped,
        // Gemini ids have no type prefix to keep.
        (Kind::Gemini, "responseId") => Member::Text(rw.id_suffix),
        (Kind::Answer | Kind::Embeddings | Kind::Ollama, "model")
        | (Kind::Gemini, "modelVersion") => rw.model.map_or(Member::Dropped, Member::Text),
        (Kind::Ollama, "prompt_eval_count" | "eval_count") if rw.strip_usage => Member::Dropped,
        (Kind::Answer | Kind::Embeddings | Kind::Ollama | Kind::Other, "usage")
        | (Kind::Gemini, "usageMetadata") => {
            if rw.strip_usage {
                // Counted all the same: limits and metrics need the tokens.
                if let Some(members) = Members::parse(raw) {
                    usage.absorb(&members);
                }
                Member::Dropped
            } else {
                Member::Usage(raw)
            }
        }
        (Kind::Other, "message" | "response") => Member::Walked(raw, Kind::of_nested),
        (Kind::List, "data") => Member::Items(raw),
        _ => Member::Kept(raw),
    }
}

/// Writes an object's members, each as [`member`] decides, straight into
/// `out` (no buffer per member).
fn write_object(
    members: &Members,
    kind: Kind,
    rw: &Rewrite,
    out: &mut Vec<u8>,
    usage: &mut Usage,
) -> Result<(), Garbled> {
    if kind == Kind::Ollama {
        // Its counts are members of the answer itself, not of a `usage`.
        usage.absorb(members);
    }
    out.push(b'{');
    let mut first = true;
    for (key, raw) in &members.0 {
        let action = member(kind, key, raw, rw, usage);
        if matches!(action, Member::Dropped) {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        match key {
            // Borrowed means written without escapes in the document: no
            // need to look for characters to escape.
            Cow::Borrowed(name) => write_quoted(out, name),
            Cow::Owned(name) => write_str(out, name),
        }
        out.push(b':');
        match action {
            Member::Dropped => {}
            Member::Kept(raw) => out.extend_from_slice(raw.as_bytes()),
            Member::Text(text) => write_str(out, text),
            Member::NewId(raw) => write_new_id(out, raw, rw.id_suffix),
            // What a nested object is does not change what the document is.
            Member::Walked(raw, kind_of) => {
                write_walked(raw, kind_of, rw, out, usage)?;
            }
            Member::Usage(raw) => match Members::parse(raw) {
                Some(counts) => {
                    usage.absorb(&counts);
                    write_object(&counts, Kind::Resource, rw, out, usage)?;
                }
                None => copy_unless_opening(out, raw, '{')?,
            },
            Member::Items(raw) => match elements(raw) {
                Some(items) => {
                    write_items(&items, resource, rw, out, usage)?;
                }
                None => copy_unless_opening(out, raw, '[')?,
            },
        }
    }
    out.push(b'}');
    Ok(())
}

/// Copies a value that was to be walked but is not an object or list (a
/// `null` usage, a string message): anything opening with `bracket` is
/// one that breaks.
fn copy_unless_opening(out: &mut Vec<u8>, raw: &str, bracket: char) -> Result<(), Garbled> {
    if raw.starts_with(bracket) {
        return Err(Garbled);
    }
    out.extend_from_slice(raw.as_bytes());
    Ok(())
}

/// Writes a nested value walked as the kind `kind_of` gives it when it is
/// an object, else as it is; says whether it is an object that is a
/// provider error.
fn write_walked(
    raw: &str,
    kind_of: fn(&Members) -> Kind,
    rw: &Rewrite,
    out: &mut Vec<u8>,
    usage: &mut Usage,
) -> Result<Rewritten, Garbled> {
    match Members::parse(raw) {
        Some(members) => write_object(&members, kind_of(&members), rw, out, usage)
            .map(|()| Rewritten::of(&members)),
        None => copy_unless_opening(out, raw, '{').map(|()| Rewritten::Document),
    }
}

/// Writes an array, each element walked; says whether one of its elements
/// is a provider error.
fn write_items(
    items: &[&str],
    kind_of: fn(&Members) -> Kind,
    rw: &Rewrite,
    out: &mut Vec<u8>,
    usage: &mut Usage,
) -> Result<Rewritten, Garbled> {
    let mut found = Rewritten::Document;
    out.push(b'[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        if write_walked(item, kind_of, rw, out, usage)? == Rewritten::Error {
            found = Rewritten::Error;
        }
    }
    out.push(b']');
    Ok(found)
}

/// The keyrouter id for a provider id: the provider's type prefix (letters up
/// to the first `-` or `_`, e.g. `chatcmpl-`, `msg_`, `resp_`) and our own
/// random part. Anything else about the provider's id is dropped.
fn write_new_id(out: &mut Vec<u8>, raw: &str, suffix: &str) {
    let original = json_members::string(raw);
    let prefix = original
        .as_deref()
        .and_then(|id| {
            let end = id.find(['-', '_'])?;
            let p = &id[..=end];
            (p.len() <= 17 && id[..end].bytes().all(|b| b.is_ascii_alphabetic())).then_some(p)
        })
        .unwrap_or("");
    out.push(b'"');
    out.extend_from_slice(prefix.as_bytes());
    out.extend_from_slice(suffix.as_bytes());
    out.push(b'"');
}

/// Writes `s`, which needs no escapes, between quotes.
fn write_quoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Writes `s` as a JSON string. Names and ids almost never need escapes,
/// so they are copied as they are when they need none.
fn write_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        write_quoted(out, s);
    } else {
        serde_json::to_writer(out, s).expect("a str always serializes into a Vec");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json_members::tests::any_json;
    use proptest::prelude::*;
    use serde_json::{Value, json};

    fn run(input: &Value, model: Option<&str>, strip_usage: bool) -> (Value, Usage) {
        let rw = Rewrite {
            id_suffix: "kr0123456789",
            model,
            strip_usage,
            key: None,
        };
        let mut out = Vec::new();
        let mut usage = Usage::default();
        assert!(rewrite(input.to_string().as_bytes(), &rw, &mut out, &mut usage).is_ok());
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
    fn an_untyped_completion_is_an_answer_too() {
        let body = json!({
            "id": "gen-PROVIDER-123",
            "model": "meta-llama/llama-3-70b-instruct:nitro",
            "provider": "Together",
            "choices": [{"index": 0, "delta": {"content": "Hi"}}],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1}
        });
        let (v, usage) = run(&body, Some("llama-3"), false);
        assert_eq!(v["id"], "gen-kr0123456789");
        assert_eq!(v["model"], "llama-3");
        assert_eq!(v["choices"], body["choices"]);
        assert!(v.get("provider").is_none());
        assert_eq!(
            usage,
            Usage {
                prompt: 4,
                completion: 1
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
        let body = json!({"id": "cmpl-1", "object": "text_completion", "model": "m-snap", "usage": {"prompt_tokens": 3, "completion_tokens": 4}});
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
    fn requested_model_names_are_escaped() {
        let body = json!({"id": "chatcmpl-1", "object": "chat.completion", "model": "snap"});
        let (v, _) = run(&body, Some("my \"model\"\\\n"), false);
        assert_eq!(v["model"], "my \"model\"\\\n");
    }

    #[test]
    fn odd_ids_lose_everything_but_a_plain_prefix() {
        let answer = |id: Value| json!({"id": id, "object": "chat.completion"});
        let (v, _) = run(&answer(json!("org-secret/abc")), None, false);
        assert_eq!(v["id"], "org-kr0123456789");
        let (v, _) = run(&answer(json!("123-456")), None, false);
        assert_eq!(v["id"], "kr0123456789");
        let (v, _) = run(&answer(json!(42)), None, false);
        assert_eq!(v["id"], "kr0123456789");
    }

    #[test]
    fn escaped_keys_and_values_survive() {
        let body = json!({"we\"ird": "a\nb\u{1F600}", "list": [1, {"id": "inner-keeps"}]});
        let (v, _) = run(&body, None, false);
        assert_eq!(v, body);
    }

    #[test]
    fn a_name_given_twice_is_read_as_clients_read_it() {
        // Clients keep the last of a duplicated name: it decides what the
        // object is, and every `id` of an answer is replaced.
        let body = br#"{"object":"file","id":"chatcmpl-LEAK","object":"chat.completion","id":"chatcmpl-LEAK2","usage":{"prompt_tokens":1},"usage":{"prompt_tokens":7}}"#;
        let rw = Rewrite {
            id_suffix: "kr0123456789",
            model: Some("m"),
            strip_usage: false,
            key: None,
        };
        let (mut out, mut usage) = (Vec::new(), Usage::default());
        rewrite(body, &rw, &mut out, &mut usage).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("LEAK"), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["id"], "chatcmpl-kr0123456789");
        assert_eq!(usage.prompt, 7);
    }

    #[test]
    fn arrays_have_each_object_rewritten() {
        let body = json!([{"id": "a-1", "object": "chat.completion.chunk", "model": "snap", "system_fingerprint": "fp"}, 7]);
        let rw = Rewrite {
            id_suffix: "kr1",
            model: Some("m"),
            strip_usage: false,
            key: None,
        };
        let mut out = Vec::new();
        assert!(
            rewrite(
                body.to_string().as_bytes(),
                &rw,
                &mut out,
                &mut Usage::default()
            )
            .is_ok()
        );
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!([{"id": "a-kr1", "object": "chat.completion.chunk", "model": "m"}, 7])
        );
    }

    #[test]
    fn non_objects_are_left_alone() {
        let rw = Rewrite {
            id_suffix: "x",
            model: None,
            strip_usage: false,
            key: None,
        };
        let mut out = Vec::new();
        let mut usage = Usage::default();
        let mut left = |input: &[u8]| rewrite(input, &rw, &mut out, &mut usage).unwrap_err();
        for text in [
            &b"\"text\""[..],
            b"[DONE]",
            b" [DONE]\n",
            b"42",
            b"plain words",
        ] {
            assert_eq!(left(text), Unrewritten::NotJson, "{text:?}");
        }
        // A document cut short (or not UTF-8) may hold what must not pass.
        for broken in [
            &b"{not json"[..],
            br#"{"id": "chatcmpl-LEAK", "model": "gpt-4o-2024-08-06", "choices": ["#,
            br#" [{"id": "chatcmpl-LEAK", "#,
            br#"[1, {"id": "chatcmpl-LEAK", "object": "chat.completion", "x": NaN}]"#,
            b"[1, 2",
            b"{\"id\": \"\xff\"}",
        ] {
            assert_eq!(left(broken), Unrewritten::Broken, "{broken:?}");
        }
        assert!(out.is_empty());
        // So may an object inside it that is rewritten too (a nested
        // answer, a list item, `usage`, an array element), when that object
        // breaks: lenient parsers (Python's reads `NaN`) would read it.
        for garbled in [
            &br#"{"type":"message_start","message":{"type":"message","id":"msg_LEAK","model":"claude-3-5-sonnet-20241022","x":NaN}}"#[..],
            br#"{"type":"response.completed","response":{"object":"response","id":"resp_LEAK","model":"gpt-4o-2024-08-06",}}"#,
            br#"[{"responseId":"LEAK","modelVersion":"gemini-1.5-pro-002","candidates":[],"t":Infinity}]"#,
            br#"{"object":"list","data":[{"id":"file-1","object":"file","system_fingerprint":"fp_LEAK","n":NaN}]}"#,
            br#"{"object":"list","data":[{"id":"file-1"} {"id":"file-2"}]}"#,
            br#"{"id":"chatcmpl-1","object":"chat.completion","usage":{"prompt_tokens":1,"x_leak":NaN}}"#,
        ] {
            out.clear();
            out.extend_from_slice(b"kept");
            assert_eq!(
                rewrite(garbled, &rw, &mut out, &mut usage),
                Err(Unrewritten::Broken),
                "{}",
                String::from_utf8_lossy(garbled)
            );
            assert_eq!(out, b"kept", "what was written before stays as it was");
        }
    }

    #[test]
    fn models_keep_their_ids_and_lose_account_owners() {
        let list = json!({
            "object": "list",
            "data": [
                {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
                {"id": "ft:gpt-4o-mini-2024-07-18:acme::9A8b7C6d", "object": "model", "created": 1, "owned_by": "user-abc123"},
                {"id": "ft:gpt-4o-mini:acme::x1", "object": "model", "created": 2, "owned_by": "org-mockorganization", "organization_id": "org-mock"}
            ]
        });
        let (v, usage) = run(&list, Some("unused"), false);
        assert_eq!(
            v,
            json!({
                "object": "list",
                "data": [
                    {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
                    {"id": "ft:gpt-4o-mini-2024-07-18:acme::9A8b7C6d", "object": "model", "created": 1, "owned_by": "organization-owner"},
                    {"id": "ft:gpt-4o-mini:acme::x1", "object": "model", "created": 2, "owned_by": "organization-owner"}
                ]
            })
        );
        assert_eq!(usage, Usage::default());
        let one = json!({"id": "gpt-4o", "object": "model", "created": 1, "owned_by": "openai"});
        assert_eq!(run(&one, Some("unused"), false).0, one);
    }

    #[test]
    fn resources_keep_id_and_model_but_lose_account_fields() {
        let job = json!({
            "object": "fine_tuning.job", "id": "ftjob-abc123", "model": "gpt-4o-mini-2024-07-18",
            "fine_tuned_model": null, "organization_id": "org-123", "project_id": "proj_abc",
            "status": "queued", "metadata": {"project_id": "the client's own"}
        });
        let (v, _) = run(&job, Some("gpt-4o"), false);
        assert_eq!(
            v,
            json!({
                "object": "fine_tuning.job", "id": "ftjob-abc123", "model": "gpt-4o-mini-2024-07-18",
                "fine_tuned_model": null, "status": "queued", "metadata": {"project_id": "the client's own"}
            })
        );
        let file = json!({"id": "file-abc123", "object": "file", "bytes": 120000, "filename": "batch.jsonl", "purpose": "batch", "organization": "org-x"});
        let (v, _) = run(&file, Some("gpt-4o"), false);
        assert_eq!(v["id"], "file-abc123");
        assert!(v.get("organization").is_none(), "{v}");
        // A batch reports the tokens of its whole run: not this request's.
        let batch = json!({"id": "batch_abc", "object": "batch", "usage": {"input_tokens": 900, "output_tokens": 100}});
        let (v, usage) = run(&batch, None, true);
        assert_eq!(v, batch);
        assert_eq!(usage, Usage::default());
        // An untyped result reports this request's usage.
        let transcription = json!({"text": "hi", "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 45}});
        let (v, usage) = run(&transcription, Some("gpt-4o-transcribe"), true);
        assert_eq!(v, json!({"text": "hi"}));
        assert_eq!(
            usage,
            Usage {
                prompt: 14,
                completion: 45
            }
        );
        let anthropic_model = json!({"type": "model", "id": "claude-3-5-sonnet-20241022", "display_name": "Claude 3.5 Sonnet"});
        assert_eq!(run(&anthropic_model, Some("x"), false).0, anthropic_model);
    }

    #[test]
    fn embeddings_get_the_requested_model_and_no_id() {
        let body = json!({
            "object": "list", "model": "text-embedding-3-small-snapshot",
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5}
        });
        let (v, usage) = run(&body, Some("text-embedding-3-small"), false);
        assert_eq!(v["model"], "text-embedding-3-small");
        assert_eq!(v["data"], body["data"]);
        assert!(v.get("id").is_none());
        assert_eq!(
            usage,
            Usage {
                prompt: 5,
                completion: 0
            }
        );
    }

    #[test]
    fn account_fields_leave_answers_too() {
        let body = json!({"id": "chatcmpl-1", "object": "chat.completion", "organization": "org-x", "project_id": "proj_y", "choices": []});
        let (v, _) = run(&body, Some("gpt-4o"), false);
        assert_eq!(
            v,
            json!({"id": "chatcmpl-kr0123456789", "object": "chat.completion", "choices": []})
        );
    }

    #[test]
    fn generated_content_is_never_walked() {
        let tool_input =
            json!({"project_id": "p-1", "organization": "acme", "x_coord": 3, "id": "row-9"});
        let message = json!({
            "id": "msg_01", "type": "message", "model": "claude-3-5-sonnet-20241022", "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_01A", "name": "lookup", "input": tool_input}]
        });
        let (v, _) = run(&message, Some("claude-3-5-sonnet-latest"), false);
        assert_eq!(v["id"], "msg_kr0123456789");
        assert_eq!(v["content"], message["content"]);

        let completion = json!({
            "id": "chatcmpl-1", "object": "chat.completion",
            "choices": [{"message": {"role": "assistant", "tool_calls": [{"id": "call_abc", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]
        });
        let (v, _) = run(&completion, Some("gpt-4o"), false);
        assert_eq!(v["choices"], completion["choices"]);

        // Stream events that are not answers keep the ids the client reuses.
        let block = json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_01A", "name": "lookup", "input": {}}});
        assert_eq!(run(&block, Some("m"), false).0, block);
        let item = json!({"type": "response.output_item.added", "output_index": 0, "item": {"id": "fc_01", "type": "function_call", "call_id": "call_1"}});
        assert_eq!(run(&item, Some("m"), false).0, item);
    }

    #[test]
    fn ollama_native_answers_get_the_asked_model_and_count_tokens() {
        let token = json!({
            "model": "llama3.2:3b-instruct-q4_K_M", "created_at": "2026-11-23T10:30:00.1Z",
            "message": {"role": "assistant", "content": "Hel"}, "done": false
        });
        let (v, usage) = run(&token, Some("llama3.2"), false);
        assert_eq!(v["model"], "llama3.2");
        assert_eq!(v["message"], token["message"]);
        assert_eq!(v["done"], false);
        assert_eq!(usage, Usage::default());

        let last = json!({
            "model": "llama3.2:3b-instruct-q4_K_M", "created_at": "2026-11-23T10:30:00.2Z",
            "response": "", "done": true, "done_reason": "stop", "context": [1, 2, 3],
            "total_duration": 4883583458u64, "prompt_eval_count": 26, "eval_count": 282
        });
        let counted = Usage {
            prompt: 26,
            completion: 282,
        };
        let (v, usage) = run(&last, Some("llama3.2"), false);
        assert_eq!(v["model"], "llama3.2");
        assert_eq!(
            (v["prompt_eval_count"].clone(), v["eval_count"].clone()),
            (json!(26), json!(282))
        );
        assert_eq!(v["context"], last["context"]);
        assert_eq!(v["total_duration"], last["total_duration"]);
        assert_eq!(usage, counted);

        // Counted all the same when the counts leave the answer.
        let (v, usage) = run(&last, Some("llama3.2"), true);
        assert!(
            v.get("prompt_eval_count").is_none() && v.get("eval_count").is_none(),
            "{v}"
        );
        assert_eq!(usage, counted);

        let embed = json!({
            "model": "all-minilm:l6-v2", "embeddings": [[0.1, -0.2]], "prompt_eval_count": 8
        });
        let (v, usage) = run(&embed, Some("all-minilm"), false);
        assert_eq!(v["model"], "all-minilm");
        assert_eq!(v["embeddings"], embed["embeddings"]);
        assert_eq!(usage.prompt, 8);
        // Servers that send no count are still recognised.
        let uncounted = json!({"model": "all-minilm:l6-v2", "embeddings": [[0.1]]});
        assert_eq!(
            run(&uncounted, Some("all-minilm"), false).0["model"],
            "all-minilm"
        );

        // A `usage` in such an answer is handled as in any other.
        let with_usage = json!({
            "model": "m:tag", "created_at": "t", "done": true,
            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "system_fingerprint": "fp"}
        });
        let (v, usage) = run(&with_usage, Some("m"), false);
        assert_eq!(
            v["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 3})
        );
        assert_eq!((usage.prompt, usage.completion), (5, 3));
        let (v, usage) = run(&with_usage, Some("m"), true);
        assert!(v.get("usage").is_none(), "{v}");
        assert_eq!((usage.prompt, usage.completion), (5, 3));
    }

    #[test]
    fn look_alikes_of_ollama_answers_are_not_taken_for_them() {
        // A `done` that is not a flag is someone else's member.
        let other = json!({"model": "kept", "created_at": "t", "done": "yes"});
        assert_eq!(run(&other, Some("asked"), false).0, other);
        // A Google long-running operation: its `response` is walked as
        // before (the nested answer loses the provider's details).
        let operation = json!({
            "name": "models/veo-2.0/operations/op1", "done": true,
            "response": {"generatedSamples": [], "project_id": "p-1", "x_debug": 1}
        });
        let (v, _) = run(&operation, Some("asked"), false);
        assert_eq!(v["name"], operation["name"]);
        assert_eq!(v["response"], json!({"generatedSamples": []}));
    }

    #[test]
    fn gemini_answers_get_our_id_the_asked_model_and_count_tokens() {
        let body = json!({
            "candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}, "finishReason": "STOP"}],
            "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 5, "thoughtsTokenCount": 3, "totalTokenCount": 12},
            "modelVersion": "gemini-1.5-pro-002",
            "responseId": "mAitaLmkHPPlz7IPvtfUqQQ"
        });
        let (v, usage) = run(&body, Some("gemini-1.5-pro"), false);
        assert_eq!(v["responseId"], "kr0123456789");
        assert_eq!(v["modelVersion"], "gemini-1.5-pro");
        assert_eq!(v["candidates"], body["candidates"]);
        assert_eq!(v["usageMetadata"], body["usageMetadata"]);
        assert_eq!(
            usage,
            Usage {
                prompt: 4,
                completion: 8
            }
        );
        let (v, usage) = run(&body, None, true);
        assert!(v.get("modelVersion").is_none(), "{v}");
        assert!(v.get("usageMetadata").is_none(), "{v}");
        assert_eq!(usage.prompt, 4);
        // A prompt blocked before any candidate.
        let blocked = json!({"promptFeedback": {"blockReason": "SAFETY"}, "modelVersion": "gemini-1.5-pro-002"});
        let (v, _) = run(&blocked, Some("gemini-1.5-pro"), false);
        assert_eq!(v["modelVersion"], "gemini-1.5-pro");
        // Chunks of a non-SSE stream: one array, every element rewritten,
        // the largest counts kept.
        let chunks = json!([
            {"candidates": [], "usageMetadata": {"promptTokenCount": 4}, "modelVersion": "gemini-1.5-pro-002", "responseId": "r1"},
            {"candidates": [], "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 2}, "modelVersion": "gemini-1.5-pro-002", "responseId": "r1"}
        ]);
        let (v, usage) = run(&chunks, Some("gemini-1.5-pro"), false);
        for chunk in v.as_array().unwrap() {
            assert_eq!(chunk["responseId"], "kr0123456789");
            assert_eq!(chunk["modelVersion"], "gemini-1.5-pro");
        }
        assert_eq!(
            usage,
            Usage {
                prompt: 4,
                completion: 2
            }
        );
    }

    #[test]
    fn provider_errors_are_told_apart() {
        let found = |body: Value| {
            let mut out = Vec::new();
            let rw = Rewrite {
                id_suffix: "x",
                model: None,
                strip_usage: false,
                key: None,
            };
            rewrite(
                body.to_string().as_bytes(),
                &rw,
                &mut out,
                &mut Usage::default(),
            )
        };
        for error in [
            json!({"error": {"message": "overloaded"}}),
            json!({"error": {"code": 500, "status": "INTERNAL"}}),
            json!({"type": "error", "error": {"type": "overloaded_error"}}),
            json!({"type": "error", "code": "server_error", "message": "x"}),
            json!({"type": "response.failed", "response": {"object": "response"}}),
            // Gemini's non-SSE stream, ending in an error after its chunks.
            json!([{"candidates": []}, {"error": {"code": 503, "status": "UNAVAILABLE"}}]),
        ] {
            assert_eq!(found(error.clone()), Ok(Rewritten::Error), "{error}");
        }
        for fine in [
            json!({"id": "chatcmpl-1", "object": "chat.completion", "error": null}),
            json!({"type": "response.completed", "response": {"error": null}}),
            json!([{"candidates": [], "error": null}, "error", ["error"]]),
            json!({"object": "list", "data": [{"error": "an item's own"}]}),
        ] {
            assert_eq!(found(fine.clone()), Ok(Rewritten::Document), "{fine}");
        }
    }

    #[test]
    fn only_the_errors_of_an_array_are_scrubbed() {
        let chunk = json!({"candidates": [{"content": {"parts": [{"text": "hash 0123456789abcdef0123456789abcdef"}]}}]});
        let error = json!({"error": {"code": 503, "message": "bad key sk-proj-abc123def456"}});
        let doc = json!([chunk, error]).to_string();
        let out: Value = serde_json::from_slice(&scrub_error(doc.as_bytes(), None)).unwrap();
        assert_eq!(out[0], chunk);
        assert_eq!(out[1]["error"]["message"], "bad key [redacted]");
        // An object is scrubbed whole.
        let doc = error.to_string();
        assert!(!String::from_utf8_lossy(&scrub_error(doc.as_bytes(), None)).contains("sk-proj"));
    }

    #[test]
    fn moderations_are_answers() {
        let body = json!({"id": "modr-970d409ef3bef3b70c73d8232df86e7d", "model": "omni-moderation-2024-09-26", "results": [{"flagged": false}]});
        let (v, _) = run(&body, Some("omni-moderation-latest"), false);
        assert_eq!(v["id"], "modr-kr0123456789");
        assert_eq!(v["model"], "omni-moderation-latest");
        assert_eq!(v["results"], body["results"]);
    }

    proptest! {
        /// Members that are not rewritten come out equal to what went in,
        /// whatever they hold.
        #[test]
        fn untouched_members_survive(content in any_json(), extra in any_json()) {
            let answer = json!({"id": "chatcmpl-1", "object": "chat.completion", "choices": content, "extra": extra});
            let (v, _) = run(&answer, Some("m"), false);
            // Compared after one trip through the same parser on both sides
            // (serde_json's default float parsing is not exact).
            let answer: Value = serde_json::from_str(&answer.to_string()).unwrap();
            prop_assert_eq!(&v["choices"], &answer["choices"]);
            prop_assert_eq!(&v["extra"], &answer["extra"]);
        }

        /// A resource keeps whatever id it has; an answer never shows
        /// more of the provider's id than its type prefix.
        #[test]
        fn resource_ids_stay_and_answer_ids_go(id in "[A-Za-z0-9:_.-]{1,40}") {
            let resource = json!({"id": id, "object": "file", "model": id});
            prop_assert_eq!(run(&resource, Some("m"), false).0, resource);
            let (v, _) = run(&json!({"id": id, "object": "chat.completion"}), Some("m"), false);
            let new = v["id"].as_str().unwrap();
            let prefix = new.strip_suffix("kr0123456789").unwrap();
            prop_assert!(prefix.len() <= 17 && id.starts_with(prefix), "{new} from {id}");
        }
    }
}
