//! Configuration: built-in defaults < TOML file < `RERANKER_*` env vars < CLI overrides.
//!
//! Every struct denies unknown keys so a typo fails at start with the key's name instead of being
//! silently ignored.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

use crate::template::{MissingField, Template};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub model: ModelConfig,
    pub batch: BatchConfig,
    pub inference: InferenceConfig,
    pub deadline: DeadlineConfig,
    pub priority: PriorityConfig,
    pub limits: LimitsConfig,
    pub input: InputConfig,
    pub flow: FlowConfig,
    pub pipeline: PipelineConfig,
    pub output: OutputConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub otel: OtelConfig,
    pub processing: ProcessingConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub input_topic: String,
    pub output_topic: String,
    pub dlq_topic: String,
    /// Passed to librdkafka verbatim (SASL, TLS, timeouts, ...); applied to consumer and producer.
    pub client: BTreeMap<String, String>,
    /// Consumer-only librdkafka settings, applied after `client`.
    pub consumer: BTreeMap<String, String>,
    /// Producer-only librdkafka settings, applied after `client`.
    pub producer: BTreeMap<String, String>,
    /// librdkafka `statistics.interval.ms` of the consumer: consumer lag per partition and broker
    /// connection state (read by `/readyz`) are refreshed this often.
    pub statistics_interval_ms: u64,
    /// An assigned, unpaused partition behind its high watermark whose position has not moved
    /// this long is reported stalled (WARN, metric, `/readyz`). Unset: 3 × `fetch.wait.max.ms`
    /// + `statistics_interval_ms` (positions are sampled with the statistics).
    pub stall_warn_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
    Auto,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LongPassages {
    /// Longest-first truncation at `max_length` (sentence-transformers' CrossEncoder behaviour).
    Truncate,
    /// Overlapping windows of the passage, each paired with the query; the best window's score wins.
    ChunkMax,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptLevel {
    Disable,
    Basic,
    Extended,
    All,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Directory holding the ONNX file and tokenizer.json (HuggingFace export layout).
    pub dir: PathBuf,
    /// ONNX file inside `dir` (e.g. `model_int8.onnx` for the quantized variant).
    pub file: String,
    /// Name reported in outputs; defaults to the directory name.
    pub name: Option<String>,
    /// Token budget per (query, passage) pair; truncation is longest-first.
    pub max_length: usize,
    pub device: Device,
    pub cuda_device_id: i32,
    /// ONNX Runtime intra-op threads; 0 means "all cores".
    pub intra_op_threads: usize,
    /// Let ONNX Runtime's idle threads spin between ops. Off by default: on small machines the
    /// spinning takes the cores that tokenization and Kafka need.
    pub allow_spinning: bool,
    pub optimization: OptLevel,
    /// Column of `logits` holding the relevance logit (for two-class heads use 1).
    pub label_index: usize,
    pub long_passages: LongPassages,
    /// Tokens shared by consecutive windows in `chunk_max` mode.
    pub chunk_overlap: usize,
}

/// What happens when the model fails on a batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    /// Whole-batch retries (doubling backoff) before the batch is split to find the pairs that
    /// fail on their own; only their events are dead-lettered.
    pub max_retries: u32,
    /// Wait before the first retry.
    pub retry_backoff_ms: u64,
    /// After an out-of-memory failure the batch token budget is halved for this long.
    pub oom_cooldown_ms: u64,
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            retry_backoff_ms: 50,
            oom_cooldown_ms: 60_000,
        }
    }
}

/// What an event whose `deadline_ms` passes while it waits in the worker becomes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeadlineAction {
    /// A dead letter with code `deadline_exceeded`.
    #[default]
    DeadLetter,
    /// Nothing is published; its offset is committed.
    Drop,
    /// Scored and published late (counted as a miss).
    ScoreAnyway,
}

impl DeadlineAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DeadLetter => "dead_letter",
            Self::Drop => "drop",
            Self::ScoreAnyway => "score_anyway",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeadlineConfig {
    pub action: DeadlineAction,
}

