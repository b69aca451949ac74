//! Server-Sent Events: where an event ends, and one event rewritten. The
//! stream around them (split reads, the unfinished tail) is
//! [`super::stream`]'s.

use super::json::{Rewrite, Usage};
use super::stream::rewrite_payload;

/// An event end is at most four bytes (`\r\n\r\n`); the search resumes
/// this far back after a read, in case one straddles two reads.
pub(super) const BOUNDARY_LOOKBACK: usize = 3;

/// Finds the first event end at or after `from`: the position where the
/// blank line begins and the position after it. Line ends may be `\n`,
/// `\r\n` or `\r` (the SSE spec allows all three).
pub(super) fn event_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
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

/// Writes one event (without its blank line) rewritten, followed by a blank
/// line. Returns whether it was an error event, or had broken JSON data,
/// which is left out.
///
/// Of the event's fields, `event` and a numeric `retry` are kept as they
/// are, the `data` lines rewritten. A comment can carry provider text: it
/// stays as a bare `:` (a keep-alive still). `id` carries the provider's
/// event id and goes, as do fields the SSE standard does not define and a
/// `retry` that is not a number (clients ignore them; they could only
/// carry provider detail). An event left with nothing is not written at
/// all.
pub(super) fn rewrite_event(
    event: &[u8],
    rw: &Rewrite,
    usage: &mut Usage,
    out: &mut Vec<u8>,
) -> bool {
    let start = out.len();
    let mut errored = false;
    let mut data: Vec<&[u8]> = Vec::new();
    for line in split_lines(event) {
        let (name, value) = field(line);
        match name {
            b"data" => data.push(value),
            b"event" => {
                errored |= value == b"error";
                keep(line, out);
            }
            b"retry" if !value.is_empty() && value.iter().all(u8::is_ascii_digit) => {
                keep(line, out);
            }
            b"" => out.extend_from_slice(b":\n"),
            _ => {}
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
        match rewrite_payload(payload, errored, rw, usage) {
            Some((body, error)) => {
                errored = error;
                for line in body.split(|&b| b == b'\n') {
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(line);
                    out.push(b'\n');
                }
            }
            None => errored = true,
        }
    }
    if out.len() > start {
        out.push(b'\n');
    }
    errored
}

fn keep(line: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(line);
    out.push(b'\n');
}

/// A line's field name and value: the name up to the first colon (empty
/// for a comment), the value after it without one leading space. A line
/// without a colon is a name with an empty value.
fn field(line: &[u8]) -> (&[u8], &[u8]) {
    match line.iter().position(|&b| b == b':') {
        Some(colon) => {
            let value = &line[colon + 1..];
            (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
        }
        None => (line, &[]),
    }
}

fn split_lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event
        .split(|&b| b == b'\n')
        .flat_map(|l| l.split(|&b| b == b'\r'))
        .filter(|l| !l.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sanitize::stream::testing::{self, RW};
    use crate::sanitize::stream::{Framing, StreamRewriter};
    use proptest::prelude::*;

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
        s.extend_from_slice(b"data: {\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}\r\n\r\n");
        s.extend_from_slice(b": keep-alive comment\n\ndata: [DONE]\n\n");
        s
    }

    /// The same stream with what providers add around the data: comments
    /// naming their routing, event ids, a retry hint, an unknown field.
    fn decorated_stream() -> Vec<u8> {
        let mut s =
            b": OPENROUTER PROCESSING upstream=azure-eastus\n\nretry: 3000\nretry: azure\n\n"
                .to_vec();
        let plain = openai_stream();
        let text = std::str::from_utf8(&plain).unwrap();
        for (i, event) in text.split_inclusive("\n\n").enumerate() {
            s.extend_from_slice(
                format!("id: evt_provider_{i}\n: served-by node-7\nx-trace: abc\n").as_bytes(),
            );
            s.extend_from_slice(event.as_bytes());
        }
        s.extend_from_slice(b"id: evt_provider_last\n\n");
        s
    }

    fn run_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Usage, bool) {
        testing::run_in_pieces(Framing::Events, input, cuts)
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
        assert!(text.contains("\n:\n\ndata: [DONE]"), "{text}");
        assert!(!text.contains("keep-alive comment"), "{text}");
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
    fn comments_lose_their_text_and_ids_go() {
        let (out, usage, _) = run_in_pieces(&decorated_stream(), &[]);
        let text = String::from_utf8(out).unwrap();
        for gone in [
            "OPENROUTER",
            "azure",
            "node-7",
            "evt_provider",
            "id:",
            "x-trace",
        ] {
            assert!(!text.contains(gone), "{gone} in {text}");
        }
        assert!(text.starts_with(":\n\nretry: 3000\n\n:\ndata: {"), "{text}");
        assert!(text.ends_with(":\ndata: [DONE]\n\n"), "{text}");
        assert!(
            !text.contains("\n\n\n"),
            "an emptied event left a blank: {text}"
        );
        let (plain, plain_usage, _) = run_in_pieces(&openai_stream(), &[]);
        let data = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with("data:"))
                .map(str::to_owned)
                .collect()
        };
        assert_eq!(data(&text), data(&String::from_utf8(plain).unwrap()));
        assert_eq!(usage, plain_usage);
    }

    #[test]
    fn fields_without_a_colon_or_space() {
        let (out, _, errored) = run_in_pieces(b"event:error\ndata\n\ndata:[DONE]\n\n", &[]);
        assert_eq!(out, b"event:error\ndata: \n\ndata: [DONE]\n\n");
        assert!(errored);
    }

    #[test]
    fn multi_line_data_keeps_its_framing() {
        let (out, _, _) = run_in_pieces(
            b"data: line one\ndata: line two\n\ndata: {\ndata: \"id\": \"x-1\",\ndata: \"object\": \"text_completion\"\ndata: }\n\n",
            &[],
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with("data: line one\ndata: line two\n\n"),
            "{text}"
        );
        assert!(
            text.ends_with("data: {\"id\":\"x-krTEST\",\"object\":\"text_completion\"}\n\n"),
            "{text}"
        );
    }

    #[test]
    fn error_events_are_rewritten_and_scrubbed() {
        let input = b"data: {\"type\":\"response.failed\",\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"model\":\"gpt-4o-2024-08-06\",\"service_tier\":\"default\",\"error\":{\"message\":\"bad sk-abcdef0123456789\"}}}\n\n";
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
    fn error_events_lose_the_served_keys_edges() {
        let key = crate::secret::Secret::new("Zq7sh0rtK3y9".into());
        let rw = Rewrite {
            key: Some(&key),
            ..RW
        };
        let input = b"event: error\ndata: {\"type\":\"error\",\"error\":{\"message\":\"key Zq7sh0.. (ending K3y9) is throttled\"}}\n\n";
        let mut r = StreamRewriter::new(Framing::Events, 1 << 20);
        let mut out = Vec::new();
        r.push(input, &rw, &mut Usage::default(), &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(r.errored());
        assert!(
            text.contains("key [redacted] (ending [redacted]) is throttled"),
            "{text}"
        );
    }

    #[test]
    fn anthropic_events_and_error_event() {
        let input = b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01X\",\"type\":\"message\",\"model\":\"claude-3-5-sonnet-20241022\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded for sk-ant-api03-abcdefghijklmnop\"}}\n\n";
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
        fn any_split_gives_the_same_output(
            cuts in proptest::collection::btree_set(0usize..1400, 0..12),
            decorated in any::<bool>(),
        ) {
            let input = if decorated { decorated_stream() } else { openai_stream() };
            let cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= input.len()).collect();
            let whole = run_in_pieces(&input, &[]);
            prop_assert_eq!(run_in_pieces(&input, &cuts), whole);
        }
    }

    #[test]
    fn every_single_byte_offset() {
        for input in [openai_stream(), decorated_stream()] {
            testing::assert_every_cut_gives_the_same(Framing::Events, &input);
        }
    }

    /// A stream may open with a byte order mark; its first event is still
    /// an event (and rewritten), wherever the reads cut the mark.
    #[test]
    fn a_byte_order_mark_does_not_hide_the_first_event() {
        let mut input = b"\xEF\xBB\xBF".to_vec();
        input.extend_from_slice(&openai_stream());
        let (out, _, _) = run_in_pieces(&input, &[]);
        assert_eq!(out, run_in_pieces(&openai_stream(), &[]).0);
        testing::assert_every_cut_gives_the_same(Framing::Events, &input);
    }

    /// An event whose data opens as JSON but is cut short may name the
    /// provider's id and model: it is left out, and the stream counts as
    /// failed; the events around it pass.
    #[test]
    fn broken_json_data_is_withheld() {
        let input = b"data: {\"id\":\"chatcmpl-LEAK\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[\n\ndata: {\"id\":\"chatcmpl-2\",\"object\":\"chat.completion.chunk\",\"model\":\"x\",\"choices\":[]}\n\ndata: [DONE]\n\n";
        let (out, _, errored) = run_in_pieces(input, &[]);
        let text = String::from_utf8(out).unwrap();
        assert!(errored);
        assert!(
            !text.contains("LEAK") && !text.contains("2024-08-06"),
            "{text}"
        );
        assert_eq!(
            text,
            "data: {\"id\":\"chatcmpl-krTEST\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o\",\"choices\":[]}\n\ndata: [DONE]\n\n"
        );
    }
}
