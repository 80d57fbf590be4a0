//! Rate limits of every gRPC call, in one tower layer ([`RateLimitLayer`])
//! that runs after authentication:
//!
//! - who: the authenticated principal's subject, else the client's IP
//!   address (`ip:<addr>`) for anonymous calls. The client's address is
//!   the connection's peer, unless the peer is one of `trusted_proxies`
//!   (addresses or CIDR ranges): then it is the last address of the
//!   `x-forwarded-for` the proxy set (the REST gateway sets it to its own
//!   caller's address, replacing what that caller sent), so anonymous REST
//!   callers count each for their own address, not all for the gateway's;
//! - what: the route class of the RPC, read from the descriptor sets
//!   ([`RouteClasses`]): a server- or client-streaming RPC opens a stream
//!   (`streams`, limited per stream opened, not per message), an RPC bound
//!   to HTTP GET reads (`reads`), anything else writes (`writes`, also the
//!   class of a path no descriptor names). Health checks and reflection are
//!   not limited;
//! - how: the generic cell rate algorithm (GCRA, a token bucket kept as one
//!   timestamp per bucket): `per_second` calls a second on average, up to
//!   `burst` at once. A refused call takes nothing from the bucket and is
//!   answered `RESOURCE_EXHAUSTED` with an `ErrorInfo` (reason
//!   `RATE_LIMITED`, metadata `class`, `limit`, `burst`) and a `RetryInfo`
//!   whose delay is when the next call of the same class will pass (the
//!   REST gateway turns it into `429` with `Retry-After`).
//!
//! With `redis_url` set, every process shares each bucket through Redis:
//! one Lua script ([`GCRA_SCRIPT`], run with EVALSHA) reads and moves the
//! bucket atomically, on Redis's clock. A bucket's key is
//! `{key_prefix}rl:{class}:{hash}`, where `hash` is the first 128 bits of
//! the SHA-256 of the subject, in hex: no principal name or address is
//! written to Redis, and every key has the same short length. Keys expire
//! once their bucket is full again.
//!
//! When Redis fails or does not answer within `timeout_ms`, the
//! `on_redis_down` policy decides (and Redis is not asked again for
//! `redis_retry_ms`, then one call tries it): `local` (the default) limits
//! with this process's own buckets, `allow` lets every call through, `deny`
//! answers `UNAVAILABLE`. Each call decided so counts in
//! `eventfold_rate_limit_redis_unavailable_total{policy}`, and a warning is
//! logged at most every 10 s. Without `redis_url`, the process's own
//! buckets are the limit.
//!
//! The local buckets are bounded: at most `max_local_keys` are tracked.
//! When a new bucket finds the map full, full buckets (whose state is the
//! same as none) are dropped first; if the map is still more than 7/8 full,
//! arbitrary buckets are dropped down to 7/8 (their callers start again
//! from a full bucket). So the memory is bounded whatever the number of
//! distinct callers, and a sweep happens at most once every
//! `max_local_keys / 8` new buckets.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fred::prelude::LuaInterface;
use prost_reflect::{DescriptorPool, Value};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tonic::{Code, Status, transport::server::TcpConnectInfo};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{
    auth::Principal,
    guard::{Gate, GateLayer},
    runtime::RedisOptions,
    status::ERROR_DOMAIN,
};

/// The counter of calls decided by `on_redis_down` because Redis failed.
pub const REDIS_UNAVAILABLE_METRIC: &str = "eventfold_rate_limit_redis_unavailable_total";
/// The counter of calls refused by a rate limit.
pub const REJECTED_METRIC: &str = "eventfold_rate_limit_rejected_total";

/// Describes the rate limits' metrics (the `# HELP` lines of `/metrics`).
pub fn describe() {
    metrics::describe_counter!(
        REJECTED_METRIC,
        "Calls refused by the rate limits (RESOURCE_EXHAUSTED), by route class"
    );
    metrics::describe_counter!(
        REDIS_UNAVAILABLE_METRIC,
        "Rate-limit decisions made without Redis (it did not answer), by the on_redis_down policy"
    );
}

/// The `ErrorInfo` reason of a call over its limit.
pub const REASON: &str = "RATE_LIMITED";
/// Highest `per_second` and `burst` accepted.
pub const MAX_RATE: u32 = 1_000_000;
/// Paths that are never limited: health checks and reflection.
const UNLIMITED_PREFIXES: [&str; 3] =
    ["/grpc.health.v1.Health/", "/grpc.reflection.v1.ServerReflection/", "/grpc.reflection.v1alpha.ServerReflection/"];
