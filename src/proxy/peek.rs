//! What keyrouter reads from a request before forwarding it: the model the
//! client asked for (written back into responses) and its output token cap
//! (for the `tpm` reservation).

use crate::config::ProviderKind;
use crate::json_members;
use std::borrow::Cow;

/// The request's model and output cap, read in one pass over the body
/// (see [`json_members`]: only the top level's structure is followed).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RequestPeek {
    pub model: Option<String>,
    max_output_tokens: Option<u64>,
}

/// Output tokens reserved for a request that names no cap: the estimate is
/// corrected when the provider reports usage.
const DEFAULT_OUTPUT_TOKENS: u64 = 512;

impl RequestPeek {
    /// Tokens to reserve before the provider reports usage: the input at
    /// about four bytes per token plus the output cap.
    pub fn estimated_tokens(&self, body_len: usize) -> u64 {
        // Saturating: a client may name any cap up to `u64::MAX`.
        (body_len as u64)
            .div_ceil(4)
            .saturating_add(self.max_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS))
    }
}

/// The model comes from a JSON body's `model`; a request whose body names
/// none names it in its path (`path` below the provider's base URL):
/// Gemini's `…/models/{model}:generateContent`, Azure's
/// `/openai/deployments/{deployment}/…`.
pub fn peek_request(kind: ProviderKind, path: &str, body: &[u8]) -> RequestPeek {
    let mut peek = peek_body(body);
    if peek.model.is_none() {
        peek.model = model_in_path(kind, path).map(str::to_owned);
    }
    peek
}

/// Reads a body that is a JSON object, whatever its `Content-Type` says:
/// providers read such a body as JSON even when the client labels it
/// otherwise (`curl -d` sends `application/x-www-form-urlencoded`). Forms
/// and multipart bodies never open with `{`.
fn peek_body(body: &[u8]) -> RequestPeek {
    if body.trim_ascii_start().first() != Some(&b'{') {
        return RequestPeek::default();
    }
    // The last of a name given twice, as providers read it.
    let (mut model, mut max_tokens, mut max_completion_tokens, mut max_output_tokens) =
        (None, None, None, None);
    let text = |raw: std::ops::Range<usize>| std::str::from_utf8(&body[raw]).ok();
    let scanned = json_members::each_member(body, |name, value| {
        let written = text(name.raw.clone());
        let slot = match written.and_then(|w| name.decode(w)).as_deref() {
            Some("model") => &mut model,
            Some("max_tokens") => &mut max_tokens,
            Some("max_completion_tokens") => &mut max_completion_tokens,
            Some("max_output_tokens") => &mut max_output_tokens,
            _ => return,
        };
        *slot = Some(value);
    });
    if scanned.is_err() {
        return RequestPeek::default();
    }
    let count = |raw: Option<_>| raw.and_then(text).and_then(|v| v.parse::<u64>().ok());
    RequestPeek {
        model: model
            .and_then(text)
            .and_then(json_members::string)
            .map(Cow::into_owned),
        max_output_tokens: count(max_completion_tokens)
            .or(count(max_tokens))
            .or(count(max_output_tokens)),
    }
}

/// The model a request's path names, for the provider kinds whose requests
/// name it there.
fn model_in_path(kind: ProviderKind, path: &str) -> Option<&str> {
    match kind {
        ProviderKind::Gemini => google_model(path),
        ProviderKind::AzureOpenAi => azure_deployment(path),
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::Anthropic => None,
    }
}

/// The model of a Google-style method path, `…/models/{model}:{method}` or
/// `…/tunedModels/{model}:{method}`.
fn google_model(path: &str) -> Option<&str> {
    let (rest, last) = path.rsplit_once('/')?;
    let (model, _method) = last.split_once(':')?;
    let collection = rest.rsplit('/').next()?;
    (matches!(collection, "models" | "tunedModels") && is_plain_name(model)).then_some(model)
}

/// The deployment of an Azure OpenAI path,
/// `/openai/deployments/{deployment}/chat/completions`: Azure clients name
/// the deployment, not a model, and an SDK expects the answer's `model`
/// filled.
fn azure_deployment(path: &str) -> Option<&str> {
    let (deployment, operation) = path.strip_prefix("/openai/deployments/")?.split_once('/')?;
    // An operation must follow: `GET …/deployments/{id}` is the deployment
    // resource itself, not an answer.
    (!operation.is_empty() && is_plain_name(deployment)).then_some(deployment)
}

