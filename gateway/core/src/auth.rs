//! Authentication: who is this peer, and may it connect at all?
//!
//! Reads only the in-memory registry snapshot and per-group trust anchors. Every
//! refusal carries a precise reason for the audit log and metrics, but the peer gets
//! one and the same answer whatever went wrong, and an unknown id costs the same work
//! as a wrong secret: nothing tells an attacker whether an id exists.

use crate::acl::{Acl, AclTemplate};
use crate::auth_alert::{Alert, FailureAlerts};
use crate::backoff::{BackedOff, BackoffPolicy, SourceGuard};
use crate::device_key::KeyPurpose;
use crate::principal::{GroupName, PrincipalId, PrincipalKind, PrincipalRef};
use crate::registry::{PrincipalRecord, Registry};
use crate::secret::SecretHasher;
use crate::source_key::SourceKey;
use portcullis_config::{Config, IdentityField};
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One group's rules, built once from the configuration.
pub struct GroupPolicy {
    pub kind: PrincipalKind,
    pub name: GroupName,
    pub acl: AclTemplate,
    pub identity: IdentityField,
    pub disconnect_on_refusal: bool,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl std::fmt::Debug for GroupPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupPolicy")
            .field("kind", &self.kind)
            .field("name", &self.name)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{path}: {reason}")]
    Trust { path: String, reason: String },
    #[error("{group}: {reason}")]
    Group { group: String, reason: String },
}

/// All groups, plus the union of their CAs for the TLS handshake.
#[derive(Debug)]
pub struct Policies {
    groups: HashMap<(PrincipalKind, GroupName), Arc<GroupPolicy>>,
    /// CAs any group trusts, by listener: the TLS layer accepts a client certificate
    /// from any of them; which group may use which CA is decided at CONNECT.
    pub device_roots: Arc<RootCertStore>,
    pub service_roots: Arc<RootCertStore>,
    /// Verifiers over every CA of a kind, for certificates naming unknown ids.
    device_any: Option<Arc<dyn ClientCertVerifier>>,
    service_any: Option<Arc<dyn ClientCertVerifier>>,
}

fn load_roots(config: &Config, paths: &[std::path::PathBuf]) -> Result<RootCertStore, PolicyError> {
    let mut roots = RootCertStore::empty();
    for path in paths {
        let path = &config.resolve(path);
        let certs = read_pem_certs(path)?;
        for cert in certs {
            roots.add(cert).map_err(|e| PolicyError::Trust {
                path: path.display().to_string(),
                reason: format!("not a usable CA certificate: {e}"),
            })?;
        }
    }
    Ok(roots)
}

