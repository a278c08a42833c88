//! Sealing: authenticated encryption of key material (and other secrets)
//! that scrip keeps in a shared store, under a key-encryption key that never
//! enters the store.
//!
//! AES-256-GCM with a fresh random 96-bit nonce per value; the associated
//! data names what the value is (for a signing key: its `kid`, purpose and
//! algorithm), so a sealed value cannot be moved to another row, and a
//! value sealed under another key-encryption key, edited, or planted by
//! someone who can write the store but does not hold the key, fails to open.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use zeroize::Zeroizing;

use crate::JoseError;

/// The length of a key-encryption key, bytes.
pub const KEK_LEN: usize = 32;

/// A key-encryption key, and while it replaces another, the key it
/// replaces ([`Kek::with_previous`]): values are sealed under the current
/// key and opened with either. Its `Debug` shows nothing of either key.
pub struct Kek {
    current: LessSafeKey,
    fingerprint: String,
    previous: Option<(LessSafeKey, String)>,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// A key from its 32 raw bytes.
    ///
    /// # Errors
    /// [`JoseError::Key`] when `bytes` is not 32 bytes long.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, JoseError> {
        if bytes.len() != KEK_LEN {
            return Err(JoseError::Key(format!(
                "a key-encryption key is {KEK_LEN} bytes, not {}",
                bytes.len()
            )));
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| JoseError::Key("unusable key-encryption key".into()))?;
        // A one-way digest of the key under a label of its own: operators
        // compare it across replicas; it opens nothing.
        let mut labelled = Zeroizing::new(b"scrip-kek-fingerprint\0".to_vec());
        labelled.extend_from_slice(bytes);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &labelled);
        let fingerprint = digest
            .as_ref()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(Self {
            current: LessSafeKey::new(key),
            fingerprint,
            previous: None,
        })
    }

    /// A fingerprint of the key that seals (16 hex digits of a labelled
    /// SHA-256 of it), for comparing keys across hosts without showing them.
    #[must_use]
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The previous key's fingerprint, when one opens too.
    #[must_use]
    pub fn previous_fingerprint(&self) -> Option<&str> {
        self.previous.as_ref().map(|(_, f)| f.as_str())
    }

    /// This key, which seals, with `previous` (its own current key) opening
    /// too: what was sealed under either opens, and [`Kek::reseal`] moves a
    /// value from the previous key to this one.
    #[must_use]
    pub fn with_previous(self, previous: Self) -> Self {
        Self {
            current: self.current,
            fingerprint: self.fingerprint,
            previous: Some((previous.current, previous.fingerprint)),
        }
    }

    /// Whether a previous key opens too.
    #[must_use]
    pub fn has_previous(&self) -> bool {
        self.previous.is_some()
    }

    /// A key from its text form: base64url (or standard base64) of the 32
    /// bytes, surrounding white space ignored.
    ///
    /// # Errors
    /// [`JoseError::Key`] when the text is not such a key.
    pub fn from_text(text: &str) -> Result<Self, JoseError> {
        let text = text.trim();
        let bytes = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(text.trim_end_matches('='))
                .or_else(|_| base64::engine::general_purpose::STANDARD.decode(text))
                .map_err(|_| {
                    JoseError::Key("a key-encryption key is the base64 of 32 random bytes".into())
                })?,
        );
        Self::from_bytes(&bytes)
    }

    /// A new random key and its text form (for the key file).
    ///
    /// # Errors
    /// [`JoseError::Crypto`] when the system random generator fails.
    pub fn generate() -> Result<(Self, String), JoseError> {
        let mut bytes = Zeroizing::new([0u8; KEK_LEN]);
        aws_lc_rs::rand::fill(bytes.as_mut())
            .map_err(|_| JoseError::Crypto("random generator failed"))?;
        let text = URL_SAFE_NO_PAD.encode(bytes.as_ref());
        Ok((Self::from_bytes(bytes.as_ref())?, text))
    }

    /// Seals `plaintext`, bound to `context`: nonce, ciphertext and tag.
    ///
    /// # Errors
    /// [`JoseError::Crypto`] when the random generator or the cipher fails.
    pub fn seal(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, JoseError> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce)
            .map_err(|_| JoseError::Crypto("random generator failed"))?;
        // Room for the tag, so that no copy of the plaintext is left behind
        // by a reallocation.
        let mut data = Vec::with_capacity(plaintext.len() + self.current.algorithm().tag_len());
        data.extend_from_slice(plaintext);
        self.current
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(context),
                &mut data,
            )
            .map_err(|_| JoseError::Crypto("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(out)
    }

    /// Opens what [`Kek::seal`] sealed with the same `context`, under the
    /// current key or the previous one; the plaintext is zeroed when
    /// dropped.
    ///
    /// # Errors
    /// [`JoseError::Key`] when the value was not sealed under either key
    /// for this context, or was altered.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, JoseError> {
        open_with(&self.current, context, sealed).or_else(|e| match &self.previous {
            Some((previous, _)) => open_with(previous, context, sealed),
            None => Err(e),
        })
    }

    /// Which key `sealed` (in `context`) opens under: `None` when neither.
    #[must_use]
    pub fn sealed_under(&self, context: &[u8], sealed: &[u8]) -> Option<Under> {
        if open_with(&self.current, context, sealed).is_ok() {
            return Some(Under::Current);
        }
        match &self.previous {
            Some((previous, _)) if open_with(previous, context, sealed).is_ok() => {
                Some(Under::Previous)
            }
            _ => None,
        }
    }

    /// The value sealed again under the current key when it opens only with
    /// the previous one; `None` when the current key opens it already.
    ///
    /// # Errors
    /// [`JoseError::Key`] when neither key opens it; [`JoseError::Crypto`]
    /// when sealing fails.
    pub fn reseal(&self, context: &[u8], sealed: &[u8]) -> Result<Option<Vec<u8>>, JoseError> {
        if open_with(&self.current, context, sealed).is_ok() {
            return Ok(None);
        }
        let plaintext = self.open(context, sealed)?;
        self.seal(context, &plaintext).map(Some)
    }
}

