//! Each event is recorded once, here: the call updates the OpenTelemetry instrument and the plain
//! total that the progress log, `bench` and `replay` read, so the two cannot disagree.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

use super::metrics::{padding_ratio, BatchRun, Metrics};
use crate::decode::ErrorCode;

#[derive(Default)]
struct Totals {
    events_in: AtomicU64,
    events_out: AtomicU64,
    dead_letters: AtomicU64,
    pairs_scored: AtomicU64,
    batches: AtomicU64,
    real_tokens: AtomicU64,
    /// Token slots of the batches (pairs × longest pair), padding included.
    slots: AtomicU64,
    inference_us: AtomicU64,
    pauses: AtomicU64,
    resumes: AtomicU64,
    retries: AtomicU64,
    split_runs: AtomicU64,
    deadline_missed: AtomicU64,
}

/// The totals at one moment; [`Snapshot::since`] measures a stretch of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Snapshot {
    pub events_in: u64,
    pub events_out: u64,
    pub dead_letters: u64,
    pub pairs_scored: u64,
    pub batches: u64,
    pub real_tokens: u64,
    pub slots: u64,
    pub inference_us: u64,
    pub pauses: u64,
    pub resumes: u64,
    pub retries: u64,
    pub split_runs: u64,
    pub deadline_missed: u64,
}

impl Snapshot {
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        Snapshot {
            events_in: self.events_in - earlier.events_in,
            events_out: self.events_out - earlier.events_out,
            dead_letters: self.dead_letters - earlier.dead_letters,
            pairs_scored: self.pairs_scored - earlier.pairs_scored,
            batches: self.batches - earlier.batches,
            real_tokens: self.real_tokens - earlier.real_tokens,
            slots: self.slots - earlier.slots,
            inference_us: self.inference_us - earlier.inference_us,
            pauses: self.pauses - earlier.pauses,
            resumes: self.resumes - earlier.resumes,
            retries: self.retries - earlier.retries,
            split_runs: self.split_runs - earlier.split_runs,
            deadline_missed: self.deadline_missed - earlier.deadline_missed,
        }
    }

    /// Events finished either way.
    pub fn finished(&self) -> u64 {
        self.events_out + self.dead_letters
    }

    pub fn mean_batch_pairs(&self) -> f64 {
        self.pairs_scored as f64 / self.batches.max(1) as f64
    }

    /// The same definition as the `reranker_batch_padding_ratio` metric, over all batches.
    pub fn padding_ratio(&self) -> f64 {
        padding_ratio(self.real_tokens, self.slots)
    }

    pub fn mean_batch_inference_ms(&self) -> f64 {
        self.inference_us as f64 / 1e3 / self.batches.max(1) as f64
    }
}

/// Distinct unknown field names counted under their own name; later ones share
/// [`OTHER_FIELDS`], so a producer sending random keys cannot grow the metric without bound.
pub const MAX_UNKNOWN_FIELD_NAMES: usize = 100;
pub const OTHER_FIELDS: &str = "_other";
pub const MAX_FIELD_NAME_BYTES: usize = 128;

pub struct Recorder {
    totals: Totals,
    metrics: Arc<Metrics>,
    /// Unknown input field names seen so far, with their metric attribute.
    unknown: Mutex<HashMap<String, opentelemetry::KeyValue>>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Recorder").field(&self.snapshot()).finish()
    }
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

impl Recorder {
    pub fn new(metrics: Metrics) -> Self {
        Self {
            totals: Totals::default(),
            metrics: Arc::new(metrics),
            unknown: Mutex::new(HashMap::new()),
        }
    }

