//! gRPC server bootstrap: every server carries `grpc.health.v1` and server
//! reflection in both `v1` and `v1alpha` (grpcurl 1.8 speaks only the
//! latter), serves on a bound listener and drains on shutdown within a grace
//! period.

use std::{convert::Infallible, future::Future, sync::Arc, time::Duration};

use futures_util::future::BoxFuture;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    server::NamedService,
    service::{Routes, RoutesBuilder},
    transport::{Server, server::Connected},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::layer::util::{Identity, Stack};
use tower_http::catch_panic::CatchPanicLayer;

use crate::{
    Error, Result,
    auth::{AuthConfig, AuthLayer, Authenticator, KeyVerifier, policy::Policy},
    guard::{PanicToStatus, PeerLimitLayer},
    metrics::GrpcMetricsLayer,
    ratelimit::{AuthFailures, RateLimitConfig, RateLimitLayer, RateLimiter, RouteClasses},
    readiness::Readiness,
    tls::{Alpn, Tls, TlsListener},
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

/// The layers of every server: every call counted and timed, panics
/// caught, calls per peer capped, every call authenticated and authorized,
/// then rate limited (per principal, or per address for anonymous calls).
pub type Layers = Stack<
    RateLimitLayer,
    Stack<AuthLayer, Stack<PeerLimitLayer, Stack<CatchPanicLayer<PanicToStatus>, Stack<GrpcMetricsLayer, Identity>>>>,
>;
/// A router of an eventfold server (see [`GrpcServer`]).
pub type Router = tonic::transport::server::Router<Layers>;

/// A router with health and reflection (unless `reflection` is off) for the
/// given descriptor sets, and `routes` (the services a process hosts).
/// Every call is counted and timed by `metrics` (see [`crate::metrics`]).
/// Every server made here has the same limits: keepalive pings, streams per
/// connection and calls per peer capped, pending resets bounded, handler
/// panics answered `INTERNAL`, and every call through `authenticator`, then
/// through `rate_limit`.
fn router(
    descriptor_sets: &[&'static [u8]],
    routes: Routes,
    authenticator: Arc<Authenticator>,
    reflection: bool,
    rate_limit: RateLimitLayer,
    metrics: GrpcMetricsLayer,
) -> Result<(HealthReporter, Router)> {
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
        .layer(metrics)
        .layer(crate::guard::catch_panic())
        .layer(PeerLimitLayer::new(MAX_CALLS_PER_PEER))
        .layer(AuthLayer::new(authenticator))
        .layer(rate_limit)
        .add_routes(routes)
        .add_service(health);
    let router = if reflection { router.add_service(v1).add_service(v1alpha) } else { router };
    Ok((reporter, router))
}

/// A storage check of a group of services: `Err` (with text for the log)
/// marks them NOT_SERVING.
pub type HealthCheck = Arc<dyn Fn() -> BoxFuture<'static, std::result::Result<(), String>> + Send + Sync + 'static>;

/// The one gRPC server of a process: health, reflection (v1 and v1alpha)
/// and every service the process hosts, added the same way whatever the
/// process (`eventfold dev` adds them all, each `serve X` its own).
#[derive(Default)]
pub struct GrpcServer {
    routes: RoutesBuilder,
    names: Vec<String>,
    /// Services answered by a [`Refusing`] stand-in: NOT_SERVING in the
    /// health service, not counted as hosted.
    refused: Vec<String>,
    descriptor_sets: Vec<&'static [u8]>,
    checks: Vec<(Vec<String>, HealthCheck)>,
    health_interval: Option<Duration>,
    auth: Option<AuthSettings>,
    rate_limit: Option<(RateLimitConfig, Option<fred::clients::Client>)>,
    tls: Option<Arc<Tls>>,
    /// Whether calls are counted and timed (on unless turned off).
    metrics_off: bool,
}

/// How a server authenticates, set by [`GrpcServer::authenticate`].
struct AuthSettings {
    config: AuthConfig,
    enabled: bool,
    keys: Option<Arc<dyn KeyVerifier>>,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer").field("services", &self.names).finish_non_exhaustive()
    }
}

impl GrpcServer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Hosts `service`; reflection describes it from `descriptor_set`.
    pub fn add_service<S>(&mut self, descriptor_set: &'static [u8], service: S) -> &mut Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.names.push(S::NAME.to_owned());
        if !self.descriptor_sets.iter().any(|d| std::ptr::eq(*d, descriptor_set)) {
            self.descriptor_sets.push(descriptor_set);
        }
        self
    }

    /// Answers every call of service `N` with `status` (a service this
    /// process cannot offer, e.g. FAILED_PRECONDITION with what to
    /// install); its health is NOT_SERVING and [`GrpcServer::hosts`] does
    /// not count it.
    pub fn add_refusing<N: ServiceName>(&mut self, descriptor_set: &'static [u8], status: tonic::Status) -> &mut Self {
        self.routes.add_service(Refusing::<N>::new(status));
        self.refused.push(N::NAME.to_owned());
        if !self.descriptor_sets.iter().any(|d| std::ptr::eq(*d, descriptor_set)) {
            self.descriptor_sets.push(descriptor_set);
        }
        self
    }

    /// The health of `services` follows `check`, probed every `interval`
    /// (the shortest interval given wins): NOT_SERVING from the start until
    /// the first probe passes, and whenever one fails or takes over 5 s.
    pub fn health_check<F, Fut>(&mut self, services: &[&str], interval: Duration, check: F) -> &mut Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
    {
        let check: HealthCheck = Arc::new(move || Box::pin(check()));
        self.checks.push((services.iter().map(|s| (*s).to_owned()).collect(), check));
        self.health_interval = Some(self.health_interval.map_or(interval, |i| i.min(interval)));
        self
    }

    /// Authenticate every call as `config` says, when `enabled` (else
    /// nobody is asked for credentials), with API keys looked up in `keys`.
    /// The roles each RPC needs come from the descriptor sets of the
    /// services hosted: a hosted eventfold RPC without a rule stops the
    /// server from starting. Without this call nobody is asked either. In
    /// every case a client's own `x-eventfold-principal` is removed.
    pub fn authenticate(
        &mut self,
        config: &AuthConfig,
        enabled: bool,
        keys: Option<Arc<dyn KeyVerifier>>,
    ) -> &mut Self {
        self.auth = Some(AuthSettings { config: config.clone(), enabled, keys });
        self
    }

    /// Limit the calls of every caller as `config` says (unless
    /// `config.enabled` is false), per route class read from the
    /// descriptor sets of the services hosted, shared with other processes
    /// through `redis` when given (see [`crate::ratelimit`]). Without this
    /// call nothing is limited (in-process servers of tests and benches).
    pub fn rate_limit(&mut self, config: &RateLimitConfig, redis: Option<fred::clients::Client>) -> &mut Self {
        self.rate_limit = Some((config.clone(), redis));
        self
    }

    /// Serve over TLS with the certificates of `tls` (mutual TLS when it
    /// has client CAs), when it has a certificate; else in plain text.
    pub fn tls(&mut self, tls: Option<Arc<Tls>>) -> &mut Self {
        self.tls = tls.filter(|tls| tls.serves());
        self
    }

    /// The server's overall health (`""`) follows `readiness` too: NOT_SERVING
    /// while a required dependency of the process does not answer.
    pub fn readiness(&mut self, readiness: Readiness) -> &mut Self {
        self.health_check(&[], Duration::from_secs(1), move || {
            let ready = readiness.is_ready();
            async move { if ready { Ok(()) } else { Err("a required dependency does not answer".to_owned()) } }
        })
    }

    /// Whether every call is counted and timed (see [`crate::metrics`]); on
    /// unless turned off here (the bench that measures what it costs).
    pub fn metrics(&mut self, on: bool) -> &mut Self {
        self.metrics_off = !on;
        self
    }

    /// The metrics layer of the services hosted.
    fn metrics_layer(&self) -> Result<GrpcMetricsLayer> {
        let layer =
            GrpcMetricsLayer::from_descriptor_sets(&self.descriptor_sets).map_err(|e| Error::Config(e.to_string()))?;
        Ok(if self.metrics_off { layer.without_metrics() } else { layer })
    }

    /// The rate limits of the services hosted, if any.
    fn rate_limiter(&self) -> Result<RateLimitLayer> {
        let Some((config, redis)) = &self.rate_limit else {
            return Ok(RateLimitLayer::default());
        };
        if !config.enabled {
            return Ok(RateLimitLayer::default());
        }
        let classes =
            RouteClasses::from_descriptor_sets(&self.descriptor_sets).map_err(|e| Error::Config(e.to_string()))?;
        let limiter = RateLimiter::new(config, classes, redis.clone()).map_err(|e| Error::Config(e.to_string()))?;
        Ok(RateLimitLayer::new(Arc::new(limiter)))
    }

    /// The authenticator of the services hosted.
    fn authenticator(&self) -> Result<(Arc<Authenticator>, bool)> {
        let Some(settings) = &self.auth else {
            return Ok((Arc::new(Authenticator::disabled()), true));
        };
        let reflection = settings.config.reflection;
        if !settings.enabled {
            return Ok((Arc::new(Authenticator::disabled()), reflection));
        }
        let policy = Policy::from_descriptor_sets(&self.descriptor_sets).map_err(|e| Error::Config(e.to_string()))?;
        let mut authenticator = Authenticator::new(&settings.config, policy, settings.keys.clone())
            .map_err(|e| Error::Config(e.to_string()))?;
        // With rate limits on, failed authentications are limited too.
        if let Some((limits, _)) = self.rate_limit.as_ref().filter(|(limits, _)| limits.enabled) {
            let failures = AuthFailures::new(limits).map_err(|e| Error::Config(e.to_string()))?;
            authenticator = authenticator.limit_failures(Arc::new(failures));
        }
        Ok((Arc::new(authenticator), reflection))
    }

    /// The names of the services hosted so far.
    pub fn service_names(&self) -> &[String] {
        &self.names
    }

    /// Whether a service whose name starts with `prefix` is hosted.
    pub fn hosts(&self, prefix: &str) -> bool {
        self.names.iter().any(|n| n.starts_with(prefix))
    }

    /// Serve on `listener` until `token` is cancelled, then let in-flight
    /// calls finish for at most `grace` (streams watch the same token and
    /// end first).
    pub async fn serve(self, listener: TcpListener, token: CancellationToken, grace: Duration) -> Result<()> {
        let (authenticator, reflection) = self.authenticator()?;
        let rate_limit = self.rate_limiter()?;
        let metrics = self.metrics_layer()?;
        let (reporter, router) =
            router(&self.descriptor_sets, self.routes.routes(), authenticator, reflection, rate_limit, metrics)?;
        // NOT_SERVING before the first call can arrive, until a probe passes.
        for name in self.checks.iter().flat_map(|(names, _)| names).chain(std::iter::once(&String::new())) {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        for name in &self.refused {
            reporter.set_service_status(name, ServingStatus::NotServing).await;
        }
        let probe =
            tokio::spawn(probe_health(reporter, self.checks, self.health_interval.unwrap_or(Duration::from_secs(5))));
        let shutdown = async move { token.cancelled().await };
        let result = match self.tls {
            Some(tls) => {
                let incoming = TlsListener::new(listener, tls, Alpn::H2).map_err(|e| Error::Config(e.to_string()))?;
                serve(router, incoming, shutdown, grace).await
            }
            None => serve(router, TcpListenerStream::new(listener), shutdown, grace).await,
        };
        probe.abort();
        result
    }
}

/// Keeps each group's health in step with its check, and the server's
/// (`""`) with all of them.
async fn probe_health(reporter: HealthReporter, checks: Vec<(Vec<String>, HealthCheck)>, interval: Duration) {
    let mut serving: Vec<Option<bool>> = vec![None; checks.len()];
    let mut overall = None;
    loop {
        for ((names, check), was) in checks.iter().zip(serving.iter_mut()) {
            let healthy = match tokio::time::timeout(Duration::from_secs(5), check()).await {
                Ok(Ok(())) => true,
                Ok(Err(e)) => {
                    if *was != Some(false) {
                        tracing::warn!(error = %e, services = ?names, "storage unhealthy: NOT_SERVING");
                    }
                    false
                }
                Err(_) => false,
            };
            if *was != Some(healthy) {
                let status = if healthy { ServingStatus::Serving } else { ServingStatus::NotServing };
                for name in names {
                    reporter.set_service_status(name, status).await;
                }
                if healthy {
                    tracing::info!(services = ?names, "storage healthy: SERVING");
                }
                *was = Some(healthy);
            }
        }
        let all = serving.iter().all(|s| *s == Some(true));
        if overall != Some(all) {
            let status = if all { ServingStatus::Serving } else { ServingStatus::NotServing };
            reporter.set_service_status("", status).await;
            overall = Some(all);
        }
        tokio::time::sleep(interval.max(Duration::from_millis(100))).await;
    }
}

/// Serve `router` until `shutdown` resolves, then let in-flight calls finish for at
/// most `grace` (streams are told to end through the service's own shutdown
/// signal before that).
async fn serve<I, IO, IE>(
    router: Router,
    incoming: I,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> Result<()>
where
    I: futures_util::Stream<Item = std::result::Result<IO, IE>>,
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Connected + Unpin + Send + 'static,
    IO::ConnectInfo: Clone + Send + Sync + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
        tokio::time::sleep(grace).await;
        let _ = drained_tx.send(());
    });
    let serving = router.serve_with_incoming_shutdown(incoming, async move {
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

/// The name of a gRPC service that a [`Refusing`] stands in for.
pub trait ServiceName: Send + Sync + 'static {
    const NAME: &'static str;
}

/// A gRPC service this process cannot offer, answering every call with one
/// status (say, FAILED_PRECONDITION with what to install) rather than
/// UNIMPLEMENTED without a word.
pub struct Refusing<N> {
    status: Arc<tonic::Status>,
    name: std::marker::PhantomData<fn() -> N>,
}

impl<N> Refusing<N> {
    pub fn new(status: tonic::Status) -> Self {
        Self { status: Arc::new(status), name: std::marker::PhantomData }
    }
}

impl<N> Clone for Refusing<N> {
    fn clone(&self) -> Self {
        Self { status: self.status.clone(), name: std::marker::PhantomData }
    }
}

impl<N: ServiceName> NamedService for Refusing<N> {
    const NAME: &'static str = N::NAME;
}

impl<N> tower::Service<http::Request<tonic::body::Body>> for Refusing<N> {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::future::Ready<std::result::Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::result::Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        let status = tonic::Status::with_details(
            self.status.code(),
            self.status.message(),
            self.status.details().to_vec().into(),
        );
        std::future::ready(Ok(status.into_http()))
    }
}
