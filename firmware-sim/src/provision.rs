//! Credentials for a fleet: certificates signed by a CA the gateway trusts, random
//! secrets, and registration through the gateway's CLI (`device|service import`).

use crate::scenario::{Credential, Group, Kind, Provision, ProvisionMode, Scenario};
use anyhow::{Context, Result, anyhow, bail};
use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls_pki_types::pem::PemObject;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// What a member presents.
pub enum Secret {
    Certificate {
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    },
    Password(String),
    /// A DTLS pre-shared key (CoAP), its identity the member's id.
    Psk(String),
    /// A serial frame key: 32 bytes.
    SerialKey(Vec<u8>),
    None,
}

/// A CA that can sign client certificates.
pub struct Issuer {
    cert_pem: String,
    ca: rcgen::Issuer<'static, KeyPair>,
}

impl Issuer {
    /// Load a CA certificate and its PKCS#8 key (as `portcullis pki init` writes them).
    pub fn load(cert: &Path, key: &Path) -> Result<Issuer> {
        let cert_pem =
            std::fs::read_to_string(cert).with_context(|| format!("reading {}", cert.display()))?;
        let key_pem =
            std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
        let key = KeyPair::from_pem(&key_pem)
            .with_context(|| format!("{}: not a PKCS#8 PEM private key", key.display()))?;
        // The issuer's subject and key identifier are read from the certificate, so
        // what it signs chains to it.
        let ca = rcgen::Issuer::from_ca_cert_pem(&cert_pem, key)
            .with_context(|| format!("{}: not a CA certificate", cert.display()))?;
        Ok(Issuer { cert_pem, ca })
    }

