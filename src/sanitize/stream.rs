//! Incremental rewriting of a streamed body made of records (SSE events,
//! JSON lines): `(chunk) → chunk`.
//!
//! Provider streams arrive in arbitrary TCP-sized pieces; a record may be
//! split anywhere, even inside `\r\n`. The rewriter keeps the unfinished tail
//! of the stream, emits every complete record as soon as its end arrives (so
//! the first event reaches the client without waiting for the next one), and
//! rewrites each JSON payload with the JSON rules. The unfinished tail is
//! bounded: a record that outgrows the limit ends the stream, so a provider
//! (or a body mislabelled as a stream) that never ends a record cannot make
//! keyrouter buffer without bound.

use super::json::{Rewrite, Rewritten, Unrewritten, Usage, rewrite, scrub_error};
use super::{ndjson, sse};
use std::borrow::Cow;

/// How a stream is cut into records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Server-Sent Events, ended by a blank line.
    Events,
    /// JSON Lines / NDJSON, ended by a newline.
    Lines,
}

impl Framing {
    /// The first record end at or after `from`: where the record stops and
    /// where the next one starts.
    fn record_end(self, buf: &[u8], from: usize) -> Option<(usize, usize)> {
        match self {
            Framing::Events => sse::event_end(buf, from),
            Framing::Lines => ndjson::line_end(buf, from),
        }
    }

    /// How far before the end of a searched buffer a record end may have
    /// begun without being recognised yet (it straddles two reads).
    fn lookback(self) -> usize {
        match self {
            Framing::Events => sse::BOUNDARY_LOOKBACK,
            Framing::Lines => ndjson::BOUNDARY_LOOKBACK,
        }
    }

    /// Writes one record rewritten, with its end; returns whether it
    /// carried a provider error.
    fn rewrite(self, record: &[u8], rw: &Rewrite, usage: &mut Usage, out: &mut Vec<u8>) -> bool {
        match self {
            Framing::Events => sse::rewrite_event(record, rw, usage, out),
            Framing::Lines => ndjson::rewrite_line(record, rw, usage, out),
        }
    }
}

/// An unfinished record grew past the limit; the stream cannot go on.
#[derive(Debug, thiserror::Error)]
#[error("a streamed event or line is larger than the limit")]
pub struct RecordTooLarge;

/// State of one stream.
pub struct StreamRewriter {
    framing: Framing,
    /// Bytes after the last complete record.
    pending: Vec<u8>,
    /// How far `pending` has been searched for a record end.
    scanned: usize,
    /// Largest unfinished record kept.
    limit: usize,
    /// A provider error passed through, or a record with broken JSON was
    /// left out (the stream counts as failed).
    errored: bool,
    /// Whether the stream's opening bytes were looked at for a byte order
    /// mark.
    opened: bool,
}

/// UTF-8's byte order mark, which may open an event stream (and is not
/// part of its first field name).
const BOM: &[u8] = b"\xEF\xBB\xBF";

impl StreamRewriter {
    /// A rewriter for `framing` that keeps at most `limit` bytes of an
    /// unfinished record.
    pub fn new(framing: Framing, limit: usize) -> Self {
        StreamRewriter {
            framing,
            pending: Vec::new(),
            scanned: 0,
            limit,
            errored: false,
            opened: false,
        }
    }

    /// Whether an error record passed through or a broken one was left out.
    pub fn errored(&self) -> bool {
        self.errored
    }

