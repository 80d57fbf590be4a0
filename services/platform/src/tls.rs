//! TLS of every listener a process serves (gRPC, REST) and of the calls it
//! makes to other services (the gateway to its upstreams, Redis, Kafka),
//! from one `[tls]` section:
//!
//! - `cert_file` and `key_file`: the process's certificate chain and key
//!   (PEM). With them, every gRPC and REST listener speaks TLS only, and
//!   the process presents them as its client certificate when it calls
//!   another service.
//! - `client_ca_file`: mutual TLS on the gRPC listeners: a client without a
//!   certificate signed by one of these CAs fails the handshake. The REST
//!   listener does not ask (its callers are people and browsers, with
//!   tokens or API keys).
//! - `ca_file`: the CAs trusted when calling another service over TLS
//!   (`https://` upstreams, `rediss://`, Kafka); `client_ca_file` when unset.
//!
//! The files are read again every `reload_secs` and at once on SIGHUP;
//! when their bytes changed, new connections use the new certificates
//! (open ones keep theirs). A change that does not load (a key that does
//! not match, a half-written file) is logged and the old certificates stay.
//!
//! Built on rustls with the ring provider (the one the PostgreSQL client
//! uses), with acceptors and connectors of our own rather than tonic's TLS
//! features, which load certificates once at start.

use std::{
    io,
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use futures_util::future::BoxFuture;
use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most TLS handshakes in progress at once on one listener; more
/// connections wait in the kernel's backlog.
pub const MAX_HANDSHAKES: usize = 256;

/// `[tls]`: see the module documentation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain of this process (leaf first).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM CAs whose certificates gRPC clients must present (mutual TLS).
    pub client_ca_file: Option<PathBuf>,
    /// PEM CAs trusted when calling other services (default: `client_ca_file`).
    pub ca_file: Option<PathBuf>,
    /// How often the files are checked for changes, in seconds (0: only on
    /// SIGHUP).
    pub reload_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self { cert_file: None, key_file: None, client_ca_file: None, ca_file: None, reload_secs: 10 }
    }
}

impl TlsConfig {
    /// Whether anything is configured.
    pub fn is_set(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some() || self.client_ca_file.is_some() || self.ca_file.is_some()
    }
}

/// A TLS setting that cannot be used. It names the setting, never a path
/// or a file's content.
#[derive(Debug, thiserror::Error)]
#[error("tls.{setting}: {reason}")]
pub struct TlsError {
    setting: &'static str,
    reason: String,
}

fn tls_error(setting: &'static str, reason: impl Into<String>) -> TlsError {
    TlsError { setting, reason: reason.into() }
}

/// The ALPN protocol a listener offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// gRPC: HTTP/2.
    H2,
    /// The REST gateway: HTTP/1.1.
    Http1,
}

/// The files of a [`TlsConfig`] as read at one moment.
struct Files {
    cert: Option<Vec<u8>>,
    key: Option<Vec<u8>>,
    client_ca: Option<Vec<u8>>,
    ca: Option<Vec<u8>>,
}

impl Files {
    fn read(config: &TlsConfig) -> Result<Self, TlsError> {
        fn read(setting: &'static str, path: Option<&PathBuf>) -> Result<Option<Vec<u8>>, TlsError> {
            path.map(|p| {
                std::fs::read(p).map_err(|e| tls_error(setting, format!("cannot read the file ({})", e.kind())))
            })
            .transpose()
        }
        Ok(Self {
            cert: read("cert_file", config.cert_file.as_ref())?,
            key: read("key_file", config.key_file.as_ref())?,
            client_ca: read("client_ca_file", config.client_ca_file.as_ref())?,
            ca: read("ca_file", config.ca_file.as_ref())?,
        })
    }

    /// A digest of every file's bytes, to tell whether anything changed.
    fn digest(&self) -> [u8; 32] {
        let mut hasher = Sha256::new();
        for part in [&self.cert, &self.key, &self.client_ca, &self.ca] {
            match part {
                Some(bytes) => {
                    hasher.update([1]);
                    hasher.update((bytes.len() as u64).to_le_bytes());
                    hasher.update(bytes);
                }
                None => hasher.update([0]),
            }
        }
        hasher.finalize().into()
    }
}

