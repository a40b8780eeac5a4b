//! The admin API over HTTP: the socket's operations as JSON under `/api/v1/`, behind a
//! bearer token. Off unless `admin.http_listen` is set.
//!
//! Every route runs the same [`Handler`] the socket runs, on the same [`AdminState`],
//! so the two cannot drift; this file only maps paths, bodies and errors. The token is
//! read from a file at start and kept as its SHA-256 digest; a presented token is
//! hashed and compared in constant time. A request without the right token is
//! answered 401 before any route is looked up, audited and counted
//! (`connect`/`admin_unauthorized`). The routes are listed in [`routes`] and
//! documented in `docs/admin-api.openapi.json`; a test holds the two together.
//!
//! A reload reads the token file and the certificate again (see [`Rekey`]).
//! Connections are bounded by the listener ([`crate::http_listener`]), the same as
//! the observability listener's.

use super::protocol::{
    AddBan, AddPrincipal, DisablePrincipal, EnablePrincipal, KickClient, ListBans, ListClients,
    ListPrincipals, ListQuarantine, NewPrincipal, QuarantineDevice, RecentEvents, ReleaseDevice,
    Reload, RemoveBan, RemovePrincipal, RotateCredentials, ShowPrincipal, ShowQuarantine,
};
use super::{AdminError, AdminState, Handler};
use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, delete, get, post};
use portcullis_core::audit::AuditEntry;
use portcullis_core::metrics::Metrics;
use portcullis_core::principal::PrincipalKind;
use portcullis_core::refusal::Refusal;
use portcullis_core::source_key::SourceKey;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

/// The largest request body read (a principal, a ban: a few hundred bytes).
pub const MAX_BODY: usize = 64 * 1024;
/// A token shorter than this is refused at start: it could be guessed.
pub const MIN_TOKEN: usize = 32;
/// A token file larger than this is not a token.
const MAX_TOKEN_FILE: u64 = 4096;
/// A request body must arrive whole within this (its head has its own deadline).
const BODY_DEADLINE: Duration = Duration::from_secs(10);

/// The bearer token, kept as its SHA-256 digest; `Debug` shows nothing of it.
pub struct Token {
    digest: [u8; 32],
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token([redacted])")
    }
}

/// Why the token file was refused. Never the token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("admin token file {path}: cannot read: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("admin token file {path}: not a regular file of at most {MAX_TOKEN_FILE} bytes")]
    NotAToken { path: String },
    #[error(
        "admin token file {path}: other users may access it (mode {mode:o}); chmod o-rwx it (0600 or 0640)"
    )]
    WorldReadable { path: String, mode: u32 },
    #[error("admin token file {path}: empty")]
    Empty { path: String },
    #[error("admin token file {path}: the token must be at least {MIN_TOKEN} characters")]
    TooShort { path: String },
    #[error(
        "admin token file {path}: the token must be one line of printable ASCII without spaces"
    )]
    BadCharacters { path: String },
}

