//! Tokenize (query, passage) pairs with the model's own tokenizer.json.
//!
//! Truncation and padding stored in tokenizer.json are overridden: truncation is always
//! longest-first at `max_length` (the sentence-transformers CrossEncoder behaviour), and padding is
//! done per batch by the batcher, so pairs stay unpadded here.

use std::path::Path;

use tokenizers::{Encoding, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::config::LongPassages;

/// One tokenized pair, unpadded. Ids are kept as `u32` to halve memory while queued.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPair {
    pub ids: Vec<u32>,
    /// Segment ids (0 = query, 1 = passage); fed to the model when its graph has `token_type_ids`.
    pub type_ids: Vec<u32>,
    /// True when longest-first truncation removed tokens.
    pub truncated: bool,
}

impl EncodedPair {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The model inputs for one candidate: one pair, or several overlapping windows (`chunk_max`).
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedCandidate {
    pub pairs: Vec<EncodedPair>,
    pub truncated: bool,
    pub chunked: bool,
}

pub struct PairTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    max_length: usize,
    /// Set in `chunk_max` mode: a copy without truncation, and the window overlap in tokens.
    chunking: Option<(Tokenizer, usize)>,
}

impl PairTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> anyhow::Result<Self> {
        let mut tok = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        // The pad id is the one thing worth keeping from the file's padding section.
        let pad_id = tok.get_padding().map(|p| p.pad_id).unwrap_or(0);
        tok.with_padding(None);
        tok.with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(|e| anyhow::anyhow!("cannot set truncation to {max_length}: {e}"))?;
        Ok(Self {
            tok,
            pad_id,
            max_length,
            chunking: None,
        })
    }

    /// Long passages become overlapping windows (each paired with the query) instead of being
    /// truncated; the candidate scores as its best window.
    pub fn with_long_passages(
        mut self,
        mode: LongPassages,
        overlap: usize,
    ) -> anyhow::Result<Self> {
        self.chunking = match mode {
            LongPassages::Truncate => None,
            LongPassages::ChunkMax => {
                let mut raw = self.tok.clone();
                raw.with_truncation(None)
                    .map_err(|e| anyhow::anyhow!("cannot disable truncation: {e}"))?;
                Some((raw, overlap))
            }
        };
        Ok(self)
    }

    /// Encodes one candidate according to the long-passage mode.
    pub fn encode_candidate(&self, query: &str, passage: &str) -> anyhow::Result<EncodedCandidate> {
        let Some((raw, overlap)) = &self.chunking else {
            let p = self.encode(query, passage)?;
            return Ok(EncodedCandidate {
                truncated: p.truncated,
                chunked: false,
                pairs: vec![p],
            });
        };
        let err = |e| anyhow::anyhow!("tokenization failed: {e}");
        let mut q = raw.encode_fast(query, false).map_err(err)?;
        let mut p = raw.encode_fast(passage, false).map_err(err)?;
        let special = raw
            .post_process(Encoding::default(), Some(Encoding::default()), true)
            .map_err(err)?
            .len();
        let budget = self.max_length.saturating_sub(special);
        // A query longer than half the budget is cut so that passages keep room to be windowed.
        let q_truncated = q.len() > budget / 2;
        q.truncate(budget / 2, 0, TruncationDirection::Right);
        q.take_overflowing();
        let p_budget = budget - q.len();
        let chunked = p.len() > p_budget;
        let windows = if chunked {
            let stride = (*overlap).min(p_budget / 2);
            p.truncate(p_budget, stride, TruncationDirection::Right);
            let rest = p.take_overflowing();
            std::iter::once(p).chain(rest).collect()
        } else {
            vec![p]
        };
        let pairs = windows
            .into_iter()
            .map(|w| {
                let e = raw.post_process(q.clone(), Some(w), true).map_err(err)?;
                Ok(EncodedPair {
                    ids: e.get_ids().to_vec(),
                    type_ids: e.get_type_ids().to_vec(),
                    truncated: q_truncated,
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(EncodedCandidate {
            pairs,
            truncated: q_truncated,
            chunked,
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn encode(&self, query: &str, passage: &str) -> anyhow::Result<EncodedPair> {
        let enc = self
            .tok
            .encode_fast((query, passage), true)
            .map_err(|e| anyhow::anyhow!("tokenization failed: {e}"))?;
        Ok(EncodedPair {
            truncated: !enc.get_overflowing().is_empty(),
            ids: enc.get_ids().to_vec(),
            type_ids: enc.get_type_ids().to_vec(),
        })
    }
}
