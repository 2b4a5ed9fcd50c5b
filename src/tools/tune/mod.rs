//! `reranker tune`: how many candidates per event (K) to rerank and how many to publish (N),
//! measured on labelled retrieval results with the worker's own tokenizer, batcher and session.
//!
//! Quality comes from one pass that scores every query's first-stage top max(K): reranking the
//! top K is sorting that list's first K entries by their scores, since a pair's score does not
//! depend on the rest of its batch (the report carries the largest difference seen between the
//! timed runs at smaller K and that prefix, so this stays checked: 0 for the fp32 MiniLM; a
//! dynamically quantized int8 graph scales activations per batch, and its scores move by up to
//! ~0.3 logits with the batch, in the worker as here). Cost is measured per K on events of
//! exactly K candidates, one at a time, as an idle worker would see them.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use serde::Serialize;

use crate::batch::{BatchPolicy, Batcher, PairKey, PendingPair};
use crate::config::Config;
use crate::model::{Scorer, TensorBatch};
use crate::tokenize::PairTokenizer;

mod judgments;
mod report;

use judgments::quality;
pub use judgments::{ndcg_at_10, read_qrels, read_queries, LabelledQuery, Qrels};
pub use report::{svg, table};

pub const SCIFACT_QRELS: &str = "../shared/data/scifact/qrels-test.tsv";

/// nDCG@10 within this fraction of the best counts as "as good" when recommending K.
const WITHIN: f64 = 0.01;

