//! Readiness per dependency: each process names the dependencies it needs
//! (PostgreSQL, Redis when configured, the Kafka brokers and the schema
//! registry for the relay and Kafka-fed projectors), a prober checks each
//! every interval, and the process is ready while every required one
//! answered its last check. The admin listener's `/readyz` says so (200 or
//! 503, one line per dependency) and a gRPC server's overall health (`""`)
//! follows it.
//!
//! A dependency can be *reported* only (`[admin] optional`): listed by
//! `/readyz` but not deciding readiness, e.g. Redis in front of queries
//! that fall back to PostgreSQL without it.
//!
//! A check's error text goes to the log (once per change), never into the
//! answer of `/readyz`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// Longest a single check may take before it counts as failed.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// One check of a dependency: `Err` (with text for the log) when it does
/// not answer.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A dependency and what its last check found.
struct Dependency {
    name: String,
    required: bool,
    check: Check,
    /// `None` until its first check.
    up: Option<bool>,
}

/// The dependencies of a process and their state (cloning shares them).
#[derive(Clone, Default)]
pub struct Readiness {
    dependencies: Arc<Mutex<Vec<Dependency>>>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness").field("dependencies", &self.report()).finish()
    }
}

/// The state of one dependency, as `/readyz` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DependencyState {
    pub name: String,
    pub required: bool,
    /// `None` until its first check.
    pub up: Option<bool>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds dependency `name`, checked by `check`; it decides readiness
    /// when `required`.
    pub fn add<F, Fut>(&self, name: &str, required: bool, check: F) -> &Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
    {
        let check: Check = Arc::new(move || Box::pin(check()));
        self.lock().push(Dependency { name: name.to_owned(), required, check, up: None });
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Dependency>> {
        self.dependencies.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every dependency and its state, in the order added.
    pub fn report(&self) -> Vec<DependencyState> {
        self.lock().iter().map(|d| DependencyState { name: d.name.clone(), required: d.required, up: d.up }).collect()
    }

    /// Whether every required dependency answered its last check (true
    /// when there is none).
    pub fn is_ready(&self) -> bool {
        self.lock().iter().filter(|d| d.required).all(|d| d.up == Some(true))
    }

    /// Checks every dependency once (all at once, each within
    /// [`CHECK_TIMEOUT`]) and records the results; a change is logged.
    pub async fn check_all(&self) {
        let checks: Vec<(String, Check)> = self.lock().iter().map(|d| (d.name.clone(), d.check.clone())).collect();
        let results = futures_util::future::join_all(checks.iter().map(|(_, check)| async move {
            match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
        }))
        .await;
        let mut dependencies = self.lock();
        for ((name, _), result) in checks.iter().zip(results) {
            let Some(dependency) = dependencies.iter_mut().find(|d| &d.name == name) else { continue };
            let up = result.is_ok();
            if dependency.up != Some(up) {
                match &result {
                    Ok(()) => tracing::info!(dependency = %name, "dependency answers: ready"),
                    Err(e) => {
                        tracing::warn!(dependency = %name, required = dependency.required, error = %e, "dependency does not answer")
                    }
                }
                dependency.up = Some(up);
            }
        }
    }

    /// Checks every dependency every `interval` until `token` is cancelled.
    pub async fn run(self, interval: Duration, token: CancellationToken) {
        loop {
            self.check_all().await;
            tokio::select! {
                () = tokio::time::sleep(interval.max(Duration::from_millis(100))) => {}
                () = token.cancelled() => return,
            }
        }
    }

    /// The answer of `/readyz`: ready (200) or not (503), and one line per
    /// dependency (`postgresql: up`, `redis: down (reported only)`, …).
    pub fn answer(&self, stopping: bool) -> (bool, String) {
        let report = self.report();
        let ready = !stopping && self.is_ready();
        let mut text = String::from(match (stopping, ready) {
            (true, _) => "not ready: shutting down\n",
            (false, true) => "ready\n",
            (false, false) => "not ready\n",
        });
        for d in report {
            let state = match d.up {
                Some(true) => "up",
                Some(false) => "down",
                None => "not checked yet",
            };
            let note = if d.required { "" } else { " (reported only)" };
            text.push_str(&format!("{}: {state}{note}\n", d.name));
        }
        (ready, text)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    #[tokio::test]
    async fn ready_only_while_every_required_dependency_answers() {
        let database = Arc::new(AtomicBool::new(true));
        let cache = Arc::new(AtomicBool::new(false));
        let readiness = Readiness::new();
        let (d, c) = (database.clone(), cache.clone());
        readiness
            .add("postgresql", true, move || {
                let up = d.load(Ordering::SeqCst);
                async move { if up { Ok(()) } else { Err("refused".to_owned()) } }
            })
            .add("redis", false, move || {
                let up = c.load(Ordering::SeqCst);
                async move { if up { Ok(()) } else { Err("refused".to_owned()) } }
            });
        assert!(!readiness.is_ready(), "not ready before the first check");
        readiness.check_all().await;
        let (ready, text) = readiness.answer(false);
        assert!(ready, "{text}");
        assert_eq!(text, "ready\npostgresql: up\nredis: down (reported only)\n");
        database.store(false, Ordering::SeqCst);
        readiness.check_all().await;
        let (ready, text) = readiness.answer(false);
        assert!(!ready);
        assert_eq!(text, "not ready\npostgresql: down\nredis: down (reported only)\n");
        database.store(true, Ordering::SeqCst);
        readiness.check_all().await;
        assert!(readiness.is_ready());
        assert_eq!(
            readiness.answer(true),
            (false, "not ready: shutting down\npostgresql: up\nredis: down (reported only)\n".to_owned())
        );
    }

    #[tokio::test]
    async fn a_check_that_hangs_counts_as_down() {
        let readiness = Readiness::new();
        readiness.add("kafka", true, std::future::pending::<Result<(), String>>);
        readiness.check_all().await;
        assert!(!readiness.is_ready());
        assert_eq!(readiness.report()[0].up, Some(false));
    }
}
