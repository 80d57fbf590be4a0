//! The REST/JSON gateway of eventfold: every RPC annotated with
//! `google.api.http` in `proto/` is reachable over HTTP, transcoded from the
//! descriptors alone (no per-endpoint code), and forwarded to the gRPC
//! services.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

pub mod config;
pub mod error;
pub mod openapi;
pub mod rules;
pub mod server;
pub mod template;
pub mod transcode;
pub mod upstream;

pub use crate::{
    config::GatewayConfig,
    error::ApiError,
    server::{Gateway, GatewayError, GatewayOptions, openapi_json},
    upstream::Upstreams,
};

/// Describes the REST gateway's metrics (the `# HELP` lines of `/metrics`).
pub fn describe_metrics() {
    metrics::describe_counter!(
        "eventfold_http_server_requests_total",
        "REST calls answered, by operation (unmatched: no RPC at the path) and HTTP status"
    );
    metrics::describe_histogram!(
        "eventfold_http_server_request_duration_seconds",
        "Latency of REST calls to the response's head, in seconds"
    );
}

#[cfg(test)]
mod tests {
    /// The checked-in document is the one the gateway serves.
    #[test]
    fn docs_openapi_json_is_up_to_date() {
        let served = crate::openapi_json(eventfold_proto::FILE_DESCRIPTOR_SET).unwrap();
        let checked_in = include_str!("../../docs/openapi.json");
        assert!(
            served == checked_in,
            "docs/openapi.json is stale: run `cargo run -p eventfold -- openapi > docs/openapi.json`"
        );
    }
}
