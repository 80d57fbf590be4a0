//! [`Outage`]: since when a supervised worker's steps fail, for the log
//! line of its recovery (the consumers here, the relay).

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

/// Since when the steps of a worker fail. Clones share it: the supervisor
/// runs a clone of the worker again after a failure, and the first step
/// that works says how long the outage lasted.
#[derive(Debug, Clone, Default)]
pub struct Outage(Arc<Mutex<Option<Instant>>>);

impl Outage {
    /// A step failed: the outage starts now, unless it has already begun.
    pub fn failed(&self) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert_with(Instant::now);
    }

    /// A step worked: how long the outage it ends lasted, if there was one.
    pub fn recovered(&self) -> Option<Duration> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take().map(|since| since.elapsed())
    }
}
