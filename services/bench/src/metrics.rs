//! `eventfold-bench metrics`: what the gRPC metrics layer adds to a call.
//!
//! The process installs the Prometheus recorder first, as every eventfold
//! process does, so that the metrics are really recorded. Then it runs the
//! command services three times, each on a gRPC server of its own on a
//! loopback port, over the same event store (one event log, one command
//! bus), authentication off and nothing limited:
//!
//! - **metrics off**: `GrpcServer::metrics(false)`, whose
//!   [`GrpcMetricsLayer`] opens each call's span but records nothing;
//! - **metrics on**: the default server, whose layer also counts and times
//!   every call;
//! - **metrics off (A/A)**: a second server like the first, the control:
//!   what the bench reports between identical servers, in the same run.
//!
//! The metrics of the commands themselves (`eventfold_commands_total`, the
//! event store's appends) are recorded alike behind all three: only the
//! layer differs.
//!
//! CreateOrder then goes to each at the same open-loop rate, in rotated
//! blocks or, with `--interleave`, in one stream whose calls go to the
//! three in turn, as `eventfold-bench auth` does ([`compare`]). The layer's
//! cost is the metrics-on p99 minus the metrics-off p99, against
//! [`MAX_P99_COST_MS`], with an interval from resampling the rounds.
//!
//! The recorder is checked to count exactly the calls of the metrics-on
//! server: one call to each server before the blocks, and every call of
//! the blocks after them. After the blocks, the layer alone is timed
//! in-process, on and off.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use bytes::Bytes;
use eventfold_platform::{
    auth::AuthConfig,
    metrics::{GrpcMetricsLayer, HANDLED, HANDLING_SECONDS},
    runtime::CancellationToken,
    telemetry,
};
use eventfold_proto::orders::{
    order_command_service_client::OrderCommandServiceClient, order_command_service_server::SERVICE_NAME,
};
use http_body_util::{BodyExt, Full};
use tonic::transport::Channel;
use tower::{Layer, Service, ServiceExt};
use uuid::Uuid;

use crate::{
    append::thousands,
    pacing::{Arm, Rounds, Schedule, compare, create_order_request, delete_orders, serve_commands},
    queries::ReadSide,
};

/// Issue 18's target: the metrics layer adds at most this much to
/// CreateOrder's p99 at 500/s, against metrics off, in the same run.
const MAX_P99_COST_MS: f64 = 0.2;
/// Calls of the in-process measurement of the layer's own time.
const LAYER_CALLS: u32 = 20_000;

/// Arguments of `eventfold-bench metrics`.
#[derive(Debug, clap::Args)]
pub(crate) struct MetricsBenchArgs {
    /// PostgreSQL URL of a throw-away database (migrated; orders `mbench-…`
    /// are created in it, and deleted again).
    #[arg(long, env = "EVENTFOLD_DATABASE__URL")]
    database_url: String,

    #[command(flatten)]
    schedule: Schedule,

    #[command(flatten)]
    rounds: Rounds,
}

/// A server of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Off,
    On,
    Control,
}

const VARIANTS: [Variant; 3] = [Variant::Off, Variant::On, Variant::Control];

