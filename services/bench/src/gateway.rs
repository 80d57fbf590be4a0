//! `eventfold-bench gateway`: what the REST gateway adds to a call.
//!
//! One process runs the command and query services on one gRPC server (as
//! `eventfold dev` does) and the gateway in front of it, each on a loopback
//! port. The same calls then go two ways, at the same open-loop rate and for
//! the same time, in alternating blocks of one run:
//!
//! - **gRPC**: a tonic channel straight to the services.
//! - **REST**: an HTTP/1.1 client with a keep-alive pool to the gateway,
//!   which transcodes the JSON and calls the services over its own channel.
//!
//! The calls are `CreateOrder` (`POST /v1/orders`) and `GetOrder` served
//! from the Redis cache (`GET /v1/orders/{order_id}`). The gateway's cost is
//! the REST p99 minus the gRPC p99 and their ratio, against the targets of
//! [`MAX_OVERHEAD_MS`] and [`MAX_RATIO`].

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use bytes::Bytes;
use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::{
    orders::{CreateOrderRequest, order_command_service_client::OrderCommandServiceClient},
    query::{GetOrderRequest, order_query_service_client::OrderQueryServiceClient},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use crate::{
    pacing::{Schedule, Series, cells, create_order_request, delete_orders, open_loop, rotation, send_lag, verdict},
    queries::{ReadSide, active_order_views, catch_up, create_orders},
};

/// Issue 16's targets: REST p99 at most this much above gRPC p99 …
pub(crate) const MAX_OVERHEAD_MS: f64 = 1.0;
/// … and at most this many times it.
pub(crate) const MAX_RATIO: f64 = 1.3;
/// Arguments of `eventfold-bench gateway`.
#[derive(Debug, clap::Args)]
pub(crate) struct GatewayBenchArgs {
    /// PostgreSQL URL of a throw-away database (migrated; orders `gbench-…`
    /// are created in it, and those of the CreateOrder runs deleted again).
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,

    /// Redis URL of the query cache; without it the GetOrder (cached) pair
    /// is not run.
    #[arg(long)]
    redis_url: Option<String>,

    #[command(flatten)]
    schedule: Schedule,

    /// Blocks per path and call, alternating gRPC and REST (gRPC first in
    /// even rounds, REST first in odd ones: an even count gives each path
    /// the first slot equally often).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,

    /// Orders created and projected beforehand for GetOrder.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    orders: u64,
}

/// The two ways a call goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Grpc,
    Rest,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Self::Grpc => "gRPC",
            Self::Rest => "REST (gateway)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Grpc => "g",
            Self::Rest => "r",
        }
    }
}

/// The clients of both paths.
#[derive(Clone)]
struct Clients {
    commands: OrderCommandServiceClient<Channel>,
    queries: OrderQueryServiceClient<Channel>,
    http: Client<HttpConnector, Full<Bytes>>,
    /// `http://127.0.0.1:PORT` of the gateway.
    gateway: Arc<str>,
}

impl Clients {
    /// CreateOrder `order_id` over `path`.
    fn create_order(&self, path: Path, order_id: String, i: usize) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let request = create_order_request(order_id, i);
        let (mut grpc, http, gateway) = (self.commands.clone(), self.http.clone(), self.gateway.clone());
        async move {
            match path {
                Path::Grpc => grpc.create_order(request).await.map(drop).map_err(anyhow::Error::from),
                Path::Rest => {
                    let body = serde_json::to_vec(&create_order_json(&request))?;
                    let request = http::Request::post(format!("{gateway}/v1/orders"))
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Full::new(Bytes::from(body)))?;
                    answered(&http, request).await
                }
            }
        }
    }

    /// GetOrder `order_id` over `path`.
    fn get_order(&self, path: Path, order_id: String) -> impl Future<Output = anyhow::Result<()>> + use<> {
        let (mut grpc, http, gateway) = (self.queries.clone(), self.http.clone(), self.gateway.clone());
        async move {
            match path {
                Path::Grpc => grpc
                    .get_order(GetOrderRequest { order_id, min_position: 0 })
                    .await
                    .map(drop)
                    .map_err(anyhow::Error::from),
                Path::Rest => {
                    let request =
                        http::Request::get(format!("{gateway}/v1/orders/{order_id}")).body(Full::new(Bytes::new()))?;
                    answered(&http, request).await
                }
            }
        }
    }
}