/// The rustls configurations built from one reading of the files.
struct Configs {
    digest: [u8; 32],
    grpc: Option<Arc<ServerConfig>>,
    rest: Option<Arc<ServerConfig>>,
    /// Calls to gRPC servers (ALPN h2).
    client: Option<Arc<ClientConfig>>,
    /// Calls to Redis and Kafka (no ALPN).
    plain_client: Option<Arc<ClientConfig>>,
}

/// ring, as the PostgreSQL client uses (no C toolchain beyond `cc`); it
/// lacks the post-quantum key exchange, which rustls offers only with
/// aws-lc-rs.
#[allow(deprecated)]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(setting: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_error(setting, format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(tls_error(setting, "holds no certificate"));
    }
    Ok(certs)
}

/// The certificates of a PEM file of CAs, as a root store.
pub fn roots(setting: &'static str, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(setting, pem)? {
        roots.add(cert).map_err(|e| tls_error(setting, format!("unusable CA certificate ({e})")))?;
    }
    Ok(roots)
}

impl Configs {
    fn build(files: &Files) -> Result<Self, TlsError> {
        let provider = provider();
        let identity = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                let chain = certificates("cert_file", cert)?;
                let key = PrivateKeyDer::from_pem_slice(key)
                    .map_err(|_| tls_error("key_file", "holds no usable private key (PEM PKCS#8, PKCS#1 or SEC1)"))?;
                Some((chain, key))
            }
            (Some(_), None) => return Err(tls_error("key_file", "is required with cert_file")),
            (None, Some(_)) => return Err(tls_error("cert_file", "is required with key_file")),
            (None, None) => None,
        };
        if identity.is_none() && files.client_ca.is_some() {
            return Err(tls_error("client_ca_file", "needs cert_file and key_file (the server's own certificate)"));
        }
        let server = |alpn: Alpn, client_auth: bool| -> Result<Option<Arc<ServerConfig>>, TlsError> {
            let Some((chain, key)) = &identity else { return Ok(None) };
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| tls_error("cert_file", format!("TLS setup ({e})")))?;
            let builder = match (&files.client_ca, client_auth) {
                (Some(pem), true) => {
                    let verifier = WebPkiClientVerifier::builder_with_provider(
                        Arc::new(roots("client_ca_file", pem)?),
                        provider.clone(),
                    )
                    .build()
                    .map_err(|e| tls_error("client_ca_file", format!("unusable ({e})")))?;
                    builder.with_client_cert_verifier(verifier)
                }
                _ => builder.with_no_client_auth(),
            };
            let mut server = builder
                .with_single_cert(chain.clone(), key.clone_key())
                .map_err(|e| tls_error("key_file", format!("does not go with cert_file ({e})")))?;
            server.alpn_protocols = vec![match alpn {
                Alpn::H2 => b"h2".to_vec(),
                Alpn::Http1 => b"http/1.1".to_vec(),
            }];
            Ok(Some(Arc::new(server)))
        };
        let trusted = files
            .ca
            .as_ref()
            .map(|pem| ("ca_file", pem))
            .or(files.client_ca.as_ref().map(|pem| ("client_ca_file", pem)));
        let client = match trusted {
            Some((setting, pem)) => {
                let builder = ClientConfig::builder_with_provider(provider.clone())
                    .with_safe_default_protocol_versions()
                    .map_err(|e| tls_error(setting, format!("TLS setup ({e})")))?
                    .with_root_certificates(roots(setting, pem)?);
                let client = match &identity {
                    Some((chain, key)) => builder
                        .with_client_auth_cert(chain.clone(), key.clone_key())
                        .map_err(|e| tls_error("key_file", format!("does not go with cert_file ({e})")))?,
                    None => builder.with_no_client_auth(),
                };
                Some(client)
            }
            None => None,
        };
        let plain_client = client.clone().map(Arc::new);
        let client = client.map(|mut client| {
            client.alpn_protocols = vec![b"h2".to_vec()];
            Arc::new(client)
        });
        Ok(Self {
            digest: files.digest(),
            grpc: server(Alpn::H2, true)?,
            rest: server(Alpn::Http1, false)?,
            client,
            plain_client,
        })
    }
}

