//! Request values from the wire, checked before use: every service converts
//! a `google.protobuf.Timestamp` or an unsigned position through here, so a
//! hostile value is refused the same way everywhere (`INVALID_ARGUMENT`
//! naming the field), never wrapped, cast or allowed to overflow.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eventfold_store::{FieldViolation, MAX_TIME_SECS, MIN_TIME_SECS, check_bigint};
use prost_types::Timestamp;

/// `ts` as a time, if it lies in the years 0001 to 9999 with valid nanos;
/// otherwise a violation of `field` and `None`.
pub fn system_time(ts: Timestamp, field: &str, violations: &mut Vec<FieldViolation>) -> Option<SystemTime> {
    let in_range = (MIN_TIME_SECS..=MAX_TIME_SECS).contains(&ts.seconds);
    let nanos = u32::try_from(ts.nanos).ok().filter(|n| *n < 1_000_000_000);
    let (true, Some(nanos)) = (in_range, nanos) else {
        violations.push(FieldViolation::new(
            field,
            "must be a timestamp between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59.999999999Z",
        ));
        return None;
    };
    let offset = Duration::new(ts.seconds.unsigned_abs(), nanos);
    let time = if ts.seconds >= 0 {
        UNIX_EPOCH.checked_add(offset)
    } else {
        // Negative seconds with positive nanos: seconds back, nanos forward.
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(ts.seconds.unsigned_abs()))
            .and_then(|t| t.checked_add(Duration::from_nanos(u64::from(nanos))))
    };
    if time.is_none() {
        violations.push(FieldViolation::new(field, "is not representable on this platform"));
    }
    time
}

/// `value` checked to fit a PostgreSQL `bigint` (a violation of `field`
/// otherwise); the value itself is returned unchanged for chaining.
pub fn bigint(value: u64, field: &str, violations: &mut Vec<FieldViolation>) -> u64 {
    check_bigint(field, value, violations);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(seconds: i64, nanos: i32) -> Option<SystemTime> {
        let mut violations = Vec::new();
        let time = system_time(Timestamp { seconds, nanos }, "t", &mut violations);
        assert_eq!(time.is_none(), !violations.is_empty());
        time
    }

    #[test]
    fn times_outside_the_years_1_to_9999_are_refused() {
        assert!(check(i64::MAX, 0).is_none());
        assert!(check(i64::MIN, 0).is_none());
        assert!(check(MAX_TIME_SECS + 1, 0).is_none());
        assert!(check(MIN_TIME_SECS - 1, 0).is_none());
        assert!(check(0, -1).is_none());
        assert!(check(0, 1_000_000_000).is_none());
    }

    #[test]
    fn times_inside_are_converted_exactly() {
        assert_eq!(check(0, 0), Some(UNIX_EPOCH));
        assert_eq!(check(1, 5), Some(UNIX_EPOCH + Duration::new(1, 5)));
        assert_eq!(check(-1, 5), Some(UNIX_EPOCH - Duration::from_secs(1) + Duration::from_nanos(5)));
        assert!(check(MAX_TIME_SECS, 999_999_999).is_some());
        assert!(check(MIN_TIME_SECS, 0).is_some());
    }
}
