//! OpenTelemetry instruments, exported as Prometheus text on `/metrics` (see [`super::http`]).
//! Events reach them through [`super::recorder::Recorder`], never directly.
//!
//! Instruments are created once per worker and shared through `Arc<Metrics>`; hot-path recordings
//! carry no attributes (the SDK's lock-free / single-lock no-attribute path) and never allocate.
//! Gauges are observable: their callbacks read atomics or the latest librdkafka statistics at
//! scrape time, so nothing is recorded for them on the hot path.
//!
//! OpenTelemetry name (unit) → Prometheus name:
//!
//! | instrument | Prometheus |
//! | --- | --- |
//! | `reranker.events.consumed` (`{event}`) | `reranker_events_consumed_total` |
//! | `reranker.events.produced` (`{event}`) | `reranker_events_produced_total` |
//! | `reranker.events.dead_lettered` (`{event}`, `error.code`) | `reranker_events_dead_lettered_total{error_code}` |
//! | `reranker.pairs.scored` (`{pair}`) | `reranker_pairs_scored_total` |
//! | `reranker.input.unknown_fields` (`{field}`, `field`) | `reranker_input_unknown_fields_total{field}` |
//! | `reranker.inference.retries` (`{run}`) | `reranker_inference_retries_total` |
//! | `reranker.inference.split_runs` (`{run}`) | `reranker_inference_split_runs_total` |
//! | `reranker.deadline.missed` (`{event}`, `action`) | `reranker_deadline_missed_total{action}` |
//! | `reranker.batch.token_budget` (`{token}`, gauge) | `reranker_batch_token_budget` |
//! | `reranker.batch.size` (`{pair}`) | `reranker_batch_size_bucket` ... |
//! | `reranker.batch.tokens` (`{token}`, padded) | `reranker_batch_tokens_bucket` ... |
//! | `reranker.batch.padding` (`1`) | `reranker_batch_padding_ratio_bucket` ... |
//! | `reranker.queue.wait.duration` (`s`, per pair) | `reranker_queue_wait_duration_seconds_bucket` ... |
//! | `reranker.tokenization.duration` (`s`, per event) | `reranker_tokenization_duration_seconds_bucket` ... |
//! | `reranker.inference.duration` (`s`, per batch) | `reranker_inference_duration_seconds_bucket` ... |
//! | `reranker.event.duration` (`s`, record timestamp → output acknowledged) | `reranker_event_duration_seconds_bucket` ... |
//! | `reranker.consumer.lag` (`{message}`, per partition) | `reranker_consumer_lag{messaging_destination_name, messaging_destination_partition_id}` |
//! | `reranker.consumer.assigned_partitions` | `reranker_consumer_assigned_partitions` |
//! | `reranker.consumer.paused_partitions` | `reranker_consumer_paused_partitions` |
//! | `reranker.passage_cache.hits` / `.misses` (`{passage}`) | `reranker_passage_cache_hits_total` / `_misses_total` |
//! | `reranker.passage_cache.size` (bytes) | `reranker_passage_cache_size_bytes` |
//! | `reranker.consumer.stalled_partitions` | `reranker_consumer_stalled_partitions` |
//! | `reranker.inflight.pairs` (`{pair}`) | `reranker_inflight_pairs` |
//! | `reranker.model.info` (=1; `model.name`, `model.revision`, `device`) | `reranker_model_info{model_name, model_revision, device}` |

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::health::Health;
use super::telemetry;
use crate::config::OtelConfig;
use crate::decode::ErrorCode;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider, ObservableGauge};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
const EVENT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];
const PAIR_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];
const TOKEN_BUCKETS: &[f64] = &[
    64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
];
const RATIO_BUCKETS: &[f64] = &[0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// One inference batch that ran, successfully or not.
#[derive(Clone, Copy)]
pub struct BatchRun<'a> {
    pub rows: usize,
    pub seq_len: usize,
    pub real_tokens: usize,
    pub started: Instant,
    pub elapsed: Duration,
    /// When each pair entered the batcher.
    pub enqueued: &'a [Instant],
}

/// Labels of the `reranker.model.info` gauge.
pub struct ModelLabels<'a> {
    pub name: &'a str,
    pub revision: &'a str,
    pub device: &'a str,
}

