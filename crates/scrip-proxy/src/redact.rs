//! Keeping the injected secret out of what the agent receives, when the
//! upstream echoes it (in a header, an error page, a debug endpoint).
//!
//! The forms looked for are the secret itself and the forms the injection
//! put on the wire (the `user:secret` base64 of basic auth, the
//! percent-encoded query value). A body is redacted as it streams: each
//! chunk is scanned together with the last `longest - 1` bytes of the one
//! before (the carry-over), so a secret split across chunks is still found,
//! and nothing but that carry-over is ever held. Every match is overwritten
//! with `*` of the same length, so `Content-Length` stays true.
//!
//! A form's first [`threshold`] bytes (half of it, at least 8) are enough
//! to be masked, with every byte after them up to a delimiter (a quote, `<`,
//! `>`, `&`, a backslash, a backquote, a comma, a semicolon, a space or any
//! byte that is not visible ASCII or NUL), whatever those bytes are. So:
//!
//! - an echo cut short shows at most the first `threshold - 1` bytes of a
//!   form, wherever the agent makes the cut fall (an upstream that shows
//!   the first 200 bytes of the request URL, after a path the agent chose):
//!   less than half of a form of 16 bytes or more, all but one byte of one
//!   of 8 or fewer;
//! - an agent that gets its own input echoed back (a request id, an
//!   `Origin`, a `?next=`) and guesses one more byte at a time learns one
//!   byte more, and then nothing: past the first `threshold` bytes a right
//!   guess and a wrong one are masked alike. A guess shorter than that is
//!   never masked, so it tells nothing either, until the one byte before.
//!
//! What stays out of reach: a form holding a delimiter can show its part
//! after the delimiter when it is echoed cut short.

use bytes::{Bytes, BytesMut};

/// What an echoed secret is replaced with in a header value.
pub const HEADER_MASK: &str = "[redacted]";

/// How many of a form's first bytes are masked wherever they appear: half
/// of it, at least 8 (a whole form of 8 bytes or fewer).
#[must_use]
pub fn threshold(form_len: usize) -> usize {
    form_len.min(form_len.div_ceil(2).max(8))
}

/// Whether a masked run goes on over `b`: visible ASCII but the quotes,
/// `<`, `>`, `&`, backslash, backquote, comma and semicolon that end a
/// value in the text an upstream writes (JSON, HTML, a query, a header),
/// and NUL, which in UTF-16 or UTF-32 text sits between the characters of
/// a value (so an echo in those, cut short, is masked to its end too).
fn continues_run(b: u8) -> bool {
    b == 0
        || b.is_ascii_graphic()
            && !matches!(
                b,
                b'"' | b'\'' | b'<' | b'>' | b'&' | b'\\' | b'`' | b',' | b';'
            )
}

/// The byte strings that must not reach the agent.
#[derive(Clone)]
pub struct Patterns {
    forms: Vec<Vec<u8>>,
    longest: usize,
}

impl std::fmt::Debug for Patterns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Patterns")
            .field("forms", &self.forms.len())
            .finish_non_exhaustive()
    }
}

/// Every form is a secret in some encoding: zeroed when dropped.
impl Drop for Patterns {
    fn drop(&mut self) {
        for form in &mut self.forms {
            zeroize::Zeroize::zeroize(form);
        }
    }
}

impl Default for Patterns {
    fn default() -> Self {
        Self::new([])
    }
}

impl Patterns {
    /// The patterns for these forms (empty ones ignored, duplicates once).
    #[must_use]
    pub fn new(forms: impl IntoIterator<Item = Vec<u8>>) -> Self {
        let mut out: Vec<Vec<u8>> = Vec::new();
        for mut f in forms {
            if !f.is_empty() && !out.contains(&f) {
                out.push(f);
            } else {
                zeroize::Zeroize::zeroize(&mut f);
            }
        }
        let longest = out.iter().map(Vec::len).max().unwrap_or(0);
        Self {
            forms: out,
            longest,
        }
    }

    /// Whether `haystack` holds any form whole: for tests of which forms
    /// are looked for.
    #[cfg(test)]
    pub(crate) fn found_in(&self, haystack: &[u8]) -> bool {
        self.forms
            .iter()
            .any(|f| memchr::memmem::find(haystack, f).is_some())
    }