/// The Redis-down warning is logged at most this often.
const WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The GCRA step on Redis. `KEYS[1]` holds the bucket's theoretical arrival
/// time (TAT) in microseconds of Redis's clock; `ARGV[1]` is the emission
/// interval and `ARGV[2]` the burst tolerance (interval × burst), both in
/// microseconds. Answers `{1, 0}` when the call passes (and records it),
/// `{0, wait}` with the microseconds until it would. Read and write happen
/// in one script, so concurrent calls of every process see each other.
pub const GCRA_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0) or 0
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, 0}
";

/// `[rate_limit]` (`EVENTFOLD_RATE_LIMIT__…`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Whether calls are limited (default true).
    pub enabled: bool,
    /// RPCs bound to HTTP GET (default 1000/s, burst 2000).
    pub reads: Limit,
    /// Every other unary RPC (default 500/s, burst 1000).
    pub writes: Limit,
    /// Streams opened (default 20/s, burst 100).
    pub streams: Limit,
    /// `redis://…` (or `rediss://…`) shared by every process; unset: each
    /// process limits on its own.
    pub redis_url: Option<String>,
    /// Prefix of every key in Redis (default `eventfold:`).
    pub key_prefix: String,
    /// Longest wait for Redis before `on_redis_down` decides (default 50).
    pub timeout_ms: u64,
    /// After a Redis failure, how long Redis is not asked (default 1000).
    pub redis_retry_ms: u64,
    /// What applies while Redis fails (default `local`).
    pub on_redis_down: RedisDown,
    /// Most buckets this process tracks itself (default 100000).
    pub max_local_keys: usize,
    /// Peers whose `x-forwarded-for` names the caller (the REST gateway,
    /// a load balancer): addresses or CIDR ranges, e.g. `["10.0.0.0/8"]`
    /// (default none; `eventfold dev`: loopback, where its gateway runs).
    pub trusted_proxies: Vec<String>,
    /// Failed authentications per client address (bad tokens, unknown
    /// keys: each may cost a signature check or a database read): over
    /// it, calls with credentials from that address are refused without
    /// being checked (default 10/s, burst 100; this process's own count).
    pub auth_failures: Limit,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            reads: Limit { per_second: 1000, burst: 2000 },
            writes: Limit { per_second: 500, burst: 1000 },
            streams: Limit { per_second: 20, burst: 100 },
            redis_url: None,
            key_prefix: "eventfold:".to_owned(),
            timeout_ms: 50,
            redis_retry_ms: 1000,
            on_redis_down: RedisDown::Local,
            max_local_keys: 100_000,
            trusted_proxies: Vec::new(),
            auth_failures: Limit { per_second: 10, burst: 100 },
        }
    }
}

/// The limit of one route class.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    /// Calls a second, on average.
    pub per_second: u32,
    /// Calls at once, from a full bucket.
    pub burst: u32,
}

/// What applies to a call while Redis fails.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum RedisDown {
    /// This process's own buckets limit (each process allows the whole
    /// limit while Redis is away).
    #[default]
    Local,
    /// Every call passes.
    Allow,
    /// Every limited call is answered `UNAVAILABLE`.
    Deny,
}

impl RedisDown {
    fn label(self) -> &'static str {
        match self {
            RedisDown::Local => "local",
            RedisDown::Allow => "allow",
            RedisDown::Deny => "deny",
        }
    }
}

/// A `[rate_limit]` that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("rate_limit.{class}: per_second and burst must be 1 to {MAX_RATE}")]
    Limit { class: &'static str },
    #[error("rate_limit.{0} must be at least 1")]
    Zero(&'static str),
    #[error("rate_limit.key_prefix is longer than 128 bytes")]
    Prefix,
    #[error("rate_limit.trusted_proxies: {0:?} is not an address or a CIDR range such as 10.0.0.0/8")]
    Proxy(String),
    #[error("cannot read the descriptor sets: {0}")]
    Descriptors(#[from] prost_reflect::DescriptorError),
}

impl RateLimitConfig {
    /// # Errors
    ///
    /// A limit of 0 or over [`MAX_RATE`], a zero timeout or bound, a key
    /// prefix over 128 bytes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for class in [RouteClass::Reads, RouteClass::Writes, RouteClass::Streams, RouteClass::AuthFailures] {
            let limit = self.limit(class);
            if !(1..=MAX_RATE).contains(&limit.per_second) || !(1..=MAX_RATE).contains(&limit.burst) {
                return Err(ConfigError::Limit { class: class.label() });
            }
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::Zero("timeout_ms"));
        }
        if self.max_local_keys == 0 {
            return Err(ConfigError::Zero("max_local_keys"));
        }
        if self.key_prefix.len() > 128 {
            return Err(ConfigError::Prefix);
        }
        TrustedProxies::parse(&self.trusted_proxies)?;
        Ok(())
    }

    /// The limit of `class`.
    pub fn limit(&self, class: RouteClass) -> Limit {
        match class {
            RouteClass::Reads => self.reads,
            RouteClass::Writes => self.writes,
            RouteClass::Streams => self.streams,
            RouteClass::AuthFailures => self.auth_failures,
        }
    }

    /// How the Redis client of the limits is made (none without a URL, or
    /// when limits are off): `runtime::redis` builds it.
    pub fn redis(&self) -> Option<RedisOptions> {
        let url = self.redis_url.as_ref().filter(|url| self.enabled && !url.trim().is_empty())?;
        Some(RedisOptions {
            url: url.clone(),
            command_timeout: Duration::from_millis(self.timeout_ms.max(1)),
            tls: None,
        })
    }
}