impl Token {
    /// Read the token from its file: one line (a final newline is dropped), at least
    /// `MIN_TOKEN` printable ASCII characters, in a file other users cannot read.
    pub fn load(path: &FsPath) -> Result<Token, TokenError> {
        use std::os::unix::fs::PermissionsExt;
        let name = path.display().to_string();
        let read = |source| TokenError::Read {
            path: name.clone(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        if !meta.is_file() || meta.len() > MAX_TOKEN_FILE {
            return Err(TokenError::NotAToken { path: name });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o007 != 0 {
            return Err(TokenError::WorldReadable { path: name, mode });
        }
        let bytes = std::fs::read(path).map_err(read)?;
        Token::parse(&bytes).map_err(|e| e(name))
    }

    fn parse(bytes: &[u8]) -> Result<Token, fn(String) -> TokenError> {
        let line = bytes.strip_suffix(b"\n").unwrap_or(bytes);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            return Err(|path| TokenError::Empty { path });
        }
        if !line.iter().all(|b| b.is_ascii_graphic()) {
            return Err(|path| TokenError::BadCharacters { path });
        }
        if line.len() < MIN_TOKEN {
            return Err(|path| TokenError::TooShort { path });
        }
        Ok(Token {
            digest: Sha256::digest(line).into(),
        })
    }

    /// Whether `presented` is the token: digests compared in constant time, so
    /// neither the token's bytes nor its length show in the time taken.
    fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        digest.ct_eq(&self.digest).into()
    }
}

/// What every route is given.
#[derive(Clone)]
pub struct Http {
    pub admin: Arc<AdminState>,
    /// The token in force (a reload sends a new one).
    pub token: watch::Receiver<Arc<Token>>,
    pub metrics: Arc<Metrics>,
    /// The IPv6 prefix length of one source, for the audit of refusals.
    pub ipv6_prefix: u8,
}

tokio::task_local! {
    /// The address of the caller whose request is running, once its token is
    /// checked: the audit of what it changes names it.
    static CALLER: SocketAddr;
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => (status, [(CONTENT_TYPE, "application/json")], bytes).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reply not encodable: {e}"),
        ),
    }
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

fn error(status: StatusCode, message: String) -> Response {
    let body = serde_json::to_vec(&ErrorBody { error: message }).unwrap_or_default();
    (status, [(CONTENT_TYPE, "application/json")], body).into_response()
}

/// An op's failure as HTTP: the operator's mistake 400, an unknown id 404, the
/// gateway's own failure 500.
fn failure(e: AdminError) -> Response {
    let status = match e {
        AdminError::Usage(_) => StatusCode::BAD_REQUEST,
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Runtime(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, e.message())
}

/// The token from `Authorization: Bearer TOKEN` (the scheme in any case).
fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    Some(rest.trim_ascii())
}

async fn require_token(
    State(h): State<Http>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    // The page's own files carry no data (see dashboard.rs): nothing else is exempt.
    if super::dashboard::is_public(request.method(), request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| bearer(v.as_bytes()));
    let token = h.token.borrow().clone();
    let (why, challenge) = match presented {
        Some(presented) if token.matches(presented) => {
            return CALLER.scope(peer, next.run(request)).await;
        }
        Some(_) => (
            "wrong bearer token",
            "Bearer realm=\"portcullis-admin\", error=\"invalid_token\"",
        ),
        None => ("no bearer token", "Bearer realm=\"portcullis-admin\""),
    };
    h.metrics.refused(Refusal::AdminUnauthorized);
    // One reason per cause, not per path, and the source as the caps count it (an
    // IPv6 host is its prefix): the caller chooses its path and its address within
    // its prefix, and each distinct value would be a line of its own in the audit.
    let source = SourceKey::new(peer.ip(), h.ipv6_prefix);
    h.admin.write_audit(
        AuditEntry::new("admin", "refuse")
            .protocol("admin-http")
            .source(source)
            .reason(why),
    );
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        format!("{why}: send Authorization: Bearer followed by the admin token"),
    );
    response.headers_mut().insert(
        WWW_AUTHENTICATE,
        axum::http::HeaderValue::from_static(challenge),
    );
    // A caller without the token keeps no connection open.
    response.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    response
}

