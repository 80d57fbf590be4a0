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
        let binary = binary();
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = crate::free_port().expect("a free port");
            let log = tempfile::NamedTempFile::new().expect("a log file");
            let url = format!("tcp://127.0.0.1:{port}");
            let child = Command::new(&binary)
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
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
