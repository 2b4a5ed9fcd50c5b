//! Metrics and health state: OpenTelemetry instruments exported as Prometheus text on `/metrics`
//! (see [`crate::http`]), and the facts `/readyz` decides on.
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
//! | `reranker.inflight.pairs` (`{pair}`) | `reranker_inflight_pairs` |
//! | `reranker.model.info` (=1; `model.name`, `model.revision`, `device`) | `reranker_model_info{model_name, model_revision, device}` |

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::metrics::{Counter, Histogram, MeterProvider, ObservableGauge};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use rdkafka::Statistics;

use crate::config::OtelConfig;
use crate::decode::ErrorCode;
use crate::telemetry;

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

/// Consumer lag of one assigned partition, with its attributes built once per statistics report.
struct LagPoint {
    attrs: [KeyValue; 2],
    lag: i64,
}

/// What `/readyz` and the gauges read; written by the rebalance and statistics callbacks, the
/// ingress loop and the worker's start/stop.
pub struct Health {
    epoch: Instant,
    broker_timeout: Duration,
    model_warmed: AtomicBool,
    draining: AtomicBool,
    assigned: AtomicUsize,
    paused: AtomicBool,
    /// Milliseconds after `epoch`, plus one, when a broker was last seen connected; 0 = never.
    broker_seen: AtomicU64,
    lag: Mutex<Vec<LagPoint>>,
}

