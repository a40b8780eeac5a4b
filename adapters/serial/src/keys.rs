//! Frame keys from the registry: a device's key, opened from its record with the
//! master key the first time one of its frames needs checking, and kept open while the
//! record holds the same sealed key (a rotation or a removal is seen at the next frame).

use portcullis_core::device_key::{KeyPurpose, MasterKeys, SealedKey};
use portcullis_core::principal::{PrincipalId, PrincipalKind};
use portcullis_core::registry::Registry;
use portcullis_serial_frame::Key;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
    /// Keys opened (or that did not open), with the sealed key each came from. Only
    /// devices a port allows are ever looked up, so it holds at most one entry per
    /// configured device.
    opened: Mutex<HashMap<PrincipalId, (SealedKey, Option<Key>)>>,
}

impl RegistryKeys {
    pub fn new(registry: Arc<Registry>, master: Arc<MasterKeys>) -> RegistryKeys {
        RegistryKeys {
            registry,
            master,
            opened: Mutex::new(HashMap::new()),
        }
    }
}

impl FrameKeys for RegistryKeys {
    fn key(&self, id: &PrincipalId) -> Option<Key> {
        let snapshot = self.registry.snapshot();
        let record = snapshot.get(PrincipalKind::Device, id)?;
        let Some(sealed) = record.frame_key.as_ref() else {
            self.opened
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(id);
            return None;
        };
        {
            let opened = self.opened.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((was, key)) = opened.get(id)
                && was == sealed
            {
                return key.clone();
            }
        }
        // One that does not open is said once, not at every frame naming the device.
        let key = match self
            .master
            .open(PrincipalKind::Device, id, KeyPurpose::FrameKey, sealed)
        {
            Ok(key) => Key::new(key.as_bytes()).ok(),
            Err(e) => {
                tracing::warn!(device = %id, error = %e, "a device's serial frame key does not open");
                None
            }
        };
        self.opened
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), (sealed.clone(), key.clone()));
        key
    }
}
