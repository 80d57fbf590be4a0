//! Logging and tracing: human-readable or JSON lines, filtered by the
//! configured directive (never by an environment variable read here), each
//! JSON line with the service, the trace and span ids and the correlation
//! id of the work it belongs to; spans carry OpenTelemetry contexts (W3C
//! trace context through calls, events and Kafka, see [`crate::trace`]) and
//! are exported over OTLP when `[tracing] otlp_endpoint` is set. And the
//! process's metrics recorder (Prometheus), rendered at the admin
//! listener's `/metrics`.

use std::{
    collections::BTreeMap,
    sync::{Mutex, OnceLock},
    time::Duration,
};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    trace::{Sampler, SdkTracerProvider},
};
use tracing::{Event, Subscriber, field::Field};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::LevelFilter,
    fmt::{
        self, FmtContext, FormatEvent, FormatFields, FormattedFields,
        format::{JsonFields, Writer},
        time::{FormatTime, SystemTime},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
};

use crate::{
    Error, Result,
    config::{LogConfig, LogFormat, TracingConfig},
};

/// What [`init`] installed: flushes and stops the span export when
/// [`Telemetry::shutdown`] is called (or it is dropped).
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Exports the spans still buffered (within the exporter's timeout).
    pub fn shutdown(self) {
        let _ = self.provider.shutdown();
    }
}

/// Install the global subscriber: logs as `log` says, spans with
/// OpenTelemetry contexts for `service`, exported over OTLP when `tracing`
/// names an endpoint. Call once, from the binary, inside its Tokio runtime
/// (the exporter's connection runs on it).
pub fn init(log: &LogConfig, tracing: &TracingConfig, service: &str) -> Result<Telemetry> {
    let filter =
        EnvFilter::try_new(&log.filter).map_err(|e| Error::Logging(format!("bad log filter {:?}: {e}", log.filter)))?;
    let service = tracing.service_name.clone().unwrap_or_else(|| service.to_owned());
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(tracing.sampling_ratio.clamp(0.0, 1.0))));
    let mut provider = SdkTracerProvider::builder()
        .with_sampler(sampler)
        .with_resource(Resource::builder().with_service_name(service.clone()).build());
    if let Some(endpoint) = &tracing.otlp_endpoint {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint.clone())
            .with_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Config(format!("tracing.otlp_endpoint: {e}")))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    // Spans of eventfold's own work, whatever the log filter says: their
    // contexts travel in events and messages.
    let spans =
        tracing_opentelemetry::layer().with_tracer(provider.tracer("eventfold")).with_filter(LevelFilter::INFO).boxed();
    let lines = match log.format {
        LogFormat::Pretty => fmt::layer().with_writer(std::io::stderr).with_filter(filter).boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(std::io::stderr)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLines { service })
            .with_filter(filter)
            .boxed(),
    };
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(vec![spans, lines]))
        .map_err(|e| Error::Logging(e.to_string()))?;
    Ok(Telemetry { provider })
}

/// One JSON object per line: `timestamp`, `level`, `target`, `service`,
/// the event's fields (`message` among them), `span` (the current span's
/// name), `trace_id` and `span_id` (of the current span's OpenTelemetry
/// context) and `correlation_id` (of the nearest span that has one).
struct JsonLines {
    service: String,
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        let mut line = serde_json::Map::new();
        let mut timestamp = String::new();
        SystemTime.format_time(&mut Writer::new(&mut timestamp))?;
        line.insert("timestamp".into(), timestamp.into());
        line.insert("level".into(), event.metadata().level().as_str().into());
        line.insert("target".into(), event.metadata().target().into());
        line.insert("service".into(), self.service.clone().into());
        event.record(&mut Fields(&mut line));
        if let Some(span) = ctx.lookup_current() {
            line.insert("span".into(), span.name().into());
            let context = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            });
            if let Some(context) = context {
                let otel = context.span();
                let ids = otel.span_context();
                if ids.is_valid() {
                    line.insert("trace_id".into(), ids.trace_id().to_string().into());
                    line.insert("span_id".into(), ids.span_id().to_string().into());
                }
            }
            // The nearest span that recorded a correlation id (the command's).
            let correlation = span.scope().find_map(|span| {
                let extensions = span.extensions();
                let fields = extensions.get::<FormattedFields<N>>()?;
                let fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(fields).ok()?;
                fields.get("correlation_id").filter(|v| v.as_str().is_some_and(|s| !s.is_empty())).cloned()
            });
            if let Some(correlation) = correlation {
                line.entry("correlation_id").or_insert(correlation);
            }
        }
        let text = serde_json::to_string(&line).map_err(|_| std::fmt::Error)?;
        writeln!(writer, "{text}")
    }
}

/// Collects an event's fields into a JSON object.
struct Fields<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl tracing::field::Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), value.into());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), format!("{value:?}").into());
    }
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
