//! Keys a device proves it holds without ever sending them: a DTLS pre-shared key
//! (CoAP) and a serial frame key. The gateway must use such a key again in every
//! handshake or frame check, so unlike a secret it cannot be kept as a hash. The
//! registry keeps it encrypted (ChaCha20-Poly1305) under a master key that lives
//! outside the data dir: a file (`[auth] master_key_file`, by default beside the data
//! dir, like the audit key) or the `PORTCULLIS_MASTER_KEY` environment variable. A
//! stolen registry or backup without the master key reveals no device key.
//!
//! Each sealed key is bound to its principal and purpose (the AEAD's associated data):
//! a sealed key copied into another record, or from the PSK slot to the frame-key slot,
//! does not open. It names the master key that sealed it (by an id that is an HMAC of
//! a label under that key, so the id tells nothing about the key), so a master key can
//! be rotated: the new key goes first, everything is sealed again under it, and the old
//! one is dropped (`portcullis master-key rotate`, run by the registry, which holds its
//! write lock throughout).
//!
//! A missing key file is created with a new key only while the registry holds no
//! sealed key (`MasterKeys::load_for`): a key file lost or moved must not turn into a
//! fresh key under which no device key opens.
//!
//! The master key source holds one key per line (or comma-separated in the variable),
//! 64 hex digits each, the current one first. Errors name the file or the variable,
//! never its content.

use crate::principal::{PrincipalId, PrincipalKind};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard};

/// The environment variable that, when set, holds the master keys (and wins over the
/// file).
pub const MASTER_KEY_ENV: &str = "PORTCULLIS_MASTER_KEY";
/// Bounds of a device key (RFC 4279 asks every implementation to take 64-byte PSKs).
pub const MIN_DEVICE_KEY_LEN: usize = 16;
pub const MAX_DEVICE_KEY_LEN: usize = 64;
/// Characters of a generated key: printable, so that it can be typed into a tool such
/// as `coap-client -k KEY` or flashed as text (URL-safe base64 alphabet: 6 bits each).
pub const GENERATED_KEY_CHARS: usize = 32;
const DOMAIN: &[u8] = b"portcullis device key v1";
/// What a master key's id is the HMAC of, under that key.
const MASTER_ID_LABEL: &[u8] = b"portcullis master key id v1";

/// What a device key is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPurpose {
    /// The DTLS pre-shared key (PSK identity = the device id).
    Psk,
    /// The key serial frames are authenticated under.
    FrameKey,
}

impl KeyPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::Psk => "psk",
            KeyPurpose::FrameKey => "frame_key",
        }
    }
}

/// A device key as the registry keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedKey {
    /// Which master key sealed it: the first 8 bytes of HMAC-SHA256(that key,
    /// `MASTER_ID_LABEL`), in hex.
    pub master: String,
    /// The nonce, then the ciphertext and its tag, in hex.
    pub sealed: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceKeyError {
    #[error("{source_name}: {reason}")]
    Source { source_name: String, reason: String },
    #[error("the master key {0} that sealed this key is not in the master key source")]
    UnknownMaster(String),
    #[error("the stored key does not open (altered, moved to another record, or damaged)")]
    DoesNotOpen,
    #[error(
        "a device key must be {MIN_DEVICE_KEY_LEN} to {MAX_DEVICE_KEY_LEN} bytes (got {0}); use --psk-generate"
    )]
    Length(usize),
    /// A rotation asked for while the environment holds a single key: nothing to
    /// rotate to.
    #[error(
        "the master keys come from {MASTER_KEY_ENV}: rotate them there (put the new key first), then run this again"
    )]
    FromEnvironment,
    #[error(
        "master key file {path} is missing, but the registry holds {sealed} sealed device keys \
         that only the key in it opens, so no new key is made. Put the file back (from the copy \
         kept off the box) or set {MASTER_KEY_ENV} to its keys, then run this again"
    )]
    KeyFileMissing { path: String, sealed: usize },
}

struct Master {
    id: String,
    key: LessSafeKey,
    raw: [u8; 32],
}

impl Master {
    fn new(raw: [u8; 32]) -> Master {
        let tag = hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, &raw), MASTER_ID_LABEL);
        let id = hex::encode(&tag.as_ref()[..8]);
        let key = LessSafeKey::new(
            UnboundKey::new(&CHACHA20_POLY1305, &raw).expect("a 32-byte ChaCha20 key"),
        );
        Master { id, key, raw }
    }
}

/// Where the master keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MasterSource {
    File(PathBuf),
    Environment,
}

