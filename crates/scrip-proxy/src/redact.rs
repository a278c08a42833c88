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
//! Only whole forms are masked, never a part of one (an echo cut short, a
//! body that ends mid-secret). Whether something is masked must tell the
//! agent nothing it could not guess: masking a secret's first bytes would
//! let an agent that gets its own input echoed back (a request id, an
//! `Origin`, a `?next=`) try one more character at a time until the mask
//! appears, and so read the secret off the proxy's answers.

use bytes::{Bytes, BytesMut};

/// What an echoed secret is replaced with in a header value.
pub const HEADER_MASK: &str = "[redacted]";

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

    /// Whether `haystack` holds any form.
    #[must_use]
    pub fn found_in(&self, haystack: &[u8]) -> bool {
        self.forms
            .iter()
            .any(|f| memchr::memmem::find(haystack, f).is_some())
    }

    /// Overwrites every occurrence of every form in `buf` with `*`.
    fn mask(&self, buf: &mut [u8]) {
        for form in &self.forms {
            let mut from = 0;
            while let Some(rest) = buf.get(from..) {
                let Some(at) = memchr::memmem::find(rest, form) else {
                    break;
                };
                let start = from + at;
                if let Some(hit) = buf.get_mut(start..start + form.len()) {
                    hit.fill(b'*');
                }
                from = start + 1;
            }
        }
    }

    /// A header value with every form replaced, or `None` when it holds
    /// none.
    #[must_use]
    pub fn redact_header(&self, value: &[u8]) -> Option<Vec<u8>> {
        if !self.found_in(value) {
            return None;
        }
        let mut out = value.to_vec();
        for form in &self.forms {
            let mut replaced = Vec::with_capacity(out.len());
            let mut rest: &[u8] = &out;
            while let Some(at) = memchr::memmem::find(rest, form) {
                replaced.extend_from_slice(rest.get(..at).unwrap_or_default());
                replaced.extend_from_slice(HEADER_MASK.as_bytes());
                rest = rest.get(at + form.len()..).unwrap_or_default();
            }
            replaced.extend_from_slice(rest);
            out = replaced;
        }
        Some(out)
    }
}

/// The streaming state of one body.
#[derive(Debug)]
pub struct Redactor {
    patterns: std::sync::Arc<Patterns>,
    carry: BytesMut,
}

impl Redactor {
    /// A redactor for one body.
    #[must_use]
    pub fn new(patterns: std::sync::Arc<Patterns>) -> Self {
        Self {
            patterns,
            carry: BytesMut::new(),
        }
    }

    /// Takes the next chunk; returns what may be sent now (possibly empty).
    pub fn push(&mut self, chunk: &[u8]) -> Bytes {
        if self.patterns.longest == 0 {
            return Bytes::copy_from_slice(chunk);
        }
        self.carry.extend_from_slice(chunk);
        self.patterns.mask(&mut self.carry);
        let keep = self.patterns.longest - 1;
        let send = self.carry.len().saturating_sub(keep);
        self.carry.split_to(send).freeze()
    }

    /// Whether nothing is held back for the next chunk.
    #[must_use]
    pub fn holds_nothing(&self) -> bool {
        self.carry.is_empty()
    }

    /// The end of the body: what is still held (too short to be a whole
    /// form, so as it came).
    pub fn finish(&mut self) -> Bytes {
        std::mem::take(&mut self.carry).freeze()
    }
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
            b"k=**********!",
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

    /// An agent that gets its own input echoed (a request id, an `Origin`)
    /// must not learn from the answer whether its guess begins the secret:
    /// every guess short of a whole form comes back as it went, at the end
    /// of a header value or of a body, in one chunk or split.
    #[test]
    fn no_part_of_a_secret_is_an_oracle() {
        let p = patterns();
        for form in [&b"s3cr3t-KEY"[..], b"czNjcjN0LUtFWQ=="] {
            for len in 1..form.len() {
                for guess in [form[..len].to_vec(), [&form[..len - 1], b"#"].concat()] {
                    let value = [b"id=".as_slice(), &guess].concat();
                    assert_eq!(p.redact_header(&value), None, "{value:?}");
                    let at = value.len() / 2;
                    check(&[&value], &value);
                    check(&[&value[..at], &value[at..]], &value);
                }
            }
        }
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