impl Health {
    pub fn new(broker_timeout: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            broker_timeout,
            model_warmed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            assigned: AtomicUsize::new(0),
            paused: AtomicBool::new(false),
            broker_seen: AtomicU64::new(0),
            lag: Mutex::new(Vec::new()),
        }
    }

    pub fn set_model_warmed(&self) {
        self.model_warmed.store(true, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn set_assigned(&self, partitions: usize) {
        self.assigned.store(partitions, Ordering::Relaxed);
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    /// Partitions currently paused by backpressure (the ingress pauses its whole assignment).
    pub fn paused_partitions(&self) -> usize {
        if self.paused.load(Ordering::Relaxed) {
            self.assigned()
        } else {
            0
        }
    }

    /// A broker answered (group assignment) or a statistics report showed a connection up.
    pub fn broker_seen(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.broker_seen.store(ms, Ordering::Relaxed);
    }

    /// Takes the consumer's librdkafka statistics: broker connection state and per-partition lag
    /// of the partitions this consumer owns (`desired`).
    pub fn on_statistics(&self, s: &Statistics) {
        if s.brokers.values().any(|b| b.state == "UP") {
            self.broker_seen();
        }
        let mut points = Vec::new();
        for (topic, t) in &s.topics {
            for p in t.partitions.values() {
                // -1 is librdkafka's internal "unassigned" partition.
                if p.partition < 0 || !p.desired {
                    continue;
                }
                // Lag against the committed offset; before the first commit only the stored one
                // is known; unknown (-1) is left out rather than reported as zero.
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else {
                    p.consumer_lag_stored
                };
                if lag < 0 {
                    continue;
                }
                points.push(LagPoint {
                    attrs: [
                        KeyValue::new("messaging.destination.name", topic.clone()),
                        KeyValue::new(
                            "messaging.destination.partition.id",
                            p.partition.to_string(),
                        ),
                    ],
                    lag,
                });
            }
        }
        *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = points;
    }

    /// `Ok` when the worker can do its job; otherwise a short reason for `/readyz`.
    pub fn readiness(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        if !self.model_warmed.load(Ordering::Relaxed) {
            return Err("model not warmed up".into());
        }
        if self.assigned() == 0 {
            return Err("no partitions assigned".into());
        }
        match self.broker_seen.load(Ordering::Relaxed) {
            0 => Err("broker not reachable: no connected broker seen yet".into()),
            seen => {
                let age = Duration::from_millis(
                    (self.epoch.elapsed().as_millis() as u64 + 1).saturating_sub(seen),
                );
                if age > self.broker_timeout {
                    Err(format!(
                        "broker not reachable: no connected broker for {:.1}s",
                        age.as_secs_f64()
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
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
    pub events_consumed: Counter<u64>,
    pub events_produced: Counter<u64>,
    events_dead_lettered: Counter<u64>,
    pub pairs_scored: Counter<u64>,
    batch_size: Histogram<u64>,
    batch_tokens: Histogram<u64>,
    batch_padding: Histogram<f64>,
    queue_wait: Histogram<f64>,
    pub tokenization: Histogram<f64>,
    inference: Histogram<f64>,
    event_duration: Histogram<f64>,
    _gauges: (Vec<ObservableGauge<u64>>, ObservableGauge<i64>),
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
                let points = health.lag.lock().unwrap_or_else(|p| p.into_inner());
                for p in points.iter() {
                    o.observe(p.lag, &p.attrs);
                }
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
            registry,
            provider,
        })
    }

    pub fn dead_lettered(&self, code: ErrorCode) {
        self.events_dead_lettered
            .add(1, &[KeyValue::new("error.code", code.as_str())]);
    }

    /// One finished inference batch.
    pub fn batch(
        &self,
        rows: usize,
        seq_len: usize,
        real_tokens: usize,
        started: Instant,
        elapsed: Duration,
        enqueued: &[Instant],
    ) {
        let slots = rows * seq_len;
        self.batch_size.record(rows as u64, &[]);
        self.batch_tokens.record(slots as u64, &[]);
        if slots > 0 {
            let padding = slots.saturating_sub(real_tokens) as f64 / slots as f64;
            self.batch_padding.record(padding, &[]);
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

impl Drop for Metrics {
    fn drop(&mut self) {
        let _ = self.provider.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let h = Health::new(Duration::from_millis(200));
        assert_eq!(h.readiness().unwrap_err(), "model not warmed up");
        h.set_model_warmed();
        assert_eq!(h.readiness().unwrap_err(), "no partitions assigned");
        h.set_assigned(2);
        assert!(h
            .readiness()
            .unwrap_err()
            .starts_with("broker not reachable"));
        h.broker_seen();
        assert_eq!(h.readiness(), Ok(()));
        std::thread::sleep(Duration::from_millis(300));
        assert!(h
            .readiness()
            .unwrap_err()
            .starts_with("broker not reachable"));
        h.broker_seen();
        assert_eq!(h.readiness(), Ok(()));
        assert_eq!(h.paused_partitions(), 0);
        h.set_paused(true);
        assert_eq!(h.paused_partitions(), 2);
        h.set_draining();
        assert_eq!(h.readiness().unwrap_err(), "shutting down");
    }

    #[test]
    fn prometheus_names_follow_otel_conventions() {
        let h = Arc::new(Health::new(Duration::from_secs(1)));
        h.set_assigned(3);
        let m = Metrics::new(
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
        m.events_consumed.add(2, &[]);
        m.dead_lettered(ErrorCode::InvalidJson);
        let t0 = Instant::now();
        m.batch(4, 10, 30, t0, Duration::from_millis(3), &[t0; 4]);
        m.produced(Some(1), 1001);
        let text = m.encode();
        for want in [
            "reranker_events_consumed_total{otel_scope_name=\"reranker\"} 2",
            "reranker_events_dead_lettered_total{error_code=\"invalid_json\",otel_scope_name=\"reranker\"} 1",
            "reranker_inference_duration_seconds_count{otel_scope_name=\"reranker\"} 1",
            "reranker_batch_padding_ratio_sum{otel_scope_name=\"reranker\"} 0.25",
            "reranker_queue_wait_duration_seconds_count{otel_scope_name=\"reranker\"} 4",
            "reranker_event_duration_seconds_sum{otel_scope_name=\"reranker\"} 1",
            "reranker_consumer_assigned_partitions{otel_scope_name=\"reranker\"} 3",
            "reranker_inflight_pairs{otel_scope_name=\"reranker\"} 7",
            "reranker_model_info{device=\"cpu\",model_name=\"m\",model_revision=\"abc\",otel_scope_name=\"reranker\"} 1",
        ] {
            assert!(text.contains(want), "missing `{want}` in\n{text}");
        }
    }
}