impl std::fmt::Display for MasterSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MasterSource::File(p) => write!(f, "master key file {}", p.display()),
            MasterSource::Environment => write!(f, "{MASTER_KEY_ENV}"),
        }
    }
}

/// The master keys, the current one first. Shared by the registry's users; a rotation
/// changes them in place.
pub struct MasterKeys {
    source: MasterSource,
    keys: RwLock<Vec<Master>>,
}

impl std::fmt::Debug for MasterKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKeys({}, ..)", self.source)
    }
}

fn parse(source: &MasterSource, text: &str) -> Result<Vec<Master>, DeviceKeyError> {
    let bad = |reason: String| DeviceKeyError::Source {
        source_name: source.to_string(),
        reason,
    };
    let mut keys = Vec::new();
    for (n, item) in text
        .split(['\n', ','])
        .map(str::trim)
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
    {
        let bytes = hex::decode(item)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| bad(format!("entry {} is not 64 hex digits", n + 1)))?;
        keys.push(Master::new(bytes));
    }
    if keys.is_empty() {
        return Err(bad("holds no key".into()));
    }
    Ok(keys)
}

fn random_key() -> Result<[u8; 32], std::io::Error> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(std::io::Error::other)?;
    Ok(key)
}

/// A new device key: `GENERATED_KEY_CHARS` printable characters (192 bits).
pub fn generate_device_key() -> Result<String, std::io::Error> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut raw = [0u8; GENERATED_KEY_CHARS];
    getrandom::fill(&mut raw).map_err(std::io::Error::other)?;
    Ok(raw
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(b & 63)]))
        .collect())
}

/// Check a device key's length.
pub fn check_device_key(key: &[u8]) -> Result<(), DeviceKeyError> {
    if (MIN_DEVICE_KEY_LEN..=MAX_DEVICE_KEY_LEN).contains(&key.len()) {
        Ok(())
    } else {
        Err(DeviceKeyError::Length(key.len()))
    }
}

