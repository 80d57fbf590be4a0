//! Rate limits on a real gRPC server (the platform's `GrpcServer`, with
//! authentication on, hosting a stand-in ApiKeyService: ListApiKeys is a
//! read, CreateApiKey a write), against a real Redis: a burst over the
//! limit is refused with RetryInfo and passes again after the advertised
//! delay; two servers with clients of their own share one limit through
//! Redis; with Redis paused or stopped the configured policy applies, the
//! metric counts it, and no other status comes back; the local buckets are
//! bounded.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use eventfold_platform::{
    auth::{AuthConfig, Principal, Secret},
    ratelimit::{Limit, REASON, REDIS_UNAVAILABLE_METRIC, RateLimitConfig, RateLimiter, RedisDown, RouteClasses},
    runtime::{RedisOptions, redis},
    server::GrpcServer,
};
use eventfold_proto::admin::{
    self as pb,
    api_key_service_client::ApiKeyServiceClient,
    api_key_service_server::{ApiKeyService, ApiKeyServiceServer},
};
use eventfold_tests::{
    auth::{HS256_SECRET, bearer, token},
    redis::{OwnRedis, TestRedis},
};
use fred::prelude::ClientLike;
use tokio_util::sync::{CancellationToken, DropGuard};
use tonic::{Code, Request, Response, Status, transport::Channel};
use tonic_types::StatusExt;

const CREATE: &str = "/eventfold.admin.v1.ApiKeyService/CreateApiKey";

/// Answers every call with an empty message: what is tested is in front.
#[derive(Debug, Clone, Copy)]
struct StandIn;

#[tonic::async_trait]
impl ApiKeyService for StandIn {
    async fn create_api_key(
        &self,
        _: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        Ok(Response::new(pb::CreateApiKeyResponse::default()))
    }

    async fn list_api_keys(
        &self,
        _: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        Ok(Response::new(pb::ListApiKeysResponse::default()))
    }

    async fn revoke_api_key(
        &self,
        _: Request<pb::RevokeApiKeyRequest>,
    ) -> Result<Response<pb::RevokeApiKeyResponse>, Status> {
        Ok(Response::new(pb::RevokeApiKeyResponse::default()))
    }
}

/// Counts every counter by name and labels, for the whole test binary.
#[derive(Debug, Default)]
struct Counters(Mutex<HashMap<String, Arc<AtomicU64>>>);

impl Counters {
    fn installed() -> &'static Counters {
        static COUNTERS: OnceLock<&'static Counters> = OnceLock::new();
        COUNTERS.get_or_init(|| {
            let counters: &'static Counters = Box::leak(Box::default());
            metrics::set_global_recorder(Recorder(counters)).expect("the only recorder of this test binary");
            counters
        })
    }

    fn name(key: &metrics::Key) -> String {
        let mut labels: Vec<String> = key.labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
        labels.sort();
        format!("{}{{{}}}", key.name(), labels.join(","))
    }

    fn get(&self, name: &str) -> u64 {
        let counters = self.0.lock().unwrap();
        counters.get(name).map_or(0, |c| c.load(Ordering::SeqCst))
    }
}

struct Recorder(&'static Counters);

impl metrics::Recorder for Recorder {
    fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
    fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}

    fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        let mut counters = self.0.0.lock().unwrap();
        metrics::Counter::from_arc(counters.entry(Counters::name(key)).or_default().clone())
    }

    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }

    fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
        metrics::Histogram::noop()
    }
}

/// A server on a free loopback port, stopped when dropped.
struct Server {
    addr: SocketAddr,
    _stop: DropGuard,
}

/// Limits for the tests: 1 write a second, 3 at once (a second between
/// refills is far longer than a slow call on a loaded machine); reads as
/// the defaults.
fn limits() -> RateLimitConfig {
    RateLimitConfig { writes: Limit { per_second: 1, burst: 3 }, timeout_ms: 1000, ..RateLimitConfig::default() }
}