    /// The spans of `buf` to mask, in order and apart: from each place a
    /// form's first [`threshold`] bytes are (overlapping places too), over
    /// the bytes after them up to a delimiter, and at least over the whole
    /// form where it is whole. Linear in `buf` for each form, whatever an
    /// upstream sends: a run is scanned once however many places lead
    /// into it.
    fn spans(&self, buf: &[u8]) -> Vec<(usize, usize)> {
        let mut spans: Vec<(usize, usize)> = Vec::new();
        for form in &self.forms {
            let start = start_of(form);
            let finder = memchr::memmem::Finder::new(start);
            let first = spans.len();
            // The last run scanned: from where, and the delimiter (or the
            // end of `buf`) that ends it.
            let mut run: Option<(usize, usize)> = None;
            let mut from = 0;
            while let Some(found) = buf.get(from..).and_then(|rest| finder.find(rest)) {
                let at = from + found;
                let after = at + start.len();
                let end = match run {
                    Some((scanned, end)) if scanned <= after && after <= end => end,
                    _ => {
                        let mut end = after;
                        while buf.get(end).is_some_and(|b| continues_run(*b)) {
                            end += 1;
                        }
                        run = Some((after, end));
                        end
                    }
                };
                let whole = at + form.len();
                let to = if end < whole && buf.get(at..).is_some_and(|r| r.starts_with(form)) {
                    whole
                } else {
                    end
                };
                let this_form = spans.len() > first;
                match spans.last_mut() {
                    Some(last) if this_form && at <= last.1 => last.1 = last.1.max(to),
                    _ => spans.push((at, to)),
                }
                from = at + 1;
            }
        }
        merge(spans)
    }

    /// A header value with every span to mask replaced, or `None` when it
    /// has none.
    #[must_use]
    pub fn redact_header(&self, value: &[u8]) -> Option<Vec<u8>> {
        let spans = self.spans(value);
        if spans.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(value.len());
        let mut at = 0;
        for (from, to) in spans {
            out.extend_from_slice(value.get(at..from).unwrap_or_default());
            out.extend_from_slice(HEADER_MASK.as_bytes());
            at = to;
        }
        out.extend_from_slice(value.get(at..).unwrap_or_default());
        Some(out)
    }
}

/// A form's first [`threshold`] bytes.
fn start_of(form: &[u8]) -> &[u8] {
    form.get(..threshold(form.len())).unwrap_or(form)
}

/// The streaming state of one body.
#[derive(Debug)]
pub struct Redactor {
    patterns: std::sync::Arc<Patterns>,
    /// What came and is not sent yet, as it came: the last `longest - 1`
    /// bytes, so that a form begun in them is still found whole.
    carry: BytesMut,
    /// How many of `carry`'s first bytes a span begun in what was sent
    /// covers.
    lead: usize,
    /// That span reached the end of what came: it goes on over the next
    /// bytes up to a delimiter.
    lead_open: bool,
}

impl Redactor {
    /// A redactor for one body.
    #[must_use]
    pub fn new(patterns: std::sync::Arc<Patterns>) -> Self {
        Self {
            patterns,
            carry: BytesMut::new(),
            lead: 0,
            lead_open: false,
        }
    }

    /// The spans to mask in `carry`: the one begun before it, and those
    /// that begin in it.
    fn spans(&mut self) -> Vec<(usize, usize)> {
        if self.lead_open {
            while self.carry.get(self.lead).is_some_and(|b| continues_run(*b)) {
                self.lead += 1;
            }
        }
        let mut spans = self.patterns.spans(&self.carry);
        if self.lead > 0 {
            spans.insert(0, (0, self.lead));
        }
        merge(spans)
    }

    /// Takes the next chunk; returns what may be sent now (possibly empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.patterns.longest == 0 {
            return Bytes::copy_from_slice(chunk);
        }
        self.carry.extend_from_slice(chunk);
        let had_lead = self.lead > 0 || self.lead_open;
        let spans = self.spans();
        let len = self.carry.len();
        let send = len.saturating_sub(self.patterns.longest - 1);
        let mut out = self.carry.split_to(send);
        let (mut lead, mut open) = (0, false);
        for (from, to) in spans {
            if let Some(hit) = out.get_mut(from..to.min(send)) {
                hit.fill(b'*');
            }
            // Goes on past what is sent now, and its start is not kept to
            // be found again.
            if (from < send || (from == 0 && had_lead)) && to >= send {
                lead = to - send;
                open = to == len;
            }
        }
        self.lead = lead;
        self.lead_open = open;
        out.freeze()
    }

    /// Whether nothing is held back for the next chunk.
    #[must_use]
    pub fn holds_nothing(&self) -> bool {
        self.carry.is_empty()
    }

    /// The end of the body: what is still held, masked.
    pub fn finish(&mut self) -> Bytes {
        let spans = self.spans();
        let mut out = std::mem::take(&mut self.carry);
        for (from, to) in spans {
            if let Some(hit) = out.get_mut(from..to) {
                hit.fill(b'*');
            }
        }
        (self.lead, self.lead_open) = (0, false);
        out.freeze()
    }
}

