//! Device and service secrets: stored as HMAC-SHA256 under a server key.
//!
//! Secrets are machine-generated and long, so a keyed fast hash is enough (no
//! password stretching needed) and a stolen registry without the key reveals
//! nothing. Verification is constant-time and an unknown id costs the same work as a
//! known one, so timing does not tell whether an id exists.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use std::io::Write;
use std::path::Path;
use subtle::ConstantTimeEq;

/// Shortest secret the registry accepts.
pub const MIN_SECRET_LEN: usize = 16;

#[derive(Clone)]
pub struct SecretHasher {
    key: [u8; 32],
}

impl std::fmt::Debug for SecretHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretHasher(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretKeyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: a secret-hash key must be 32 bytes (got {len})")]
    Length { path: String, len: usize },
}

impl SecretHasher {
    pub fn from_key(key: [u8; 32]) -> Self {
        SecretHasher { key }
    }

    /// Load the key, creating it (mode 0600) if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretKeyError> {
        let io = |source| SecretKeyError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let key: [u8; 32] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| SecretKeyError::Length {
                            path: path.display().to_string(),
                            len: bytes.len(),
                        })?;
                Ok(SecretHasher { key })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    use std::os::unix::fs::DirBuilderExt;
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(dir)
                        .map_err(io)?;
                }
                let mut key = [0u8; 32];
                getrandom::fill(&mut key)
                    .map_err(std::io::Error::other)
                    .map_err(io)?;
                use std::os::unix::fs::OpenOptionsExt;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(io)?;
                file.write_all(&key).map_err(io)?;
                file.sync_all().map_err(io)?;
                Ok(SecretHasher { key })
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn hash(&self, secret: &[u8]) -> [u8; 32] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key");
        mac.update(secret);
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check of `secret` against a stored hash. With `stored = None`
    /// (unknown principal) the same work is done and the answer is false.
    pub fn verify(&self, secret: &[u8], stored: Option<&[u8; 32]>) -> bool {
        let computed = self.hash(secret);
        let dummy = [0u8; 32];
        let expected = stored.unwrap_or(&dummy);
        let equal: bool = computed.ct_eq(expected).into();
        equal && stored.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn right_secret_verifies_and_wrong_does_not() {
        let h = SecretHasher::from_key([7; 32]);
        let stored = h.hash(b"correct horse battery staple");
        assert!(h.verify(b"correct horse battery staple", Some(&stored)));
        assert!(!h.verify(b"correct horse battery stapl", Some(&stored)));
        assert!(!h.verify(b"correct horse battery staple", None));
    }

    #[test]
    fn hash_depends_on_the_key() {
        let a = SecretHasher::from_key([1; 32]).hash(b"secret-secret-secret");
        let b = SecretHasher::from_key([2; 32]).hash(b"secret-secret-secret");
        assert_ne!(a, b);
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/k");
        let a = SecretHasher::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let b = SecretHasher::load_or_create(&path).unwrap();
        assert_eq!(a.hash(b"x"), b.hash(b"x"));
    }

    #[test]
    fn short_key_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, b"short").unwrap();
        let err = SecretHasher::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("32 bytes (got 5)"), "{err}");
    }
}
