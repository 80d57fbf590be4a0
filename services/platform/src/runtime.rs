//! The runtime every eventfold process is built from: the resources it
//! holds (PostgreSQL pools, one per purpose), the token that stops it, the
//! tracker of its tasks, and the one supervised loop that keeps its
//! background workers (relay, projectors, consumers, saga orchestrator,
//! live tail) running.
//!
//! OVERVIEW: the binary builds [`Resources`] once from the configuration,
//! creates a [`Runtime`], hands pools and child tokens to the libraries,
//! spawns their workers with [`Runtime::supervise`], serves its gRPC server
//! (`server::GrpcServer`) until the token is cancelled (SIGTERM/SIGINT,
//! see [`Runtime::cancel_on_signal`]), then [`Runtime::shutdown`] waits for
//! every task within the grace period.

use std::{fmt::Display, future::Future, sync::Arc, time::Duration};

use eventfold_store::{Database, DatabaseOptions};
pub use eventfold_store::{
    backoff::{Backoff, Retries},
    supervise::{panic_text, supervise},
};
use futures_util::FutureExt;
pub use tokio_util::{
    sync::{CancellationToken, DropGuard},
    task::TaskTracker,
};

use crate::{Error, Result, config::DatabaseConfig};

/// The connections of a process, built once from `[database]`: one pool per
/// purpose, so that one purpose's load never starves another's.
#[derive(Debug, Clone)]
pub struct Databases {
    /// The event store: reads and administrative calls (its group-commit
    /// writers hold connections of their own).
    pub store: Database,
    /// The read side: query services, sized by `query.pool_size`.
    pub queries: Database,
    /// Background writers whose lost commit is done again (projectors'
    /// batches, the relay's checkpoints, consumers): sessions that do not
    /// wait for the WAL flush.
    pub workers: Database,
    /// Everything else that must be durable when acknowledged (sagas, dead
    /// letters, migrations).
    pub main: Database,
}

impl Databases {
    /// The pools of `config` (connections are made lazily: this succeeds
    /// while PostgreSQL is down). `query_pool_size` sizes the read side's.
    pub fn open(config: &DatabaseConfig, query_pool_size: u32) -> Result<Self> {
        let url = config.require_url()?;
        let options = config.options();
        let store = Database::open(url, &options).map_err(|e| Error::Config(e.to_string()))?.labelled("store");
        let databases = Self {
            queries: store.sized(query_pool_size.max(1)).labelled("queries"),
            workers: store.without_flush_wait(config.worker_pool_size.max(1)).labelled("workers"),
            main: store.sized(config.worker_pool_size.max(1)).labelled("main"),
            store,
        };
        // The pools' sizes, idle connections and waiters, read when scraped.
        let pools = databases.clone();
        crate::telemetry::on_scrape("database pools", move || {
            for pool in [&pools.store, &pools.queries, &pools.workers, &pools.main] {
                pool.record_pool_metrics();
            }
        });
        Ok(databases)
    }
}

impl DatabaseConfig {
    /// How a [`Database`] of this configuration connects.
    pub fn options(&self) -> DatabaseOptions {
        DatabaseOptions {
            pool_size: self.pool_size.max(1),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms.max(1)),
            tls: self.tls,
            ca_file: self.ca_file.clone(),
        }
    }
}

/// Where a process's Redis is, how long one command may take, and the TLS
/// of a `rediss://` URL.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    pub command_timeout: Duration,
    /// `[tls]`: a `rediss://` connection trusts its CAs (else the system's)
    /// and presents its certificate (Redis `tls-auth-clients`), as they
    /// are when the client is built.
    pub tls: Option<Arc<crate::tls::Tls>>,
}

/// Whether the Redis server of `client` answers a PING (readiness).
pub async fn redis_answers(client: &fred::clients::Client) -> std::result::Result<(), String> {
    use fred::interfaces::ClientLike;
    client.ping::<String>(None).await.map(drop).map_err(|e| e.to_string())
}

/// A Redis client for `options` that connects, and reconnects every 200 ms,
/// in the background: Redis being away at start is not an error. Each
/// command is tried once within `command_timeout` (its callers fall back,
/// e.g. the query cache's breaker). The only place a Redis client is built.
pub fn redis(options: &RedisOptions) -> Result<fred::clients::Client> {
    use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
    // The URL may hold a password: it appears in no error or log line.
    let mut config =
        Config::from_url(&options.url).map_err(|e| Error::Config(format!("cache URL: {}", e.details())))?;
    if config.uses_tls()
        && let Some(tls) = options.tls.as_ref().and_then(|tls| tls.plain_client_config())
    {
        config.tls = Some(fred::types::config::TlsConnector::from((*tls).clone()).into());
    }
    let command_timeout = options.command_timeout.max(Duration::from_millis(1));
    let client = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_millis(500);
            c.internal_command_timeout = Duration::from_millis(500);
            c.max_command_attempts = 1;
        })
        .with_performance_config(|p| p.default_command_timeout = command_timeout)
        .set_policy(ReconnectPolicy::new_constant(0, 200))
        .build()
        .map_err(|e| Error::Config(format!("cache client: {}", e.details())))?;
    let _connection = client.connect();
    Ok(client)
}