/// The TLS of a process: the configurations of its listeners and of its
/// calls, rebuilt when the files change (see [`Tls::watch`]).
pub struct Tls {
    config: TlsConfig,
    current: RwLock<Arc<Configs>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("server", &self.config.cert_file.is_some())
            .field("mutual", &self.config.client_ca_file.is_some())
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// The TLS `config` describes, or `None` when it sets nothing.
    ///
    /// # Errors
    ///
    /// A file that cannot be read or used, or a certificate without its
    /// key (and the other way round).
    pub fn load(config: &TlsConfig) -> Result<Option<Arc<Self>>, TlsError> {
        if !config.is_set() {
            return Ok(None);
        }
        let configs = Configs::build(&Files::read(config)?)?;
        Ok(Some(Arc::new(Self { config: config.clone(), current: RwLock::new(Arc::new(configs)) })))
    }

    fn current(&self) -> Arc<Configs> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether listeners speak TLS (a certificate is configured).
    pub fn serves(&self) -> bool {
        self.current().grpc.is_some()
    }

    /// Whether gRPC clients must present a certificate.
    pub fn mutual(&self) -> bool {
        self.config.client_ca_file.is_some()
    }

    /// The configuration of a listener offering `alpn`, if the process has
    /// a certificate.
    pub fn server_config(&self, alpn: Alpn) -> Option<Arc<ServerConfig>> {
        let current = self.current();
        match alpn {
            Alpn::H2 => current.grpc.clone(),
            Alpn::Http1 => current.rest.clone(),
        }
    }

    /// The configuration of calls to other services, if CAs to trust are
    /// configured.
    pub fn client_config(&self) -> Option<Arc<ClientConfig>> {
        self.current().client.clone()
    }

    /// The configuration of connections to Redis and Kafka (as
    /// [`Tls::client_config`], offering no application protocol), if CAs
    /// to trust are configured.
    pub fn plain_client_config(&self) -> Option<Arc<ClientConfig>> {
        self.current().plain_client.clone()
    }

    /// Reads the files again; `Ok(true)` when they changed and the new
    /// certificates are in use, `Ok(false)` when nothing changed.
    ///
    /// # Errors
    ///
    /// The changed files do not load: the previous certificates stay.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let files = Files::read(&self.config)?;
        if files.digest() == self.current().digest {
            return Ok(false);
        }
        let configs = Arc::new(Configs::build(&files)?);
        match self.current.write() {
            Ok(mut current) => *current = configs,
            Err(poisoned) => *poisoned.into_inner() = configs,
        }
        Ok(true)
    }

    /// Reloads every `reload_secs` and on SIGHUP until `token` is
    /// cancelled, logging each change and each failure (by setting, never
    /// by path or content).
    pub async fn watch(self: Arc<Self>, token: CancellationToken) {
        let every = (self.config.reload_secs > 0).then(|| Duration::from_secs(self.config.reload_secs));
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            let tick = async {
                match every {
                    Some(every) => tokio::time::sleep(every).await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(unix)]
            let signal = async {
                match hangup.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let signal = std::future::pending::<()>();
            tokio::select! {
                () = token.cancelled() => return,
                () = tick => {}
                () = signal => tracing::info!("SIGHUP: reading the TLS files again"),
            }
            match self.reload() {
                Ok(true) => tracing::info!("TLS certificates reloaded"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "TLS files changed but do not load; the previous certificates stay")
                }
            }
        }
    }
}

/// A TLS connection accepted by a [`TlsListener`], with the addresses of
/// its TCP connection (what the peer limits and rate limits key on).
pub struct TlsConn {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    local: Option<SocketAddr>,
    remote: SocketAddr,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("remote", &self.remote).finish_non_exhaustive()
    }
}