/// Only plain names are taken from a path: the value is written into
/// responses.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_bodies_that_are_json_objects() {
        let body =
            br#"{"messages":[{"role":"user","content":"hi"}],"model":"gpt-4o","max_tokens":100}"#;
        let peek = peek_request(ProviderKind::OpenAi, "/v1/chat/completions", body);
        assert_eq!(peek.model.as_deref(), Some("gpt-4o"));
        assert_eq!(peek.estimated_tokens(400), 200);
        let indented = peek_request(
            ProviderKind::OpenAi,
            "/v1/chat/completions",
            b" \n{ \"model\": \"gpt-4o\" }",
        );
        assert_eq!(indented.model.as_deref(), Some("gpt-4o"));
        // A form, a multipart upload, an array: no model to read.
        for other in [
            &b"model=gpt-4o&prompt=hi"[..],
            b"--boundary\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--boundary--",
            br#"[{"model":"gpt-4o"}]"#,
            b"",
        ] {
            assert_eq!(
                peek_request(ProviderKind::OpenAi, "/v1/audio/transcriptions", other),
                RequestPeek::default()
            );
        }
        let uncapped = peek_request(ProviderKind::OpenAi, "/v1/chat/completions", b"{}");
        assert_eq!(uncapped.model, None);
        assert_eq!(uncapped.estimated_tokens(0), DEFAULT_OUTPUT_TOKENS);
        let responses_api = peek_request(
            ProviderKind::OpenAi,
            "/v1/responses",
            br#"{"model":"o3","max_output_tokens":7}"#,
        );
        assert_eq!(responses_api.estimated_tokens(4), 8);
    }

    #[test]
    fn reads_the_top_level_as_a_provider_would() {
        let peek = |body: &str| {
            peek_request(
                ProviderKind::OpenAi,
                "/v1/chat/completions",
                body.as_bytes(),
            )
        };
        // Names inside messages are content, not the request's.
        let nested = r#"{"messages":[{"role":"user","content":"{\"model\":\"x\"}","model":"y"}],"model":"gpt-4o"}"#;
        assert_eq!(peek(nested).model.as_deref(), Some("gpt-4o"));
        // Escapes in names and values are decoded; a name given twice
        // counts once, the last time.
        let escaped = r#"{"mod\u0065l":"gpt\u002d4o","max_tokens":5,"max_tokens":9}"#;
        let escaped = peek(escaped);
        assert_eq!(escaped.model.as_deref(), Some("gpt-4o"));
        assert_eq!(escaped.estimated_tokens(0), 9);
        // A model that is not a string, or a cap that is not a count, is
        // not taken; a body cut short gives nothing at all.
        let huge = peek(r#"{"max_tokens":18446744073709551615}"#);
        assert_eq!(huge.estimated_tokens(400), u64::MAX);
        let odd = peek(r#"{"model":7,"max_tokens":-1}"#);
        assert_eq!(odd, RequestPeek::default());
        assert_eq!(
            peek(r#"{"model":"gpt-4o","messages":[{"#),
            RequestPeek::default()
        );
    }

    /// Checks the model read from each path when the body names none, and
    /// that a model the body names wins over the path.
    fn check_path_models(kind: ProviderKind, body: &[u8], cases: &[(&str, Option<&str>)]) {
        for (path, model) in cases {
            let peek = peek_request(kind, path, body);
            assert_eq!(peek.model.as_deref(), *model, "{path}");
            let named = peek_request(kind, path, br#"{"model":"from-body"}"#);
            assert_eq!(named.model.as_deref(), Some("from-body"), "{path}");
        }
    }

    #[test]
    fn azure_names_the_deployment_in_the_path() {
        let chat = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
        check_path_models(
            ProviderKind::AzureOpenAi,
            chat,
            &[
                (
                    "/openai/deployments/gpt4o-prod/chat/completions",
                    Some("gpt4o-prod"),
                ),
                ("/openai/deployments/emb.v3_1/embeddings", Some("emb.v3_1")),
                ("/openai/deployments/gpt4o-prod", None),
                ("/openai/deployments/gpt4o-prod/", None),
                ("/openai/deployments", None),
                ("/openai/deployments/a%22b/chat/completions", None),
                ("/openai/deployments//chat/completions", None),
                ("/v1/openai/deployments/x/chat/completions", None),
            ],
        );
        // Other kinds never take a model from such a path.
        check_path_models(
            ProviderKind::OpenAiCompatible,
            chat,
            &[("/openai/deployments/gpt4o-prod/chat/completions", None)],
        );
    }

    #[test]
    fn gemini_names_the_model_in_the_path() {
        check_path_models(
            ProviderKind::Gemini,
            br#"{"contents":[{"parts":[{"text":"hi"}]}]}"#,
            &[
                (
                    "/v1beta/models/gemini-1.5-pro:generateContent",
                    Some("gemini-1.5-pro"),
                ),
                (
                    "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
                    Some("gemini-2.0-flash"),
                ),
                (
                    "/v1/projects/p/locations/us/publishers/google/models/gemini-1.5-flash-002:generateContent",
                    Some("gemini-1.5-flash-002"),
                ),
                (
                    "/v1beta/tunedModels/my-tuned_1:generateContent",
                    Some("my-tuned_1"),
                ),
                ("/v1beta/models/gemini-1.5-pro", None),
                ("/v1beta/models/:generateContent", None),
                ("/v1beta/models/a%22b:generateContent", None),
                ("/v1beta/files/abc:download", None),
            ],
        );
        // A body-less request still has its path read.
        let get = peek_request(
            ProviderKind::Gemini,
            "/v1beta/models/gemini-1.5-pro:countTokens",
            b"",
        );
        assert_eq!(get.model.as_deref(), Some("gemini-1.5-pro"));
    }
}
