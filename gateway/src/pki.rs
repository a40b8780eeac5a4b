//! Development PKI: a throw-away certificate authority, a server certificate
//! and client certificates, so a new user can try mutual TLS in a minute.
//!
//! This module owns the on-disk layout of that PKI (see [`PkiPaths`]):
//!
//! ```text
//! <dir>/ca.pem               CA certificate (trust anchor for servers and clients)
//! <dir>/ca.key               CA private key, PKCS#8 PEM, mode 0600
//! <dir>/server.pem           server certificate (leaf only)
//! <dir>/server.key           server private key, mode 0600
//! <dir>/clients/<name>.pem   client certificate for <name>
//! <dir>/clients/<name>.key   client private key, mode 0600
//! ```
//!
//! It backs `portcullis pki init`, `portcullis pki issue NAME`, and
//! `portcullis serve` without a config (via [`ensure_dev_pki`]).
//!
//! **For development only.** The CA key sits unencrypted next to the
//! certificates it signs, there is no revocation, and nothing here is meant to
//! protect a production deployment. Use a real CA for that.
//!
//! Keys are ECDSA P-256. Existing keys are never overwritten, except for a
//! client certificate re-issued with `overwrite = true`. Directories are created
//! with mode 0700 and key files with mode 0600.
//!
//! To sign with a CA created earlier, the CA is reloaded from `ca.key` and its
//! parameters are rebuilt deterministically (the subject name is fixed), then
//! checked byte for byte against the subject and public key in `ca.pem`; only a
//! CA created by [`init`] can therefore sign.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{Error as PemError, PemObject};
use sha2::{Digest, Sha256};

/// Subject common name of the development CA.
const CA_COMMON_NAME: &str = "Portcullis development CA";
/// Subject organization of every certificate issued here.
const ORGANIZATION: &str = "Portcullis (development only)";
/// Subject common name of the server certificate.
const SERVER_COMMON_NAME: &str = "localhost";
/// Prefix of the URI subject alternative name of client certificates.
const CLIENT_URI_PREFIX: &str = "urn:portcullis:";
/// Longest accepted client name.
const CLIENT_NAME_MAX_LEN: usize = 64;

/// Certificates are valid from one hour ago, to tolerate small clock skew.
const BACKDATE: Duration = Duration::from_secs(60 * 60);
/// About ten years.
const CA_LIFETIME: Duration = Duration::from_secs(3653 * 24 * 60 * 60);
/// One year.
const LEAF_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);

const DIR_MODE: u32 = 0o700;
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

const PEM_CERT_BEGIN: &str = "-----BEGIN CERTIFICATE-----";

/// Where the development PKI lives on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PkiPaths {
    /// Directory holding the PKI, e.g. `./data/pki`.
    pub dir: PathBuf,
}

impl PkiPaths {
    /// Layout rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `dir/ca.pem`: the CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// `dir/ca.key`: the CA private key (mode 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// `dir/server.pem`: the server certificate (leaf only, no chain).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    /// `dir/server.key`: the server private key (mode 0600).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// `dir/clients/{name}.pem`: the certificate of client `name`.
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.clients_dir().join(format!("{name}.pem"))
    }

    /// `dir/clients/{name}.key`: the private key of client `name` (mode 0600).
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.clients_dir().join(format!("{name}.key"))
    }

    fn clients_dir(&self) -> PathBuf {
        self.dir.join("clients")
    }
}

/// A certificate written by [`issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issued {
    /// Path of the PEM certificate.
    pub cert: PathBuf,
    /// Path of the PKCS#8 PEM private key (mode 0600).
    pub key: PathBuf,
    /// Lowercase hex SHA-256 over the DER certificate.
    pub fingerprint_sha256: String,
}