    /// For `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    pub fn consumed(&self) {
        add(&self.totals.events_in, 1);
        self.metrics.consumed();
    }

    pub fn tokenized(&self, elapsed: Duration) {
        self.metrics.tokenized(elapsed);
    }

    /// A reranked output was acknowledged; `record_ts_ms` is the input record's timestamp.
    pub fn produced(&self, record_ts_ms: Option<i64>) {
        add(&self.totals.events_out, 1);
        self.metrics.produced(record_ts_ms, crate::now_ms());
    }

    /// A dead letter was acknowledged.
    pub fn dead_lettered(&self, code: ErrorCode) {
        add(&self.totals.dead_letters, 1);
        self.metrics.dead_lettered(code);
    }

    /// An event carried fields this worker ignored. Each name is logged the first time only.
    pub fn unknown_fields(&self, names: &BTreeSet<String>) {
        let mut seen = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        for name in names {
            if let Some(kv) = seen.get(name) {
                self.metrics.unknown_field(kv);
                continue;
            }
            let tracked =
                seen.len() < MAX_UNKNOWN_FIELD_NAMES && name.len() <= MAX_FIELD_NAME_BYTES;
            if tracked {
                tracing::warn!(
                    field = %name,
                    "input field not known to this worker: ignored (input.strict = false); logged once per name"
                );
            } else if !seen.contains_key(OTHER_FIELDS) {
                tracing::warn!(
                    "unknown input fields beyond {MAX_UNKNOWN_FIELD_NAMES} names, or with names over {MAX_FIELD_NAME_BYTES} bytes, are counted as {OTHER_FIELDS} and not logged"
                );
            }
            let key = if tracked { name.as_str() } else { OTHER_FIELDS };
            let kv = seen
                .entry(key.to_string())
                .or_insert_with(|| opentelemetry::KeyValue::new("field", key.to_string()));
            self.metrics.unknown_field(kv);
        }
    }

    pub fn batch(&self, b: &BatchRun<'_>) {
        let t = &self.totals;
        add(&t.batches, 1);
        add(&t.real_tokens, b.real_tokens as u64);
        add(&t.slots, (b.rows * b.seq_len) as u64);
        add(&t.inference_us, b.elapsed.as_micros() as u64);
        self.metrics.batch(b);
    }

    /// A failed batch was retried `retries` times and split into `split_runs` runs.
    pub fn inference_recovery(&self, retries: u32, split_runs: u32) {
        add(&self.totals.retries, retries as u64);
        add(&self.totals.split_runs, split_runs as u64);
        self.metrics.inference_recovery(retries, split_runs);
    }

    /// An event's deadline passed while it waited (`action`: what `deadline.action` did).
    pub fn deadline_missed(&self, action: &'static str) {
        add(&self.totals.deadline_missed, 1);
        self.metrics.deadline_missed(action);
    }

    /// The batch token budget changed (out-of-memory halving or its restore).
    pub fn token_budget(&self, tokens: usize) {
        self.metrics.token_budget(tokens);
    }

    pub fn scored(&self, pairs: usize) {
        add(&self.totals.pairs_scored, pairs as u64);
        self.metrics.scored(pairs);
    }

    /// Backpressure paused (`true`) or resumed the partitions.
    pub fn paused(&self, pause: bool) {
        add(
            if pause {
                &self.totals.pauses
            } else {
                &self.totals.resumes
            },
            1,
        );
    }

    pub fn snapshot(&self) -> Snapshot {
        let t = &self.totals;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Snapshot {
            events_in: g(&t.events_in),
            events_out: g(&t.events_out),
            dead_letters: g(&t.dead_letters),
            pairs_scored: g(&t.pairs_scored),
            batches: g(&t.batches),
            real_tokens: g(&t.real_tokens),
            slots: g(&t.slots),
            inference_us: g(&t.inference_us),
            pauses: g(&t.pauses),
            resumes: g(&t.resumes),
            retries: g(&t.retries),
            split_runs: g(&t.split_runs),
            deadline_missed: g(&t.deadline_missed),
        }
    }

    /// The periodic and final summary line.
    pub fn log(&self, what: &str) {
        let s = self.snapshot();
        tracing::info!(
            events_in = s.events_in,
            events_out = s.events_out,
            dead_letters = s.dead_letters,
            pairs_scored = s.pairs_scored,
            batches = s.batches,
            mean_batch_pairs = s.mean_batch_pairs(),
            padding_ratio = s.padding_ratio(),
            inference_s = s.inference_us as f64 / 1e6,
            pauses = s.pauses,
            resumes = s.resumes,
            inference_retries = s.retries,
            inference_split_runs = s.split_runs,
            deadline_missed = s.deadline_missed,
            "{what}"
        );
    }
}
