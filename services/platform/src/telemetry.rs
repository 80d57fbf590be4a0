//! Logging: human-readable or JSON lines, filtered by the configured
//! directive (never by an environment variable read here); and the
//! process's metrics recorder (Prometheus), rendered at the admin
//! listener's `/metrics`.

use std::{sync::OnceLock, time::Duration};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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

/// Every metric of the process in the Prometheus text format; `None` when
/// no recorder is installed (in-process servers of tests and benches).
pub fn render_metrics() -> Option<String> {
    METRICS.get().map(PrometheusHandle::render)
}
