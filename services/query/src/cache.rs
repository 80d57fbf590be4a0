//! The Redis cache of point queries (one order, one product, one account).
//!
//! Cache-aside with a TTL per kind. Every entry is `"<position>|<bytes>"`:
//! the global position of the entity's last event in the cached view, then
//! the encoded view. The projector's [`Invalidator`] does not delete keys:
//! after its transaction commits it writes a tombstone `"<position>|"` for
//! each entity the batch touched, unless the entry already holds that
//! position or a later one. A fill only replaces an entry whose position is
//! not newer than its own. So a query that read the old row before the
//! commit and fills after the invalidation cannot put the old value back:
//! no query started after an invalidation sees a value older than it.
//!
//! The invalidator also moves a watermark per projection version once every
//! invalidation up to a position is in Redis; a read-your-writes query uses
//! the cache only when the watermark has reached its `min_position`.
//!
//! Every call goes through a [`Breaker`] with a timeout: when Redis is
//! away or slow, queries go straight to PostgreSQL and invalidations wait
//! (they are retried, and the watermark does not move past them).

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use eventfold_projector::{Commit, CommitObserver};
use fred::prelude::{ClientLike, KeysInterface, LuaInterface, Value};
use serde::{Deserialize, Serialize};

use crate::breaker::{Breaker, BreakerState};

/// Where and how long to cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// `redis://host:port[/db]`; unset: no cache.
    pub url: Option<String>,
    /// Prefix of every key (several deployments may share one Redis).
    pub key_prefix: String,
    pub order_ttl_secs: u64,
    pub inventory_ttl_secs: u64,
    pub account_ttl_secs: u64,
    /// Longest wait for one Redis call before it counts as failed.
    pub timeout_ms: u64,
    /// A call slower than this counts as a failure for the breaker.
    pub slow_ms: u64,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before one trial call.
    pub breaker_cool_down_ms: u64,
    /// How many of the most recently changed orders are cached at start.
    pub warm_orders: u32,
}

impl CacheConfig {
    /// How the process's Redis client is made for this cache (none without
    /// a URL): `eventfold_platform::runtime::redis` builds it.
    pub fn redis(&self) -> Option<eventfold_platform::runtime::RedisOptions> {
        self.url.as_ref().map(|url| eventfold_platform::runtime::RedisOptions {
            url: url.clone(),
            command_timeout: Duration::from_millis(self.timeout_ms.max(1)),
            tls: None,
        })
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "eventfold:".to_owned(),
            order_ttl_secs: 300,
            inventory_ttl_secs: 60,
            account_ttl_secs: 120,
            timeout_ms: 50,
            slow_ms: 25,
            breaker_failures: 3,
            breaker_cool_down_ms: 1000,
            warm_orders: 1000,
        }
    }
}

/// What is cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Order,
    Inventory,
    Account,
}

impl Kind {
    /// The projection whose rows this kind caches.
    pub fn projection(self) -> &'static str {
        match self {
            Kind::Order => "order_views",
            Kind::Inventory => "inventory_views",
            Kind::Account => "account_views",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Order => "order",
            Kind::Inventory => "inventory",
            Kind::Account => "account",
        }
    }

    /// The kind a projection caches, if any.
    fn of_projection(projection: &str) -> Option<Kind> {
        [Kind::Order, Kind::Inventory, Kind::Account].into_iter().find(|k| k.projection() == projection)
    }

    /// The entity of a stream of this kind: `order-42` → `42`.
    fn entity(self, stream_id: &str) -> Option<&str> {
        let prefix = match self {
            Kind::Order => "order-",
            Kind::Inventory => "inventory-",
            Kind::Account => "account-",
        };
        stream_id.strip_prefix(prefix)
    }
}

/// Sets a tombstone on every key whose entry is older than its position,
/// then raises the watermark (last key). ARGV: one position per key, the
/// tombstone TTL in ms, the watermark position.
const INVALIDATE: &str = r"
local n = #KEYS - 1
for i = 1, n do
  local current = redis.call('GET', KEYS[i])
  local at = current and tonumber(string.match(current, '^(%d+)|'))
  if not at or at < tonumber(ARGV[i]) then
    redis.call('SET', KEYS[i], ARGV[i] .. '|', 'PX', ARGV[n + 1])
  end
end
local mark = tonumber(redis.call('GET', KEYS[n + 1]) or '0')
if mark < tonumber(ARGV[n + 2]) then
  redis.call('SET', KEYS[n + 1], ARGV[n + 2])
end
return n
";

/// Stores `position|value` unless the entry holds a later position.
/// ARGV: position, value, TTL in ms.
const FILL: &str = r"
local current = redis.call('GET', KEYS[1])
local at = current and tonumber(string.match(current, '^(%d+)|'))
if at and at > tonumber(ARGV[1]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'PX', ARGV[3])
return 1
";

