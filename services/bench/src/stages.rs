//! Where a command's time goes: the histograms the services record as they
//! serve (gRPC handling, the command bus, the store's append, the group
//! commit), captured sample by sample in this process, so that a run can
//! print each stage's percentiles beside the end-to-end latency.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use ::metrics::{Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// The samples of every histogram, by name (labels merged).
#[derive(Clone, Default)]
pub(crate) struct Capture {
    histograms: Arc<Mutex<HashMap<String, Arc<Samples>>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).push(value);
    }
}

impl Capture {
    /// Installs a new capture as the process's recorder.
    pub(crate) fn install() -> anyhow::Result<Self> {
        let capture = Self::default();
        ::metrics::set_global_recorder(capture.clone())
            .map_err(|_| anyhow::anyhow!("a metrics recorder is installed already"))?;
        Ok(capture)
    }

    /// Forgets every sample so far (the warm-up's).
    pub(crate) fn clear(&self) {
        for samples in self.histograms.lock().unwrap_or_else(PoisonError::into_inner).values() {
            samples.0.lock().unwrap_or_else(PoisonError::into_inner).clear();
        }
    }

    /// The samples of `name` since the last [`clear`](Self::clear), sorted.
    pub(crate) fn sorted(&self, name: &str) -> Vec<f64> {
        let samples = self.histograms.lock().unwrap_or_else(PoisonError::into_inner).get(name).cloned();
        let mut values =
            samples.map(|s| s.0.lock().unwrap_or_else(PoisonError::into_inner).clone()).unwrap_or_default();
        values.sort_by(f64::total_cmp);
        values
    }
}

/// The `p`th percentile (nearest rank) of sorted `values`.
pub(crate) fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values.get(rank.clamp(1, values.len()) - 1).copied()
}

impl Recorder for Capture {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
        Counter::noop()
    }

    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let samples = Arc::clone(
            self.histograms.lock().unwrap_or_else(PoisonError::into_inner).entry(key.name().to_owned()).or_default(),
        );
        Histogram::from_arc(samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn samples_are_kept_by_name_until_cleared() {
        let capture = Capture::default();
        ::metrics::with_local_recorder(&capture, || {
            ::metrics::histogram!("stage", "label" => "a").record(2.0);
            ::metrics::histogram!("stage", "label" => "b").record(1.0);
            ::metrics::histogram!("other").record(5.0);
        });
        assert_eq!(capture.sorted("stage"), [1.0, 2.0]);
        assert_eq!(capture.sorted("other"), [5.0]);
        capture.clear();
        assert!(capture.sorted("stage").is_empty());
    }
}
