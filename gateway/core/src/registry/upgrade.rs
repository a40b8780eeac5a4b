//! Registries written by redb 2 (file format 2), as every gateway before redb 5
//! wrote them, are upgraded in place to file format 3 on first open.
//!
//! redb 3 and later read only format 3; redb 2.6 has `Database::upgrade()`, which
//! rewrites the file's allocator state with two-phase commits. It runs here through
//! a second, renamed dependency (`redb2`), once per file. Before it runs, the file is
//! copied beside itself ([`format2_copy`], owner-only), so an upgrade that fails or
//! is interrupted loses nothing: the error names the copy.

use super::RegistryError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Where the format-2 original of `registry` is kept after an upgrade.
pub fn format2_copy(registry: &Path) -> PathBuf {
    let mut name = registry.as_os_str().to_owned();
    name.push(".format2");
    PathBuf::from(name)
}

/// Upgrade the format-2 file at `path` to format 3, keeping a copy of the original.
/// The caller holds no handle on the file.
pub(super) fn upgrade(path: &Path) -> Result<(), RegistryError> {
    let shown = path.display().to_string();
    let copy = format2_copy(path);
    keep_copy(path, &copy).map_err(|e| RegistryError::Open {
        path: shown.clone(),
        reason: format!(
            "written by an older gateway (redb file format 2): copying it to {} before the \
             upgrade failed: {e}",
            copy.display()
        ),
    })?;
    let failed = |reason: String| RegistryError::CorruptFile {
        path: shown.clone(),
        reason: format!(
            "written by an older gateway (redb file format 2), and upgrading it failed: \
             {reason}; the original is kept at {}",
            copy.display()
        ),
    };
    let mut db = redb2::Database::open(path).map_err(|e| match e {
        redb2::DatabaseError::DatabaseAlreadyOpen => RegistryError::Open {
            path: shown.clone(),
            reason: "already open by another process (is a gateway running on this data dir?)"
                .into(),
        },
        other => failed(other.to_string()),
    })?;
    db.upgrade().map_err(|e| failed(e.to_string()))?;
    drop(db);
    tracing::warn!(
        registry = %shown,
        original = %copy.display(),
        "registry upgraded from redb file format 2 to 3; the original is kept beside it \
         (remove it once the gateway runs well)"
    );
    Ok(())
}

/// Copy `from` to `to` (mode 0600, synced, renamed into place whole). A copy left
/// by an earlier attempt is the untouched original (the upgrade starts only after
/// the copy is in place), so it is kept as it is.
fn keep_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if to.try_exists()? {
        return Ok(());
    }
    let mut partial = to.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    let bytes = std::fs::read(from)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&partial, to)?;
    if let Some(dir) = to.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