/// Sends `request` and reads the whole answer; anything but 200 fails.
async fn answered(
    client: &Client<HttpConnector, Full<Bytes>>,
    request: http::Request<Full<Bytes>>,
) -> anyhow::Result<()> {
    let response = client.request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != http::StatusCode::OK {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(())
}

/// `request` in the JSON of the REST binding (proto3 JSON: camelCase,
/// 64-bit integers as strings).
fn create_order_json(request: &CreateOrderRequest) -> serde_json::Value {
    let items: Vec<serde_json::Value> = request
        .items
        .iter()
        .map(|item| {
            let price = item.unit_price.as_ref();
            serde_json::json!({
                "productId": item.product_id,
                "quantity": item.quantity,
                "unitPrice": {
                    "minor": price.map_or(0, |m| m.minor).to_string(),
                    "currency": price.map_or("", |m| m.currency.as_str()),
                },
            })
        })
        .collect();
    serde_json::json!({
        "requestId": request.request_id,
        "orderId": request.order_id,
        "customerId": request.customer_id,
        "currency": request.currency,
        "items": items,
    })
}

/// The gateway's cost at p99 against the targets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Overhead {
    /// REST p99 − gRPC p99.
    pub(crate) ms: f64,
    /// REST p99 ÷ gRPC p99.
    pub(crate) ratio: f64,
}

impl Overhead {
    pub(crate) fn new(grpc_p99_ms: f64, rest_p99_ms: f64) -> Self {
        Self { ms: rest_p99_ms - grpc_p99_ms, ratio: rest_p99_ms / grpc_p99_ms }
    }

    /// Within [`MAX_OVERHEAD_MS`]; NaN (no figures) is not.
    pub(crate) fn overhead_met(&self) -> bool {
        self.ms <= MAX_OVERHEAD_MS
    }

    /// Within [`MAX_RATIO`]; NaN and infinity are not.
    pub(crate) fn ratio_met(&self) -> bool {
        self.ratio <= MAX_RATIO
    }
}

