//! The admin HTTP listener of every process (`[admin] listen`): `/healthz`
//! (the process is alive), `/readyz` (it takes traffic: its dependencies
//! answer and it is not shutting down; see [`crate::readiness`]) and
//! `/metrics` (Prometheus).

use std::{net::SocketAddr, sync::Arc};

use axum::{Router, http::StatusCode, response::IntoResponse, routing::get, serve::ListenerExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    readiness::Readiness,
    tls::{Alpn, Tls, TlsListener},
};

/// The admin routes; add more with [`Router::merge`] before serving.
/// `/metrics`: every metric of the process (Prometheus text format), 404
/// when no recorder is installed. `/readyz`: 200 while every required
/// dependency of `readiness` answers and `token` is not cancelled, else
/// 503; one line per dependency either way.
pub fn routes(token: CancellationToken, readiness: Readiness) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|| async {
                match crate::telemetry::render_metrics() {
                    Some(text) => ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
                    None => (StatusCode::NOT_FOUND, "no metrics recorder in this process\n").into_response(),
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let (token, readiness) = (token.clone(), readiness.clone());
                async move {
                    let (ready, text) = readiness.answer(token.is_cancelled());
                    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
                    (status, text)
                }
            }),
        )
}

/// Serve `routes` on `listener` until `token` is cancelled, each request
/// with its connection's peer (`ConnectInfo<SocketAddr>`).
pub async fn serve(listener: TcpListener, routes: Router, token: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, routes.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(async move { token.cancelled().await })
        .await
}

/// Serve `routes` on `listener` until `token` is cancelled, over TLS with
/// the certificates of `tls` when it has one (the REST gateway).
pub async fn serve_tls(
    listener: TcpListener,
    tls: Option<Arc<Tls>>,
    routes: Router,
    token: CancellationToken,
) -> std::io::Result<()> {
    match tls.filter(|tls| tls.serves()) {
        Some(tls) => {
            // tap_io: axum gives the peer of any listener it wraps so.
            let listener = TlsListener::new(listener, tls, Alpn::Http1)?.tap_io(|_| {});
            axum::serve(listener, routes.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(async move { token.cancelled().await })
                .await
        }
        None => serve(listener, routes, token).await,
    }
}
