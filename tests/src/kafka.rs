//! A throw-away Kafka-protocol broker (tansu, memory storage) for the
//! tests: each [`Broker`] is a process of its own on a free loopback port,
//! so a test may pause it (SIGSTOP: an outage that keeps the data) and
//! resume it. `tests/run` installs the pinned tansu and exports its path as
//! `EVENTFOLD_KAFKA_BIN`; `EVENTFOLD_TEST_KAFKA` names an existing broker
//! (`host:port`) for the tests that do not need to control one.

use std::{
    net::{Ipv4Addr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The broker binary to start (tansu, or its successor nisshi).
pub const KAFKA_BIN_ENV: &str = "EVENTFOLD_KAFKA_BIN";
/// An existing broker (`host:port`) for tests that only produce and fetch.
pub const KAFKA_ENV: &str = "EVENTFOLD_TEST_KAFKA";
/// Where `tests/run` caches the pinned tansu, under the tools directory.
const PINNED: &str = "tansu-calfkit-0.1.2/tansu";

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os(KAFKA_BIN_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let tools = std::env::var_os("EVENTFOLD_TOOLS_DIR")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/eventfold/tools")));
    if let Some(path) = tools.map(|t| t.join(PINNED))
        && path.is_file()
    {
        return path;
    }
    panic!("no Kafka-protocol broker: run tests/run (it installs the pinned tansu) or set {KAFKA_BIN_ENV}");
}

/// A broker process of one test; killed on drop.
#[derive(Debug)]
pub struct Broker {
    port: u16,
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Broker {
    /// Starts a broker with memory storage on a free loopback port.
    ///
    /// # Panics
    ///
    /// If the binary is missing or the port does not answer within 10 s.
    pub fn start() -> Broker {
        Self::start_advertising(None)
    }

    /// [`Broker::start`], telling clients to connect to `advertised` (a
    /// port on 127.0.0.1) instead of its own port: the port of a proxy in
    /// front of it.
    fn start_advertising(advertised: Option<u16>) -> Broker {
        let binary = binary();
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = crate::free_port().expect("a free port");
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let url = format!("tcp://127.0.0.1:{port}");
            let advertised = format!("tcp://127.0.0.1:{}", advertised.unwrap_or(port));
            let child = Command::new(&binary)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
                .args(["--storage-engine", "memory://tansu/"])
                .stdin(Stdio::null())
                .stdout(log.reopen().expect("log"))
                .stderr(log.reopen().expect("log"))
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
            let mut broker = Broker { port, child, log };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_millis(200)).is_ok() {
                    return broker;
                }
                if let Ok(Some(status)) = broker.child.try_wait() {
                    last = format!("the broker exited ({status}): {}", broker.log());
                    break;
                }
                if Instant::now() > deadline {
                    last = format!("port {port} did not answer within 10 s: {}", broker.log());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("cannot start the test broker {}: {last}", binary.display());
    }

    /// `127.0.0.1:PORT`, for rskafka's bootstrap list.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Freezes the process (SIGSTOP): connections hang, data stays.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([format!("-{name}"), self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }

    /// What the broker printed so far (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

/// A broker reached only over TLS, as behind a TLS-terminating proxy
/// (stunnel, envoy): tansu on a port of its own, advertising the port of a
/// terminator that completes each TLS handshake with the given server
/// certificate (and, with a client CA, requires a client certificate of
/// it) and forwards the bytes to the broker. Both stop on drop.
pub struct TlsBroker {
    broker: Broker,
    port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for TlsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsBroker").field("port", &self.port).field("broker", &self.broker).finish()
    }
}

impl TlsBroker {
    /// Starts the terminator on a free loopback port and the broker
    /// behind it.
    ///
    /// # Panics
    ///
    /// If the PEM files do not make a TLS server, or the broker does not
    /// start.
    #[allow(deprecated)] // ring's provider, as the services use.
    pub fn start(cert: &std::path::Path, key: &std::path::Path, client_ca: Option<&std::path::Path>) -> TlsBroker {
        use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = match client_ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_file_iter(ca).expect("the client CA") {
                    roots.add(cert.expect("a CA certificate")).expect("a usable CA");
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .expect("a client verifier");
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let chain = CertificateDer::pem_file_iter(cert).expect("the certificate").map(|c| c.expect("PEM")).collect();
        let key = PrivateKeyDer::from_pem_file(key).expect("the key");
        let config = std::sync::Arc::new(builder.with_single_cert(chain, key).expect("a TLS server"));

        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a port for the terminator");
        listener.set_nonblocking(true).expect("non-blocking");
        let port = listener.local_addr().expect("its address").port();
        let broker = Broker::start_advertising(Some(port));
        let upstream = broker.port;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            runtime.block_on(terminate(listener, config, upstream, stopped));
        });
        TlsBroker { broker, port, stop: Some(stop), thread: Some(thread) }
    }

    /// `127.0.0.1:PORT` of the terminator, for the bootstrap list.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// What the broker printed so far.
    pub fn log(&self) -> String {
        self.broker.log()
    }
}

/// Accepts TLS connections on `listener` until `stopped`, each forwarded to
/// the broker on `upstream`.
async fn terminate(
    listener: std::net::TcpListener,
    config: std::sync::Arc<rustls::ServerConfig>,
    upstream: u16,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let tcp = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            // A refused handshake closes the connection, as a proxy does.
            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
            let Ok(mut broker) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, upstream)).await else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut tls, &mut broker).await;
        });
    }
}

impl Drop for TlsBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A broker for a test that only produces and fetches: the one named by
/// `EVENTFOLD_TEST_KAFKA`, or a new one (kept alive by the returned value).
pub fn any() -> (String, Option<Broker>) {
    match std::env::var(KAFKA_ENV) {
        Ok(addr) if !addr.trim().is_empty() => (addr.trim().to_owned(), None),
        _ => {
            let broker = Broker::start();
            (broker.bootstrap(), Some(broker))
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broker_answers_and_survives_a_pause() {
        let broker = Broker::start();
        let addr = broker.bootstrap();
        assert!(addr.starts_with("127.0.0.1:"));
        broker.pause();
        broker.resume();
        TcpStream::connect(&addr).expect("the broker answers after SIGCONT");
        let second = Broker::start();
        assert_ne!(second.bootstrap(), addr, "each broker has its own port");
    }
}
