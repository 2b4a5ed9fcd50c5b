//! Runs every batch shape the worker will see once, so the first real events do not pay for
//! ONNX Runtime's lazy allocations and kernel selection.

use std::time::Instant;

use super::{Scorer, TensorBatch};
use crate::config::Config;
use crate::tokenize::{EncodedPair, PairTokenizer};

pub fn warm_up(scorer: &mut Scorer, tok: &PairTokenizer, cfg: &Config) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let pair = tok.encode("warm up", "warm up")?;
    let mut len = 16usize;
    loop {
        let l = len.min(cfg.model.max_length);
        let mut p = pair.clone();
        p.ids.resize(l, tok.pad_id());
        p.type_ids.resize(l, 1);
        let rows = (cfg.batch.max_batch_tokens / l).clamp(1, cfg.batch.max_batch_pairs);
        let batch: Vec<&EncodedPair> = std::iter::repeat_n(&p, rows).collect();
        scorer.score(&TensorBatch::from_pairs(batch.into_iter(), tok.pad_id()))?;
        if l >= cfg.model.max_length {
            break;
        }
        len *= 4;
    }
    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "model warmed up"
    );
    Ok(())
}
