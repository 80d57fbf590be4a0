//! The whole configuration of the binary: one section per crate, each
//! owned (and documented) by that crate.

use eventfold_platform::config::{AdminConfig, DatabaseConfig, LogConfig, TracingConfig};
use serde::{Deserialize, Serialize};

/// Every section of `eventfold.toml` (and of `EVENTFOLD_*`).
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    pub(crate) log: LogConfig,
    pub(crate) tracing: TracingConfig,
    pub(crate) database: DatabaseConfig,
    pub(crate) admin: AdminConfig,
    pub(crate) eventstore: eventfold_eventstore::Config,
    pub(crate) command: eventfold_command::Config,
    pub(crate) query: eventfold_query::Config,
    pub(crate) projector: eventfold_projector::ProjectorConfig,
    pub(crate) relay: eventfold_relay::Config,
    pub(crate) registry: eventfold_schemas::RegistryConfig,
    pub(crate) saga: eventfold_saga::SagaConfig,
    pub(crate) gateway: eventfold_gateway::GatewayConfig,
    pub(crate) auth: eventfold_platform::auth::AuthConfig,
    pub(crate) rate_limit: eventfold_platform::ratelimit::RateLimitConfig,
    pub(crate) tls: eventfold_platform::tls::TlsConfig,
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), eventfold_platform::Error> {
        self.database.validate()?;
        self.admin.validate()?;
        self.tracing.validate()?;
        // A secret too short or a JWKS file that cannot be read is a usage
        // error before anything starts.
        eventfold_platform::auth::jwt::JwtVerifier::new(&self.auth.jwt)
            .map_err(|e| eventfold_platform::Error::Config(e.to_string()))?;
        self.rate_limit.validate().map_err(|e| eventfold_platform::Error::Config(e.to_string()))?;
        // Certificates that cannot be read or used: a usage error naming the
        // setting.
        eventfold_platform::tls::Tls::load(&self.tls).map_err(|e| eventfold_platform::Error::Config(e.to_string()))?;
        if self.relay.tls && self.tls.ca_file.is_none() && self.tls.client_ca_file.is_none() {
            return Err(eventfold_platform::Error::Config(
                "relay.tls = true needs tls.ca_file (the CAs of the brokers' certificates)".to_owned(),
            ));
        }
        Ok(())
    }

    /// How long a stopping process lets calls and workers finish.
    pub(crate) fn grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.eventstore.shutdown_grace_secs)
    }
}