/// Revocation lists, PEM.
fn load_crls(
    config: &Config,
    paths: &[std::path::PathBuf],
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, PolicyError> {
    let mut out = Vec::new();
    for path in paths {
        let path = config.resolve(path);
        let err = |reason: String| PolicyError::Trust {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|e| err(format!("cannot read: {e}")))?;
        let crls: Vec<_> = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(&bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| err(format!("bad PEM: {e}")))?;
        if crls.is_empty() {
            return Err(err("no CRL in file".into()));
        }
        out.extend(crls);
    }
    Ok(out)
}

pub fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PolicyError> {
    let err = |reason: String| PolicyError::Trust {
        path: path.display().to_string(),
        reason,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| err(format!("bad PEM: {e}")))?;
    if certs.is_empty() {
        return Err(err("no certificate in file".into()));
    }
    Ok(certs)
}

impl Policies {
    pub fn from_config(config: &Config) -> Result<Policies, PolicyError> {
        let mut groups = HashMap::new();
        let mut device_roots = RootCertStore::empty();
        let mut service_roots = RootCertStore::empty();
        let entries = config
            .device_groups
            .iter()
            .map(|(name, g)| {
                (
                    PrincipalKind::Device,
                    name,
                    (&g.trust, &g.crls),
                    g.identity,
                    &g.publish,
                    &g.subscribe,
                    g.disconnect_on_refusal,
                )
            })
            .chain(config.service_groups.iter().map(|(name, g)| {
                (
                    PrincipalKind::Service,
                    name,
                    (&g.trust, &g.crls),
                    g.identity,
                    &g.publish,
                    &g.subscribe,
                    g.disconnect_on_refusal,
                )
            }));
        for (kind, name, (trust, crls), identity, publish, subscribe, disconnect_on_refusal) in
            entries
        {
            let group = GroupName::parse(name).map_err(|e| PolicyError::Group {
                group: name.clone(),
                reason: e.to_string(),
            })?;
            let roots = load_roots(config, trust)?;
            let verifier = if roots.is_empty() {
                None
            } else {
                let all = match kind {
                    PrincipalKind::Device => &mut device_roots,
                    PrincipalKind::Service => &mut service_roots,
                };
                for anchor in roots.roots.iter() {
                    all.roots.push(anchor.clone());
                }
                Some(
                    WebPkiClientVerifier::builder(Arc::new(roots))
                        .with_crls(load_crls(config, crls)?)
                        .build()
                        .map_err(|e| PolicyError::Group {
                            group: name.clone(),
                            reason: format!("trust anchors: {e}"),
                        })?,
                )
            };
            groups.insert(
                (kind, group.clone()),
                Arc::new(GroupPolicy {
                    kind,
                    name: group,
                    acl: AclTemplate::new(kind, publish, subscribe),
                    identity,
                    disconnect_on_refusal,
                    verifier,
                }),
            );
        }
        let any = |roots: &RootCertStore| -> Option<Arc<dyn ClientCertVerifier>> {
            if roots.is_empty() {
                return None;
            }
            WebPkiClientVerifier::builder(Arc::new(roots.clone()))
                .build()
                .ok()
        };
        Ok(Policies {
            groups,
            device_any: any(&device_roots),
            service_any: any(&service_roots),
            device_roots: Arc::new(device_roots),
            service_roots: Arc::new(service_roots),
        })
    }

    fn any_verifier(&self, kind: PrincipalKind) -> Option<Arc<dyn ClientCertVerifier>> {
        match kind {
            PrincipalKind::Device => self.device_any.clone(),
            PrincipalKind::Service => self.service_any.clone(),
        }
    }

    pub fn group(&self, kind: PrincipalKind, name: &GroupName) -> Option<&Arc<GroupPolicy>> {
        self.groups.get(&(kind, name.clone()))
    }
}

/// One proof of identity a peer presented. Which ones a protocol can carry, and how
/// (MQTT: a secret as the password, a certificate from TLS; CoAP: the DTLS handshake's
/// pre-shared key; serial: frames tagged under a per-device key), is its adapter's
/// business; the rules of the protocol (MQTT: user name = client id) are checked there.
#[derive(Debug, Clone, Copy)]
pub enum Credential<'a> {
    Secret(&'a [u8]),
    /// The verified TLS chain, end-entity first.
    Certificate(&'a [CertificateDer<'static>]),
    /// The DTLS handshake completed with the device's pre-shared key.
    PreSharedKey,
    /// Frames authenticated under the device's serial frame key.
    FrameKey,
}

/// Who the peer claims to be, and what it presented to prove it.
#[derive(Debug, Clone, Default)]
pub struct Credentials<'a> {
    /// The claimed identity (MQTT client id, DTLS PSK identity, a frame's device id).
    pub id: &'a str,
    pub presented: Vec<Credential<'a>>,
}

