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