/// Create CA + server certificate. Errors (anyhow, with the path) if a CA already exists in dir
/// (never overwrite keys). Server cert SANs: DNS "localhost", IP 127.0.0.1, IP ::1, plus `extra_names`
/// (each either an IP literal or a DNS name).
pub fn init(paths: &PkiPaths, extra_names: &[String]) -> Result<()> {
    // Validate everything before touching the disk.
    let sans = server_sans(extra_names)?;
    for path in [paths.ca_cert(), paths.ca_key()] {
        if exists(&path)? {
            bail!(
                "a development CA already exists: {} is present; refusing to overwrite it \
                 (remove {} to start over)",
                path.display(),
                paths.dir.display()
            );
        }
    }
    for path in [paths.server_cert(), paths.server_key()] {
        if exists(&path)? {
            bail!(
                "{} already exists although there is no CA next to it; refusing to overwrite it",
                path.display()
            );
        }
    }

    let ca_key = generate_key()?;
    let ca_params = ca_params()?;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .context("self-signing the development CA certificate")?;
    let ca = Issuer::from_params(&ca_params, &ca_key);

    let server_key = generate_key()?;
    let server_cert = server_params(sans)?
        .signed_by(&server_key, &ca)
        .context("signing the development server certificate")?;

    create_private_dir(&paths.dir)?;
    let (ca_key_pem, ca_pem) = (ca_key.serialize_pem(), ca_cert.pem());
    let (server_key_pem, server_pem) = (server_key.serialize_pem(), server_cert.pem());
    write_files(
        &[
            NewFile::key(paths.ca_key(), &ca_key_pem),
            NewFile::cert(paths.ca_cert(), &ca_pem),
            NewFile::key(paths.server_key(), &server_key_pem),
            NewFile::cert(paths.server_cert(), &server_pem),
        ],
        false,
    )
}

/// For `serve` on its embedded default: if dir has no CA, run init(paths, &[]) and return Ok(true); if
/// CA, CA key, server cert and server key all exist, Ok(false); if only some exist, an error naming
/// what is missing (do not silently regenerate half a PKI).
pub fn ensure_dev_pki(paths: &PkiPaths) -> Result<bool> {
    let mut present = Vec::new();
    let mut missing = Vec::new();
    for path in [
        paths.ca_cert(),
        paths.ca_key(),
        paths.server_cert(),
        paths.server_key(),
    ] {
        if exists(&path)? {
            present.push(path);
        } else {
            missing.push(path);
        }
    }
    if missing.is_empty() {
        return Ok(false);
    }
    if present.is_empty() {
        init(paths, &[])?;
        return Ok(true);
    }
    bail!(
        "incomplete development PKI in {}: missing {}; present {}. Refusing to regenerate part \
         of it: restore the missing files, or remove {} to create a new PKI",
        paths.dir.display(),
        display_list(&missing),
        display_list(&present),
        paths.dir.display()
    )
}

/// Issue a client certificate for `name` signed by the dev CA: CN = name, a SAN URI
/// `urn:portcullis:{name}`, EKU clientAuth, not a CA. Refuse if the name does not match
/// `[A-Za-z0-9._-]{1,64}` (error message says which character/length is wrong) or if the
/// files already exist (unless overwrite is true — used by `rotate` workflows).
pub fn issue(paths: &PkiPaths, name: &str, overwrite: bool) -> Result<Issued> {
    validate_client_name(name)?;
    let ca = load_ca(paths)?;

    let cert_path = paths.client_cert(name);
    let key_path = paths.client_key(name);
    if !overwrite {
        for path in [&cert_path, &key_path] {
            if exists(path)? {
                bail!(
                    "{} already exists: client {name:?} has already been issued; refusing to \
                     overwrite it",
                    path.display()
                );
            }
        }
    }

    let key = generate_key()?;
    let cert = client_params(name)?
        .signed_by(&key, &Issuer::from_params(&ca.params, &ca.key))
        .with_context(|| format!("signing the client certificate for {name:?}"))?;

    create_private_dir(&paths.clients_dir())?;
    let (key_pem, cert_pem) = (key.serialize_pem(), cert.pem());
    write_files(
        &[
            NewFile::key(key_path.clone(), &key_pem),
            NewFile::cert(cert_path.clone(), &cert_pem),
        ],
        overwrite,
    )?;
    Ok(Issued {
        cert: cert_path,
        key: key_path,
        fingerprint_sha256: sha256_hex(cert.der()),
    })
}

/// SHA-256 fingerprint (lowercase hex) of the first certificate in a PEM file.
pub fn fingerprint_pem_file(path: &Path) -> Result<String> {
    Ok(sha256_hex(&read_first_cert_der(path)?))
}

// ---------------------------------------------------------------------------
// Certificate parameters

fn generate_key() -> Result<KeyPair> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).context("generating an ECDSA P-256 key")
}

