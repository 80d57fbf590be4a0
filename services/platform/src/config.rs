//! Layered configuration: defaults → TOML file → `EVENTFOLD_*` environment
//! (`__` separates nested keys, e.g. `EVENTFOLD_DATABASE__URL`) → command
//! line flags. Every environment variable eventfold reads is listed in
//! [`ENV_VARS`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use eventfold_store::TlsMode;

use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{Error, Result};

/// The prefix of every configuration environment variable.
pub const ENV_PREFIX: &str = "EVENTFOLD_";

/// Every environment variable eventfold reads, with what it sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("EVENTFOLD_CONFIG", "path of a TOML configuration file"),
    ("EVENTFOLD_LOG__FORMAT", "log format: pretty or json"),
    ("EVENTFOLD_LOG__FILTER", "log filter, e.g. info or eventfold_store=debug"),
    ("EVENTFOLD_DATABASE__URL", "PostgreSQL URL of the event store"),
    ("EVENTFOLD_DATABASE__POOL_SIZE", "connections for reads"),
    ("EVENTFOLD_DATABASE__WRITERS", "group-commit writer connections"),
    ("EVENTFOLD_DATABASE__REQUEST_RETENTION_HOURS", "hours request ids are remembered (default 168)"),
    (
        "EVENTFOLD_DATABASE__WORKER_POOL_SIZE",
        "connections of the background workers' pool and of the sagas' (default 8)",
    ),
    ("EVENTFOLD_DATABASE__CONNECT_TIMEOUT_MS", "longest wait for a PostgreSQL connection (default 5000)"),
    ("EVENTFOLD_DATABASE__TLS", "TLS to PostgreSQL: prefer (default), disable, require or verify-full"),
    ("EVENTFOLD_DATABASE__CA_FILE", "PEM file of the CAs that tls = verify-full trusts"),
    ("EVENTFOLD_DEV__DATA_DIR", "where `eventfold dev` keeps its data (default ./data)"),
    ("EVENTFOLD_DEV__EPHEMERAL", "`eventfold dev` keeps nothing: the in-memory log"),
    ("EVENTFOLD_DEV__POSTGRES", "`eventfold dev` runs a private PostgreSQL when its binaries are found (default true)"),
    ("EVENTFOLD_DEV__FSYNC", "fsync of `eventfold dev`'s file-system log: always (default), batch(MS) or never"),
    ("EVENTFOLD_TOPICS__FS_ROOT", "where fs topics may live (dev: <data_dir>/topics, else /var/lib/eventfold/topics)"),
    ("EVENTFOLD_TOPICS__MAX_TOPICS", "most topics (default 1000)"),
    ("EVENTFOLD_ADMIN__LISTEN", "admin HTTP listener (/healthz, /readyz, /metrics), e.g. 0.0.0.0:9464"),
    (
        "EVENTFOLD_TRACING__OTLP_ENDPOINT",
        "OTLP/gRPC collector of the spans, e.g. http://jaeger:4317 (unset: no export)",
    ),
    ("EVENTFOLD_TRACING__SAMPLING_RATIO", "share of new traces sampled, 0.0 to 1.0 (default 1.0)"),
    ("EVENTFOLD_TRACING__SERVICE_NAME", "service.name of the spans (default eventfold-<service>)"),
    ("EVENTFOLD_ADMIN__READINESS_INTERVAL_MS", "how often readiness checks every dependency (default 1000)"),
    ("EVENTFOLD_ADMIN__OPTIONAL", "dependencies /readyz reports without requiring them, e.g. [\"redis\"]"),
    ("EVENTFOLD_EVENTSTORE__LISTEN", "gRPC listen address of the event store"),
    ("EVENTFOLD_EVENTSTORE__SHUTDOWN_GRACE_SECS", "seconds to drain streams on shutdown"),
    ("EVENTFOLD_COMMAND__LISTEN", "gRPC listen address of `eventfold serve command`"),
    ("EVENTFOLD_COMMAND__SNAPSHOT_EVERY", "a snapshot every this many events of an aggregate (0: never)"),
    ("EVENTFOLD_COMMAND__MAX_ATTEMPTS", "attempts of a command that meets a concurrency conflict"),
    ("EVENTFOLD_QUERY__LISTEN", "gRPC listen address of `eventfold serve query`"),
    ("EVENTFOLD_QUERY__POOL_SIZE", "PostgreSQL connections of the query services"),
    ("EVENTFOLD_QUERY__MAX_WAIT_MS", "longest read-your-writes wait of a query (a shorter call deadline wins)"),
    ("EVENTFOLD_QUERY__MAX_WATCHERS_PER_PEER", "WatchOrder streams one client address may hold open (default 100)"),
    (
        "EVENTFOLD_QUERY__MAX_LAG_EVENTS",
        "a query service is NOT_SERVING while a projection it reads is further behind (0: never)",
    ),
    ("EVENTFOLD_QUERY__CACHE__URL", "Redis URL of the query cache (unset: no cache)"),
    ("EVENTFOLD_QUERY__CACHE__KEY_PREFIX", "prefix of every cache key"),
    ("EVENTFOLD_QUERY__CACHE__TIMEOUT_MS", "longest Redis call before it counts as failed"),
    ("EVENTFOLD_QUERY__CACHE__BREAKER_COOL_DOWN_MS", "how long the cache breaker stays open before a trial"),
    ("EVENTFOLD_PROJECTOR__BATCH_SIZE", "most events a projector applies in one transaction"),
    ("EVENTFOLD_PROJECTOR__BATCH_TIME_MS", "longest a projector batch keeps applying before it commits"),
    ("EVENTFOLD_PROJECTOR__MAX_ATTEMPTS", "attempts of an event before the projector parks it"),
    ("EVENTFOLD_PROJECTOR__SOURCE", "where projectors read events: log (default) or kafka"),
    ("EVENTFOLD_RELAY__BROKERS", "Kafka bootstrap brokers of the relay and the consumers, e.g. [\"kafka:9092\"]"),
    ("EVENTFOLD_RELAY__PARTITIONS", "partitions of the topics the relay creates"),
    ("EVENTFOLD_RELAY__BATCH_SIZE", "most events the relay sends per batch"),
    ("EVENTFOLD_RELAY__TLS", "brokers over TLS (relay, consumers, Kafka-fed projectors), trusting tls.ca_file"),
    ("EVENTFOLD_REGISTRY__URL", "Schema Registry URL, e.g. http://schema-registry:8081"),
    ("EVENTFOLD_SAGA__LISTEN", "gRPC listen address of `eventfold serve saga`"),
    ("EVENTFOLD_SAGA__ENABLED", "whether the sagas run (intake with the projectors, orchestrator on PostgreSQL)"),
    ("EVENTFOLD_SAGA__ORCHESTRATOR__STEP_TIMEOUT_MS", "longest a saga step may take before it times out"),
    ("EVENTFOLD_SAGA__ORCHESTRATOR__CONCURRENCY", "sagas the orchestrator runs at once"),
    ("EVENTFOLD_SAGA__SANDBOX__LATENCY_MS", "latency of each call to the sandbox payment provider and carrier"),
    ("EVENTFOLD_SAGA__MAX_WATCHERS_PER_PEER", "WatchSaga streams one client address may hold open (default 100)"),
    ("EVENTFOLD_GATEWAY__LISTEN", "HTTP listen address of the REST gateway (dev: 127.0.0.1:8080)"),
    ("EVENTFOLD_GATEWAY__UPSTREAM", "`eventfold serve gateway`: the gRPC server of every service"),
    (
        "EVENTFOLD_GATEWAY__UPSTREAMS__<PACKAGE>",
        "`eventfold serve gateway`: the gRPC server of one package, e.g. ORDERS",
    ),
    (
        "EVENTFOLD_GATEWAY__CORS_ORIGINS",
        "origins allowed to call the gateway from a browser, e.g. [\"https://app.example\"]",
    ),
    ("EVENTFOLD_AUTH__ENABLED", "whether every call must authenticate (serve: true, dev: false unless --auth)"),
    ("EVENTFOLD_AUTH__REFLECTION", "whether server reflection is served (default true)"),
    ("EVENTFOLD_AUTH__JWT__HS256_SECRET", "shared secret of HS256 bearer tokens (at least 32 bytes)"),
    ("EVENTFOLD_AUTH__JWT__JWKS_FILE", "JWKS file with the RS256/ES256 public keys of bearer tokens"),
    ("EVENTFOLD_AUTH__JWT__JWKS_URL", "JWKS URL with the RS256/ES256 public keys of bearer tokens"),
    ("EVENTFOLD_AUTH__JWT__ISSUER", "the iss every bearer token must carry (unset: not checked)"),
    ("EVENTFOLD_AUTH__JWT__AUDIENCE", "an aud every bearer token must carry (unset: not checked)"),
    ("EVENTFOLD_AUTH__JWT__ROLES_CLAIM", "the claim with the caller's roles (default roles)"),
    ("EVENTFOLD_AUTH__JWT__LEEWAY_SECS", "clock skew allowed on exp and nbf (default 30)"),
    ("EVENTFOLD_AUTH__JWT__JWKS_REFRESH_SECS", "the JWKS is read again at most this often (default 30)"),
    ("EVENTFOLD_RATE_LIMIT__ENABLED", "whether calls are rate limited per caller and route class (default true)"),
    ("EVENTFOLD_RATE_LIMIT__READS__PER_SECOND", "calls a second of GET-bound RPCs per caller (default 1000)"),
    ("EVENTFOLD_RATE_LIMIT__READS__BURST", "calls at once of GET-bound RPCs per caller (default 2000)"),
    ("EVENTFOLD_RATE_LIMIT__WRITES__PER_SECOND", "calls a second of other unary RPCs per caller (default 500)"),
    ("EVENTFOLD_RATE_LIMIT__WRITES__BURST", "calls at once of other unary RPCs per caller (default 1000)"),
    ("EVENTFOLD_RATE_LIMIT__STREAMS__PER_SECOND", "streams opened a second per caller (default 20)"),
    ("EVENTFOLD_RATE_LIMIT__STREAMS__BURST", "streams opened at once per caller (default 100)"),
    ("EVENTFOLD_RATE_LIMIT__REDIS_URL", "Redis URL that every process shares its limits through (unset: per process)"),
    ("EVENTFOLD_RATE_LIMIT__KEY_PREFIX", "prefix of the rate limits' Redis keys (default eventfold:)"),
    ("EVENTFOLD_RATE_LIMIT__TIMEOUT_MS", "longest wait for Redis before on_redis_down applies (default 50)"),
    ("EVENTFOLD_RATE_LIMIT__REDIS_RETRY_MS", "after a Redis failure, how long it is not asked (default 1000)"),
    ("EVENTFOLD_RATE_LIMIT__ON_REDIS_DOWN", "while Redis fails: local (default), allow or deny"),
    (
        "EVENTFOLD_RATE_LIMIT__TRUSTED_PROXIES",
        "peers whose x-forwarded-for names the caller, e.g. [\"10.0.0.0/8\"] (dev: loopback)",
    ),
    ("EVENTFOLD_RATE_LIMIT__AUTH_FAILURES__PER_SECOND", "failed authentications a second per address (default 10)"),
    ("EVENTFOLD_RATE_LIMIT__AUTH_FAILURES__BURST", "failed authentications at once per address (default 100)"),
    ("EVENTFOLD_RATE_LIMIT__MAX_LOCAL_KEYS", "most rate limit buckets a process tracks itself (default 100000)"),
    ("EVENTFOLD_TLS__CERT_FILE", "PEM certificate chain: every gRPC and REST listener speaks TLS with it"),
    ("EVENTFOLD_TLS__KEY_FILE", "PEM private key of tls.cert_file"),
    ("EVENTFOLD_TLS__CLIENT_CA_FILE", "PEM CAs whose client certificates gRPC callers must present (mutual TLS)"),
    ("EVENTFOLD_TLS__CA_FILE", "PEM CAs trusted when calling other services over TLS (default: client_ca_file)"),
    ("EVENTFOLD_TLS__RELOAD_SECS", "how often the TLS files are read again (default 10; 0: only on SIGHUP)"),
    ("EVENTFOLD_TEST_DATABASE_URL", "tests only: use this PostgreSQL server instead of a throw-away one"),
    ("EVENTFOLD_TEST_REDIS_URL", "tests only: use this Redis server instead of a throw-away one"),
    ("EVENTFOLD_TEST_KAFKA", "tests only: use this Kafka-protocol broker (host:port) where a test needs no own one"),
    ("EVENTFOLD_KAFKA_BIN", "tests only: the broker binary the tests start (default: the pinned tansu)"),
    ("EVENTFOLD_AZURITE_BIN", "tests only: the Azurite (azurite-blob) the tests start (default: the pinned one)"),
    ("EVENTFOLD_TOOLS_DIR", "tests only: where tests/run caches the pinned tools"),
    ("EVENTFOLD_GRPCURL", "tests only: the grpcurl binary of the black-box tests"),
    ("EVENTFOLD_SCHEMATHESIS", "tests only: the schemathesis binary of the REST gateway's tests"),
    ("EVENTFOLD_API_PYTHON", "tests only: the Python with openapi-spec-validator of the REST gateway's tests"),
];