impl Http {
    /// Run an op as the socket does (registry writes are synchronous redb commits).
    async fn run<O>(&self, op: O, success: StatusCode) -> Response
    where
        O: Handler + Send + 'static,
        O::Reply: Send + 'static,
    {
        // Every route runs behind the token check, which names the caller; a route
        // reached without one would be audited as the socket's: refused instead.
        let Ok(caller) = CALLER.try_with(|caller| *caller) else {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "request reached an operation without its caller checked".into(),
            );
        };
        let state = Arc::new(AdminState {
            caller: Some(caller),
            ..(*self.admin).clone()
        });
        match tokio::task::spawn_blocking(move || op.run(&state)).await {
            Ok(Ok(reply)) => json_response(success, &reply),
            Ok(Err(e)) => failure(e),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

/// A request refused before any op ran: its status and what was wrong.
struct Bad(StatusCode, String);

impl IntoResponse for Bad {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

/// A path parameter, percent-decoded.
fn param(p: Result<Path<String>, PathRejection>) -> Result<String, Bad> {
    p.map(|Path(v)| v)
        .map_err(|e| Bad(StatusCode::BAD_REQUEST, format!("bad path: {e}")))
}

/// A JSON body of at most `MAX_BODY` bytes, read whole within `BODY_DEADLINE`; an
/// empty body is `{}`. One declared larger is refused before a byte of it is read
/// (a client waiting for `100 Continue` is spared sending it).
async fn body<T: DeserializeOwned>(body: Body) -> Result<T, Bad> {
    let too_large = || {
        Bad(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY} bytes, or cut off"),
        )
    };
    if body.size_hint().lower() > MAX_BODY as u64 {
        return Err(too_large());
    }
    let bytes =
        match tokio::time::timeout(BODY_DEADLINE, axum::body::to_bytes(body, MAX_BODY)).await {
            Ok(read) => read.map_err(|_| too_large())?,
            Err(_) => {
                return Err(Bad(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "request body not received within {}s",
                        BODY_DEADLINE.as_secs()
                    ),
                ));
            }
        };
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| Bad(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// The query parameters: only `allowed` ones, each once.
fn query<'a>(uri: &'a Uri, allowed: &[&str]) -> Result<Vec<(&'a str, &'a str)>, Bad> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for pair in uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if !allowed.contains(&k) {
            return Err(Bad(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown query parameter {k:?} (known: {})",
                    allowed.join(", ")
                ),
            ));
        }
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(Bad(
                StatusCode::BAD_REQUEST,
                format!("query parameter {k:?} given twice"),
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// The credentials of a rotation: `RotateCredentials` without the kind and id, which
/// come from the path.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotation {
    #[serde(default)]
    cert_fingerprint: Option<String>,
    #[serde(default)]
    cert_any: bool,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    psk: Option<String>,
    #[serde(default)]
    serial_key: Option<String>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct QuarantineReason {
    #[serde(default)]
    reason: Option<String>,
}

macro_rules! unwrap_or_respond {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(bad) => return bad.into_response(),
        }
    };
}

/// The routes, as `(method, path)` for the document and the router built from them.
pub fn routes() -> Vec<(Method, String, MethodRouter<Http>)> {
    use StatusCode as S;
    let mut r: Vec<(Method, String, MethodRouter<Http>)> = Vec::new();
    for (kind, base) in [
        (PrincipalKind::Device, "/api/v1/devices"),
        (PrincipalKind::Service, "/api/v1/services"),
    ] {
        let one = format!("{base}/{{id}}");
        r.push((
            Method::GET,
            base.into(),
            get(move |State(h): State<Http>| async move {
                h.run(ListPrincipals { kind }, S::OK).await
            }),
        ));
        r.push((
            Method::POST,
            base.into(),
            post(move |State(h): State<Http>, b: Body| async move {
                let principal: NewPrincipal = unwrap_or_respond!(body(b).await);
                h.run(AddPrincipal { kind, principal }, S::CREATED).await
            }),
        ));
        r.push((
            Method::GET,
            one.clone(),
            get(move |State(h): State<Http>, id| async move {
                let id = unwrap_or_respond!(param(id));
                h.run(ShowPrincipal { kind, id }, S::OK).await
            }),
        ));
        r.push((
            Method::DELETE,
            one.clone(),
            delete(move |State(h): State<Http>, id| async move {
                let id = unwrap_or_respond!(param(id));
                h.run(RemovePrincipal { kind, id }, S::OK).await
            }),
        ));
        r.push((
            Method::POST,
            format!("{one}/enable"),
            post(move |State(h): State<Http>, id| async move {
                let id = unwrap_or_respond!(param(id));
                h.run(EnablePrincipal { kind, id }, S::OK).await
            }),
        ));
        r.push((
            Method::POST,
            format!("{one}/disable"),
            post(move |State(h): State<Http>, id| async move {
                let id = unwrap_or_respond!(param(id));
                h.run(DisablePrincipal { kind, id }, S::OK).await
            }),
        ));
        r.push((
            Method::POST,
            format!("{one}/rotate"),
            post(move |State(h): State<Http>, id, b: Body| async move {
                let id = unwrap_or_respond!(param(id));
                let c: Rotation = unwrap_or_respond!(body(b).await);
                let op = RotateCredentials {
                    kind,
                    id,
                    cert_fingerprint: c.cert_fingerprint,
                    cert_any: c.cert_any,
                    secret: c.secret,
                    psk: c.psk,
                    serial_key: c.serial_key,
                };
                h.run(op, S::OK).await
            }),
        ));
        r.push((
            Method::POST,
            format!("{one}/kick"),
            post(move |State(h): State<Http>, id| async move {
                let id = unwrap_or_respond!(param(id));
                h.run(KickClient { kind, id }, S::OK).await
            }),
        ));
    }
    r.push((
        Method::GET,
        "/api/v1/bans".into(),
        get(|State(h): State<Http>| async move { h.run(ListBans {}, S::OK).await }),
    ));
    r.push((
        Method::POST,
        "/api/v1/bans".into(),
        post(|State(h): State<Http>, b: Body| async move {
            let ban: AddBan = unwrap_or_respond!(body(b).await);
            h.run(ban, S::CREATED).await
        }),
    ));
    r.push((
        Method::DELETE,
        "/api/v1/bans/{target}".into(),
        delete(|State(h): State<Http>, target| async move {
            let target = unwrap_or_respond!(param(target));
            h.run(RemoveBan { target }, S::OK).await
        }),
    ));
    r.push((
        Method::GET,
        "/api/v1/clients".into(),
        get(|State(h): State<Http>| async move { h.run(ListClients {}, S::OK).await }),
    ));
    r.push((
        Method::GET,
        "/api/v1/quarantine".into(),
        get(|State(h): State<Http>, uri: Uri| async move {
            let q = unwrap_or_respond!(query(&uri, &["all"]));
            let all = match q.first().map(|(_, v)| *v) {
                None | Some("false") => false,
                Some("true") => true,
                Some(other) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        format!("all must be true or false (got {other:?})"),
                    );
                }
            };
            h.run(ListQuarantine { all }, S::OK).await
        }),
    ));
    r.push((
        Method::GET,
        "/api/v1/quarantine/{id}".into(),
        get(|State(h): State<Http>, id| async move {
            let id = unwrap_or_respond!(param(id));
            h.run(ShowQuarantine { id }, S::OK).await
        }),
    ));
    r.push((
        Method::POST,
        "/api/v1/quarantine/{id}".into(),
        post(|State(h): State<Http>, id, b: Body| async move {
            let id = unwrap_or_respond!(param(id));
            let QuarantineReason { reason } = unwrap_or_respond!(body(b).await);
            h.run(QuarantineDevice { id, reason }, S::OK).await
        }),
    ));
    r.push((
        Method::POST,
        "/api/v1/quarantine/{id}/release".into(),
        post(|State(h): State<Http>, id| async move {
            let id = unwrap_or_respond!(param(id));
            h.run(ReleaseDevice { id }, S::OK).await
        }),
    ));
    r.push((
        Method::GET,
        "/api/v1/events".into(),
        get(|State(h): State<Http>, uri: Uri| async move {
            let q = unwrap_or_respond!(query(&uri, &["limit"]));
            let limit = match q.first().map(|(_, v)| v.parse::<usize>()) {
                None => None,
                Some(Ok(n)) => Some(n),
                Some(Err(_)) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "limit must be a whole number".into(),
                    );
                }
            };
            h.run(RecentEvents { limit }, S::OK).await
        }),
    ));
    r.push((
        Method::POST,
        "/api/v1/reload".into(),
        post(|State(h): State<Http>| async move { h.run(Reload {}, S::OK).await }),
    ));
    r.push((
        Method::GET,
        "/api/v1/stats".into(),
        get(|State(h): State<Http>| async move {
            json_response(S::OK, &super::stats::Stats::read(&h.admin, &h.metrics))
        }),
    ));
    r
}

