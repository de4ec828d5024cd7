//! Static secrets at rest: sealed with AES-256-GCM before they reach the
//! database, under a key kept in its own file beside it (0600, created on
//! first start). A copy of the database alone reveals no secret. (An
//! operator-held key-encryption key replaces the file with the PostgreSQL
//! store.)
//!
//! A sealed value is `sealed:v1:<base64 nonce‖ciphertext‖tag>:<hex tag of
//! the plaintext>`. The last part, an HMAC-SHA256 of the plaintext under a
//! key derived from the same file, makes apply idempotent: applying the
//! same secret again finds the same tag and keeps the stored value, so
//! nothing is reported as changed and agents are not woken.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

const PREFIX: &str = "sealed:v1:";
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("secrets key {path}: {msg}")]
    Key { path: String, msg: String },
    #[error("sealing failed")]
    Seal,
    #[error("a stored secret is not a sealed value this server can open")]
    Open,
}

pub struct Sealer {
    aead: LessSafeKey,
    mac: hmac::Key,
}

impl Sealer {
    /// Loads the operator's key-encryption key from `path`, which must
    /// exist (a shared database needs the same key on every server, so
    /// none is made up here). Same checks as [`Sealer::load_or_create`].
    pub fn load(path: &Path) -> Result<Sealer, SealError> {
        if !path.exists() {
            return Err(SealError::Key {
                path: path.display().to_string(),
                msg: "does not exist; create it once (32 random bytes, mode 0600: `head -c 32 /dev/urandom > FILE`) and give every server the same file".into(),
            });
        }
        Self::load_or_create(path)
    }

    /// Loads `path`, or creates it (32 random bytes, mode 0600) if it does
    /// not exist. A key file others can read is refused.
    pub fn load_or_create(path: &Path) -> Result<Sealer, SealError> {
        let key_err = |msg: String| SealError::Key {
            path: path.display().to_string(),
            msg,
        };
        let bytes = match std::fs::read(path) {
            Ok(b) => {
                let mode = std::fs::metadata(path)
                    .map_err(|e| key_err(e.to_string()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(key_err(format!(
                        "mode {:04o}: readable by others; chmod 600",
                        mode & 0o777
                    )));
                }
                b
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; KEY_LEN];
                SystemRandom::new()
                    .fill(&mut b)
                    .map_err(|_| key_err("no randomness".into()))?;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| key_err(e.to_string()))?;
                f.write_all(&b)
                    .and_then(|()| f.sync_all())
                    .map_err(|e| key_err(e.to_string()))?;
                b
            }
            Err(e) => return Err(key_err(e.to_string())),
        };
        if bytes.len() != KEY_LEN {
            return Err(key_err(format!(
                "{} bytes, expected {KEY_LEN}",
                bytes.len()
            )));
        }
        Self::from_key(&bytes).ok_or_else(|| key_err("unusable key".into()))
    }

    fn from_key(key: &[u8]) -> Option<Sealer> {
        // Separate keys for encryption and for the idempotence tag.
        let derive = |label: &[u8]| {
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), label)
                .as_ref()
                .to_vec()
        };
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &derive(b"tether seal")).ok()?);
        let mac = hmac::Key::new(hmac::HMAC_SHA256, &derive(b"tether seal tag"));
        Some(Sealer { aead, mac })
    }

    fn tag(&self, plain: &[u8]) -> String {
        hex::encode(hmac::sign(&self.mac, plain).as_ref())
    }

    /// Seals `plain`, unless `stored` already seals the same plaintext (then
    /// `stored` is returned unchanged).
    pub fn seal(&self, plain: &str, stored: Option<&str>) -> Result<String, SealError> {
        let tag = self.tag(plain.as_bytes());
        if let Some(s) = stored
            && s.starts_with(PREFIX)
            && s.rsplit(':').next() == Some(tag.as_str())
        {
            return Ok(s.to_owned());
        }
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Seal)?;
        let mut data = plain.as_bytes().to_vec();
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(PREFIX),
                &mut data,
            )
            .map_err(|_| SealError::Seal)?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&data);
        Ok(format!("{PREFIX}{}:{tag}", STANDARD.encode(blob)))
    }

    /// Seals a private key (DER) for the database.
    pub fn seal_key(&self, der: &[u8]) -> Result<Vec<u8>, SealError> {
        let b64 = zeroize::Zeroizing::new(STANDARD.encode(der));
        Ok(self.seal(&b64, None)?.into_bytes())
    }

    /// Opens a private key stored by [`seal_key`](Self::seal_key). With
    /// `allow_clear`, a key stored in clear by a version before sealing
    /// (DER, which starts with a SEQUENCE tag) is still read.
    pub fn open_key(
        &self,
        stored: &[u8],
        allow_clear: bool,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, SealError> {
        if allow_clear && stored.first() == Some(&0x30) {
            return Ok(zeroize::Zeroizing::new(stored.to_vec()));
        }
        let s = std::str::from_utf8(stored).map_err(|_| SealError::Open)?;
        let b64 = zeroize::Zeroizing::new(self.open(s)?);
        STANDARD
            .decode(b64.as_bytes())
            .map(zeroize::Zeroizing::new)
            .map_err(|_| SealError::Open)
    }

    /// Opens a value made by [`seal`](Self::seal).
    pub fn open(&self, sealed: &str) -> Result<String, SealError> {
        let rest = sealed.strip_prefix(PREFIX).ok_or(SealError::Open)?;
        let (b64, _tag) = rest.split_once(':').ok_or(SealError::Open)?;
        let blob = STANDARD.decode(b64).map_err(|_| SealError::Open)?;
        if blob.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut ct = ct.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(PREFIX), &mut ct)
            .map_err(|_| SealError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_are_stable_for_the_same_secret_and_refuse_tampering() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("secrets.key");
        let s = Sealer::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let a = s.seal("hunter2", None).expect("seal");
        assert!(a.starts_with(PREFIX) && !a.contains("hunter2"), "{a}");
        assert_eq!(s.open(&a).expect("open"), "hunter2");
        // The same secret again keeps the stored value; another one does not.
        assert_eq!(s.seal("hunter2", Some(&a)).expect("again"), a);
        let b = s.seal("hunter3", Some(&a)).expect("other");
        assert_ne!(a, b);
        // A fresh seal of the same secret differs (random nonce).
        assert_ne!(s.seal("hunter2", None).expect("fresh"), a);
        // Reloaded from the file, the key opens what it sealed.
        let again = Sealer::load_or_create(&path).expect("load");
        assert_eq!(again.open(&b).expect("open"), "hunter3");
        // One flipped ciphertext byte is refused.
        let rest = &a[PREFIX.len()..];
        let (b64, tag) = rest.split_once(':').expect("parts");
        let mut blob = STANDARD.decode(b64).expect("b64");
        blob[NONCE_LEN] ^= 1;
        let bad = format!("{PREFIX}{}:{tag}", STANDARD.encode(blob));
        assert!(matches!(s.open(&bad), Err(SealError::Open)));
        assert!(matches!(s.open("hunter2"), Err(SealError::Open)));
        // A key file others can read is refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            Sealer::load_or_create(&path),
            Err(SealError::Key { .. })
        ));
    }
}
