//! What a client saw of one response, with the contract's error-shape check.
#![allow(dead_code)]

use serde_json::Value;

/// A response as the client saw it.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Answer {
    pub async fn of(resp: reqwest::Response) -> Answer {
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            text: resp.text().await.unwrap(),
        }
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the contract's gateway error of `status` and `kind` whose
    /// `request_id` equals `x-request-id`; returns its message.
    pub fn error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text);
        assert_error_shape(&self.json(), kind, self.header("x-request-id"));
        self.json()["error"]["message"].as_str().unwrap().to_owned()
    }

    /// `Retry-After` as whole seconds; panics when absent or not a number.
    pub fn retry_after(&self) -> u64 {
        let value = self
            .header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After: {self:?}"));
        value
            .parse()
            .unwrap_or_else(|_| panic!("Retry-After is not whole seconds: {value}"))
    }
}

/// `{"error": {"type", "message", "request_id"}}` and nothing else.
pub fn assert_error_shape(v: &Value, kind: &str, request_id: Option<&str>) {
    let error = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
    let mut fields: Vec<&str> = error.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(fields, ["message", "request_id", "type"], "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    assert_eq!(error["type"], kind, "{v}");
    assert!(!error["message"].as_str().unwrap().is_empty(), "{v}");
    assert!(request_id.is_some(), "no x-request-id");
    assert_eq!(error["request_id"].as_str(), request_id, "{v}");
}
