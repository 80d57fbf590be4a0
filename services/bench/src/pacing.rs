//! What the open-loop benches of single gRPC calls share (`gateway`,
//! `auth`, `metrics`): a sender at a fixed rate timed by a thread, latency
//! from the scheduled send time, blocks pooled per variant, the order of
//! the variants rotated from round to round, and a failed call failing the
//! run; and, for the benches that compare servers of one process (`auth`,
//! `metrics`), the rounds themselves ([`compare`]), interleaved or in
//! blocks, and the tables of the p99 cost with its resampled interval.

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_platform::{runtime::CancellationToken, server::GrpcServer};
use eventfold_proto::{
    common::Money,
    orders::{CreateOrderRequest, OrderItem},
};
use eventfold_store::EventLog;
use tokio::{net::TcpListener, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};

use crate::append::{Measurement, ms, thousands};

/// A call still unanswered after this counts as failed, so that a hung
/// path fails the run instead of hanging it.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The rate and the blocks of an open-loop bench (flattened into its
/// arguments).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Schedule {
    /// Calls per second on each path (or to each server).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rate: u32,

    /// Measured seconds of one block (one path or server, one call). Short
    /// blocks and many rounds spread a disturbance of the machine over all.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) duration_secs: u64,

    /// Unmeasured seconds at the rate before each block.
    #[arg(long, default_value_t = 1)]
    pub(crate) warmup_secs: u64,
}

/// A new order `order_id` with two items; `request_id` is the order id,
/// so both are unique when the order id is.
pub(crate) fn create_order_request(order_id: String, i: usize) -> CreateOrderRequest {
    let money = |minor| Some(Money { minor, currency: "EUR".into() });
    CreateOrderRequest {
        request_id: order_id.clone(),
        order_id,
        customer_id: format!("customer-{}", i % 1000),
        currency: "EUR".into(),
        items: vec![
            OrderItem { product_id: format!("sku-{}", i % 50), quantity: 1 + (i % 3) as u32, unit_price: money(1250) },
            OrderItem { product_id: format!("sku-{}", (i + 7) % 50), quantity: 1, unit_price: money(499) },
        ],
        payment_token: String::new(),
        carrier: String::new(),
    }
}

/// The variants in the order of round `round`: rotated by one each round,
/// so that over a multiple of their number of rounds each runs in each
/// slot equally often.
pub(crate) fn rotation<T: Copy, const N: usize>(variants: [T; N], round: u32) -> [T; N] {
    let mut order = variants;
    order.rotate_left(round as usize % N.max(1));
    order
}

/// One open-loop block.
#[derive(Debug, Default)]
pub(crate) struct Block {
    /// From the scheduled send time to the answer, of the calls scheduled
    /// in the measured span.
    latencies: Vec<Duration>,
    /// How late the pacer started the calls of the measured span.
    send_lag: Vec<Duration>,
    /// The `i` of each of those calls.
    calls: Vec<usize>,
    failed: usize,
    first_error: Option<String>,
}