/// The kind of call a limit applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteClass {
    Reads,
    Writes,
    Streams,
    /// Not an RPC's class: the failed authentications of a client address.
    AuthFailures,
}

impl RouteClass {
    /// `reads`, `writes` or `streams` (config section, key part, metadata).
    pub fn label(self) -> &'static str {
        match self {
            RouteClass::Reads => "reads",
            RouteClass::Writes => "writes",
            RouteClass::Streams => "streams",
            RouteClass::AuthFailures => "auth_failures",
        }
    }
}

/// The route class of every RPC of some descriptor sets, by gRPC path.
#[derive(Debug, Clone, Default)]
pub struct RouteClasses {
    classes: HashMap<String, RouteClass>,
}

impl RouteClasses {
    /// The classes of every RPC in `sets` (encoded
    /// `google.protobuf.FileDescriptorSet`s): streaming → streams, bound to
    /// HTTP GET by `google.api.http` → reads, else writes.
    ///
    /// # Errors
    ///
    /// A set that does not decode.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<RouteClasses, prost_reflect::DescriptorError> {
        let mut pool = DescriptorPool::new();
        for set in sets {
            pool.decode_file_descriptor_set(*set)?;
        }
        let http = pool.get_extension_by_name("google.api.http");
        let mut classes = HashMap::new();
        for service in pool.services() {
            for method in service.methods() {
                let options = method.options();
                let get = http.as_ref().filter(|http| options.has_extension(http)).is_some_and(|http| {
                    match options.get_extension(http).as_ref() {
                        Value::Message(rule) => {
                            matches!(rule.get_field_by_name("get").as_deref(), Some(Value::String(path)) if !path.is_empty())
                        }
                        _ => false,
                    }
                });
                let class = if method.is_server_streaming() || method.is_client_streaming() {
                    RouteClass::Streams
                } else if get {
                    RouteClass::Reads
                } else {
                    RouteClass::Writes
                };
                classes.insert(format!("/{}/{}", service.full_name(), method.name()), class);
            }
        }
        Ok(RouteClasses { classes })
    }

    /// The class of a call of `path` (`/package.Service/Method`): `None`
    /// for health checks and reflection (never limited), writes for a path
    /// no descriptor names.
    pub fn class(&self, path: &str) -> Option<RouteClass> {
        if UNLIMITED_PREFIXES.iter().any(|prefix| path.starts_with(prefix)) {
            return None;
        }
        Some(self.classes.get(path).copied().unwrap_or(RouteClass::Writes))
    }
}

/// A limit as GCRA steps: microseconds between calls, and how far ahead of
/// now the theoretical arrival time may run (interval × burst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rate {
    limit: Limit,
    interval_us: u64,
    tolerance_us: u64,
}

impl Rate {
    fn new(limit: Limit) -> Rate {
        let interval_us = 1_000_000u64.checked_div(u64::from(limit.per_second)).unwrap_or(1_000_000).max(1);
        Rate { limit, interval_us, tolerance_us: interval_us.saturating_mul(u64::from(limit.burst.max(1))) }
    }
}

/// One GCRA step at `now` for a bucket at `tat`: the bucket's new TAT when
/// the call passes, else the microseconds until it would.
fn gcra(tat: u64, now: u64, rate: Rate) -> Result<u64, u64> {
    let new_tat = tat.max(now).saturating_add(rate.interval_us);
    let allow_at = new_tat.saturating_sub(rate.tolerance_us);
    if allow_at > now { Err(allow_at.saturating_sub(now)) } else { Ok(new_tat) }
}

/// What a limit says of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Over the limit; the next call passes after this long.
    Deny(Duration),
}

/// The 128-bit digest of a subject that names its buckets.
type SubjectKey = [u8; 16];