impl<'a> Credentials<'a> {
    fn secret(&self) -> Option<&'a [u8]> {
        self.presented.iter().find_map(|c| match c {
            Credential::Secret(s) => Some(*s),
            _ => None,
        })
    }

    fn certs(&self) -> Option<&'a [CertificateDer<'static>]> {
        self.presented.iter().find_map(|c| match c {
            Credential::Certificate(chain) => Some(*chain),
            _ => None,
        })
    }

    /// A key the adapter's own handshake or frame check already proved (the DTLS
    /// pre-shared key, the serial frame key): which one.
    fn keyed(&self) -> Option<KeyPurpose> {
        self.presented.iter().find_map(|c| match c {
            Credential::PreSharedKey => Some(KeyPurpose::Psk),
            Credential::FrameKey => Some(KeyPurpose::FrameKey),
            _ => None,
        })
    }
}

/// Why a CONNECT was refused. For the audit log and metrics only: the peer always
/// sees the same "not authorized".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    #[error("source is backed off after repeated failures")]
    BackedOff,
    #[error("client id is not a valid principal id")]
    BadClientId,
    #[error("username differs from the client id")]
    UsernameMismatch,
    #[error("a credential of a kind not registered for this identity")]
    CredentialNotRegistered,
    #[error("unknown principal")]
    Unknown,
    #[error("principal is disabled")]
    Disabled,
    #[error("no credential presented")]
    NoCredential,
    #[error("wrong secret")]
    BadSecret,
    #[error("principal has no secret credential")]
    SecretNotAllowed,
    #[error("principal has no certificate credential")]
    CertNotAllowed,
    #[error("certificate not issued by a CA the principal's group trusts")]
    CertUntrusted,
    #[error("certificate identity differs from the client id")]
    CertIdentityMismatch,
    #[error("certificate is not the one registered")]
    CertNotPinned,
    #[error("principal's group is not configured")]
    NoGroup,
    #[error("principal is banned")]
    Banned,
}

impl AuthRefusal {
    /// Stable label for metrics and audit lines.
    pub fn label(self) -> &'static str {
        match self {
            AuthRefusal::BackedOff => "backed_off",
            AuthRefusal::BadClientId => "bad_client_id",
            AuthRefusal::UsernameMismatch => "username_mismatch",
            AuthRefusal::CredentialNotRegistered => "credential_not_registered",
            AuthRefusal::Unknown => "unknown_principal",
            AuthRefusal::Disabled => "disabled",
            AuthRefusal::NoCredential => "no_credential",
            AuthRefusal::BadSecret => "bad_secret",
            AuthRefusal::SecretNotAllowed => "secret_not_allowed",
            AuthRefusal::CertNotAllowed => "certificate_not_allowed",
            AuthRefusal::CertUntrusted => "certificate_untrusted",
            AuthRefusal::CertIdentityMismatch => "certificate_identity_mismatch",
            AuthRefusal::CertNotPinned => "certificate_not_registered",
            AuthRefusal::NoGroup => "group_not_configured",
            AuthRefusal::Banned => "banned",
        }
    }

    /// A credential was offered for the id and did not verify: a guess at the
    /// principal's credential (what the behaviour model counts as an authentication
    /// failure). Refusals of the source, of an unknown id, or with no credential are
    /// not.
    pub fn is_credential_failure(self) -> bool {
        matches!(
            self,
            AuthRefusal::BadSecret
                | AuthRefusal::SecretNotAllowed
                | AuthRefusal::CredentialNotRegistered
                | AuthRefusal::CertNotAllowed
                | AuthRefusal::CertUntrusted
                | AuthRefusal::CertIdentityMismatch
                | AuthRefusal::CertNotPinned
        )
    }
}

/// A principal that proved who it is.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub principal: PrincipalRef,
    pub generation: u64,
    pub method: &'static str,
    pub cert_fingerprint: Option<String>,
    pub acl: Arc<Acl>,
    pub policy: Arc<GroupPolicy>,
}

pub struct Authenticator {
    registry: Arc<Registry>,
    hasher: SecretHasher,
    /// Replaced whole on a configuration reload; read once per connection.
    policies: std::sync::RwLock<Arc<Policies>>,
    guard: Mutex<SourceGuard>,
    alerts: Mutex<FailureAlerts>,
    ipv6_prefix: u8,
    /// Stands in for the record of an unknown id, so that it is read, decoded and
    /// verified against like a real one: the same work either way.
    dummy: Arc<PrincipalRecord>,
}

pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The identity a certificate claims under the given field.
pub fn cert_identity(cert: &CertificateDer<'_>, field: IdentityField) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    match field {
        IdentityField::Cn => {
            let mut names = parsed.subject().iter_common_name();
            let first = names.next()?.as_str().ok()?.to_string();
            // Exactly one identity: a certificate with two CNs names nobody.
            if names.next().is_some() {
                return None;
            }
            Some(first)
        }
        IdentityField::SanUri => {
            let san = parsed.subject_alternative_name().ok()??;
            let mut ids = san.value.general_names.iter().filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(uri) => {
                    uri.strip_prefix("urn:portcullis:").map(str::to_string)
                }
                _ => None,
            });
            let first = ids.next()?;
            if ids.next().is_some() {
                return None;
            }
            Some(first)
        }
    }
}

impl Authenticator {
    pub fn new(
        registry: Arc<Registry>,
        hasher: SecretHasher,
        policies: Arc<Policies>,
        backoff: BackoffPolicy,
    ) -> Self {
        Authenticator {
            registry,
            hasher,
            policies: std::sync::RwLock::new(policies),
            guard: Mutex::new(SourceGuard::new(backoff)),
            alerts: Mutex::new(FailureAlerts::new(
                backoff.alert_failures,
                backoff.window,
                backoff.max_entries,
            )),
            ipv6_prefix: backoff.ipv6_prefix,
            dummy: Arc::new(PrincipalRecord {
                kind: PrincipalKind::Device,
                id: PrincipalId::parse("unknown").expect("a valid id"),
                group: GroupName::parse("default").expect("a valid group name"),
                enabled: true,
                cert: Some(crate::registry::CertCredential {
                    fingerprint: Some(hex::encode([0u8; 32])),
                }),
                // A hash no secret has: HMAC output is never all zero bytes in practice.
                secret_hash: Some(hex::encode([0u8; 32])),
                psk: None,
                frame_key: None,
                generation: 0,
                created_unix: 0,
                updated_unix: 0,
            }),
        }
    }

    pub fn policies(&self) -> Arc<Policies> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swap in the policies of a reloaded configuration.
    pub fn set_policies(&self, policies: Arc<Policies>) {
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = policies;
    }

    /// The ACL a live session should now have (after a reload), or `None` when its
    /// group no longer exists.
    pub fn current_acl(&self, principal: &PrincipalRef) -> Option<Arc<Acl>> {
        let policies = self.policies();
        let group = policies.group(principal.kind, &principal.group)?;
        group
            .acl
            .expand(&principal.id, &principal.group)
            .ok()
            .map(Arc::new)
    }

