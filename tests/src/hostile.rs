//! What a hostile client sends, as proptest strategies shared by the
//! property tests of the event store and the query service.

use std::time::{SystemTime, UNIX_EPOCH};

use proptest::{prelude::*, sample::select};

/// 0001-01-01T00:00:00Z in Unix seconds: the earliest time a request may
/// name (stated here, not taken from the code under test).
pub const MIN_TIME_SECS: i64 = -62_135_596_800;
/// 9999-12-31T23:59:59Z in Unix seconds: the latest whole second.
pub const MAX_TIME_SECS: i64 = 253_402_300_799;

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
