//! `reranker bench --lanes`: what priority lanes buy. A bulk backlog is scored by the real batcher
//! and the real session, once alone and once with interactive events arriving at a fixed pace; the
//! report gives the interactive events' latency against the bound `max_wait_ms` + 2 × one batch
//! time, and the backlog's throughput with the interactive traffic against its throughput alone.
//!
//! No broker: this measures the scheduling inside one worker (batcher and model), which is what the
//! lanes change. Latency through Kafka adds the consumer's fetch and the producer's acknowledgement.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::batch::{BatchPolicy, Batcher, Lane, PairKey, PendingPair};
use crate::config::Config;
use crate::model::{Scorer, TensorBatch};
use crate::tokenize::{EncodedPair, PairTokenizer};

pub struct LanesOptions {
    /// Bulk events in the backlog, and candidates per bulk event.
    pub bulk_events: usize,
    pub candidates: usize,
    /// One interactive event every this long, with this many candidates.
    pub interactive_every: Duration,
    pub interactive_candidates: usize,
    pub data: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct LanesReport {
    pub bulk_pairs: usize,
    pub bulk_alone_pairs_per_s: f64,
    pub bulk_with_interactive_pairs_per_s: f64,
    /// Bulk throughput with the interactive traffic / alone.
    pub bulk_throughput_ratio: f64,
    /// Share of the model's pairs that were interactive in the mixed run.
    pub interactive_pair_share: f64,
    pub interactive_events: usize,
    pub interactive_p50_ms: f64,
    pub interactive_p99_ms: f64,
    pub interactive_max_ms: f64,
    /// Mean time of one batch in the mixed run.
    pub batch_ms: f64,
    pub max_wait_ms: u64,
    /// `max_wait_ms` + 2 × `batch_ms`.
    pub bound_ms: f64,
    pub p99_within_bound: bool,
}

struct Encoded {
    pairs: Vec<EncodedPair>,
}

fn encode(
    tok: &PairTokenizer,
    data: &std::path::Path,
    n: usize,
    k: usize,
    prefix: &str,
) -> anyhow::Result<Vec<Encoded>> {
    let events = crate::demo::scifact_events(data, n, k, k, prefix)?;
    let mut out = Vec::with_capacity(n);
    for e in &events {
        let query = e["query"].as_str().unwrap_or_default();
        let mut pairs = Vec::new();
        for c in e["candidates"].as_array().into_iter().flatten() {
            let text = c["text"].as_str().unwrap_or_default();
            pairs.extend(tok.encode_candidate(query, text)?.pairs);
        }
        out.push(Encoded { pairs });
    }
    Ok(out)
}

struct Run {
    bulk_pairs_per_s: f64,
    interactive_ms: Vec<f64>,
    interactive_pairs: usize,
    pairs: usize,
    batches: usize,
    model_time: Duration,
}

/// Scores the backlog (all queued at the start) until it is done, interactive events arriving
/// every `every` meanwhile (none when `interactive` is empty).
fn run(
    scorer: &mut Scorer,
    policy: BatchPolicy,
    pad_id: u32,
    bulk: &[Encoded],
    interactive: &[Encoded],
    every: Duration,
) -> anyhow::Result<Run> {
    let mut b = Batcher::new(policy);
    let t0 = Instant::now();
    let mut bulk_left = 0;
    for (e, ev) in bulk.iter().enumerate() {
        for (i, p) in ev.pairs.iter().enumerate() {
            b.push(PendingPair {
                key: PairKey {
                    event: e as u64,
                    index: i as u32,
                },
                pair: p.clone(),
                enqueued: t0,
                deadline: None,
                lane: Lane::Bulk,
            });
            bulk_left += 1;
        }
    }
    let bulk_total = bulk_left;
    let base = bulk.len() as u64;
    // Interactive event id -> (arrival, pairs left).
    let mut open: HashMap<u64, (Instant, usize)> = HashMap::new();
    let mut next = 0usize;
    let mut next_at = t0 + every;
    let mut r = Run {
        bulk_pairs_per_s: 0.0,
        interactive_ms: Vec::new(),
        interactive_pairs: 0,
        pairs: 0,
        batches: 0,
        model_time: Duration::ZERO,
    };
    let mut bulk_done_at = t0;
    while bulk_left > 0 {
        let now = Instant::now();
        while !interactive.is_empty() && now >= next_at {
            let ev = &interactive[next % interactive.len()];
            let id = base + next as u64;
            for (i, p) in ev.pairs.iter().enumerate() {
                b.push(PendingPair {
                    key: PairKey {
                        event: id,
                        index: i as u32,
                    },
                    pair: p.clone(),
                    enqueued: now,
                    deadline: None,
                    lane: Lane::Interactive,
                });
            }
            open.insert(id, (next_at, ev.pairs.len()));
            next += 1;
            next_at += every;
        }
        let Some(batch) = b.poll(now) else {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        };
        let t = TensorBatch::from_pairs(batch.pairs.iter().map(|p| &p.pair), pad_id);
        let s = Instant::now();
        scorer.score(&t)?;
        r.model_time += s.elapsed();
        r.batches += 1;
        r.pairs += batch.pairs.len();
        let done = Instant::now();
        for p in &batch.pairs {
            if p.key.event < base {
                bulk_left -= 1;
                bulk_done_at = done;
                continue;
            }
            r.interactive_pairs += 1;
            if let Some((arrived, left)) = open.get_mut(&p.key.event) {
                *left -= 1;
                if *left == 0 {
                    r.interactive_ms
                        .push(done.duration_since(*arrived).as_secs_f64() * 1e3);
                    open.remove(&p.key.event);
                }
            }
        }
    }
    r.bulk_pairs_per_s = bulk_total as f64 / bulk_done_at.duration_since(t0).as_secs_f64();
    Ok(r)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn lanes(cfg: &Config, opts: &LanesOptions) -> anyhow::Result<LanesReport> {
    let tok =
        PairTokenizer::from_file(&cfg.model.dir.join("tokenizer.json"), cfg.model.max_length)?
            .with_long_passages(cfg.model.long_passages, cfg.model.chunk_overlap)?;
    let mut scorer = Scorer::load(&cfg.model, &cfg.model_name())?;
    let bulk = encode(&tok, &opts.data, opts.bulk_events, opts.candidates, "bulk-")?;
    // Interactive queries come from further down the data than the backlog's.
    let interactive = encode(
        &tok,
        &opts.data,
        opts.bulk_events + 50,
        opts.interactive_candidates,
        "int-",
    )?
    .split_off(opts.bulk_events);
    let policy = BatchPolicy::from_config(cfg);
    let pad_id = tok.pad_id();
    // Warm-up: the first runs of a session are slow.
    run(
        &mut scorer,
        policy,
        pad_id,
        &bulk[..bulk.len().min(4)],
        &[],
        opts.interactive_every,
    )?;
    let alone = run(
        &mut scorer,
        policy,
        pad_id,
        &bulk,
        &[],
        opts.interactive_every,
    )?;
    let mixed = run(
        &mut scorer,
        policy,
        pad_id,
        &bulk,
        &interactive,
        opts.interactive_every,
    )?;
    let mut lat = mixed.interactive_ms.clone();
    lat.sort_by(f64::total_cmp);
    let batch_ms = mixed.model_time.as_secs_f64() * 1e3 / mixed.batches.max(1) as f64;
    let bound_ms = cfg.batch.max_wait_ms as f64 + 2.0 * batch_ms;
    let p99 = percentile(&lat, 0.99);
    Ok(LanesReport {
        bulk_pairs: bulk.iter().map(|e| e.pairs.len()).sum(),
        bulk_alone_pairs_per_s: alone.bulk_pairs_per_s,
        bulk_with_interactive_pairs_per_s: mixed.bulk_pairs_per_s,
        bulk_throughput_ratio: mixed.bulk_pairs_per_s / alone.bulk_pairs_per_s,
        interactive_pair_share: mixed.interactive_pairs as f64 / mixed.pairs.max(1) as f64,
        interactive_events: lat.len(),
        interactive_p50_ms: percentile(&lat, 0.5),
        interactive_p99_ms: p99,
        interactive_max_ms: lat.last().copied().unwrap_or(f64::NAN),
        batch_ms,
        max_wait_ms: cfg.batch.max_wait_ms,
        bound_ms,
        p99_within_bound: p99 <= bound_ms,
    })
}

pub fn print_lanes(r: &LanesReport) {
    println!(
        "bulk backlog: {} pairs; alone {:.1} pairs/s, with interactive traffic {:.1} pairs/s (ratio {:.3}; interactive share of pairs {:.1} %)",
        r.bulk_pairs,
        r.bulk_alone_pairs_per_s,
        r.bulk_with_interactive_pairs_per_s,
        r.bulk_throughput_ratio,
        100.0 * r.interactive_pair_share
    );
    println!(
        "interactive: {} events, latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; bound max_wait {} ms + 2 × batch {:.1} ms = {:.1} ms: {}",
        r.interactive_events,
        r.interactive_p50_ms,
        r.interactive_p99_ms,
        r.interactive_max_ms,
        r.max_wait_ms,
        r.batch_ms,
        r.bound_ms,
        if r.p99_within_bound { "within" } else { "OVER" }
    );
}