/// The Redis cache behind a circuit breaker.
pub struct Cache {
    client: fred::prelude::Client,
    config: CacheConfig,
    breaker: Breaker,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counts since start (also exported as metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    /// Misses, tombstones, watermarks behind and calls that skipped Redis.
    pub misses: u64,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").field("config", &self.config).field("breaker", &self.breaker.state()).finish()
    }
}

/// A cached value that is not a tombstone.
fn decode(entry: &[u8]) -> Option<(u64, Bytes)> {
    let mut parts = entry.splitn(2, |b| *b == b'|');
    let position = std::str::from_utf8(parts.next()?).ok()?.parse().ok()?;
    let value = parts.next()?;
    (!value.is_empty()).then(|| (position, Bytes::copy_from_slice(value)))
}

fn value_bytes(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(b) => Some(b),
        Value::String(s) => Some(s.into_inner()),
        _ => None,
    }
}

impl Cache {
    /// The cache over the process's Redis `client` (built once, by
    /// `eventfold_platform::runtime::redis` from [`CacheConfig::redis`]):
    /// Redis being away at start only opens the breaker.
    pub async fn new(client: fred::clients::Client, config: CacheConfig) -> Arc<Self> {
        if tokio::time::timeout(Duration::from_secs(2), client.wait_for_connect()).await.is_err() {
            tracing::warn!("Redis does not answer yet; queries go to PostgreSQL until it does");
        }
        let breaker = Breaker::new(config.breaker_failures, Duration::from_millis(config.breaker_cool_down_ms));
        metrics::gauge!("eventfold_cache_breaker_state").set(0.0);
        Arc::new(Self { client, config, breaker, hits: AtomicU64::new(0), misses: AtomicU64::new(0) })
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats { hits: self.hits.load(Ordering::Relaxed), misses: self.misses.load(Ordering::Relaxed) }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    fn key(&self, kind: Kind, version: u32, id: &str) -> String {
        format!("{}{}:v{version}:{id}", self.config.key_prefix, kind.label())
    }

    fn watermark_key(&self, projection: &str, version: u32) -> String {
        format!("{}watermark:{projection}:v{version}", self.config.key_prefix)
    }

    fn ttl(&self, kind: Kind) -> Duration {
        Duration::from_secs(match kind {
            Kind::Order => self.config.order_ttl_secs,
            Kind::Inventory => self.config.inventory_ttl_secs,
            Kind::Account => self.config.account_ttl_secs,
        })
    }

    /// Runs `call` if the breaker allows, within the timeout; reports the
    /// outcome (errors and slow answers are failures).
    async fn guarded<T>(&self, call: impl Future<Output = Result<T, fred::error::Error>>) -> Option<T> {
        if !self.breaker.allow() {
            return None;
        }
        let started = Instant::now();
        let timeout = Duration::from_millis(self.config.timeout_ms.max(1));
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(value)) => {
                if started.elapsed() > Duration::from_millis(self.config.slow_ms) {
                    self.breaker.failure();
                } else {
                    self.breaker.success();
                }
                Some(value)
            }
            Ok(Err(error)) => {
                tracing::debug!(%error, "Redis call failed");
                metrics::counter!("eventfold_cache_errors_total").increment(1);
                self.breaker.failure();
                None
            }
            Err(_) => {
                metrics::counter!("eventfold_cache_errors_total").increment(1);
                self.breaker.failure();
                None
            }
        }
    }

    /// The cached view of `id`, if any (a tombstone is a miss). With a
    /// `min_position`, only if every invalidation up to it is in Redis.
    pub async fn get(&self, kind: Kind, version: u32, id: &str, min_position: u64) -> Option<Bytes> {
        let key = self.key(kind, version, id);
        let entry = if min_position == 0 {
            self.guarded(self.client.get::<Option<Bytes>, _>(key)).await.map(|v| (v, None))
        } else {
            let keys = vec![key, self.watermark_key(kind.projection(), version)];
            self.guarded(self.client.mget::<Vec<Value>, _>(keys)).await.map(|mut values| {
                let mark = values.pop().and_then(value_bytes);
                let entry = values.pop().and_then(value_bytes);
                (entry, Some(mark))
            })
        };
        let outcome = match entry {
            None => "bypass",
            Some((_, Some(mark)))
                if mark.as_deref().and_then(|m| std::str::from_utf8(m).ok()?.parse::<u64>().ok()).unwrap_or(0)
                    < min_position =>
            {
                "behind"
            }
            Some((Some(entry), _)) => match decode(&entry) {
                Some((_, value)) => {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("eventfold_cache_requests_total", "kind" => kind.label(), "result" => "hit")
                        .increment(1);
                    return Some(value);
                }
                None => "miss",
            },
            Some((None, _)) => "miss",
        };
        self.misses.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("eventfold_cache_requests_total", "kind" => kind.label(), "result" => outcome).increment(1);
        None
    }

    /// Caches `value` (the view as of `position`) unless Redis holds a later
    /// position for it.
    pub async fn fill(&self, kind: Kind, version: u32, id: &str, position: u64, value: &[u8]) {
        let key = self.key(kind, version, id);
        let ttl_ms = self.ttl(kind).as_millis().to_string();
        let args =
            vec![Value::from(position.to_string()), Value::Bytes(Bytes::copy_from_slice(value)), Value::from(ttl_ms)];
        self.guarded(self.client.eval::<i64, _, _, _>(FILL, vec![key], args)).await;
    }

    /// Tombstones for `entities` (id → position) and the watermark; whether
    /// Redis took them.
    async fn invalidate(&self, kind: Kind, version: u32, entities: &HashMap<String, u64>, watermark: u64) -> bool {
        let mut keys: Vec<String> = Vec::with_capacity(entities.len().saturating_add(1));
        let mut args: Vec<Value> = Vec::with_capacity(entities.len().saturating_add(2));
        for (id, position) in entities {
            keys.push(self.key(kind, version, id));
            args.push(Value::from(position.to_string()));
        }
        keys.push(self.watermark_key(kind.projection(), version));
        // A tombstone outlives any query that read before it was written.
        args.push(Value::from(self.ttl(kind).as_millis().to_string()));
        args.push(Value::from(watermark.to_string()));
        self.guarded(self.client.eval::<i64, _, _, _>(INVALIDATE, keys, args)).await.is_some()
    }
}