impl Variant {
    fn label(self) -> &'static str {
        match self {
            Self::Off => "metrics off",
            Self::On => "metrics on",
            Self::Control => "metrics off (A/A)",
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Self::Off => "o",
            Self::On => "m",
            Self::Control => "c",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    fn arm(self) -> Arm {
        Arm { label: self.label(), tag: self.tag() }
    }

    /// Whether its server has the metrics layer.
    fn metrics(self) -> bool {
        self == Self::On
    }
}

pub(crate) async fn metrics(args: MetricsBenchArgs) -> anyhow::Result<()> {
    // Before anything records: without a recorder every metric is a no-op.
    telemetry::install_metrics().context("installing the metrics recorder")?;
    let ReadSide { admin, machine, log, .. } = ReadSide::open(&args.database_url).await?;
    let session = Uuid::new_v4().simple().to_string()[..8].to_owned();

    let stop = CancellationToken::new();
    let bus = eventfold_command::bus(log.clone(), eventfold_command::Config::default().bus_options());
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for variant in VARIANTS {
        let (channel, server) = serve_commands(&log, &bus, &stop, |server| {
            server.authenticate(&AuthConfig::default(), false, None).metrics(variant.metrics());
        })
        .await?;
        servers.push(server);
        clients.push(OrderCommandServiceClient::new(channel));
    }

    let result = async {
        measure(&args, &machine, &clients, &session).await?;
        let [off, on] = layer_time().await?;
        println!(
            "The layer alone, in-process (a CreateOrder call through `GrpcMetricsLayer` to a service that answers \
             at once, {} calls one after another, after the blocks): {} µs per call with metrics on, {} µs with \
             metrics off (mean).",
            thousands(f64::from(LAYER_CALLS)),
            micros(on),
            micros(off)
        );
        anyhow::Ok(())
    }
    .await;

    stop.cancel();
    for server in servers {
        let _ = server.await;
    }
    result.and(delete_orders(&admin, &format!("order-mbench-{session}-%")).await)
}

fn micros(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

/// CreateOrder `order_id` to `client`.
fn create_order(
    client: &OrderCommandServiceClient<Channel>,
    order_id: String,
    i: usize,
) -> impl Future<Output = anyhow::Result<()>> + use<> {
    let mut client = client.clone();
    async move { client.create_order(create_order_request(order_id, i)).await.map(drop).map_err(anyhow::Error::from) }
}

/// The blocks and the tables.
async fn measure(
    args: &MetricsBenchArgs,
    machine: &str,
    clients: &[OrderCommandServiceClient<Channel>],
    session: &str,
) -> anyhow::Result<()> {
    // The layer really records where it should, and only there: one call
    // to each server, and the recorder's CreateOrder count goes up by one
    // for the metrics-on server alone.
    for variant in VARIANTS {
        let before = recorded()?;
        create_order(&clients[variant.index()], format!("mbench-{session}-b{}", variant.tag()), 0).await?;
        let expected = u64::from(variant.metrics());
        let rose = recorded_since(before, expected).await?;
        if rose != [expected; 2] {
            bail!(
                "{}: one CreateOrder added {rose:?} to ({HANDLED} OK, {HANDLING_SECONDS} count), not \
                 {expected} each",
                variant.label()
            );
        }
    }

    let before = recorded()?;
    let counted = Arc::new(AtomicU64::new(0));
    let count = counted.clone();
    let clients = clients.to_vec();
    let comparison = compare(
        &args.schedule,
        &args.rounds,
        VARIANTS.map(Variant::arm),
        &format!("mbench-{session}"),
        move |arm, id, i| {
            let call = create_order(&clients[arm], id, i);
            let count = (arm == Variant::On.index()).then(|| count.clone());
            async move {
                call.await?;
                if let Some(count) = count {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        },
    )
    .await?;
    // Every answered call of the metrics-on server was recorded, and no
    // other.
    let sent = counted.load(Ordering::Relaxed);
    let rose = recorded_since(before, sent).await?;
    if rose != [sent; 2] {
        bail!("the metrics-on server answered {sent} CreateOrder calls, the recorder counted {rose:?}");
    }

    println!("{machine}");
    println!();
    println!(
        "CreateOrder over gRPC, open loop at {}/s, to three servers hosting the same command services over one \
         event store, with the Prometheus recorder installed: metrics off (`GrpcServer::metrics(false)`: the \
         layer opens the call's span and records nothing), metrics on (the default), and metrics off again (the \
         A/A control); {}; latency from the scheduled send time. One tonic channel per server; authentication \
         off; no rate limits; no tracing subscriber. The recorder counted {} CreateOrder calls of the metrics-on \
         server (warm-ups included), as many as it answered, and none of the others.",
        args.schedule.rate,
        args.rounds.describe(&args.schedule, VARIANTS.len()),
        thousands(sent as f64)
    );
    println!();
    comparison.print_arms();
    println!();
    let (on, aa) = (Variant::On.index(), Variant::Control.index());
    comparison.print_costs(Variant::Off.index(), &[(on, true), (aa, false)], MAX_P99_COST_MS, args.rounds.rounds);
    let (cost, _, (low, high)) = comparison.cost(Variant::Off.index(), on);
    let (control, _, (control_low, control_high)) = comparison.cost(Variant::Off.index(), aa);
    println!();
    println!(
        "Target (issue 18): the metrics layer costs CreateOrder at most {MAX_P99_COST_MS} ms at p99 at {}/s, against \
         metrics off, same run: {} ({:+.3} ms, {:.3}x; 90% interval {low:+.3} to {high:+.3} ms). A/A between the \
         two metrics-off servers: {:+.3} ms ({control_low:+.3} to {control_high:+.3} ms).",
        args.schedule.rate,
        if cost.within(MAX_P99_COST_MS) { "MET" } else { "MISSED" },
        cost.ms,
        cost.ratio,
        control.ms
    );
    Ok(())
}

/// What the recorder holds of CreateOrder: calls counted OK by
/// [`HANDLED`], and calls timed by [`HANDLING_SECONDS`].
fn recorded() -> anyhow::Result<[u64; 2]> {
    let text = telemetry::render_metrics().context("no metrics recorder")?;
    let labels = [("service", SERVICE_NAME), ("method", "CreateOrder")];
    Ok([
        sample(&text, HANDLED, &[labels[0], labels[1], ("code", "OK")]),
        sample(&text, &format!("{HANDLING_SECONDS}_count"), &labels),
    ])
}

/// How much each figure of [`recorded`] rose since `before`, once both
/// reached `expected` (a call's metrics are recorded as its answer leaves
/// the server), or after 1 s.
async fn recorded_since(before: [u64; 2], expected: u64) -> anyhow::Result<[u64; 2]> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let now = recorded()?;
        let rose = [now[0].saturating_sub(before[0]), now[1].saturating_sub(before[1])];
        if rose.iter().all(|r| *r >= expected) || Instant::now() >= deadline {
            return Ok(rose);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The sum of the samples of `name` with `labels` (among others) in the
/// Prometheus text `text`; 0 when there are none.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            let wanted = metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum::<f64>() as u64
}

/// The mean time of a CreateOrder call through [`GrpcMetricsLayer`] of
/// eventfold's descriptor sets, as `GrpcServer` builds it with metrics off
/// and on, to a service that answers at once with one message and an OK
/// status in the trailers, the body read to its end: the layer's own work,
/// without the network, the server or the store. The metrics-on calls are
/// checked to be recorded, and the others not.
async fn layer_time() -> anyhow::Result<[Duration; 2]> {
    let path = format!("/{SERVICE_NAME}/CreateOrder");
    let on = GrpcMetricsLayer::from_descriptor_sets(&[eventfold_proto::FILE_DESCRIPTOR_SET])?;
    let off = on.clone().without_metrics();
    let mut times = [Duration::ZERO; 2];
    for (time, (layer, records)) in times.iter_mut().zip([(off, false), (on, true)]) {
        let mut metered = layer.layer(tower::service_fn(answer));
        let before = recorded()?;
        // Once to warm up, then timed.
        call(&mut metered, &path).await?;
        let started = Instant::now();
        for _ in 0..LAYER_CALLS {
            call(&mut metered, &path).await?;
        }
        *time = started.elapsed() / LAYER_CALLS;
        let expected = if records { u64::from(LAYER_CALLS) + 1 } else { 0 };
        let rose = recorded_since(before, expected).await?;
        if rose != [expected; 2] {
            bail!("in-process: {} calls through the layer recorded {rose:?}, not {expected}", LAYER_CALLS + 1);
        }
    }
    Ok(times)
}

/// A gRPC answer of one empty message and an OK status.
async fn answer(_: http::Request<()>) -> Result<http::Response<tonic::body::Body>, Infallible> {
    let body = Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])).with_trailers(async {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        Some(Ok(trailers))
    });
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// One call to `path` through `metered`, its body read to the end.
async fn call<S>(metered: &mut S, path: &str) -> anyhow::Result<()>
where
    S: Service<http::Request<()>, Response = http::Response<tonic::body::Body>, Error = Infallible>,
{
    let request = http::Request::post(path).body(())?;
    let response = metered.ready().await?.call(request).await?;
    response.into_body().collect().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_read_by_name_and_labels() {
        let text = format!(
            "# TYPE {HANDLED} counter\n\
             {HANDLED}{{service=\"{SERVICE_NAME}\",method=\"CreateOrder\",code=\"OK\"}} 12\n\
             {HANDLED}{{service=\"{SERVICE_NAME}\",method=\"CreateOrder\",code=\"ALREADY_EXISTS\"}} 3\n\
             {HANDLED}{{service=\"{SERVICE_NAME}\",method=\"CancelOrder\",code=\"OK\"}} 5\n\
             {HANDLING_SECONDS}_count{{service=\"{SERVICE_NAME}\",method=\"CreateOrder\"}} 15\n\
             {HANDLING_SECONDS}_sum{{service=\"{SERVICE_NAME}\",method=\"CreateOrder\"}} 0.25\n"
        );
        let create = [("service", SERVICE_NAME), ("method", "CreateOrder")];
        assert_eq!(sample(&text, HANDLED, &[create[0], create[1], ("code", "OK")]), 12);
        assert_eq!(sample(&text, HANDLED, &create), 15);
        assert_eq!(sample(&text, &format!("{HANDLING_SECONDS}_count"), &create), 15);
        assert_eq!(sample(&text, HANDLED, &[("method", "GetOrder")]), 0);
        assert_eq!(sample("", HANDLED, &[]), 0);
    }

    #[test]
    fn only_the_metrics_on_server_has_the_layer() {
        let with: Vec<_> = VARIANTS.iter().filter(|v| v.metrics()).collect();
        assert_eq!(with, [&Variant::On]);
        let tags: std::collections::BTreeSet<_> = VARIANTS.iter().map(|v| v.tag()).collect();
        assert_eq!(tags.len(), VARIANTS.len());
        assert_eq!(VARIANTS.map(Variant::index), [0, 1, 2]);
    }
}
