//! `reranker bench --model-only` and `reranker check-model`: the bare ONNX Runtime session, which
//! is the ceiling the end-to-end pipeline is measured against.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::config::ModelConfig;
use crate::model::{Scorer, TensorBatch};
use crate::tokenize::{EncodedPair, PairTokenizer};

#[derive(Debug, Clone, Serialize)]
pub struct ShapeResult {
    pub batch: usize,
    pub seq_len: usize,
    pub runs: usize,
    pub pairs_per_s: f64,
    pub ms_per_batch: f64,
}

/// Scores synthetic batches of exactly `batch × seq_len` tokens (no padding) for about `budget`
/// per shape, after one untimed warm-up run.
pub fn model_only(
    scorer: &mut Scorer,
    batches: &[usize],
    seq_lens: &[usize],
    budget: Duration,
) -> anyhow::Result<Vec<ShapeResult>> {
    let mut out = Vec::new();
    for &seq_len in seq_lens {
        // A realistic id mix: [CLS] query [SEP] passage [SEP] with segment ids.
        let q = seq_len / 4;
        let ids: Vec<u32> = (0..seq_len)
            .map(|i| match i {
                0 => 101,
                _ if i == q || i + 1 == seq_len => 102,
                _ => 1000 + (i as u32 * 7919) % 20000,
            })
            .collect();
        let type_ids: Vec<u32> = (0..seq_len).map(|i| u32::from(i > q)).collect();
        let pair = EncodedPair {
            ids,
            type_ids,
            truncated: false,
        };
        for &batch in batches {
            let t = TensorBatch::from_pairs(std::iter::repeat_n(&pair, batch), 0);
            scorer.score(&t)?;
            let t0 = Instant::now();
            let mut runs = 0;
            while runs < 2 || t0.elapsed() < budget {
                scorer.score(&t)?;
                runs += 1;
            }
            let el = t0.elapsed().as_secs_f64();
            out.push(ShapeResult {
                batch,
                seq_len,
                runs,
                pairs_per_s: (runs * batch) as f64 / el,
                ms_per_batch: el * 1e3 / runs as f64,
            });
        }
    }
    Ok(out)
}

pub fn print_table(rows: &[ShapeResult]) {
    println!(
        "{:>6} {:>8} {:>6} {:>12} {:>12}",
        "batch", "seq_len", "runs", "pairs/s", "ms/batch"
    );
    for r in rows {
        println!(
            "{:>6} {:>8} {:>6} {:>12.1} {:>12.1}",
            r.batch, r.seq_len, r.runs, r.pairs_per_s, r.ms_per_batch
        );
    }
}

#[derive(Debug, Serialize)]
pub struct Parity {
    pub rows: usize,
    pub max_abs_diff: f64,
    pub ids_mismatched: usize,
    pub queries: usize,
    pub orderings_differing: usize,
}