pub struct Metrics {
    registry: prometheus::Registry,
    provider: SdkMeterProvider,
    events_consumed: Counter<u64>,
    events_produced: Counter<u64>,
    events_dead_lettered: Counter<u64>,
    pairs_scored: Counter<u64>,
    unknown_fields: Counter<u64>,
    inference_retries: Counter<u64>,
    inference_split_runs: Counter<u64>,
    deadline_missed: Counter<u64>,
    token_budget: opentelemetry::metrics::Gauge<u64>,
    batch_size: Histogram<u64>,
    batch_tokens: Histogram<u64>,
    batch_padding: Histogram<f64>,
    queue_wait: Histogram<f64>,
    tokenization: Histogram<f64>,
    inference: Histogram<f64>,
    event_duration: Histogram<f64>,
    _gauges: (Vec<ObservableGauge<u64>>, ObservableGauge<i64>),
    _passage_cache: Vec<opentelemetry::metrics::ObservableCounter<u64>>,
    _passage_cache_bytes: Option<ObservableGauge<u64>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Creates the instruments and their Prometheus registry. `inflight_pairs` is read at scrape
    /// time.
    pub fn new(
        model: ModelLabels<'_>,
        health: Arc<Health>,
        inflight_pairs: impl Fn() -> u64 + Send + Sync + 'static,
        otel: &OtelConfig,
    ) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()?;
        let mut provider = SdkMeterProvider::builder()
            .with_reader(exporter)
            .with_resource(telemetry::resource(otel));
        if otel.metrics {
            provider = provider.with_reader(
                PeriodicReader::builder(telemetry::metric_exporter(otel)?)
                    .with_interval(Duration::from_millis(otel.metrics_interval_ms))
                    .build(),
            );
        }
        let provider = provider.build();
        let meter = provider.meter("reranker");

