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

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::Value;

use crate::batch::{BatchPolicy, Batcher, PairKey, PendingPair};
use crate::config::Config;
use crate::infer::{Scorer, TensorBatch};
use crate::tokenize::PairTokenizer;

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

/// Relevance judgments: query id → document id → grade.
pub type Qrels = HashMap<String, HashMap<String, f64>>;

pub fn read_qrels(path: &Path) -> anyhow::Result<Qrels> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut q: Qrels = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').map(str::trim).collect();
        if line.trim().is_empty() {
            continue;
        }
        let grade = f.get(2).and_then(|s| s.parse::<f64>().ok());
        match (f.len(), grade) {
            (3, Some(g)) => {
                q.entry(f[0].to_string())
                    .or_default()
                    .insert(f[1].to_string(), g);
            }
            _ if i == 0 => {} // header
            _ => bail!(
                "{}:{}: expected `query-id<TAB>corpus-id<TAB>score`",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(q)
}

pub struct LabelledQuery {
    pub id: String,
    pub query: String,
    /// (id, text) in first-stage order.
    pub candidates: Vec<(String, String)>,
}

fn id_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Queries that have at least one relevant judgment, in file order, at most `limit` (0 = all).
pub fn read_queries(
    path: &Path,
    qrels: &Qrels,
    limit: usize,
) -> anyhow::Result<Vec<LabelledQuery>> {
    let mut out = Vec::new();
    for (i, row) in crate::demo::read_jsonl(path)?.into_iter().enumerate() {
        let id = id_of(&row["query_id"])
            .or_else(|| id_of(&row["request_id"]))
            .with_context(|| {
                format!(
                    "{} line {}: no query_id or request_id",
                    path.display(),
                    i + 1
                )
            })?;
        if !qrels.get(&id).is_some_and(|j| j.values().any(|&g| g > 0.0)) {
            continue;
        }
        let candidates = row["candidates"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        (
                            id_of(&c["id"]).unwrap_or_default(),
                            c["text"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(LabelledQuery {
            id,
            query: row["query"].as_str().unwrap_or_default().to_string(),
            candidates,
        });
        if limit > 0 && out.len() == limit {
            break;
        }
    }
    if out.is_empty() {
        bail!(
            "no query in {} has a relevant judgment in the qrels",
            path.display()
        );
    }
    Ok(out)
}

/// nDCG@10 with linear gains (as trec_eval / BEIR); the ideal ranking is over every judged
/// document of the query, retrieved or not.
pub fn ndcg_at_10(ranked: &[&str], judged: &HashMap<String, f64>) -> f64 {
    let dcg: f64 = ranked
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, d)| judged.get(*d).copied().unwrap_or(0.0) / ((i + 2) as f64).log2())
        .sum();
    let mut ideal: Vec<f64> = judged.values().copied().filter(|&g| g > 0.0).collect();
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(10)
        .enumerate()
        .map(|(i, g)| g / ((i + 2) as f64).log2())
        .sum();
    if idcg > 0.0 {
        dcg / idcg
    } else {
        0.0
    }
}

fn mrr_at_10(ranked: &[&str], judged: &HashMap<String, f64>) -> f64 {
    ranked
        .iter()
        .take(10)
        .position(|d| judged.get(*d).is_some_and(|&g| g > 0.0))
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

fn recall_at(ranked: &[&str], judged: &HashMap<String, f64>, n: usize) -> f64 {
    let relevant = judged.values().filter(|&&g| g > 0.0).count();
    let found = ranked
        .iter()
        .take(n)
        .filter(|d| judged.get(**d).is_some_and(|&g| g > 0.0))
        .count();
    if relevant == 0 {
        0.0
    } else {
        found as f64 / relevant as f64
    }
}

fn quality(lists: &[(Vec<&str>, &HashMap<String, f64>)], ns: &[usize]) -> Quality {
    let m = lists.len().max(1) as f64;
    Quality {
        ndcg_at_10: lists.iter().map(|(r, j)| ndcg_at_10(r, j)).sum::<f64>() / m,
        mrr_at_10: lists.iter().map(|(r, j)| mrr_at_10(r, j)).sum::<f64>() / m,
        recall_at_n: ns
            .iter()
            .map(|&n| {
                (
                    n,
                    lists.iter().map(|(r, j)| recall_at(r, j, n)).sum::<f64>() / m,
                )
            })
            .collect(),
    }
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
        max_pairs: cfg.batch.max_batch_pairs,
        max_tokens: cfg.batch.max_batch_tokens,
        max_wait: Duration::from_millis(cfg.batch.max_wait_ms),
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

/// The per-K table, Markdown (it goes into the README as printed).
pub fn table(r: &TuneReport) -> String {
    let mut s = String::new();
    let recall_h: String =
        r.ns.iter()
            .map(|n| format!(" recall@{n} before → after |"))
            .collect();
    let _ = writeln!(
        s,
        "| K | nDCG@10 before → after | MRR@10 before → after |{recall_h} pairs/s | latency per event p50 / p95 |"
    );
    let _ = writeln!(s, "|{}", " --- |".repeat(5 + r.ns.len()));
    for row in &r.rows {
        let recall: String =
            r.ns.iter()
                .map(|n| {
                    format!(
                        " {:.3} → {:.3} |",
                        row.before.recall_at_n[n], row.after.recall_at_n[n]
                    )
                })
                .collect();
        let _ = writeln!(
            s,
            "| {}{} | {:.3} → {:.3} | {:.3} → {:.3} |{recall} {:.1} | {:.0} / {:.0} ms |",
            row.k,
            if row.k == r.recommended_k { " ✓" } else { "" },
            row.before.ndcg_at_10,
            row.after.ndcg_at_10,
            row.before.mrr_at_10,
            row.after.mrr_at_10,
            row.pairs_per_s,
            row.latency_ms_p50,
            row.latency_ms_p95,
        );
    }
    let _ = writeln!(
        s,
        "\n{} queries, model {} @ {} (max_length {}, {}); recommended K = {} ({}; best nDCG@10 {:.3}).",
        r.queries,
        r.model,
        r.model_revision,
        r.max_length,
        r.device,
        r.recommended_k,
        r.rule,
        r.best_ndcg_at_10
    );
    s
}

/// Quality (nDCG@10 before and after) and cost (p50 latency per event) against K, as SVG.
pub fn svg(r: &TuneReport) -> String {
    let (w, h) = (760.0, 420.0);
    let (l, rt, top, bot) = (70.0, 80.0, 50.0, 60.0);
    let (pw, ph) = (w - l - rt, h - top - bot);
    let kmin = r.rows.first().map_or(1, |x| x.k) as f64;
    let kmax = r.rows.last().map_or(1, |x| x.k) as f64;
    // K on a log axis: the default 10, 20, 50, 100 spreads evenly.
    let x = |k: usize| {
        if kmax > kmin {
            l + pw * ((k as f64).ln() - kmin.ln()) / (kmax.ln() - kmin.ln())
        } else {
            l + pw / 2.0
        }
    };
    let qs: Vec<f64> = r
        .rows
        .iter()
        .flat_map(|x| [x.before.ndcg_at_10, x.after.ndcg_at_10])
        .collect();
    let qlo = (qs.iter().copied().fold(f64::INFINITY, f64::min) - 0.02).max(0.0);
    let qhi = (qs.iter().copied().fold(f64::NEG_INFINITY, f64::max) + 0.02).min(1.0);
    let yq = |v: f64| top + ph * (1.0 - (v - qlo) / (qhi - qlo).max(1e-9));
    let lmax = r
        .rows
        .iter()
        .map(|x| x.latency_ms_p50)
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.1;
    let yl = |v: f64| top + ph * (1.0 - v / lmax);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">reranker tune: {} ({} queries, max_length {})</text>"#,
        w / 2.0,
        esc(&r.model),
        r.queries,
        r.max_length
    );
    let _ = writeln!(
        s,
        r#"<rect x="{l}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    for i in 0..=4 {
        let v = qlo + (qhi - qlo) * i as f64 / 4.0;
        let lv = lmax * i as f64 / 4.0;
        let y = yq(v);
        let _ = writeln!(
            s,
            r##"<line x1="{l}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.3}</text><text x="{}" y="{:.1}">{lv:.0}</text>"##,
            l + pw,
            l - 6.0,
            y + 4.0,
            l + pw + 6.0,
            yl(lv) + 4.0
        );
    }
    for row in &r.rows {
        let xk = x(row.k);
        let _ = writeln!(
            s,
            r#"<text x="{xk:.1}" y="{}" text-anchor="middle">{}</text>"#,
            top + ph + 18.0,
            row.k
        );
    }
    let poly = |f: &dyn Fn(&KRow) -> f64, y: &dyn Fn(f64) -> f64| -> String {
        r.rows
            .iter()
            .map(|row| format!("{:.1},{:.1}", x(row.k), y(f(row))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for (pts, color, dash) in [
        (poly(&|r| r.before.ndcg_at_10, &yq), "#888", "6 4"),
        (poly(&|r| r.after.ndcg_at_10, &yq), "#1f77b4", "none"),
        (poly(&|r| r.latency_ms_p50, &yl), "#d62728", "2 3"),
    ] {
        let _ = writeln!(
            s,
            r#"<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/>"#
        );
        for p in pts.split(' ') {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(s, r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
        }
    }
    let xr = x(r.recommended_k);
    let _ = writeln!(
        s,
        r##"<line x1="{xr:.1}" x2="{xr:.1}" y1="{top}" y2="{}" stroke="#2ca02c" stroke-dasharray="4 3"/><text x="{:.1}" y="{}" fill="#2ca02c">recommended K = {}</text>"##,
        top + ph,
        xr + 4.0,
        top + 14.0,
        r.recommended_k
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">K (candidates reranked per event, log scale)</text>"#,
        l + pw / 2.0,
        h - 22.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">nDCG@10</text>"#,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(90)" text-anchor="middle">latency per event, p50 (ms)</text>"#,
        w - 20.0,
        top + ph / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{l}" y="{}"><tspan fill="#888">- - nDCG@10 first stage</tspan>   <tspan fill="#1f77b4">— nDCG@10 reranked</tspan>   <tspan fill="#d62728">··· latency p50</tspan></text>"##,
        h - 6.0
    );
    s.push_str("</svg>\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn judged(pairs: &[(&str, f64)]) -> HashMap<String, f64> {
        pairs.iter().map(|(d, g)| (d.to_string(), *g)).collect()
    }

    #[test]
    fn ndcg_counts_relevant_documents_that_were_not_retrieved() {
        let j = judged(&[("a", 1.0), ("b", 1.0)]);
        assert!((ndcg_at_10(&["a", "b"], &j) - 1.0).abs() < 1e-12);
        // Only one of two relevant documents retrieved, at rank 2.
        let want = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((ndcg_at_10(&["x", "a"], &j) - want).abs() < 1e-12);
        assert_eq!(mrr_at_10(&["x", "a"], &j), 0.5);
        assert_eq!(recall_at(&["x", "a"], &j, 1), 0.0);
        assert_eq!(recall_at(&["x", "a"], &j, 2), 0.5);
    }

    #[test]
    fn qrels_skip_the_header_and_reject_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.tsv");
        std::fs::write(&p, "query-id\tcorpus-id\tscore\n1\td1\t1\n1\td2\t0\n").unwrap();
        let q = read_qrels(&p).unwrap();
        assert_eq!(q["1"].len(), 2);
        std::fs::write(&p, "query-id\tcorpus-id\tscore\n1 d1 1\n").unwrap();
        assert!(read_qrels(&p).is_err());
    }
}