pub(crate) async fn gateway(args: GatewayBenchArgs) -> anyhow::Result<()> {
    let ReadSide { admin, machine, database, log, workers } = ReadSide::open(&args.database_url).await?;
    let session = Uuid::new_v4().simple().to_string()[..8].to_owned();
    let query_tag = format!("gbench-{session}-q");
    let orders = usize::try_from(args.orders).context("--orders is too large")?;

    // Orders for GetOrder, projected before the clock runs.
    if args.redis_url.is_some() {
        create_orders(log.clone(), &query_tag, orders).await?;
        let version = active_order_views(&database).await?;
        let projector = eventfold_projector::Projector::new(
            workers.clone(),
            log.clone(),
            Arc::new(eventfold_projector::OrderViews),
            version,
            eventfold_projector::ProjectorOptions::default(),
        );
        catch_up(&projector, &log).await?;
    }

    // The command and query services on one gRPC server, as in `eventfold dev`.
    let mut query_config = eventfold_query::Config::default();
    query_config.cache.url = args.redis_url.clone();
    query_config.cache.warm_orders = 0;
    query_config.cache.key_prefix = format!("gbench-{session}:");
    // Entries filled before the blocks outlive them (the default is 5 min).
    query_config.cache.order_ttl_secs = 24 * 3600;
    let cache = match query_config.cache.redis() {
        Some(options) => Some(
            eventfold_query::Cache::new(eventfold_platform::runtime::redis(&options)?, query_config.cache.clone())
                .await,
        ),
        None => None,
    };
    let query =
        eventfold_query::Query::connect(&query_config, database.sized(query_config.pool_size), cache, log.clone())
            .await?;
    let stop = CancellationToken::new();
    let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let mut server = GrpcServer::new();
    let command_config = eventfold_command::Config::default();
    let bus = eventfold_command::bus(log.clone(), command_config.bus_options());
    eventfold_command::host(&mut server, &command_config, log.clone(), bus);
    eventfold_query::host(&mut server, &query_config, query.clone(), stop.clone());
    let grpc_server = tokio::spawn(server.serve(grpc_listener, stop.clone(), Duration::from_secs(1)));

    // The gateway in front of it, wired as `eventfold dev` wires it.
    let upstream = Endpoint::from_shared(format!("http://{grpc_addr}"))?.connect_lazy();
    let gateway = eventfold_gateway::Gateway::new(
        eventfold_proto::FILE_DESCRIPTOR_SET,
        eventfold_gateway::Upstreams::all(upstream),
        eventfold_gateway::GatewayOptions::default(),
    )?;
    let rest_listener = TcpListener::bind("127.0.0.1:0").await?;
    let rest_addr = rest_listener.local_addr()?;
    let rest_server = tokio::spawn(eventfold_platform::admin::serve(rest_listener, gateway.router(), stop.clone()));

    let channel = Endpoint::from_shared(format!("http://{grpc_addr}"))?.connect().await.context("connecting")?;
    // Without TCP_NODELAY a request written in two segments can wait for
    // a delayed ACK (40 ms); tonic's channels set it, and so do HTTP
    // clients such as reqwest and curl.
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let clients = Clients {
        commands: OrderCommandServiceClient::new(channel.clone()),
        queries: OrderQueryServiceClient::new(channel),
        http: Client::builder(TokioExecutor::new()).build(connector),
        gateway: format!("http://{rest_addr}").into(),
    };

    let result = measure(&args, &machine, &clients, &query, &session, &query_tag).await;

    stop.cancel();
    let _ = grpc_server.await;
    let _ = rest_server.await;
    result.and(delete_orders(&admin, &format!("order-gbench-{session}-c%")).await)
}

