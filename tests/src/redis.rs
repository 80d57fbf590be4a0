//! A throw-away Redis for the tests (or the one named by
//! `EVENTFOLD_TEST_REDIS_URL`): `redis-server` on a free loopback port, no
//! persistence, stopped when the test process ends. Tests share the server
//! and keep apart by key prefix ([`TestRedis::create`]).

use std::{
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, TcpStream},
    process::{ChildStdin, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// Names a Redis server to use instead of starting a throw-away one, e.g.
/// `redis://127.0.0.1:6379`.
pub const REDIS_URL_ENV: &str = "EVENTFOLD_TEST_REDIS_URL";
const NOT_FOUND: &str =
    "redis-server not found: install it with `apt-get install -y redis-server` (or set EVENTFOLD_TEST_REDIS_URL)";

/// A key prefix of its own on the shared test Redis.
#[derive(Debug, Clone)]
pub struct TestRedis {
    url: String,
    prefix: String,
}

impl TestRedis {
    /// The shared server (started on first use) and a fresh key prefix.
    ///
    /// # Panics
    ///
    /// If the server cannot be started or does not answer `PING`.
    pub fn create() -> TestRedis {
        TestRedis { url: redis_url(), prefix: format!("{}:", crate::unique_name()) }
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The prefix every key of this test should start with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
}

/// The server URL: `EVENTFOLD_TEST_REDIS_URL` if set, otherwise this
/// process's throw-away server, started on first use.
///
/// # Panics
///
/// If the throw-away server cannot be started (every later call panics with
/// the same message).
pub fn redis_url() -> String {
    static SERVER: OnceLock<Result<String, String>> = OnceLock::new();
    match SERVER.get_or_init(|| match std::env::var(REDIS_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_owned()),
        _ => start().map(|(port, watchdog)| {
            // Never dropped: the server lives until the process ends.
            std::mem::forget(watchdog);
            format!("redis://127.0.0.1:{port}")
        }),
    }) {
        Ok(url) => url.clone(),
        Err(message) => panic!("{message}"),
    }
}

fn find_redis_server() -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .chain(["/usr/bin".into(), "/usr/local/bin".into(), "/usr/sbin".into()])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.is_file())
}

/// Starts `redis-server` under a watchdog shell that stops it when its
/// stdin closes, i.e. when this process ends for any reason.
fn start() -> Result<(u16, ChildStdin), String> {
    let server = find_redis_server().ok_or_else(|| NOT_FOUND.to_owned())?;
    const SCRIPT: &str = r#""$EF_REDIS" --port "$EF_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --protected-mode no --loglevel warning >/dev/null 2>&1 &
pid=$!
cat >/dev/null 2>&1
kill "$pid" 2>/dev/null
wait "$pid" 2>/dev/null"#;
    crate::watched_server(
        &format!("the test Redis ({})", server.display()),
        SCRIPT,
        &[("EF_REDIS", server.as_os_str())],
        Duration::from_secs(10),
        ping,
    )
}

/// A Redis server of one test's own, which the test may stop and start
/// again on the same port (an outage). Always a throw-away `redis-server`,
/// even when `EVENTFOLD_TEST_REDIS_URL` names a shared one; killed on drop.
#[derive(Debug)]
pub struct OwnRedis {
    port: u16,
    child: Option<std::process::Child>,
}

