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
//! position it last read at (see `watchers`).
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
//! Database and Redis failures never reach a client as text: `UNAVAILABLE`
//! and `INTERNAL` answers carry a generic message and an `error_id`
//! (ErrorInfo metadata) that the log line with the real error repeats.

// Request values reach this crate: arithmetic is checked or saturating,
// casts that may wrap are refused, and nothing panics on `unwrap`/`expect`
// (tests may).
#![cfg_attr(
    not(test),
    warn(clippy::arithmetic_side_effects, clippy::cast_possible_wrap, clippy::unwrap_used, clippy::expect_used)
)]

mod breaker;
mod cache;
mod orders;
mod others;
mod positions;

use std::{
    collections::hash_map::RandomState,
    hash::{BuildHasher, Hasher},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bb8::{Pool, PooledConnection};
use bb8_postgres::PostgresConnectionManager;
use eventfold_platform::status::{self, error_info};
use eventfold_platform::{server::Router, watchers::Watchers};
use eventfold_proto::query::{
    OrderView, account_query_service_server::AccountQueryServiceServer,
    inventory_query_service_server::InventoryQueryServiceServer, order_query_service_server::OrderQueryServiceServer,
    user_query_service_server::UserQueryServiceServer,
};
use eventfold_store::{EventLog, check_bigint, check_id};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_postgres::NoTls;
use tonic::{Code, Status};

pub(crate) use eventfold_platform::page;

pub use crate::{
    breaker::BreakerState,
    cache::{Cache, CacheConfig, CacheStats, Invalidator, Kind},
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
    /// PostgreSQL connections for reads.
    pub pool_size: u32,
    /// Longest read-your-writes wait (a shorter call deadline wins).
    pub max_wait_ms: u64,
    /// How often projection positions are read besides notifications.
    pub positions_poll_ms: u64,
    /// Most `WatchOrder` streams one client address may hold open at once.
    pub max_watchers_per_peer: u32,
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
            cache: CacheConfig::default(),
        }
    }
}

/// Errors of starting the query side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Setup(String),
}

type Conn<'a> = PooledConnection<'a, PostgresConnectionManager<NoTls>>;

/// What every query service shares.
pub struct Query {
    pool: Pool<PostgresConnectionManager<NoTls>>,
    positions: Positions,
    cache: Option<Arc<Cache>>,
    log: Arc<dyn EventLog>,
    max_wait: Duration,
    /// The WatchOrder clients, by order id.
    watchers: Arc<Watchers<Result<OrderView, Status>>>,
}

impl std::fmt::Debug for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Query").field("cache", &self.cache).field("max_wait", &self.max_wait).finish_non_exhaustive()
    }
}

impl Query {
    /// Queries over the read models of `database_url` (migrated), the
    /// events of `log` (for GetOrderAt) and, if configured, the cache.
    pub async fn connect(config: &Config, database_url: &str, log: Arc<dyn EventLog>) -> Result<Arc<Self>, Error> {
        let pg: tokio_postgres::Config = database_url.parse()?;
        let pool = Pool::builder()
            .max_size(config.pool_size.max(1))
            .connection_timeout(Duration::from_secs(5))
            .build(PostgresConnectionManager::new(pg.clone(), NoTls))
            .await
            .map_err(|e| Error::Setup(format!("database pool: {e}")))?;
        let positions = Positions::spawn(pg, Duration::from_millis(config.positions_poll_ms.max(10)));
        let cache = match &config.cache.url {
            Some(_) => Some(Cache::connect(config.cache.clone()).await.map_err(Error::Setup)?),
            None => None,
        };
        let watchers = Watchers::new(usize::try_from(config.max_watchers_per_peer).unwrap_or(usize::MAX));
        let max_wait = Duration::from_millis(config.max_wait_ms);
        let query = Arc::new(Self { pool, positions, cache, log, max_wait, watchers });
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

    async fn conn(&self) -> Result<Conn<'_>, Status> {
        self.pool.get().await.map_err(|e| status::unavailable(READ_DATABASE, &e))
    }

