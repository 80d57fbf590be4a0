//! The metrics of every gRPC server, recorded by one tower layer
//! ([`GrpcMetricsLayer`], outermost on every [`crate::server::GrpcServer`]):
//!
//! - `eventfold_grpc_server_handled_total{service, method, code}`: calls
//!   ended, by their status code (`OK`, `INVALID_ARGUMENT`, …; `CANCELLED`
//!   when the client went away before the end);
//! - `eventfold_grpc_server_handling_seconds{service, method}`: how long
//!   unary calls took, from the request to the status (streams are counted
//!   above but not timed: their length is the client's choice).
//!
//! Labels are bounded: `service` and `method` come from the descriptor
//! sets of the hosted services (plus health and reflection); a call to
//! any other path is labelled `unknown`, so a client cannot grow the label
//! set with invented paths.
//!
//! The same layer opens each call's server span (`otel.kind = server`,
//! named `service/method`), a child of the caller's W3C trace context
//! (`traceparent` metadata) when it sent one: everything the call does,
//! the command and its append included, happens inside it.

use std::{
    collections::HashMap,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

/// Calls ended, by service, method and status code.
pub const HANDLED: &str = "eventfold_grpc_server_handled_total";
/// Latency of unary calls, by service and method.
pub const HANDLING_SECONDS: &str = "eventfold_grpc_server_handling_seconds";

/// Describes the metrics of the gRPC servers and the TLS listeners (the
/// `# HELP` lines of `/metrics`; the rate limits describe theirs in
/// [`crate::ratelimit::describe`]).
pub fn describe() {
    metrics::describe_counter!(HANDLED, "gRPC calls ended, by service, method and status code");
    metrics::describe_histogram!(HANDLING_SECONDS, "Latency of unary gRPC calls, to the status, in seconds");
    metrics::describe_counter!("eventfold_tls_handshake_failures_total", "TLS handshakes refused or timed out");
}

/// Paths served by every server besides the hosted services, and whether
/// they stream.
const BUILT_IN: [(&str, &str, bool); 4] = [
    ("grpc.health.v1.Health", "Check", false),
    ("grpc.health.v1.Health", "Watch", true),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo", true),
    ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", true),
];

/// The labels of one RPC.
#[derive(Debug)]
struct Rpc {
    service: String,
    method: String,
    streaming: bool,
    /// `service/method`: the name of its server spans.
    span_name: String,
}

impl Rpc {
    fn new(service: &str, method: &str, streaming: bool) -> Self {
        let span_name = format!("{service}/{method}");
        Rpc { service: service.to_owned(), method: method.to_owned(), streaming, span_name }
    }
}

/// Records the metrics of every call (see the module documentation).
/// With metrics off ([`GrpcMetricsLayer::without_metrics`]) it only opens
/// the spans (servers built to measure what the metrics cost).
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer {
    rpcs: Arc<HashMap<String, Rpc>>,
    record: bool,
}

impl GrpcMetricsLayer {
    /// A layer that knows the RPCs of `descriptor_sets` (and health and
    /// reflection) by their paths.
    ///
    /// # Errors
    ///
    /// A set does not decode.
    pub fn from_descriptor_sets(descriptor_sets: &[&[u8]]) -> Result<Self, prost_reflect::DescriptorError> {
        let mut pool = prost_reflect::DescriptorPool::new();
        for set in descriptor_sets {
            pool.decode_file_descriptor_set(*set)?;
        }
        let mut rpcs = HashMap::new();
        for service in pool.services() {
            for method in service.methods() {
                let streaming = method.is_server_streaming() || method.is_client_streaming();
                let rpc = Rpc::new(service.full_name(), method.name(), streaming);
                rpcs.insert(format!("/{}/{}", service.full_name(), method.name()), rpc);
            }
        }
        for (service, method, streaming) in BUILT_IN {
            rpcs.insert(format!("/{service}/{method}"), Rpc::new(service, method, streaming));
        }
        Ok(Self { rpcs: Arc::new(rpcs), record: true })
    }

    /// The same layer, opening spans but recording no metric.
    #[must_use]
    pub fn without_metrics(mut self) -> Self {
        self.record = false;
        self
    }
}

/// An RPC of a path no hosted service has.
static UNKNOWN: std::sync::LazyLock<Rpc> = std::sync::LazyLock::new(|| Rpc::new("unknown", "unknown", false));

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, rpcs: self.rpcs.clone(), record: self.record }
    }
}

/// See [`GrpcMetricsLayer`].
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    rpcs: Arc<HashMap<String, Rpc>>,
    record: bool,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: HttpBody<Data = Bytes> + Send + 'static,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = self.rpcs.get(request.uri().path()).unwrap_or(&UNKNOWN);
        let span = tracing::info_span!(
            "grpc",
            otel.name = %rpc.span_name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %rpc.service,
            rpc.method = %rpc.method,
        );
        crate::trace::set_parent_from_headers(&span, request.headers());
        let response = span.in_scope(|| self.inner.call(request));
        if !self.record {
            return Box::pin(async move { Ok(response.await?.map(Body::new)) }.instrument(span));
        }
        let mut call = Call {
            service: rpc.service.clone(),
            method: rpc.method.clone(),
            timed: !rpc.streaming,
            started: Instant::now(),
            done: false,
        };
        Box::pin(
            async move {
                let response = response.await?;
                // A trailers-only answer (an error before any message) carries
                // its status in the headers.
                if let Some(code) = response.headers().get("grpc-status") {
                    call.end(code.as_bytes());
                    return Ok(response.map(Body::new));
                }
                Ok(response.map(|body| Body::new(Metered { body: Body::new(body), call })))
            }
            .instrument(span),
        )
    }
}

/// One call, recorded once when its status is known (or it is dropped).
#[derive(Debug)]
struct Call {
    service: String,
    method: String,
    /// Whether its latency goes into the histogram (unary calls).
    timed: bool,
    started: Instant,
    done: bool,
}

impl Call {
    /// Records the call with the `grpc-status` value `code`.
    fn end(&mut self, code: &[u8]) {
        let code = std::str::from_utf8(code).ok().and_then(|c| c.parse::<i32>().ok()).map_or("UNKNOWN", code_name);
        self.record(code);
    }

    fn record(&mut self, code: &'static str) {
        if self.done {
            return;
        }
        self.done = true;
        let (service, method) = (std::mem::take(&mut self.service), std::mem::take(&mut self.method));
        if self.timed {
            metrics::histogram!(HANDLING_SECONDS, "service" => service.clone(), "method" => method.clone())
                .record(self.started.elapsed());
        }
        metrics::counter!(HANDLED, "service" => service, "method" => method, "code" => code).increment(1);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // The answer was dropped before its status: the client went away.
        self.record("CANCELLED");
    }
}

/// A response body that records its call when the trailers pass.
struct Metered {
    body: Body,
    call: Call,
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    let code = code.as_bytes().to_vec();
                    self.call.end(&code);
                }
            }
            Poll::Ready(Some(Err(_))) => self.call.record("INTERNAL"),
            Poll::Ready(None) => self.call.record("UNKNOWN"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The canonical name of a gRPC status code (`google.rpc.Code`).
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_canonical_name() {
        let names: Vec<_> = (0..=16).map(code_name).collect();
        assert_eq!(names[0], "OK");
        assert_eq!(names[3], "INVALID_ARGUMENT");
        assert_eq!(names[16], "UNAUTHENTICATED");
        assert_eq!(code_name(17), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 17, "no two codes share a name");
    }
}
