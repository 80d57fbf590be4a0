//! `[gateway]` of the configuration.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::server::GatewayOptions;

/// The REST gateway (`[gateway]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// Where it listens; unset: `eventfold dev` uses 127.0.0.1:8080 (or a
    /// free port when that one is taken).
    pub listen: Option<SocketAddr>,
    /// Largest request body, in bytes (a larger one is answered 413).
    pub max_body_bytes: usize,
    /// Deadline of a unary call that brings no `X-Timeout-Ms`, in
    /// milliseconds.
    pub default_timeout_ms: u64,
    /// `eventfold serve gateway`: the gRPC server of every service not in
    /// `upstreams`, e.g. `http://eventfold:50051` (`https://…` over TLS,
    /// trusting `[tls] ca_file` and presenting `[tls] cert_file`).
    pub upstream: Option<String>,
    /// `eventfold serve gateway`: the gRPC server of a package's services,
    /// by the package's last part before the version (`orders =
    /// "http://command:50052"` for `eventfold.orders.v1`;
    /// `EVENTFOLD_GATEWAY__UPSTREAMS__ORDERS`), so that each may live in
    /// its own process.
    pub upstreams: BTreeMap<String, String>,
    /// Origins a browser may call the gateway from (CORS), e.g.
    /// `["https://app.example.com"]`; `["*"]` allows any (no credentials
    /// then); empty (the default): no CORS headers, same origin only.
    pub cors_origins: Vec<String>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let options = GatewayOptions::default();
        Self {
            listen: None,
            max_body_bytes: options.max_body_bytes,
            default_timeout_ms: u64::try_from(options.default_timeout.as_millis()).unwrap_or(u64::MAX),
            upstream: None,
            upstreams: BTreeMap::new(),
            cors_origins: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// The gateway's options.
    pub fn options(&self) -> GatewayOptions {
        GatewayOptions {
            max_body_bytes: self.max_body_bytes,
            default_timeout: Duration::from_millis(self.default_timeout_ms),
            cors_origins: self.cors_origins.clone(),
        }
    }
}

/// An upstream URL that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("gateway upstream: {0}")]
pub struct UpstreamError(String);

impl GatewayConfig {
    /// The channels of `upstream` and `upstreams`, each made by `channel`
    /// from its URL (connected lazily: a service that is down answers 503
    /// until it is up; `https://` ones over TLS, see
    /// `eventfold_platform::tls::channel`).
    ///
    /// # Errors
    ///
    /// A URL `channel` refuses, with its reason.
    pub fn upstream_channels(
        &self,
        channel: impl Fn(&str) -> Result<tonic::transport::Channel, String>,
    ) -> Result<crate::Upstreams, UpstreamError> {
        let channel = |url: &str| channel(url).map_err(UpstreamError);
        let mut upstreams = match &self.upstream {
            Some(url) => crate::Upstreams::all(channel(url)?),
            None => crate::Upstreams::default(),
        };
        for (package, url) in &self.upstreams {
            upstreams = upstreams.with_package(package.to_lowercase(), channel(url)?);
        }
        Ok(upstreams)
    }
}
