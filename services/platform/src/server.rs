//! gRPC server bootstrap: every server carries `grpc.health.v1` and server
//! reflection in both `v1` and `v1alpha` (grpcurl 1.8 speaks only the
//! latter), serves on a bound listener and drains on shutdown within a grace
//! period.

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::layer::util::{Identity, Stack};
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    Error, Result,
    guard::{PanicToStatus, PeerLimitLayer},
};

/// Most calls (streams included) open at once on one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 200;
/// Most calls (streams included) open at once from one peer address.
pub const MAX_CALLS_PER_PEER: usize = 1000;
/// Largest encoded response message; read pages are capped well below it
/// (`eventfold_store::MAX_PAGE_BYTES`).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// HTTP/2 pings on an idle connection, and how long an answer may take
/// before the connection is closed: a peer that vanished (or stopped
/// reading and answering) does not hold its streams and buffers forever.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The layers of every server: panics caught, calls per peer capped.
pub type Layers = Stack<PeerLimitLayer, Stack<CatchPanicLayer<PanicToStatus>, Identity>>;
/// A router of an eventfold server (see [`router`]).
pub type Router = tonic::transport::server::Router<Layers>;

/// A router with health and reflection for the given descriptor sets; add
/// the service's own servers to it. Every server made here has the same
/// limits: keepalive pings, streams per connection and calls per peer
/// capped, pending resets bounded, handler panics answered `INTERNAL`.
pub fn router(descriptor_sets: &[&'static [u8]]) -> Result<(HealthReporter, Router)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let configure = || {
        descriptor_sets.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                // google.rpc error details, so clients can decode them.
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    let v1 = configure().build_v1().map_err(|e| Error::Reflection(e.to_string()))?;
    let v1alpha = configure().build_v1alpha().map_err(|e| Error::Reflection(e.to_string()))?;
    let router = Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_pending_accept_reset_streams(Some(50))
        .http2_max_header_list_size(64 * 1024)
        .layer(crate::guard::catch_panic())
        .layer(PeerLimitLayer::new(MAX_CALLS_PER_PEER))
        .add_service(health)
        .add_service(v1)
        .add_service(v1alpha);
    Ok((reporter, router))
}

/// Serve until `shutdown` resolves, then let in-flight calls finish for at
/// most `grace` (streams are told to end through the service's own shutdown
/// signal before that).
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
        tokio::time::sleep(grace).await;
        let _ = drained_tx.send(());
    });
    let serving = router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
        let _ = stop_rx.await;
    });
    tokio::select! {
        result = serving => result.map_err(Error::from),
        _ = drained_rx => {
            tracing::warn!(grace_secs = grace.as_secs_f64(), "shutdown grace period over; closing remaining calls");
            Ok(())
        }
    }
}

/// Keeps the health of `services` (and of the server as a whole, `""`) in
/// step with `check`, probed every `interval`: NOT_SERVING from the start
/// until the first probe passes, and whenever one fails or takes over 5 s.
pub async fn spawn_health_probe<F, Fut, E>(
    reporter: HealthReporter,
    services: Vec<String>,
    interval: Duration,
    check: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send,
    E: std::fmt::Display,
{
    let names: Vec<String> = services.into_iter().chain([String::new()]).collect();
    for name in &names {
        reporter.set_service_status(name, ServingStatus::NotServing).await;
    }
    tokio::spawn(async move {
        let mut serving = None;
        loop {
            let healthy = match tokio::time::timeout(Duration::from_secs(5), check()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    if serving != Some(false) {
                        tracing::warn!(error = %e, "storage unhealthy: NOT_SERVING");
                    }
                    false
                }
                Err(_) => false,
            };
            if serving != Some(healthy) {
                let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
                for name in &names {
                    reporter.set_service_status(name, status).await;
                }
                if healthy {
                    tracing::info!("storage healthy: SERVING");
                }
                serving = Some(healthy);
            }
            tokio::time::sleep(interval.max(Duration::from_millis(100))).await;
        }
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested");
}
