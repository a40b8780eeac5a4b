//! Pre-shared keys from the registry: a device's key, opened from its record with the
//! master key when its handshake asks for it.

use crate::dtls::PskStore;
use portcullis_core::device_key::{KeyPurpose, MasterKeys};
use portcullis_core::principal::{PrincipalId, PrincipalKind};
use portcullis_core::registry::Registry;
use std::sync::Arc;

/// The registry's devices and their sealed pre-shared keys.
pub struct RegistryKeys {
    registry: Arc<Registry>,
    master: Arc<MasterKeys>,
}

impl RegistryKeys {
    pub fn new(registry: Arc<Registry>, master: Arc<MasterKeys>) -> RegistryKeys {
        RegistryKeys { registry, master }
    }
}

impl PskStore for RegistryKeys {
    /// The key of a registered device that has one. Anything else (an id that is not
    /// one, an unknown device, no key, a key that does not open) gets none, and the
    /// handshake then fails as a wrong key does. Whether the device may connect
    /// (enabled, not banned, backed off) is decided after the handshake, by the
    /// authenticator, like for every other credential.
    fn psk(&self, identity: &str) -> Option<Vec<u8>> {
        let id = PrincipalId::parse(identity).ok()?;
        let snapshot = self.registry.snapshot();
        let record = snapshot.get(PrincipalKind::Device, &id)?;
        let sealed = record.psk.as_ref()?;
        match self
            .master
            .open(PrincipalKind::Device, &id, KeyPurpose::Psk, sealed)
        {
            // dimpl's resolver takes the key as a plain `Vec`: this one copy, held by
            // dimpl for the handshake, is not wiped (the opened `DeviceKey` is).
            Ok(key) => Some(key.as_bytes().to_vec()),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "a device's pre-shared key does not open");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::record::RecordSealer;
    use portcullis_core::registry::PrincipalRecord;

    #[test]
    fn only_a_registered_device_with_a_key_that_opens_has_one() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(
            Registry::open(&dir.path().join("r.redb"), RecordSealer::derive(&[1; 32])).unwrap(),
        );
        let master = Arc::new(MasterKeys::from_keys(&[[2; 32]]));
        let add = |id: &str, psk: Option<&[u8]>, kind: PrincipalKind| {
            let pid = PrincipalId::parse(id).unwrap();
            let psk = psk.map(|k| master.seal(kind, &pid, KeyPurpose::Psk, k).unwrap());
            registry
                .add(PrincipalRecord {
                    kind,
                    id: pid,
                    group: portcullis_core::principal::GroupName::parse("default").unwrap(),
                    enabled: true,
                    cert: None,
                    secret_hash: Some("00".repeat(32)),
                    psk,
                    frame_key: None,
                    generation: 0,
                    created_unix: 0,
                    updated_unix: 0,
                })
                .unwrap();
        };
        add("dev1", Some(b"dev1-key-0123456789"), PrincipalKind::Device);
        add("dev2", None, PrincipalKind::Device);
        add("svc1", Some(b"svc1-key-0123456789"), PrincipalKind::Service);
        let keys = RegistryKeys::new(registry.clone(), master);
        assert_eq!(
            keys.psk("dev1").as_deref(),
            Some(&b"dev1-key-0123456789"[..])
        );
        assert_eq!(keys.psk("dev2"), None);
        assert_eq!(keys.psk("svc1"), None);
        assert_eq!(keys.psk("ghost"), None);
        assert_eq!(keys.psk("not/an id"), None);
        // Under another master key: none (and a warning), not a panic.
        let other = RegistryKeys::new(registry, Arc::new(MasterKeys::from_keys(&[[3; 32]])));
        assert_eq!(other.psk("dev1"), None);
    }
}
