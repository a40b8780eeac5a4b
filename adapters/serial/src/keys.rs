//! Frame keys from the registry: a device's key, opened from its record with the
//! master key when one of its frames needs checking.

use portcullis_core::device_key::{KeyPurpose, MasterKeys};
use portcullis_core::principal::{PrincipalId, PrincipalKind};
use portcullis_core::registry::Registry;
use portcullis_serial_frame::Key;
use std::sync::Arc;

/// Where a frame's key comes from (the registry in the gateway; a table in tests).
pub trait FrameKeys: Send + Sync {
    /// The key of a registered device that has one; `None` for anything else (the
    /// frame then fails as a bad tag does).
    fn key(&self, id: &PrincipalId) -> Option<Key>;
}

/// The registry's devices and their sealed frame keys.
pub struct RegistryKeys {
    registry: Arc<Registry>,
    master: Arc<MasterKeys>,
}

impl RegistryKeys {
    pub fn new(registry: Arc<Registry>, master: Arc<MasterKeys>) -> RegistryKeys {
        RegistryKeys { registry, master }
    }
}

impl FrameKeys for RegistryKeys {
    fn key(&self, id: &PrincipalId) -> Option<Key> {
        let snapshot = self.registry.snapshot();
        let record = snapshot.get(PrincipalKind::Device, id)?;
        let sealed = record.frame_key.as_ref()?;
        match self
            .master
            .open(PrincipalKind::Device, id, KeyPurpose::FrameKey, sealed)
        {
            Ok(key) => Key::new(key.as_bytes()).ok(),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "a device's serial frame key does not open");
                None
            }
        }
    }
}
