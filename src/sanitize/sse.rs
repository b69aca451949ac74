//! Incremental rewriting of a Server-Sent Events stream: `(chunk) → chunk`.
//!
//! Provider streams arrive in arbitrary TCP-sized pieces; an event may be
//! split anywhere, even inside `\r\n`. The rewriter keeps the unfinished tail
//! of the stream, emits every complete event as soon as its blank line
//! arrives (so the first event reaches the client without waiting for the
//! next one), and rewrites each `data:` payload with the JSON rules.

use super::json::{Rewrite, Usage, rewrite};
use super::scrub;

/// State of one stream.
#[derive(Default)]
pub struct SseRewriter {
    /// Bytes after the last complete event.
    pending: Vec<u8>,
    /// How far `pending` has been searched for an event end.
    scanned: usize,
    /// The provider sent an error event (the stream counts as failed).
    errored: bool,
}

impl SseRewriter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether an error event passed through.
    pub fn errored(&self) -> bool {
        self.errored
    }

    /// Feeds a chunk; appends every event it completes, rewritten, to `out`.
    pub fn push(&mut self, chunk: &[u8], rw: &Rewrite, usage: &mut Usage, out: &mut Vec<u8>) {
        self.pending.extend_from_slice(chunk);
        let mut start = 0;
        while let Some((end, next)) = event_end(&self.pending, self.scanned.max(start)) {
            let event = &self.pending[start..end];
            self.errored |= rewrite_event(event, rw, usage, out);
            start = next;
        }
        self.pending.drain(..start);
        // Resume the search a few bytes back: a boundary may straddle chunks.
        self.scanned = self.pending.len().saturating_sub(3);
    }

    /// The stream ended: emits a last event that had no blank line after it.
    pub fn finish(&mut self, rw: &Rewrite, usage: &mut Usage, out: &mut Vec<u8>) {
        let rest = std::mem::take(&mut self.pending);
        let trimmed = trim_line_ends(&rest);
        if !trimmed.is_empty() {
            self.errored |= rewrite_event(trimmed, rw, usage, out);
        }
        self.scanned = 0;
    }
}

/// Finds the first event end at or after `from`: the position where the
/// blank line begins and the position after it. Line ends may be `\n`,
/// `\r\n` or `\r` (the SSE spec allows all three).
fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let mut i = from;
    while i < buf.len() {
        let (first_len, second_at) = match buf[i] {
            b'\n' => (1, i + 1),
            b'\r' if buf.get(i + 1) == Some(&b'\n') => (2, i + 2),
            // A lone `\r` at the very end may be the first half of `\r\n`.
            b'\r' if i + 1 == buf.len() => return None,
            b'\r' => (1, i + 1),
            _ => {
                i += 1;
                continue;
            }
        };
        let second = match (buf.get(second_at), buf.get(second_at + 1)) {
            (Some(b'\n'), _) => Some(1),
            (Some(b'\r'), Some(b'\n')) => Some(2),
            (Some(b'\r'), Some(_)) => Some(1),
            // `\r` last in the buffer: wait, it may be followed by `\n`.
            (Some(b'\r'), None) => return None,
            _ => None,
        };
        match second {
            Some(n) => return Some((i, second_at + n)),
            None => i += first_len,
        }
    }
    None
}

fn trim_line_ends(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c != b'\n' && c != b'\r')
        .map_or(0, |p| p + 1);
    &b[..end]
}

/// Writes one event (without its blank line) rewritten, followed by a blank
/// line. Returns whether it was an error event.
fn rewrite_event(event: &[u8], rw: &Rewrite, usage: &mut Usage, out: &mut Vec<u8>) -> bool {
    let mut errored = false;
    let mut data: Vec<&[u8]> = Vec::new();
    for line in split_lines(event) {
        if let Some(rest) = line.strip_prefix(b"data:") {
            data.push(rest.strip_prefix(b" ").unwrap_or(rest));
        } else {
            if line == b"event: error" || line == b"event:error" {
                errored = true;
            }
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    if !data.is_empty() {
        let joined;
        let payload: &[u8] = if data.len() == 1 {
            data[0]
        } else {
            joined = data.join(&b'\n');
            &joined
        };
        errored |= is_error_payload(payload);
        let mut rewritten = Vec::with_capacity(payload.len() + 16);
        let body: &[u8] = if rewrite(payload, rw, &mut rewritten, usage) {
            // JSON whitespace may hold line breaks copied from the provider;
            // inside an event they would end the `data:` field.
            for b in rewritten
                .iter_mut()
                .filter(|b| matches!(**b, b'\n' | b'\r'))
            {
                *b = b' ';
            }
            &rewritten
        } else {
            // `[DONE]` and other non-JSON payloads pass unchanged.
            payload
        };
        // An error event is rewritten like any other, then scrubbed: its
        // provider message may quote key material.
        let body = if errored {
            scrub::scrub(body, None)
        } else {
            body.into()
        };
        for line in body.split(|&b| b == b'\n') {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line);
            out.push(b'\n');
        }
    }
    out.push(b'\n');
    errored
}

fn split_lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event
        .split(|&b| b == b'\n')
        .flat_map(|l| l.split(|&b| b == b'\r'))
        .filter(|l| !l.is_empty())
}

