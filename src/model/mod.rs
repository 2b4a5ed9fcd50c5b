//! The model: one ONNX Runtime session owned by a dedicated inference thread.
//!
//! `Session::run` takes `&mut self` and blocks for the whole batch, so the session lives on its own
//! OS thread fed through a one-slot channel: the batcher prepares the next batch's tensors while the
//! current one runs, and the async runtime is never blocked.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use opentelemetry::trace::SpanContext;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor, TensorElementType};
use tokio::sync::mpsc;

use crate::batch::{Batch, CloseReason, PairKey};
use crate::config::{Device, ModelConfig, OptLevel};
use crate::obs::telemetry;

pub mod isolate;
pub mod synth;
pub mod warm_up;
use crate::tokenize::EncodedPair;

const ORT_VERSION: &str = "1.31.1";

static ORT_ENV: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

/// Where to find libonnxruntime: `ORT_DYLIB_PATH`, then the set-up script's cache, then the system.
pub fn ort_library_path() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("RERANKER_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|c| PathBuf::from(c).join("reranker"))
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/reranker"))
                })
        });
    if let Some(c) = cache {
        let p = c.join(format!("ort/libonnxruntime.so.{ORT_VERSION}"));
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("libonnxruntime.so")
}

fn environment() -> anyhow::Result<&'static ort::environment::Environment> {
    let env = ORT_ENV.get_or_init(|| {
        let path = ort_library_path();
        let builder = ort::init_from(&path).map_err(|e| {
            format!(
                "cannot load ONNX Runtime from {}: {e} (run scripts/setup.sh or set ORT_DYLIB_PATH)",
                path.display()
            )
        })?;
        builder
            .with_name("reranker")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("cannot create ONNX Runtime environment: {e}"))
    });
    env.as_ref().map_err(|e| anyhow!("{e}"))
}

/// What the outputs and `check-model` report about the loaded model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelInfo {
    pub name: String,
    /// First 16 hex digits of the ONNX file's SHA-256: pins scores to exact weights.
    pub revision: String,
    pub file: PathBuf,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub has_token_type_ids: bool,
    pub num_labels: usize,
    pub label_index: usize,
    /// Execution provider actually in use.
    pub device: &'static str,
    /// How `relevance` is derived from the logits.
    pub activation: &'static str,
    /// Element type of the id inputs: exporters emit int64, some (and TensorRT-minded ones) int32.
    pub ids: IdType,
    /// Element type of the logits: fp16 exports often keep fp16 outputs.
    pub logits: LogitType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum IdType {
    #[serde(rename = "int64")]
    I64,
    #[serde(rename = "int32")]
    I32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum LogitType {
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float16")]
    F16,
}

impl IdType {
    pub fn as_str(self) -> &'static str {
        match self {
            IdType::I64 => "int64",
            IdType::I32 => "int32",
        }
    }

    /// A `[rows, seq_len]` input tensor of this type. Token ids and type ids fit in 32 bits
    /// (vocabularies are far smaller), so the narrowing is exact.
    fn tensor(self, shape: &[i64], v: &[i64]) -> ort::Result<DynValue> {
        Ok(match self {
            IdType::I64 => Tensor::from_array((shape.to_vec(), v.to_vec()))?.into_dyn(),
            IdType::I32 => {
                let v: Vec<i32> = v.iter().map(|&x| x as i32).collect();
                Tensor::from_array((shape.to_vec(), v))?.into_dyn()
            }
        })
    }
}

impl LogitType {
    pub fn as_str(self) -> &'static str {
        match self {
            LogitType::F32 => "float32",
            LogitType::F16 => "float16",
        }
    }
}

/// Padded, row-major int64 tensors for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub attention_mask: Vec<i64>,
    pub token_type_ids: Vec<i64>,
}

