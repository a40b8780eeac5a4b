//! Connections: plain TCP or TLS (optionally with a client certificate), from a chosen
//! loopback source address so per-source limits see a fleet as a real one.

use anyhow::{Context, Result, anyhow};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls_pki_types::pem::{Error as PemError, PemObject};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

/// A byte stream to a server: TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
pub type Stream = Box<dyn Io>;

/// How to reach a listener.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<Tls>,
}

#[derive(Clone)]
pub struct Tls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: ServerName<'static>,
}

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("{}: no certificate in it", path.display()));
    }
    Ok(certs)
}

pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        PemError::NoItemsFound => anyhow!("{}: no private key in it", path.display()),
        e => anyhow!("{}: not a PEM private key: {e}", path.display()),
    })
}

/// Roots that verify the server: the certificates in `ca`.
pub fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in read_certs(ca)? {
        roots
            .add(c)
            .with_context(|| format!("{}: not a usable CA certificate", ca.display()))?;
    }
    Ok(Arc::new(roots))
}

/// A client TLS configuration, with a client certificate when given.
pub fn client_config(
    roots: Arc<rustls::RootCertStore>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<Arc<rustls::ClientConfig>> {
    // The ring provider, whatever the process installed as its default.
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    let config = match identity {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .context("client certificate and key do not match")?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_string()).map_err(|_| anyhow!("bad TLS server name {name:?}"))
}

/// Open TCP to `addr` from `source` (any port), with Nagle off.
pub async fn tcp(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Open the endpoint: TCP, then the TLS handshake when the endpoint has TLS.
pub async fn open(ep: &Endpoint, source: Option<IpAddr>) -> std::io::Result<Stream> {
    let tcp = tcp(ep.addr, source).await?;
    match &ep.tls {
        None => Ok(Box::new(tcp)),
        Some(tls) => {
            let stream = TlsConnector::from(tls.config.clone())
                .connect(tls.server_name.clone(), tcp)
                .await?;
            Ok(Box::new(stream))
        }
    }
}
