//! Sealing of secrets kept in Redis (private keys, ACME account credentials) with AES-256-GCM under
//! `redis.encryptionKey`. A sealed value is `aes256gcm:` and the base64 of a random 96-bit nonce
//! followed by the ciphertext and its tag. The Redis key the value is stored under is the
//! associated data, so a sealed value copied to another key does not open there.

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const MARK: &str = "aes256gcm:";

pub struct Sealer {
    key: LessSafeKey,
    random: SystemRandom,
}

impl Sealer {
    /// From the option's text: base64 of exactly 32 bytes. The error never quotes the key.
    pub fn from_base64(text: &str) -> Result<Sealer, String> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| "expected base64 of 32 bytes (AES-256), got text that is not base64".to_string())?;
        if bytes.len() != 32 {
            return Err(format!("expected base64 of 32 bytes (AES-256), got {} bytes", bytes.len()));
        }
        let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| "not an AES-256 key".to_string())?;
        Ok(Sealer { key: LessSafeKey::new(key), random: SystemRandom::new() })
    }

    /// `secret` sealed for the Redis key `bound_to`.
    pub fn seal(&self, secret: &str, bound_to: &str) -> Result<String, String> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).map_err(|_| "no random bytes for a nonce".to_string())?;
        let mut sealed = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(bound_to.as_bytes()), &mut sealed)
            .map_err(|_| "sealing failed".to_string())?;
        let mut framed = nonce.to_vec();
        framed.extend_from_slice(&sealed);
        Ok(format!("{MARK}{}", base64::engine::general_purpose::STANDARD.encode(framed)))
    }

    /// The secret of a value `seal` made for `bound_to`; a wrong key or a changed value is an error.
    pub fn open(&self, sealed: &str, bound_to: &str) -> Result<String, String> {
        let framed = sealed
            .strip_prefix(MARK)
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .filter(|framed| framed.len() >= NONCE_LEN + AES_256_GCM.tag_len())
            .ok_or_else(|| "the stored value is not sealed by this proxy".to_string())?;
        let (nonce, rest) = framed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| "bad nonce".to_string())?;
        let mut rest = rest.to_vec();
        let opened = self
            .key
            .open_in_place(nonce, Aad::from(bound_to.as_bytes()), &mut rest)
            .map_err(|_| "redis.encryptionKey does not open it (it was sealed with another key, or changed)".to_string())?;
        String::from_utf8(opened.to_vec()).map_err(|_| "the opened value is not text".to_string())
    }

    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(MARK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        base64::engine::general_purpose::STANDARD.encode([byte; 32])
    }

    #[test]
    fn sealed_values_open_with_their_key_and_binding_only() {
        let sealer = Sealer::from_base64(&key(7)).unwrap();
        let sealed = sealer.seal("-----BEGIN PRIVATE KEY-----\nabc", "p:cert:a").unwrap();
        assert!(Sealer::is_sealed(&sealed) && !sealed.contains("PRIVATE"));
        assert_eq!(sealer.open(&sealed, "p:cert:a").unwrap(), "-----BEGIN PRIVATE KEY-----\nabc");
        assert_ne!(sealer.seal("x", "k").unwrap(), sealer.seal("x", "k").unwrap(), "a fresh nonce each time");
        assert!(sealer.open(&sealed, "p:cert:b").unwrap_err().contains("encryptionKey"));
        let other = Sealer::from_base64(&key(8)).unwrap();
        assert!(other.open(&sealed, "p:cert:a").unwrap_err().contains("encryptionKey"));
        assert!(sealer.open("plain text", "p:cert:a").is_err());
    }

    #[test]
    fn keys_must_be_base64_of_32_bytes_and_errors_do_not_quote_them() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let err = Sealer::from_base64(&short).err().unwrap();
        assert!(err.contains("16 bytes") && !err.contains(&short), "{err}");
        assert!(Sealer::from_base64("not base64!!").is_err());
    }
}
