//! Logging: human-readable or JSON lines, filtered by the configured
//! directive (never by an environment variable read here).

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