/// Load `T`: its defaults, then `file` (if any), then the environment, then
/// `overrides` (command line flags; only the keys it serializes are set).
pub fn load<T, O>(file: Option<&Path>, overrides: &O) -> Result<T>
where
    T: Serialize + DeserializeOwned + Default,
    O: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(file) = file {
        if !file.exists() {
            return Err(Error::Config(format!("configuration file {} does not exist", file.display())));
        }
        figment = figment.merge(Toml::file(file));
    }
    figment = figment
        .merge(
            Env::prefixed(ENV_PREFIX)
                .ignore(&[
                    "CONFIG",
                    "TEST_DATABASE_URL",
                    "TEST_REDIS_URL",
                    "TEST_KAFKA",
                    "KAFKA_BIN",
                    "AZURITE_BIN",
                    "GRPCURL",
                    "TOOLS_DIR",
                    "SCHEMATHESIS",
                    "API_PYTHON",
                ])
                .split("__"),
        )
        .merge(Serialized::defaults(overrides));
    figment.extract().map_err(|e| Error::Config(e.to_string()))
}

/// The configuration file named by `EVENTFOLD_CONFIG`, if any.
pub fn config_file_from_env() -> Option<std::path::PathBuf> {
    std::env::var_os("EVENTFOLD_CONFIG").map(Into::into)
}