/// Every answer, with or without the token, gets the dashboard's security headers.
async fn hardened(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    super::dashboard::harden(&mut response);
    response
}

/// The whole API: the routes behind the token.
pub fn router(http: Http) -> Router {
    let mut router = Router::new();
    for (_, path, route) in routes() {
        router = router.route(&path, route);
    }
    for (path, _, _) in super::dashboard::ASSETS {
        router = router.route(
            path,
            get(move || async move { super::dashboard::asset(path) }),
        );
    }
    router = router.route("/", get(|| async { super::dashboard::home() }));
    router
        .fallback(|uri: Uri| async move {
            error(
                StatusCode::NOT_FOUND,
                format!("no such path: {}", uri.path()),
            )
        })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {}", uri.path()),
            )
        })
        // Outermost: nothing, not even a 404, answers without the token.
        .layer(middleware::from_fn_with_state(http.clone(), require_token))
        .layer(middleware::from_fn(hardened))
        .with_state(http)
}

/// What a reload may change on the listener: the token, and with TLS the acceptor
/// holding the server certificate.
pub struct Keys {
    pub token: Token,
    pub tls: Option<TlsAcceptor>,
}

/// Read the token file and, with TLS, the server certificate of `[tls]` (read as the
/// MQTT listeners read it; no client certificate is asked for): None when the API is
/// off. At start and at every reload.
pub fn keys(config: &portcullis_config::Config) -> Result<Option<Keys>, String> {
    if config.admin.http_listen.is_none() {
        return Ok(None);
    }
    let path = config
        .admin_token_file()
        .ok_or("admin.http_token_file: required with admin.http_listen")?;
    let token = Token::load(&path).map_err(|e| e.to_string())?;
    let tls = if config.admin.http_tls {
        let roots = Arc::new(rustls::RootCertStore::empty());
        let acceptor = portcullis_mqtt::listener::tls_acceptor(
            &config.server_cert(),
            &config.server_key(),
            roots,
        )
        .map_err(|e| format!("admin API over HTTPS: {e}"))?;
        Some(acceptor)
    } else {
        None
    };
    Ok(Some(Keys { token, tls }))
}