fn subject_key(subject: &str) -> SubjectKey {
    let digest = Sha256::digest(subject.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

/// This process's own buckets, at most `max_keys` of them (see the module
/// documentation for what is dropped when the map is full).
#[derive(Debug)]
struct LocalLimiter {
    buckets: Mutex<HashMap<(RouteClass, SubjectKey), u64>>,
    max_keys: usize,
    epoch: Instant,
}

impl LocalLimiter {
    fn new(max_keys: usize) -> Self {
        Self { buckets: Mutex::default(), max_keys: max_keys.max(1), epoch: Instant::now() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(RouteClass, SubjectKey), u64>> {
        self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What [`LocalLimiter::check`] would decide now, taking nothing.
    fn peek(&self, class: RouteClass, subject: SubjectKey, rate: Rate) -> Decision {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let tat = self.lock().get(&(class, subject)).copied().unwrap_or(0);
        match gcra(tat, now, rate) {
            Ok(_) => Decision::Allow,
            Err(wait_us) => Decision::Deny(Duration::from_micros(wait_us)),
        }
    }

    fn check(&self, class: RouteClass, subject: SubjectKey, rate: Rate) -> Decision {
        let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut buckets = self.lock();
        let key = (class, subject);
        let tat = buckets.get(&key).copied();
        match gcra(tat.unwrap_or(0), now, rate) {
            Ok(new_tat) => {
                if tat.is_none() && buckets.len() >= self.max_keys {
                    self.make_room(&mut buckets, now);
                }
                buckets.insert(key, new_tat);
                Decision::Allow
            }
            Err(wait_us) => Decision::Deny(Duration::from_micros(wait_us)),
        }
    }

    /// Drops the full buckets, then arbitrary ones down to 7/8 of the bound.
    fn make_room(&self, buckets: &mut HashMap<(RouteClass, SubjectKey), u64>, now: u64) {
        buckets.retain(|_, tat| *tat > now);
        let target = self.max_keys.saturating_sub(self.max_keys / 8).saturating_sub(1);
        let mut excess = buckets.len().saturating_sub(target);
        if excess > 0 {
            buckets.retain(|_, _| {
                if excess == 0 {
                    return true;
                }
                excess = excess.saturating_sub(1);
                false
            });
        }
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// The buckets in Redis.
struct RedisLimiter {
    client: fred::clients::Client,
    prefix: String,
    /// The SHA-1 of [`GCRA_SCRIPT`] once Redis has loaded it.
    sha: Mutex<Option<String>>,
}

impl RedisLimiter {
    fn key(&self, class: RouteClass, subject: SubjectKey) -> String {
        format!("{}rl:{}:{}", self.prefix, class.label(), hex::encode(subject))
    }

    async fn check(&self, class: RouteClass, subject: SubjectKey, rate: Rate) -> Result<Decision, fred::error::Error> {
        let key = self.key(class, subject);
        let args = vec![
            i64::try_from(rate.interval_us).unwrap_or(i64::MAX),
            i64::try_from(rate.tolerance_us).unwrap_or(i64::MAX),
        ];
        let sha = self.sha.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let sha = match sha {
            Some(sha) => sha,
            None => {
                let sha: String = self.client.script_load(GCRA_SCRIPT).await?;
                *self.sha.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(sha.clone());
                sha
            }
        };
        let reply: Vec<i64> = match self.client.evalsha(sha, key.clone(), args.clone()).await {
            // A server without the script (restarted, flushed, or another
            // node of a cluster): EVAL runs it and caches it there.
            Err(error) if error.details().starts_with("NOSCRIPT") => self.client.eval(GCRA_SCRIPT, key, args).await?,
            other => other?,
        };
        match reply.as_slice() {
            [1, _] => Ok(Decision::Allow),
            [0, wait_us] => Ok(Decision::Deny(Duration::from_micros(u64::try_from(*wait_us).unwrap_or(0).max(1)))),
            _ => Err(fred::error::Error::new(fred::error::ErrorKind::Parse, "unexpected rate limit script reply")),
        }
    }
}

/// Decides every call of a server: its class, its caller, and whether the
/// caller's bucket of that class has room.
pub struct RateLimiter {
    classes: RouteClasses,
    config: RateLimitConfig,
    trusted: TrustedProxies,
    local: LocalLimiter,
    redis: Option<RedisLimiter>,
    /// Since when Redis is not asked (after a failure).
    redis_down_since: Mutex<Option<Instant>>,
    /// A call is trying Redis again after `redis_retry_ms`.
    probing: AtomicBool,
    last_warning: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("reads", &self.config.reads)
            .field("writes", &self.config.writes)
            .field("streams", &self.config.streams)
            .field("redis", &self.redis.is_some())
            .field("on_redis_down", &self.config.on_redis_down)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// The limits of `config` for the RPCs `classes` knows, shared through
    /// `redis` when given (else this process's own buckets).
    ///
    /// # Errors
    ///
    /// A `config` that does not validate.
    pub fn new(
        config: &RateLimitConfig,
        classes: RouteClasses,
        redis: Option<fred::clients::Client>,
    ) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            classes,
            config: config.clone(),
            trusted: TrustedProxies::parse(&config.trusted_proxies)?,
            local: LocalLimiter::new(config.max_local_keys),
            redis: redis.map(|client| RedisLimiter {
                client,
                prefix: config.key_prefix.clone(),
                sha: Mutex::new(None),
            }),
            redis_down_since: Mutex::new(None),
            probing: AtomicBool::new(false),
            last_warning: Mutex::new(None),
        })
    }

    /// How many buckets this process tracks itself (at most
    /// `max_local_keys`).
    pub fn tracked_local_keys(&self) -> usize {
        self.local.len()
    }

    /// Whether a call of `path` by `principal` (else from `peer`) may go
    /// on now: `Err` with the answer when it may not.
    ///
    /// # Errors
    ///
    /// `RESOURCE_EXHAUSTED` over the limit; `UNAVAILABLE` when Redis fails
    /// and `on_redis_down = "deny"`.
    pub async fn check(&self, path: &str, principal: Option<&Principal>, peer: Option<IpAddr>) -> Result<(), Status> {
        let Some(class) = self.classes.class(path) else {
            return Ok(());
        };
        let subject = match (principal, peer) {
            (Some(principal), _) => subject_key(&principal.subject),
            (None, Some(ip)) => subject_key(&format!("ip:{ip}")),
            (None, None) => subject_key("anonymous"),
        };
        let rate = Rate::new(self.config.limit(class));
        match self.decide(class, subject, rate).await? {
            Decision::Allow => Ok(()),
            Decision::Deny(wait) => {
                metrics::counter!(REJECTED_METRIC, "class" => class.label()).increment(1);
                Err(rate_limited(class, rate.limit, wait))
            }
        }
    }

    async fn decide(&self, class: RouteClass, subject: SubjectKey, rate: Rate) -> Result<Decision, Status> {
        if let Some(redis) = &self.redis {
            if self.redis_may_be_asked() {
                let timeout = Duration::from_millis(self.config.timeout_ms.max(1));
                match tokio::time::timeout(timeout, redis.check(class, subject, rate)).await {
                    Ok(Ok(decision)) => {
                        self.redis_answered();
                        return Ok(decision);
                    }
                    Ok(Err(error)) => self.redis_failed(&format!("{:?}", error.kind())),
                    Err(_) => self.redis_failed("timeout"),
                }
            }
            let policy = self.config.on_redis_down;
            metrics::counter!(REDIS_UNAVAILABLE_METRIC, "policy" => policy.label()).increment(1);
            match policy {
                RedisDown::Local => {}
                RedisDown::Allow => return Ok(Decision::Allow),
                RedisDown::Deny => {
                    let retry = Duration::from_millis(self.config.redis_retry_ms.max(1));
                    let mut details =
                        ErrorDetails::with_error_info("RATE_LIMITER_UNAVAILABLE", ERROR_DOMAIN, HashMap::new());
                    details.set_retry_info(Some(retry));
                    return Err(Status::with_error_details(
                        Code::Unavailable,
                        "the rate limiter is unavailable, retry later",
                        details,
                    ));
                }
            }
        }
        Ok(self.local.check(class, subject, rate))
    }

    /// Redis is asked unless it failed less than `redis_retry_ms` ago; after
    /// that, one call at a time tries it until it answers.
    fn redis_may_be_asked(&self) -> bool {
        let down = *self.redis_down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match down {
            None => true,
            Some(since) if since.elapsed() >= Duration::from_millis(self.config.redis_retry_ms) => {
                !self.probing.swap(true, Ordering::AcqRel)
            }
            Some(_) => false,
        }
    }

    fn redis_answered(&self) {
        let was_down = self.redis_down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        self.probing.store(false, Ordering::Release);
        if was_down.is_some() {
            tracing::info!("rate limits: Redis answers again");
        }
    }

    /// Notes a failure (the error's kind only: its text may name the
    /// server) and warns at most every [`WARNING_INTERVAL`].
    fn redis_failed(&self, kind: &str) {
        *self.redis_down_since.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
        self.probing.store(false, Ordering::Release);
        let mut last = self.last_warning.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.is_none_or(|at| at.elapsed() >= WARNING_INTERVAL) {
            *last = Some(Instant::now());
            tracing::warn!(
                error = kind,
                policy = self.config.on_redis_down.label(),
                "rate limits: Redis is unavailable; the on_redis_down policy applies"
            );
        }
    }
}

/// `[rate_limit] trusted_proxies`, parsed: the peers whose
/// `x-forwarded-for` names the caller.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<(IpAddr, u8)>);

impl TrustedProxies {
    /// Addresses (`10.1.2.3`, `::1`) and CIDR ranges (`10.0.0.0/8`).
    ///
    /// # Errors
    ///
    /// An entry that is neither, or a prefix longer than the address.
    pub fn parse(list: &[String]) -> Result<Self, ConfigError> {
        let mut ranges = Vec::with_capacity(list.len());
        for entry in list {
            let bad = || ConfigError::Proxy(entry.chars().take(64).collect());
            let (addr, prefix) = match entry.trim().split_once('/') {
                Some((addr, prefix)) => (addr, Some(prefix)),
                None => (entry.trim(), None),
            };
            let addr: IpAddr = addr.parse().map_err(|_| bad())?;
            let bits = if addr.is_ipv4() { 32 } else { 128 };
            let prefix = match prefix {
                Some(prefix) => prefix.parse::<u8>().ok().filter(|p| *p <= bits).ok_or_else(bad)?,
                None => bits,
            };
            ranges.push((addr, prefix));
        }
        Ok(Self(ranges))
    }

    /// Whether `ip` is in one of the ranges.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.iter().any(|(range, prefix)| match (range, ip) {
            (IpAddr::V4(range), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32u32.saturating_sub(u32::from(*prefix))).unwrap_or(0);
                u32::from(*range) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(range), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128u32.saturating_sub(u32::from(*prefix))).unwrap_or(0);
                u128::from(*range) & mask == u128::from(ip) & mask
            }
            _ => false,
        })
    }

    /// The caller of `request`: its connection's peer, or, when the peer
    /// is trusted, the last address of the `x-forwarded-for` it set (the
    /// peer itself when that header is missing or does not parse).
    pub fn client_ip(&self, request: &http::request::Parts) -> Option<IpAddr> {
        let peer = request.extensions.get::<TcpConnectInfo>().and_then(TcpConnectInfo::remote_addr)?.ip();
        if !self.contains(peer) {
            return Some(peer);
        }
        let forwarded = request
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .last()
            .and_then(|last| last.trim().parse::<IpAddr>().ok());
        Some(forwarded.unwrap_or(peer))
    }
}