/// Starts `call(i)` at `rate` per second for `warmup + duration`, whether
/// or not earlier calls have answered.
///
/// The pacer is a blocking thread that sleeps to each send time: tokio's
/// timer ticks in whole milliseconds, which would make sends up to 1 ms
/// late — as much as a cached GetOrder takes — and, since latency counts
/// from the scheduled time, add that to every figure.
pub(crate) async fn open_loop<F, Fut>(rate: u32, warmup: Duration, duration: Duration, call: F) -> anyhow::Result<Block>
where
    F: Fn(usize) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let runtime = tokio::runtime::Handle::current();
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let pacer = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        let start = Instant::now();
        let measure_from = start + warmup;
        let until = measure_from + duration;
        let mut calls = Vec::new();
        for i in 0u32.. {
            let scheduled = start + interval.checked_mul(i).context("too many calls")?;
            if scheduled >= until {
                break;
            }
            if let Some(wait) = scheduled.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let lag = scheduled.elapsed();
            let future = call(i as usize);
            let task = runtime.spawn(async move {
                let result = match tokio::time::timeout(CALL_TIMEOUT, future).await {
                    Ok(result) => result,
                    Err(_) => Err(anyhow::anyhow!("no answer within {CALL_TIMEOUT:?}")),
                };
                (result, scheduled.elapsed())
            });
            calls.push((scheduled >= measure_from, lag, task));
        }
        Ok(calls)
    });
    let mut block = Block::default();
    for (i, (measured, lag, task)) in pacer.await.context("the pacer panicked")??.into_iter().enumerate() {
        let (result, latency) = task.await.context("a call panicked")?;
        match result {
            Ok(()) if measured => {
                block.latencies.push(latency);
                block.send_lag.push(lag);
                block.calls.push(i);
            }
            Ok(()) => {}
            Err(e) => {
                block.failed += 1;
                block.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Ok(block)
}

impl Block {
    /// Fails the run when a call of the block (`what`: the call and the
    /// path) failed: a broken path must not look fast.
    pub(crate) fn check(&self, what: &str) -> anyhow::Result<()> {
        if self.failed > 0 {
            bail!("{what}: {} calls failed; the first: {}", self.failed, self.first_error.as_deref().unwrap_or("?"));
        }
        Ok(())
    }

    fn measurement(&self) -> Measurement {
        sorted(self.latencies.clone())
    }

    /// The latencies of the measured span, in the order of the sends.
    pub(crate) fn latencies(&self) -> &[Duration] {
        &self.latencies
    }

    /// The block's calls dealt into `n` blocks by `i % n` (calls to `n`
    /// variants in turn).
    pub(crate) fn deal(self, n: usize) -> Vec<Block> {
        let mut blocks: Vec<Block> = (0..n).map(|_| Block::default()).collect();
        for ((latency, lag), i) in self.latencies.into_iter().zip(self.send_lag).zip(self.calls) {
            let block = &mut blocks[i % n];
            block.latencies.push(latency);
            block.send_lag.push(lag);
            block.calls.push(i);
        }
        blocks
    }

    /// Calls, p50, p99 and maximum, for the progress lines.
    pub(crate) fn summary(&self) -> String {
        let m = self.measurement();
        format!(
            "{} calls, p50 {} / p99 {} / max {} ms",
            m.latencies.len(),
            ms(m.percentile_ms(50.0)),
            ms(m.percentile_ms(99.0)),
            ms(m.percentile_ms(100.0))
        )
    }
}

/// One call over one path: its blocks pooled.
pub(crate) struct Series {
    latencies: Vec<Duration>,
    send_lag: Vec<Duration>,
    seconds: f64,
}

impl Series {
    pub(crate) fn new() -> Self {
        Self { latencies: Vec::new(), send_lag: Vec::new(), seconds: 0.0 }
    }

    pub(crate) fn add(&mut self, block: Block, seconds: f64) {
        self.latencies.extend(block.latencies);
        self.send_lag.extend(block.send_lag);
        self.seconds += seconds;
    }

    pub(crate) fn measurement(&self) -> Measurement {
        Measurement { seconds: self.seconds, ..sorted(self.latencies.clone()) }
    }
}

/// The cells of a table row of `m`: calls done per second, then the
/// latency at each of `percentiles` in ms (100: the maximum).
pub(crate) fn cells(m: &Measurement, percentiles: &[f64]) -> String {
    let mut cells = vec![thousands(m.latencies.len() as f64 / m.seconds)];
    cells.extend(percentiles.iter().map(|p| ms(m.percentile_ms(*p))));
    cells.join(" | ")
}

fn sorted(mut latencies: Vec<Duration>) -> Measurement {
    latencies.sort_unstable();
    Measurement { latencies, seconds: 1.0, worst_per_second: Vec::new() }
}

/// The pacer's lateness over `series` (counted in every latency):
/// `p50 … / p99 … / max … ms`.
pub(crate) fn send_lag<'a>(series: impl IntoIterator<Item = &'a Series>) -> String {
    let lag = sorted(series.into_iter().flat_map(|s| s.send_lag.iter().copied()).collect());
    format!(
        "p50 {} / p99 {} / max {} ms",
        ms(lag.percentile_ms(50.0)),
        ms(lag.percentile_ms(99.0)),
        ms(lag.percentile_ms(100.0))
    )
}

pub(crate) fn verdict(met: bool) -> &'static str {
    if met { "PASS" } else { "MISS" }
}

