//! Logs and traces.
//!
//! Logs: text or JSON lines, one line per state change, never event texts or secrets.
//!
//! Traces (OpenTelemetry through `tracing-opentelemetry`): each event gets a consumer span that is
//! a child of the trace context in its input's headers and lasts from consume to the
//! acknowledgement of its output; each inference batch gets a span linked to the events it
//! carries. The event's context is written into its output's headers. Spans are always made,
//! so that the context passes on downstream; exporting them (OTLP/HTTP) is `otel.traces`.

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{filter_fn, FilterExt, LevelFilter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, OtelConfig, OtlpProtocol};

/// Target of the spans that become OpenTelemetry spans; kept out of the log lines, where a span
/// per event would only repeat what the periodic counters say.
pub const SPAN_TARGET: &str = "reranker::otel";

/// Keeps the exporters alive; flushes what they hold on drop.
pub struct Telemetry {
    tracer_provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.tracer_provider.shutdown() {
            tracing::debug!(error = %e, "trace exporter shutdown");
        }
    }
}

pub fn resource(otel: &OtelConfig) -> Resource {
    Resource::builder()
        .with_service_name(otel.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build()
}

fn protocol(p: OtlpProtocol) -> Protocol {
    match p {
        OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
        OtlpProtocol::HttpJson => Protocol::HttpJson,
    }
}

/// The signal's URL under `otel.endpoint`, or `None` to let `OTEL_EXPORTER_OTLP_*` decide.
fn signal_url(otel: &OtelConfig, path: &str) -> Option<String> {
    (!otel.endpoint.is_empty()).then(|| format!("{}/{path}", otel.endpoint.trim_end_matches('/')))
}

pub fn span_exporter(otel: &OtelConfig) -> anyhow::Result<opentelemetry_otlp::SpanExporter> {
    let mut b = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(protocol(otel.protocol));
    if let Some(url) = signal_url(otel, "v1/traces") {
        b = b.with_endpoint(url);
    }
    Ok(b.build()?)
}

pub fn metric_exporter(otel: &OtelConfig) -> anyhow::Result<opentelemetry_otlp::MetricExporter> {
    let mut b = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(protocol(otel.protocol));
    if let Some(url) = signal_url(otel, "v1/metrics") {
        b = b.with_endpoint(url);
    }
    Ok(b.build()?)
}

/// Installs the global subscriber: the log layer, and the OpenTelemetry layer for spans of
/// `SPAN_TARGET` (plus warnings and errors, which become span events).
pub fn init(log: &LogConfig, otel: &OtelConfig) -> anyhow::Result<Telemetry> {
    let env_filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Every filter states its most verbose level: without the hints the subscriber's level would
    // be TRACE, and each `log` record of a dependency (rdkafka, tokenizers) would be dispatched
    // only to be dropped — a few percent of the CPU in a profile of the benchmark.
    let not_spans =
        filter_fn(|m| m.target() != SPAN_TARGET).with_max_level_hint(LevelFilter::TRACE);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match log.format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Text => fmt.boxed(),
    }
    .with_filter(env_filter.and(not_spans));

    let mut provider = SdkTracerProvider::builder().with_resource(resource(otel));
    if otel.traces {
        provider = provider.with_batch_exporter(span_exporter(otel)?);
    }
    let tracer_provider = provider.build();
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(tracer_provider.tracer("reranker"))
        .with_filter(
            filter_fn(|m| {
                m.target() == SPAN_TARGET
                    || (m.is_event()
                        && *m.level() <= tracing::Level::WARN
                        && m.target().starts_with("reranker"))
            })
            .with_max_level_hint(LevelFilter::INFO),
        );
    // A second init (tests, demo) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel_layer)
        .try_init();
    if otel.traces {
        tracing::info!(endpoint = %otel.endpoint, protocol = ?otel.protocol, "exporting traces over OTLP");
    }
    Ok(Telemetry { tracer_provider })
}

