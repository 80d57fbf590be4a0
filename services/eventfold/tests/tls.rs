//! TLS and mutual TLS of the `eventfold` binary, as a user meets them
//! (issue 17): the README's grpcurl walkthrough over TLS (`-cacert`), a
//! client without a certificate refused at the handshake under mutual TLS,
//! the REST gateway reaching mutual-TLS upstreams (in one process and as
//! `serve gateway`), and certificates replaced without a restart. Every
//! certificate is made here by rcgen ([`TestCa`]); none is checked in.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use common::{BIN, DevServer, eventfold, grpcurl, readme_steps};
use eventfold_tests::tls::TestCa;

const HEALTH: &str = "grpc.health.v1.Health/Check";

/// The files of a test's certificates, in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
}

impl Pki {
    /// An authority; its certificate in `ca.crt`, and a certificate it
    /// issued for 127.0.0.1 and localhost in `server.crt`/`server.key`.
    fn new() -> Pki {
        let pki =
            Pki { dir: tempfile::tempdir().expect("a temporary directory"), ca: TestCa::new("eventfold test CA") };
        pki.write("ca.crt", &pki.ca.pem());
        pki.issue("server", "eventfold", &["127.0.0.1", "localhost"]);
        pki
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }

    /// Writes `contents` to `name` as a replacement does it: a new file
    /// renamed over the old one (as Kubernetes and certbot do).
    fn write(&self, name: &str, contents: &str) {
        let partial = self.path(&format!(".{name}.new"));
        std::fs::write(&partial, contents).expect("write a certificate file");
        std::fs::rename(&partial, self.path(name)).expect("replace a certificate file");
    }

    /// `NAME.crt` and `NAME.key`: a certificate of this authority.
    fn issue(&self, name: &str, common_name: &str, names: &[&str]) {
        let (cert, key) = self.ca.issue(common_name, names);
        self.write(&format!("{name}.crt"), &cert);
        self.write(&format!("{name}.key"), &key);
    }

    /// The `EVENTFOLD_TLS__*` variables of a server with `server.crt`,
    /// trusting `ca.crt` for its own calls, and requiring client
    /// certificates of `ca.crt` when `mutual`.
    fn server_env(&self, mutual: bool) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("EVENTFOLD_TLS__CERT_FILE", self.arg("server.crt")),
            ("EVENTFOLD_TLS__KEY_FILE", self.arg("server.key")),
            ("EVENTFOLD_TLS__CA_FILE", self.arg("ca.crt")),
        ];
        if mutual {
            env.push(("EVENTFOLD_TLS__CLIENT_CA_FILE", self.arg("ca.crt")));
        }
        env
    }
}

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// grpcurl with `flags` (TLS ones), against `addr`, calling `rest`.
fn grpcurl_with(flags: &[&str], addr: &str, rest: &[&str]) -> Output {
    Command::new(grpcurl()).args(["-max-time", "10"]).args(flags).arg(addr).args(rest).output().expect("run grpcurl")
}

fn text(output: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A health check through grpcurl with `flags` answers SERVING.
fn serving(flags: &[&str], addr: &str) -> Result<(), String> {
    let output = grpcurl_with(flags, addr, &[HEALTH]);
    if output.status.success() && String::from_utf8_lossy(&output.stdout).contains("SERVING") {
        Ok(())
    } else {
        Err(text(&output))
    }
}

/// Retries `check` for up to `within`; its last error when it never passes.
fn eventually(within: Duration, what: &str, check: impl Fn() -> Result<(), String>) {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(()) => return,
            Err(e) if Instant::now() >= deadline => panic!("{what}: not within {within:?}:\n{e}"),
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A TLS handshake with the gRPC server at `addr` (grpcurl retries a
/// failed dial until its deadline and then says only that; this client
/// names the server's alert), trusting `ca` and presenting `client`
/// (certificate, key), offering HTTP/2 as gRPC clients do: the protocol
/// agreed, or the error of the first read.
#[allow(deprecated)] // ring's provider: the one the server uses.
fn handshake(ca: &Path, client: Option<(&Path, &Path)>, addr: &str) -> Result<String, String> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert).unwrap().map(Result::unwrap).collect(),
                PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector.connect(name, tcp).await.map_err(|e| format!("handshake: {e}"))?;
        // TLS 1.3: the server judges the client's certificate after the
        // client has finished; its verdict arrives with the first read.
        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| format!("write: {e}"))?;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
            .await
            .map_err(|_| "no answer within 5 s".to_owned())?
            .map_err(|e| format!("read: {e}"))?;
        if read == 0 {
            return Err("closed without an answer".to_owned());
        }
        let (_, session) = tls.get_ref();
        Ok(String::from_utf8_lossy(session.alpn_protocol().unwrap_or_default()).into_owned())
    })
}

