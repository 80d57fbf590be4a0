//! Failpoints: named instants at which a test makes the process fail, so
//! that a crash test can show that its crash hit the window that matters
//! (after the broker's acknowledgement and before the checkpoint, after a
//! provider call and before the save, ...).
//!
//! They exist only in test builds: with the `failpoints` feature (which the
//! test harness, `eventfold-tests`, turns on) [`failpoint!`](crate::failpoint!)
//! reports to a process-wide registry; without it the macro expands to
//! nothing and the release binary carries neither the names nor the
//! registry ([`compiled_in`] says which build this is).
//!
//! A failpoint is armed in code ([`arm`]) or through the environment
//! variable [`ENV`], read once on the first hit or by [`init_from_env`]:
//! `FAILPOINTS="relay::after_ack=1*panic;saga::after_call=pause"`. An
//! action is `off`, `panic` (the task panics: a supervised task restarts,
//! like a crash of one component), `abort` (the process aborts at once:
//! no destructor, no flush, like SIGKILL) or `pause` (a line
//! `failpoint NAME paused` goes to stderr and the thread sleeps for good,
//! for a test that then kills the process with SIGKILL at exactly that
//! instant). `N*action` acts on the first N hits only, then turns off.
//!
//! Names used in eventfold (each documented where it sits):
//! `store::after_commit`, `relay::after_ack`, `projector::after_apply`,
//! `consumer::after_handle`, `saga::after_call`, `saga::after_state`,
//! `fs::mid_write` (a batch written but for its last byte), `fs::after_write`.

/// The environment variable that arms failpoints in a test build.
pub const ENV: &str = "FAILPOINTS";

/// Whether this build has failpoints (a test build).
pub const fn compiled_in() -> bool {
    cfg!(feature = "failpoints")
}

/// Marks a failpoint: in a test build, counts the hit and does what the
/// failpoint is armed to do (nothing unless armed); in any other build,
/// nothing at all.
#[cfg(feature = "failpoints")]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        $crate::failpoint::hit($name)
    };
}

/// Marks a failpoint: in a test build, counts the hit and does what the
/// failpoint is armed to do (nothing unless armed); in any other build,
/// nothing at all.
#[cfg(not(feature = "failpoints"))]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {};
}

#[cfg(feature = "failpoints")]
pub use registry::{Armed, arm, fired, hit, hits};

/// Arms the failpoints named by [`ENV`], if set. A test build calls it at
/// start so that a malformed value fails loudly; in a build without
/// failpoints a set variable is refused, since it would silently do
/// nothing.
///
/// # Errors
///
/// The variable does not parse, or is set in a build without failpoints.
pub fn init_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    if spec.trim().is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        registry::configure(&spec)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        Err(format!("{ENV} is set, but this build has no failpoints (they exist only in test builds)"))
    }
}

#[cfg(feature = "failpoints")]
mod registry {
    use std::collections::HashMap;
    use std::sync::{Mutex, MutexGuard, OnceLock};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Action {
        Off,
        Panic,
        Abort,
        Pause,
    }

    #[derive(Debug, Default)]
    struct Point {
        action: Option<Action>,
        /// How many more hits act; `None`: every one.
        remaining: Option<u64>,
        hits: u64,
        fired: u64,
    }

