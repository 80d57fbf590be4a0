//! The tower layers every gRPC server runs first, whatever its services:
//!
//! - a panic in a handler is caught, logged with an error id and answered
//!   `INTERNAL` with a generic message (the connection and every other call
//!   on it live on);
//! - calls open at once from one peer address are capped: a call, a server
//!   stream included, holds its slot until its response body is dropped, so
//!   one client cannot hold every subscription or watcher slot of the server.

use std::{
    collections::HashMap,
    net::IpAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{Status, body::Body, transport::server::TcpConnectInfo};
use tower::{Layer, Service};
use tower_http::catch_panic::CatchPanicLayer;

/// Answers a caught panic: `INTERNAL`, a generic message and an error id
/// that the log line carries too (never the panic's text).
#[derive(Debug, Clone, Copy, Default)]
pub struct PanicToStatus;

impl tower_http::catch_panic::ResponseForPanic for PanicToStatus {
    type ResponseBody = Body;

    fn response_for_panic(&mut self, panic: Box<dyn std::any::Any + Send + 'static>) -> http::Response<Body> {
        let id = uuid::Uuid::now_v7().to_string();
        let text = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(error_id = %id, panic = %text, "a request handler panicked");
        crate::status::error_info(
            tonic::Code::Internal,
            format!("internal error (error id {id})"),
            "INTERNAL",
            &[("error_id", id)],
        )
        .into_http()
    }
}

/// The panic guard: [`PanicToStatus`] behind tower-http's `CatchPanic`.
pub fn catch_panic() -> CatchPanicLayer<PanicToStatus> {
    CatchPanicLayer::custom(PanicToStatus)
}

/// Caps the calls open at once per peer IP address.
#[derive(Debug, Clone)]
pub struct PeerLimitLayer {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

impl PeerLimitLayer {
    pub fn new(limit: usize) -> Self {
        Self { open: Arc::default(), limit: limit.max(1) }
    }
}

impl<S> Layer<S> for PeerLimitLayer {
    type Service = PeerLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerLimit { inner, open: self.open.clone(), limit: self.limit }
    }
}

/// See [`PeerLimitLayer`].
#[derive(Debug, Clone)]
pub struct PeerLimit<S> {
    inner: S,
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    limit: usize,
}

/// One open call of a peer; the slot is given back when it is dropped.
#[derive(Debug)]
struct Slot {
    open: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.peer);
            }
        }
    }
}

impl<S> PeerLimit<S> {
    fn take_slot(&self, peer: IpAddr) -> Option<Slot> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(peer).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n = n.saturating_add(1);
        Some(Slot { open: self.open.clone(), peer })
    }
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> Service<http::Request<B>> for PeerLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let peer = request.extensions().get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr);
        let slot = match peer {
            Some(addr) => match self.take_slot(addr.ip()) {
                Some(slot) => Some(slot),
                None => {
                    let limit = self.limit;
                    tracing::debug!(peer = %addr.ip(), limit, "call refused: too many open calls from one peer");
                    let status = crate::status::error_info(
                        tonic::Code::ResourceExhausted,
                        format!("too many calls open at once from this address (at most {limit})"),
                        "TOO_MANY_CALLS",
                        &[("limit", limit.to_string())],
                    );
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            },
            None => None,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            Ok(match slot {
                Some(slot) => response.map(|body| Body::new(Held { body, _slot: slot })),
                None => response,
            })
        })
    }
}

/// A response body that holds its call's slot until it is dropped.
struct Held {
    body: Body,
    _slot: Slot,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A check every call of a server passes before its service (the
/// authentication layer, the rate limits): it may change the request's
/// headers and extensions, or answer the call with a status.
pub trait Gate: Send + Sync + 'static {
    /// The debug line of a refused call.
    const REFUSED: &'static str;

    /// Lets the call through (`Ok`) or answers it with the status.
    fn admit<'a>(
        &'a self,
        request: &'a mut http::request::Parts,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Status>>;
}

/// Runs a [`Gate`] in front of a server's services (none: every call
/// passes).
#[derive(Debug)]
pub struct GateLayer<G> {
    gate: Option<Arc<G>>,
}

impl<G> GateLayer<G> {
    pub fn new(gate: Arc<G>) -> Self {
        Self { gate: Some(gate) }
    }
}

impl<G> Default for GateLayer<G> {
    fn default() -> Self {
        Self { gate: None }
    }
}

impl<G> Clone for GateLayer<G> {
    fn clone(&self) -> Self {
        Self { gate: self.gate.clone() }
    }
}

impl<S, G> Layer<S> for GateLayer<G> {
    type Service = Gated<S, G>;

