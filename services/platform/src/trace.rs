//! W3C trace context across the platform: read from gRPC metadata and
//! HTTP headers, written into each event's metadata (`traceparent`), put on
//! Kafka headers by the relay and restored by projections, consumers and
//! saga steps, so that one trace follows an order from the call that
//! created it to the last step of its saga.
//!
//! The `tracing` spans of the process carry OpenTelemetry contexts (see
//! [`crate::telemetry::init`]): these helpers read a span's context as a
//! `traceparent` and make a remote `traceparent` a span's parent. Without
//! the OpenTelemetry layer (in-process tests) they do nothing.

use opentelemetry::{
    Context,
    propagation::{Extractor, TextMapPropagator},
    trace::TraceContextExt,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The metadata key (event metadata, Kafka header, HTTP header) of the
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The vendor part of the W3C trace context.
pub const TRACESTATE: &str = "tracestate";

/// The `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), if it
/// has a valid OpenTelemetry context.
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let otel = context.span();
    let span_context = otel.span_context();
    span_context.is_valid().then(|| {
        format!("00-{}-{}-{:02x}", span_context.trace_id(), span_context.span_id(), span_context.trace_flags().to_u8())
    })
}

/// The `traceparent` of the current span.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&tracing::Span::current())
}

/// Makes the remote context of `traceparent` (and `tracestate`) the
/// parent of `span`; a missing or malformed one leaves `span` a root.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    let Some(traceparent) = traceparent else { return };
    let carrier = Carrier { traceparent, tracestate };
    let context = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
    if context.span().span_context().is_valid() {
        // Only fails when the span is already started, which it is not here.
        let _ = span.set_parent(context);
    }
}

/// Makes the context in `headers` (gRPC metadata or HTTP headers) the
/// parent of `span`.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &http::HeaderMap) {
    let get = |name| headers.get(name).and_then(|v| v.to_str().ok());
    set_parent(span, get(TRACEPARENT), get(TRACESTATE));
}

/// A `traceparent` and `tracestate` as the W3C propagator reads them.
struct Carrier<'a> {
    traceparent: &'a str,
    tracestate: Option<&'a str>,
}

impl Extractor for Carrier<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(self.traceparent),
            TRACESTATE => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_opentelemetry_layer_nothing_is_made_up() {
        let span = tracing::info_span!("call");
        set_parent(&span, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"), None);
        assert_eq!(traceparent_of(&span), None);
        assert_eq!(current_traceparent(), None);
    }
}