/// Scheduling lanes: interactive pairs are batched before bulk ones (backfills, replays).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PriorityConfig {
    /// Record header read when an event has no `priority` field (same values); empty: none.
    pub header: String,
    /// Lane of an event that names no priority.
    pub default: crate::batch::Lane,
    /// Levels 0–9 at or above this are interactive, below it bulk (10: every level is bulk).
    pub interactive_from: u8,
    /// The starvation bound: while bulk pairs wait, at most this many batches in a row may hold
    /// none of them; the next one is built around the oldest bulk pair.
    pub bulk_max_skipped_batches: u32,
    /// A batch built around interactive pairs is filled with bulk pairs up to this share of
    /// `batch.max_batch_pairs`: the interactive pairs wait for the whole batch, so a smaller one
    /// answers them sooner, at some cost to the bulk lane's throughput.
    pub interactive_batch_fill: f64,
}

impl Default for PriorityConfig {
    fn default() -> Self {
        Self {
            header: "priority".into(),
            default: crate::batch::Lane::Interactive,
            interactive_from: 5,
            bulk_max_skipped_batches: 3,
            interactive_batch_fill: 1.0,
        }
    }
}

impl PriorityConfig {
    /// An event's lane: its `priority` field, else the header, else `default`.
    pub fn lane(
        &self,
        field: Option<crate::decode::Priority>,
        header: Option<&[u8]>,
    ) -> crate::batch::Lane {
        use crate::batch::Lane;
        use crate::decode::Priority;
        match field.or_else(|| header.and_then(Priority::from_header)) {
            Some(Priority::Interactive) => Lane::Interactive,
            Some(Priority::Bulk) => Lane::Bulk,
            Some(Priority::Level(l)) if l >= self.interactive_from => Lane::Interactive,
            Some(Priority::Level(_)) => Lane::Bulk,
            None => self.default,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchConfig {
    pub max_batch_pairs: usize,
    /// Padded cost: pairs × longest sequence in the batch.
    pub max_batch_tokens: usize,
    pub max_wait_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_candidates: usize,
    pub max_query_bytes: usize,
    pub max_text_bytes: usize,
    pub max_event_bytes: usize,
}

/// How input events are read (`schemas/retrieval-result.v1.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// Dead-letter events with fields this worker does not know (`schema_violation`). Off: such
    /// fields are ignored and counted, so producers can add fields before the worker knows them.
    pub strict: bool,
    /// Builds the scored text of each candidate from its fields, e.g. "{title}\n{text}"
    /// (`{{` / `}}` for literal braces). Unset: the candidate's `text`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_template: Option<Template>,
    /// A candidate without a field the template names (or with it null): "empty" puts an empty
    /// string in its place, "dead_letter" rejects the event (`missing_template_field`).
    pub missing_template_field: MissingField,
}

impl InputConfig {
    pub fn rules(&self) -> crate::decode::Rules<'_> {
        crate::decode::Rules {
            strict: self.strict,
            template: self.text_template.as_ref(),
            missing: self.missing_template_field,
        }
    }
}

/// One likelihood label: results with `relevance` at or above `min_relevance` (and below the
/// next label's) get `name`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Label {
    pub name: String,
    pub min_relevance: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlowConfig {
    /// Pairs admitted but not yet produced; past this the consumer pauses its partitions.
    pub max_inflight_pairs: usize,
    /// Resume once in-flight pairs fall to this fraction of the high-water mark.
    pub resume_ratio: f64,
    /// The share of `max_inflight_pairs` kept for interactive partitions: a partition whose
    /// latest event was bulk pauses at `(1 - ratio) × max_inflight_pairs`, every other one only at
    /// `max_inflight_pairs`. So interactive events in partitions of their own are still fetched
    /// while a bulk backlog holds the rest paused. 0 pauses every partition at once.
    pub interactive_reserve_ratio: f64,
    /// Bounds librdkafka's prefetch buffer so memory stays bounded while far behind.
    pub fetch_queue_kbytes: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Threads that decode and tokenize events, many events at once; 0 means the cores left after
    /// inference (`model.intra_op_threads`), at least 1.
    pub admission_threads: usize,
    /// Passage encodings kept across events, in MiB; 0 = no cache.
    pub passage_cache_mb: usize,
}

impl PipelineConfig {
    /// The admission pool's size on this machine.
    pub fn admission_threads(&self, model: &ModelConfig) -> usize {
        if self.admission_threads > 0 {
            return self.admission_threads;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // Inference on the GPU leaves the CPU to the host side but one core for the session.
        let inference = match (model.device, model.intra_op_threads) {
            (Device::Cuda, _) => 1,
            (_, 0) => cores / 2,
            (_, n) => n,
        };
        cores.saturating_sub(inference).max(1)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Default number of results per event; an event's own `top_n` may lower or raise it up to `max_top_n`.
    pub top_n: usize,
    pub max_top_n: usize,
    /// Copy passage texts into the output (off by default: downstream usually has them). An
    /// event's `return_text` overrides it.
    pub include_text: bool,
    /// Drop results whose `relevance` is below this (0..1); an event's `min_relevance` wins.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_relevance: Option<f64>,
    /// Likelihood labels by relevance, lowest first, the first at 0; empty: no `label` field.
    pub labels: Vec<Label>,
    /// Input headers copied onto the output and dead-letter records.
    pub propagate_headers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The HTTP endpoint: `/healthz`, `/readyz` and Prometheus `/metrics`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// `IP:PORT` to listen on; port 0 picks a free one (logged at start).
    pub listen: String,
    /// `/readyz` fails once no librdkafka statistics report has shown a connected broker for this
    /// long; must exceed `kafka.statistics_interval_ms`.
    pub broker_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Guarantee {
    /// Offsets are committed after the output is acknowledged: a crash re-processes (duplicates)
    /// the events since the last commit.
    AtLeastOnce,
    /// Outputs, dead letters and input offsets are committed in one Kafka transaction per commit
    /// interval; `read_committed` consumers see every input's output once.
    ExactlyOnce,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessingConfig {
    pub guarantee: Guarantee,
    /// `transactional.id` of the producer (exactly_once). Default: `<group_id>-<instance>`, with
    /// the instance from `group.instance.id`, else `$HOSTNAME` (a StatefulSet pod name is stable
    /// across restarts, which lets the broker fence the previous incarnation's open transaction).
    pub transactional_id: Option<String>,
    /// How often the open transaction is committed (exactly_once): the latency `read_committed`
    /// readers add, traded against one commit round trip per interval.
    pub commit_interval_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` env-filter syntax; `RUST_LOG` wins when set.
    pub level: String,
}

/// OpenTelemetry export over OTLP/HTTP. Trace context is extracted from input headers and
/// injected into outputs whether or not anything is exported. The standard `OTEL_*` variables
/// (`OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_SAMPLER`,
/// `OTEL_RESOURCE_ATTRIBUTES`, ...) apply where a key here is left empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// Export spans (one per event, one per inference batch).
    pub traces: bool,
    /// Push metrics too (the Prometheus `/metrics` endpoint stays).
    pub metrics: bool,
    /// Base URL of the collector's OTLP/HTTP receiver, e.g. `http://otel-collector:4318`; empty:
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`, else `http://localhost:4318`.
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    pub metrics_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "http/json")]
    HttpJson,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            traces: false,
            metrics: false,
            endpoint: String::new(),
            protocol: OtlpProtocol::HttpProtobuf,
            service_name: "reranker".into(),
            metrics_interval_ms: 10_000,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "reranker".into(),
            input_topic: "retrieval-results".into(),
            output_topic: "reranked".into(),
            dlq_topic: "reranker-dlq".into(),
            client: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            statistics_interval_ms: 5000,
            stall_warn_ms: None,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("../shared/models/minilm-l6-ce"),
            file: "model.onnx".into(),
            name: None,
            max_length: 256,
            device: Device::Cpu,
            cuda_device_id: 0,
            intra_op_threads: 0,
            allow_spinning: false,
            optimization: OptLevel::All,
            label_index: 0,
            long_passages: LongPassages::Truncate,
            chunk_overlap: 32,
        }
    }
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch_pairs: 32,
            max_batch_tokens: 8192,
            max_wait_ms: 10,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_candidates: 256,
            max_query_bytes: 4096,
            max_text_bytes: 32 * 1024,
            max_event_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for FlowConfig {
    fn default() -> Self {
        Self {
            max_inflight_pairs: 2048,
            resume_ratio: 0.5,
            interactive_reserve_ratio: 0.25,
            fetch_queue_kbytes: 16 * 1024,
        }
    }
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            top_n: 10,
            max_top_n: 1000,
            include_text: false,
            min_relevance: None,
            labels: Vec::new(),
            propagate_headers: vec!["traceparent".into(), "tracestate".into(), "baggage".into()],
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 20_000,
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: "0.0.0.0:9464".into(),
            broker_timeout_ms: 15_000,
        }
    }
}

