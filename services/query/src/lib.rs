//! The query side of eventfold: gRPC queries over the read models that the
//! projector keeps in PostgreSQL (schema `read`).
//!
//! OVERVIEW: every query may name a `min_position` (a command's
//! `WriteResult.global_position`); [`Positions`] follows the projectors'
//! checkpoints and the query waits for its projection to get there, up to
//! a deadline. Point queries (an order, a product, an account) go through a
//! Redis [`Cache`] behind a circuit breaker; the projector's
//! [`Invalidator`] tombstones what each committed batch changed. Lists read
//! PostgreSQL with keyset pagination. `GetOrderAt` folds the order's events
//! from the event store instead. `WatchOrder` clients of the same order
//! share one channel, fed by one follower for all watched orders that
//! re-reads, in one statement, only the watched orders changed since the
//! position it last read at (see `watchers`); the streams end when the
//! token given to [`host`] is cancelled, so that the server drains.
//!
//! HOSTILE INPUT: the bounds every request is held to (beyond the proto
//! comments), each refused with `INVALID_ARGUMENT` and a `BadRequest`
//! violation naming the field:
//!
//! - ids (`order_id`, `customer_id`, `product_id`, `account_id`,
//!   `user_id`): 1 to 128 bytes of visible ASCII;
//! - positions and versions (`min_position`, `version`): at most
//!   `i64::MAX` (PostgreSQL `bigint`);
//! - times (`time`, `create_time_start`, ...): within the years 0001 to
//!   9999 with valid nanos;
//! - `page_token`: at most 1024 bytes, and only as this service issued it;
//!   `page_size` is lowered to 500.
//!
//! A client address holds at most `max_watchers_per_peer` (default 100)
//! open `WatchOrder` streams; more are `RESOURCE_EXHAUSTED` with the
//! ErrorInfo reason `TOO_MANY_WATCHERS`.
//!
//! LAYOUT: `orders`, `inventory`, `accounts` and `users` read their read
//! models (SQL in, plain records out, failures as [`Error`]); `grpc`
//! checks requests, turns records into proto messages and every [`Error`]
//! into a status, the one way. Database and Redis failures never reach a
//! client as text: `UNAVAILABLE` and `INTERNAL` answers carry a generic
//! message and an `error_id` (ErrorInfo metadata) that the log line with
//! the real error repeats.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

mod accounts;
mod breaker;
mod cache;
mod error;
mod grpc;
mod inventory;
mod orders;
mod positions;
mod users;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use eventfold_store::{Database, EventLog, check_bigint, pg::PgConnection};
use serde::{Deserialize, Serialize};
use tokio_postgres::{Row, types::FromSql};

pub use crate::{
    breaker::BreakerState,
    cache::{Cache, CacheConfig, CacheStats, Invalidator, Kind},
    error::{Error, Result},
    grpc::{host, host_unavailable},
    positions::{Active, Positions},
};

/// The gRPC services this crate serves, for health and reflection.
pub const SERVICE_NAMES: &[&str] = &[
    "eventfold.query.v1.OrderQueryService",
    "eventfold.query.v1.InventoryQueryService",
    "eventfold.query.v1.AccountQueryService",
    "eventfold.query.v1.UserQueryService",
];

/// Settings of the query services (`[query]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where `eventfold serve query` listens (`eventfold dev` serves the
    /// queries on the event store's address).
    pub listen: SocketAddr,
    /// Seconds to drain calls after a shutdown request.
    pub shutdown_grace_secs: u64,
    /// PostgreSQL connections for reads (the size of the pool the process
    /// hands to [`Query::connect`]).
    pub pool_size: u32,
    /// Longest read-your-writes wait (a shorter call deadline wins).
    pub max_wait_ms: u64,
    /// How often projection positions are read besides notifications.
    pub positions_poll_ms: u64,
    /// Most `WatchOrder` streams one client address may hold open at once.
    pub max_watchers_per_peer: u32,
    /// A query service is NOT_SERVING while a projection it reads is more
    /// than this many events behind the log (0: never, the default).
    pub max_lag_events: u64,
    pub cache: CacheConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
            shutdown_grace_secs: 10,
            pool_size: 8,
            max_wait_ms: 5000,
            positions_poll_ms: 1000,
            max_watchers_per_peer: 100,
            max_lag_events: 0,
            cache: CacheConfig::default(),
        }
    }
}

/// What every query service shares.
pub struct Query {
    database: Database,
    positions: Positions,
    cache: Option<Arc<Cache>>,
    log: Arc<dyn EventLog>,
    max_wait: Duration,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query").field("cache", &self.cache).field("max_wait", &self.max_wait).finish_non_exhaustive()
    }
}

impl Query {
    /// Queries over the read models of `database` (migrated), the events of
    /// `log` (for GetOrderAt) and `cache` (the process's, if it has one). Connections
    /// are made when needed: this succeeds while PostgreSQL is down.
    pub async fn connect(
        config: &Config,
        database: Database,
        cache: Option<Arc<Cache>>,
        log: Arc<dyn EventLog>,
    ) -> Result<Arc<Self>> {
        let positions = Positions::spawn(database.clone(), Duration::from_millis(config.positions_poll_ms.max(10)));
        let max_wait = Duration::from_millis(config.max_wait_ms);
        let query = Arc::new(Self { database, positions, cache, log, max_wait });
        if query.cache.is_some() && config.cache.warm_orders > 0 {
            let warm = query.clone();
            let count = config.cache.warm_orders;
            tokio::spawn(async move { warm.warm(count).await });
        }
        Ok(query)
    }

