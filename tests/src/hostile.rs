//! What a hostile client sends, as proptest strategies shared by the
//! property tests of the event store and the query service, and the rules
//! both check every answer by.

use std::{
    fmt::{Debug, Display},
    time::{SystemTime, UNIX_EPOCH},
};

use proptest::{
    prelude::*,
    sample::select,
    test_runner::{RngAlgorithm, TestCaseError, TestRng, TestRunner},
};
use prost_types::Timestamp;
use tonic::{Code, Status};
use tonic_types::{ErrorInfo, StatusExt};

/// 0001-01-01T00:00:00Z in Unix seconds: the earliest time a request may
/// name (stated here, not taken from the code under test).
pub const MIN_TIME_SECS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in Unix seconds: the latest whole second.
pub const MAX_TIME_SECS: i64 = 253_402_300_799;
/// Nanoseconds in a second.
pub const NANOS: i128 = 1_000_000_000;
/// The longest id (of a request, a correlation, an order, ...).
pub const MAX_ID_BYTES: usize = 128;

// --- the run -----------------------------------------------------------------------

/// How a property runs against a server that keeps its state from case to
/// case: its seed and its number of cases.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// `HOSTILE_SEED`, else one of the time and the process id: a failure
    /// names it, to replay the run.
    pub seed: u64,
    /// `PROPTEST_CASES`, else the test's default.
    pub cases: u32,
}

impl Run {
    /// The run the environment asks for, of `default_cases` unless it says.
    pub fn from_env(default_cases: u32) -> Self {
        let seed = std::env::var("HOSTILE_SEED").ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or_else(|| {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
            (now as u64) ^ u64::from(std::process::id()).rotate_left(32)
        });
        let cases = std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default_cases);
        Run { seed, cases }
    }

    /// The runner of the cases, from the seed, persisting nothing and not
    /// shrinking: shrinking would replay requests against a state that has
    /// moved on, and the failure names the exact request anyway.
    pub fn runner(&self) -> TestRunner {
        let config = ProptestConfig {
            cases: self.cases,
            failure_persistence: None,
            max_shrink_iters: 0,
            ..ProptestConfig::default()
        };
        let seed_bytes: Vec<u8> = self.seed.to_le_bytes().repeat(4);
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes))
    }
}

// --- validity as documented ---------------------------------------------------------

/// Ids: 1 to 128 bytes of visible ASCII.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && id.bytes().all(|b| b.is_ascii_graphic())
}

/// A time of the years 0001 to 9999 with nanos of 0..1e9.
pub fn valid_time(t: &Timestamp) -> bool {
    (MIN_TIME_SECS..=MAX_TIME_SECS).contains(&t.seconds) && (0..1_000_000_000).contains(&t.nanos)
}

/// A time in nanoseconds since the epoch.
pub fn nanos(t: &Timestamp) -> i128 {
    i128::from(t.seconds) * NANOS + i128::from(t.nanos)
}

/// The time of nanoseconds since the epoch (seconds clamped to i64).
pub fn timestamp(n: i128) -> Timestamp {
    let seconds = n.div_euclid(NANOS).clamp(i128::from(i64::MIN), i128::from(i64::MAX));
    Timestamp { seconds: seconds as i64, nanos: n.rem_euclid(NANOS) as i32 }
}

// --- answers ------------------------------------------------------------------------

/// A status as a failure shows it: code, reason, message and field
/// violations.
pub fn show(status: &Status) -> String {
    let reason = status.get_details_error_info().map(|i| i.reason).unwrap_or_default();
    let fields: Vec<String> = status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| format!("{}: {}", v.field, v.description)).collect())
        .unwrap_or_default();
    format!("{:?} {reason} {:?} {fields:?}", status.code(), status.message())
}

/// The rules for every error, whatever the request: a code `allowed` (given
/// the error's `ErrorInfo`), an `ErrorInfo` in `domain` with an UPPER_SNAKE
/// reason, and for INVALID_ARGUMENT a `BadRequest` whose every violation
/// names a field and says why (AIP-193).
///
/// A panic caught by the server is INTERNAL, one that kills the connection
/// UNKNOWN or UNAVAILABLE, a storage error INTERNAL or UNAVAILABLE: none of
/// them is ever `allowed` for one sequential, well-behaved client of a
/// healthy server.
///
/// # Errors
///
/// Which rule `status` breaks.
pub fn check_status(
    status: &Status,
    domain: &str,
    allowed: impl FnOnce(Code, &ErrorInfo) -> bool,
) -> Result<(), String> {
    let Some(info) = status.get_details_error_info() else { return Err(format!("no ErrorInfo: {}", show(status))) };
    if !allowed(status.code(), &info) {
        return Err(format!("answered {}", show(status)));
    }
    if info.domain != domain
        || info.reason.is_empty()
        || !info.reason.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(format!("ErrorInfo {info:?} is not an {domain} UPPER_SNAKE reason: {}", show(status)));
    }
    if status.code() == Code::InvalidArgument {
        let Some(bad) = status.get_details_bad_request() else {
            return Err(format!("INVALID_ARGUMENT without BadRequest: {}", show(status)));
        };
        if bad.field_violations.is_empty()
            || bad.field_violations.iter().any(|v| v.field.is_empty() || v.description.is_empty())
        {
            return Err(format!("INVALID_ARGUMENT without complete field violations: {}", show(status)));
        }
    }
    Ok(())
}

/// Texts of the driver, the pool or the database's address that must
/// never reach a client (compared lowercase).
pub const DRIVER_TEXT: [&str; 9] =
    ["sqlstate", "postgres", "connection", "127.0.0.1", "bb8", "db error", "timed out", "refused", "os error"];