/// The admin HTTP listener of a process (`[admin]`): `/healthz`, `/readyz`
/// and `/metrics`; and how readiness is probed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where it listens; unset: no admin listener (`eventfold dev` uses
    /// 127.0.0.1:9464 when unset).
    pub listen: Option<SocketAddr>,
    /// How often every dependency is checked for readiness.
    pub readiness_interval_ms: u64,
    /// Dependencies (`postgresql`, `redis`, `kafka`, `registry`) that
    /// `/readyz` reports without letting them decide readiness.
    pub optional: Vec<String>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: None, readiness_interval_ms: 1000, optional: Vec::new() }
    }
}

/// The dependencies readiness knows.
pub const DEPENDENCIES: [&str; 4] = ["postgresql", "redis", "kafka", "registry"];

impl AdminConfig {
    /// Whether dependency `name` decides readiness.
    pub fn requires(&self, name: &str) -> bool {
        !self.optional.iter().any(|o| o == name)
    }

    /// Refuses an unknown dependency name in `optional`.
    pub fn validate(&self) -> Result<()> {
        match self.optional.iter().find(|o| !DEPENDENCIES.contains(&o.as_str())) {
            Some(unknown) => Err(Error::Config(format!(
                "admin.optional: unknown dependency {unknown:?} (known: {})",
                DEPENDENCIES.join(", ")
            ))),
            None => Ok(()),
        }
    }
}