/// `spans` sorted, overlapping or touching ones made one.
fn merge(mut spans: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (from, to) in spans {
        match merged.last_mut() {
            Some(last) if from <= last.1 => last.1 = last.1.max(to),
            _ => merged.push((from, to)),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patterns() -> Patterns {
        Patterns::new([b"s3cr3t-KEY".to_vec(), b"czNjcjN0LUtFWQ==".to_vec()])
    }

    /// Feeds `chunks` through a redactor and returns everything it let out.
    fn stream(chunks: &[&[u8]]) -> Vec<u8> {
        let mut r = Redactor::new(std::sync::Arc::new(patterns()));
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&r.push(c));
        }
        out.extend_from_slice(&r.finish());
        out
    }

    fn check(chunks: &[&[u8]], expected: &[u8]) {
        let got = stream(chunks);
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expected),
            "{chunks:?}"
        );
        assert_eq!(got.len(), chunks.iter().map(|c| c.len()).sum::<usize>());
    }

    #[test]
    fn whole_and_split_secrets() {
        check(&[b"no secret here"], b"no secret here");
        check(&[b"key=s3cr3t-KEY;"], b"key=**********;");
        check(&[b"key=s3cr", b"3t-KEY;"], b"key=**********;");
        check(
            &[
                b"k", b"=", b"s", b"3", b"c", b"r", b"3", b"t", b"-", b"K", b"E", b"Y", b"!",
            ],
            // What follows up to a delimiter goes with it.
            b"k=***********",
        );
        check(&[b"s3cr3t-KEYs3cr3t-KEY"], b"********************");
        check(
            &[b"s3cr3t-", b"KEY", b"s3cr3t-KEY"],
            b"********************",
        );
        check(&[b"Basic czNjcjN0", b"LUtFWQ=="], b"Basic ****************");
        check(&[b"", b"s3cr3t-KEY", b""], b"**********");
        // The body ends with the start of the secret: left as it is (see
        // the oracle test below).
        check(&[b"tail s3cr3t"], b"tail s3cr3t");
        check(&[b"tail s3cr3t-KE", b"Y"], b"tail **********");
    }

    /// `value` through a redactor in one chunk, at every split point, and
    /// in one-byte chunks: each the same, which is returned.
    fn streamed(value: &[u8]) -> Vec<u8> {
        let whole = stream(&[value]);
        for at in 0..=value.len() {
            assert_eq!(
                stream(&[&value[..at], &value[at..]]),
                whole,
                "split at {at}: {value:?}"
            );
        }
        let bytes: Vec<&[u8]> = value.chunks(1).collect();
        assert_eq!(stream(&bytes), whole, "bytewise: {value:?}");
        whole
    }

    /// An echo cut short anywhere (an upstream that shows the first bytes
    /// of the request, after a path or query the agent chose the length
    /// of) shows at most a form's first `threshold - 1` bytes, in a header
    /// or a body, whatever the chunks.
    #[test]
    fn an_echo_cut_short_shows_less_than_the_threshold() {
        let p = patterns();
        for form in [&b"s3cr3t-KEY"[..], b"czNjcjN0LUtFWQ=="] {
            let t = threshold(form.len());
            assert_eq!(t, 8);
            for len in 1..=form.len() {
                let value = [b"q=AAAA&key=".as_slice(), &form[..len]].concat();
                let shown = if len < t {
                    value.clone()
                } else {
                    [b"q=AAAA&key=".as_slice(), &vec![b'*'; len]].concat()
                };
                assert_eq!(streamed(&value), shown, "{len}");
                let header = p.redact_header(&value);
                if len < t {
                    assert_eq!(header, None, "{len}");
                } else {
                    assert_eq!(header.as_deref(), Some(&b"q=AAAA&key=[redacted]"[..]));
                }
            }
        }
    }

    /// An agent that gets its own input echoed (a request id, an `Origin`)
    /// and guesses one byte more at a time: short of the threshold nothing
    /// is masked, right or wrong; the byte that completes it is the one
    /// answer; past it a right guess and a wrong one come back alike.
    #[test]
    fn guessing_on_tells_at_most_one_byte() {
        let p = patterns();
        for form in [&b"s3cr3t-KEY"[..], b"czNjcjN0LUtFWQ=="] {
            let t = threshold(form.len());
            for len in 1..=form.len() {
                let right = [b"id=".as_slice(), &form[..len], b"\"}"].concat();
                let mut wrong = right.clone();
                wrong[2 + len] = if form[len - 1] == b'Z' { b'Y' } else { b'Z' };
                let (r, w) = (streamed(&right), streamed(&wrong));
                let (hr, hw) = (p.redact_header(&right), p.redact_header(&wrong));
                match len.cmp(&t) {
                    std::cmp::Ordering::Less => {
                        assert_eq!((&r, &w), (&right, &wrong), "{len}");
                        assert_eq!((hr, hw), (None, None), "{len}");
                    }
                    std::cmp::Ordering::Equal => assert_ne!(r, w, "{len}"),
                    std::cmp::Ordering::Greater => {
                        assert_eq!(r, w, "{len}");
                        assert_eq!(hr, hw, "{len}");
                        assert!(r.ends_with(b"*\"}"), "{len}: {r:?}");
                    }
                }
            }
        }
    }

    /// Places that overlap are each found: a periodic form whose whole
    /// begins inside an earlier place's start is still masked whole.
    #[test]
    fn overlapping_places_are_each_found() {
        let p = Patterns::new([b"xyxyxyxyxy;Q".to_vec()]);
        assert_eq!(
            p.redact_header(b"xyxyxyxyxyxy;Q!").as_deref(),
            Some(&b"[redacted]!"[..])
        );
        let mut r = Redactor::new(std::sync::Arc::new(p));
        let mut out = r.push(b"<xyxyxyxyxyxy;Q>").to_vec();
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"<**************>");
    }

    /// A body that repeats a form's start with no delimiter (an agent can
    /// know a start: Basic auth's begins with the username) is masked
    /// whole, each run scanned once: this would take minutes if every
    /// place scanned its run anew.
    #[test]
    fn a_repeated_start_is_masked_in_one_pass() {
        let p = patterns();
        let body = b"s3cr3t-K".repeat(64 * 1024);
        let mut r = Redactor::new(std::sync::Arc::new(p.clone()));
        let mut out = r.push(&body).to_vec();
        out.extend_from_slice(&r.finish());
        assert!(out.iter().all(|b| *b == b'*'));
        assert_eq!(
            p.redact_header(&body).as_deref(),
            Some(HEADER_MASK.as_bytes())
        );
    }

    /// A form that holds a delimiter is still masked whole, however it is
    /// split; a run goes on over any number of chunks, up to a delimiter.
    #[test]
    fn whole_forms_with_delimiters_and_long_runs() {
        let p = Patterns::new([b"k3y/+=&<'\"x".to_vec()]);
        let mut r = Redactor::new(std::sync::Arc::new(p));
        let body = b"<b>k3y/+=&<'\"x</b>";
        let mut out = Vec::new();
        for b in body.chunks(1) {
            out.extend_from_slice(&r.push(b));
        }
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"<b>***********</b>");

        let mut long = b"\"s3cr3t-KE".to_vec();
        long.extend(std::iter::repeat_n(b'a', 10_000));
        long.extend_from_slice(b"\" visible");
        let want = [b"\"".as_slice(), &vec![b'*'; 10_009], b"\" visible"].concat();
        assert_eq!(stream(&[&long]), want);
        let small: Vec<&[u8]> = long.chunks(7).collect();
        assert_eq!(stream(&small), want);
    }

    #[test]
    fn every_split_point() {
        let body = b"<html>echo: s3cr3t-KEY and again s3cr3t-KEY</html>";
        let want = b"<html>echo: ********** and again **********</html>";
        for i in 0..body.len() {
            for j in i..body.len() {
                check(&[&body[..i], &body[i..j], &body[j..]], want);
            }
        }
    }

    #[test]
    fn holds_at_most_the_carry() {
        let mut r = Redactor::new(std::sync::Arc::new(patterns()));
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..100 {
            let out = r.push(&chunk);
            assert!(r.carry.len() < 16, "carry {}", r.carry.len());
            assert!(out.len() >= chunk.len() - 16);
        }
    }

    #[test]
    fn headers() {
        let p = patterns();
        assert_eq!(p.redact_header(b"text/plain"), None);
        assert_eq!(
            p.redact_header(b"Bearer s3cr3t-KEY").as_deref(),
            Some(&b"Bearer [redacted]"[..])
        );
        assert_eq!(
            p.redact_header(b"a s3cr3t-KEY b czNjcjN0LUtFWQ==")
                .as_deref(),
            Some(&b"a [redacted] b [redacted]"[..])
        );
    }
}
