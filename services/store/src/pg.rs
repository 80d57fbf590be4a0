//! Connections to PostgreSQL: the one place where a pool is built and a
//! connection is opened, with the server connection's TLS settings.
//!
//! A [`Database`] is a server to talk to: its parsed configuration, its TLS
//! connector and a pool. Every library that stores something in PostgreSQL
//! takes a `Database` (or its pool); none of them sees a URL. The process
//! builds its databases once (`eventfold_platform::runtime::Resources`),
//! one pool per purpose.
//!
//! TLS follows libpq's `sslmode`: `prefer` (the default) and `require`
//! encrypt without checking the server's certificate, `verify-full` checks
//! it against a CA file and the host name, `disable` never encrypts.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bb8::{Pool, PooledConnection, RunError};
use bb8_postgres::PostgresConnectionManager;
use rustls::{
    DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject};
use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, Config, config::SslMode, tls::MakeTlsConnect};

use crate::error::{Error, Result};

/// The TLS connector of every PostgreSQL connection.
pub type Tls = tokio_postgres_rustls::MakeRustlsConnect;
/// The connection manager of every pool.
pub type PgManager = PostgresConnectionManager<Tls>;
/// A pool of PostgreSQL connections.
pub type PgPool = Pool<PgManager>;
/// A connection taken from a [`PgPool`].
pub type PgConnection<'a> = PooledConnection<'a, PgManager>;
/// A connection's I/O half, to be polled by whoever opened it (see
/// [`Database::open_connection`]).
pub type Connection =
    tokio_postgres::Connection<tokio_postgres::Socket, <Tls as MakeTlsConnect<tokio_postgres::Socket>>::Stream>;

/// How the connection to the server is encrypted (libpq's `sslmode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// As the URL says (`sslmode=`), else encrypted when the server offers
    /// it, without checking its certificate.
    #[default]
    Prefer,
    /// Never encrypted.
    Disable,
    /// Always encrypted; the certificate is not checked.
    Require,
    /// Always encrypted; the certificate must chain to `ca_file` and name
    /// the host.
    VerifyFull,
}

/// How a [`Database`] connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseOptions {
    /// Most pooled connections.
    pub pool_size: u32,
    /// Longest wait for a connection (pooled or dedicated).
    pub connect_timeout: Duration,
    pub tls: TlsMode,
    /// PEM file of the certificate authorities `verify-full` trusts.
    pub ca_file: Option<PathBuf>,
}

impl Default for DatabaseOptions {
    fn default() -> Self {
        Self { pool_size: 16, connect_timeout: Duration::from_secs(5), tls: TlsMode::Prefer, ca_file: None }
    }
}

/// A PostgreSQL server: where it is, how to reach it, and a pool of
/// connections to it. Cloning shares the pool.
#[derive(Clone)]
pub struct Database {
    config: Config,
    tls: Tls,
    pool: PgPool,
    connect_timeout: Duration,
    max_size: u32,
    /// The `pool` label of its metrics.
    label: &'static str,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password, nor the rest of the URL.
        f.debug_struct("Database").field("state", &self.pool.state()).finish_non_exhaustive()
    }
}

impl Database {
    /// A database at `url` (libpq URL or key=value string). Connections are
    /// made lazily: this succeeds while the server is down.
    pub fn open(url: &str, options: &DatabaseOptions) -> Result<Self> {
        // The parser's message never repeats the URL (it may hold a password).
        let mut config: Config =
            url.parse().map_err(|e| Error::invalid("database.url", format!("not a PostgreSQL URL: {e}")))?;
        match options.tls {
            TlsMode::Prefer => {}
            TlsMode::Disable => {
                config.ssl_mode(SslMode::Disable);
            }
            TlsMode::Require | TlsMode::VerifyFull => {
                config.ssl_mode(SslMode::Require);
            }
        }
        let tls = connector(options)?;
        Ok(Self::with(config, tls, options.pool_size, options.connect_timeout))
    }

    /// A database at `url` with the default options (tests, tools).
    pub fn from_url(url: &str) -> Result<Self> {
        Self::open(url, &DatabaseOptions::default())
    }

    fn with(config: Config, tls: Tls, pool_size: u32, connect_timeout: Duration) -> Self {
        let manager = PostgresConnectionManager::new(config.clone(), tls.clone());
        let max_size = pool_size.max(1);
        let pool = Pool::builder().max_size(max_size).connection_timeout(connect_timeout).build_unchecked(manager);
        Self { config, tls, pool, connect_timeout, max_size, label: "default" }
    }

    /// The same pool, its metrics labelled `pool = label`.
    #[must_use]
    pub fn labelled(mut self, label: &'static str) -> Self {
        self.label = label;
        self
    }

    /// Sets the pool's gauges and counters from its state (called when the
    /// metrics are scraped): `eventfold_db_pool_connections`,
    /// `…_idle_connections`, `…_max_connections`, `…_waiters` (gets waiting
    /// for a connection) and `…_acquires_total{result}`. [`Database::get`]
    /// records `…_acquire_seconds`.
    pub fn record_pool_metrics(&self) {
        let pool = self.label;
        let state = self.pool.state();
        let stats = &state.statistics;
        metrics::gauge!("eventfold_db_pool_connections", "pool" => pool).set(f64::from(state.connections));
        metrics::gauge!("eventfold_db_pool_idle_connections", "pool" => pool).set(f64::from(state.idle_connections));
        metrics::gauge!("eventfold_db_pool_max_connections", "pool" => pool).set(f64::from(self.max_size));
        metrics::gauge!("eventfold_db_pool_waiters", "pool" => pool)
            .set(stats.get_started.saturating_sub(stats.completed_gets()) as f64);
        for (result, count) in
            [("direct", stats.get_direct), ("waited", stats.get_waited), ("timed_out", stats.get_timed_out)]
        {
            metrics::counter!("eventfold_db_pool_acquires_total", "pool" => pool, "result" => result).absolute(count);
        }
    }

