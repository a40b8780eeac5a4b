//! The link's TLS (rustls with ring) and credentials, read once at start. Errors name
//! the file and what is wrong with it, never its content.

use rustls::RootCertStore;
use rustls_pki_types::pem::{Error as PemError, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path, what)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates ({e})", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// The client configuration for `mqtts://` brokers: their certificates checked
/// against `ca`; this replica's own certificate for mutual TLS if given.
pub fn client_config(
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(ca, "upstream.ca")? {
        roots
            .add(cert)
            .map_err(|e| format!("upstream.ca {}: {e}", ca.display()))?;
    }
    let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = certificates(cert, "upstream.client_cert")?;
            let key_bytes = read(key, "upstream.client_key")?;
            let private = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| match e {
                PemError::NoItemsFound => {
                    format!(
                        "upstream.client_key {}: no private key in the file",
                        key.display()
                    )
                }
                other => format!("upstream.client_key {}: {other}", key.display()),
            })?;
            builder.with_client_auth_cert(chain, private).map_err(|e| {
                format!(
                    "upstream.client_cert {} with upstream.client_key {}: {e}",
                    cert.display(),
                    key.display()
                )
            })?
        }
    };
    Ok(Arc::new(config))
}

/// The user name (first line) and password (second line) of a credentials file.
pub fn credentials(path: &Path) -> Result<(String, String), String> {
    let what = "upstream.credentials_file";
    let bytes = read(path, what)?;
    let text = String::from_utf8(bytes)
        .map_err(|_| format!("{what} {}: not UTF-8 text", path.display()))?;
    let mut lines = text.lines();
    let user = lines.next().unwrap_or_default();
    let password = lines.next().unwrap_or_default();
    if user.is_empty() || lines.any(|l| !l.trim().is_empty()) {
        return Err(format!(
            "{what} {}: expected the user name on the first line and the password on the second, nothing else",
            path.display()
        ));
    }
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            file = %path.display(),
            "upstream credentials are readable by other users (chmod 600 recommended)"
        );
    }
    Ok((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_file_is_two_lines_and_errors_never_show_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "gateway\ns3cret-pw\n").unwrap();
        assert_eq!(
            credentials(&path).unwrap(),
            ("gateway".to_string(), "s3cret-pw".to_string())
        );
        std::fs::write(&path, "gateway\ns3cret-pw\nextra\n").unwrap();
        let err = credentials(&path).unwrap_err();
        assert!(
            err.contains("first line") && !err.contains("s3cret"),
            "{err}"
        );
        let err = credentials(&dir.path().join("missing")).unwrap_err();
        assert!(err.contains("upstream.credentials_file"), "{err}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not pem").unwrap();
        let err = client_config(&path, None).unwrap_err();
        assert!(
            err.contains("upstream.ca") && err.contains("ca.pem"),
            "{err}"
        );
    }
}
