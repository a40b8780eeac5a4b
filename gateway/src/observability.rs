//! The observability listener: `/healthz`, `/readyz` and Prometheus `/metrics`.

use axum::Router;
use axum::extract::State;
use axum::http::header::{ACCEPT, CONTENT_TYPE};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use portcullis_core::metrics::{Exposition, Metrics};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Clone)]
pub struct Health {
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(h): State<Health>| async move {
                if !h.ready.load(Ordering::Relaxed) {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                } else if h.metrics.outbox.full.load(Ordering::Relaxed) != 0 {
                    // Upstream mode: devices are being held back; a load balancer
                    // should send new ones to another replica.
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not ready: the outbox is full\n",
                    )
                } else {
                    (StatusCode::OK, "ready\n")
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(h): State<Health>, headers: HeaderMap| async move {
                let accept = headers.get(ACCEPT).and_then(|v| v.to_str().ok());
                let format = Exposition::negotiate(accept);
                (
                    [(CONTENT_TYPE, format.content_type())],
                    h.metrics.render(format),
                )
            }),
        )
        .with_state(health)
}