    /// Waits until `projection` reflects `min_position` (0: no wait), up to
    /// the call's deadline or `max_wait`; its active version, if built.
    async fn ready(
        &self,
        projection: &str,
        min_position: u64,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Option<Active>, Status> {
        let mut violations = Vec::new();
        check_bigint("min_position", min_position, &mut violations);
        if !violations.is_empty() {
            return Err(status::invalid(violations));
        }
        if min_position == 0 {
            return Ok(self.positions.get(projection));
        }
        // 90 % of the deadline, in integers: a huge `grpc-timeout` cannot
        // overflow (as `Duration::mul_f64` would, with a panic).
        let budget = deadline(metadata)
            .map_or(self.max_wait, |d| d.saturating_sub(d.checked_div(10).unwrap_or_default()).min(self.max_wait));
        match self.positions.wait(projection, min_position, budget).await {
            Ok(active) => Ok(Some(active)),
            Err(current) => Err(error_info(
                Code::Unavailable,
                format!(
                    "the {projection} read model is at position {} and did not reach min_position {min_position} \
                     within {budget:?}; retry later",
                    current.position
                ),
                "PROJECTION_BEHIND",
                &[
                    ("projection", projection.to_owned()),
                    ("position", current.position.to_string()),
                    ("min_position", min_position.to_string()),
                ],
            )),
        }
    }
}

/// Reads the view of a cached kind: from the cache when it can answer,
/// otherwise with `load` (then cached).
pub(crate) async fn cached<T, F, Fut>(
    query: &Query,
    kind: Kind,
    id: &str,
    min_position: u64,
    metadata: &tonic::metadata::MetadataMap,
    last_position: impl Fn(&T) -> u64,
    load: F,
) -> Result<Option<T>, Status>
where
    T: prost::Message + Default,
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<Option<T>, Status>>,
{
    let active = query.ready(kind.projection(), min_position, metadata).await?;
    let cache = match (&query.cache, active) {
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

/// The `grpc-timeout` of a call, if it has one.
fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// What an UNAVAILABLE answer says is unavailable when the read database
/// cannot be reached (see [`status::unavailable`]).
const READ_DATABASE: &str = "the read model's database";

/// A short id that ties an answer to the log line of its cause: a hash of
/// the time, a counter and a per-process random key (unique enough to find
/// one line in the logs).
fn error_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    hasher.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    format!("{:016x}", hasher.finish())
}

/// A database failure as a status: a read model not built yet, a lost
/// connection and a server that sheds load or shuts down are UNAVAILABLE
/// (retryable), anything else INTERNAL; the driver's text only in the log.
fn db_status(error: tokio_postgres::Error) -> Status {
    use tokio_postgres::error::SqlState;
    if error.code() == Some(&SqlState::UNDEFINED_TABLE) {
        // Its own reason (not the shared helper's STORAGE_UNAVAILABLE): the
        // database answers, the projection has not created its table yet.
        let id = error_id();
        tracing::warn!(error_id = %id, %error, "a read model is not built yet");
        return error_info(
            Code::Unavailable,
            format!("a read model is not built yet, retry later (error id {id})"),
            "READ_MODEL_NOT_READY",
            &[("error_id", id)],
        );
    }
    // Classes 08 (connection), 53 (insufficient resources), 57P (operator
    // intervention: shutdown, crash recovery).
    let transient = error.code().is_none_or(|code| {
        let code = code.code();
        code.starts_with("08") || code.starts_with("53") || code.starts_with("57P")
    });
    if error.is_closed() || transient {
        return status::unavailable(READ_DATABASE, &error);
    }
    status::internal(&error)
}

/// `INVALID_ARGUMENT` unless `value` is a usable id: 1 to 128 bytes of
/// visible ASCII.
fn require_id(field: &str, value: &str) -> Result<(), Status> {
    let mut violations = Vec::new();
    check_id(field, value, &mut violations);
    if violations.is_empty() { Ok(()) } else { Err(status::invalid(violations)) }
}

/// The longest page token accepted: tokens this service issues are far
/// shorter, longer ones are not worth decoding.
const MAX_PAGE_TOKEN_BYTES: usize = 1024;

/// [`page::cursor`] of a token of bounded length.
fn cursor<C: serde::de::DeserializeOwned>(filters: &str, token: &str) -> Result<Option<C>, Status> {
    if token.len() > MAX_PAGE_TOKEN_BYTES {
        return Err(eventfold_platform::status::invalid_argument([(
            "page_token".to_owned(),
            format!("must be at most {MAX_PAGE_TOKEN_BYTES} bytes"),
        )]));
    }
    page::cursor(filters, token)
}

/// Whether a page read with `LIMIT size + 1` found more than `size` rows.
fn has_more(rows: usize, size: i64) -> bool {
    usize::try_from(size).is_ok_and(|size| rows > size)
}

/// `size` (from [`page::size`]: 1 to 500) as a length.
fn page_len(size: i64) -> usize {
    usize::try_from(size).unwrap_or(0)
}

/// An amount of a read model row as the proto `Money`.
fn money(minor: i64, currency: &str) -> Option<eventfold_proto::common::Money> {
    Some(eventfold_proto::common::Money { minor, currency: currency.to_owned() })
}

fn not_found(what: &str, reason: &str, id: &str) -> Status {
    error_info(Code::NotFound, format!("{what} {id} does not exist"), reason, &[("id", id.to_owned())])
}

/// Adds the four query services to `router`.
pub fn add_services(router: Router, query: Arc<Query>) -> Router {
    router
        .add_service(OrderQueryServiceServer::new(orders::OrderQueries::new(query.clone())))
        .add_service(InventoryQueryServiceServer::new(others::InventoryQueries::new(query.clone())))
        .add_service(AccountQueryServiceServer::new(others::AccountQueries::new(query.clone())))
        .add_service(UserQueryServiceServer::new(others::UserQueries::new(query)))
}

/// Serves the query services on `listener` until `shutdown`; health
/// follows the read database.
pub async fn run(
    config: Config,
    query: Arc<Query>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), eventfold_platform::Error> {
    let (reporter, router) = eventfold_platform::server::router(&[eventfold_proto::FILE_DESCRIPTOR_SET])?;
    let probed = query.clone();
    let probe = eventfold_platform::server::spawn_health_probe(
        reporter,
        SERVICE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
        Duration::from_secs(5),
        move || {
            let query = probed.clone();
            async move { query.conn().await?.simple_query("SELECT 1").await.map(drop).map_err(db_status) }
        },
    )
    .await;
    let router = add_services(router, query);
    let result =
        eventfold_platform::server::serve(router, listener, shutdown, Duration::from_secs(config.shutdown_grace_secs))
            .await;
    probe.abort();
    result
}