    /// Does a certificate a session connected with still verify under the current
    /// trust anchors and revocation lists?
    pub fn certificate_still_valid(
        &self,
        principal: &PrincipalRef,
        chain: &[CertificateDer<'static>],
    ) -> bool {
        let policies = self.policies();
        let Some(verifier) = policies
            .group(principal.kind, &principal.group)
            .and_then(|g| g.verifier.clone())
        else {
            return false;
        };
        let Some((end_entity, intermediates)) = chain.split_first() else {
            return false;
        };
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .is_ok()
    }

    /// Back-off check alone: is this source, or this id from it, backed off?
    pub fn check_source(&self, source: IpAddr, id: &str, now: Instant) -> Result<(), BackedOff> {
        self.guard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .check(source, id, now)
    }

    pub fn authenticate(
        &self,
        kind: PrincipalKind,
        creds: &Credentials<'_>,
        source: IpAddr,
        now: Instant,
    ) -> Result<Authenticated, AuthRefusal> {
        if self.check_source(source, creds.id, now).is_err() {
            return Err(AuthRefusal::BackedOff);
        }
        // A source banned after its connection was accepted is refused here.
        if self.source_ban(source).is_some() {
            return Err(AuthRefusal::Banned);
        }
        let result = self.verify(kind, creds);
        let mut guard = self.guard.lock().unwrap_or_else(|p| p.into_inner());
        // Success clears only its own (id, source) record: one valid credential must
        // not let a source reset its back-off between guesses at others.
        match &result {
            Ok(_) => guard.record_success(source, creds.id),
            Err(_) => guard.record_failure(source, creds.id, now),
        }
        result
    }

    /// A login the adapter refused before asking (it broke its protocol's rules, e.g.
    /// MQTT's user name = client id): counted against the source's back-off like any
    /// failure. Returns the refusal to report (`BackedOff` if the source already is).
    pub fn refuse_early(
        &self,
        id: &str,
        refusal: AuthRefusal,
        source: IpAddr,
        now: Instant,
    ) -> AuthRefusal {
        if self.check_source(source, id, now).is_err() {
            return AuthRefusal::BackedOff;
        }
        self.guard
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record_failure(source, id, now);
        refusal
    }

    /// A refused login, for the alert on failed logins naming a registered id. An
    /// unknown id is tallied the same way (the same work), never alerted on.
    pub fn note_failure(
        &self,
        client_id: &str,
        refusal: AuthRefusal,
        source: IpAddr,
        now: Instant,
    ) -> Option<Alert> {
        let registered = refusal.is_credential_failure();
        if !registered && refusal != AuthRefusal::Unknown {
            return None;
        }
        self.alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(
                client_id,
                SourceKey::new(source, self.ipv6_prefix),
                registered,
                now,
            )
    }

    fn verify(
        &self,
        kind: PrincipalKind,
        creds: &Credentials<'_>,
    ) -> Result<Authenticated, AuthRefusal> {
        let snapshot = self.registry.snapshot();
        let id = PrincipalId::parse(creds.id);
        let found = id
            .as_ref()
            .ok()
            .and_then(|id| snapshot.get(kind, id))
            .cloned();
        let known = found.is_some();
        // Equal work whether or not the id exists: an unknown id is read, its group
        // looked up, its hash decoded and verified against, through a stand-in record;
        // a certificate is always verified (against the group's CAs, or for an unknown
        // id against every CA of this kind), before any answer is decided.
        let stand_in = found.unwrap_or_else(|| self.dummy.clone());
        let policies = self.policies();
        let policy = policies.group(kind, &stand_in.group).cloned();
        let secret_ok = creds.secret().map(|password| {
            let stored = stand_in.secret_hash_bytes();
            self.hasher.verify(password, stored.as_ref()) && known
        });
        let record = known.then_some(stand_in);
        let policy = policy.filter(|_| known);
        let cert =
            creds
                .certs()
                .and_then(|c| c.split_first())
                .map(|(end_entity, intermediates)| {
                    // A group without CAs refuses every certificate, but only after the
                    // same verification an unknown id gets.
                    let verifier = policy
                        .as_ref()
                        .and_then(|p| p.verifier.clone())
                        .or_else(|| policies.any_verifier(kind));
                    let identity = policy.as_ref().map_or(IdentityField::Cn, |p| p.identity);
                    self.check_certificate(verifier, identity, end_entity, intermediates, creds.id)
                });
        let id = id.map_err(|_| AuthRefusal::BadClientId)?;
        let record = record.ok_or(AuthRefusal::Unknown)?;
        // The adapter proved the key (only a registered key can be used there); the
        // record must still hold one of that kind now.
        let keyed = creds.keyed();
        let key_held = match keyed {
            Some(KeyPurpose::Psk) => record.psk.is_some(),
            Some(KeyPurpose::FrameKey) => record.frame_key.is_some(),
            None => true,
        };
        if !key_held {
            return Err(AuthRefusal::CredentialNotRegistered);
        }
        let policy = policy.ok_or(AuthRefusal::NoGroup)?;
        let fingerprint_seen = match cert {
            None => None,
            Some(result) => {
                let pinned = record.cert.as_ref().ok_or(AuthRefusal::CertNotAllowed)?;
                let fp = result?;
                if policy.verifier.is_none() {
                    return Err(AuthRefusal::CertUntrusted);
                }
                if pinned
                    .fingerprint
                    .as_ref()
                    .is_some_and(|expected| !expected.eq_ignore_ascii_case(&fp))
                {
                    return Err(AuthRefusal::CertNotPinned);
                }
                Some(fp)
            }
        };
        let method = match (&fingerprint_seen, secret_ok) {
            (None, None) => match keyed {
                Some(KeyPurpose::Psk) => "psk",
                Some(KeyPurpose::FrameKey) => "frame_key",
                None => return Err(AuthRefusal::NoCredential),
            },
            (_, Some(false)) if record.secret_hash.is_none() => {
                return Err(AuthRefusal::SecretNotAllowed);
            }
            (_, Some(false)) => return Err(AuthRefusal::BadSecret),
            (Some(_), Some(true)) => "certificate+secret",
            (Some(_), None) => "certificate",
            (None, Some(true)) => "secret",
        };
        if !record.enabled {
            return Err(AuthRefusal::Disabled);
        }
        if self
            .registry
            .bans()
            .principal(kind, &record.id, crate::registry::now_unix())
            .is_some()
        {
            return Err(AuthRefusal::Banned);
        }
        let acl = policy
            .acl
            .expand(&record.id, &record.group)
            .map_err(|_| AuthRefusal::NoGroup)?;
        Ok(Authenticated {
            principal: PrincipalRef {
                kind,
                id,
                group: record.group.clone(),
            },
            generation: record.generation,
            method,
            cert_fingerprint: fingerprint_seen,
            acl: Arc::new(acl),
            policy,
        })
    }

    /// Chain, identity and fingerprint of a presented certificate.
    fn check_certificate(
        &self,
        verifier: Option<Arc<dyn ClientCertVerifier>>,
        identity: IdentityField,
        end_entity: &CertificateDer<'static>,
        intermediates: &[CertificateDer<'static>],
        client_id: &str,
    ) -> Result<String, AuthRefusal> {
        let verifier = verifier.ok_or(AuthRefusal::CertUntrusted)?;
        verifier
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|_| AuthRefusal::CertUntrusted)?;
        let claimed =
            cert_identity(end_entity, identity).ok_or(AuthRefusal::CertIdentityMismatch)?;
        if claimed != client_id {
            return Err(AuthRefusal::CertIdentityMismatch);
        }
        Ok(fingerprint(end_entity))
    }

    /// The active ban on a source address, if any: checked before anything is read.
    pub fn source_ban(&self, ip: IpAddr) -> Option<String> {
        self.registry
            .bans()
            .source(ip, crate::registry::now_unix())
            .map(|b| format!("{} ({})", b.target, b.reason))
    }

    /// The group of a registered principal.
    pub fn group_of(&self, kind: PrincipalKind, id: &PrincipalId) -> Option<GroupName> {
        self.registry
            .snapshot()
            .get(kind, id)
            .map(|r| r.group.clone())
    }

    /// When the principal was registered (0 if it no longer is).
    pub fn registered_since(&self, principal: &PrincipalRef) -> u64 {
        self.registry
            .snapshot()
            .get(principal.kind, &principal.id)
            .map_or(0, |r| r.created_unix)
    }

    /// Is an authenticated session still what the registry says? (For the window
    /// between authentication and the session being registered for kicks.)
    pub fn still_current(&self, principal: &PrincipalRef, generation: u64) -> bool {
        let banned = self
            .registry
            .bans()
            .principal(principal.kind, &principal.id, crate::registry::now_unix())
            .is_some();
        !banned
            && self
                .registry
                .snapshot()
                .get(principal.kind, &principal.id)
                .is_some_and(|r| {
                    r.enabled && r.generation == generation && r.group == principal.group
                })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn setup() -> (tempfile::TempDir, Authenticator, Arc<Registry>) {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(
            Registry::open(
                &dir.path().join("r.redb"),
                crate::record::RecordSealer::derive(&[5; 32]),
            )
            .unwrap(),
        );
        let mut config = Config::default();
        for g in config.device_groups.values_mut() {
            g.trust.clear();
        }
        config.service_groups.clear();
        let policies = Arc::new(Policies::from_config(&config).unwrap());
        let hasher = SecretHasher::from_key([9; 32]);
        registry
            .add(PrincipalRecord {
                kind: PrincipalKind::Device,
                id: PrincipalId::parse("meter-1").unwrap(),
                group: GroupName::parse("default").unwrap(),
                enabled: true,
                cert: None,
                secret_hash: Some(hex::encode(hasher.hash(SECRET))),
                psk: None,
                frame_key: None,
                generation: 3,
                created_unix: 0,
                updated_unix: 0,
            })
            .unwrap();
        let auth = Authenticator::new(
            registry.clone(),
            hasher,
            policies,
            BackoffPolicy {
                max_failures: 2,
                window: Duration::from_secs(60),
                initial: Duration::from_secs(10),
                max: Duration::from_secs(60),
                forget: Duration::from_secs(3600),
                source_max_ids: 3,
                source_max_failures: 100,
                max_entries: 1000,
                ipv6_prefix: 64,
                alert_failures: 10,
            },
        );
        (dir, auth, registry)
    }

    fn creds<'a>(id: &'a str, pass: &'a [u8]) -> Credentials<'a> {
        Credentials {
            id,
            presented: vec![Credential::Secret(pass)],
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, n])
    }

    #[test]
    fn right_secret_authenticates_with_acl_and_generation() {
        let (_d, auth, _) = setup();
        let ok = auth
            .authenticate(
                PrincipalKind::Device,
                &creds("meter-1", SECRET),
                ip(1),
                Instant::now(),
            )
            .unwrap();
        assert_eq!(ok.principal.id.as_str(), "meter-1");
        assert_eq!(ok.generation, 3);
        assert_eq!(ok.method, "secret");
    }

    #[test]
    fn a_login_the_adapter_refused_early_counts_towards_the_back_off() {
        let (_d, auth, _) = setup();
        let now = Instant::now();
        let mut last = None;
        for _ in 0..10 {
            last = Some(auth.refuse_early("meter-1", AuthRefusal::UsernameMismatch, ip(9), now));
        }
        assert_eq!(last, Some(AuthRefusal::BackedOff));
        // The right secret from that source is backed off too, until the back-off ends.
        assert_eq!(
            auth.authenticate(PrincipalKind::Device, &creds("meter-1", SECRET), ip(9), now)
                .unwrap_err(),
            AuthRefusal::BackedOff
        );
    }

    #[test]
    fn each_refusal_has_its_own_reason() {
        let (_d, auth, registry) = setup();
        let now = Instant::now();
        let check = |c: Credentials<'_>, n: u8| {
            auth.authenticate(PrincipalKind::Device, &c, ip(n), now)
                .unwrap_err()
        };
        assert_eq!(check(creds("ghost", SECRET), 1), AuthRefusal::Unknown);
        assert_eq!(
            check(creds("meter-1", b"wrong-wrong-wrong"), 2),
            AuthRefusal::BadSecret
        );
        // A key the record does not hold (a DTLS pre-shared key, a serial frame key).
        let psk = Credentials {
            id: "meter-1",
            presented: vec![Credential::PreSharedKey],
        };
        assert_eq!(check(psk, 3), AuthRefusal::CredentialNotRegistered);
        // Once it holds one, the handshake's proof is a credential like any other.
        let master = crate::device_key::MasterKeys::from_keys(&[[4; 32]]);
        let meter = PrincipalId::parse("meter-1").unwrap();
        let sealed = master
            .seal(
                PrincipalKind::Device,
                &meter,
                KeyPurpose::Psk,
                b"a-pre-shared-key-16+",
            )
            .unwrap();
        registry
            .rotate(PrincipalKind::Device, &meter, None, None, Some(sealed))
            .unwrap();
        let psk = Credentials {
            id: "meter-1",
            presented: vec![Credential::PreSharedKey],
        };
        let ok = auth
            .authenticate(PrincipalKind::Device, &psk, ip(9), now)
            .unwrap();
        assert_eq!(ok.method, "psk");
        assert_eq!(check(creds("a/b", SECRET), 4), AuthRefusal::BadClientId);
        let none = Credentials {
            id: "meter-1",
            ..Default::default()
        };
        assert_eq!(check(none, 5), AuthRefusal::NoCredential);
        // A service by the same name does not exist: kinds are separate namespaces.
        assert_eq!(
            auth.authenticate(
                PrincipalKind::Service,
                &creds("meter-1", SECRET),
                ip(6),
                now
            )
            .unwrap_err(),
            AuthRefusal::Unknown
        );
        registry
            .set_enabled(
                PrincipalKind::Device,
                &PrincipalId::parse("meter-1").unwrap(),
                false,
            )
            .unwrap();
        assert_eq!(check(creds("meter-1", SECRET), 7), AuthRefusal::Disabled);
    }

