//! What a test binary logs, captured: [`capture`] installs a global
//! `tracing` subscriber that writes every line into a buffer (so a test
//! binary that uses it has no other subscriber), and [`assert_internal`]
//! checks an INTERNAL answer against that log.

use std::{
    io::Write,
    sync::{Arc, Mutex, OnceLock},
};

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Everything this test binary has logged so far.
#[derive(Debug, Clone)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    /// The log as text, line after line.
    ///
    /// # Panics
    ///
    /// If the log is not UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).expect("the log is UTF-8")
    }
}

/// The log of this test binary: the first call installs the subscriber that
/// captures it (without colours), later calls share it.
///
/// # Panics
///
/// If another global subscriber is installed already.
pub fn capture() -> Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let writer = buffer.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || Capture(writer.clone())).finish();
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber of this binary");
        Logs(buffer)
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SQL and driver words: none may reach a client.
const SQL_WORDS: [&str; 6] = ["sqlstate", "select", "from", "column", "db error", "postgres"];

/// Asserts `status` is INTERNAL with `reason`, only the generic message and
/// an error id, none of `leaks` nor SQL or driver words (compared without
/// case) in what the client sees (the message and the `ErrorInfo`
/// metadata), and a line of `logs` with that id that names `cause`.
///
/// # Panics
///
/// If any of that is not so.
pub fn assert_internal(status: &Status, reason: &str, logs: &Logs, leaks: &[&str], cause: &str) {
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, reason, "{status:?}");
    let id = info.metadata.get("error_id").expect("an error id to find the log line by").clone();
    assert!(!id.is_empty());
    assert_eq!(status.message(), format!("internal error (error id {id})"), "only the generic message and the id");
    for text in std::iter::once(status.message()).chain(info.metadata.values().map(String::as_str)) {
        let text = text.to_lowercase();
        for leak in SQL_WORDS.iter().chain(leaks) {
            assert!(!text.contains(&leak.to_lowercase()), "{leak:?} reached the client: {status:?}");
        }
    }
    let logged = logs.text();
    let line = logged.lines().find(|line| line.contains(&id)).unwrap_or_else(|| panic!("error id {id} not logged"));
    assert!(line.contains(cause), "the log line of {id} says what failed ({cause:?}): {line}");
}
