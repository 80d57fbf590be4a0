//! `[projector]`: how the projectors of a process work.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::ProjectorOptions;

/// How the projectors work (`[projector]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    /// Most events in one transaction.
    pub batch_size: usize,
    /// Longest a batch keeps applying before it commits.
    pub batch_time_ms: u64,
    /// Attempts of an event before it is parked.
    pub max_attempts: u32,
    /// Where the events come from: `log` (the store, the default) or
    /// `kafka` (the relay's topics; needs relay.brokers and registry.url).
    pub source: SourceKind,
}

/// Where the projectors take their events from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The event store's log.
    Log,
    /// The relay's Kafka topics.
    Kafka,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        let d = ProjectorOptions::default();
        Self {
            batch_size: d.batch_size,
            batch_time_ms: d.batch_time.as_millis() as u64,
            max_attempts: d.max_attempts,
            source: SourceKind::Log,
        }
    }
}

impl ProjectorConfig {
    /// The options of each projector.
    pub fn options(&self) -> ProjectorOptions {
        ProjectorOptions {
            batch_size: self.batch_size.max(1),
            batch_time: Duration::from_millis(self.batch_time_ms),
            max_attempts: self.max_attempts.max(1),
            ..ProjectorOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_engines_and_zeroes_are_raised_to_one() {
        let defaults = ProjectorOptions::default();
        let options = ProjectorConfig::default().options();
        assert_eq!(
            (options.batch_size, options.batch_time, options.max_attempts),
            (defaults.batch_size, defaults.batch_time, defaults.max_attempts)
        );
        let zeroes = ProjectorConfig { batch_size: 0, max_attempts: 0, ..ProjectorConfig::default() }.options();
        assert_eq!((zeroes.batch_size, zeroes.max_attempts), (1, 1));
    }

    #[test]
    fn the_source_is_named_in_lowercase_and_unknown_keys_are_refused() {
        let config: ProjectorConfig = serde_json::from_str(r#"{"source": "kafka", "batch_size": 7}"#).unwrap();
        assert_eq!((config.source, config.batch_size), (SourceKind::Kafka, 7));
        assert_eq!(config.max_attempts, ProjectorConfig::default().max_attempts, "missing keys keep their default");
        assert!(serde_json::from_str::<ProjectorConfig>(r#"{"batch_sise": 7}"#).is_err());
    }
}
