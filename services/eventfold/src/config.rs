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
    pub(crate) dev: DevConfig,
    pub(crate) topics: eventfold_topics::TopicsConfig,
}

/// `[dev]`: where `eventfold dev` keeps its data and on what.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DevConfig {
    /// The data directory (relative paths from the working directory).
    pub(crate) data_dir: std::path::PathBuf,
    /// Keep nothing: the in-memory log (`--ephemeral`).
    pub(crate) ephemeral: bool,
    /// Run a private PostgreSQL cluster under the data directory when the
    /// server binaries are found; `false`: the file-system log.
    pub(crate) postgres: bool,
    /// Where to look for the PostgreSQL server binaries (`initdb`,
    /// `pg_ctl`, `postgres`) after `PATH` and `pg_config --bindir`; a `*`
    /// stands for one path component (the highest version is taken).
    pub(crate) postgres_search: Vec<String>,
    /// When the file-system log forces its writes to disk: `always` (each
    /// commit), `batch(MS)` or `never`.
    pub(crate) fsync: String,
}

impl Default for DevConfig {
    fn default() -> Self {
        Self {
            data_dir: "data".into(),
            ephemeral: false,
            postgres: true,
            postgres_search: [
                "/usr/lib/postgresql/*/bin",
                "/usr/pgsql-*/bin",
                "/usr/local/pgsql/bin",
                "/opt/homebrew/opt/postgresql@*/bin",
                "/opt/homebrew/opt/postgresql/bin",
                "/usr/local/opt/postgresql@*/bin",
                "/usr/local/opt/postgresql/bin",
                "/opt/homebrew/bin",
                "/usr/local/bin",
            ]
            .map(str::to_owned)
            .to_vec(),
            fsync: "always".into(),
        }
    }
}

impl Config {
    pub(crate) fn validate(&self) -> Result<(), eventfold_platform::Error> {
        self.database.validate()?;
        self.dev
            .fsync
            .parse::<eventfold_store::Fsync>()
            .map_err(|e| eventfold_platform::Error::Config(format!("dev.fsync {e}")))?;
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