    /// The same server with a pool of its own of `pool_size` connections
    /// (another purpose: its load does not starve this one's).
    pub fn sized(&self, pool_size: u32) -> Self {
        Self::with(self.config.clone(), self.tls.clone(), pool_size, self.connect_timeout).labelled(self.label)
    }

    /// The same server with a pool of its own whose sessions commit without
    /// waiting for the WAL flush (`synchronous_commit = off`): for writers
    /// whose lost commit is simply done again (a consumer's batch re-applied
    /// from its checkpoint, a relay batch re-sent).
    pub fn without_flush_wait(&self, pool_size: u32) -> Self {
        let mut config = self.config.clone();
        let options = match config.get_options() {
            Some(given) => format!("{given} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_owned(),
        };
        config.options(&options);
        Self::with(config, self.tls.clone(), pool_size, self.connect_timeout).labelled(self.label)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The server's settings (no password is ever printed from here).
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// A pooled connection, or `Unavailable` after the connect timeout.
    pub async fn get(&self) -> Result<PgConnection<'_>> {
        let started = std::time::Instant::now();
        let connection = self.pool.get().await.map_err(pool_error);
        metrics::histogram!("eventfold_db_pool_acquire_seconds", "pool" => self.label).record(started.elapsed());
        connection
    }

    /// Whether the server answers a `SELECT 1` on a pooled connection
    /// (health and readiness checks).
    pub async fn check(&self) -> Result<()> {
        self.get().await?.simple_query("SELECT 1").await.map_err(db_error)?;
        Ok(())
    }

    /// A connection of its own (not pooled) whose I/O half the caller
    /// drives: for `LISTEN`, which reads notifications from it.
    pub async fn open_connection(&self) -> Result<(Client, Connection)> {
        match tokio::time::timeout(self.connect_timeout, self.config.connect(self.tls.clone())).await {
            Ok(connected) => connected.map_err(db_error),
            Err(_) => Err(Error::Unavailable(format!("no PostgreSQL connection within {:?}", self.connect_timeout))),
        }
    }

    /// A connection of its own (not pooled), for a task that holds it for
    /// long; its I/O runs on a task of its own until the client is dropped.
    pub async fn connect(&self) -> Result<Client> {
        let (client, connection) = self.open_connection().await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "PostgreSQL connection closed");
            }
        });
        Ok(client)
    }
}

/// A PostgreSQL error as the store reports it: connection and resource
/// trouble is `Unavailable` (retry), anything else `Internal`. The text is
/// for the log; clients are given an error id instead.
pub fn db_error(error: tokio_postgres::Error) -> Error {
    match error.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            let text = format!("{} (SQLSTATE {code})", db.message());
            if ["08", "53", "57", "40"].iter().any(|class| code.starts_with(class)) {
                Error::Unavailable(text)
            } else if code == "3F000" || code == "42P01" || code == "42883" {
                Error::Unavailable(format!("{text}: is the schema migrated? run `eventfold migrate up`"))
            } else {
                Error::Internal(text)
            }
        }
        None => Error::Unavailable(format!("PostgreSQL: {error}")),
    }
}

/// A pool's error as the store reports it (see [`db_error`]).
pub fn pool_error(error: RunError<tokio_postgres::Error>) -> Error {
    match error {
        RunError::User(e) => db_error(e),
        RunError::TimedOut => Error::Unavailable("timed out waiting for a PostgreSQL connection".to_owned()),
    }
}

fn connector(options: &DatabaseOptions) -> Result<Tls> {
    // ring: no C toolchain beyond `cc` for the build. Its provider lacks the
    // post-quantum key exchange, which PostgreSQL servers do not offer.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::invalid("database.tls", format!("TLS setup: {e}")))?;
    let config = match options.tls {
        TlsMode::VerifyFull => {
            let Some(ca_file) = &options.ca_file else {
                return Err(Error::invalid("database.ca_file", "tls = \"verify-full\" needs a CA file"));
            };
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(ca_file)
                .map_err(|e| Error::invalid("database.ca_file", format!("cannot read the CA file: {e}")))?;
            for cert in certs {
                let cert = cert.map_err(|e| Error::invalid("database.ca_file", format!("bad PEM: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::invalid("database.ca_file", format!("unusable certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(Error::invalid("database.ca_file", "holds no certificate"));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsMode::Prefer | TlsMode::Disable | TlsMode::Require => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(EncryptOnly(provider))).with_no_client_auth()
        }
    };
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// libpq's `prefer` and `require`: the channel is encrypted and the
/// handshake's signatures are checked, but the certificate is not.
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Installs ring as the process's default rustls crypto provider (what
/// eventfold uses everywhere: no C toolchain beyond `cc`; it lacks the
/// post-quantum key exchange, which rustls offers only with aws-lc-rs).
/// reqwest is built without a provider of its own, so every process calls
/// this before it builds an HTTP client; a second call does nothing.
#[allow(deprecated)]
pub fn install_crypto_provider() {
    drop(rustls::crypto::ring::default_provider().install_default());
}
