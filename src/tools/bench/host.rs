//! `reranker bench --host-only`: the worker's host side without a broker or a model. Events held
//! in memory go through the worker's own admission threads (decode, tokenize), coordinator
//! (batch, tensors, assemble) and rendering; a no-op scorer answers every batch with zeros. Beside
//! it, in the same run, two floors on the same pairs, one thread: the library's tokenizer encoding
//! each pair whole, and this worker's own tokenize-once (each query once, each passage once)
//! alone, so that what the rest of the host path adds can be read off.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, Notify};

use crate::assemble::ModelRef;
use crate::config::Config;
use crate::model::isolate::Isolated;
use crate::model::{InferRequest, InferResult, Score};
use crate::obs::health::Health;
use crate::obs::metrics::{Metrics, ModelLabels};
use crate::obs::recorder::Recorder;
use crate::offsets::{SharedTracker, TopicPartition};
use crate::tokenize::PairTokenizer;
use crate::worker::admit::{AdmitPool, Admitter, Backpressure, InRecord};
use crate::worker::coordinator::{Coordinator, ToCoordinator, Wiring};
use crate::worker::finish::{Finished, Routes, Sink};
use crate::worker::inflight::InflightPairs;

pub struct HostOptions {
    pub events: usize,
    pub candidates: usize,
    /// Admission thread counts to run, one pass each.
    pub threads: Vec<usize>,
    pub data: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostRow {
    pub threads: usize,
    pub pairs: usize,
    pub seconds: f64,
    pub pairs_per_s: f64,
    /// Process CPU time (user + system, every thread) per pair.
    pub cpu_us_per_pair: f64,
    /// Output bytes rendered, to show the outputs were made.
    pub output_bytes: u64,
    /// Share of passages served by `pipeline.passage_cache_mb`'s cache, when it is on (each run
    /// starts with an empty one).
    pub passage_cache_hit_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostReport {
    pub events: usize,
    pub pairs: usize,
    pub max_length: usize,
    pub cores: usize,
    pub rows: Vec<HostRow>,
    /// The bare tokenizer (`encode` of each pair, one thread) on the same pairs.
    pub bare_tokenizer_cpu_us_per_pair: f64,
    pub bare_tokenizer_pairs_per_s: f64,
    /// Tokenize-once alone (`encode_query` per event, `encode_with` per pair, one thread).
    pub tokenize_once_cpu_us_per_pair: f64,
}

/// Process CPU time so far (every thread).
pub fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Counts outputs; wakes the bench when the last one is in.
#[derive(Clone)]
struct Count {
    inflight: Arc<InflightPairs>,
    done: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    want: u64,
    all: Arc<Notify>,
}

impl Sink for Count {
    fn finish(&self, f: Finished) {
        self.inflight.sub(f.pairs);
        let bytes = f.rec.as_ref().map_or(0, |r| r.payload.len());
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if self.done.fetch_add(1, Ordering::AcqRel) + 1 == self.want {
            self.all.notify_one();
        }
    }
}

pub fn host_only(cfg: &Config, opts: &HostOptions) -> anyhow::Result<HostReport> {
    let events = crate::demo::scifact_events(&opts.data, opts.events, opts.candidates, 10, "h")?;
    let payloads: Vec<Vec<u8>> = events
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()?;
    let load = || -> anyhow::Result<Arc<PairTokenizer>> {
        Ok(Arc::new(
            PairTokenizer::from_file(&cfg.model.dir.join("tokenizer.json"), cfg.model.max_length)?
                .with_long_passages(cfg.model.long_passages, cfg.model.chunk_overlap)?
                .with_passage_cache(cfg.pipeline.passage_cache_mb),
        ))
    };
    let tokenizer = load()?;
    let texts: Vec<(&str, &str)> = events
        .iter()
        .flat_map(|e| {
            let q = e["query"].as_str().unwrap_or_default();
            e["candidates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(move |c| (q, c["text"].as_str().unwrap_or_default()))
        })
        .collect();
    let cfg = Arc::new(cfg.clone());
    let mut rows = Vec::new();
    for &threads in &opts.threads {
        // A fresh (empty) passage cache per run, so that runs compare.
        let tokenizer = load()?;
        let mut row = run_pool(&cfg, &tokenizer, &payloads, texts.len(), threads)?;
        row.passage_cache_hit_ratio = tokenizer.passage_cache_stats().map(|s| {
            let hits = s.hits.load(Ordering::Relaxed) as f64;
            hits / (hits + s.misses.load(Ordering::Relaxed) as f64).max(1.0)
        });
        rows.push(row);
    }
    // The floor: the tokenizer alone, the pair as one input, one thread, same pairs.
    let (c0, t0) = (cpu_time(), Instant::now());
    for (q, p) in &texts {
        std::hint::black_box(tokenizer.encode(q, p)?);
    }
    let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
    // The worker's own tokenization alone, with a fresh cache when one is configured.
    let own = load()?;
    let c1 = cpu_time();
    for e in &events {
        let q = own.encode_query(e["query"].as_str().unwrap_or_default())?;
        for c in e["candidates"].as_array().into_iter().flatten() {
            std::hint::black_box(own.encode_with(&q, c["text"].as_str().unwrap_or_default())?);
        }
    }
    let own_cpu = cpu_time() - c1;
    Ok(HostReport {
        events: payloads.len(),
        pairs: texts.len(),
        max_length: cfg.model.max_length,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rows,
        bare_tokenizer_cpu_us_per_pair: cpu.as_secs_f64() * 1e6 / texts.len().max(1) as f64,
        bare_tokenizer_pairs_per_s: texts.len() as f64 / wall.as_secs_f64(),
        tokenize_once_cpu_us_per_pair: own_cpu.as_secs_f64() * 1e6 / texts.len().max(1) as f64,
    })
}

fn run_pool(
    cfg: &Arc<Config>,
    tokenizer: &Arc<PairTokenizer>,
    payloads: &[Vec<u8>],
    pairs: usize,
    threads: usize,
) -> anyhow::Result<HostRow> {
    // One runtime thread: the coordinator and the no-op scorer, as in the worker.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(async {
        let metrics = Metrics::new(
            ModelLabels {
                name: "noop",
                revision: "0",
                device: "cpu",
            },
            Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(60))),
            || 0,
            &crate::config::OtelConfig::default(),
        )?;
        let recorder = Arc::new(Recorder::new(metrics));
        let tracker = SharedTracker::default();
        let tp = TopicPartition {
            topic: "bench-in".into(),
            partition: 0,
        };
        tracker.lock().assign(tp.clone());
        let inflight = Arc::new(InflightPairs::default());
        let sink = Count {
            inflight: inflight.clone(),
            done: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
            want: payloads.len() as u64,
            all: Arc::new(Notify::new()),
        };
        let routes = Arc::new(Routes {
            output_topic: "bench-out".into(),
            dlq_topic: "bench-dlq".into(),
            propagate: cfg.output.propagate_headers.clone(),
        });
        let (coord_tx, coord_rx) = mpsc::unbounded_channel::<ToCoordinator>();
        let (infer_tx, mut infer_rx) = mpsc::channel::<InferRequest>(1);
        let (result_tx, result_rx) = mpsc::unbounded_channel::<InferResult>();
        // The no-op scorer: zeros, at once.
        tokio::spawn(async move {
            while let Some(req) = infer_rx.recv().await {
                let started = Instant::now();
                let zero = Score {
                    logit: 0.0,
                    relevance: 0.5,
                };
                let out = Isolated {
                    rows: vec![Ok(zero); req.tensors.rows],
                    retries: 0,
                    split_runs: 0,
                    out_of_memory: false,
                };
                let res = req.finish(out, started);
                if result_tx.send(res).is_err() {
                    break;
                }
            }
        });
        let coordinator = Coordinator::new(
            cfg,
            Wiring {
                sink: sink.clone(),
                routes: routes.clone(),
                model: ModelRef {
                    name: "noop".into(),
                    revision: "0".into(),
                    activation: "sigmoid".into(),
                },
                pad_id: tokenizer.pad_id(),
                recorder: recorder.clone(),
                inflight: inflight.clone(),
                tracker: None,
                idle: Arc::new(std::sync::atomic::AtomicBool::new(true)),
            },
        );
        let coord = tokio::spawn(coordinator.run(coord_rx, infer_tx, result_rx));
        let mut admitter = Admitter {
            cfg: cfg.clone(),
            tokenizer: tokenizer.clone(),
            tracker,
            coord_tx: coord_tx.clone(),
            sink: sink.clone(),
            routes,
            inflight,
            lanes: Default::default(),
            recorder,
            next_id: 0,
        };
        let pool = AdmitPool::start(&admitter, threads)?;
        let (c0, t0) = (cpu_time(), Instant::now());
        // Backpressure as in the worker: the batcher's pool stays within flow.max_inflight_pairs.
        let mut bp = Backpressure::new(cfg);
        for (offset, payload) in payloads.iter().enumerate() {
            loop {
                if let Some(pause) = bp.decide(admitter.inflight.get()) {
                    bp.paused = pause;
                }
                if !bp.paused {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let Some(slot) = pool.slot().await else {
                anyhow::bail!("admission pool closed");
            };
            let r = InRecord {
                tp: tp.clone(),
                offset: offset as i64,
                timestamp_ms: None,
                key: None,
                payload: Some(payload.clone()),
                headers: Vec::new(),
                trace: Vec::new(),
                priority: None,
            };
            if let Some(reg) = admitter.register(&r) {
                pool.submit(r, reg, slot);
            }
        }
        // The last partial batch closes on max_wait, as in the worker.
        tokio::time::timeout(Duration::from_secs(600), sink.all.notified())
            .await
            .map_err(|_| anyhow::anyhow!("the host path did not finish in 10 minutes"))?;
        let (cpu, wall) = (cpu_time() - c0, t0.elapsed());
        drop(pool);
        drop(coord_tx);
        drop(admitter);
        coord.abort();
        Ok(HostRow {
            threads,
            pairs,
            seconds: wall.as_secs_f64(),
            pairs_per_s: pairs as f64 / wall.as_secs_f64(),
            cpu_us_per_pair: cpu.as_secs_f64() * 1e6 / pairs.max(1) as f64,
            output_bytes: sink.bytes.load(Ordering::Relaxed),
            passage_cache_hit_ratio: None,
        })
    })
}

pub fn print_host(r: &HostReport) {
    println!(
        "host path: {} events, {} pairs, max_length {}, {} cores; no broker, no-op scorer",
        r.events, r.pairs, r.max_length, r.cores
    );
    println!(
        "| admission threads | pairs/s | CPU µs/pair | vs bare tokenizer | vs tokenize-once | scaling |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    // Scaling is against the first 1-thread row.
    let base = r
        .rows
        .iter()
        .find(|x| x.threads == 1)
        .or(r.rows.first())
        .map_or(1.0, |x| x.pairs_per_s);
    for x in &r.rows {
        println!(
            "| {} | {:.0} | {:.1} | {:.2}× | {:.2}× | {:.2}× |",
            x.threads,
            x.pairs_per_s,
            x.cpu_us_per_pair,
            x.cpu_us_per_pair / r.bare_tokenizer_cpu_us_per_pair,
            x.cpu_us_per_pair / r.tokenize_once_cpu_us_per_pair,
            x.pairs_per_s / base
        );
    }
    println!(
        "bare tokenizer (the library's pair encode, 1 thread): {:.1} CPU µs/pair, {:.0} pairs/s",
        r.bare_tokenizer_cpu_us_per_pair, r.bare_tokenizer_pairs_per_s
    );
    println!(
        "tokenize-once alone (this worker's tokenizer, 1 thread): {:.1} CPU µs/pair",
        r.tokenize_once_cpu_us_per_pair
    );
    if let Some(h) = r.rows.first().and_then(|x| x.passage_cache_hit_ratio) {
        println!(
            "passage cache on (pipeline.passage_cache_mb): {:.1} % of passages hit",
            100.0 * h
        );
    }
}
