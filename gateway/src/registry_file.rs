//! The registry file on disk, opened under its seal, and the master keys its device
//! keys are sealed under: used by `serve` and by the CLI when no gateway is running.

use anyhow::{Context, Result};
use portcullis_config::Config;
use portcullis_core::device_key::MasterKeys;
use portcullis_core::record::RecordSealer;
use portcullis_core::registry::{Legacy, Registry};
use std::path::PathBuf;

/// Open the registry of `config`. Once a registry has been sealed under this
/// gateway's audit key, a marker beside the key (outside the data dir) says so: an
/// unsealed file found later is one put in its place, and is refused rather than
/// sealed (which would launder whatever it holds). Where there is no registry file
/// yet, a new one is made sealed whether or not the marker exists: it holds nothing
/// to launder. So the marker may be put beside a key on a read-only mount (a
/// Kubernetes Secret, a systemd credential) before the first start.
pub fn open_registry(config: &Config, sealer: RecordSealer) -> Result<Registry> {
    let mut marker = config.audit_key_file().into_os_string();
    marker.push(".registry-sealed");
    let marker = PathBuf::from(marker);
    let marked = marker.exists();
    let legacy = if marked && config.registry_file().exists() {
        Legacy::Refuse
    } else {
        Legacy::Seal
    };
    let registry = Registry::open_with(&config.registry_file(), sealer, legacy)?;
    if !marked {
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
            .with_context(|| {
                format!(
                    "writing {} (beside the audit key; where that directory is read-only, \
                     put a file of that name there before the first start)",
                    marker.display()
                )
            })?;
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

/// The master keys for `registry`, already open (the CLI): a missing key file is made
/// with a new key only while the registry holds no sealed device key.
pub fn master_keys_for(config: &Config, registry: &Registry) -> Result<MasterKeys> {
    Ok(MasterKeys::load_for(
        &config.master_key_file(),
        registry.sealed_key_count(),
    )?)
}

/// The master keys, before the registry is opened (`serve`). Only when the key file
/// is missing (and `PORTCULLIS_MASTER_KEY` unset) is the registry opened here, to
/// count the device keys sealed in it; it is closed again before this returns.
pub fn master_keys(config: &Config) -> Result<MasterKeys> {
    let path = config.master_key_file();
    if let Some(keys) = MasterKeys::load(&path)? {
        return Ok(keys);
    }
    let sealed = if config.registry_file().exists() {
        open_registry(config, registry_sealer(config)?)?.sealed_key_count()
    } else {
        0
    };
    Ok(MasterKeys::load_for(&path, sealed)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::device_key::DeviceKey;
    use portcullis_core::principal::{GroupName, PrincipalId, PrincipalKind};
    use portcullis_core::registry::PrincipalRecord;

    fn config(dir: &std::path::Path) -> Config {
        Config {
            data_dir: dir.join("data"),
            ..Config::default()
        }
    }

    #[test]
    fn a_registry_sealed_before_is_refused_unsealed_but_a_new_one_opens_beside_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let config = Config {
            audit: portcullis_config::Audit {
                key_file: keys.join("audit.key"),
                ..Default::default()
            },
            ..config(dir.path())
        };
        let sealer = || registry_sealer(&config).unwrap();
        // The keys as a read-only mount holds them: the audit key and the marker, made
        // by hand before the first start (nothing is written beside them then). The
        // sealer makes the audit key.
        let _ = sealer();
        std::fs::write(keys.join("audit.key.registry-sealed"), "sealed\n").unwrap();
        drop(
            open_registry(&config, sealer())
                .expect("a new registry beside the marker is made sealed"),
        );
        // Sealed, it opens again.
        drop(open_registry(&config, sealer()).expect("the sealed registry opens"));
        // An unsealed file in its place (a database, but none this gateway sealed) is
        // refused, not sealed.
        std::fs::remove_file(config.registry_file()).unwrap();
        drop(redb::Database::create(config.registry_file()).unwrap());
        let err = open_registry(&config, sealer()).unwrap_err();
        assert!(format!("{err:#}").contains("not sealed"), "{err:#}");
    }

    #[test]
    fn a_lost_master_key_file_is_not_replaced_while_the_registry_holds_sealed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let path = config.master_key_file();
        // First start: no registry, a new key.
        let master = master_keys(&config).unwrap();
        assert!(path.exists());
        {
            let registry = open_registry(&config, registry_sealer(&config).unwrap()).unwrap();
            let key = DeviceKey::new(b"a-pre-shared-key".to_vec()).unwrap();
            let record = PrincipalRecord {
                kind: PrincipalKind::Device,
                id: PrincipalId::parse("coap-1").unwrap(),
                group: GroupName::parse("default").unwrap(),
                enabled: true,
                cert: None,
                secret_hash: None,
                psk: None,
                frame_key: None,
                generation: 0,
                created_unix: 0,
                updated_unix: 0,
            };
            registry.add_with_psk(record, Some(&key), &master).unwrap();
            assert!(master_keys_for(&config, &registry).is_ok());
            std::fs::rename(&path, dir.path().join("moved.key")).unwrap();
            let err = master_keys_for(&config, &registry).unwrap_err().to_string();
            assert!(err.contains("holds 1 sealed device keys"), "{err}");
        }
        // Before the registry is opened (serve): the same refusal, no key made.
        let err = master_keys(&config).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("holds 1 sealed"),
            "{err}"
        );
        assert!(!path.exists());
        std::fs::rename(dir.path().join("moved.key"), &path).unwrap();
        assert_eq!(master_keys(&config).unwrap().current(), master.current());
    }
}
