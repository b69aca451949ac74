//! JSON Lines / NDJSON streams (`application/x-ndjson`, `application/jsonl`):
//! one JSON document per line. Where a line ends, and one line rewritten;
//! the stream around them (split reads, the unfinished tail, a last line
//! without its newline) is [`super::stream`]'s.

use super::json::{Rewrite, Usage};
use super::stream::rewrite_payload;

/// A line end is a single `\n`: it cannot straddle two reads.
pub(super) const BOUNDARY_LOOKBACK: usize = 0;

/// The first line end at or after `from`: where the line stops (before a
/// `\r\n` or `\n`) and where the next one starts.
pub(super) fn line_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let newline = from + buf[from..].iter().position(|&b| b == b'\n')?;
    // The byte before a line's `\n` is never the previous line's: that one
    // ended in `\n`.
    let end = if newline > 0 && buf[newline - 1] == b'\r' {
        newline - 1
    } else {
        newline
    };
    Some((end, newline + 1))
}

/// Writes one line (without its end) rewritten, followed by `\n`. Returns
/// whether it was a provider error, or broken JSON, which is left out.
/// Lines that are not JSON (blank ones) pass as they are.
pub(super) fn rewrite_line(
    line: &[u8],
    rw: &Rewrite,
    usage: &mut Usage,
    out: &mut Vec<u8>,
) -> bool {
    let Some((body, error)) = rewrite_payload(line, false, rw, usage) else {
        return true;
    };
    out.extend_from_slice(&body);
    out.push(b'\n');
    error
}

#[cfg(test)]
mod tests {
    use crate::sanitize::json::Usage;
    use crate::sanitize::stream::Framing;
    use crate::sanitize::stream::testing;
    use proptest::prelude::*;
    use serde_json::Value;

    /// Chat chunks as JSON lines, one with CRLF, a blank line, and a last
    /// line (the usage) without its newline.
    fn chat_lines() -> Vec<u8> {
        let mut s = Vec::new();
        for (i, word) in ["Hel", "lo"].iter().enumerate() {
            s.extend_from_slice(
                format!(
                    "{{\"id\":\"chatcmpl-AbC{i}\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_44709d6fcb\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{word}\"}}}}]}}\r\n"
                )
                .as_bytes(),
            );
        }
        s.extend_from_slice(b"\n");
        s.extend_from_slice(b"{\"id\":\"chatcmpl-AbC\",\"object\":\"chat.completion.chunk\",\"model\":\"gpt-4o-2024-08-06\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":4}}");
        s
    }

    fn run_in_pieces(input: &[u8], cuts: &[usize]) -> (Vec<u8>, Usage, bool) {
        testing::run_in_pieces(Framing::Lines, input, cuts)
    }

    #[test]
    fn every_line_is_rewritten_the_last_one_too() {
        let (out, usage, errored) = run_in_pieces(&chat_lines(), &[]);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert_eq!(lines[2], "", "the blank line stays");
        assert_eq!(lines[4], "", "every line ends in a newline");
        for line in [lines[0], lines[1], lines[3]] {
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["id"], "chatcmpl-krTEST");
            assert_eq!(v["model"], "gpt-4o");
            assert!(v.get("system_fingerprint").is_none(), "{line}");
        }
        assert!(!text.contains('\r'), "{text}");
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
    fn error_lines_are_scrubbed() {
        let input = b"{\"error\":{\"message\":\"model overloaded for sk-abcdef0123456789\"}}\n";
        let (out, _, errored) = run_in_pieces(input, &[]);
        assert!(errored);
        assert_eq!(
            out,
            b"{\"error\":{\"message\":\"model overloaded for [redacted]\"}}\n"
        );
    }

    proptest! {
        /// However the stream is cut into reads, the output is the same as
        /// when it arrives whole.
        #[test]
        fn any_split_gives_the_same_output(cuts in proptest::collection::btree_set(0usize..700, 0..12)) {
            let input = chat_lines();
            let cuts: Vec<usize> = cuts.into_iter().filter(|&c| c <= input.len()).collect();
            let whole = run_in_pieces(&input, &[]);
            prop_assert_eq!(run_in_pieces(&input, &cuts), whole);
        }
    }

    #[test]
    fn every_single_byte_offset() {
        testing::assert_every_cut_gives_the_same(Framing::Lines, &chat_lines());
    }
}