/// Logging settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` (human) or `json` (one object per line, for collectors).
    pub format: LogFormat,
    /// An `EnvFilter` directive, e.g. `info,eventfold_store=debug`.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, filter: "info".to_owned() }
    }
}

/// Traces (`[tracing]`): W3C trace context is always read from calls,
/// stored in events and carried through Kafka; spans are exported over
/// OTLP (gRPC) only when `otlp_endpoint` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// OTLP/gRPC endpoint of a collector (Jaeger, the OpenTelemetry
    /// Collector), e.g. `http://jaeger:4317`; unset: nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// Share of new traces sampled, 0.0 to 1.0 (a call with a sampled
    /// parent is always sampled).
    pub sampling_ratio: f64,
    /// `service.name` of the spans; unset: `eventfold-<what the process runs>`.
    pub service_name: Option<String>,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self { otlp_endpoint: None, sampling_ratio: 1.0, service_name: None }
    }
}

impl TracingConfig {
    /// Refuses a ratio outside 0–1 and an endpoint that is not an http(s) URL.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            return Err(Error::Config(format!(
                "tracing.sampling_ratio: {} is not between 0.0 and 1.0",
                self.sampling_ratio
            )));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(Error::Config("tracing.otlp_endpoint: not an http:// or https:// URL".to_owned()));
        }
        Ok(())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// libpq-style URL; required by the PostgreSQL-backed services.
    pub url: Option<String>,
    /// Connections for reads and administrative calls.
    pub pool_size: u32,
    /// Writer connections of the group commit.
    pub writers: usize,
    /// Hours request ids (AIP-155) are remembered: a retry within them gets
    /// the first answer; older ids are pruned.
    pub request_retention_hours: u64,
    /// Connections of the background workers (projectors, relay, consumers)
    /// and of the sagas, each a pool of its own.
    pub worker_pool_size: u32,
    /// Longest wait for a connection, in milliseconds.
    pub connect_timeout_ms: u64,
    /// TLS to the server: `prefer` (default), `disable`, `require` or
    /// `verify-full` (needs `ca_file`).
    pub tls: TlsMode,
    /// PEM file of the certificate authorities `tls = "verify-full"` trusts.
    pub ca_file: Option<PathBuf>,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            pool_size: 16,
            writers: 2,
            request_retention_hours: 7 * 24,
            worker_pool_size: 8,
            connect_timeout_ms: 5000,
            tls: TlsMode::Prefer,
            ca_file: None,
        }
    }
}