/// Compares against `reference.jsonl` rows `{query, passage, max_length, logit, input_ids?}`
/// (computed with transformers on the same weights), scoring in padded, mixed-length batches.
pub fn parity(scorer: &mut Scorer, model_dir: &Path, reference: &Path) -> anyhow::Result<Parity> {
    let f =
        std::fs::File::open(reference).with_context(|| format!("open {}", reference.display()))?;
    let rows: Vec<serde_json::Value> = std::io::BufReader::new(f)
        .lines()
        .map(|l| Ok(serde_json::from_str(&l?)?))
        .collect::<anyhow::Result<_>>()?;
    let mut by_len: HashMap<usize, Vec<&serde_json::Value>> = HashMap::new();
    for r in &rows {
        let ml = r["max_length"].as_u64().unwrap_or(512) as usize;
        by_len.entry(ml).or_default().push(r);
    }
    let mut max_abs_diff = 0.0f64;
    let mut ids_mismatched = 0;
    // (max_length, query) -> [(ours, reference)]
    let mut per_query: HashMap<(usize, String), Vec<(f64, f64)>> = HashMap::new();
    for (ml, group) in by_len {
        let tok = PairTokenizer::from_file(&model_dir.join("tokenizer.json"), ml)?;
        let enc: Vec<EncodedPair> = group
            .iter()
            .map(|r| {
                tok.encode(
                    r["query"].as_str().unwrap_or(""),
                    r["passage"].as_str().unwrap_or(""),
                )
            })
            .collect::<anyhow::Result<_>>()?;
        for (r, e) in group.iter().zip(&enc) {
            if let Some(want) = r["input_ids"].as_array() {
                let want: Vec<u32> = want
                    .iter()
                    .filter_map(|v| v.as_u64().map(|x| x as u32))
                    .collect();
                ids_mismatched += usize::from(want != e.ids);
            }
        }
        for (rs, es) in group.chunks(16).zip(enc.chunks(16)) {
            let scores = scorer.score(&TensorBatch::from_pairs(es.iter(), tok.pad_id()))?;
            for (r, s) in rs.iter().zip(scores) {
                let want = r["logit"].as_f64().unwrap_or(f64::NAN);
                let d = (s.logit as f64 - want).abs();
                max_abs_diff = if d.is_nan() {
                    f64::INFINITY
                } else {
                    max_abs_diff.max(d)
                };
                per_query
                    .entry((ml, r["query"].as_str().unwrap_or("").to_string()))
                    .or_default()
                    .push((s.logit as f64, want));
            }
        }
    }
    let order = |v: &[f64]| {
        let mut i: Vec<usize> = (0..v.len()).collect();
        i.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        i
    };
    let orderings_differing = per_query
        .values()
        .filter(|v| {
            let ours: Vec<f64> = v.iter().map(|p| p.0).collect();
            let theirs: Vec<f64> = v.iter().map(|p| p.1).collect();
            order(&ours) != order(&theirs)
        })
        .count();
    Ok(Parity {
        rows: rows.len(),
        max_abs_diff,
        ids_mismatched,
        queries: per_query.len(),
        orderings_differing,
    })
}

/// `reranker check-model`: load, describe, parity, short throughput table. Fails (non-zero exit)
/// when parity is off.
pub fn check_model(cfg: &ModelConfig) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut scorer = Scorer::load(
        cfg,
        &cfg.dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    )?;
    let info = scorer.info().clone();
    println!("model      {}", info.file.display());
    println!("revision   {}", info.revision);
    println!("inputs     {}", info.inputs.join(", "));
    println!(
        "outputs    {} ({} label(s), using column {})",
        info.outputs.join(", "),
        info.num_labels,
        info.label_index
    );
    println!(
        "segment ids {}",
        if info.has_token_type_ids {
            "fed (graph has token_type_ids)"
        } else {
            "not used (graph has no token_type_ids)"
        }
    );
    println!(
        "types      ids {}, logits {}",
        info.ids.as_str(),
        info.logits.as_str()
    );
    println!("activation {}", info.activation);
    println!("device     {}", info.device);
    println!("loaded in  {:.2} s", t0.elapsed().as_secs_f64());
    // The tokenizer too: a model directory is only usable when both load and agree.
    let tok = PairTokenizer::from_file(&cfg.dir.join("tokenizer.json"), cfg.max_length)?;
    let sample = tok.encode(
        "what does a cross-encoder do?",
        "A cross-encoder reads a query and a passage together and scores their relevance.",
    )?;
    let s = scorer.score(&TensorBatch::from_pairs(
        std::iter::once(&sample),
        tok.pad_id(),
    ))?;
    println!(
        "tokenizer  loads; a sample pair is {} tokens, logit {:.3}",
        sample.len(),
        s[0].logit
    );
    let reference = cfg.dir.join("reference.jsonl");
    let mut ok = true;
    if reference.exists() {
        let p = parity(&mut scorer, &cfg.dir, &reference)?;
        ok = p.max_abs_diff <= 1e-4 && p.ids_mismatched == 0 && p.orderings_differing == 0;
        println!(
            "parity     {} rows, max |logit diff| {:.2e}, input_ids mismatches {}, orderings differing {}/{} → {}",
            p.rows,
            p.max_abs_diff,
            p.ids_mismatched,
            p.orderings_differing,
            p.queries,
            if ok { "OK" } else { "FAILED" }
        );
    } else {
        println!("parity     no reference.jsonl beside the model; skipped");
    }
    println!(
        "\nthroughput (bare session, {} intra-op threads):",
        cfg.intra_op_threads
    );
    let rows = model_only(
        &mut scorer,
        &[1, 8, 32],
        &[128.min(cfg.max_length)],
        Duration::from_millis(1500),
    )?;
    print_table(&rows);
    if !ok {
        anyhow::bail!(
            "parity check failed (tolerance 1e-4 on logits, exact input_ids and ordering)"
        );
    }
    Ok(())
}