/// Deletes the orders whose stream ids are `LIKE pattern` (the bench's
/// own, by their session tag) from the event store.
pub(crate) async fn delete_orders(admin: &tokio_postgres::Client, pattern: &str) -> anyhow::Result<()> {
    for table in ["snapshots", "events", "streams", "append_requests"] {
        admin
            .execute(&format!("DELETE FROM eventstore.{table} WHERE stream_id LIKE $1"), &[&pattern])
            .await
            .with_context(|| format!("deleting the bench orders from eventstore.{table}"))?;
    }
    Ok(())
}

/// The command services (`eventfold_command::host`, default
/// configuration) on a gRPC server of their own on a loopback port, over
/// `log` and `bus`, as `configure` sets the server up, until `stop`; and a
/// channel to them.
pub(crate) async fn serve_commands(
    log: &Arc<dyn EventLog>,
    bus: &eventfold_command::Bus,
    stop: &CancellationToken,
    configure: impl FnOnce(&mut GrpcServer),
) -> anyhow::Result<(Channel, JoinHandle<eventfold_platform::Result<()>>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let mut server = GrpcServer::new();
    eventfold_command::host(&mut server, &eventfold_command::Config::default(), log.clone(), bus.clone());
    configure(&mut server);
    let server = tokio::spawn(server.serve(listener, stop.clone(), Duration::from_secs(1)));
    let channel = Endpoint::from_shared(format!("http://{addr}"))?.connect().await.context("connecting")?;
    Ok((channel, server))
}

/// The rounds of a comparison of servers (flattened into its arguments).
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct Rounds {
    /// Blocks per variant. The order of the variants rotates every round:
    /// a multiple of their number gives each every slot equally often.
    #[arg(long, default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rounds: u32,

    /// Send the calls of the variants in turn within each block, at --rate
    /// in all (each at its share of it, for as many times --duration-secs),
    /// instead of one variant per block: a stall of the machine shorter
    /// than a block then hits all of them alike.
    #[arg(long)]
    pub(crate) interleave: bool,
}

impl Rounds {
    /// How the blocks of `variants` variants ran, for the text above the
    /// tables.
    pub(crate) fn describe(&self, schedule: &Schedule, variants: usize) -> String {
        let (all, share) = match variants {
            2 => ("two".to_owned(), "half".to_owned()),
            3 => ("three".to_owned(), "a third".to_owned()),
            n => (n.to_string(), format!("1/{n}")),
        };
        let (rounds, warmup, duration) = (self.rounds, schedule.warmup_secs, schedule.duration_secs);
        if self.interleave {
            format!(
                "one unmeasured block, then {rounds} rounds of {warmup}s warm-up + {}s measured, the calls going to \
                 the {all} in turn (each at {share} of the rate; which comes first rotated every round)",
                duration * variants as u64
            )
        } else {
            format!(
                "one unmeasured block per variant, then {rounds} rounds of {warmup}s warm-up + {duration}s measured \
                 per variant, the order of the {all} rotated every round"
            )
        }
    }
}

/// One of the servers a comparison sends to: its name in the tables, and
/// its tag in the order ids of its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arm {
    pub(crate) label: &'static str,
    pub(crate) tag: &'static str,
}

/// The calls of a comparison: per arm, pooled and by round.
pub(crate) struct Comparison<const N: usize> {
    arms: [Arm; N],
    series: [Series; N],
    /// The latencies of each arm's block (its share of the block, when
    /// interleaved) in each round.
    blocks: [Vec<Vec<Duration>>; N],
}