/// A Redis client of its own (as each process builds one), connected.
async fn client(url: &str, timeout_ms: u64) -> fred::clients::Client {
    let options = RedisOptions { url: url.to_owned(), command_timeout: Duration::from_millis(timeout_ms), tls: None };
    let client = redis(&options).expect("a Redis client");
    tokio::time::timeout(Duration::from_secs(10), client.wait_for_connect())
        .await
        .expect("Redis answers within 10 s")
        .expect("connected");
    client
}

/// A server with `limits`, sharing them through `redis` when given; with
/// `auth` every call needs an HS256 token.
async fn start(limits: &RateLimitConfig, redis: Option<fred::clients::Client>, auth: bool) -> Server {
    let mut config = AuthConfig::default();
    config.jwt.hs256_secret = Some(Secret::new(HS256_SECRET));
    let mut server = GrpcServer::new();
    server.add_service(eventfold_proto::FILE_DESCRIPTOR_SET, ApiKeyServiceServer::new(StandIn));
    server.authenticate(&config, auth, None);
    server.rate_limit(limits, redis);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move { server.serve(listener, token, Duration::from_secs(1)).await.expect("serve") });
    Server { addr, _stop: stop.drop_guard() }
}

/// A client of `server` calling as `subject` (anonymously without one).
struct Caller {
    client: ApiKeyServiceClient<Channel>,
    token: Option<String>,
}

impl Caller {
    async fn new(server: &Server, subject: Option<&str>) -> Caller {
        let channel =
            Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.expect("connect");
        Caller { client: ApiKeyServiceClient::new(channel), token: subject.map(|s| token(s, &["admin"])) }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        if let Some(token) = &self.token {
            request.metadata_mut().insert("authorization", bearer(token));
        }
        request
    }

    /// A write.
    async fn create(&mut self) -> Result<(), Status> {
        let request = self.request(pb::CreateApiKeyRequest::default());
        self.client.create_api_key(request).await.map(drop)
    }

    /// A read.
    async fn list(&mut self) -> Result<(), Status> {
        let request = self.request(pb::ListApiKeysRequest::default());
        self.client.list_api_keys(request).await.map(drop)
    }
}

/// The advertised delay of a rate-limited answer, after checking its shape.
fn refused(result: Result<(), Status>, limit: &str, burst: &str) -> Duration {
    let status = result.expect_err("over the limit");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.reason, REASON);
    assert_eq!(info.metadata.get("class").map(String::as_str), Some("writes"));
    assert_eq!(info.metadata.get("limit").map(String::as_str), Some(limit));
    assert_eq!(info.metadata.get("burst").map(String::as_str), Some(burst));
    status.get_details_retry_info().and_then(|r| r.retry_delay).expect("a RetryInfo with a delay")
}