/// A handshake refused by the server with the TLS alert `alert`.
fn assert_refused_at_handshake(result: Result<String, String>, alert: &str, what: &str) {
    match result {
        Ok(protocol) => panic!("{what} must be refused, but was served ({protocol})"),
        Err(e) => assert!(e.contains(&format!("received fatal alert: {alert}")), "{what}: refused with {alert}: {e}"),
    }
}

/// curl over TLS trusting `ca`: the HTTP status and the body.
fn curl(ca: &Path, url: &str, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "--max-time", "10", "--cacert"]).arg(ca).args(["-w", "\n%{http_code}"]);
    if let Some(body) = body {
        command.args(["-H", "content-type: application/json", "-d", body]);
    }
    let output = command.arg(url).output().expect("run curl");
    assert!(output.status.success(), "curl {url}: {}", text(&output));
    let out = String::from_utf8_lossy(&output.stdout).into_owned();
    let (body, status) = out.rsplit_once('\n').expect("the status line");
    (status.trim().parse().expect("an HTTP status"), body.to_owned())
}

/// What a walkthrough step printed, and whether it succeeded.
struct Ran {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ok: {}\nstdout:\n{}\nstderr:\n{}", self.ok, self.stdout, self.stderr)
    }
}

/// A walkthrough step's shell commands, changed only where this machine
/// differs from the README's: grpcurl speaks TLS trusting `ca` instead of
/// `-plaintext` (and stops a stream the README stops with Ctrl-C after 3
/// s), the server and database addresses, and the binary's path.
fn run_step(comment: &str, script: &str, ca: &Path, addr: &str, database_url: &str) -> Ran {
    let stream = comment.contains("Ctrl-C");
    let script = script.replace("\\\n", " ");
    let script: String = script
        .lines()
        .map(|line| {
            let limit = if line.contains("-max-time") {
                ""
            } else if stream {
                " -max-time 3"
            } else {
                " -max-time 30"
            };
            let line = line.replace("grpcurl -plaintext", &format!("grpcurl -cacert '{}'{limit}", ca.display()));
            let line = line.replace("127.0.0.1:50051", addr);
            let line = line.replace("postgresql://USER@HOST/DB", database_url);
            let line = match line.strip_prefix("eventfold ") {
                Some(rest) => format!("{BIN} {rest}"),
                None => line,
            };
            // The saga starts a moment after the command that names it
            // (its intake follows the log): until then WatchSaga answers
            // NOT_FOUND, which a person typing does not meet, and a script
            // does; ask again for up to 20 s.
            if line.contains("SagaService/WatchSaga") {
                format!(
                    "for _ in $(seq 200); do if out=$({line} 2>watch.err); then break; fi; \
                     grep -q 'Code: NotFound' watch.err || {{ cat watch.err >&2; exit 1; }}; sleep 0.1; done; \
                     echo \"$out\"\n"
                )
            } else {
                format!("{line}\n")
            }
        })
        .collect();
    let dir = Path::new(&grpcurl()).parent().map(Path::to_path_buf).unwrap_or_default();
    let path = format!("{}:{}", dir.display(), std::env::var("PATH").unwrap_or_default());
    let work = tempfile::tempdir().expect("a temporary directory");
    let output = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(work.path())
        .env("PATH", path)
        .output()
        .expect("run bash");
    Ran {
        ok: output.status.success(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The JSON messages grpcurl printed, one after another.
fn messages(out: &str) -> Vec<serde_json::Value> {
    serde_json::Deserializer::from_str(out).into_iter::<serde_json::Value>().map_while(Result::ok).collect()
}

fn succeeded(ran: &Ran) {
    assert!(ran.ok, "{ran:?}");
}

fn refused(ran: &Ran, code: &str, reason: &str) {
    assert!(!ran.ok, "refused: {ran:?}");
    assert!(ran.stderr.contains(&format!("Code: {code}")) && ran.stderr.contains(reason), "{code} {reason}: {ran:?}");
}

/// A stream ended by its time limit, after printing `wanted`.
fn streamed(ran: &Ran, wanted: &str) {
    assert!(ran.stderr.contains("DeadlineExceeded") || ran.ok, "a stream ended by -max-time: {ran:?}");
    assert!(ran.stdout.contains(wanted), "{wanted} in {ran:?}");
}

#[test]
fn the_readme_grpcurl_walkthrough_runs_over_tls() {
    let pki = Pki::new();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let db = runtime.block_on(eventfold_tests::TestDatabase::create());
    let env = pki.server_env(false);
    let mut env = env_refs(&env);
    env.push(("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"));
    let server = DevServer::start_env(
        &["--database-url", db.url()],
        &env,
        "eventfold: EventStoreService and the command and query services listening on ",
    );
    let ca = pki.path("ca.crt");

    // Plain text is not served any more.
    let plain = Command::new(grpcurl()).args(["-plaintext", "-max-time", "5", &server.addr, HEALTH]).output().unwrap();
    assert!(!plain.status.success(), "a plain-text call must fail: {}", text(&plain));

    type Check = fn(&Ran);
    let checks: Vec<(&str, Check)> = vec![
        ("what the server offers", |ran| {
            succeeded(ran);
            assert!(ran.stdout.contains("eventfold.eventstore.v1.EventStoreService is a service"), "{ran:?}");
            assert!(ran.stdout.contains("\"status\": \"SERVING\""), "{ran:?}");
        }),
        ("append two events to a new stream", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["positions"].as_array().map(Vec::len), Some(2), "{ran:?}");
        }),
        ("read it back", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["events"].as_array().map(Vec::len), Some(2), "{ran:?}");
        }),
        ("a stale writer is refused", |ran| refused(ran, "Aborted", "WRONG_EXPECTED_VERSION")),
        ("subscribe to the global log", |ran| streamed(ran, "caughtUp")),
        ("verify the hash chain", |ran| {
            succeeded(ran);
            let answers = messages(&ran.stdout);
            assert_eq!(answers.len(), 2, "{ran:?}");
            assert_eq!(answers[0]["valid"], true, "{ran:?}");
        }),
        ("create an order", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["total"]["minor"], "2500", "{ran:?}");
        }),
        ("the same request id again", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["total"]["minor"], "2500", "{ran:?}");
        }),
        ("shipping an unpaid order", |ran| refused(ran, "FailedPrecondition", "ORDER_NOT_PAID")),
        ("confirm it, then read the order's stream", |ran| {
            succeeded(ran);
            assert!(ran.stdout.contains("\"eventType\": \"OrderConfirmed\""), "{ran:?}");
        }),
        ("read your write", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["order"]["orderId"], "o-1", "{ran:?}");
        }),
        ("a position past the end of the log", |ran| refused(ran, "OutOfRange", "MIN_POSITION_BEYOND_HEAD")),
        ("a customer's orders", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["orders"][0]["orderId"], "o-1", "{ran:?}");
        }),
        ("the order as it was at stream version 0", |ran| {
            succeeded(ran);
            assert_eq!(messages(&ran.stdout)[0]["order"]["status"], "ORDER_STATUS_CREATED", "{ran:?}");
        }),
        ("every change of the order", |ran| streamed(ran, "\"orderId\": \"o-1\"")),
        ("an order with a payment token", |ran| succeeded(ran)),
        ("its steps as they happen", |ran| {
            succeeded(ran);
            assert!(ran.stdout.contains("SAGA_STATUS_COMPLETED"), "{ran:?}");
        }),
        ("its lifecycle events", |ran| {
            succeeded(ran);
            assert!(ran.stdout.contains("SagaCompleted"), "{ran:?}");
        }),
        ("a transfer", |ran| {
            succeeded(ran);
            assert!(ran.stdout.contains("SAGA_STATUS_COMPLETED"), "{ran:?}");
        }),
        ("the projections", |ran| {
            succeeded(ran);
            assert!(ran.stdout.contains("order_views"), "{ran:?}");
        }),
    ];
    let steps = readme_steps("A grpcurl walkthrough");
    let mut answers = Vec::new();
    let comments: Vec<&str> = steps.iter().map(|s| s.comment.as_str()).collect();
    assert_eq!(steps.len(), checks.len(), "the README's steps and this test's checks differ: {comments:?}");
    for (step, (starts, check)) in steps.iter().zip(checks) {
        assert!(step.comment.starts_with(starts), "README step {:?} where the test expects {starts:?}", step.comment);
        let ran = run_step(&step.comment, &step.script, &ca, &server.addr, db.url());
        check(&ran);
        answers.push(ran.stdout);
    }
    // The retry's answer is the first one, position included.
    let created = comments.iter().position(|c| c.starts_with("create an order")).expect("the create step");
    assert_eq!(answers[created], answers[created + 1], "the same request id: the first answer");

    // The REST gateway speaks HTTPS with the same certificate.
    let rest = server.rest_addr();
    let (status, body) = curl(&ca, &format!("https://{rest}/v1/orders/o-1"), None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"orderId\":\"o-1\""), "{body}");
    drop(server);
}