impl TensorBatch {
    pub fn from_pairs<'a>(
        pairs: impl ExactSizeIterator<Item = &'a EncodedPair> + Clone,
        pad_id: u32,
    ) -> Self {
        let rows = pairs.len();
        let seq_len = pairs.clone().map(|p| p.len()).max().unwrap_or(0);
        let mut input_ids = vec![pad_id as i64; rows * seq_len];
        let mut attention_mask = vec![0i64; rows * seq_len];
        let mut token_type_ids = vec![0i64; rows * seq_len];
        for (r, p) in pairs.enumerate() {
            let base = r * seq_len;
            for (j, (&id, &ty)) in p.ids.iter().zip(&p.type_ids).enumerate() {
                input_ids[base + j] = id as i64;
                attention_mask[base + j] = 1;
                token_type_ids[base + j] = ty as i64;
            }
        }
        Self {
            rows,
            seq_len,
            input_ids,
            attention_mask,
            token_type_ids,
        }
    }

    /// Rows `lo..hi` as a batch of their own, padded only to their longest row.
    pub fn rows_range(&self, lo: usize, hi: usize) -> Self {
        let real = |r: usize| {
            self.attention_mask[r * self.seq_len..(r + 1) * self.seq_len]
                .iter()
                .rposition(|&m| m != 0)
                .map_or(0, |i| i + 1)
        };
        let seq_len = (lo..hi).map(real).max().unwrap_or(0);
        let take = |v: &[i64]| -> Vec<i64> {
            (lo..hi)
                .flat_map(|r| &v[r * self.seq_len..r * self.seq_len + seq_len])
                .copied()
                .collect()
        };
        Self {
            rows: hi - lo,
            seq_len,
            input_ids: take(&self.input_ids),
            attention_mask: take(&self.attention_mask),
            token_type_ids: take(&self.token_type_ids),
        }
    }
}

pub struct Scorer {
    session: Session,
    info: ModelInfo,
}

fn opt_level(o: OptLevel) -> GraphOptimizationLevel {
    match o {
        OptLevel::Disable => GraphOptimizationLevel::Disable,
        OptLevel::Basic => GraphOptimizationLevel::Level1,
        OptLevel::Extended => GraphOptimizationLevel::Level2,
        OptLevel::All => GraphOptimizationLevel::All,
    }
}

// Builder errors are not Send; keeping the chain inside a function returning `ort::Result` converts
// them at the boundary.
fn build_session(
    env: &ort::environment::Environment,
    path: &Path,
    threads: usize,
    spinning: bool,
    opt: OptLevel,
    cuda: Option<i32>,
) -> ort::Result<Session> {
    let spin = if spinning { "1" } else { "0" };
    let mut b = Session::builder(env)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        .with_config_entry("session.intra_op.allow_spinning", spin)?
        .with_optimization_level(opt_level(opt))?
        // Memory patterns are planned per input shape, and every batch shape here is a new one:
        // with them, peak RSS at batch 32 × 256 tokens was 962 MB; without, 691 MB (bench
        // --model-only, same speed).
        .with_memory_pattern(false)?;
    if let Some(device_id) = cuda {
        b = with_cuda(b, device_id)?;
    }
    b.commit_from_file(path)
}

#[cfg(feature = "cuda")]
fn with_cuda(
    b: ort::session::builder::SessionBuilder,
    device_id: i32,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    // error_on_failure: without it ort quietly runs the model on CPU when CUDA cannot start.
    Ok(b.with_execution_providers([ort::ep::CUDA::default()
        .with_device_id(device_id)
        .build()
        .error_on_failure()])?)
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _b: ort::session::builder::SessionBuilder,
    _device_id: i32,
) -> ort::Result<ort::session::builder::SessionBuilder> {
    Err(ort::Error::new(
        "this binary was built without the `cuda` feature (cargo build --features cuda)",
    ))
}