/// CreateOrder to the `N` servers of `arms` at `schedule`'s rate, in the
/// rounds of `rounds`: first one unmeasured block (per arm, unless
/// interleaved), so that the first measured block does not also warm the
/// process up; then each round either one block per arm, in an order
/// rotated every round, or (`--interleave`) one block whose calls go to
/// the arms in turn, the arm that comes first rotated every round. Each
/// arm gets `duration_secs`' worth of calls at the rate per round.
///
/// `call(arm, order_id, i)` sends call `i` of a block to the arm of that
/// index; `order_id` is `{prefix}-{block}-{i}`, unique in the run. A call
/// that fails fails the run.
pub(crate) async fn compare<const N: usize, F, Fut>(
    schedule: &Schedule,
    rounds: &Rounds,
    arms: [Arm; N],
    prefix: &str,
    call: F,
) -> anyhow::Result<Comparison<N>>
where
    F: Fn(usize, String, usize) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let warmup = Duration::from_secs(schedule.warmup_secs);
    let duration = Duration::from_secs(schedule.duration_secs);
    // One block: calls to the arms of `group` in turn (one arm, or all),
    // dealt back to them.
    let block = |group: Vec<usize>, name: String, measured: Duration| {
        let labels: Vec<_> = group.iter().map(|&arm| arms[arm].label).collect();
        let what = format!("CreateOrder with {}", labels.join(", "));
        let (call, prefix, targets) = (call.clone(), format!("{prefix}-{name}"), group.clone());
        async move {
            let n = targets.len();
            let block =
                open_loop(schedule.rate, warmup, measured, move |i| call(targets[i % n], format!("{prefix}-{i}"), i))
                    .await?;
            block.check(&what)?;
            anyhow::Ok(group.into_iter().zip(block.deal(n)).collect::<Vec<_>>())
        }
    };
    let indices: [usize; N] = std::array::from_fn(|arm| arm);
    let groups = |round: u32| -> Vec<Vec<usize>> {
        let order = rotation(indices, round);
        if rounds.interleave { vec![order.to_vec()] } else { order.map(|arm| vec![arm]).to_vec() }
    };
    let tags = |group: &[usize]| group.iter().map(|&arm| arms[arm].tag).collect::<String>();
    for group in groups(0) {
        block(group.clone(), format!("w{}", tags(&group)), Duration::ZERO).await?;
    }
    let mut series = arms.map(|_| Series::new());
    let mut blocks = arms.map(|_| Vec::new());
    for round in 0..rounds.rounds {
        for (slot, group) in groups(round).into_iter().enumerate() {
            let measured = duration * group.len() as u32;
            let name = format!("{round}{}", tags(&group));
            for (arm, done) in block(group, name, measured).await? {
                eprintln!("round {round}.{slot}: CreateOrder with {}: {}", arms[arm].label, done.summary());
                blocks[arm].push(done.latencies().to_vec());
                series[arm].add(done, measured.as_secs_f64());
            }
        }
    }
    Ok(Comparison { arms, series, blocks })
}

impl<const N: usize> Comparison<N> {
    /// Each arm's calls pooled over the rounds.
    pub(crate) fn measurement(&self, arm: usize) -> Measurement {
        self.series[arm].measurement()
    }

