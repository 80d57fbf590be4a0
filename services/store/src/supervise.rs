//! The one supervised loop of every eventfold process: a background worker
//! (the live tail here; the relay, projectors, consumers and the saga
//! orchestrator elsewhere) is restarted after a failure or a panic with the
//! common [`Backoff`], until its token is cancelled.
//! `eventfold_platform::runtime` re-exports it beside the `Runtime` that
//! tracks the tasks it runs in.

use std::{fmt::Display, future::Future};

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// Keeps a background worker running until `token` is cancelled: `step`
/// runs with the token; when it fails (or panics) the failure is logged and
/// it runs again after the next wait of `backoff`. The waits start over
/// once a step has run for longer than the wait before it (it was working,
/// not failing at once). A step that returns `Ok` has finished its work: the
/// worker ends.
pub async fn supervise<F, Fut, E>(name: &str, token: CancellationToken, backoff: Backoff, mut step: F)
where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: Display + Send + 'static,
{
    let mut retries = backoff.start();
    let mut waited = backoff.first;
    loop {
        if token.is_cancelled() {
            return;
        }
        let started = tokio::time::Instant::now();
        // Its own task, so that a panic is caught and the worker restarted.
        let run = tokio::spawn(step(token.child_token()));
        let outcome = run.await;
        if started.elapsed() > waited {
            retries.reset();
        }
        match outcome {
            Ok(Ok(())) => {
                tracing::debug!(worker = name, "worker finished");
                return;
            }
            Ok(Err(e)) if token.is_cancelled() => {
                tracing::debug!(worker = name, error = %e, "worker stopped with an error during shutdown");
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(worker = name, error = %e, attempt = retries.attempts(), "worker failed; restarting");
            }
            Err(join) if join.is_panic() => {
                let panic = join.into_panic();
                tracing::error!(worker = name, panic = %panic_text(panic.as_ref()), "worker panicked; restarting");
            }
            Err(_) => return,
        }
        waited = retries.next_delay().max(backoff.first);
        tokio::select! {
            () = tokio::time::sleep(waited) => {}
            () = token.cancelled() => return,
        }
    }
}

pub fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