impl Default for ProcessingConfig {
    fn default() -> Self {
        Self {
            guarantee: Guarantee::AtLeastOnce,
            transactional_id: None,
            commit_interval_ms: 200,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Error with the offending key named; figment already says "for key `a.b`".
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    // Not a `source`: the message already says it all, and chained printing would repeat it.
    #[error("invalid configuration: {0}")]
    Figment(Box<figment::Error>),
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("invalid override `{0}`: expected KEY=VALUE, e.g. batch.max_wait_ms=5")]
    BadOverride(String),
}

impl From<Box<figment::Error>> for ConfigError {
    fn from(e: Box<figment::Error>) -> Self {
        Self::Figment(e)
    }
}

/// Builds the effective configuration. `overrides` are `dotted.key=value` pairs from the CLI; values
/// are parsed as TOML scalars when possible (so `5` is a number), else taken as strings.
pub fn load(file: Option<&Path>, overrides: &[String]) -> Result<Config, ConfigError> {
    let mut fig = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::MissingFile(path.to_path_buf()));
        }
        fig = fig.merge(Toml::file_exact(path));
    }
    // `__` separates nesting so that keys containing `_` survive: RERANKER_BATCH__MAX_WAIT_MS.
    // These belong to scripts/setup.sh (and its tests), not to the worker.
    fig = fig.merge(Env::prefixed("RERANKER_").split("__").ignore(&[
        "cache",
        "model_src",
        "model_repo",
        "model_revision",
        "model_sha256",
        "hf_endpoint",
        "connect_timeout",
        "bin",
    ]));
    for ov in overrides {
        fig = fig.merge(Toml::string(&override_doc(ov)?));
    }
    let mut cfg: Config = fig.extract().map_err(Box::new)?;
    // librdkafka property names never contain `_`, but env var names cannot contain `.`:
    // RERANKER_KAFKA__CLIENT__SASL_PASSWORD means `sasl.password`.
    for map in [
        &mut cfg.kafka.client,
        &mut cfg.kafka.consumer,
        &mut cfg.kafka.producer,
    ] {
        *map = std::mem::take(map)
            .into_iter()
            .map(|(k, v)| (k.replace('_', "."), v))
            .collect();
    }
    cfg.validate()?;
    Ok(cfg)
}