#[test]
fn mutual_tls_refuses_clients_without_a_certificate_of_the_ca_and_the_gateway_presents_one() {
    let pki = Pki::new();
    pki.issue("client", "a client", &["client.example"]);
    // A certificate from an authority the server does not trust.
    let stranger = TestCa::new("another CA");
    let (cert, key) = stranger.issue("a stranger", &["stranger.example"]);
    pki.write("stranger.crt", &cert);
    pki.write("stranger.key", &key);

    let env = pki.server_env(true);
    let mut env = env_refs(&env);
    env.push(("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"));
    let server = DevServer::start_env(&[], &env, "eventfold: EventStoreService and the command services listening on ");
    let (ca, client_cert, client_key) = (pki.arg("ca.crt"), pki.arg("client.crt"), pki.arg("client.key"));

    let (ca_path, cert_path, key_path) = (pki.path("ca.crt"), pki.path("client.crt"), pki.path("client.key"));
    let without = handshake(&ca_path, None, &server.addr);
    assert_refused_at_handshake(without, "CertificateRequired", "a client without a certificate");
    let stranger = handshake(&ca_path, Some((&pki.path("stranger.crt"), &pki.path("stranger.key"))), &server.addr);
    assert_refused_at_handshake(stranger, "UnknownCA", "a client with a certificate of another CA");
    // The same client with a certificate of the CA is answered, in HTTP/2.
    let accepted = handshake(&ca_path, Some((&cert_path, &key_path)), &server.addr);
    assert_eq!(accepted, Ok("h2".to_owned()), "a client with a certificate of the CA");
    let refused = grpcurl_with(&["-cacert", &ca], &server.addr, &[HEALTH]);
    assert!(!refused.status.success(), "grpcurl without a certificate: {}", text(&refused));
    let with = ["-cacert", ca.as_str(), "-cert", client_cert.as_str(), "-key", client_key.as_str()];
    eventually(Duration::from_secs(5), "a client with a certificate of the CA is served", || {
        serving(&with, &server.addr)
    });

    // The gateway in the same process calls its gRPC server over mutual
    // TLS; its own listener asks REST callers for no certificate.
    let rest = server.rest_addr();
    let order = r#"{"orderId":"tls-o-1","customerId":"c-1","currency":"EUR","items":[{"productId":"sku-1","quantity":1,"unitPrice":{"minor":700,"currency":"EUR"}}]}"#;
    let (status, body) = curl(&pki.path("ca.crt"), &format!("https://{rest}/v1/orders"), Some(order));
    assert_eq!(status, 200, "CreateOrder through the gateway: {body}");

    // `serve gateway` in its own process, in front of the mutual-TLS server.
    let upstream = format!("https://{}", server.addr);
    let env = pki.server_env(false);
    let mut gateway_env = env_refs(&env);
    gateway_env
        .extend([("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"), ("EVENTFOLD_GATEWAY__UPSTREAM", upstream.as_str())]);
    let gateway = DevServer::start_command(&["serve", "gateway"], &[], &gateway_env, "eventfold: REST on https://");
    let (status, body) =
        curl(&pki.path("ca.crt"), &format!("https://{}/v1/streams/order-tls-o-1/events", gateway.addr), None);
    assert_eq!(status, 200, "ReadStream through `serve gateway`: {body}");
    assert!(body.contains("OrderCreated"), "{body}");

    // A gateway that trusts the server but has no certificate of its own is
    // refused by it: 503, nothing served.
    let lone_ca = pki.arg("ca.crt");
    let gateway_env = [
        ("EVENTFOLD_TLS__CA_FILE", lone_ca.as_str()),
        ("EVENTFOLD_GATEWAY__LISTEN", "127.0.0.1:0"),
        ("EVENTFOLD_GATEWAY__UPSTREAM", upstream.as_str()),
    ];
    let anonymous = DevServer::start_command(&["serve", "gateway"], &[], &gateway_env, "eventfold: REST on http://");
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .arg(format!("http://{}/v1/streams/order-tls-o-1/events", anonymous.addr))
        .output()
        .expect("run curl");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(out.ends_with("\n503"), "a gateway without a client certificate gets no answer: {out}");
    assert!(!out.contains("OrderCreated"), "{out}");
    drop((anonymous, gateway, server));
}