async fn burst_then_wait(server: &Server) {
    let mut alice = Caller::new(server, Some("alice")).await;
    for n in 0..3 {
        alice.create().await.unwrap_or_else(|s| panic!("write {n} of the burst: {s:?}"));
    }
    let delay = refused(alice.create().await, "1", "3");
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(1), "one interval at most: {delay:?}");
    // Another principal, and another class, have buckets of their own.
    Caller::new(server, Some("bob")).await.create().await.expect("bob's first write");
    alice.list().await.expect("alice's reads are not her writes");
    // The delay advertised now is exact: waiting it makes room for one.
    let delay = refused(alice.create().await, "1", "3");
    tokio::time::sleep(delay).await;
    alice.create().await.expect("after the advertised delay, a write passes");
    refused(alice.create().await, "1", "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_limit_gets_retry_info_and_passes_after_the_delay() {
    // This process's own buckets.
    burst_then_wait(&start(&limits(), None, true).await).await;
    // Buckets in Redis.
    let shared = TestRedis::create();
    let config = RateLimitConfig { key_prefix: shared.prefix().to_owned(), ..limits() };
    burst_then_wait(&start(&config, Some(client(shared.url(), 1000).await), true).await).await;
    // Anonymous calls (authentication off) count for their address.
    let open = start(&limits(), None, false).await;
    let mut first = Caller::new(&open, None).await;
    let mut second = Caller::new(&open, None).await;
    first.create().await.unwrap();
    second.create().await.unwrap();
    first.create().await.unwrap();
    refused(second.create().await, "1", "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_limit_through_redis() {
    let shared = TestRedis::create();
    let config = RateLimitConfig {
        writes: Limit { per_second: 1, burst: 4 },
        key_prefix: shared.prefix().to_owned(),
        ..limits()
    };
    // Each "process" with its own Redis client.
    let one = start(&config, Some(client(shared.url(), 1000).await), true).await;
    let two = start(&config, Some(client(shared.url(), 1000).await), true).await;
    let mut on_one = Caller::new(&one, Some("alice")).await;
    let mut on_two = Caller::new(&two, Some("alice")).await;
    for n in 0..2 {
        on_one.create().await.unwrap_or_else(|s| panic!("write {n} on the first: {s:?}"));
        on_two.create().await.unwrap_or_else(|s| panic!("write {n} on the second: {s:?}"));
    }
    // Four writes in all: the limit is spent on both.
    let delay = refused(on_one.create().await, "1", "4");
    refused(on_two.create().await, "1", "4");
    assert!(delay > Duration::from_millis(500), "nearly a whole second to wait: {delay:?}");
    tokio::time::sleep(delay).await;
    on_two.create().await.expect("the room made on the shared bucket, used on the other process");
    refused(on_one.create().await, "1", "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_the_fallback_applies_and_is_counted() {
    let counters = Counters::installed();
    let local = format!("{REDIS_UNAVAILABLE_METRIC}{{policy=local}}");
    let mut own = OwnRedis::start();
    let config = RateLimitConfig { timeout_ms: 200, redis_retry_ms: 1000, ..limits() };
    let server = start(&config, Some(client(&own.url(), 200).await), true).await;
    let mut alice = Caller::new(&server, Some("alice")).await;
    for _ in 0..3 {
        alice.create().await.expect("within the burst (Redis)");
    }
    refused(alice.create().await, "1", "3");
    assert_eq!(counters.get(&local), 0, "Redis answered every call");

    /// A burst of 5 writes by a new caller: the first 3 pass, the others
    /// are refused; nothing else comes back.
    async fn burst(server: &Server, subject: &str) {
        let mut caller = Caller::new(server, Some(subject)).await;
        for n in 0..5 {
            let result = caller.create().await;
            if n < 3 {
                result.unwrap_or_else(|s| panic!("{subject}: write {n} within the burst: {s:?}"));
            } else {
                refused(result, "1", "3");
            }
        }
    }

    // Paused: Redis answers nothing, every call waits for the timeout (or
    // skips Redis after a failure) and the local buckets limit.
    own.pause();
    burst(&server, "carol").await;
    let after_pause = counters.get(&local);
    assert_eq!(after_pause, 5, "each call decided locally is counted");
    own.unpause();

    // Stopped: connections are refused.
    own.stop();
    burst(&server, "dave").await;
    assert_eq!(counters.get(&local), after_pause + 5);

    // The other policies, on the same stopped Redis.
    let allow = RateLimitConfig { on_redis_down: RedisDown::Allow, ..config.clone() };
    let allowing = start(
        &allow,
        Some(redis(&RedisOptions { url: own.url(), command_timeout: Duration::from_millis(200), tls: None }).unwrap()),
        true,
    )
    .await;
    let mut erin = Caller::new(&allowing, Some("erin")).await;
    for n in 0..6 {
        erin.create().await.unwrap_or_else(|s| panic!("allow: write {n}: {s:?}"));
    }
    assert!(counters.get(&format!("{REDIS_UNAVAILABLE_METRIC}{{policy=allow}}")) >= 6);
    let deny = RateLimitConfig { on_redis_down: RedisDown::Deny, ..config.clone() };
    let denying = start(
        &deny,
        Some(redis(&RedisOptions { url: own.url(), command_timeout: Duration::from_millis(200), tls: None }).unwrap()),
        true,
    )
    .await;
    let status = Caller::new(&denying, Some("frank")).await.create().await.expect_err("deny: refused");
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.get_details_error_info().expect("ErrorInfo").reason, "RATE_LIMITER_UNAVAILABLE");
    assert!(status.get_details_retry_info().is_some());

    // Back: after the retry window Redis decides again (it restarted
    // empty, so alice has a full bucket there), and nothing more is
    // counted.
    own.resume();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut grace = Caller::new(&server, Some("grace")).await;
    loop {
        let before = counters.get(&local);
        let result = grace.create().await;
        if counters.get(&local) == before {
            result.expect("Redis decides again");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "Redis is not used again within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let settled = counters.get(&local);
    for _ in 0..3 {
        alice.create().await.expect("a full bucket in the restarted Redis");
    }
    refused(alice.create().await, "1", "3");
    assert_eq!(counters.get(&local), settled, "Redis answers: nothing decided locally");
}

#[tokio::test]
async fn the_local_buckets_of_many_callers_stay_bounded() {
    let config = RateLimitConfig { max_local_keys: 1000, ..limits() };
    let classes = RouteClasses::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET]).unwrap();
    let limiter = RateLimiter::new(&config, classes, None).unwrap();
    for i in 0..50_000 {
        let principal = Principal { subject: format!("user-{i}"), roles: vec![] };
        limiter.check(CREATE, Some(&principal), None).await.expect("a first write");
        assert!(limiter.tracked_local_keys() <= 1000, "{} buckets after {i} callers", limiter.tracked_local_keys());
    }
    for i in 0..50_000u32 {
        let peer = std::net::IpAddr::from(i.to_be_bytes());
        limiter.check(CREATE, None, Some(peer)).await.expect("a first write");
    }
    assert!(limiter.tracked_local_keys() <= 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_of_an_address_are_limited_before_they_are_checked() {
    let config = RateLimitConfig { auth_failures: Limit { per_second: 1, burst: 3 }, ..limits() };
    let server = start(&config, None, true).await;
    let channel = Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap();
    let call = |credentials: Option<String>| {
        let mut client = ApiKeyServiceClient::new(channel.clone());
        async move {
            let mut request = Request::new(pb::ListApiKeysRequest::default());
            if let Some(credentials) = credentials {
                request.metadata_mut().insert("authorization", credentials.parse().unwrap());
            }
            client.list_api_keys(request).await.map(drop)
        }
    };
    let forged = || Some("Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.c2lnbmF0dXJl".to_owned());
    let good = || Some(format!("Bearer {}", token("alice", &["admin"])));
    // Missing credentials cost nothing to refuse and are not counted.
    for _ in 0..5 {
        assert_eq!(call(None).await.unwrap_err().code(), Code::Unauthenticated);
    }
    for n in 0..3 {
        let status = call(forged()).await.expect_err("a forged token");
        assert_eq!(status.code(), Code::Unauthenticated, "failure {n}: {status:?}");
    }
    // Over the budget: refused before the check, even with a good token.
    let status = call(good()).await.expect_err("the address is over its failures");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let info = status.get_details_error_info().expect("an ErrorInfo");
    assert_eq!(info.metadata.get("class").map(String::as_str), Some("auth_failures"));
    let delay = status.get_details_retry_info().and_then(|r| r.retry_delay).expect("a RetryInfo");
    assert!(delay > Duration::ZERO && delay <= Duration::from_secs(1), "{delay:?}");
    tokio::time::sleep(delay).await;
    call(good()).await.expect("after the delay, a good token passes");
}