/// The blocks, the tables and the verdicts.
async fn measure(
    args: &GatewayBenchArgs,
    machine: &str,
    clients: &Clients,
    query: &Arc<eventfold_query::Query>,
    session: &str,
    query_tag: &str,
) -> anyhow::Result<()> {
    let cached = args.redis_url.is_some();
    let order_ids: Arc<[String]> = (0..args.orders).map(|i| format!("{query_tag}-{i}")).collect();
    if cached {
        // The positions follower needs its first read.
        for _ in 0..100 {
            if query.positions().get("order_views").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Fill the cache, and see that both paths answer.
        for id in order_ids.iter() {
            clients.get_order(Path::Grpc, id.clone()).await.with_context(|| format!("GetOrder {id} over gRPC"))?;
        }
        clients.get_order(Path::Rest, order_ids[0].clone()).await.context("GetOrder over REST")?;
    }
    let stats_before = query.cache().map(|c| c.stats());

    let warmup = Duration::from_secs(args.schedule.warmup_secs);
    let duration = Duration::from_secs(args.schedule.duration_secs);
    // One unmeasured block of each call on each path first, so that the
    // first measured block (gRPC's) does not also warm the process up.
    for path in [Path::Grpc, Path::Rest] {
        let clients_c = clients.clone();
        let prefix = format!("gbench-{session}-cw{}", path.tag());
        let block = open_loop(args.schedule.rate, warmup, Duration::ZERO, move |i| {
            clients_c.create_order(path, format!("{prefix}-{i}"), i)
        })
        .await?;
        block.check(&format!("CreateOrder over {}", path.label()))?;
        if cached {
            let (clients_g, ids) = (clients.clone(), order_ids.clone());
            let block = open_loop(args.schedule.rate, warmup, Duration::ZERO, move |i| {
                clients_g.get_order(path, ids[i % ids.len()].clone())
            })
            .await?;
            block.check(&format!("GetOrder over {}", path.label()))?;
        }
    }
    let mut create = [Series::new(), Series::new()];
    let mut get = [Series::new(), Series::new()];
    for round in 0..args.rounds {
        for (slot, path) in rotation([Path::Grpc, Path::Rest], round).into_iter().enumerate() {
            let index = usize::from(path == Path::Rest);
            let clients_c = clients.clone();
            let prefix = format!("gbench-{session}-c{}{round}", path.tag());
            let block = open_loop(args.schedule.rate, warmup, duration, move |i| {
                clients_c.create_order(path, format!("{prefix}-{i}"), i)
            })
            .await?;
            block.check(&format!("CreateOrder over {}", path.label()))?;
            eprintln!("round {round}.{slot}: CreateOrder over {}: {}", path.label(), block.summary());
            create[index].add(block, duration.as_secs_f64());
            if cached {
                let (clients_g, ids) = (clients.clone(), order_ids.clone());
                let block = open_loop(args.schedule.rate, warmup, duration, move |i| {
                    clients_g.get_order(path, ids[i % ids.len()].clone())
                })
                .await?;
                block.check(&format!("GetOrder over {}", path.label()))?;
                eprintln!("round {round}.{slot}: GetOrder over {}: {}", path.label(), block.summary());
                get[index].add(block, duration.as_secs_f64());
            }
        }
    }
    let stats_after = query.cache().map(|c| c.stats());

    println!("{machine}");
    println!();
    println!(
        "{} over gRPC and over REST through the gateway, open loop at {}/s: one unmeasured block per path and \
         call, then {} rounds of {}s warm-up + {}s measured per path and call, gRPC and REST alternating (gRPC \
         first in even rounds); latency from the scheduled send time. gRPC: one tonic channel. REST: hyper's HTTP/1.1 client with a keep-alive pool, \
         to the gateway, which calls the same server over one channel of its own.",
        if cached { "CreateOrder and GetOrder (cached)" } else { "CreateOrder" },
        args.schedule.rate,
        args.rounds,
        args.schedule.warmup_secs,
        args.schedule.duration_secs
    );
    println!();
    println!("| call | path | done/s | p50 ms | p99 ms | p99.9 ms | max ms |");
    println!("|---|---|---:|---:|---:|---:|---:|");
    let mut pairs = vec![("CreateOrder", create)];
    if cached {
        pairs.push(("GetOrder (cached)", get));
    }
    for (call, series) in &pairs {
        for (series, path) in series.iter().zip([Path::Grpc, Path::Rest]) {
            let m = series.measurement();
            println!("| {call} | {} | {} |", path.label(), cells(&m, &[50.0, 99.0, 99.9, 100.0]));
        }
    }
    println!();
    println!(
        "| call | gateway p99 overhead (REST − gRPC) | ≤ {MAX_OVERHEAD_MS} ms | p99 ratio (REST ÷ gRPC) | ≤ {MAX_RATIO}x |"
    );
    println!("|---|---:|---|---:|---|");
    for (call, [grpc, rest]) in &pairs {
        let overhead = Overhead::new(grpc.measurement().percentile_ms(99.0), rest.measurement().percentile_ms(99.0));
        println!(
            "| {call} | {:+.2} ms | {} | {:.2}x | {} |",
            overhead.ms,
            verdict(overhead.overhead_met()),
            overhead.ratio,
            verdict(overhead.ratio_met())
        );
    }
    println!();
    println!(
        "Pacer send lag (counted in every latency above): {}. Every call answered without error.",
        send_lag(pairs.iter().flat_map(|(_, series)| series))
    );
    if let (Some(before), Some(after)) = (stats_before, stats_after) {
        let misses = after.misses.saturating_sub(before.misses);
        println!(
            "Cache during the blocks (warm-ups included): {} hits, {misses} misses{}.",
            after.hits.saturating_sub(before.hits),
            if misses > 0 {
                " (calls the cache's breaker sent past Redis after slow calls, or entries not found: those \
                 GetOrder calls read PostgreSQL)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overhead_is_the_p99_difference_and_ratio() {
        let o = Overhead::new(10.0, 10.8);
        assert!((o.ms - 0.8).abs() < 1e-9 && (o.ratio - 1.08).abs() < 1e-9);
        assert!(o.overhead_met() && o.ratio_met());
        // Small p99s: within a millisecond, but not within 1.3x.
        let o = Overhead::new(0.5, 1.2);
        assert!(o.overhead_met() && !o.ratio_met());
        // Large p99s: within 1.3x, but more than a millisecond.
        let o = Overhead::new(20.0, 22.0);
        assert!(!o.overhead_met() && o.ratio_met());
        // The limits themselves pass.
        let o = Overhead::new(4.0, 5.0);
        assert_eq!((o.overhead_met(), Overhead::new(10.0, 13.0).ratio_met()), (true, true));
        // REST faster than gRPC (noise): a negative overhead passes.
        assert!(Overhead::new(5.0, 4.5).overhead_met());
    }

    #[test]
    fn missing_figures_never_pass() {
        for o in [Overhead::new(f64::NAN, 1.0), Overhead::new(1.0, f64::NAN), Overhead::new(0.0, 0.5)] {
            assert!(!(o.overhead_met() && o.ratio_met()), "{o:?}");
        }
        assert!(!Overhead::new(f64::NAN, f64::NAN).overhead_met());
    }

    #[test]
    fn create_order_json_is_the_rest_binding() {
        let json = create_order_json(&create_order_request("o-1".into(), 4));
        assert_eq!(json["orderId"], "o-1");
        assert_eq!(json["requestId"], "o-1");
        assert_eq!(json["customerId"], "customer-4");
        assert_eq!(json["items"][0]["quantity"], 2);
        assert_eq!(json["items"][0]["unitPrice"], serde_json::json!({"minor": "1250", "currency": "EUR"}));
        assert_eq!(json["items"][1]["productId"], "sku-11");
    }

    /// The binding the gateway's router picks for `method` and `path`
    /// (the first that matches: they are sorted most specific first).
    fn routed(
        gateway: &eventfold_gateway::Gateway,
        method: http::Method,
        path: &str,
    ) -> (eventfold_gateway::rules::Binding, Vec<(String, String)>) {
        gateway
            .bindings()
            .iter()
            .find_map(|b| (b.method == method).then(|| b.template.matches(path)).flatten().map(|m| (b.clone(), m)))
            .unwrap()
    }

    #[test]
    fn rest_calls_reach_the_same_rpcs_with_the_same_requests() {
        let gateway = eventfold_gateway::Gateway::new(
            eventfold_proto::FILE_DESCRIPTOR_SET,
            eventfold_gateway::Upstreams::default(),
            eventfold_gateway::GatewayOptions::default(),
        )
        .unwrap();
        let (binding, bound) = routed(&gateway, http::Method::POST, "/v1/orders");
        assert_eq!(binding.operation_id(), "OrderCommandService_CreateOrder");
        let request = create_order_request("o-9".into(), 9);
        let body = serde_json::to_vec(&create_order_json(&request)).unwrap();
        let message = eventfold_gateway::transcode::request(&binding, bound, None, &body).unwrap();
        assert_eq!(message.transcode_to::<CreateOrderRequest>().unwrap(), request);

        let (binding, bound) = routed(&gateway, http::Method::GET, "/v1/orders/gbench-1a2b3c4d-q-7");
        assert_eq!(binding.operation_id(), "OrderQueryService_GetOrder");
        let message = eventfold_gateway::transcode::request(&binding, bound, None, &[]).unwrap();
        assert_eq!(
            message.transcode_to::<GetOrderRequest>().unwrap(),
            GetOrderRequest { order_id: "gbench-1a2b3c4d-q-7".into(), min_position: 0 }
        );
    }
}
