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

/// A key-encryption key. Its `Debug` shows nothing of the key.
pub struct Kek(LessSafeKey);

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
        Ok(Self(LessSafeKey::new(key)))
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
        let mut data = Vec::with_capacity(plaintext.len() + self.0.algorithm().tag_len());
        data.extend_from_slice(plaintext);
        self.0
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

    /// Opens what [`Kek::seal`] sealed with the same `context`; the
    /// plaintext is zeroed when dropped.
    ///
    /// # Errors
    /// [`JoseError::Key`] when the value was not sealed under this
    /// key for this context, or was altered.
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, JoseError> {
        let refused = || {
            JoseError::Key(
                "sealed value does not open with this key-encryption key (wrong key, or altered)"
                    .into(),
            )
        };
        let (nonce, data) = sealed.split_at_checked(NONCE_LEN).ok_or_else(refused)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| refused())?;
        let mut data = Zeroizing::new(data.to_vec());
        let len = self
            .0
            .open_in_place(nonce, Aad::from(context), &mut data)
            .map_err(|_| refused())?
            .len();
        data.truncate(len);
        Ok(data)
    }
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