    /// Feeds a chunk; appends every record it completes, rewritten, to
    /// `out`. Fails (and forgets the unfinished record) when what is left
    /// unfinished is longer than the limit.
    pub fn push(
        &mut self,
        chunk: &[u8],
        rw: &Rewrite,
        usage: &mut Usage,
        out: &mut Vec<u8>,
    ) -> Result<(), RecordTooLarge> {
        let framing = self.framing;
        self.pending.extend_from_slice(chunk);
        if !self.opened {
            if self.pending.len() < BOM.len() && BOM.starts_with(&self.pending) {
                return Ok(()); // the mark may continue in the next read
            }
            if self.pending.starts_with(BOM) {
                self.pending.drain(..BOM.len());
            }
            self.opened = true;
        }
        let mut start = 0;
        while let Some((end, next)) = framing.record_end(&self.pending, self.scanned.max(start)) {
            self.errored |= framing.rewrite(&self.pending[start..end], rw, usage, out);
            start = next;
        }
        self.pending.drain(..start);
        if self.pending.len() > self.limit {
            self.pending = Vec::new();
            self.scanned = 0;
            return Err(RecordTooLarge);
        }
        self.scanned = self.pending.len().saturating_sub(framing.lookback());
        Ok(())
    }

    /// The stream ended: emits a last record that had no end after it.
    pub fn finish(&mut self, rw: &Rewrite, usage: &mut Usage, out: &mut Vec<u8>) {
        let rest = std::mem::take(&mut self.pending);
        let trimmed = trim_line_ends(&rest);
        if !trimmed.is_empty() {
            self.errored |= self.framing.rewrite(trimmed, rw, usage, out);
        }
        self.scanned = 0;
    }
}

fn trim_line_ends(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c != b'\n' && c != b'\r')
        .map_or(0, |p| p + 1);
    &b[..end]
}

/// One payload of a stream (an SSE event's data, a line) rewritten by the
/// JSON rules, on one line, and whether it is a provider error (`error`:
/// the record already said so, e.g. by its event name). An error is
/// scrubbed after rewriting, as the client's parser reads it (a JSON one
/// string by string, decoded): its provider message may quote key
/// material, the served key's edges included. A payload that is not JSON (`[DONE]`)
/// stays as it is; one that opens as JSON but does not parse is withheld
/// (`None`), since it may carry the provider's ids, and counts as an error.
pub(super) fn rewrite_payload<'p>(
    payload: &'p [u8],
    error: bool,
    rw: &Rewrite,
    usage: &mut Usage,
) -> Option<(Cow<'p, [u8]>, bool)> {
    let mut rewritten = Vec::with_capacity(payload.len() + 16);
    let (body, error) = match rewrite(payload, rw, &mut rewritten, usage) {
        Ok(found) => {
            // JSON whitespace may hold line breaks copied from the provider;
            // inside a record they would end it.
            for b in rewritten
                .iter_mut()
                .filter(|b| matches!(**b, b'\n' | b'\r'))
            {
                *b = b' ';
            }
            (Cow::Owned(rewritten), error || found == Rewritten::Error)
        }
        Err(Unrewritten::NotJson) => (Cow::Borrowed(payload), error),
        Err(Unrewritten::Broken) => {
            tracing::warn!("a streamed event from the provider is not valid JSON; withheld");
            return None;
        }
    };
    if !error {
        return Some((body, false));
    }
    let scrubbed = scrub_error(&body, rw.key).into_owned();
    Some((Cow::Owned(scrubbed), true))
}