/// Which key of a [`Kek`] a value is sealed under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Under {
    /// The key that seals.
    Current,
    /// The key it replaces.
    Previous,
}

fn open_with(
    key: &LessSafeKey,
    context: &[u8],
    sealed: &[u8],
) -> Result<Zeroizing<Vec<u8>>, JoseError> {
    let refused = || {
        JoseError::Key(
            "sealed value does not open with this key-encryption key (wrong key, or altered)"
                .into(),
        )
    };
    let (nonce, data) = sealed.split_at_checked(NONCE_LEN).ok_or_else(refused)?;
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
    let mut data = Zeroizing::new(data.to_vec());
    let len = key
        .open_in_place(nonce, Aad::from(context), &mut data)
        .map_err(|_| refused())?
        .len();
    data.truncate(len);
    Ok(data)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]
    use super::*;

    #[test]
    fn seals_and_opens_only_in_its_context_and_key() {
        let (kek, text) = Kek::generate().unwrap();
        let sealed = kek.seal(b"kid-1", b"secret").unwrap();
        assert_eq!(kek.open(b"kid-1", &sealed).unwrap().as_slice(), b"secret");
        assert!(kek.open(b"kid-2", &sealed).is_err(), "moved to another row");
        let (other, _) = Kek::generate().unwrap();
        assert!(other.open(b"kid-1", &sealed).is_err(), "another key");
        let same = Kek::from_text(&format!(" {text}\n")).unwrap();
        assert_eq!(same.open(b"kid-1", &sealed).unwrap().as_slice(), b"secret");
        let mut bytes = sealed.clone();
        if let Some(b) = bytes.last_mut() {
            *b ^= 1;
        }
        assert!(kek.open(b"kid-1", &bytes).is_err(), "altered");
        assert!(kek.open(b"kid-1", b"short").is_err(), "too short");
        assert_ne!(
            kek.seal(b"kid-1", b"secret").unwrap(),
            sealed,
            "fresh nonce"
        );
    }

    /// While a key replaces another, both open, only the new one seals, and
    /// a value is moved to it in its own context; a third key's value
    /// opens with neither.
    #[test]
    fn a_new_key_opens_the_previous_keys_values_and_reseals_them() {
        let (old, old_text) = Kek::generate().unwrap();
        let (new, new_text) = Kek::generate().unwrap();
        let (third, _) = Kek::generate().unwrap();
        let under_old = old.seal(b"kid-1", b"secret").unwrap();
        let under_new = new.seal(b"kid-1", b"secret").unwrap();
        assert!(!new.has_previous());
        let (old_print, new_print) = (old.fingerprint().to_owned(), new.fingerprint().to_owned());
        assert_eq!(new_print.len(), 16);
        assert_ne!(old_print, new_print);
        assert_eq!(Kek::from_text(&new_text).unwrap().fingerprint(), new_print);
        assert!(!new_text.contains(&new_print) && new.previous_fingerprint().is_none());
        let both = new.with_previous(old);
        assert_eq!(both.fingerprint(), new_print);
        assert_eq!(both.previous_fingerprint(), Some(old_print.as_str()));
        assert!(both.has_previous());
        assert_eq!(
            both.open(b"kid-1", &under_old).unwrap().as_slice(),
            b"secret"
        );
        assert_eq!(
            both.open(b"kid-1", &under_new).unwrap().as_slice(),
            b"secret"
        );
        assert!(both.open(b"kid-2", &under_old).is_err(), "another row");
        let under_third = third.seal(b"kid-1", b"secret").unwrap();
        assert!(both.open(b"kid-1", &under_third).is_err(), "a third key");
        assert!(both.reseal(b"kid-1", &under_third).is_err());
        assert!(both.reseal(b"kid-2", &under_old).is_err(), "another row");

        assert!(both.reseal(b"kid-1", &under_new).unwrap().is_none());
        assert_eq!(
            both.sealed_under(b"kid-1", &under_new),
            Some(Under::Current)
        );
        assert_eq!(
            both.sealed_under(b"kid-1", &under_old),
            Some(Under::Previous)
        );
        assert_eq!(both.sealed_under(b"kid-1", &under_third), None);
        assert_eq!(both.sealed_under(b"kid-2", &under_old), None);
        let resealed = both.reseal(b"kid-1", &under_old).unwrap().unwrap();
        let new_alone = Kek::from_text(&new_text).unwrap();
        let old_alone = Kek::from_text(&old_text).unwrap();
        assert_eq!(
            new_alone.open(b"kid-1", &resealed).unwrap().as_slice(),
            b"secret"
        );
        assert!(old_alone.open(b"kid-1", &resealed).is_err());
        assert!(new_alone.open(b"kid-2", &resealed).is_err());
        let sealed = both.seal(b"kid-1", b"more").unwrap();
        assert!(
            old_alone.open(b"kid-1", &sealed).is_err(),
            "sealed under the new key only"
        );
        assert_eq!(format!("{both:?}"), "Kek(..)");
    }

    #[test]
    fn key_text_must_be_32_bytes() {
        assert!(Kek::from_text("c2hvcnQ").is_err());
        assert!(Kek::from_text("not base64 !").is_err());
        assert!(Kek::from_bytes(&[7; 32]).is_ok());
        assert_eq!(
            format!("{:?}", Kek::from_bytes(&[7; 32]).unwrap()),
            "Kek(..)"
        );
    }
}