impl Connected for TlsConn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        TcpConnectInfo { local_addr: self.local, remote_addr: Some(self.remote) }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A listener whose connections have completed a TLS handshake with the
/// certificates current at their accept. Handshakes run beside the accept
/// loop (at most [`MAX_HANDSHAKES`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]); one that fails is dropped and counted
/// (`eventfold_tls_handshake_failures_total`), and never reaches the
/// server. Dropping the listener stops accepting.
#[derive(Debug)]
pub struct TlsListener {
    connections: mpsc::Receiver<TlsConn>,
    local_addr: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` with the server configuration of `tls` for
    /// `alpn`.
    ///
    /// # Errors
    ///
    /// `tls` has no certificate, or the listener has no local address.
    pub fn new(listener: TcpListener, tls: Arc<Tls>, alpn: Alpn) -> io::Result<Self> {
        if tls.server_config(alpn).is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "tls.cert_file is not set"));
        }
        let local_addr = listener.local_addr()?;
        let (sender, connections) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, tls, alpn, sender));
        Ok(Self { connections, local_addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

async fn accept_loop(listener: TcpListener, tls: Arc<Tls>, alpn: Alpn, sender: mpsc::Sender<TlsConn>) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
        let accepted = tokio::select! {
            () = sender.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait, as hyper does.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let Some(config) = tls.server_config(alpn) else { return };
        let sender = sender.clone();
        tokio::spawn(async move {
            let handshake = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                Ok(Ok(stream)) => {
                    let _ = sender.send(TlsConn { stream, local, remote }).await;
                }
                Ok(Err(e)) => {
                    metrics::counter!("eventfold_tls_handshake_failures_total", "reason" => "refused").increment(1);
                    tracing::debug!(peer = %remote, error = %e, "TLS handshake failed");
                }
                Err(_) => {
                    metrics::counter!("eventfold_tls_handshake_failures_total", "reason" => "timeout").increment(1);
                    tracing::debug!(peer = %remote, "TLS handshake timed out");
                }
            }
            drop(permit);
        });
    }
}

impl futures_util::Stream for TlsListener {
    type Item = io::Result<TlsConn>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.connections.poll_recv(cx).map(|next| next.map(Ok))
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.connections.recv().await {
            Some(conn) => {
                let remote = conn.remote;
                (conn, remote)
            }
            // The accept loop ends only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}

/// Connects to other services' gRPC servers over TLS with the client
/// configuration current at each connect: a tonic channel's connector
/// (`Endpoint::connect_with_connector_lazy`) for `https://` URLs.
#[derive(Clone)]
pub struct TlsConnector {
    tls: Arc<Tls>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector").finish_non_exhaustive()
    }
}