/// `KEY=VALUE` as a one-line TOML document. Dotted keys may quote parts
/// (`kafka.client."sasl.mechanism"=PLAIN`); a value that is not valid TOML is taken as a string.
fn override_doc(ov: &str) -> Result<String, ConfigError> {
    let (key, value) = ov
        .split_once('=')
        .ok_or_else(|| ConfigError::BadOverride(ov.to_string()))?;
    let (key, value) = (key.trim(), value.trim());
    if key.is_empty() {
        return Err(ConfigError::BadOverride(ov.to_string()));
    }
    let doc = format!("{key} = {value}");
    if toml::from_str::<toml::Table>(&doc).is_ok() {
        return Ok(doc);
    }
    let doc = format!("{key} = {}", toml::Value::String(value.to_string()));
    toml::from_str::<toml::Table>(&doc)
        .map(|_| doc)
        .map_err(|_| ConfigError::BadOverride(ov.to_string()))
}

impl Config {
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid {
                key,
                reason: reason.into(),
            })
        }
        if self.kafka.brokers.trim().is_empty() {
            return bad("kafka.brokers", "must not be empty");
        }
        for (key, v) in [
            ("kafka.group_id", &self.kafka.group_id),
            ("kafka.input_topic", &self.kafka.input_topic),
            ("kafka.output_topic", &self.kafka.output_topic),
            ("kafka.dlq_topic", &self.kafka.dlq_topic),
        ] {
            if v.trim().is_empty() {
                return bad(key, "must not be empty");
            }
        }
        if self.kafka.input_topic == self.kafka.output_topic
            || self.kafka.input_topic == self.kafka.dlq_topic
        {
            return bad(
                "kafka.input_topic",
                "must differ from output_topic and dlq_topic (the worker would consume its own output)",
            );
        }
        if !(8..=8192).contains(&self.model.max_length) {
            return bad("model.max_length", "must be between 8 and 8192");
        }
        if self.batch.max_batch_pairs == 0 {
            return bad("batch.max_batch_pairs", "must be at least 1");
        }
        if self.priority.interactive_from > 10 {
            return bad("priority.interactive_from", "must be between 0 and 10");
        }
        let fill = self.priority.interactive_batch_fill;
        if !(fill > 0.0 && fill <= 1.0) {
            return bad("priority.interactive_batch_fill", "must be in (0, 1]");
        }
        if self.inference.max_retries > 10 {
            return bad(
                "inference.max_retries",
                "must be at most 10 (each retry holds the model)",
            );
        }
        if self.batch.max_batch_tokens < self.model.max_length {
            return bad(
                "batch.max_batch_tokens",
                format!(
                    "must be at least model.max_length ({}) so one full-length pair fits",
                    self.model.max_length
                ),
            );
        }
        if self.flow.max_inflight_pairs < self.batch.max_batch_pairs {
            return bad(
                "flow.max_inflight_pairs",
                "must be at least batch.max_batch_pairs, or batches could never fill",
            );
        }
        if !(0.0..1.0).contains(&self.flow.resume_ratio) {
            return bad("flow.resume_ratio", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.flow.interactive_reserve_ratio) {
            return bad("flow.interactive_reserve_ratio", "must be in [0, 1)");
        }
        let e = &self.otel.endpoint;
        if !(e.is_empty() || e.starts_with("http://") || e.starts_with("https://")) {
            return bad(
                "otel.endpoint",
                "must be an http:// or https:// URL of an OTLP/HTTP receiver (port 4318 by convention)",
            );
        }
        if self.otel.metrics && self.otel.metrics_interval_ms < 100 {
            return bad("otel.metrics_interval_ms", "must be at least 100");
        }
        if self.limits.max_candidates == 0 {
            return bad("limits.max_candidates", "must be at least 1");
        }
        if self.output.top_n == 0 || self.output.top_n > self.output.max_top_n {
            return bad("output.top_n", "must be between 1 and output.max_top_n");
        }
        if let Some(m) = self.output.min_relevance {
            if !(0.0..=1.0).contains(&m) {
                return bad("output.min_relevance", "must be between 0 and 1");
            }
        }
        let labels = &self.output.labels;
        if labels.first().is_some_and(|l| l.min_relevance != 0.0) {
            return bad(
                "output.labels",
                "the first label must have min_relevance = 0, so every result gets a label",
            );
        }
        for (i, l) in labels.iter().enumerate() {
            if l.name.trim().is_empty() {
                return bad("output.labels", format!("label {i} has an empty name"));
            }
            if !(0.0..=1.0).contains(&l.min_relevance) {
                return bad(
                    "output.labels",
                    format!("{:?}: min_relevance must be between 0 and 1", l.name),
                );
            }
            if labels[..i].iter().any(|p| p.name == l.name) {
                return bad("output.labels", format!("{:?} appears twice", l.name));
            }
            if i > 0 && l.min_relevance <= labels[i - 1].min_relevance {
                return bad(
                    "output.labels",
                    format!(
                        "{:?}: min_relevance must increase from one label to the next",
                        l.name
                    ),
                );
            }
        }
        for (k, _) in self.kafka.client.iter().chain(&self.kafka.consumer) {
            if matches!(
                k.as_str(),
                "enable.auto.offset.store" | "group.id" | "bootstrap.servers"
            ) {
                return bad(
                    "kafka.client",
                    format!("`{k}` is managed by the worker (use kafka.brokers / kafka.group_id; offsets are stored only after output is acknowledged)"),
                );
            }
            if k == "statistics.interval.ms" {
                return bad(
                    "kafka.client",
                    "`statistics.interval.ms` is managed by the worker (use kafka.statistics_interval_ms)",
                );
            }
        }
        if !(100..=3_600_000).contains(&self.kafka.statistics_interval_ms) {
            return bad(
                "kafka.statistics_interval_ms",
                "must be between 100 and 3600000 (consumer lag and /readyz rely on it)",
            );
        }
        if self.kafka.stall_warn_ms == Some(0) {
            return bad(
                "kafka.stall_warn_ms",
                "must be positive (leave it unset for the default)",
            );
        }
        if self.http.listen.parse::<std::net::SocketAddr>().is_err() {
            return bad(
                "http.listen",
                format!(
                    "must be IP:PORT, e.g. \"0.0.0.0:9464\" (got {:?})",
                    self.http.listen
                ),
            );
        }
        if self.http.broker_timeout_ms <= self.kafka.statistics_interval_ms {
            return bad(
                "http.broker_timeout_ms",
                format!(
                    "must exceed kafka.statistics_interval_ms ({}): broker state is refreshed that often",
                    self.kafka.statistics_interval_ms
                ),
            );
        }
        if self.processing.guarantee == Guarantee::ExactlyOnce {
            if !(10..=60_000).contains(&self.processing.commit_interval_ms) {
                return bad(
                    "processing.commit_interval_ms",
                    "must be between 10 and 60000 (and well below the producer's transaction.timeout.ms)",
                );
            }
            if let Some(id) = &self.processing.transactional_id {
                if id.trim().is_empty() {
                    return bad("processing.transactional_id", "must not be empty when set");
                }
            }
            for (k, v) in self.kafka.client.iter().chain(&self.kafka.producer) {
                if k == "transactional.id" {
                    return bad(
                        "kafka.producer",
                        "`transactional.id` is managed by the worker (use processing.transactional_id)",
                    );
                }
                if k == "enable.idempotence" && v != "true" {
                    return bad(
                        "kafka.producer",
                        "`enable.idempotence` must stay true with processing.guarantee = \"exactly_once\"",
                    );
                }
            }
            for (k, _) in self.kafka.client.iter().chain(&self.kafka.consumer) {
                if k == "enable.auto.commit" {
                    return bad(
                        "kafka.consumer",
                        "`enable.auto.commit` is managed by the worker (offsets go into the transaction with processing.guarantee = \"exactly_once\")",
                    );
                }
            }
        }
        Ok(())
    }

    /// `transactional.id` for exactly_once: configured, else derived from the group and a stable
    /// instance name.
    pub fn transactional_id(&self) -> String {
        if let Some(id) = &self.processing.transactional_id {
            return id.clone();
        }
        let instance = self
            .kafka
            .consumer
            .get("group.instance.id")
            .or_else(|| self.kafka.client.get("group.instance.id"))
            .cloned()
            .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
            .or_else(hostname)
            .unwrap_or_else(|| "0".into());
        format!("{}-{instance}", self.kafka.group_id)
    }

    /// How long a partition may sit behind without moving before it counts as stalled.
    pub fn stall_after(&self) -> Duration {
        let fetch_wait = self
            .kafka
            .consumer
            .get("fetch.wait.max.ms")
            .or_else(|| self.kafka.client.get("fetch.wait.max.ms"))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(crate::kafka::consumer::FETCH_WAIT_MAX_MS);
        Duration::from_millis(
            self.kafka
                .stall_warn_ms
                .unwrap_or(3 * fetch_wait + self.kafka.statistics_interval_ms),
        )
    }

    /// The configuration as TOML with secrets replaced, for `reranker config` and start-up logs.
    pub fn redacted_toml(&self) -> String {
        let mut c = self.clone();
        for map in [
            &mut c.kafka.client,
            &mut c.kafka.consumer,
            &mut c.kafka.producer,
        ] {
            for (k, v) in map.iter_mut() {
                if is_secret_key(k) {
                    *v = "<redacted>".into();
                }
            }
        }
        toml::to_string_pretty(&c).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    pub fn model_name(&self) -> String {
        self.model.name.clone().unwrap_or_else(|| {
            self.model
                .dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into())
        })
    }
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call and its length is passed; gethostname NUL-terminates
    // within it or returns an error.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&buf[..end])
        .ok()
        .map(str::to_string)
        .filter(|h| !h.is_empty())
}