    /// The cache, if configured (its breaker state is observable).
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    pub fn positions(&self) -> &Positions {
        &self.positions
    }

    /// A pooled connection to the read database; any failure to get one is
    /// `Unavailable`.
    async fn conn(&self) -> Result<PgConnection<'_>> {
        self.database.get().await.map_err(|e| match e {
            eventfold_store::Error::Unavailable(text) | eventfold_store::Error::Internal(text) => {
                Error::Unavailable(text)
            }
            other => Error::Unavailable(other.to_string()),
        })
    }

    /// Whether the read database answers (the services' health).
    async fn check(&self) -> Result<()> {
        self.conn().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// How many events of the log the active version of `projection` has
    /// not applied yet (the whole log when it has no active version).
    async fn lag(&self, projection: &str) -> Result<u64> {
        let head = self.log.last_position().await?;
        let position = self.positions.get(projection).map_or(0, |a| a.position);
        Ok(head.saturating_sub(position))
    }

    /// The read database answers, and (when `max_lag` is not 0) none of
    /// `projections` is more than `max_lag` events behind.
    async fn check_serving(&self, projections: &[&str], max_lag: u64) -> std::result::Result<(), String> {
        self.check().await.map_err(|e| e.to_string())?;
        if max_lag == 0 {
            return Ok(());
        }
        for projection in projections {
            let lag = self.lag(projection).await.map_err(|e| e.to_string())?;
            if lag > max_lag {
                return Err(format!("projection {projection} is {lag} events behind (max_lag_events {max_lag})"));
            }
        }
        Ok(())
    }

    /// Waits until `projection` reflects `min_position` (0: no wait), up to
    /// 90 % of the call's `deadline` or `max_wait`; its active version, if
    /// built.
    async fn ready(&self, projection: &str, min_position: u64, deadline: Option<Duration>) -> Result<Option<Active>> {
        let mut violations = Vec::new();
        check_bigint("min_position", min_position, &mut violations);
        Error::check(violations)?;
        let current = self.positions.get(projection);
        if min_position == 0 || current.as_ref().is_some_and(|active| active.position >= min_position) {
            return Ok(current);
        }
        // Behind: a position past the log's end is a mistake of the caller
        // (no write answered it), not worth a wait.
        let head = self.log.last_position().await.map_err(Error::Store)?;
        if min_position > head {
            return Err(Error::BeyondHead { min_position, head });
        }
        // 90 % of the deadline, in integers: a huge `grpc-timeout` cannot
        // overflow (as `Duration::mul_f64` would, with a panic).
        let budget = deadline
            .map_or(self.max_wait, |d| d.saturating_sub(d.checked_div(10).unwrap_or_default()).min(self.max_wait));
        match self.positions.wait(projection, min_position, budget).await {
            Ok(active) => Ok(Some(active)),
            Err(current) => Err(Error::ProjectionBehind {
                projection: projection.to_owned(),
                position: current.position,
                min_position,
                waited: budget,
            }),
        }
    }

    /// Reads the view of a cached kind once its projection is ready: from
    /// the cache when it can answer, otherwise with `load` (then cached).
    /// Views are cached as their encoded messages.
    async fn cached<T, F, Fut>(
        &self,
        kind: Kind,
        id: &str,
        min_position: u64,
        deadline: Option<Duration>,
        last_position: impl Fn(&T) -> u64,
        load: F,
    ) -> Result<Option<T>>
    where
        T: prost::Message + Default,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let active = self.ready(kind.projection(), min_position, deadline).await?;
        let cache = match (&self.cache, active) {
            (Some(cache), Some(active)) => Some((cache, active.version)),
            _ => None,
        };
        if let Some((cache, version)) = cache
            && let Some(bytes) = cache.get(kind, version, id, min_position).await
            && let Ok(value) = T::decode(bytes)
        {
            return Ok(Some(value));
        }
        let value = load().await?;
        if let (Some((cache, version)), Some(value)) = (cache, &value) {
            cache.fill(kind, version, id, last_position(value), &value.encode_to_vec()).await;
        }
        Ok(value)
    }
}

/// Column `index` of `row`; a value that does not decode (a column of
/// another type than the code expects) is internal.
fn column<'a, T: FromSql<'a>>(row: &'a Row, index: usize) -> Result<T> {
    row.try_get(index).map_err(|e| Error::Internal(error::describe_db(&e)))
}

/// A page of a list read with `LIMIT size + 1`: at most `size` items, and
/// whether more follow.
fn one_page<T>(mut items: Vec<T>, size: i64) -> (Vec<T>, bool) {
    let size = usize::try_from(size).unwrap_or(0);
    let more = items.len() > size;
    items.truncate(size);
    (items, more)
}

/// An amount of a read model row.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Amount {
    minor: i64,
    currency: String,
}

impl Amount {
    fn new(minor: i64, currency: &str) -> Self {
        Self { minor, currency: currency.to_owned() }
    }
}

/// Describes the query side's metrics (the `# HELP` lines of `/metrics`)
/// and registers the cache's error counter at zero.
pub fn describe_metrics() {
    metrics::describe_counter!("eventfold_cache_requests_total", "Cache lookups, by kind and result (hit, miss, …)");
    metrics::describe_counter!("eventfold_cache_errors_total", "Redis errors of the query cache");
    metrics::describe_gauge!(
        "eventfold_cache_breaker_state",
        "The cache's circuit breaker: 0 closed, 1 open, 2 half-open"
    );
    metrics::describe_gauge!("eventfold_cache_pending_invalidations", "Cache invalidations waiting for Redis");
    metrics::counter!("eventfold_cache_errors_total").increment(0);
}
