//! What the open-loop benches of single gRPC calls share (`gateway`,
//! `auth`): a sender at a fixed rate timed by a thread, latency from the
//! scheduled send time, blocks pooled per variant, the order of the
//! variants rotated from round to round, and a failed call failing the run.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use eventfold_proto::{
    common::Money,
    orders::{CreateOrderRequest, OrderItem},
};

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

#[cfg(test)]
mod tests {
    use super::*;

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