    /// The table of the arms: calls done per second, p50 to the maximum,
    /// and the range of the p99s of their blocks.
    pub(crate) fn print_arms(&self) {
        println!("| variant | done/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | block p99s ms |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|");
        for (arm, (series, blocks)) in self.arms.iter().zip(self.series.iter().zip(&self.blocks)) {
            let (low, high) = blocks
                .iter()
                .map(|block| p99_ms(&mut block.clone()))
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), p| (l.min(p), h.max(p)));
            let m = series.measurement();
            println!("| {} | {} | {}–{} |", arm.label, cells(&m, &[50.0, 90.0, 99.0, 99.9, 100.0]), ms(low), ms(high));
        }
    }

    /// The p99 cost of `arm` against `baseline` (their pooled p99s), the
    /// difference of their p50s, and the interval of the p99 cost.
    pub(crate) fn cost(&self, baseline: usize, arm: usize) -> (Cost, f64, (f64, f64)) {
        let (off, on) = (self.measurement(baseline), self.measurement(arm));
        let cost = Cost::new(off.percentile_ms(99.0), on.percentile_ms(99.0));
        let p50 = on.percentile_ms(50.0) - off.percentile_ms(50.0);
        (cost, p50, cost_interval(&self.blocks[baseline], &self.blocks[arm]))
    }

    /// The table of the p99 cost of each of `rows` against `baseline`,
    /// judged against `limit_ms` where its flag is set (else `—`), as the
    /// difference and the ratio of the p99s; then what the interval is and
    /// the pacer's lateness.
    pub(crate) fn print_costs(&self, baseline: usize, rows: &[(usize, bool)], limit_ms: f64, rounds: u32) {
        let against = self.arms[baseline].label;
        println!(
            "| variant | p99 cost (− {against}) | ≤ {limit_ms} ms | p99 ratio (÷ {against}) | p50 cost (− {against}) \
             | p99 cost, 90% interval |"
        );
        println!("|---|---:|---|---:|---:|---:|");
        for &(arm, judged) in rows {
            let (cost, p50, (low, high)) = self.cost(baseline, arm);
            println!(
                "| {} | {:+.3} ms | {} | {:.3}x | {p50:+.3} ms | {low:+.3} to {high:+.3} ms |",
                self.arms[arm].label,
                cost.ms,
                if judged { verdict(cost.within(limit_ms)) } else { "—" },
                cost.ratio,
            );
        }
        println!();
        println!(
            "90% interval: the 5th to 95th percentile of the p99 cost over {RESAMPLES} resamples of the {rounds} \
             rounds (drawn with replacement, the same rounds for both variants)."
        );
        println!(
            "Pacer send lag (counted in every latency above): {}. Every call answered without error.",
            send_lag(&self.series)
        );
    }
}

/// Resamples of the rounds for the interval of the p99 cost.
const RESAMPLES: usize = 1000;

/// The nearest-rank p99 of `latencies` in ms (as
/// [`Measurement::percentile_ms`]), reordering them; NaN when empty.
fn p99_ms(latencies: &mut [Duration]) -> f64 {
    let rank = (latencies.len() * 99).div_ceil(100).max(1);
    if latencies.is_empty() {
        return f64::NAN;
    }
    latencies.select_nth_unstable(rank - 1).1.as_secs_f64() * 1000.0
}

/// The 5th and 95th percentile of the p99 cost (`on` − `off`, each given
/// as its blocks by round) over [`RESAMPLES`] resamples of the rounds,
/// drawn with replacement and the same for both: the blocks of a round ran
/// close together, so a slow spell of the machine stays paired.
fn cost_interval(off: &[Vec<Duration>], on: &[Vec<Duration>]) -> (f64, f64) {
    let rounds = off.len().min(on.len());
    if rounds == 0 {
        return (f64::NAN, f64::NAN);
    }
    // splitmix64 from a fixed seed: the same figures give the same interval.
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut costs: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let picks: Vec<usize> = (0..rounds).map(|_| (next() % rounds as u64) as usize).collect();
            let pooled = |blocks: &[Vec<Duration>]| -> Vec<Duration> {
                picks.iter().flat_map(|&round| blocks[round].iter().copied()).collect()
            };
            p99_ms(&mut pooled(on)) - p99_ms(&mut pooled(off))
        })
        .collect();
    costs.sort_by(f64::total_cmp);
    (costs[RESAMPLES * 5 / 100], costs[RESAMPLES * 95 / 100 - 1])
}

/// A layer's cost at p99.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Cost {
    /// Layer-on p99 − layer-off p99.
    pub(crate) ms: f64,
    /// Layer-on p99 ÷ layer-off p99.
    pub(crate) ratio: f64,
}

impl Cost {
    pub(crate) fn new(off_p99_ms: f64, on_p99_ms: f64) -> Self {
        Self { ms: on_p99_ms - off_p99_ms, ratio: on_p99_ms / off_p99_ms }
    }