fn aad(kind: PrincipalKind, id: &PrincipalId, purpose: KeyPurpose) -> Vec<u8> {
    let mut out = Vec::with_capacity(DOMAIN.len() + 64 + 16);
    for part in [
        DOMAIN,
        kind.as_str().as_bytes(),
        id.as_str().as_bytes(),
        purpose.as_str().as_bytes(),
    ] {
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Write `keys` to `path` (owner-only), replacing it whole or not at all.
fn write_file(path: &Path, keys: &[Master]) -> Result<(), std::io::Error> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let mut text = String::from(
        "# Portcullis master key(s): they seal the devices' PSKs and frame keys in the\n\
         # registry. The first is current. Keep this file off the data dir's backups.\n",
    );
    for k in keys {
        text.push_str(&hex::encode(k.raw));
        text.push('\n');
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is synced.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

impl MasterKeys {
    /// From the environment variable if it is set, else from `path`; `None` if the
    /// variable is unset and the file does not exist.
    pub fn load(path: &Path) -> Result<Option<MasterKeys>, DeviceKeyError> {
        if let Some(value) = std::env::var_os(MASTER_KEY_ENV) {
            let source = MasterSource::Environment;
            let text = value.into_string().map_err(|_| DeviceKeyError::Source {
                source_name: source.to_string(),
                reason: "is not UTF-8".into(),
            })?;
            let keys = parse(&source, &text)?;
            return Ok(Some(MasterKeys {
                source,
                keys: RwLock::new(keys),
            }));
        }
        let source = MasterSource::File(path.to_path_buf());
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let keys = parse(&source, &text)?;
                Ok(Some(MasterKeys {
                    source,
                    keys: RwLock::new(keys),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DeviceKeyError::Source {
                source_name: source.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// As `load`, but a missing file is created with a new key (owner-only), unless
    /// the registry holds `sealed_in_registry` > 0 sealed device keys: a new key would
    /// open none of them, so that is refused with how to restore the file.
    pub fn load_for(path: &Path, sealed_in_registry: usize) -> Result<MasterKeys, DeviceKeyError> {
        if let Some(keys) = Self::load(path)? {
            return Ok(keys);
        }
        if sealed_in_registry > 0 {
            return Err(DeviceKeyError::KeyFileMissing {
                path: path.display().to_string(),
                sealed: sealed_in_registry,
            });
        }
        let source = MasterSource::File(path.to_path_buf());
        let io = |e: std::io::Error| DeviceKeyError::Source {
            source_name: source.to_string(),
            reason: e.to_string(),
        };
        let keys = vec![Master::new(random_key().map_err(io)?)];
        write_file(path, &keys).map_err(io)?;
        Ok(MasterKeys {
            source,
            keys: RwLock::new(keys),
        })
    }

    /// `load_for(path, 0)`: for a caller that has no registry at hand. The gateway and
    /// the CLI go through `load_for` (gateway/src/registry_file.rs).
    pub fn load_or_create(path: &Path) -> Result<MasterKeys, DeviceKeyError> {
        Self::load_for(path, 0)
    }

    /// Fixed keys, the current one first (tests, tools).
    /// Master keys given whole, the current one first. There is always one.
    pub fn from_keys(keys: &[[u8; 32]]) -> MasterKeys {
        assert!(!keys.is_empty(), "MasterKeys::from_keys needs a key");
        MasterKeys {
            source: MasterSource::Environment,
            keys: RwLock::new(keys.iter().copied().map(Master::new).collect()),
        }
    }

    pub fn source(&self) -> &MasterSource {
        &self.source
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Master>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of the key new device keys are sealed under.
    pub fn current(&self) -> String {
        self.read()[0].id.clone()
    }

    /// Seal a device key for `id`'s `purpose` under the current master key.
    pub fn seal(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        purpose: KeyPurpose,
        key: &[u8],
    ) -> Result<SealedKey, DeviceKeyError> {
        check_device_key(key)?;
        let keys = self.read();
        let master = &keys[0];
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce).map_err(|e| DeviceKeyError::Source {
            source_name: "the system's random source".into(),
            reason: e.to_string(),
        })?;
        // Sized up front: the key in clear is never left behind in a buffer that grew.
        let mut out = Vec::with_capacity(NONCE_LEN + key.len() + CHACHA20_POLY1305.tag_len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(key);
        let tag = master
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad(kind, id, purpose)),
                &mut out[NONCE_LEN..],
            )
            .map_err(|_| DeviceKeyError::DoesNotOpen)?;
        out.extend_from_slice(tag.as_ref());
        Ok(SealedKey {
            master: master.id.clone(),
            sealed: hex::encode(out),
        })
    }

    /// The device key sealed for `id`'s `purpose`, under whichever of the master keys
    /// held sealed it.
    pub fn open(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        purpose: KeyPurpose,
        sealed: &SealedKey,
    ) -> Result<DeviceKey, DeviceKeyError> {
        let keys = self.read();
        let master = keys
            .iter()
            .find(|k| k.id == sealed.master)
            .ok_or_else(|| DeviceKeyError::UnknownMaster(sealed.master.clone()))?;
        open_under(master, kind, id, purpose, sealed)
    }

    /// As `open`, but only under the current master key: what is left once a rotation
    /// drops the others.
    pub fn open_current(
        &self,
        kind: PrincipalKind,
        id: &PrincipalId,
        purpose: KeyPurpose,
        sealed: &SealedKey,
    ) -> Result<DeviceKey, DeviceKeyError> {
        let keys = self.read();
        if keys[0].id != sealed.master {
            return Err(DeviceKeyError::UnknownMaster(sealed.master.clone()));
        }
        open_under(&keys[0], kind, id, purpose, sealed)
    }

    /// Start a rotation: a new master key, put first (the file keeps the old ones, so
    /// what they sealed still opens until everything is sealed again). From the
    /// environment, the operator rotates: nothing is generated here, and a variable
    /// that holds a single key has no new key to rotate to.
    pub fn begin_rotation(&self) -> Result<(), DeviceKeyError> {
        let MasterSource::File(path) = &self.source else {
            if self.len() < 2 {
                return Err(DeviceKeyError::FromEnvironment);
            }
            return Ok(());
        };
        let io = |e: std::io::Error| DeviceKeyError::Source {
            source_name: self.source.to_string(),
            reason: e.to_string(),
        };
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let mut next = vec![Master::new(random_key().map_err(io)?)];
        next.extend(keys.iter().map(|k| Master::new(k.raw)));
        write_file(path, &next).map_err(io)?;
        *keys = next;
        Ok(())
    }

    /// End a rotation, once every device key is sealed under the current key: the old
    /// keys are dropped from the file (from the environment, the operator drops them).
    pub fn finish_rotation(&self) -> Result<usize, DeviceKeyError> {
        let MasterSource::File(path) = &self.source else {
            return Ok(0);
        };
        let io = |e: std::io::Error| DeviceKeyError::Source {
            source_name: self.source.to_string(),
            reason: e.to_string(),
        };
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let dropped = keys.len() - 1;
        // The file first: memory keeps the old keys if it cannot be written.
        write_file(path, &keys[..1]).map_err(io)?;
        keys.truncate(1);
        Ok(dropped)
    }

    /// How many master keys are held (the current one and any not yet retired).
    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

/// Open `sealed` under `master`. The ciphertext is copied once, into the buffer the
/// returned key owns, and opened there: no other copy of the key is left behind.
fn open_under(
    master: &Master,
    kind: PrincipalKind,
    id: &PrincipalId,
    purpose: KeyPurpose,
    sealed: &SealedKey,
) -> Result<DeviceKey, DeviceKeyError> {
    let bytes = hex::decode(&sealed.sealed).map_err(|_| DeviceKeyError::DoesNotOpen)?;
    if bytes.len() < NONCE_LEN {
        return Err(DeviceKeyError::DoesNotOpen);
    }
    let (nonce, rest) = bytes.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| DeviceKeyError::DoesNotOpen)?;
    // Wiped on every path out (ring zeroes what it decrypted if the tag is wrong).
    let mut key = DeviceKey(rest.to_vec());
    let len = master
        .key
        .open_in_place(nonce, Aad::from(aad(kind, id, purpose)), &mut key.0)
        .map_err(|_| DeviceKeyError::DoesNotOpen)?
        .len();
    key.0.truncate(len);
    Ok(key)
}

/// A device key in memory: never printed, wiped when dropped.
pub struct DeviceKey(Vec<u8>);

impl DeviceKey {
    /// A key given in the clear (the admin API), checked for length; wiped if refused.
    pub fn new(key: Vec<u8>) -> Result<DeviceKey, DeviceKeyError> {
        let key = DeviceKey(key);
        check_device_key(&key.0)?;
        Ok(key)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceKey({} bytes)", self.0.len())
    }
}

impl Drop for DeviceKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // Volatile, so that the wipe is not optimised away as a dead store.
            // SAFETY: `b` is a valid, aligned, exclusive reference to a byte we own.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
        // And past the length (the tag `open` truncated away).
        for b in self.0.spare_capacity_mut() {
            // SAFETY: as above; writing a byte into spare capacity needs no initialisation.
            unsafe { std::ptr::write_volatile(b.as_mut_ptr(), 0) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn id(s: &str) -> PrincipalId {
        PrincipalId::parse(s).unwrap()
    }

    const DEVICE: PrincipalKind = PrincipalKind::Device;

    #[test]
    fn a_sealed_key_opens_only_for_its_principal_and_purpose() {
        let keys = MasterKeys::from_keys(&[[1; 32]]);
        let psk = b"0123456789abcdef-key";
        let sealed = keys.seal(DEVICE, &id("d1"), KeyPurpose::Psk, psk).unwrap();
        assert!(!sealed.sealed.contains(&hex::encode(psk)));
        let opened = keys
            .open(DEVICE, &id("d1"), KeyPurpose::Psk, &sealed)
            .unwrap();
        assert_eq!(opened.as_bytes(), psk);
        for (kind, who, purpose) in [
            (DEVICE, "d2", KeyPurpose::Psk),
            (DEVICE, "d1", KeyPurpose::FrameKey),
            (PrincipalKind::Service, "d1", KeyPurpose::Psk),
        ] {
            assert!(matches!(
                keys.open(kind, &id(who), purpose, &sealed),
                Err(DeviceKeyError::DoesNotOpen)
            ));
        }
        // Another master key, a flipped bit, a truncation: refused, no panic.
        let other = MasterKeys::from_keys(&[[2; 32]]);
        assert!(
            other
                .open(DEVICE, &id("d1"), KeyPurpose::Psk, &sealed)
                .is_err()
        );
        let mut flipped = sealed.clone();
        let mut raw = hex::decode(&flipped.sealed).unwrap();
        raw[20] ^= 1;
        flipped.sealed = hex::encode(raw);
        assert!(
            keys.open(DEVICE, &id("d1"), KeyPurpose::Psk, &flipped)
                .is_err()
        );
        for cut in 0..sealed.sealed.len() {
            let short = SealedKey {
                master: sealed.master.clone(),
                sealed: sealed.sealed[..cut].to_string(),
            };
            assert!(
                keys.open(DEVICE, &id("d1"), KeyPurpose::Psk, &short)
                    .is_err()
            );
        }
    }

    #[test]
    fn device_keys_are_bounded_and_generated_ones_are_printable() {
        let keys = MasterKeys::from_keys(&[[1; 32]]);
        for len in [0, 15, 65] {
            assert!(matches!(
                keys.seal(DEVICE, &id("d1"), KeyPurpose::Psk, &vec![b'a'; len]),
                Err(DeviceKeyError::Length(l)) if l == len
            ));
        }
        let a = generate_device_key().unwrap();
        let b = generate_device_key().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), GENERATED_KEY_CHARS);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        );
        check_device_key(a.as_bytes()).unwrap();
    }

    #[test]
    fn the_key_file_is_created_owner_only_and_a_rotation_keeps_old_keys_until_finished() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/master.key");
        let keys = MasterKeys::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let sealed = keys
            .seal(DEVICE, &id("d1"), KeyPurpose::Psk, &[7; 20])
            .unwrap();
        // Read again from the file: the same key.
        let again = MasterKeys::load_or_create(&path).unwrap();
        assert_eq!(again.current(), keys.current());
        keys.begin_rotation().unwrap();
        assert_ne!(keys.current(), sealed.master);
        assert_eq!(keys.len(), 2);
        // A process starting mid-rotation still opens what the old key sealed.
        let mid = MasterKeys::load_or_create(&path).unwrap();
        assert!(
            mid.open(DEVICE, &id("d1"), KeyPurpose::Psk, &sealed)
                .is_ok()
        );
        let resealed = keys
            .seal(DEVICE, &id("d1"), KeyPurpose::Psk, &[7; 20])
            .unwrap();
        // What the rotation checks before dropping the old key.
        assert!(
            keys.open_current(DEVICE, &id("d1"), KeyPurpose::Psk, &sealed)
                .is_err()
        );
        assert!(
            keys.open_current(DEVICE, &id("d1"), KeyPurpose::Psk, &resealed)
                .is_ok()
        );
        assert_eq!(keys.finish_rotation().unwrap(), 1);
        let after = MasterKeys::load_or_create(&path).unwrap();
        assert_eq!(after.len(), 1);
        assert!(matches!(
            after.open(DEVICE, &id("d1"), KeyPurpose::Psk, &sealed),
            Err(DeviceKeyError::UnknownMaster(_))
        ));
        assert_eq!(
            after
                .open(DEVICE, &id("d1"), KeyPurpose::Psk, &resealed)
                .unwrap()
                .as_bytes(),
            [7; 20]
        );
    }

    #[test]
    fn a_bad_key_file_is_an_error_naming_it_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        std::fs::write(&path, "not-a-key-but-a-secret-looking-string\n").unwrap();
        let err = MasterKeys::load_or_create(&path).unwrap_err().to_string();
        assert!(
            err.contains("master.key") && err.contains("entry 1"),
            "{err}"
        );
        assert!(!err.contains("secret-looking"), "{err}");
        std::fs::write(&path, "# only a comment\n").unwrap();
        let err = MasterKeys::load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("holds no key"), "{err}");
    }

    #[test]
    fn a_missing_key_file_is_not_replaced_while_the_registry_holds_sealed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let err = MasterKeys::load_for(&path, 3).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string())
                && err.contains("holds 3 sealed device keys")
                && err.contains("Put the file back")
                && err.contains(MASTER_KEY_ENV),
            "{err}"
        );
        assert!(!path.exists());
        // Nothing sealed yet (a first start): made, then read back as it is.
        let made = MasterKeys::load_for(&path, 0).unwrap();
        assert_eq!(
            MasterKeys::load_for(&path, 3).unwrap().current(),
            made.current()
        );
    }

    #[test]
    fn a_key_given_in_the_clear_is_checked_before_it_is_kept() {
        assert!(matches!(
            DeviceKey::new(b"short".to_vec()),
            Err(DeviceKeyError::Length(5))
        ));
        assert_eq!(
            DeviceKey::new(vec![b'k'; 16]).unwrap().as_bytes(),
            &[b'k'; 16]
        );
    }

    #[test]
    fn a_master_key_id_is_an_hmac_under_a_label_not_a_hash_of_the_key() {
        use ring::hmac;
        let keys = MasterKeys::from_keys(&[[1; 32]]);
        let tag = hmac::sign(
            &hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]),
            b"portcullis master key id v1",
        );
        assert_eq!(keys.current(), hex::encode(&tag.as_ref()[..8]));
        assert_ne!(keys.current(), hex::encode(&Sha256::digest([1u8; 32])[..8]));
    }

    #[test]
    fn a_rotation_from_the_environment_needs_a_new_key_put_first_there() {
        let one = MasterKeys::from_keys(&[[1; 32]]);
        assert!(matches!(
            one.begin_rotation(),
            Err(DeviceKeyError::FromEnvironment)
        ));
        assert_eq!(one.len(), 1);
        // The operator put a new key first: the rotation seals under it.
        let two = MasterKeys::from_keys(&[[2; 32], [1; 32]]);
        two.begin_rotation().unwrap();
        assert_eq!(two.finish_rotation().unwrap(), 0);
    }
}