impl TlsConnector {
    /// A connector with the client configuration of `tls`.
    ///
    /// # Errors
    ///
    /// `tls` trusts no CA (`ca_file` and `client_ca_file` are unset).
    pub fn new(tls: Arc<Tls>) -> Result<Self, TlsError> {
        if tls.client_config().is_none() {
            return Err(tls_error("ca_file", "is required to call other services over TLS"));
        }
        Ok(Self { tls })
    }
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Response>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let config = self.tls.client_config();
        Box::pin(async move {
            let config = config.ok_or_else(|| io::Error::other("no TLS client configuration"))?;
            let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("upstream URL: {what}"));
            let host = uri.host().ok_or_else(|| invalid("no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = ServerName::try_from(host.clone()).map_err(|_| invalid("not a host name"))?;
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            let _ = tcp.set_nodelay(true);
            let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// A tonic channel to `url`, connected lazily: over TLS with `tls` when
/// the URL is `https://`, in plain text when it is `http://`.
///
/// # Errors
///
/// A URL that does not parse, another scheme, or `https://` without CAs
/// to trust.
pub fn channel(url: &str, tls: Option<&Arc<Tls>>) -> Result<tonic::transport::Channel, String> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(url.to_owned()).map_err(|_| format!("{url:?} is not a URL"))?;
    match endpoint.uri().scheme_str() {
        Some("http") => Ok(endpoint.connect_lazy()),
        Some("https") => {
            let tls = tls.ok_or_else(|| format!("{url:?} is https:// but [tls] sets no CA to trust (tls.ca_file)"))?;
            let connector = TlsConnector::new(tls.clone()).map_err(|e| e.to_string())?;
            Ok(endpoint.connect_with_connector_lazy(connector))
        }
        _ => Err(format!("{url:?} is neither http:// nor https://")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for 127.0.0.1 and its key (PEM).
    fn certificate() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn config(dir: &std::path::Path) -> TlsConfig {
        TlsConfig {
            cert_file: Some(dir.join("tls.crt")),
            key_file: Some(dir.join("tls.key")),
            ca_file: Some(dir.join("tls.crt")),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn nothing_set_is_no_tls() {
        assert!(Tls::load(&TlsConfig::default()).unwrap().is_none());
    }

    #[test]
    fn errors_name_the_setting_never_the_path_or_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("very-private-dir");
        std::fs::create_dir(&private).unwrap();
        let missing = Tls::load(&config(&private)).unwrap_err().to_string();
        assert!(missing.starts_with("tls.cert_file: cannot read the file"), "{missing}");
        assert!(!missing.contains("very-private-dir"), "{missing}");

        let (cert, key) = certificate();
        let (_, other_key) = certificate();
        std::fs::write(private.join("tls.crt"), &cert).unwrap();
        std::fs::write(private.join("tls.key"), &other_key).unwrap();
        let mismatch = Tls::load(&config(&private)).unwrap_err().to_string();
        assert!(mismatch.starts_with("tls.key_file: does not go with cert_file"), "{mismatch}");
        assert!(!mismatch.contains("PRIVATE KEY") && !mismatch.contains("very-private-dir"), "{mismatch}");

        std::fs::write(private.join("tls.key"), "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n")
            .unwrap();
        let garbage = Tls::load(&config(&private)).unwrap_err().to_string();
        assert!(garbage.starts_with("tls.key_file:"), "{garbage}");
        assert!(!garbage.contains("c2VjcmV0"), "{garbage}");

        std::fs::write(private.join("tls.key"), &key).unwrap();
        let lone = TlsConfig { key_file: None, ..config(&private) };
        assert_eq!(Tls::load(&lone).unwrap_err().to_string(), "tls.key_file: is required with cert_file");
        let no_server = TlsConfig { client_ca_file: Some(private.join("tls.crt")), ..TlsConfig::default() };
        assert!(Tls::load(&no_server).unwrap_err().to_string().starts_with("tls.client_ca_file: needs cert_file"));
    }

    #[test]
    fn reload_swaps_only_on_a_change_that_loads() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate();
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), &key).unwrap();
        let tls = Tls::load(&config(dir.path())).unwrap().unwrap();
        assert!(tls.serves() && !tls.mutual());
        let first = tls.server_config(Alpn::H2).unwrap();
        assert_eq!(first.alpn_protocols, [b"h2".to_vec()]);
        assert_eq!(tls.server_config(Alpn::Http1).unwrap().alpn_protocols, [b"http/1.1".to_vec()]);
        assert!(!tls.reload().unwrap(), "unchanged files: nothing swapped");
        assert!(Arc::ptr_eq(&first, &tls.server_config(Alpn::H2).unwrap()));

        let (cert, key) = certificate();
        std::fs::write(dir.path().join("tls.crt"), &cert).unwrap();
        std::fs::write(dir.path().join("tls.key"), "not a key").unwrap();
        assert!(tls.reload().is_err(), "a half-written change does not load");
        assert!(Arc::ptr_eq(&first, &tls.server_config(Alpn::H2).unwrap()), "the old configuration stays");

        std::fs::write(dir.path().join("tls.key"), &key).unwrap();
        assert!(tls.reload().unwrap());
        assert!(!Arc::ptr_eq(&first, &tls.server_config(Alpn::H2).unwrap()), "new connections get the new one");
    }

    #[tokio::test]
    async fn https_needs_a_ca_and_other_schemes_are_refused() {
        assert!(channel("http://127.0.0.1:1", None).is_ok());
        assert!(channel("https://127.0.0.1:1", None).unwrap_err().contains("tls.ca_file"));
        assert!(channel("ftp://127.0.0.1:1", None).unwrap_err().contains("neither http:// nor https://"));
    }
}