        let counter = |name: &'static str, unit: &'static str, desc: &'static str| {
            meter
                .u64_counter(name)
                .with_unit(unit)
                .with_description(desc)
                .build()
        };
        let seconds = |name: &'static str, desc: &'static str, buckets: &[f64]| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(desc)
                .with_boundaries(buckets.to_vec())
                .build()
        };
        let gauge = |name: &'static str,
                     unit: &'static str,
                     desc: &'static str,
                     read: Box<dyn Fn() -> u64 + Send + Sync>| {
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(desc)
                .with_callback(move |o| o.observe(read(), &[]))
                .build()
        };

        let model_attrs = [
            KeyValue::new("model.name", model.name.to_string()),
            KeyValue::new("model.revision", model.revision.to_string()),
            KeyValue::new("device", model.device.to_string()),
        ];
        let gauges = vec![
            gauge(
                "reranker.consumer.assigned_partitions",
                "{partition}",
                "Input partitions assigned to this worker",
                Box::new({
                    let h = health.clone();
                    move || h.assigned() as u64
                }),
            ),
            gauge(
                "reranker.consumer.paused_partitions",
                "{partition}",
                "Input partitions paused by backpressure (flow.max_inflight_pairs)",
                Box::new({
                    let h = health.clone();
                    move || h.paused_partitions() as u64
                }),
            ),
            gauge(
                "reranker.consumer.stalled_partitions",
                "{partition}",
                "Assigned partitions behind their high watermark whose position has not moved for kafka.stall_warn_ms",
                Box::new({
                    let h = health.clone();
                    move || h.stalled().len() as u64
                }),
            ),
            gauge(
                "reranker.inflight.pairs",
                "{pair}",
                "Pairs admitted but not yet produced",
                Box::new(inflight_pairs),
            ),
            meter
                .u64_observable_gauge("reranker.model.info")
                .with_description("The loaded model and execution device (value is always 1)")
                .with_callback(move |o| o.observe(1, &model_attrs))
                .build(),
        ];
        let lag = meter
            .i64_observable_gauge("reranker.consumer.lag")
            .with_unit("{message}")
            .with_description(
                "Messages behind the partition's high watermark, per assigned partition (librdkafka statistics)",
            )
            .with_callback(move |o| {
                health.each_lag(|lag, attrs| o.observe(lag, attrs));
            })
            .build();

        Ok(Self {
            events_consumed: counter(
                "reranker.events.consumed",
                "{event}",
                "Input records taken from Kafka",
            ),
            events_produced: counter(
                "reranker.events.produced",
                "{event}",
                "Reranked outputs acknowledged by Kafka",
            ),
            events_dead_lettered: counter(
                "reranker.events.dead_lettered",
                "{event}",
                "Dead letters acknowledged by Kafka, by error.code",
            ),
            pairs_scored: counter(
                "reranker.pairs.scored",
                "{pair}",
                "(query, passage) pairs scored by the model",
            ),
            unknown_fields: counter(
                "reranker.input.unknown_fields",
                "{field}",
                "Input fields this worker does not know and ignored (input.strict = false), by name; candidate fields as candidates[].<name>",
            ),
            inference_retries: counter(
                "reranker.inference.retries",
                "{run}",
                "Whole-batch retries after an inference failure (inference.max_retries)",
            ),
            inference_split_runs: counter(
                "reranker.inference.split_runs",
                "{run}",
                "Runs on halves of a failed batch while finding the pairs that fail on their own",
            ),
            deadline_missed: counter(
                "reranker.deadline.missed",
                "{event}",
                "Events whose deadline passed while they waited in the worker, by deadline.action",
            ),
            token_budget: meter
                .u64_gauge("reranker.batch.token_budget")
                .with_unit("{token}")
                .with_description("Current padded-token budget per batch; halved for a while after an out-of-memory failure")
                .build(),
            batch_size: meter
                .u64_histogram("reranker.batch.size")
                .with_unit("{pair}")
                .with_description("Pairs per inference batch")
                .with_boundaries(PAIR_BUCKETS.to_vec())
                .build(),
            batch_tokens: meter
                .u64_histogram("reranker.batch.tokens")
                .with_unit("{token}")
                .with_description("Padded tokens per inference batch (pairs x longest pair)")
                .with_boundaries(TOKEN_BUCKETS.to_vec())
                .build(),
            batch_padding: meter
                .f64_histogram("reranker.batch.padding")
                .with_unit("1")
                .with_description("Fraction of a batch's token slots that are padding")
                .with_boundaries(RATIO_BUCKETS.to_vec())
                .build(),
            queue_wait: seconds(
                "reranker.queue.wait.duration",
                "Time a pair waits in the batcher until its batch starts on the model",
                DURATION_BUCKETS,
            ),
            tokenization: seconds(
                "reranker.tokenization.duration",
                "Time to tokenize one event's pairs",
                DURATION_BUCKETS,
            ),
            inference: seconds(
                "reranker.inference.duration",
                "Model run time per batch",
                DURATION_BUCKETS,
            ),
            event_duration: seconds(
                "reranker.event.duration",
                "From the input record's timestamp to the reranked output's acknowledgement",
                EVENT_BUCKETS,
            ),
            _gauges: (gauges, lag),
            _passage_cache: Vec::new(),
            _passage_cache_bytes: None,
            registry,
            provider,
        })
    }

    pub fn consumed(&self) {
        self.events_consumed.add(1, &[]);
    }

    pub fn scored(&self, pairs: usize) {
        self.pairs_scored.add(pairs as u64, &[]);
    }

    pub fn tokenized(&self, elapsed: Duration) {
        self.tokenization.record(elapsed.as_secs_f64(), &[]);
    }

    pub fn dead_lettered(&self, code: ErrorCode) {
        self.events_dead_lettered
            .add(1, &[KeyValue::new("error.code", code.as_str())]);
    }

    pub fn inference_recovery(&self, retries: u32, split_runs: u32) {
        self.inference_retries.add(retries as u64, &[]);
        self.inference_split_runs.add(split_runs as u64, &[]);
    }

    /// Exports the passage cache's hits, misses and size (`pipeline.passage_cache_mb`), read at
    /// scrape time; the hit ratio is hits / (hits + misses).
    pub fn observe_passage_cache(&mut self, stats: Arc<crate::tokenize::PassageCacheStats>) {
        let meter = self.provider.meter("reranker");
        let count = |name: &'static str, desc: &'static str, hits: bool| {
            let s = stats.clone();
            meter
                .u64_observable_counter(name)
                .with_unit("{passage}")
                .with_description(desc)
                .with_callback(move |o| {
                    let c = if hits { &s.hits } else { &s.misses };
                    o.observe(c.load(std::sync::atomic::Ordering::Relaxed), &[])
                })
                .build()
        };
        self._passage_cache = vec![
            count(
                "reranker.passage_cache.hits",
                "Passages whose encoding came from the cache",
                true,
            ),
            count(
                "reranker.passage_cache.misses",
                "Passages tokenized and then cached",
                false,
            ),
        ];
        let s = stats.clone();
        self._passage_cache_bytes = Some(
            meter
                .u64_observable_gauge("reranker.passage_cache.size")
                .with_unit("By")
                .with_description(
                    "Bytes the passage cache holds (pipeline.passage_cache_mb bounds it)",
                )
                .with_callback(move |o| {
                    o.observe(s.bytes.load(std::sync::atomic::Ordering::Relaxed), &[])
                })
                .build(),
        );
    }

    pub fn deadline_missed(&self, action: &'static str) {
        self.deadline_missed
            .add(1, &[KeyValue::new("action", action)]);
    }

    pub fn token_budget(&self, tokens: usize) {
        self.token_budget.record(tokens as u64, &[]);
    }

    /// One event carried the unknown field `field` (an attribute built once per name).
    pub fn unknown_field(&self, field: &KeyValue) {
        self.unknown_fields.add(1, std::slice::from_ref(field));
    }

    pub fn batch(&self, b: &BatchRun<'_>) {
        let BatchRun {
            rows,
            seq_len,
            real_tokens,
            started,
            elapsed,
            enqueued,
        } = *b;
        let slots = rows * seq_len;
        self.batch_size.record(rows as u64, &[]);
        self.batch_tokens.record(slots as u64, &[]);
        if slots > 0 {
            self.batch_padding
                .record(padding_ratio(real_tokens as u64, slots as u64), &[]);
        }
        self.inference.record(elapsed.as_secs_f64(), &[]);
        for &t in enqueued {
            self.queue_wait
                .record(started.saturating_duration_since(t).as_secs_f64(), &[]);
        }
    }

    /// A reranked output was acknowledged; `record_ts_ms` is the input record's timestamp.
    pub fn produced(&self, record_ts_ms: Option<i64>, now_ms: i64) {
        self.events_produced.add(1, &[]);
        if let Some(ts) = record_ts_ms.filter(|&t| t > 0) {
            // Producer clocks may run ahead: never negative.
            let ms = now_ms.saturating_sub(ts).max(0);
            self.event_duration.record(ms as f64 / 1e3, &[]);
        }
    }

    /// The Prometheus text exposition of every instrument.
    pub fn encode(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# cannot encode metrics: {e}\n"))
    }
}

