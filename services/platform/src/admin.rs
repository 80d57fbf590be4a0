//! The admin HTTP listener of every process (`[admin] listen`): `/healthz`
//! (the process is alive) and `/readyz` (it takes traffic: not while it
//! shuts down). Metrics and per-dependency readiness hang here next.

use axum::{Router, http::StatusCode, routing::get};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The admin routes; add more with [`Router::merge`] before serving.
pub fn routes(token: CancellationToken) -> Router {
    Router::new().route("/healthz", get(|| async { "ok\n" })).route(
        "/readyz",
        get(move || {
            let token = token.clone();
            async move {
                if token.is_cancelled() {
                    (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                } else {
                    (StatusCode::OK, "ready\n")
                }
            }
        }),
    )
}

/// Serve `routes` on `listener` until `token` is cancelled.
pub async fn serve(listener: TcpListener, routes: Router, token: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, routes).with_graceful_shutdown(async move { token.cancelled().await }).await
}