    /// A new CA (for benchmarks: the gateway under test is configured to trust it).
    pub fn generate(common_name: &str) -> Result<Issuer> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert_pem = params.self_signed(&key)?.pem();
        Ok(Issuer {
            cert_pem,
            ca: rcgen::Issuer::new(params, key),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.ca.key().serialize_pem()
    }

    /// A client certificate with `cn` as its common name: (certificate PEM, key PEM).
    pub fn issue(&self, cn: &str) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.ca)
            .with_context(|| format!("signing a certificate for {cn:?}"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A server certificate for `localhost` and 127.0.0.1: (certificate PEM, key PEM).
    pub fn issue_server(&self) -> Result<(String, String)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(vec!["localhost".to_string()])?;
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.ca)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A certificate and key in PEM form, as rustls wants them.
pub fn identity(cert_pem: &str, key_pem: &str) -> Result<Secret> {
    let chain =
        CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    Ok(Secret::Certificate { chain, key })
}

pub fn random_secret() -> String {
    let mut bytes = [0u8; 16];
    // The system's random source failing is not something a simulator can go on from.
    getrandom::fill(&mut bytes).expect("the system's random source");
    hex::encode(bytes)
}

/// Write a new file only its owner may read (a stale one is replaced, never reused
/// with its old mode, and a symbolic link is not followed).
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    let _ = std::fs::remove_file(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// Credentials of every member of every group, by group index then member (n - 1).
pub struct Fleet {
    pub secrets: Vec<Vec<Secret>>,
}

/// Make (or, with mode `none`, read) the credentials, and register the principals.
pub fn prepare(s: &Scenario) -> Result<Fleet> {
    let p = &s.provision;
    std::fs::create_dir_all(&p.dir).with_context(|| format!("creating {}", p.dir.display()))?;
    let needs_certs = s
        .groups
        .iter()
        .any(|g| g.credential() == Credential::Certificate);
    let issuer = match (p.mode, needs_certs) {
        (ProvisionMode::Cli, true) => {
            let (Some(cert), Some(key)) = (&p.ca_cert, &p.ca_key) else {
                bail!("[provision] ca_cert and ca_key are needed to issue certificates");
            };
            Some(Issuer::load(cert, key)?)
        }
        _ => None,
    };
    let prepared_secrets = match p.mode {
        ProvisionMode::None => read_secrets(&p.dir.join("secrets.toml"))?,
        ProvisionMode::Cli => HashMap::new(),
    };
    let mut fleet = Fleet {
        secrets: Vec::new(),
    };
    for g in &s.groups {
        let mut members = Vec::with_capacity(g.count);
        let mut entries = String::new();
        for n in 1..=g.count {
            let id = g.id(n);
            let secret = match (g.credential(), &issuer) {
                (Credential::Certificate, Some(ca)) => {
                    let (cert, key) = ca.issue(&id)?;
                    entries.push_str(&format!(
                        "[[principal]]\nid = {id:?}\ngroup = {:?}\ncert_any = true\n",
                        g.gateway_group
                    ));
                    identity(&cert, &key)?
                }
                (Credential::Certificate, None) => {
                    let cert = p.dir.join(format!("{id}.pem"));
                    let key = p.dir.join(format!("{id}.key"));
                    Secret::Certificate {
                        chain: crate::transport::read_certs(&cert)?,
                        key: crate::transport::read_key(&key)?,
                    }
                }
                (Credential::Secret, _) => {
                    let secret = match p.mode {
                        ProvisionMode::Cli => random_secret(),
                        ProvisionMode::None => prepared_secrets
                            .get(&id)
                            .cloned()
                            .ok_or_else(|| anyhow!("no secret for {id:?} in secrets.toml"))?,
                    };
                    entries.push_str(&format!(
                        "[[principal]]\nid = {id:?}\ngroup = {:?}\nsecret = {secret:?}\n",
                        g.gateway_group
                    ));
                    Secret::Password(secret)
                }
                (Credential::Psk, _) => {
                    // 32 characters: within the gateway's 16–64 bytes.
                    let psk = match p.mode {
                        ProvisionMode::Cli => random_secret(),
                        ProvisionMode::None => prepared_secrets
                            .get(&id)
                            .cloned()
                            .ok_or_else(|| anyhow!("no key for {id:?} in secrets.toml"))?,
                    };
                    entries.push_str(&format!(
                        "[[principal]]\nid = {id:?}\ngroup = {:?}\npsk = {psk:?}\n",
                        g.gateway_group
                    ));
                    Secret::Psk(psk)
                }
                (Credential::SerialKey, _) => {
                    let key = match p.mode {
                        ProvisionMode::Cli => {
                            let mut key = vec![0u8; 32];
                            getrandom::fill(&mut key).expect("the system's random source");
                            key
                        }
                        ProvisionMode::None => prepared_secrets
                            .get(&id)
                            .map(|k| hex::decode(k.trim()))
                            .transpose()
                            .ok()
                            .flatten()
                            .filter(|k| k.len() == 32)
                            .ok_or_else(|| {
                                anyhow!("no serial key (64 hex digits) for {id:?} in secrets.toml")
                            })?,
                    };
                    entries.push_str(&format!(
                        "[[principal]]\nid = {id:?}\ngroup = {:?}\nserial_key = {:?}\n",
                        g.gateway_group,
                        hex::encode(&key)
                    ));
                    Secret::SerialKey(key)
                }
                (Credential::None, _) => Secret::None,
            };
            members.push(secret);
        }
        if p.mode == ProvisionMode::Cli && !entries.is_empty() {
            register(p, g, &entries)?;
        }
        fleet.secrets.push(members);
    }
    Ok(fleet)
}

fn read_secrets(path: &Path) -> Result<HashMap<String, String>> {
    if !path.exists() {
        return Ok(HashMap::new());
    }
    let text = std::fs::read_to_string(path)?;
    toml::from_str(&text)
        .with_context(|| format!("{}: expected id = \"secret\" lines", path.display()))
}

/// `portcullis device|service import FILE --config CONFIG`.
fn register(p: &Provision, g: &Group, entries: &str) -> Result<()> {
    let file: PathBuf = p.dir.join(format!("import-{}.toml", g.name));
    write_private(&file, entries)?;
    let kind = match g.kind {
        Kind::Device => "device",
        Kind::Service => "service",
    };
    let mut cmd = Command::new(&p.portcullis);
    cmd.args([kind, "import"]).arg(&file);
    if let Some(config) = &p.config {
        cmd.arg("--config").arg(config);
    }
    let out = cmd.output();
    // The import file holds secrets in clear text: gone as soon as it is read, or
    // could not be.
    let _ = std::fs::remove_file(&file);
    let out = out.with_context(|| format!("running {}", p.portcullis.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let hint = if why.contains("already exists") {
            " (registered by an earlier run: use a fresh data dir or another id_prefix)"
        } else {
            ""
        };
        bail!(
            "registering group {:?} with `{} {kind} import` failed: {}{hint}",
            g.name,
            p.portcullis.display(),
            why.trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_chain_to_a_loaded_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Issuer::generate("Test CA").unwrap();
        let (cp, kp) = (dir.path().join("ca.pem"), dir.path().join("ca.key"));
        std::fs::write(&cp, ca.cert_pem()).unwrap();
        std::fs::write(&kp, ca.key_pem()).unwrap();
        let loaded = Issuer::load(&cp, &kp).unwrap();
        let (cert, _key) = loaded.issue("dev-7").unwrap();
        // The original certificate (not the re-signed copy) verifies the new one.
        let roots = crate::transport::roots(&cp).unwrap();
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots,
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&chain[0], &[], rustls::pki_types::UnixTime::now())
            .expect("chains to the CA");
    }
}