/// The rule for an UNAVAILABLE or INTERNAL answer: an `ErrorInfo` whose
/// `error_id` the message repeats (to find the log line by), and no
/// [`DRIVER_TEXT`] nor any of `also` (e.g. the database's port) in the
/// message or the metadata. The error id itself is left out of the search:
/// it is random hex and may spell `bb8` or a port's digits.
///
/// # Errors
///
/// Which rule `status` breaks.
pub fn check_no_internal_text(status: &Status, also: &[&str]) -> Result<(), String> {
    let Some(info) = status.get_details_error_info() else { return Err(format!("no ErrorInfo: {}", show(status))) };
    let id = info.metadata.get("error_id").map(String::as_str).unwrap_or_default();
    if id.is_empty() || !status.message().contains(id) {
        return Err(format!("no error id to find the log line by: {status:?}"));
    }
    let others = info.metadata.iter().filter(|(key, _)| *key != "error_id").map(|(_, value)| value.as_str());
    for text in std::iter::once(status.message()).chain(others) {
        let text = text.replace(id, "").to_lowercase();
        if let Some(leak) = DRIVER_TEXT.iter().chain(also).find(|leak| text.contains(&leak.to_lowercase())) {
            return Err(format!("{leak:?} reached the client: {status:?}"));
        }
    }
    Ok(())
}

/// Whether the field violation `got` names the field `want` or a part of
/// it (`want.x`, `want[0]`).
pub fn field_matches(got: &str, want: &str) -> bool {
    got == want || got.strip_prefix(want).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

/// The failure of one request to `rpc`: the exact request sent (after
/// resolving the generated choices, to replay by hand; cut at 8000 bytes)
/// and what was wrong.
pub fn fail(rpc: &str, request: &impl Debug, message: impl Display) -> TestCaseError {
    let mut shown = format!("{request:?}");
    if shown.len() > 8000 {
        let mut end = 8000;
        while !shown.is_char_boundary(end) {
            end -= 1;
        }
        shown.truncate(end);
        shown.push_str(" ...");
    }
    TestCaseError::fail(format!("{rpc} {shown}\n  => {message}"))
}

// --- strategies ---------------------------------------------------------------------

/// Seconds: the whole i64 range, its ends, and the ends of 0001..9999.
pub fn seconds() -> BoxedStrategy<i64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
    prop_oneof![
        2 => select(vec![
            i64::MIN,
            i64::MIN + 1,
            i64::MAX,
            i64::MAX - 1,
            MIN_TIME_SECS - 1,
            MIN_TIME_SECS,
            MIN_TIME_SECS + 1,
            MAX_TIME_SECS - 1,
            MAX_TIME_SECS,
            MAX_TIME_SECS + 1,
            -1,
            0,
            1,
            946_684_800, // 2000-01-01, PostgreSQL's epoch
        ]),
        1 => any::<i64>(),
        1 => MIN_TIME_SECS..=MAX_TIME_SECS,
        1 => (now - 120)..(now + 120),
    ]
    .boxed()
}

/// Nanos: the whole i32 range, its ends, and the ends of 0..1e9.
pub fn subsec_nanos() -> BoxedStrategy<i32> {
    prop_oneof![
        2 => select(vec![0, 1, 999, 1000, 999_999_000, 999_999_500, 999_999_999, 1_000_000_000, -1, i32::MIN, i32::MAX]),
        2 => 0..1_000_000_000i32,
        1 => any::<i32>(),
    ]
    .boxed()
}

/// A time to put in a request, half and half: a raw one (as `raw` makes
/// it of seconds and nanos: any [`seconds`] and [`subsec_nanos`] 2 in 3,
/// else the last nanoseconds of 9999), or one near a time the test knows
/// (as `near` makes it of the index of that time and a [`nanos_offset`] of
/// `edges`).
pub fn time<T: Debug + 'static>(edges: u32, raw: fn(i64, i32) -> T, near: fn(usize, i64) -> T) -> BoxedStrategy<T> {
    let raw = prop_oneof![
        2 => (seconds(), subsec_nanos()),
        1 => select(vec![999_999_000, 999_999_001, 999_999_999]).prop_map(|n| (MAX_TIME_SECS, n)),
    ]
    .prop_map(move |(seconds, nanos)| raw(seconds, nanos));
    prop_oneof![
        3 => raw,
        3 => (any::<usize>(), nanos_offset(edges)).prop_map(move |(pick, offset)| near(pick, offset)),
    ]
    .boxed()
}

/// Nanoseconds to add to a known time: the edges of a µs, a ms and a second
/// (`edges` in `edges` + 1), or anything within ±2 s.
pub fn nanos_offset(edges: u32) -> BoxedStrategy<i64> {
    prop_oneof![
        edges => select(vec![0i64, 1, -1, 500, -500, 999, -999, 1000, -1000, 1001, -1001, 1_000_000, -1_000_000]),
        1 => -2_000_000_000i64..2_000_000_000,
    ]
    .boxed()
}

/// Short strings: ordinary, empty, unicode, control characters and NUL.
/// Their weights add up to 10: a test that adds its own long and special
/// strings at weight 1 each gives this one 10.
pub fn short_text() -> BoxedStrategy<String> {
    prop_oneof![
        4 => "[a-zA-Z0-9_.-]{1,12}",
        1 => Just(String::new()),
        2 => "\\PC{1,24}",
        1 => ".{1,24}",
        1 => "[a-z]{0,3}[\\x01-\\x1f\\x7f\\x{80}-\\x{9f}][a-z]{0,3}",
        1 => "[a-z]{0,3}\\x00[a-z]{0,3}",
    ]
    .boxed()
}