    fn points() -> MutexGuard<'static, HashMap<String, Point>> {
        static POINTS: OnceLock<Mutex<HashMap<String, Point>>> = OnceLock::new();
        let points = POINTS.get_or_init(|| {
            let mut points = HashMap::new();
            if let Ok(spec) = std::env::var(super::ENV) {
                // A malformed value panics here, in a test build only.
                for (name, action, remaining) in parse(&spec).unwrap_or_else(|e| panic!("{e}")) {
                    points.insert(name, Point { action: Some(action), remaining, ..Point::default() });
                }
            }
            Mutex::new(points)
        });
        points.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn parse(spec: &str) -> Result<Vec<(String, Action, Option<u64>)>, String> {
        spec.split(';')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let (name, action) =
                    entry.split_once('=').ok_or_else(|| format!("{}: {entry:?} is not NAME=ACTION", super::ENV))?;
                let (remaining, action) = match action.split_once('*') {
                    Some((count, action)) => {
                        let count = count
                            .trim()
                            .parse::<u64>()
                            .map_err(|_| format!("{}: {entry:?}: the count before `*` is not a number", super::ENV))?;
                        (Some(count), action)
                    }
                    None => (None, action),
                };
                let action = match action.trim() {
                    "off" => Action::Off,
                    "panic" => Action::Panic,
                    "abort" => Action::Abort,
                    "pause" => Action::Pause,
                    other => {
                        return Err(format!(
                            "{}: {entry:?}: unknown action {other:?} (off, panic, abort, pause)",
                            super::ENV
                        ));
                    }
                };
                Ok((name.trim().to_owned(), action, remaining))
            })
            .collect()
    }

    pub(super) fn configure(spec: &str) -> Result<(), String> {
        let parsed = parse(spec)?;
        let mut points = points();
        for (name, action, remaining) in parsed {
            let point = points.entry(name).or_default();
            point.action = Some(action);
            point.remaining = remaining;
        }
        Ok(())
    }

    /// Arms failpoint `name` with `spec` (`panic`, `1*panic`, ...) until
    /// the returned guard drops. The registry is process-wide: a test that
    /// arms a failpoint other tests of its binary pass through runs in a
    /// test binary of its own.
    ///
    /// # Panics
    ///
    /// If `spec` does not parse.
    pub fn arm(name: &str, spec: &str) -> Armed {
        configure(&format!("{name}={spec}")).unwrap_or_else(|e| panic!("{e}"));
        Armed { name: name.to_owned() }
    }

    /// Disarms its failpoint when dropped (its counters stay).
    #[derive(Debug)]
    #[must_use = "the failpoint is disarmed when this guard drops"]
    pub struct Armed {
        name: String,
    }

    impl Drop for Armed {
        fn drop(&mut self) {
            if let Some(point) = points().get_mut(&self.name) {
                point.action = None;
                point.remaining = None;
            }
        }
    }

    /// How many times the program reached failpoint `name`.
    pub fn hits(name: &str) -> u64 {
        points().get(name).map_or(0, |p| p.hits)
    }

    /// How many times failpoint `name` acted (panicked, aborted, paused).
    pub fn fired(name: &str) -> u64 {
        points().get(name).map_or(0, |p| p.fired)
    }

    /// Called by [`failpoint!`](crate::failpoint!).
    #[allow(clippy::arithmetic_side_effects, clippy::panic)]
    pub fn hit(name: &'static str) {
        let action = {
            let mut points = points();
            let point = points.entry(name.to_owned()).or_default();
            point.hits += 1;
            match (point.action, point.remaining) {
                (None | Some(Action::Off), _) | (_, Some(0)) => None,
                (Some(action), remaining) => {
                    point.remaining = remaining.map(|n| n - 1);
                    point.fired += 1;
                    Some(action)
                }
            }
        };
        match action {
            None | Some(Action::Off) => {}
            Some(Action::Panic) => panic!("failpoint {name}"),
            Some(Action::Abort) => {
                eprintln!("failpoint {name} aborts the process");
                std::process::abort();
            }
            Some(Action::Pause) => {
                eprintln!("failpoint {name} paused");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse_and_bad_ones_are_refused() {
            assert_eq!(
                parse("a::b=1*panic; c=pause ;").unwrap(),
                vec![("a::b".to_owned(), Action::Panic, Some(1)), ("c".to_owned(), Action::Pause, None)]
            );
            assert!(parse("a").is_err());
            assert!(parse("a=explode").is_err());
            assert!(parse("a=x*panic").is_err());
        }

        #[test]
        fn an_armed_point_fires_as_often_as_told_and_counts_every_hit() {
            let name = "failpoint::tests::counted";
            let armed = arm(name, "2*panic");
            for _ in 0..2 {
                assert!(std::panic::catch_unwind(|| hit(name)).is_err(), "fires while armed");
            }
            hit(name);
            assert_eq!((hits(name), fired(name)), (3, 2));
            drop(armed);
            let _again = arm(name, "off");
            hit(name);
            assert_eq!((hits(name), fired(name)), (4, 2));
        }
    }
}
