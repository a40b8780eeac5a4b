//! The chain key on disk: 32 random bytes made once, readable by the gateway alone,
//! and kept outside the data dir, so that whoever can rewrite the log cannot also
//! make its MACs.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// Load the chain key, creating it (32 random bytes, mode 0600, new parent directories
/// 0700) if the file does not exist. A file of another length is refused.
pub fn load_or_create_key(path: &Path) -> io::Result<[u8; 32]> {
    match load_key(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        loaded => return loaded,
    }
    let context =
        |e: io::Error| io::Error::new(e.kind(), format!("audit key {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(context)?;
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)
        .map_err(std::io::Error::other)
        .map_err(context)?;
    let created = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(&key).map_err(context)?;
            file.sync_all().map_err(context)?;
            Ok(key)
        }
        // Another process created it first: use theirs.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_key(path),
        Err(e) => Err(context(e)),
    }
}

/// Load an existing chain key (never creates one: for `verify`).
pub fn load_key(path: &Path) -> io::Result<[u8; 32]> {
    let bytes = std::fs::read(path)
        .map_err(|e| io::Error::new(e.kind(), format!("audit key {}: {e}", path.display())))?;
    bytes.as_slice().try_into().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "audit key {}: must be exactly 32 bytes (found {}); restore the right key \
                 file, or move this one aside to start a new chain",
                path.display(),
                bytes.len()
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_created_private_and_a_wrong_length_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys/audit.key");
        assert_eq!(load_key(&path).unwrap_err().kind(), io::ErrorKind::NotFound);
        let key = load_or_create_key(&path).unwrap();
        assert_eq!(load_or_create_key(&path).unwrap(), key);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        std::fs::write(&path, [1u8; 31]).unwrap();
        let refused = load_or_create_key(&path).unwrap_err().to_string();
        assert!(refused.contains("exactly 32 bytes (found 31)"), "{refused}");
    }
}
