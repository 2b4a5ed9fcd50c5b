//! Tokenize (query, passage) pairs with the model's own tokenizer.json.
//!
//! Truncation and padding stored in tokenizer.json are overridden: truncation is always
//! longest-first at `max_length` (the sentence-transformers CrossEncoder behaviour), and padding is
//! done per batch by the batcher, so pairs stay unpadded here.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

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

pub struct PairTokenizer {
    tok: Tokenizer,
    pad_id: u32,
    max_length: usize,
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
        })
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_length(&self) -> usize {
        self.max_length
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