/// What one projection version still has to invalidate.
#[derive(Debug, Default)]
struct Pending {
    entities: HashMap<String, u64>,
    watermark: u64,
}

/// The projector side of the cache: after each commit, tombstones for the
/// entities the batch changed. What Redis does not take (breaker open,
/// timeout) stays pending and is retried by a background task, before the
/// watermark moves on.
#[derive(Debug)]
pub struct Invalidator {
    cache: Arc<Cache>,
    pending: std::sync::Mutex<HashMap<(Kind, u32), Pending>>,
    flushing: tokio::sync::Mutex<()>,
}

impl Invalidator {
    /// An invalidator and its retry task (ended when the invalidator is
    /// dropped).
    pub fn new(cache: Arc<Cache>) -> Arc<Self> {
        let invalidator = Arc::new(Self {
            cache,
            pending: std::sync::Mutex::new(HashMap::new()),
            flushing: tokio::sync::Mutex::new(()),
        });
        let weak = Arc::downgrade(&invalidator);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Some(invalidator) = weak.upgrade() else { return };
                if invalidator.has_pending() {
                    invalidator.flush().await;
                }
            }
        });
        invalidator
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(Kind, u32), Pending>> {
        self.pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn has_pending(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Entities and watermark changes not yet in Redis.
    pub fn pending(&self) -> usize {
        self.lock().values().fold(0, |n, p| n.saturating_add(p.entities.len()).saturating_add(1))
    }

    /// Sends what is pending; what fails is put back (merged with what
    /// arrived meanwhile).
    pub async fn flush(&self) {
        let _one = self.flushing.lock().await;
        let batch = std::mem::take(&mut *self.lock());
        for ((kind, version), pending) in batch {
            if !self.cache.invalidate(kind, version, &pending.entities, pending.watermark).await {
                let mut all = self.lock();
                let slot = all.entry((kind, version)).or_default();
                for (id, position) in pending.entities {
                    let at = slot.entities.entry(id).or_default();
                    *at = (*at).max(position);
                }
                slot.watermark = slot.watermark.max(pending.watermark);
            }
        }
        metrics::gauge!("eventfold_cache_pending_invalidations").set(self.pending() as f64);
    }
}

#[async_trait::async_trait]
impl CommitObserver for Invalidator {
    async fn committed(&self, commit: Commit<'_>) {
        let Some(kind) = Kind::of_projection(commit.projection) else { return };
        {
            let mut all = self.lock();
            let slot = all.entry((kind, commit.version)).or_default();
            for event in commit.events {
                if let Some(id) = kind.entity(&event.stream_id) {
                    let at = slot.entities.entry(id.to_owned()).or_default();
                    *at = (*at).max(event.global_position);
                }
            }
            slot.watermark = slot.watermark.max(commit.position);
        }
        self.flush().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_decode_and_tombstones_are_misses() {
        assert_eq!(decode(b"42|view"), Some((42, Bytes::from_static(b"view"))));
        assert_eq!(decode(b"42|"), None, "a tombstone");
        assert_eq!(decode(b"x|view"), None);
        assert_eq!(decode(b"no bar"), None);
        assert_eq!(decode(b"7|a|b"), Some((7, Bytes::from_static(b"a|b"))), "values may hold bars");
    }

    #[test]
    fn kinds_map_projections_and_streams() {
        assert_eq!(Kind::of_projection("order_views"), Some(Kind::Order));
        assert_eq!(Kind::of_projection("order_analytics"), None);
        assert_eq!(Kind::Order.entity("order-o-1"), Some("o-1"));
        assert_eq!(Kind::Order.entity("inventory-sku"), None);
        assert_eq!(Kind::Account.entity("account-a"), Some("a"));
    }
}