/// The failed authentications of each client address, this process's own
/// count (`[rate_limit] auth_failures`): an address over it is refused
/// before its credentials are checked again.
#[derive(Debug)]
pub struct AuthFailures {
    local: LocalLimiter,
    rate: Rate,
    trusted: TrustedProxies,
}

impl AuthFailures {
    /// The budget of `config` (when its limits are on).
    ///
    /// # Errors
    ///
    /// A `config` that does not validate.
    pub fn new(config: &RateLimitConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(Self {
            local: LocalLimiter::new(config.max_local_keys),
            rate: Rate::new(config.auth_failures),
            trusted: TrustedProxies::parse(&config.trusted_proxies)?,
        })
    }

    /// The caller of `request` (see [`TrustedProxies::client_ip`]).
    pub fn client_ip(&self, request: &http::request::Parts) -> Option<IpAddr> {
        self.trusted.client_ip(request)
    }

    /// `RESOURCE_EXHAUSTED` (with `RetryInfo`) when `ip` has failed too
    /// often to be checked now.
    ///
    /// # Errors
    ///
    /// The refusal.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Status> {
        match self.local.peek(RouteClass::AuthFailures, subject_key(&format!("ip:{ip}")), self.rate) {
            Decision::Allow => Ok(()),
            Decision::Deny(wait) => {
                metrics::counter!(REJECTED_METRIC, "class" => RouteClass::AuthFailures.label()).increment(1);
                Err(rate_limited(RouteClass::AuthFailures, self.rate.limit, wait))
            }
        }
    }

    /// Counts a failed authentication of `ip`.
    pub fn failed(&self, ip: IpAddr) {
        let _ = self.local.check(RouteClass::AuthFailures, subject_key(&format!("ip:{ip}")), self.rate);
    }
}