#[test]
fn certificates_are_replaced_without_a_restart() {
    // Reloaded on SIGHUP (reload_secs = 0: never by itself).
    let pki = Pki::new();
    let env = pki.server_env(false);
    let mut env = env_refs(&env);
    env.push(("EVENTFOLD_TLS__RELOAD_SECS", "0"));
    let server = DevServer::start_env(&[], &env, "eventfold: EventStoreService and the command services listening on ");
    let old_ca = pki.dir.path().join("old-ca.crt");
    std::fs::copy(pki.path("ca.crt"), &old_ca).unwrap();
    let old_ca = old_ca.to_string_lossy().into_owned();
    eventually(Duration::from_secs(5), "served with the first certificate", || {
        serving(&["-cacert", &old_ca], &server.addr)
    });

    // A certificate of a new authority replaces the old one.
    let next = Pki { dir: tempfile::tempdir().unwrap(), ca: TestCa::new("the next CA") };
    next.write("ca.crt", &next.ca.pem());
    next.issue("server", "eventfold", &["127.0.0.1", "localhost"]);
    let new_ca = next.arg("ca.crt");
    for file in ["server.crt", "server.key", "ca.crt"] {
        pki.write(file, &std::fs::read_to_string(next.path(file)).unwrap());
    }
    thread::sleep(Duration::from_secs(2));
    serving(&["-cacert", &old_ca], &server.addr).expect("without SIGHUP the old certificate stays");

    let pid = server.process.child.id().to_string();
    let hup = |pid: &str| assert!(Command::new("kill").args(["-HUP", pid]).status().unwrap().success());
    hup(&pid);
    eventually(Duration::from_secs(5), "the new certificate after SIGHUP", || {
        serving(&["-cacert", &new_ca], &server.addr)
    });
    let old = grpcurl_with(&["-cacert", &old_ca], &server.addr, &[HEALTH]);
    assert!(!old.status.success(), "the old authority no longer verifies the server: {}", text(&old));

    // A key that does not load: the certificates in use stay.
    pki.write("server.key", "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n");
    hup(&pid);
    eventually(Duration::from_secs(5), "the failed reload is logged", || {
        let stderr = server.process.stderr.lock().unwrap().clone();
        if stderr.contains("previous certificates stay") { Ok(()) } else { Err(stderr) }
    });
    serving(&["-cacert", &new_ca], &server.addr).expect("still served with the last good certificate");
    let stderr = server.process.stderr.lock().unwrap().clone();
    assert!(!stderr.contains(&pki.dir.path().to_string_lossy().into_owned()), "no path in the log: {stderr}");
    drop(server);

    // Reloaded by itself when the files change (reload_secs = 1).
    let pki = Pki::new();
    let env = pki.server_env(false);
    let mut env = env_refs(&env);
    env.push(("EVENTFOLD_TLS__RELOAD_SECS", "1"));
    let server = DevServer::start_env(&[], &env, "eventfold: EventStoreService and the command services listening on ");
    let first_ca = pki.dir.path().join("first-ca.crt");
    std::fs::copy(pki.path("ca.crt"), &first_ca).unwrap();
    let first_ca = first_ca.to_string_lossy().into_owned();
    eventually(Duration::from_secs(5), "served", || serving(&["-cacert", &first_ca], &server.addr));
    for file in ["server.crt", "server.key", "ca.crt"] {
        pki.write(file, &std::fs::read_to_string(next.path(file)).unwrap());
    }
    eventually(Duration::from_secs(5), "the new certificate, no signal sent", || {
        serving(&["-cacert", &new_ca], &server.addr)
    });
    drop(server);
}

#[test]
fn unusable_tls_settings_are_usage_errors_that_name_the_setting_not_the_path() {
    let run = |env: &[(&str, &str)]| {
        let output = eventfold()
            .args(["serve", "eventstore", "--database-url", "postgresql://nobody@127.0.0.1:1/none"])
            .envs(env.iter().copied())
            .output()
            .expect("run eventfold serve eventstore");
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert_eq!(output.status.code(), Some(64), "exit status: {:?}; stderr:\n{stderr}", output.status);
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line:\n{stderr}");
        stderr
    };
    let missing = run(&[
        ("EVENTFOLD_TLS__CERT_FILE", "/srv/very-secret-dir/tls.crt"),
        ("EVENTFOLD_TLS__KEY_FILE", "/srv/very-secret-dir/tls.key"),
    ]);
    assert!(missing.contains("tls.cert_file: cannot read the file"), "{missing}");
    assert!(!missing.contains("very-secret-dir"), "{missing}");
    let relay = run(&[("EVENTFOLD_RELAY__TLS", "true")]);
    assert!(relay.contains("relay.tls = true needs tls.ca_file"), "{relay}");
}