/// Deterministic CA parameters: [`load_ca`] relies on rebuilding the exact
/// same subject name from them.
fn ca_params() -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(CA_COMMON_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, CA_LIFETIME)?;
    Ok(params)
}

fn server_params(sans: Vec<SanType>) -> Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(SERVER_COMMON_NAME);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_LIFETIME)?;
    Ok(params)
}

fn client_params(name: &str) -> Result<CertificateParams> {
    let uri = format!("{CLIENT_URI_PREFIX}{name}");
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    params.subject_alt_names =
        vec![SanType::URI(uri.as_str().try_into().map_err(|e| {
            anyhow!("client URI {uri:?} is not ASCII: {e}")
        })?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params, LEAF_LIFETIME)?;
    Ok(params)
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, ORGANIZATION);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Valid from one hour ago until `lifetime` from now, in whole seconds.
fn set_validity(params: &mut CertificateParams, lifetime: Duration) -> Result<()> {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| anyhow!("the system clock is set before 1970; cannot date certificates"))?;
    // `date_time_ymd` + `std::time::Duration` yields rcgen's date type without
    // depending on the `time` crate directly.
    let now = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(since_epoch.as_secs());
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    Ok(())
}

/// Server SANs: localhost, 127.0.0.1, ::1, then `extra_names` (deduplicated).
fn server_sans(extra_names: &[String]) -> Result<Vec<SanType>> {
    let mut sans = vec![
        SanType::DnsName(
            SERVER_COMMON_NAME
                .try_into()
                .map_err(|e| anyhow!("{SERVER_COMMON_NAME:?}: {e}"))?,
        ),
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    for name in extra_names {
        let san = parse_server_name(name)?;
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

/// An IP literal (IPv6 optionally in brackets) or a DNS name (`*.` wildcard allowed).
fn parse_server_name(name: &str) -> Result<SanType> {
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = unbracketed.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = |why: String| anyhow!("invalid server name {name:?}: {why}");
    if name.is_empty() {
        return Err(invalid("it is empty".into()));
    }
    if name.len() > 253 {
        return Err(invalid(format!(
            "it is {} characters long, at most 253 are allowed",
            name.len()
        )));
    }
    for (i, label) in name.split('.').enumerate() {
        if label.is_empty() {
            return Err(invalid(
                "it has an empty label (leading, trailing or double '.')".into(),
            ));
        }
        if label.len() > 63 {
            return Err(invalid(format!(
                "label {label:?} is longer than 63 characters"
            )));
        }
        if i == 0 && label == "*" {
            continue;
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(invalid(format!(
                "character {c:?} is not allowed; use an IP address or a DNS name made of \
                 A-Z a-z 0-9 - _ and '.'"
            )));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid(format!("label {label:?} starts or ends with '-'")));
        }
    }
    let dns = name
        .try_into()
        .map_err(|e| invalid(format!("not an IA5 string: {e}")))?;
    Ok(SanType::DnsName(dns))
}

/// `[A-Za-z0-9._-]{1,64}`, with an error saying what is wrong.
fn validate_client_name(name: &str) -> Result<()> {
    ensure!(
        !name.is_empty(),
        "invalid client name: it is empty; use 1 to {CLIENT_NAME_MAX_LEN} characters from \
         A-Z a-z 0-9 . _ -"
    );
    if let Some((pos, c)) = name
        .chars()
        .enumerate()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        bail!(
            "invalid client name {name:?}: character {c:?} at position {} is not allowed; use \
             only A-Z a-z 0-9 . _ -",
            pos + 1
        );
    }
    // All characters are ASCII here, so bytes == characters.
    ensure!(
        name.len() <= CLIENT_NAME_MAX_LEN,
        "invalid client name {name:?}: it is {} characters long, at most {CLIENT_NAME_MAX_LEN} \
         are allowed",
        name.len()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Reloading the CA

/// The development CA, reloaded from disk, ready to sign.
struct DevCa {
    /// The CA's deterministic [`ca_params`]: only its subject name and key
    /// identifier method matter to rcgen when signing (issuer name, AKI).
    params: CertificateParams,
    key: KeyPair,
}

/// The CA is rebuilt from its deterministic parameters and the key in `ca.key`,
/// then the rebuilt subject name and public key are checked byte for byte
/// against `ca.pem` (parsed by x509-parser), so that what is issued always
/// chains to the `ca.pem` that clients and servers trust.
fn load_ca(paths: &PkiPaths) -> Result<DevCa> {
    let cert_path = paths.ca_cert();
    let key_path = paths.ca_key();
    for path in [&cert_path, &key_path] {
        if !exists(path)? {
            bail!(
                "{} not found: there is no development CA in {}; run `portcullis pki init` first",
                path.display(),
                paths.dir.display()
            );
        }
    }

    let key_pem = fs::read_to_string(&key_path)
        .with_context(|| format!("reading the CA key {}", key_path.display()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| {
        anyhow!(
            "{}: not a PKCS#8 PEM private key that can sign: {e}",
            key_path.display()
        )
    })?;

    let on_disk = read_first_cert_der(&cert_path)?;
    let (subject, spki) = subject_and_spki(&on_disk).ok_or_else(|| {
        anyhow!(
            "{}: cannot find the subject and public key in the certificate",
            cert_path.display()
        )
    })?;

    let params = ca_params()?;
    let cert = params
        .self_signed(&key)
        .with_context(|| format!("rebuilding the CA certificate with {}", key_path.display()))?;
    let (want_subject, want_spki) = subject_and_spki(cert.der())
        .ok_or_else(|| anyhow!("internal error: cannot parse the rebuilt CA certificate"))?;

    ensure!(
        spki == want_spki,
        "{} does not belong to {}: the key's public key differs from the certificate's",
        key_path.display(),
        cert_path.display()
    );
    ensure!(
        subject == want_subject,
        "{}: the subject is not \"O={ORGANIZATION}, CN={CA_COMMON_NAME}\"; only a CA created by \
         `portcullis pki init` can sign here",
        cert_path.display()
    );
    Ok(DevCa { params, key })
}

// ---------------------------------------------------------------------------
// Reading certificates (PEM by rustls-pki-types, DER by x509-parser)

/// DER bytes of the first `CERTIFICATE` block of a PEM file, checked to be one
/// whole X.509 certificate.
fn read_first_cert_der(path: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(path)
        .with_context(|| format!("reading the certificate file {}", path.display()))?;
    let der = CertificateDer::from_pem_slice(&bytes).map_err(|e| match e {
        PemError::NoItemsFound => anyhow!(
            "{}: no \"{PEM_CERT_BEGIN}\" block found; is it a PEM certificate?",
            path.display()
        ),
        e => anyhow!(
            "{}: the first certificate block is not valid PEM (base64 between BEGIN and END \
             lines): {e}",
            path.display()
        ),
    })?;
    ensure!(
        matches!(x509_parser::parse_x509_certificate(&der), Ok((rest, _)) if rest.is_empty()),
        "{}: the first certificate block does not hold a DER certificate",
        path.display()
    );
    Ok(der.to_vec())
}

/// The raw subject Name and SubjectPublicKeyInfo of a DER certificate.
fn subject_and_spki(cert_der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let tbs = &cert.tbs_certificate;
    Some((tbs.subject.as_raw().to_vec(), tbs.subject_pki.raw.to_vec()))
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

// ---------------------------------------------------------------------------
// Files

fn exists(path: &Path) -> Result<bool> {
    path.try_exists()
        .with_context(|| format!("checking whether {} exists", path.display()))
}

fn display_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates `dir` and missing parents with mode 0700. An existing directory is
/// left as it is.
fn create_private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating the directory {}", dir.display()))
}

struct NewFile<'a> {
    path: PathBuf,
    contents: &'a str,
    mode: u32,
}

impl<'a> NewFile<'a> {
    fn key(path: PathBuf, contents: &'a str) -> Self {
        Self {
            path,
            contents,
            mode: KEY_MODE,
        }
    }

    fn cert(path: PathBuf, contents: &'a str) -> Self {
        Self {
            path,
            contents,
            mode: CERT_MODE,
        }
    }
}

/// Writes `files`, all or (as far as possible) nothing.
///
/// Without `overwrite`, each file is created with `create_new` and its mode, so
/// an existing file is never touched; on failure the files created by this call
/// are removed. With `overwrite`, each file is written to a fresh `*.tmp` file
/// with its mode and renamed over the target once all are written, so a replaced
/// key file never has looser permissions than 0600.
fn write_files(files: &[NewFile<'_>], overwrite: bool) -> Result<()> {
    let staged: Vec<PathBuf> = if overwrite {
        files.iter().map(|f| tmp_path(&f.path)).collect()
    } else {
        files.iter().map(|f| f.path.clone()).collect()
    };
    let mut written: Vec<&Path> = Vec::with_capacity(files.len());
    let mut result = Ok(());
    for (file, target) in files.iter().zip(&staged) {
        if overwrite {
            // A stale temp file from an interrupted run.
            match fs::remove_file(target) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    result = Err(anyhow!(e).context(format!("removing {}", target.display())));
                    break;
                }
                _ => {}
            }
        }
        if let Err(e) = create_file(target, file.contents.as_bytes(), file.mode) {
            result = Err(e);
            break;
        }
        written.push(target);
    }
    if overwrite && result.is_ok() {
        for (file, tmp) in files.iter().zip(&staged) {
            if let Err(e) = fs::rename(tmp, &file.path) {
                result = Err(anyhow!(e).context(format!(
                    "replacing {} with {}",
                    file.path.display(),
                    tmp.display()
                )));
                break;
            }
        }
    }
    if result.is_err() {
        for path in written {
            // Best effort: already renamed temp files are simply not found.
            let _ = fs::remove_file(path);
        }
    }
    result
}

/// Creates `path` (which must not exist) with `mode` and writes `contents`.
fn create_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut file = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            bail!(
                "{} already exists; refusing to overwrite it",
                path.display()
            )
        }
        Err(e) => return Err(anyhow!(e).context(format!("creating {}", path.display()))),
    };
    if let Err(e) = file.write_all(contents).and_then(|()| file.sync_all()) {
        drop(file);
        let _ = fs::remove_file(path);
        return Err(anyhow!(e).context(format!("writing {}", path.display())));
    }
    Ok(())
}

fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::pem::parse_x509_pem;
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;

    fn setup() -> (tempfile::TempDir, PkiPaths) {
        let tmp = tempfile::tempdir().unwrap();
        let paths = PkiPaths::new(tmp.path().join("data").join("pki"));
        (tmp, paths)
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// DER of the first certificate, decoded by x509-parser (not by our code).
    fn der_of(path: &Path) -> Vec<u8> {
        let bytes = fs::read(path).unwrap();
        let (_, pem) = parse_x509_pem(&bytes).unwrap();
        assert_eq!(pem.label, "CERTIFICATE");
        pem.contents
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        let (rest, cert) = X509Certificate::from_der(der).unwrap();
        assert!(rest.is_empty());
        cert
    }

    fn common_name(cert: &X509Certificate<'_>) -> String {
        let cn = cert.subject().iter_common_name().next().unwrap();
        cn.as_str().unwrap().to_string()
    }

    fn subject_key_id(cert: &X509Certificate<'_>) -> Vec<u8> {
        cert.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .expect("subject key identifier")
    }

    fn authority_key_id(cert: &X509Certificate<'_>) -> Vec<u8> {
        cert.extensions()
            .iter()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    aki.key_identifier.as_ref().map(|id| id.0.to_vec())
                }
                _ => None,
            })
            .expect("authority key identifier")
    }

    /// Asserts that `leaf` was issued and signed by `ca`.
    fn assert_chains(leaf: &X509Certificate<'_>, ca: &X509Certificate<'_>) {
        assert_eq!(leaf.issuer().as_raw(), ca.subject().as_raw());
        leaf.verify_signature(Some(ca.public_key()))
            .expect("leaf signature verifies with the CA key");
        assert_eq!(authority_key_id(leaf), subject_key_id(ca));
        assert!(leaf.validity().is_valid());
    }

    fn snapshot(paths: &[PathBuf]) -> Vec<Vec<u8>> {
        paths.iter().map(|p| fs::read(p).unwrap()).collect()
    }

    fn all_four(paths: &PkiPaths) -> Vec<PathBuf> {
        vec![
            paths.ca_cert(),
            paths.ca_key(),
            paths.server_cert(),
            paths.server_key(),
        ]
    }

    #[test]
    fn layout() {
        let paths = PkiPaths::new("data/pki");
        assert_eq!(paths.ca_cert(), Path::new("data/pki/ca.pem"));
        assert_eq!(paths.ca_key(), Path::new("data/pki/ca.key"));
        assert_eq!(paths.server_cert(), Path::new("data/pki/server.pem"));
        assert_eq!(paths.server_key(), Path::new("data/pki/server.key"));
        assert_eq!(paths.client_cert("a"), Path::new("data/pki/clients/a.pem"));
        assert_eq!(paths.client_key("a"), Path::new("data/pki/clients/a.key"));
    }

    #[test]
    fn init_creates_ca_and_server_with_private_keys() {
        let (_tmp, paths) = setup();
        init(&paths, &["gateway.local".into(), "[fd00::1]".into()]).unwrap();

        for path in all_four(&paths) {
            assert!(path.is_file(), "{} missing", path.display());
        }
        assert_eq!(mode(&paths.dir), 0o700);
        assert_eq!(mode(&paths.ca_key()), 0o600);
        assert_eq!(mode(&paths.server_key()), 0o600);
        for key in [paths.ca_key(), paths.server_key()] {
            let pem = fs::read_to_string(&key).unwrap();
            assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
            let pair = KeyPair::from_pem(&pem).unwrap();
            assert_eq!(pair.algorithm(), &PKCS_ECDSA_P256_SHA256);
        }

        let ca_der = der_of(&paths.ca_cert());
        let ca = parse(&ca_der);
        assert_eq!(common_name(&ca), CA_COMMON_NAME);
        let org = ca.subject().iter_organization().next().unwrap();
        assert_eq!(org.as_str().unwrap(), ORGANIZATION);
        assert!(ca.is_ca());
        assert_eq!(ca.subject().as_raw(), ca.issuer().as_raw());
        ca.verify_signature(None).unwrap();
        let usage = ca.key_usage().unwrap().unwrap().value;
        assert!(usage.key_cert_sign() && usage.crl_sign());
        let validity = ca.validity();
        let lifetime = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert!(lifetime > 10 * 365 * 86400, "CA valid for ~10 years");
        assert!(validity.is_valid());

        let server_der = der_of(&paths.server_cert());
        let server = parse(&server_der);
        assert_eq!(common_name(&server), "localhost");
        assert!(!server.is_ca());
        assert_chains(&server, &ca);
        let eku = server.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let usage = server.key_usage().unwrap().unwrap().value;
        assert!(usage.digital_signature() && !usage.key_cert_sign());
        let san = server.subject_alternative_name().unwrap().unwrap().value;
        let names: Vec<String> = san
            .general_names
            .iter()
            .map(|n| match n {
                GeneralName::DNSName(d) => format!("dns:{d}"),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => format!("ip:{}", IpAddr::from(<[u8; 4]>::try_from(*ip).unwrap())),
                    _ => format!("ip:{}", IpAddr::from(<[u8; 16]>::try_from(*ip).unwrap())),
                },
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "dns:localhost",
                "ip:127.0.0.1",
                "ip:::1",
                "dns:gateway.local",
                "ip:fd00::1"
            ]
        );
        let lifetime =
            server.validity().not_after.timestamp() - server.validity().not_before.timestamp();
        assert!((365 * 86400..=366 * 86400 + 3600).contains(&lifetime));
    }

    #[test]
    fn init_twice_refuses_and_leaves_files_unchanged() {
        let (_tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        let before = snapshot(&all_four(&paths));

        let err = init(&paths, &[]).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(
            err.contains(&paths.ca_cert().display().to_string()),
            "{err}"
        );
        assert_eq!(snapshot(&all_four(&paths)), before);

        // Only the CA key left: still refused, nothing written.
        fs::remove_file(paths.ca_cert()).unwrap();
        fs::remove_file(paths.server_cert()).unwrap();
        fs::remove_file(paths.server_key()).unwrap();
        let err = init(&paths, &[]).unwrap_err().to_string();
        assert!(err.contains(&paths.ca_key().display().to_string()), "{err}");
        assert_eq!(fs::read(paths.ca_key()).unwrap(), before[1]);
        assert!(!paths.ca_cert().exists() && !paths.server_key().exists());
    }

    #[test]
    fn init_rejects_bad_extra_names_before_writing() {
        let (_tmp, paths) = setup();
        for bad in [
            "",
            "bad name",
            "a..b",
            "-a.example",
            "é.example",
            "x.",
            "a/b",
        ] {
            let err = init(&paths, &[bad.to_string()]).unwrap_err().to_string();
            assert!(err.contains("invalid server name"), "{bad:?}: {err}");
            assert!(!paths.dir.exists(), "nothing written for {bad:?}");
        }
        init(
            &paths,
            &[
                "*.dev.example".into(),
                "10.0.0.7".into(),
                "localhost".into(),
                "my_host".into(),
            ],
        )
        .unwrap();
    }

    #[test]
    fn ensure_dev_pki_creates_once() {
        let (_tmp, paths) = setup();
        assert!(ensure_dev_pki(&paths).unwrap());
        let before = snapshot(&all_four(&paths));
        assert!(!ensure_dev_pki(&paths).unwrap());
        assert!(!ensure_dev_pki(&paths).unwrap());
        assert_eq!(snapshot(&all_four(&paths)), before);
    }

    #[test]
    fn partial_pki_is_an_error_naming_the_missing_file() {
        let (_tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        fs::remove_file(paths.server_key()).unwrap();
        let before = snapshot(&all_four(&paths)[..3]);

        let err = ensure_dev_pki(&paths).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        assert!(
            err.contains(&paths.server_key().display().to_string()),
            "{err}"
        );
        assert!(!paths.server_key().exists(), "not regenerated");
        assert_eq!(snapshot(&all_four(&paths)[..3]), before);

        // A missing CA key with everything else present is just as wrong.
        let (_tmp2, paths2) = setup();
        init(&paths2, &[]).unwrap();
        fs::remove_file(paths2.ca_key()).unwrap();
        let err = ensure_dev_pki(&paths2).unwrap_err().to_string();
        assert!(
            err.contains(&paths2.ca_key().display().to_string()),
            "{err}"
        );
        assert!(!paths2.ca_key().exists());
    }

    #[test]
    fn issue_creates_client_cert_that_chains_to_the_ca() {
        let (_tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        let issued = issue(&paths, "sensor-01.hall_A", false).unwrap();

        assert_eq!(issued.cert, paths.client_cert("sensor-01.hall_A"));
        assert_eq!(issued.key, paths.client_key("sensor-01.hall_A"));
        assert_eq!(mode(&issued.key), 0o600);
        assert_eq!(mode(&paths.dir.join("clients")), 0o700);
        let key = KeyPair::from_pem(&fs::read_to_string(&issued.key).unwrap()).unwrap();

        let ca_der = der_of(&paths.ca_cert());
        let ca = parse(&ca_der);
        let client_der = der_of(&issued.cert);
        let client = parse(&client_der);

        assert_eq!(common_name(&client), "sensor-01.hall_A");
        assert_eq!(
            client.public_key().raw,
            rcgen::PublicKeyData::subject_public_key_info(&key).as_slice()
        );
        assert_chains(&client, &ca);
        assert!(!client.is_ca());
        let constraints = client.basic_constraints().unwrap().unwrap().value;
        assert!(!constraints.ca);
        let eku = client.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        let san = client.subject_alternative_name().unwrap().unwrap().value;
        assert_eq!(
            san.general_names,
            [GeneralName::URI("urn:portcullis:sensor-01.hall_A")]
        );
        let lifetime =
            client.validity().not_after.timestamp() - client.validity().not_before.timestamp();
        assert!((365 * 86400..=366 * 86400 + 3600).contains(&lifetime));

        assert_eq!(issued.fingerprint_sha256, sha256_hex(&client_der));
        assert_eq!(
            fingerprint_pem_file(&issued.cert).unwrap(),
            issued.fingerprint_sha256
        );

        // A second client from the same reloaded CA chains too.
        let other = issue(&paths, "b", false).unwrap();
        let other_der = der_of(&other.cert);
        assert_chains(&parse(&other_der), &ca);
        assert_ne!(other.fingerprint_sha256, issued.fingerprint_sha256);
    }

    #[test]
    fn bad_client_names_are_refused() {
        let (_tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("a b", "' ' at position 2"),
            ("../etc/passwd", "'/' at position 3"),
            ("x/y", "'/'"),
            ("é", "'é' at position 1"),
            ("name\n", "'\\n'"),
            ("a:b", "':'"),
        ];
        for (name, expected) in cases {
            let err = issue(&paths, name, false).unwrap_err().to_string();
            assert!(err.contains(expected), "{name:?}: {err}");
        }
        let long = "a".repeat(65);
        let err = issue(&paths, &long, false).unwrap_err().to_string();
        assert!(err.contains("65 characters long, at most 64"), "{err}");
        assert!(!paths.dir.join("clients").exists(), "nothing written");

        issue(&paths, &"a".repeat(64), false).unwrap();
        issue(&paths, "A.z_0-9", false).unwrap();
    }

    #[test]
    fn issue_twice_refuses_unless_overwrite() {
        let (_tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        let first = issue(&paths, "dev", false).unwrap();
        let before = snapshot(&[first.cert.clone(), first.key.clone()]);

        let err = issue(&paths, "dev", false).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(err.contains(&first.cert.display().to_string()), "{err}");
        assert_eq!(snapshot(&[first.cert.clone(), first.key.clone()]), before);

        let second = issue(&paths, "dev", true).unwrap();
        assert_eq!((&second.cert, &second.key), (&first.cert, &first.key));
        assert_ne!(second.fingerprint_sha256, first.fingerprint_sha256);
        assert_ne!(snapshot(&[second.cert.clone(), second.key.clone()]), before);
        assert_eq!(mode(&second.key), 0o600);
        assert_eq!(
            fingerprint_pem_file(&second.cert).unwrap(),
            second.fingerprint_sha256
        );
        let names: Vec<_> = fs::read_dir(paths.dir.join("clients"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "no temp files left: {names:?}");
    }

    #[test]
    fn issue_without_ca_names_the_missing_file() {
        let (_tmp, paths) = setup();
        let err = issue(&paths, "dev", false).unwrap_err().to_string();
        assert!(
            err.contains(&paths.ca_cert().display().to_string()),
            "{err}"
        );
        assert!(err.contains("pki init"), "{err}");
        assert!(!paths.dir.exists());
    }

    #[test]
    fn issue_refuses_a_ca_key_that_does_not_match_ca_pem() {
        let (_tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        fs::remove_file(paths.ca_key()).unwrap();
        fs::write(paths.ca_key(), generate_key().unwrap().serialize_pem()).unwrap();
        let err = issue(&paths, "dev", false).unwrap_err().to_string();
        assert!(err.contains(&paths.ca_key().display().to_string()), "{err}");
        assert!(err.contains("does not belong"), "{err}");

        fs::write(paths.ca_key(), "not a key").unwrap();
        let err = issue(&paths, "dev", false).unwrap_err().to_string();
        assert!(err.contains(&paths.ca_key().display().to_string()), "{err}");
        assert!(!paths.client_cert("dev").exists());
    }

    #[test]
    fn fingerprint_is_sha256_of_the_first_der_certificate() {
        let (tmp, paths) = setup();
        init(&paths, &[]).unwrap();
        let fp = fingerprint_pem_file(&paths.ca_cert()).unwrap();
        assert_eq!(fp.len(), 64);
        assert!(
            fp.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')),
            "{fp}"
        );
        assert_eq!(fp, hex::encode(Sha256::digest(der_of(&paths.ca_cert()))));

        // First certificate of a bundle, with text before it and CRLF lines.
        let bundle = tmp.path().join("bundle.pem");
        let text = format!(
            "subject=whatever\r\n{}{}",
            fs::read_to_string(paths.ca_cert())
                .unwrap()
                .replace('\n', "\r\n"),
            fs::read_to_string(paths.server_cert()).unwrap()
        );
        fs::write(&bundle, text).unwrap();
        assert_eq!(fingerprint_pem_file(&bundle).unwrap(), fp);

        let not_pem = tmp.path().join("key.pem");
        fs::write(&not_pem, fs::read(paths.ca_key()).unwrap()).unwrap();
        let err = fingerprint_pem_file(&not_pem).unwrap_err().to_string();
        assert!(err.contains(&not_pem.display().to_string()), "{err}");
        assert!(err.contains("BEGIN CERTIFICATE"), "{err}");

        let garbled = tmp.path().join("garbled.pem");
        fs::write(
            &garbled,
            format!("{PEM_CERT_BEGIN}\nMII!!\n-----END CERTIFICATE-----\n"),
        )
        .unwrap();
        let err = fingerprint_pem_file(&garbled).unwrap_err().to_string();
        assert!(err.contains(&garbled.display().to_string()), "{err}");
        assert!(err.contains("not valid PEM"), "{err}");

        let missing = tmp.path().join("missing.pem");
        let err = format!("{:#}", fingerprint_pem_file(&missing).unwrap_err());
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}