/// What the tests of every framing share.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    /// The rewrite the tests apply: ids end in `krTEST`, the model is
    /// `gpt-4o`.
    pub const RW: Rewrite<'static> = Rewrite {
        id_suffix: "krTEST",
        model: Some("gpt-4o"),
        strip_usage: false,
        key: None,
    };

    /// `input` fed in the pieces `cuts` marks, then finished: the output,
    /// the usage seen and whether an error passed.
    pub fn run_in_pieces(framing: Framing, input: &[u8], cuts: &[usize]) -> (Vec<u8>, Usage, bool) {
        let mut r = StreamRewriter::new(framing, 1 << 20);
        let mut usage = Usage::default();
        let mut out = Vec::new();
        let mut last = 0;
        for &c in cuts {
            r.push(&input[last..c], &RW, &mut usage, &mut out).unwrap();
            last = c;
        }
        r.push(&input[last..], &RW, &mut usage, &mut out).unwrap();
        r.finish(&RW, &mut usage, &mut out);
        (out, usage, r.errored())
    }

    /// Cut in two at every byte, `input` gives what it gives whole.
    pub fn assert_every_cut_gives_the_same(framing: Framing, input: &[u8]) {
        let whole = run_in_pieces(framing, input, &[]);
        for cut in 0..=input.len() {
            assert_eq!(run_in_pieces(framing, input, &[cut]), whole, "cut at {cut}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::RW;
    use super::*;

    #[test]
    fn complete_records_leave_at_once_and_a_partial_one_waits() {
        for (framing, input, expected) in [
            (
                Framing::Events,
                &b"data: {\"id\":\"x-1\",\"object\":\"chat.completion.chunk\"}\n\ndata: {\"id\""[..],
                &b"data: {\"id\":\"x-krTEST\",\"object\":\"chat.completion.chunk\"}\n\n"[..],
            ),
            (
                Framing::Lines,
                b"{\"id\":\"x-1\",\"object\":\"text_completion\"}\n{\"id\"",
                b"{\"id\":\"x-krTEST\",\"object\":\"text_completion\"}\n",
            ),
        ] {
            let mut r = StreamRewriter::new(framing, 1 << 20);
            let mut out = Vec::new();
            r.push(input, &RW, &mut Usage::default(), &mut out).unwrap();
            assert_eq!(out, expected, "{framing:?}");
        }
    }

    #[test]
    fn an_unfinished_record_is_bounded() {
        let mut r = StreamRewriter::new(Framing::Events, 64);
        let mut usage = Usage::default();
        let mut out = Vec::new();
        let event = b"data: {\"id\":\"x-1\",\"object\":\"text_completion\"}\n\n";
        // Complete records of any total size pass.
        for _ in 0..10 {
            r.push(event, &RW, &mut usage, &mut out).unwrap();
        }
        let rewritten = b"data: {\"id\":\"x-krTEST\",\"object\":\"text_completion\"}\n\n";
        assert_eq!(out, rewritten.repeat(10));
        // An unfinished one may reach the limit, not pass it.
        r.push(&[b'a'; 60], &RW, &mut usage, &mut out).unwrap();
        r.push(b"data", &RW, &mut usage, &mut out).unwrap();
        assert!(r.push(b"!", &RW, &mut usage, &mut out).is_err());
        assert!(r.pending.capacity() == 0, "the unfinished record is freed");
    }

    #[test]
    fn payloads_that_are_errors_are_scrubbed() {
        let mut usage = Usage::default();
        let mut payload = |p: &'static [u8], error| rewrite_payload(p, error, &RW, &mut usage);
        let (body, error) = payload(
            br#"{"error": {"message": "bad key sk-abcdef0123456789"}}"#,
            false,
        )
        .unwrap();
        assert!(error);
        assert_eq!(&*body, br#"{"error":{"message": "bad key [redacted]"}}"#);
        // An escape hides nothing, and the scrubbed event stays one line.
        let (body, _) = payload(
            br#"{"error": {"message": "bad key \u0073k-proj-Ab12Cd\nretry"}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            &*body,
            br#"{"error":{"message": "bad key [redacted]\nretry"}}"#
        );
        let (body, error) = payload(b"oops sk-abcdef0123456789", true).unwrap();
        assert!(error);
        assert_eq!(&*body, b"oops [redacted]");
        let (body, error) = payload(b"[DONE]", false).unwrap();
        assert!(!error);
        assert!(matches!(body, Cow::Borrowed(b"[DONE]")));
        let (_, error) = payload(br#"{"id":"x-1","error":null}"#, false).unwrap();
        assert!(!error);
        assert!(payload(br#"{"id":"chatcmpl-LEAK","#, false).is_none());
    }
}
