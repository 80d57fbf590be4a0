//! `[gateway]` of the configuration.

use std::{net::SocketAddr, time::Duration};

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
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let options = GatewayOptions::default();
        Self {
            listen: None,
            max_body_bytes: options.max_body_bytes,
            default_timeout_ms: u64::try_from(options.default_timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

impl GatewayConfig {
    /// The gateway's options.
    pub fn options(&self) -> GatewayOptions {
        GatewayOptions {
            max_body_bytes: self.max_body_bytes,
            default_timeout: Duration::from_millis(self.default_timeout_ms),
        }
    }
}