impl DatabaseConfig {
    /// The URL, or a configuration error naming how to set it.
    pub fn require_url(&self) -> Result<&str> {
        match self.url.as_deref() {
            Some(url) if !url.trim().is_empty() => Ok(url),
            _ => Err(Error::Config("database.url is required (--database-url or EVENTFOLD_DATABASE__URL)".to_owned())),
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.pool_size == 0 || self.writers == 0 {
            return Err(Error::Config("database.pool_size and database.writers must be at least 1".to_owned()));
        }
        if !(1..=24 * 365).contains(&self.request_retention_hours) {
            return Err(Error::Config("database.request_retention_hours must be 1 to 8760".to_owned()));
        }
        if self.worker_pool_size == 0 {
            return Err(Error::Config("database.worker_pool_size must be at least 1".to_owned()));
        }
        if self.tls == TlsMode::VerifyFull && self.ca_file.is_none() {
            return Err(Error::Config("database.tls = \"verify-full\" needs database.ca_file".to_owned()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        log: LogConfig,
        database: DatabaseConfig,
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("eventfold-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[database]\nurl = \"postgresql://file\"\npool_size = 3\n[log]\nformat = \"json\"\n")
            .unwrap();
        #[derive(Serialize)]
        struct Flags {
            database: FlagDb,
        }
        #[derive(Serialize)]
        struct FlagDb {
            url: &'static str,
        }
        let loaded: Sample = load(Some(&file), &Flags { database: FlagDb { url: "postgresql://flag" } }).unwrap();
        assert_eq!(loaded.database.url.as_deref(), Some("postgresql://flag"));
        assert_eq!(loaded.database.pool_size, 3);
        assert_eq!(loaded.database.writers, 2);
        assert_eq!(loaded.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = std::env::temp_dir().join(format!("eventfold-config-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(&file, "[database]\nurll = \"x\"\n").unwrap();
        #[derive(Serialize)]
        struct NoFlags {}
        let err = load::<Sample, _>(Some(&file), &NoFlags {}).unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
        let err = load::<Sample, _>(Some(&dir.join("missing.toml")), &NoFlags {}).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }
}