pub struct TuneOptions {
    /// JSONL (gzip or plain): SciFact rows `{query_id, query, candidates}` or retrieval-result
    /// events `{request_id, query, candidates}`; candidates in first-stage order.
    pub data: PathBuf,
    /// TSV `query-id corpus-id score` (a header line is skipped).
    pub qrels: PathBuf,
    pub ks: Vec<usize>,
    pub ns: Vec<usize>,
    /// Judged queries to evaluate (0 = all).
    pub queries: usize,
    /// Events per K for the cost measurement.
    pub cost_queries: usize,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Quality {
    pub ndcg_at_10: f64,
    pub mrr_at_10: f64,
    /// Keyed by N.
    pub recall_at_n: BTreeMap<usize, f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct KRow {
    pub k: usize,
    /// First-stage order, cut at K.
    pub before: Quality,
    /// The top K sorted by the model's score.
    pub after: Quality,
    /// Model pairs (a chunked candidate counts each window) per second over the cost events.
    pub pairs_per_s: f64,
    /// Wall time per event of K candidates: tokenize, batch, score.
    pub latency_ms_mean: f64,
    pub latency_ms_p50: f64,
    pub latency_ms_p95: f64,
    pub cost_events: usize,
    /// Largest |logit| difference between the cost events' scores and the same candidates'
    /// scores in the max-K pass (0 when batching does not change scores).
    pub max_score_diff_vs_prefix: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CandidateScore {
    pub id: String,
    pub score: f32,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueryScores {
    pub query_id: String,
    /// The first-stage top max(K), in first-stage order, with the model's logit.
    pub candidates: Vec<CandidateScore>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TuneReport {
    pub model: String,
    pub model_revision: String,
    pub model_file: PathBuf,
    pub max_length: usize,
    pub max_batch_pairs: usize,
    pub device: String,
    pub data: PathBuf,
    pub qrels: PathBuf,
    pub queries: usize,
    pub ks: Vec<usize>,
    pub ns: Vec<usize>,
    pub rows: Vec<KRow>,
    pub best_ndcg_at_10: f64,
    pub recommended_k: usize,
    pub rule: String,
    pub wall_s: f64,
    pub scores: Vec<QueryScores>,
}

/// Scores one event the way the worker does: the pipeline's tokenizer, its length-grouped
/// batcher with the configured budgets, the session; a chunked candidate scores as its best
/// window. Returns one logit per candidate and the number of model pairs.
fn score_event(
    tok: &PairTokenizer,
    scorer: &mut Scorer,
    batcher: &mut Batcher,
    query: &str,
    candidates: &[(String, String)],
) -> anyhow::Result<(Vec<f32>, usize)> {
    let now = Instant::now();
    let mut pairs = 0;
    for (i, (_, text)) in candidates.iter().enumerate() {
        for pair in tok.encode_candidate(query, text)?.pairs {
            pairs += 1;
            batcher.push(PendingPair {
                key: PairKey {
                    event: 0,
                    index: i as u32,
                },
                pair,
                enqueued: now,
                deadline: None,
                lane: Default::default(),
            });
        }
    }
    let mut best = vec![f32::NEG_INFINITY; candidates.len()];
    while let Some(batch) = batcher.flush() {
        let t = TensorBatch::from_pairs(batch.pairs.iter().map(|p| &p.pair), tok.pad_id());
        for (p, s) in batch.pairs.iter().zip(scorer.score(&t)?) {
            let b = &mut best[p.key.index as usize];
            *b = b.max(s.logit);
        }
    }
    Ok((best, pairs))
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

pub fn run(cfg: &Config, opts: &TuneOptions) -> anyhow::Result<TuneReport> {
    let t0 = Instant::now();
    let mut ks = opts.ks.clone();
    ks.sort_unstable();
    ks.dedup();
    if ks.is_empty() || ks[0] == 0 {
        bail!("--k needs positive values");
    }
    let kmax = *ks.last().unwrap_or(&1);
    let qrels = read_qrels(&opts.qrels)?;
    let queries = read_queries(&opts.data, &qrels, opts.queries)?;
    let tok =
        PairTokenizer::from_file(&cfg.model.dir.join("tokenizer.json"), cfg.model.max_length)?
            .with_long_passages(cfg.model.long_passages, cfg.model.chunk_overlap)?;
    let mut scorer = Scorer::load(&cfg.model, &cfg.model_name())?;
    let info = scorer.info().clone();
    let mut batcher = Batcher::new(BatchPolicy {
        bulk_max_skips: 0,
        ..BatchPolicy::from_config(cfg)
    });
    let cost_n = opts.cost_queries.clamp(1, queries.len());
    eprintln!(
        "tune: {} on {}, max_length {}, {} judged queries × top {kmax}; cost per K over {cost_n} events",
        info.name, info.device, cfg.model.max_length, queries.len()
    );

    let total: u64 = queries
        .iter()
        .map(|q| q.candidates.len().min(kmax) as u64)
        .sum::<u64>()
        + ks[..ks.len() - 1]
            .iter()
            .map(|&k| {
                queries[..cost_n]
                    .iter()
                    .map(|q| q.candidates.len().min(k) as u64)
                    .sum::<u64>()
            })
            .sum::<u64>();
    let bar = if opts.progress {
        indicatif::ProgressBar::with_draw_target(
            Some(total),
            indicatif::ProgressDrawTarget::stderr(),
        )
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} candidates  {msg}  {elapsed_precise} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );

    // Untimed warm-up: the session's first runs allocate and are slower.
    let warm = &queries[0];
    score_event(
        &tok,
        &mut scorer,
        &mut batcher,
        &warm.query,
        &warm.candidates[..warm.candidates.len().min(8)],
    )?;

    // The max-K pass: every query's scores, and the cost of K = max(K) on its first events.
    bar.set_message(format!("scoring top {kmax}"));
    let mut scores: Vec<Vec<f32>> = Vec::with_capacity(queries.len());
    let mut cost: BTreeMap<usize, Vec<(f64, usize)>> = BTreeMap::new();
    for (i, q) in queries.iter().enumerate() {
        let cands = &q.candidates[..q.candidates.len().min(kmax)];
        let t = Instant::now();
        let (s, pairs) = score_event(&tok, &mut scorer, &mut batcher, &q.query, cands)?;
        let el = t.elapsed().as_secs_f64();
        if i < cost_n {
            cost.entry(kmax).or_default().push((el, pairs));
        }
        scores.push(s);
        bar.inc(cands.len() as u64);
    }
    let mut diffs: BTreeMap<usize, f64> = BTreeMap::new();
    for &k in &ks[..ks.len() - 1] {
        bar.set_message(format!("timing K = {k}"));
        for (i, q) in queries[..cost_n].iter().enumerate() {
            let cands = &q.candidates[..q.candidates.len().min(k)];
            let t = Instant::now();
            let (s, pairs) = score_event(&tok, &mut scorer, &mut batcher, &q.query, cands)?;
            cost.entry(k)
                .or_default()
                .push((t.elapsed().as_secs_f64(), pairs));
            let d = diffs.entry(k).or_default();
            for (a, b) in s.iter().zip(&scores[i]) {
                *d = d.max((a - b).abs() as f64);
            }
            bar.inc(cands.len() as u64);
        }
    }
    bar.finish_and_clear();

    let mut rows = Vec::new();
    for &k in &ks {
        let mut before = Vec::new();
        let mut after = Vec::new();
        for (q, s) in queries.iter().zip(&scores) {
            let judged = &qrels[&q.id];
            let n = q.candidates.len().min(k);
            let ids: Vec<&str> = q.candidates[..n].iter().map(|c| c.0.as_str()).collect();
            let mut order: Vec<usize> = (0..n).collect();
            // Stable: ties keep the first-stage order, as the worker's assembler does.
            order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
            after.push((order.iter().map(|&i| ids[i]).collect(), judged));
            before.push((ids, judged));
        }
        let c = &cost[&k];
        let secs: f64 = c.iter().map(|x| x.0).sum();
        let pairs: usize = c.iter().map(|x| x.1).sum();
        let mut lat: Vec<f64> = c.iter().map(|x| x.0 * 1e3).collect();
        lat.sort_by(f64::total_cmp);
        rows.push(KRow {
            k,
            before: quality(&before, &opts.ns),
            after: quality(&after, &opts.ns),
            pairs_per_s: pairs as f64 / secs,
            latency_ms_mean: lat.iter().sum::<f64>() / lat.len() as f64,
            latency_ms_p50: percentile(&lat, 0.5),
            latency_ms_p95: percentile(&lat, 0.95),
            cost_events: c.len(),
            max_score_diff_vs_prefix: diffs.get(&k).copied().unwrap_or(0.0),
        });
    }
    let best = rows
        .iter()
        .map(|r| r.after.ndcg_at_10)
        .fold(f64::NEG_INFINITY, f64::max);
    let recommended_k = rows
        .iter()
        .find(|r| r.after.ndcg_at_10 >= best * (1.0 - WITHIN))
        .map_or(kmax, |r| r.k);
    Ok(TuneReport {
        model: info.name.clone(),
        model_revision: info.revision.clone(),
        model_file: info.file.clone(),
        max_length: cfg.model.max_length,
        max_batch_pairs: cfg.batch.max_batch_pairs,
        device: info.device.to_string(),
        data: opts.data.clone(),
        qrels: opts.qrels.clone(),
        queries: queries.len(),
        ks,
        ns: opts.ns.clone(),
        rows,
        best_ndcg_at_10: best,
        recommended_k,
        rule: format!(
            "smallest K whose nDCG@10 after reranking is within {}% of the best",
            WITHIN * 100.0
        ),
        wall_s: t0.elapsed().as_secs_f64(),
        scores: queries
            .iter()
            .zip(scores)
            .map(|(q, s)| QueryScores {
                query_id: q.id.clone(),
                candidates: q
                    .candidates
                    .iter()
                    .zip(s)
                    .map(|(c, score)| CandidateScore {
                        id: c.0.clone(),
                        score,
                    })
                    .collect(),
            })
            .collect(),
    })
}