    /// At most `limit_ms`; NaN (no figures) is not.
    pub(crate) fn within(&self, limit_ms: f64) -> bool {
        self.ms <= limit_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_is_the_p99_difference_and_ratio() {
        let cost = Cost::new(5.0, 5.2);
        assert!((cost.ms - 0.2).abs() < 1e-9 && (cost.ratio - 1.04).abs() < 1e-9);
        assert!(cost.within(0.3));
        assert!(Cost::new(5.0, 5.3).within(0.3), "the limit itself passes");
        assert!(!Cost::new(5.0, 5.31).within(0.3));
        assert!(!Cost::new(5.0, 5.2 + 1e-6).within(0.2));
        assert!(Cost::new(5.0, 4.0).within(0.3), "the layer faster than none (noise) passes");
        for cost in [Cost::new(f64::NAN, 1.0), Cost::new(1.0, f64::NAN)] {
            assert!(!cost.within(0.3), "{cost:?}");
        }
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let mut latencies: Vec<Duration> = (1..=200).rev().map(Duration::from_millis).collect();
        assert_eq!(p99_ms(&mut latencies), 198.0);
        let m = Measurement {
            latencies: (1..=200).map(Duration::from_millis).collect(),
            seconds: 1.0,
            worst_per_second: Vec::new(),
        };
        assert_eq!(m.percentile_ms(99.0), 198.0);
        assert!(p99_ms(&mut []).is_nan());
    }

    #[test]
    fn the_interval_holds_a_shift_and_spreads_with_the_noise() {
        let block = |base: u64, slow: u64| -> Vec<Duration> {
            (0..100).map(|i| Duration::from_micros(if i == 99 { slow } else { base + i })).collect()
        };
        // Every round: on = off + 0.2 ms throughout.
        let off: Vec<_> = (0..9).map(|_| block(1000, 5000)).collect();
        let on: Vec<_> = (0..9).map(|_| block(1200, 5200)).collect();
        let (low, high) = cost_interval(&off, &on);
        assert!((low - 0.2).abs() < 1e-9 && (high - 0.2).abs() < 1e-9, "{low} {high}");
        // One round whose blocks both met a stall: still paired, the
        // interval stays around the shift but widens.
        let mut off = off;
        let mut on = on;
        off[4] = block(1000, 40_000).into_iter().map(|d| d * 3).collect();
        on[4] = block(1200, 9_000).into_iter().map(|d| d * 3).collect();
        let (low, high) = cost_interval(&off, &on);
        assert!(low <= 0.2 && high >= 0.2 && low < high, "{low} {high}");
        assert!(cost_interval(&[], &[]).0.is_nan());
    }

    #[test]
    fn the_rounds_say_how_they_ran() {
        let schedule = Schedule { rate: 500, duration_secs: 5, warmup_secs: 1 };
        let blocks = Rounds { rounds: 9, interleave: false };
        assert_eq!(
            blocks.describe(&schedule, 3),
            "one unmeasured block per variant, then 9 rounds of 1s warm-up + 5s measured per variant, the order of \
             the three rotated every round"
        );
        let interleaved = Rounds { rounds: 9, interleave: true };
        assert_eq!(
            interleaved.describe(&schedule, 3),
            "one unmeasured block, then 9 rounds of 1s warm-up + 15s measured, the calls going to the three in turn \
             (each at a third of the rate; which comes first rotated every round)"
        );
    }

    #[tokio::test]
    async fn interleaved_rounds_deal_the_calls_to_the_arms_in_turn() {
        // 2 arms, 1 round, 1 s each at 100/s in all: 200 calls in one
        // block of 2 s, every other one to each arm.
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let arms = [Arm { label: "a", tag: "a" }, Arm { label: "b", tag: "b" }];
        let schedule = Schedule { rate: 100, duration_secs: 1, warmup_secs: 0 };
        let record = sent.clone();
        let comparison =
            compare(&schedule, &Rounds { rounds: 1, interleave: true }, arms, "t", move |arm, order_id, i| {
                record.lock().unwrap().push((arm, order_id, i));
                async { Ok(()) }
            })
            .await
            .unwrap();
        let sent = sent.lock().unwrap();
        assert_eq!(sent.len(), 200);
        assert!(sent.iter().all(|(arm, order_id, i)| *arm == i % 2 && *order_id == format!("t-0ab-{i}")));
        for arm in 0..2 {
            assert_eq!(comparison.blocks[arm].len(), 1);
            assert_eq!(comparison.measurement(arm).latencies.len(), 100);
        }
    }

    #[test]
    fn each_variant_takes_each_slot_in_turn() {
        assert_eq!(rotation(['g', 'r'], 0), ['g', 'r']);
        assert_eq!(rotation(['g', 'r'], 1), ['r', 'g']);
        assert_eq!(rotation(['g', 'r'], 2), ['g', 'r']);
        let rounds: Vec<_> = (0..3).map(|r| rotation(['o', 'j', 'k'], r)).collect();
        assert_eq!(rounds, [['o', 'j', 'k'], ['j', 'k', 'o'], ['k', 'o', 'j']]);
    }

    #[test]
    fn requests_are_new_orders_with_their_own_request_id() {
        let request = create_order_request("o-4".into(), 4);
        assert_eq!((request.order_id.as_str(), request.request_id.as_str()), ("o-4", "o-4"));
        assert_eq!(request.items.len(), 2);
    }

    #[tokio::test]
    async fn open_loop_keeps_the_schedule_and_counts_failures() {
        // 200/s for 0.1 s after 0.05 s of warm-up: 30 sends, 20 measured;
        // every third fails.
        let block = open_loop(200, Duration::from_millis(50), Duration::from_millis(100), |i| async move {
            if i % 3 == 0 { Err(anyhow::anyhow!("call {i} failed")) } else { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(block.failed, 10);
        assert_eq!(block.first_error.as_deref(), Some("call 0 failed"));
        assert!(block.check("CreateOrder").unwrap_err().to_string().contains("10 calls failed"));
        // Measured: i in 10..30 that did not fail.
        assert_eq!(block.latencies.len(), (10..30).filter(|i| i % 3 != 0).count());
        assert_eq!(block.send_lag.len(), block.latencies.len());
        assert_eq!(block.calls, (10..30).filter(|i| i % 3 != 0).collect::<Vec<_>>());
        // Dealt to two variants in turn: the even calls, then the odd ones.
        let [even, odd]: [Block; 2] = block.deal(2).try_into().unwrap();
        assert_eq!((even.calls, odd.calls), (vec![10, 14, 16, 20, 22, 26, 28], vec![11, 13, 17, 19, 23, 25, 29]));
        assert_eq!((even.latencies.len(), odd.send_lag.len()), (7, 7));
    }

    #[tokio::test]
    async fn sends_do_not_wait_for_answers() {
        // Calls that take 20 ms each, sent every 5 ms: 10 sends take about
        // 50 ms, not 200.
        let started = Instant::now();
        let block = open_loop(200, Duration::ZERO, Duration::from_millis(50), |_| async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(block.latencies.len(), 10);
        assert!(block.latencies.iter().all(|l| *l >= Duration::from_millis(20)));
        assert!(started.elapsed() < Duration::from_millis(150), "the sends waited for the answers");
    }

    #[tokio::test]
    async fn latency_counts_from_the_scheduled_time() {
        // The first send holds the sender for 30 ms: the calls due
        // meanwhile go out late, and their lateness is latency even though
        // each answers at once.
        let block = open_loop(200, Duration::ZERO, Duration::from_millis(50), |i| {
            if i == 0 {
                std::thread::sleep(Duration::from_millis(30));
            }
            async { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(block.latencies.len(), 10);
        let slowest = block.latencies.iter().max().unwrap();
        assert!(*slowest >= Duration::from_millis(20), "slowest {slowest:?}");
        assert!(block.send_lag.iter().max().unwrap() >= &Duration::from_millis(20));
    }
}