pub fn file_revision(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

impl Scorer {
    pub fn load(cfg: &ModelConfig, name: &str) -> anyhow::Result<Self> {
        let env = environment()?;
        let path = cfg.dir.join(&cfg.file);
        if !path.exists() {
            bail!(
                "model file {} does not exist (--model-dir or model.dir / model.file; scripts/setup.sh --model DIR|URL|hf:REPO or RERANKER_MODEL_SRC prepares one)",
                path.display()
            );
        }
        let threads = if cfg.intra_op_threads == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            cfg.intra_op_threads
        };
        let load = |cuda| {
            build_session(
                env,
                &path,
                threads,
                cfg.allow_spinning,
                cfg.optimization,
                cuda,
            )
        };
        let (session, device) = match cfg.device {
            Device::Cpu => (load(None).map_err(|e| anyhow!("{e}"))?, "cpu"),
            Device::Cuda => (
                load(Some(cfg.cuda_device_id))
                    .map_err(|e| anyhow!("device = \"cuda\" but CUDA cannot be used: {e}"))?,
                "cuda",
            ),
            Device::Auto => match load(Some(cfg.cuda_device_id)) {
                Ok(s) => (s, "cuda"),
                Err(e) => {
                    tracing::warn!(error = %e, "device = \"auto\": CUDA unavailable, running on CPU");
                    (load(None).map_err(|e| anyhow!("{e}"))?, "cpu")
                }
            },
        };
        let inputs: Vec<String> = session
            .inputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let outputs: Vec<String> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        for required in ["input_ids", "attention_mask"] {
            if !inputs.iter().any(|i| i == required) {
                bail!(
                    "model {} has no `{required}` input (inputs: {inputs:?})",
                    path.display()
                );
            }
        }
        let has_token_type_ids = inputs.iter().any(|i| i == "token_type_ids");
        let ids_type = session
            .inputs()
            .iter()
            .find(|i| i.name() == "input_ids")
            .and_then(|i| i.dtype().tensor_type());
        let ids = match ids_type {
            Some(TensorElementType::Int64) => IdType::I64,
            Some(TensorElementType::Int32) => IdType::I32,
            other => bail!(
                "model {}: `input_ids` must be int64 or int32, not {other:?}",
                path.display()
            ),
        };
        for i in session.inputs() {
            let ty = i.dtype().tensor_type();
            if ty != ids_type {
                bail!(
                    "model {}: input `{}` is {ty:?} but `input_ids` is {ids_type:?}; all id inputs must share one type",
                    path.display(),
                    i.name()
                );
            }
        }
        let out = &session.outputs()[0];
        let logits = match out.dtype().tensor_type() {
            Some(TensorElementType::Float32) => LogitType::F32,
            Some(TensorElementType::Float16) => LogitType::F16,
            other => bail!(
                "model {}: the first output must be float32 or float16 logits, not {other:?}",
                path.display()
            ),
        };
        let num_labels = out
            .dtype()
            .tensor_shape()
            .and_then(|s| s.last().copied())
            .filter(|&d| d > 0)
            .map(|d| d as usize)
            .unwrap_or(1);
        if cfg.label_index >= num_labels {
            bail!(
                "model.label_index = {} but the model has {num_labels} logit column(s)",
                cfg.label_index
            );
        }
        let info = ModelInfo {
            name: name.to_string(),
            revision: file_revision(&path)?,
            file: path.clone(),
            inputs,
            outputs,
            has_token_type_ids,
            num_labels,
            label_index: cfg.label_index,
            device,
            activation: if num_labels == 1 {
                "sigmoid"
            } else {
                "softmax"
            },
            ids,
            logits,
        };
        Ok(Self { session, info })
    }

    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// One score per row: the label column's raw logit and its normalised relevance.
    pub fn score(&mut self, t: &TensorBatch) -> anyhow::Result<Vec<Score>> {
        if t.rows == 0 {
            return Ok(Vec::new());
        }
        let shape = [t.rows as i64, t.seq_len as i64];
        let ids = self.info.ids;
        let mut inputs: Vec<(std::borrow::Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("input_ids".into(), ids.tensor(&shape, &t.input_ids)?.into()),
            (
                "attention_mask".into(),
                ids.tensor(&shape, &t.attention_mask)?.into(),
            ),
        ];
        if self.info.has_token_type_ids {
            inputs.push((
                "token_type_ids".into(),
                ids.tensor(&shape, &t.token_type_ids)?.into(),
            ));
        }
        let outputs = self.session.run(inputs)?;
        let widened: Vec<f32>;
        let (oshape, data) = match self.info.logits {
            LogitType::F32 => outputs[0].try_extract_tensor::<f32>()?,
            LogitType::F16 => {
                let (shape, h) = outputs[0].try_extract_tensor::<half::f16>()?;
                widened = h.iter().map(|x| x.to_f32()).collect();
                (shape, widened.as_slice())
            }
        };
        let cols = if oshape.len() >= 2 {
            oshape[1] as usize
        } else {
            1
        };
        if data.len() != t.rows * cols {
            bail!(
                "model returned {} values for {} rows × {cols}",
                data.len(),
                t.rows
            );
        }
        let li = self.info.label_index;
        Ok((0..t.rows)
            .map(|r| {
                let row = &data[r * cols..(r + 1) * cols];
                if cols == 1 {
                    Score {
                        logit: row[0],
                        relevance: sigmoid(row[0]),
                    }
                } else {
                    Score {
                        logit: row[li],
                        relevance: softmax_at(row, li),
                    }
                }
            })
            .collect())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub logit: f32,
    pub relevance: f32,
}

fn softmax_at(row: &[f32], i: usize) -> f32 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&x| (x - m).exp()).sum();
    (row[i] - m).exp() / sum
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// A batch on its way to the model, tensors already built.
pub struct InferRequest {
    pub keys: Vec<PairKey>,
    pub tensors: TensorBatch,
    pub reason: CloseReason,
    pub real_tokens: usize,
    /// When each pair entered the batcher, for queue-wait accounting.
    pub enqueued: Vec<Instant>,
    /// Span contexts of the events whose pairs ride in this batch, one each: the batch's span
    /// links to them.
    pub links: Vec<SpanContext>,
}