/// Where a reload sends the listener's new keys.
pub struct Rekey {
    token: watch::Sender<Arc<Token>>,
    tls: Option<watch::Sender<TlsAcceptor>>,
}

impl Rekey {
    /// Put `keys` in force: new requests are checked against the new token, new
    /// connections handshake with the new certificate.
    pub fn send(&self, keys: Keys) {
        self.token.send_replace(Arc::new(keys.token));
        if let (Some(tx), Some(acceptor)) = (&self.tls, keys.tls) {
            tx.send_replace(acceptor);
        }
    }
}

/// The listener, bound at start with its token and TLS set up: every fault in them is
/// a start-up error.
pub struct Bound {
    listener: TcpListener,
    token: watch::Receiver<Arc<Token>>,
    tls: Option<watch::Receiver<TlsAcceptor>>,
    handshake: Duration,
    ipv6_prefix: u8,
    pub rekey: Arc<Rekey>,
    pub local: SocketAddr,
}

impl Bound {
    /// `"admin API over HTTP"` or `"... HTTPS"`, for the banner.
    pub fn label(&self) -> &'static str {
        if self.tls.is_some() {
            "admin API over HTTPS"
        } else {
            "admin API over HTTP"
        }
    }
}

/// Read the token and the certificate and bind the listener, when the API is on.
pub async fn bind(config: &portcullis_config::Config) -> anyhow::Result<Option<Bound>> {
    use crate::usage::UsageError;
    use anyhow::Context;
    let Some(addr) = config.admin.http_listen else {
        return Ok(None);
    };
    let Some(keys) = keys(config).map_err(UsageError)? else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("admin API over HTTP: cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let (token_tx, token) = watch::channel(Arc::new(keys.token));
    let (tls_tx, tls) = match keys.tls {
        Some(acceptor) => {
            let (tx, rx) = watch::channel(acceptor);
            (Some(tx), Some(rx))
        }
        None => (None, None),
    };
    Ok(Some(Bound {
        listener,
        token,
        tls,
        handshake: *config.tls.handshake_timeout,
        ipv6_prefix: config.auth.ipv6_source_prefix,
        rekey: Arc::new(Rekey {
            token: token_tx,
            tls: tls_tx,
        }),
        local,
    }))
}

/// Serve the API until `stop` turns true, with at most `connections` open.
pub async fn serve(
    bound: Bound,
    connections: usize,
    admin: Arc<AdminState>,
    metrics: Arc<Metrics>,
    stop: watch::Receiver<bool>,
) {
    let Bound {
        listener,
        token,
        tls,
        handshake,
        ipv6_prefix,
        ..
    } = bound;
    let bounds = crate::http_listener::Bounds::new(connections, handshake, ipv6_prefix);
    let app = router(Http {
        admin,
        token,
        metrics,
        ipv6_prefix,
    });
    crate::http_listener::serve(listener, tls, app, bounds, "admin API", stop).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "0123456789abcdef0123456789abcdef";

    fn token_file(dir: &tempfile::TempDir, text: &str, mode: u32) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("token");
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_token_file_is_refused_when_missing_empty_short_or_readable_by_others() {
        let dir = tempfile::tempdir().unwrap();
        let missing = Token::load(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(missing, TokenError::Read { .. }), "{missing}");
        let refused = |text: &str, mode| Token::load(&token_file(&dir, text, mode)).unwrap_err();
        assert!(matches!(refused("", 0o600), TokenError::Empty { .. }));
        assert!(matches!(refused("\n", 0o600), TokenError::Empty { .. }));
        assert!(matches!(
            refused("short\n", 0o600),
            TokenError::TooShort { .. }
        ));
        let spaced = format!("{GOOD} {GOOD}");
        assert!(matches!(
            refused(&spaced, 0o600),
            TokenError::BadCharacters { .. }
        ));
        let readable = refused(GOOD, 0o644);
        assert!(readable.to_string().contains("mode 644"), "{readable}");
        let shown = format!("{readable} {readable:?}");
        assert!(!shown.contains(GOOD), "the token is never shown: {shown}");
        assert!(Token::load(&token_file(&dir, GOOD, 0o640)).is_ok());
    }

    #[test]
    fn only_the_exact_token_matches_with_or_without_its_final_newline() {
        let dir = tempfile::tempdir().unwrap();
        let token = Token::load(&token_file(&dir, &format!("{GOOD}\r\n"), 0o600)).unwrap();
        assert!(token.matches(GOOD.as_bytes()));
        assert!(!token.matches(&GOOD.as_bytes()[1..]));
        assert!(!token.matches(format!("{GOOD}0").as_bytes()));
        assert!(!token.matches(b""));
        assert_eq!(format!("{token:?}"), "Token([redacted])");
    }

    #[test]
    fn the_bearer_scheme_is_read_in_any_case() {
        assert_eq!(bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer(b"bearer  abc "), Some(&b"abc"[..]));
        assert_eq!(bearer(b"Basic abc"), None);
        assert_eq!(bearer(b"Bear"), None);
    }

    /// Every route the server has is documented, and every documented operation is
    /// a route (the live test checks what each answers).
    #[test]
    fn the_routes_are_those_of_the_openapi_document() {
        let doc: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/admin-api.openapi.json")).unwrap();
        let mut documented: Vec<(String, String)> = Vec::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                if method != "parameters" {
                    documented.push((method.to_uppercase(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_string(), p))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(served, documented);
    }
}