    fn layer(&self, inner: S) -> Self::Service {
        Gated { inner, gate: self.gate.clone() }
    }
}

/// See [`GateLayer`].
#[derive(Debug)]
pub struct Gated<S, G> {
    inner: S,
    gate: Option<Arc<G>>,
}

impl<S: Clone, G> Clone for Gated<S, G> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone(), gate: self.gate.clone() }
    }
}

impl<S, B, G> Service<http::Request<B>> for Gated<S, G>
where
    S: Service<http::Request<B>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    G: Gate,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(gate) = self.gate.clone() else {
            return Box::pin(self.inner.call(request));
        };
        // The service made ready by `poll_ready` serves this call; a clone
        // takes its place for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (mut parts, body) = request.into_parts();
            match gate.admit(&mut parts).await {
                Ok(()) => inner.call(http::Request::from_parts(parts, body)).await,
                Err(status) => {
                    tracing::debug!(path = parts.uri.path(), code = ?status.code(), "{}", G::REFUSED);
                    Ok(status.into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tonic_types::StatusExt;
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    use super::*;

    fn request(peer: &str) -> http::Request<Body> {
        let mut request = http::Request::new(Body::empty());
        let remote_addr: SocketAddr = peer.parse().expect("address");
        request.extensions_mut().insert(TcpConnectInfo { local_addr: None, remote_addr: Some(remote_addr) });
        request
    }

    fn status_of<B>(response: &http::Response<B>) -> Status {
        Status::from_header_map(response.headers()).expect("a grpc-status in the headers")
    }

    #[tokio::test]
    async fn a_panicking_handler_is_answered_internal_with_an_error_id() {
        let service = ServiceBuilder::new().layer(catch_panic()).service(service_fn(|_: http::Request<Body>| async {
            if true {
                panic!("secret detail: postgres://user:password@db/x");
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
        }));
        let response = service.oneshot(request("10.0.0.1:1")).await.expect("an answer, not a panic");
        let status = status_of(&response);
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(!status.message().contains("secret") && !status.message().contains("postgres"), "{status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INTERNAL");
        assert!(info.metadata.get("error_id").is_some_and(|id| status.message().contains(id.as_str())));
    }

    #[tokio::test]
    async fn calls_per_peer_are_capped_until_their_bodies_are_dropped() {
        /// A response body still being sent (a stream, or a unary answer
        /// not yet written): an ended body gives its slot back at once.
        struct Open;
        impl HttpBody for Open {
            type Data = Bytes;
            type Error = Status;
            fn poll_frame(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
                Poll::Pending
            }
        }
        let layer = PeerLimitLayer::new(2);
        let ok = service_fn(|_: http::Request<Body>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Body::new(Open)))
        });
        let service = ServiceBuilder::new().layer(layer).service(ok);
        let first = service.clone().oneshot(request("10.0.0.1:1")).await.unwrap();
        let second = service.clone().oneshot(request("10.0.0.1:2")).await.unwrap();
        assert!(first.headers().get("grpc-status").is_none() && second.headers().get("grpc-status").is_none());
        let third = service.clone().oneshot(request("10.0.0.1:3")).await.unwrap();
        let status = status_of(&third);
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert_eq!(status.get_details_error_info().expect("ErrorInfo").reason, "TOO_MANY_CALLS");
        let elsewhere = service.clone().oneshot(request("10.0.0.2:1")).await.unwrap();
        assert!(elsewhere.headers().get("grpc-status").is_none(), "another peer has slots of its own");
        drop(first);
        let again = service.clone().oneshot(request("10.0.0.1:4")).await.unwrap();
        assert!(again.headers().get("grpc-status").is_none(), "a finished call gives its slot back");
    }
}