impl InferRequest {
    pub fn from_batch(batch: Batch, pad_id: u32, links: Vec<SpanContext>) -> Self {
        let tensors = TensorBatch::from_pairs(batch.pairs.iter().map(|p| &p.pair), pad_id);
        Self {
            keys: batch.pairs.iter().map(|p| p.key).collect(),
            enqueued: batch.pairs.iter().map(|p| p.enqueued).collect(),
            tensors,
            reason: batch.reason,
            real_tokens: batch.real_tokens,
            links,
        }
    }

    /// The result of scoring this request, begun at `started`: `out` holds a score or an error
    /// per row. The one way results are made, by the session thread and by benchmark scorers.
    pub fn finish(self, out: isolate::Isolated, started: Instant) -> InferResult {
        InferResult {
            keys: self.keys,
            scores: out.rows,
            started,
            elapsed: started.elapsed(),
            enqueued: self.enqueued,
            rows: self.tensors.rows,
            seq_len: self.tensors.seq_len,
            real_tokens: self.real_tokens,
            reason: self.reason,
            retries: out.retries,
            split_runs: out.split_runs,
            out_of_memory: out.out_of_memory,
        }
    }
}

/// Why a batch, or one event of it, has no usable scores; its events are dead-lettered as
/// `inference_failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum InferError {
    /// The session failed to run the batch.
    Run(String),
    /// The model returned a NaN or infinite logit.
    NonFinite(f32),
}

impl std::fmt::Display for InferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Run(e) => f.write_str(e),
            Self::NonFinite(x) => write!(f, "model returned a non-finite score ({x})"),
        }
    }
}

pub struct InferResult {
    pub keys: Vec<PairKey>,
    /// One per row (pair), in `keys` order: after retries and splitting, only the pairs that fail
    /// on their own are errors.
    pub scores: Vec<Result<Score, InferError>>,
    pub started: Instant,
    pub elapsed: Duration,
    pub enqueued: Vec<Instant>,
    pub rows: usize,
    pub seq_len: usize,
    pub real_tokens: usize,
    pub reason: CloseReason,
    pub retries: u32,
    pub split_runs: u32,
    /// The batch failed for lack of memory: the coordinator shrinks its token budget for a while.
    pub out_of_memory: bool,
}

/// Runs the session on its own thread until the request channel closes.
pub fn spawn(
    mut scorer: Scorer,
    policy: isolate::RetryPolicy,
    mut rx: mpsc::Receiver<InferRequest>,
    tx: mpsc::UnboundedSender<InferResult>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("inference".into())
        .spawn(move || {
            while let Some(req) = rx.blocking_recv() {
                let span = telemetry::batch_span(
                    &telemetry::BatchInfo {
                        events: req.links.len(),
                        pairs: req.tensors.rows,
                        seq_len: req.tensors.seq_len,
                        real_tokens: req.real_tokens,
                        reason: req.reason.as_str(),
                    },
                    &req.links,
                );
                let started = Instant::now();
                let out = span.in_scope(|| {
                    isolate::score_isolating(
                        &mut |t| scorer.score(t),
                        &req.tensors,
                        policy,
                        &mut std::thread::sleep,
                    )
                });
                if let Some(Err(e)) = out.rows.iter().find(|r| r.is_err()) {
                    span.record("otel.status_code", "ERROR");
                    span.record("otel.status_description", e.to_string().as_str());
                }
                drop(span);
                let res = req.finish(out, started);
                if tx.send(res).is_err() {
                    break;
                }
            }
        })
}