/// `RESOURCE_EXHAUSTED` with `ErrorInfo{RATE_LIMITED}` and `RetryInfo`.
fn rate_limited(class: RouteClass, limit: Limit, wait: Duration) -> Status {
    // Whole milliseconds, rounded up: a client that waits exactly this
    // long finds room.
    let millis = u64::try_from(wait.as_micros().div_ceil(1000)).unwrap_or(u64::MAX).max(1);
    let delay = Duration::from_millis(millis);
    let metadata: HashMap<String, String> = [
        ("class".to_owned(), class.label().to_owned()),
        ("limit".to_owned(), limit.per_second.to_string()),
        ("burst".to_owned(), limit.burst.to_string()),
    ]
    .into();
    let mut details = ErrorDetails::with_error_info(REASON, ERROR_DOMAIN, metadata);
    details.set_retry_info(Some(delay));
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "rate limit of {} calls exceeded ({}/s, burst {}); retry in {millis} ms",
            class.label(),
            limit.per_second,
            limit.burst
        ),
        details,
    )
}

/// Runs a [`RateLimiter`] in front of a server's services, after the
/// authentication layer (it reads the [`Principal`] that layer puts in the
/// request's extensions). Without a limiter, calls pass untouched.
pub type RateLimitLayer = GateLayer<RateLimiter>;

