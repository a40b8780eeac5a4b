//! The registry file on disk, opened under its seal: used by `serve` and by the CLI
//! when no gateway is running.

use anyhow::{Context, Result};
use portcullis_config::Config;
use portcullis_core::record::RecordSealer;
use portcullis_core::registry::{Legacy, Registry};
use std::path::PathBuf;

/// Open the registry of `config`. Once a registry has been sealed under this
/// gateway's audit key, a marker beside the key (outside the data dir) says so: an
/// unsealed file found later is one put in its place, and is refused rather than
/// sealed (which would launder whatever it holds).
pub fn open_registry(config: &Config, sealer: RecordSealer) -> Result<Registry> {
    let mut marker = config.audit_key_file().into_os_string();
    marker.push(".registry-sealed");
    let marker = PathBuf::from(marker);
    let legacy = if marker.exists() {
        Legacy::Refuse
    } else {
        Legacy::Seal
    };
    let registry = Registry::open_with(&config.registry_file(), sealer, legacy)?;
    if legacy == Legacy::Seal {
        use std::os::unix::fs::OpenOptionsExt;
        let note = format!(
            "the registry {} is sealed under the key beside this file; an unsealed one is refused\n",
            config.registry_file().display()
        );
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&marker)
            .and_then(|mut f| std::io::Write::write_all(&mut f, note.as_bytes()))
            .with_context(|| format!("writing {}", marker.display()))?;
    }
    Ok(registry)
}

/// The key registry records are sealed under: derived from the audit key, which lives
/// outside the data dir.
pub fn registry_sealer(config: &Config) -> Result<RecordSealer> {
    let key = portcullis_core::audit::load_or_create_key(&config.audit_key_file())
        .with_context(|| format!("audit key {}", config.audit_key_file().display()))?;
    Ok(RecordSealer::derive(&key))
}