    #[test]
    fn a_valid_login_does_not_reset_the_back_off_of_its_source() {
        let (_d, auth, _) = setup();
        let now = Instant::now();
        let attempt = |id: &str, pass: &[u8]| {
            auth.authenticate(PrincipalKind::Device, &creds(id, pass), ip(1), now)
        };
        // Guesses at other ids, a valid login between them: the source's count of
        // distinct ids goes on, and the third id backs the source off.
        assert!(attempt("ghost-1", SECRET).is_err());
        assert!(attempt("meter-1", SECRET).is_ok());
        assert!(attempt("ghost-2", SECRET).is_err());
        assert!(attempt("meter-1", SECRET).is_ok());
        assert!(attempt("ghost-3", SECRET).is_err());
        assert_eq!(
            attempt("meter-1", SECRET).unwrap_err(),
            AuthRefusal::BackedOff
        );
    }

    #[test]
    fn a_valid_login_clears_its_own_failures() {
        let (_d, auth, _) = setup();
        let now = Instant::now();
        let attempt = |pass: &[u8]| {
            auth.authenticate(PrincipalKind::Device, &creds("meter-1", pass), ip(1), now)
        };
        assert!(attempt(b"wrong-wrong-wrong").is_err());
        assert!(attempt(SECRET).is_ok());
        assert!(attempt(b"wrong-wrong-wrong").is_err());
        assert!(attempt(SECRET).is_ok());
    }

    #[test]
    fn a_backed_off_source_is_refused_before_its_credential_is_checked() {
        let (_d, auth, _) = setup();
        let now = Instant::now();
        for _ in 0..2 {
            let _ = auth.authenticate(
                PrincipalKind::Device,
                &creds("meter-1", b"wrong-wrong-wrong"),
                ip(1),
                now,
            );
        }
        let refused =
            auth.authenticate(PrincipalKind::Device, &creds("meter-1", SECRET), ip(1), now);
        assert_eq!(refused.unwrap_err(), AuthRefusal::BackedOff);
        let elsewhere =
            auth.authenticate(PrincipalKind::Device, &creds("meter-1", SECRET), ip(2), now);
        assert!(elsewhere.is_ok());
        let later = now + Duration::from_secs(11);
        assert!(
            auth.authenticate(
                PrincipalKind::Device,
                &creds("meter-1", SECRET),
                ip(1),
                later
            )
            .is_ok()
        );
    }
}