pub fn is_secret_key(k: &str) -> bool {
    let k = k.to_ascii_lowercase();
    ["password", "secret", "token", "key.pem", "private", "jaas"]
        .iter()
        .any(|s| k.contains(s))
        || k.ends_with(".key")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Lane;
    use crate::decode::Priority;

    #[test]
    fn an_events_lane_comes_from_its_field_then_the_header_then_the_default() {
        let p = PriorityConfig::default();
        assert_eq!(
            p.lane(Some(Priority::Bulk), Some(b"interactive")),
            Lane::Bulk
        );
        assert_eq!(p.lane(None, Some(b"bulk")), Lane::Bulk);
        assert_eq!(p.lane(None, Some(b" 7 ")), Lane::Interactive);
        assert_eq!(p.lane(Some(Priority::Level(4)), None), Lane::Bulk);
        assert_eq!(p.lane(Some(Priority::Level(5)), None), Lane::Interactive);
        // An unreadable header is no priority.
        assert_eq!(p.lane(None, Some(b"urgent")), Lane::Interactive);
        assert_eq!(p.lane(None, Some(b"12")), Lane::Interactive);
        let all_bulk = PriorityConfig {
            default: Lane::Bulk,
            interactive_from: 10,
            ..p
        };
        assert_eq!(all_bulk.lane(None, None), Lane::Bulk);
        assert_eq!(all_bulk.lane(Some(Priority::Level(9)), None), Lane::Bulk);
    }
}