/// OpenAI sends `{"error": ...}`, Anthropic `{"type": "error", ...}`, the
/// Responses API `{"type": "response.failed", ...}` or `{"type": "error"}`.
fn is_error_payload(payload: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<&'a str>,
        error: Option<serde::de::IgnoredAny>,
    }
    match serde_json::from_slice::<Probe>(payload) {
        Ok(p) => p.error.is_some() || matches!(p.kind, Some("error" | "response.failed")),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const RW: Rewrite<'static> = Rewrite {
        id_suffix: "krTEST",
        model: Some("gpt-4o"),
        strip_usage: false,
    };

    fn openai_stream() -> Vec<u8> {
        let mut s = Vec::new();
        for (i, word) in ["Hel", "lo", " wor", "ld"].iter().enumerate() {
            s.extend_from_slice(
                format!(
                    "data: {{\"id\":\"chatcmpl-AbC{i}\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\n\n"
                )
                .as_bytes(),
            );
        }
        s.extend_from_slice(b"data: {\"id\":\"chatcmpl-AbC\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\r\n\r\n");
        s.extend_from_slice(b": keep-alive comment\n\ndata: [DONE]\n\n");
        s
    }

    fn run_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Usage, bool) {
        let mut r = SseRewriter::new();
        let mut usage = Usage::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts {
            r.push(&input[last..c], &RW, &mut usage, &mut out);
            last = c;
        }
        r.push(&input[last..], &RW, &mut usage, &mut out);
        r.finish(&RW, &mut usage, &mut out);
        (out, usage, r.errored())
    }

    #[test]
    fn rewrites_every_event() {
        let (out, usage, errored) = run_in_pieces(&openai_stream(), &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("chatcmpl-AbC"), "{text}");
        assert!(!text.contains("fp_44709d6fcb"), "{text}");
        assert!(!text.contains("2024-08-06"), "{text}");
        assert_eq!(
            text.matches("\"id\":\"chatcmpl-krTEST\"").count(),
            5,
            "{text}"
        );
        assert!(text.contains("\"content\":\"Hel\""));
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
        assert!(text.contains(": keep-alive comment\n\n"));
        assert_eq!(
            usage,
            Usage {
                prompt: 9,
                completion: 4
            }
        );
        assert!(!errored);
    }

    #[test]
    fn multi_line_data_keeps_its_framing() {
        let (out, _, _) = run_in_pieces(
            b"data: line one\ndata: line two\n\ndata: {\ndata: \"id\": \"x-1\"\ndata: }\n\n",
            &[],
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("data: line one\ndata: line two\n\n"),
            "{text}"
        );
        assert!(text.ends_with("data: {\"id\":\"x-krTEST\"}\n\n"), "{text}");
    }

    #[test]
    fn error_events_are_rewritten_and_scrubbed() {
        let input = b"data: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_1\",\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"error\":{\"message\":\"bad sk-abcdef0123456789\"}}}\n\n";
        let (out, _, errored) = run_in_pieces(input, &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(errored);
        assert!(
            !text.contains("2024-08-06") && !text.contains("service_tier"),
            "{text}"
        );
        assert!(!text.contains("sk-abcdef"), "{text}");
        assert!(text.contains("\"id\":\"resp_krTEST\""), "{text}");
    }

    #[test]
    fn complete_events_leave_at_once() {
        let mut r = SseRewriter::new();
        let mut usage = Usage::default();
        let mut out = Vec::new();
        r.push(
            b"data: {\"id\":\"x-1\"}\n\ndata: {\"id\"",
            &RW,
            &mut usage,
            &mut out,
        );
        assert_eq!(out, b"data: {\"id\":\"x-krTEST\"}\n\n");
    }

    #[test]
    fn anthropic_events_and_error_event() {
        let input = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01X\",\"model\":\"claude-3-5-sonnet-20241022\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded for sk-ant-api03-abcdefghijklmnop\"}}\n\n";
        let (out, usage, errored) = run_in_pieces(input, &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("\"id\":\"msg_krTEST\""), "{text}");
        assert!(!text.contains("claude-3-5-sonnet-20241022"));
        assert!(text.contains("event: content_block_delta\ndata: "));
        assert!(!text.contains("sk-ant-api03"), "{text}");
        assert_eq!(
            usage,
            Usage {
                prompt: 25,
                completion: 15
            }
        );
        assert!(errored);
    }

    proptest! {
        /// However the stream is cut into reads, the output is the same as
        /// when it arrives whole.
        #[test]
        fn any_split_gives_the_same_output(cuts in proptest::collection::btree_set(0usize..1000, 0..12)) {
            let input = openai_stream();
            let cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= input.len()).collect();
            let whole = run_in_pieces(&input, &[]);
            prop_assert_eq!(run_in_pieces(&input, &cuts), whole);
        }
    }

    #[test]
    fn every_single_byte_offset() {
        let input = openai_stream();
        let whole = run_in_pieces(&input, &[]);
        for cut in 0..=input.len() {
            assert_eq!(run_in_pieces(&input, &[cut]), whole, "cut at {cut}");
        }
    }
}
