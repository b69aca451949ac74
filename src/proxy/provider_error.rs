//! What a provider's error body says: whether it is about the key (a bad
//! or unauthorised key, a spent balance) rather than the request, and the
//! human message that may be passed on.
//!
//! Whether an answer is about the key is read from the fields providers
//! fill in themselves (OpenAI's `code` and `type`, Anthropic's `type`,
//! Gemini's `details[].reason`), never from free text: provider messages
//! quote the client's input (`Invalid value: 'invalid_api_key'`), and a
//! client must not be able to get keys marked invalid or exhausted by
//! sending the right words.

use crate::health::Verdict;
use crate::keys::pool::PoolKey;
use crate::sanitize::scrub;
use serde_json::Value;

/// Longest provider message passed on.
const MAX_MESSAGE_CHARS: usize = 1000;

/// A provider error body, read as far as keyrouter needs it.
#[derive(Debug, Default)]
pub struct ProviderError {
    /// OpenAI's `error.code`, Anthropic's and OpenAI's `error.type`,
    /// Gemini's `error.details[].reason`: the machine-readable words.
    codes: Vec<String>,
    /// The human message, as the provider wrote it.
    message: Option<String>,
}

/// Codes of a key the provider does not accept: OpenAI's `invalid_api_key`,
/// Anthropic's `authentication_error`, Gemini's `API_KEY_INVALID` (which
/// Gemini answers with 400) and its suspended or blocked keys.
fn rejects_key(code: &str) -> bool {
    matches!(
        code,
        "invalid_api_key" | "authentication_error" | "CONSUMER_SUSPENDED"
    ) || code.starts_with("API_KEY_")
}

/// Anthropic answers a spent balance with a 400 `invalid_request_error`
/// whose message opens with these words (the opening is the provider's,
/// not a quote of the client's input).
const SPENT_BALANCE: &str = "Your credit balance is too low";

impl ProviderError {
    /// Reads an OpenAI, Anthropic, Gemini or OpenAI-compatible error body;
    /// anything unreadable says nothing.
    pub fn parse(body: &[u8]) -> Self {
        let Ok(doc) = serde_json::from_slice::<Value>(body) else {
            return ProviderError::default();
        };
        let text = |v: &Value| v.as_str().map(str::to_owned);
        let mut codes = Vec::new();
        let error = &doc["error"];
        let message = match error {
            Value::Object(_) => {
                codes.extend(
                    ["code", "type", "status"]
                        .iter()
                        .filter_map(|f| text(&error[f])),
                );
                if let Some(details) = error["details"].as_array() {
                    codes.extend(details.iter().filter_map(|d| text(&d["reason"])));
                }
                text(&error["message"])
            }
            Value::String(message) => Some(message.clone()),
            _ => text(&doc["message"]).or_else(|| detail(&doc["detail"])),
        };
        ProviderError { codes, message }
    }

    /// What the answer says about the key, when it is about the key.
    pub fn about_key(&self) -> Option<Verdict> {
        if self.codes.iter().any(|c| rejects_key(c)) {
            Some(Verdict::Rejected)
        } else if self.codes.iter().any(|c| c == "insufficient_quota")
            || self
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with(SPENT_BALANCE))
        {
            Some(Verdict::QuotaExhausted)
        } else {
            None
        }
    }

    /// The message for the client: scrubbed of anything key-like (the
    /// served key's own edges included) and shortened; `None` when there is
    /// nothing left to say.
    pub fn client_message(&self, key: &PoolKey) -> Option<String> {
        let message = self.message.as_deref()?;
        let scrubbed = scrub::scrub(message.as_bytes(), Some(&key.material));
        let text = String::from_utf8_lossy(&scrubbed);
        let short: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
        (!short.trim().is_empty()).then_some(short)
    }
}

/// FastAPI-style servers (many OpenAI-compatible ones) put the message in
/// `detail`: a string, or a list of validation errors with a `msg` each.
fn detail(detail: &Value) -> Option<String> {
    match detail {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => items.first()?["msg"].as_str().map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn verdict(body: Value) -> Option<Verdict> {
        ProviderError::parse(body.to_string().as_bytes()).about_key()
    }

    fn message(body: Value) -> Option<String> {
        ProviderError::parse(body.to_string().as_bytes()).message
    }

    #[test]
    fn the_providers_own_codes_name_the_key() {
        let openai = json!({"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error", "code": "invalid_api_key"}});
        let anthropic = json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}});
        let gemini = json!({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.", "status": "INVALID_ARGUMENT",
            "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]}});
        for body in [openai, anthropic, gemini] {
            assert_eq!(verdict(body.clone()), Some(Verdict::Rejected), "{body}");
        }
        let quota = json!({"error": {"message": "You exceeded your current quota.", "type": "insufficient_quota", "code": "insufficient_quota"}});
        let balance = json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits."}});
        for body in [quota, balance] {
            assert_eq!(
                verdict(body.clone()),
                Some(Verdict::QuotaExhausted),
                "{body}"
            );
        }
    }

    #[test]
    fn words_the_client_sent_back_do_not_name_the_key() {
        for echoed in [
            "invalid_api_key",
            "authentication_error",
            "API_KEY_INVALID",
            "insufficient_quota",
            "Incorrect API key",
            "Your credit balance is too low",
        ] {
            let openai = json!({"error": {"message": format!("Invalid value: '{echoed}'. Supported values are: 'system', 'user'."),
                "type": "invalid_request_error", "param": "messages[0].role", "code": "invalid_value"}});
            let quoted_first = json!({"error": {"message": format!("'{echoed}' is not one of ['system', 'user']"), "type": "invalid_request_error", "code": null}});
            let anthropic = json!({"type": "error", "error": {"type": "invalid_request_error", "message": format!("messages.0.role: Input should be 'user' or 'assistant', got {echoed}")}});
            for body in [openai, quoted_first, anthropic] {
                assert_eq!(verdict(body.clone()), None, "{body}");
            }
        }
        assert_eq!(verdict(json!({"detail": "invalid_api_key"})), None);
        assert_eq!(ProviderError::parse(b"invalid_api_key").about_key(), None);
    }

    #[test]
    fn messages_of_every_shape() {
        let m = |s: &str| Some(s.to_owned());
        assert_eq!(
            message(json!({"error": {"message": "bad temperature"}})),
            m("bad temperature")
        );
        assert_eq!(
            message(json!({"error": "model not found"})),
            m("model not found")
        );
        assert_eq!(message(json!({"message": "too long"})), m("too long"));
        assert_eq!(message(json!({"detail": "Not Found"})), m("Not Found"));
        assert_eq!(
            message(
                json!({"detail": [{"loc": ["body", "messages"], "msg": "field required", "type": "missing"}]})
            ),
            m("field required")
        );
        assert_eq!(message(json!({"error": {"code": 400}})), None);
        assert_eq!(
            ProviderError::parse(b"<html>Bad Gateway</html>").message,
            None
        );
    }
}