/// Kafka headers as a carrier, for both directions.
struct Headers<'a>(&'a mut Vec<(String, Vec<u8>)>);

impl Injector for Headers<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.retain(|(k, _)| !k.eq_ignore_ascii_case(key));
        self.0.push((key.to_string(), value.into_bytes()));
    }
}

struct ReadHeaders<'a>(&'a [(String, Vec<u8>)]);

impl Extractor for ReadHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_str()).collect()
    }
}

/// Where an event came from, for its span's attributes.
pub struct InputRef<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub group: &'a str,
    pub payload_bytes: usize,
}

/// The event's span, a child of the trace context in `input_headers` (a new trace when there is
/// none or it is malformed). Messaging semantic conventions for a Kafka "process" span.
pub fn event_span(src: &InputRef<'_>, input_headers: &[(String, Vec<u8>)]) -> Span {
    let parent = TraceContextPropagator::new().extract(&ReadHeaders(input_headers));
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "process",
        "otel.name" = format!("process {}", src.topic),
        "otel.kind" = "consumer",
        "otel.status_code" = tracing::field::Empty,
        "otel.status_description" = tracing::field::Empty,
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "process",
        "messaging.destination.name" = src.topic,
        "messaging.destination.partition.id" = src.partition.to_string(),
        "messaging.kafka.offset" = src.offset,
        "messaging.consumer.group.name" = src.group,
        "messaging.message.body.size" = src.payload_bytes as i64,
        "error.type" = tracing::field::Empty,
        "reranker.request_id" = tracing::field::Empty,
        "reranker.candidates" = tracing::field::Empty,
        "reranker.pairs" = tracing::field::Empty,
    );
    // Without the OpenTelemetry layer (a library user's own subscriber) this is a no-op.
    let _ = span.set_parent(parent);
    span
}

/// Marks the event's span as failed with the dead-letter code.
pub fn record_error(span: &Span, code: &str, message: &str) {
    span.record("otel.status_code", "ERROR");
    span.record("otel.status_description", message);
    span.record("error.type", code);
}

/// The span's context, invalid when no OpenTelemetry layer is installed.
pub fn span_context(span: &Span) -> SpanContext {
    span.context().span().span_context().clone()
}

/// Writes the span's context into outgoing headers, in place of the input's, for the header
/// names `allowed` lets through (`output.propagate_headers`). Leaves the headers as they are
/// when there is no valid context, so that the input's context still passes through.
pub fn inject(span: &Span, allowed: &[String], headers: &mut Vec<(String, Vec<u8>)>) {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return;
    }
    let mut fresh = Vec::new();
    TraceContextPropagator::new().inject_context(&cx, &mut Headers(&mut fresh));
    for (k, v) in fresh {
        if allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(&k))
        {
            Headers(headers).set(&k, String::from_utf8(v).unwrap_or_default());
        }
    }
}

/// Attributes of one inference batch's span.
pub struct BatchInfo {
    pub events: usize,
    pub pairs: usize,
    pub seq_len: usize,
    pub real_tokens: usize,
    pub reason: &'static str,
}

/// The span of one inference batch, linked to the spans of the events whose pairs it carries.
pub fn batch_span(info: &BatchInfo, links: &[SpanContext]) -> Span {
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "infer",
        "otel.name" = "infer",
        "otel.kind" = "internal",
        "otel.status_code" = tracing::field::Empty,
        "otel.status_description" = tracing::field::Empty,
        "messaging.batch.message_count" = info.events as i64,
        "reranker.batch.pairs" = info.pairs as i64,
        "reranker.batch.sequence_length" = info.seq_len as i64,
        "reranker.batch.tokens" = info.real_tokens as i64,
        "reranker.batch.close_reason" = info.reason,
    );
    for l in links.iter().filter(|l| l.is_valid()) {
        span.add_link(l.clone());
    }
    span
}