/// The one definition of the padding ratio, for the metric, the log and the benchmark alike: the
/// fraction of token slots that are padding (0 = none).
pub fn padding_ratio(real_tokens: u64, slots: u64) -> f64 {
    if slots == 0 {
        return 0.0;
    }
    slots.saturating_sub(real_tokens) as f64 / slots as f64
}

impl Drop for Metrics {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_names_follow_otel_conventions() {
        let h = Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(60)));
        h.set_assigned(3);
        let mut m = Metrics::new(
            ModelLabels {
                name: "m",
                revision: "abc",
                device: "cpu",
            },
            h,
            || 7,
            &OtelConfig::default(),
        )
        .unwrap();
        let cache = Arc::new(crate::tokenize::PassageCacheStats::default());
        cache.hits.store(5, std::sync::atomic::Ordering::Relaxed);
        cache.misses.store(2, std::sync::atomic::Ordering::Relaxed);
        cache
            .bytes
            .store(4096, std::sync::atomic::Ordering::Relaxed);
        m.observe_passage_cache(cache);
        m.consumed();
        m.consumed();
        m.dead_lettered(ErrorCode::InvalidJson);
        m.unknown_field(&KeyValue::new("field", "candidates[].url"));
        let t0 = Instant::now();
        m.batch(&BatchRun {
            rows: 4,
            seq_len: 10,
            real_tokens: 30,
            started: t0,
            elapsed: Duration::from_millis(3),
            enqueued: &[t0; 4],
        });
        m.produced(Some(1), 1001);
        let text = m.encode();
        for want in [
            "reranker_events_consumed_total{otel_scope_name=\"reranker\"} 2",
            "reranker_events_dead_lettered_total{error_code=\"invalid_json\",otel_scope_name=\"reranker\"} 1",
            "reranker_input_unknown_fields_total{field=\"candidates[].url\",otel_scope_name=\"reranker\"} 1",
            "reranker_inference_duration_seconds_count{otel_scope_name=\"reranker\"} 1",
            "reranker_batch_padding_ratio_sum{otel_scope_name=\"reranker\"} 0.25",
            "reranker_queue_wait_duration_seconds_count{otel_scope_name=\"reranker\"} 4",
            "reranker_event_duration_seconds_sum{otel_scope_name=\"reranker\"} 1",
            "reranker_consumer_assigned_partitions{otel_scope_name=\"reranker\"} 3",
            "reranker_inflight_pairs{otel_scope_name=\"reranker\"} 7",
            "reranker_passage_cache_hits_total{otel_scope_name=\"reranker\"} 5",
            "reranker_passage_cache_misses_total{otel_scope_name=\"reranker\"} 2",
            "reranker_passage_cache_size_bytes{otel_scope_name=\"reranker\"} 4096",
            "reranker_model_info{device=\"cpu\",model_name=\"m\",model_revision=\"abc\",otel_scope_name=\"reranker\"} 1",
        ] {
            assert!(text.contains(want), "missing `{want}` in\n{text}");
        }
    }
}
