//! The operator dashboard: a page, its script and its style, served by the admin HTTP
//! listener from files embedded in the binary. They carry no data, so they are the
//! only paths served without the token (`GET`/`HEAD` on exactly [`ASSETS`] and `/`);
//! the page asks the API for everything, with the token the operator types in.
//!
//! Every answer of the listener carries a strict Content-Security-Policy (scripts,
//! styles and requests to this origin only, no inline code, no framing), `nosniff`,
//! no referrer and no caching.

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

/// What the page may load and do: its own script, style and API, nothing else.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The page's files: path, content type, body.
pub const ASSETS: [(&str, &str, &str); 4] = [
    (
        "/dashboard/",
        "text/html; charset=utf-8",
        include_str!("dashboard/index.html"),
    ),
    (
        "/dashboard/app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "/dashboard/app.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/app.css"),
    ),
    (
        "/dashboard/favicon.svg",
        "image/svg+xml",
        include_str!("dashboard/favicon.svg"),
    ),
];

/// Where `/` sends a browser.
pub const HOME: &str = "/dashboard/";

/// Whether a request may be answered without the token: a read of `/` or of one of
/// the page's files. Any other method or path needs the token.
pub fn is_public(method: &Method, path: &str) -> bool {
    (method == Method::GET || method == Method::HEAD)
        && (path == "/" || ASSETS.iter().any(|(p, _, _)| *p == path))
}

/// The file at `path` (one of [`ASSETS`]).
pub fn asset(path: &'static str) -> Response {
    match ASSETS.iter().find(|(p, _, _)| *p == path) {
        Some((_, content_type, body)) => {
            (StatusCode::OK, [(CONTENT_TYPE, *content_type)], *body).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `/` → the page.
pub fn home() -> Response {
    (StatusCode::SEE_OTHER, [(LOCATION, HOME)]).into_response()
}

/// The headers every answer of the listener carries.
pub fn harden(response: &mut Response) {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_of_the_page_files_are_public() {
        for (path, _, _) in ASSETS {
            assert!(is_public(&Method::GET, path), "{path}");
            assert!(is_public(&Method::HEAD, path), "{path}");
            assert!(!is_public(&Method::POST, path), "{path}");
        }
        assert!(is_public(&Method::GET, "/"));
        for path in [
            "/dashboard",
            "/dashboard/x",
            "/dashboard/app.js/",
            "/dashboard//app.js",
            "/api/v1/stats",
            "/favicon.ico",
            "",
        ] {
            assert!(!is_public(&Method::GET, path), "{path}");
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_uses_no_innerhtml() {
        let (_, _, html) = ASSETS[0];
        assert!(html.contains("<script src=\"app.js\" defer></script>"));
        assert!(!html.contains("<style"), "styles come from app.css");
        for handler in ["onclick", "onload", "onsubmit", "onerror", "javascript:"] {
            assert!(
                !html.contains(handler),
                "no inline event handler: {handler}"
            );
        }
        assert_eq!(html.matches("<script").count(), 1);
        let (_, _, js) = ASSETS[1];
        for banned in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "localStorage",
            "eval(",
        ] {
            assert!(!js.contains(banned), "app.js uses {banned}");
        }
    }
}