impl Gate for RateLimiter {
    const REFUSED: &'static str = "call refused by a rate limit";

    fn admit<'a>(
        &'a self,
        request: &'a mut http::request::Parts,
    ) -> futures_util::future::BoxFuture<'a, Result<(), Status>> {
        Box::pin(async move {
            let client = self.trusted.client_ip(request);
            let principal = request.extensions.get::<Principal>();
            self.check(request.uri.path(), principal, client).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPEND: &str = "/eventfold.eventstore.v1.EventStoreService/Append";
    const READ_STREAM: &str = "/eventfold.eventstore.v1.EventStoreService/ReadStream";
    const SUBSCRIBE: &str = "/eventfold.eventstore.v1.EventStoreService/Subscribe";

    fn parts(peer: &str, forwarded: Option<&str>) -> http::request::Parts {
        let mut request = http::Request::builder().uri("/x");
        if let Some(forwarded) = forwarded {
            request = request.header("x-forwarded-for", forwarded);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        parts.extensions.insert(TcpConnectInfo { local_addr: None, remote_addr: Some(peer.parse().unwrap()) });
        parts
    }

    #[test]
    fn the_caller_is_the_peer_unless_the_peer_is_a_trusted_proxy() {
        let trusted =
            TrustedProxies::parse(&["10.0.0.0/8".to_owned(), "127.0.0.1".to_owned(), "fd00::/8".to_owned()]).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(trusted.contains(ip("10.200.3.4")) && !trusted.contains(ip("11.0.0.1")));
        assert!(trusted.contains(ip("::ffff:10.1.1.1")), "IPv4-mapped IPv6");
        assert!(trusted.contains(ip("fd12::1")) && !trusted.contains(ip("fe80::1")));
        assert!(!trusted.contains(ip("127.0.0.2")), "a single address is /32");
        // An untrusted peer cannot name another caller.
        assert_eq!(trusted.client_ip(&parts("192.0.2.7:5000", Some("10.9.9.9"))), Some(ip("192.0.2.7")));
        // A trusted proxy's last entry is the caller it saw.
        assert_eq!(
            trusted.client_ip(&parts("10.0.0.5:5000", Some("203.0.113.9, 198.51.100.4"))),
            Some(ip("198.51.100.4"))
        );
        assert_eq!(trusted.client_ip(&parts("127.0.0.1:5000", None)), Some(ip("127.0.0.1")));
        assert_eq!(trusted.client_ip(&parts("127.0.0.1:5000", Some("not an address"))), Some(ip("127.0.0.1")));
        assert!(TrustedProxies::default().client_ip(&parts("[::1]:1", Some("10.0.0.1"))) == Some(ip("::1")));
        for bad in ["10.0.0.0/33", "::/129", "example.com", "10.0.0/8", ""] {
            let error = TrustedProxies::parse(&[bad.to_owned()]).unwrap_err().to_string();
            assert!(error.starts_with("rate_limit.trusted_proxies:"), "{bad}: {error}");
        }
        let config = RateLimitConfig { trusted_proxies: vec!["nope".to_owned()], ..RateLimitConfig::default() };
        assert!(config.validate().is_err());
    }

    #[test]
    fn gcra_lets_a_burst_through_then_one_call_per_interval() {
        let rate = Rate::new(Limit { per_second: 2, burst: 3 });
        assert_eq!((rate.interval_us, rate.tolerance_us), (500_000, 1_500_000));
        let mut tat = 0;
        for _ in 0..3 {
            tat = gcra(tat, 0, rate).expect("within the burst");
        }
        assert_eq!(gcra(tat, 0, rate), Err(500_000), "the fourth waits one interval");
        assert_eq!(gcra(tat, 499_999, rate), Err(1));
        let tat = gcra(tat, 500_000, rate).expect("after the wait");
        assert_eq!(gcra(tat, 500_000, rate), Err(500_000), "and then one per interval");
        // A long idle bucket is full again, not fuller.
        let mut tat = gcra(tat, 100_000_000, rate).unwrap();
        tat = gcra(tat, 100_000_000, rate).unwrap();
        tat = gcra(tat, 100_000_000, rate).unwrap();
        assert!(gcra(tat, 100_000_000, rate).is_err());
    }

    #[test]
    fn the_local_buckets_are_bounded() {
        let local = LocalLimiter::new(1000);
        let rate = Rate::new(Limit { per_second: 1, burst: 5 });
        for i in 0..20_000 {
            assert_eq!(local.check(RouteClass::Writes, subject_key(&format!("user-{i}")), rate), Decision::Allow);
            assert!(local.len() <= 1000, "{} buckets after {i} callers", local.len());
        }
        // A bucket still tracked keeps its state.
        let alice = subject_key("alice");
        for _ in 0..5 {
            assert_eq!(local.check(RouteClass::Writes, alice, rate), Decision::Allow);
        }
        assert!(matches!(local.check(RouteClass::Writes, alice, rate), Decision::Deny(_)));
        assert_eq!(local.check(RouteClass::Reads, alice, rate), Decision::Allow, "classes have buckets of their own");
    }

    #[test]
    fn classes_come_from_the_descriptors() {
        let classes = RouteClasses::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
        assert_eq!(classes.class(APPEND), Some(RouteClass::Writes));
        assert_eq!(classes.class(READ_STREAM), Some(RouteClass::Reads));
        assert_eq!(classes.class(SUBSCRIBE), Some(RouteClass::Streams));
        assert_eq!(classes.class("/eventfold.query.v1.OrderQueryService/WatchOrder"), Some(RouteClass::Streams));
        assert_eq!(classes.class("/eventfold.admin.v1.ApiKeyService/ListApiKeys"), Some(RouteClass::Reads));
        assert_eq!(classes.class("/eventfold.orders.v1.OrderCommandService/CreateOrder"), Some(RouteClass::Writes));
        assert_eq!(classes.class("/acme.v1.Unknown/Thing"), Some(RouteClass::Writes), "unknown paths are writes");
        assert_eq!(classes.class("/grpc.health.v1.Health/Check"), None);
        assert_eq!(classes.class("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"), None);
        assert_eq!(classes.class("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"), None);
    }

    #[test]
    fn config_is_validated() {
        let config = RateLimitConfig::default();
        config.validate().unwrap();
        assert!(config.redis().is_none(), "no Redis unless configured");
        let zero = RateLimitConfig { writes: Limit { per_second: 0, burst: 1 }, ..RateLimitConfig::default() };
        assert_eq!(
            zero.validate().unwrap_err().to_string(),
            "rate_limit.writes: per_second and burst must be 1 to 1000000"
        );
        let huge =
            RateLimitConfig { streams: Limit { per_second: 1, burst: MAX_RATE + 1 }, ..RateLimitConfig::default() };
        assert!(huge.validate().is_err());
        let no_timeout = RateLimitConfig { timeout_ms: 0, ..RateLimitConfig::default() };
        assert!(no_timeout.validate().is_err());
        let off = RateLimitConfig { enabled: false, redis_url: Some("redis://x".into()), ..RateLimitConfig::default() };
        assert!(off.redis().is_none(), "limits off: no Redis client");
        let policy: RateLimitConfig = serde_json::from_str(r#"{"on_redis_down": "deny"}"#).unwrap();
        assert_eq!(policy.on_redis_down, RedisDown::Deny);
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"on_redis_down": "maybe"}"#).is_err());
    }

    #[tokio::test]
    async fn a_call_over_the_limit_is_answered_resource_exhausted_with_retry_info() {
        let classes = RouteClasses::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
        let config = RateLimitConfig { writes: Limit { per_second: 10, burst: 2 }, ..RateLimitConfig::default() };
        let limiter = RateLimiter::new(&config, classes, None).unwrap();
        let alice = Principal { subject: "alice".into(), roles: vec![] };
        let peer: Option<IpAddr> = Some("10.0.0.1".parse().unwrap());
        limiter.check(APPEND, Some(&alice), peer).await.unwrap();
        limiter.check(APPEND, Some(&alice), peer).await.unwrap();
        let status = limiter.check(APPEND, Some(&alice), peer).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, REASON);
        assert_eq!(info.metadata["class"], "writes");
        assert_eq!(info.metadata["limit"], "10");
        let delay = status.get_details_retry_info().and_then(|r| r.retry_delay).expect("RetryInfo");
        assert!(delay > Duration::ZERO && delay <= Duration::from_millis(100), "{delay:?}");
        // Anonymous callers of the same address share a bucket, apart from alice's.
        limiter.check(APPEND, None, peer).await.unwrap();
        limiter.check(APPEND, None, peer).await.unwrap();
        assert!(limiter.check(APPEND, None, peer).await.is_err());
        limiter.check(APPEND, None, Some("10.0.0.2".parse().unwrap())).await.unwrap();
        // Health checks are never limited.
        for _ in 0..10 {
            limiter.check("/grpc.health.v1.Health/Check", None, peer).await.unwrap();
        }
    }
}
