//! Logging: human-readable or JSON lines, filtered by the configured
//! directive (never by an environment variable read here); and the
//! process's metrics recorder (Prometheus), rendered at the admin
//! listener's `/metrics`.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::{EnvFilter, fmt};

use crate::{
    Error, Result,
    config::{LogConfig, LogFormat},
};

/// Install the global subscriber. Call once, from the binary.
pub fn init(config: &LogConfig) -> Result<()> {
    let filter = EnvFilter::try_new(&config.filter)
        .map_err(|e| Error::Logging(format!("bad log filter {:?}: {e}", config.filter)))?;
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let installed = match config.format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
    installed.map_err(|e| Error::Logging(e.to_string()))
}

/// The process's Prometheus recorder, once installed.
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// Install the global metrics recorder (Prometheus text exposition): every
/// `metrics::counter!`/`histogram!`/`gauge!` of the process is kept from
/// now on and rendered by [`render_metrics`]. Call once, from the binary,
/// inside its Tokio runtime (a task keeps the histograms' windows short).
///
/// # Errors
///
/// Another recorder is installed already.
pub fn install_metrics() -> Result<()> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), SECONDS_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_size".to_owned()), SIZE_BUCKETS))
        .map_err(|e| Error::Logging(format!("cannot set the histogram buckets: {e}")))?
        .install_recorder()
        .map_err(|e| Error::Logging(format!("cannot install the metrics recorder: {e}")))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    let _ = METRICS.set(handle);
    Ok(())
}

/// Histogram buckets of every `…_seconds` metric: 0.5 ms to 30 s.
const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// Histogram buckets of every `…_size` metric (counts: appends in a group
/// commit, events in a batch).
const SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];

/// A gauge or counter read when `/metrics` is scraped (pool sizes and the
/// like, which nothing records as they change).
type Sample = Box<dyn Fn() + Send + Sync>;

/// What [`render_metrics`] samples first, by name.
static SAMPLES: Mutex<BTreeMap<String, Sample>> = Mutex::new(BTreeMap::new());

/// Run `sample` (which sets gauges or absolute counters) before every
/// rendering of `/metrics`, in place of what was registered under `name`.
pub fn on_scrape(name: impl Into<String>, sample: impl Fn() + Send + Sync + 'static) {
    SAMPLES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.into(), Box::new(sample));
}

/// Every metric of the process in the Prometheus text format; `None` when
/// no recorder is installed (in-process servers of tests and benches).
pub fn render_metrics() -> Option<String> {
    let handle = METRICS.get()?;
    for sample in SAMPLES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values() {
        sample();
    }
    Some(handle.render())
}