impl OwnRedis {
    /// Starts a server on a free loopback port.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing or does not answer `PING`.
    pub fn start() -> OwnRedis {
        let port = crate::free_port().expect("a free port");
        let mut redis = OwnRedis { port, child: None };
        redis.resume();
        redis
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (its data is gone; the port stays reserved for
    /// [`OwnRedis::resume`] only by convention).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is
    /// answered, and what it holds stays, so that a write missed during the
    /// pause would show afterwards as a stale entry.
    ///
    /// # Panics
    ///
    /// If the server is not running or `kill` fails.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on (SIGCONT), with everything it held.
    ///
    /// # Panics
    ///
    /// If the server is not running or `kill` fails.
    pub fn unpause(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the test's own Redis is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .unwrap_or_else(|e| panic!("cannot run kill {signal} {pid}: {e}"));
        assert!(status.success(), "kill {signal} {pid} failed: {status}");
    }

    /// Starts the server again on the same port, empty.
    ///
    /// # Panics
    ///
    /// If it does not answer `PING` within 10 s.
    pub fn resume(&mut self) {
        self.stop();
        let server = find_redis_server().unwrap_or_else(|| panic!("{NOT_FOUND}"));
        let child = Command::new(&server)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "no", "--loglevel", "warning"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = ping(self.port) {
            assert!(Instant::now() < deadline, "the test's own Redis on port {} does not answer: {e}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis server of one test's own that speaks only TLS (`--port 0
/// --tls-port P`), with the certificate, key and CA files given; with
/// `mutual`, clients must present a certificate of that CA
/// (`tls-auth-clients yes`). Killed on drop.
#[derive(Debug)]
pub struct TlsRedis {
    port: u16,
    child: std::process::Child,
}

impl TlsRedis {
    /// Starts it on a free loopback port and waits until it accepts
    /// connections.
    ///
    /// # Panics
    ///
    /// If `redis-server` is missing, lacks TLS, or does not listen within
    /// 10 s.
    pub fn start(cert: &std::path::Path, key: &std::path::Path, ca: &std::path::Path, mutual: bool) -> TlsRedis {
        let server = find_redis_server().unwrap_or_else(|| panic!("{NOT_FOUND}"));
        let port = crate::free_port().expect("a free port");
        let mut child = Command::new(&server)
            .args(["--port", "0", "--tls-port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .arg("--tls-ca-cert-file")
            .arg(ca)
            .args(["--tls-auth-clients", if mutual { "yes" } else { "no" }])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no", "--loglevel", "warning"])
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", server.display()));
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut pipe) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
                }
                panic!("the TLS test Redis exited ({status}); built without TLS? {stderr}");
            }
            assert!(Instant::now() < deadline, "the TLS test Redis does not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsRedis { port, child }
    }

    /// `rediss://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// The same server as a plain `redis://` URL (which it does not serve).
    pub fn plain_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `PING` over RESP; `+PONG` expected.
fn ping(port: u16) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(1))
        .map_err(|e| format!("connect to 127.0.0.1:{port}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    stream.write_all(b"*1\r\n$4\r\nPING\r\n").map_err(|e| format!("send PING: {e}"))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).map_err(|e| format!("read PING answer: {e}"))?;
    if line.trim_end() == "+PONG" { Ok(()) } else { Err(format!("PING answered {line:?}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One RESP command, one line of answer.
    fn command(url: &str, args: &[&str]) -> String {
        let addr = url.strip_prefix("redis://").expect("a redis:// URL");
        let mut stream = TcpStream::connect(addr).expect("connect");
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        stream.write_all(request.as_bytes()).expect("send");
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader.read_line(&mut line).expect("answer");
        if let Some(len) = line.strip_prefix('$').and_then(|l| l.trim_end().parse::<usize>().ok()) {
            let mut value = String::new();
            reader.read_line(&mut value).expect("bulk value");
            assert_eq!(value.trim_end().len(), len);
            return value.trim_end().to_owned();
        }
        line.trim_end().to_owned()
    }

    #[test]
    fn a_throw_away_redis_answers_and_prefixes_keep_tests_apart() {
        let a = TestRedis::create();
        let b = TestRedis::create();
        assert_eq!(a.url(), b.url(), "one server per process");
        assert_ne!(a.prefix(), b.prefix());
        let key = |r: &TestRedis| format!("{}greeting", r.prefix());
        assert_eq!(command(a.url(), &["SET", &key(&a), "hello"]), "+OK");
        assert_eq!(command(a.url(), &["GET", &key(&a)]), "hello");
        assert_eq!(command(b.url(), &["GET", &key(&b)]), "$-1", "b does not see a's key");
        assert_eq!(command(a.url(), &["CONFIG", "GET", "appendonly"]).chars().next(), Some('*'));
    }
}