/// What a process holds for its whole life.
#[derive(Clone, Default)]
pub struct Resources {
    /// The PostgreSQL pools, when `database.url` is set.
    pub database: Option<Databases>,
    /// The Redis client (the query cache's), when a Redis URL is set.
    pub redis: Option<fred::clients::Client>,
}

impl std::fmt::Debug for Resources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resources").field("database", &self.database).field("redis", &self.redis.is_some()).finish()
    }
}

impl Resources {
    /// The resources `database` and `redis` describe: no pools when the
    /// database has no URL, no Redis client without options. Connections
    /// are made lazily (Redis: in the background, from now on).
    pub fn open(database: &DatabaseConfig, query_pool_size: u32, redis: Option<&RedisOptions>) -> Result<Self> {
        let database = match &database.url {
            Some(url) if !url.trim().is_empty() => Some(Databases::open(database, query_pool_size)?),
            _ => None,
        };
        let redis = redis.map(self::redis).transpose()?;
        Ok(Self { database, redis })
    }

    /// The pools, or a configuration error naming how to set the URL.
    pub fn databases(&self) -> Result<&Databases> {
        self.database.as_ref().ok_or_else(|| {
            Error::Config("database.url is required (--database-url or EVENTFOLD_DATABASE__URL)".to_owned())
        })
    }
}

/// The tasks of a process and the token that stops them. Cloning shares
/// both.
#[derive(Debug, Clone, Default)]
pub struct Runtime {
    token: CancellationToken,
    tasks: TaskTracker,
}

impl Runtime {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancelled when the process stops.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    /// Cancels the token on SIGTERM or SIGINT.
    pub fn cancel_on_signal(&self) {
        let token = self.token.clone();
        self.tasks.spawn(async move {
            tokio::select! {
                () = crate::server::shutdown_signal() => token.cancel(),
                () = token.cancelled() => {}
            }
        });
    }

    /// Runs `task` on the tracker: shutdown waits for it. A panic is
    /// logged with the task's name (the process keeps running).
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let name = name.into();
        self.tasks.spawn(async move {
            if let Err(panic) = std::panic::AssertUnwindSafe(task).catch_unwind().await {
                tracing::error!(task = %name, panic = %panic_text(panic.as_ref()), "task panicked");
            }
        })
    }

    /// Runs a background worker under [`supervise`] on the tracker.
    pub fn supervise<F, Fut, E>(
        &self,
        name: impl Into<String>,
        backoff: Backoff,
        step: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Display + Send + 'static,
    {
        let name = name.into();
        let token = self.token.clone();
        self.tasks.spawn(async move { supervise(&name, token, backoff, step).await })
    }

    /// Stops the process: cancels the token, then waits for every tracked
    /// task for at most `grace`. Whether all of them ended in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.token.cancel();
        self.tasks.close();
        match tokio::time::timeout(grace, self.tasks.wait()).await {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(
                    grace_secs = grace.as_secs_f64(),
                    still_running = self.tasks.len(),
                    "shutdown grace period over; leaving the remaining tasks"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    use super::*;

    #[tokio::test]
    async fn a_failing_or_panicking_worker_is_restarted_until_it_finishes() {
        let runs = Arc::new(AtomicU32::new(0));
        let counted = runs.clone();
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
        let runtime = Runtime::new();
        let worker = runtime.supervise("flaky", backoff, move |_token| {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err("first run fails"),
                    1 => panic!("second run panics"),
                    _ => Ok(()),
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), worker).await.unwrap().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn shutdown_cancels_workers_and_waits_for_them() {
        let runtime = Runtime::new();
        let stopped = Arc::new(AtomicU32::new(0));
        let seen = stopped.clone();
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let mut started_tx = Some(started_tx);
        runtime.supervise("waiter", Backoff::default(), move |token| {
            let seen = seen.clone();
            let started_tx = started_tx.take();
            async move {
                if let Some(tx) = started_tx {
                    let _ = tx.send(());
                }
                token.cancelled().await;
                seen.fetch_add(1, Ordering::SeqCst);
                Ok::<(), String>(())
            }
        });
        started.await.expect("the worker runs");
        assert!(runtime.shutdown(Duration::from_secs(5)).await);
        assert_eq!(stopped.load(Ordering::SeqCst), 1);
    }
}
