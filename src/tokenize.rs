//! Tokenize (query, passage) pairs with the model's own tokenizer.json.
//!
//! Truncation and padding stored in tokenizer.json are overridden: truncation is always
//! longest-first at `max_length` (the sentence-transformers CrossEncoder behaviour), and padding is
//! done per batch by the batcher, so pairs stay unpadded here.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{
    Encoding, Model, NormalizedString, Normalizer, OffsetReferential, OffsetType,
    PreTokenizedString, PreTokenizer, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

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
    /// The same tokenizer without truncation: each text of an event is encoded alone with it, once.
    raw: Tokenizer,
    pad_id: u32,
    max_length: usize,
    /// Special tokens a pair gets (3 for BERT: `[CLS] a [SEP] b [SEP]`).
    pair_special: usize,
    /// Set in `chunk_max` mode: the window overlap in tokens.
    chunking: Option<usize>,
    /// SHA-256 of the tokenizer file: part of every passage cache key.
    file_hash: [u8; 32],
    cache: Option<PassageCache>,
    /// Set for BERT-style tokenizers: the text is split and normalized here, word by word, and
    /// only as far as the truncation limit reads it.
    words: Option<BertWords>,
}

/// Encodes one text as the tokenizer does (`BertNormalizer`, then `BertPreTokenizer`, then the
/// model on each pre-token, stopping at the truncation limit) without its per-character
/// bookkeeping: the library normalizes and splits the whole text, tracking every byte's
/// alignment and looking up each character's Unicode category, before the limit stops the model,
/// and that was most of the host path's CPU on passages longer than `max_length` tokens.
///
/// Both steps act on one character at a time and split at whitespace, so the text is cut at
/// ASCII whitespace first: a chunk of printable ASCII is lowercased and split at punctuation here
/// (exactly what they do to such characters), any other chunk goes through the library's own
/// normalizer and pre-tokenizer, and the words go to the model in order until the limit.
/// Texts holding an added token's content (e.g. `[SEP]`) take the library's path, which
/// extracts those tokens first. `tests/tokenize.rs` checks the ids against whole-pair encoding.
struct BertWords {
    normalizer: NormalizerWrapper,
    pre_tokenizer: PreTokenizerWrapper,
    lowercase: bool,
    /// Contents of the added tokens, matched on the raw text.
    added: Vec<String>,
}

impl BertWords {
    /// `Some` when the tokenizer is BERT-style: `BertNormalizer`, `BertPreTokenizer`, and added
    /// tokens matched before normalization only.
    fn detect(tok: &Tokenizer) -> Option<Self> {
        let normalizer = tok.get_normalizer()?.clone();
        let NormalizerWrapper::BertNormalizer(bert) = &normalizer else {
            return None;
        };
        let lowercase = bert.lowercase;
        let pre_tokenizer = tok.get_pre_tokenizer()?.clone();
        if !matches!(pre_tokenizer, PreTokenizerWrapper::BertPreTokenizer(_)) {
            return None;
        }
        let decoder = tok.get_added_tokens_decoder();
        if decoder.values().any(|t| t.normalized) {
            return None;
        }
        let added = decoder.into_values().map(|t| t.content).collect();
        Some(Self {
            normalizer,
            pre_tokenizer,
            lowercase,
            added,
        })
    }

    /// The ids of `text` up to the first pre-token that reaches `limit` (all of them past it, as
    /// `tokenize_with_limit` keeps them); `None` when the text holds an added token.
    fn ids(
        &self,
        model: &impl Model,
        text: &str,
        limit: usize,
    ) -> anyhow::Result<Option<Vec<u32>>> {
        if self.added.iter().any(|a| text.contains(a.as_str())) {
            return Ok(None);
        }
        let err = |e| anyhow::anyhow!("tokenization failed: {e}");
        let mut ids = Vec::new();
        let push = |word: &str, ids: &mut Vec<u32>| -> anyhow::Result<bool> {
            ids.extend(model.tokenize(word).map_err(err)?.iter().map(|t| t.id));
            Ok(ids.len() >= limit)
        };
        let mut lower = String::new();
        for chunk in text.split([' ', '\t', '\n', '\r']) {
            if chunk.is_empty() {
                continue;
            }
            if chunk.bytes().all(|b| (0x20..0x7f).contains(&b)) {
                let chunk = if self.lowercase {
                    lower.clear();
                    lower.push_str(chunk);
                    lower.make_ascii_lowercase();
                    lower.as_str()
                } else {
                    chunk
                };
                for word in ascii_words(chunk) {
                    if push(word, &mut ids)? {
                        return Ok(Some(ids));
                    }
                }
            } else {
                let mut n = NormalizedString::from(chunk);
                self.normalizer.normalize(&mut n).map_err(err)?;
                let mut pre = PreTokenizedString::from(n);
                self.pre_tokenizer.pre_tokenize(&mut pre).map_err(err)?;
                for (word, _, _) in pre.get_splits(OffsetReferential::Original, OffsetType::None) {
                    if push(word, &mut ids)? {
                        return Ok(Some(ids));
                    }
                }
            }
        }
        Ok(Some(ids))
    }
}

/// The pre-tokens of a printable-ASCII chunk: each punctuation mark on its own, the runs of other
/// characters between them.
fn ascii_words(chunk: &str) -> impl Iterator<Item = &str> {
    let mut rest = chunk;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let end = match rest.bytes().position(|b| b.is_ascii_punctuation()) {
            Some(0) => 1,
            Some(i) => i,
            None => rest.len(),
        };
        let (word, tail) = rest.split_at(end);
        rest = tail;
        Some(word)
    })
}

/// An encoding of bare ids, without token strings: what post-processing reads. Without offsets
/// (`encode_fast`) the library's own has no words, zero offsets and no special tokens either.
fn from_ids(ids: Vec<u32>, type_id: u32) -> Encoding {
    let len = ids.len();
    Encoding::new(
        ids,
        vec![type_id; len],
        // Empty strings do not allocate; the ids are what the model reads.
        vec![String::new(); len],
        vec![None; len],
        vec![(0, 0); len],
        vec![0; len],
        vec![1; len],
        Vec::new(),
        Default::default(),
    )
}

/// Passage encodings kept across events and replays (`pipeline.passage_cache_mb`): RAG corpora
/// repeat passages across queries. A key is 128 bits of SHA-256 over the tokenizer file's hash,
/// `max_length`, the long-passage mode and the text, so a key never outlives what produced it.
struct PassageCache {
    map: quick_cache::sync::Cache<[u8; 16], Arc<Encoding>, SideWeight>,
    /// The hasher with everything but the text already fed.
    seed: Sha256,
    stats: Arc<PassageCacheStats>,
}

/// Hits and misses of the passage cache, for `/metrics`.
#[derive(Debug, Default)]
pub struct PassageCacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    /// Bytes held now (the cache's own estimate).
    pub bytes: AtomicU64,
    pub capacity_bytes: u64,
}

/// An entry's bytes: its flat vectors (ids, words, offsets, special mask, mask, type ids, empty
/// token strings) and the key.
#[derive(Clone)]
struct SideWeight;

impl quick_cache::Weighter<[u8; 16], Arc<Encoding>> for SideWeight {
    fn weight(&self, _: &[u8; 16], e: &Arc<Encoding>) -> u64 {
        96 + e.len() as u64 * 64
    }
}

/// A query encoded once for all the candidates of its event (no special tokens, not truncated).
#[derive(Debug, Clone)]
pub struct EncodedQuery(Encoding);

impl EncodedQuery {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl PairTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> anyhow::Result<Self> {
        // Read once: parsed here, and hashed into the passage cache's keys.
        let file = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", path.display()))?;
        let mut tok = Tokenizer::from_bytes(&file)
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
        let mut raw = tok.clone();
        raw.with_truncation(None)
            .map_err(|e| anyhow::anyhow!("cannot disable truncation: {e}"))?;
        let pair_special = raw
            .post_process(Encoding::default(), Some(Encoding::default()), true)
            .map_err(|e| anyhow::anyhow!("cannot post-process an empty pair: {e}"))?
            .len();
        let words = BertWords::detect(&raw);
        Ok(Self {
            words,
            tok,
            raw,
            pad_id,
            max_length,
            pair_special,
            chunking: None,
            file_hash: Sha256::digest(&file).into(),
            cache: None,
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
            LongPassages::ChunkMax => Some(overlap),
        };
        Ok(self)
    }

    /// Keeps passage encodings up to `megabytes` (0: no cache). Call after the other settings.
    pub fn with_passage_cache(mut self, megabytes: usize) -> Self {
        if megabytes == 0 {
            self.cache = None;
            return self;
        }
        let capacity = megabytes as u64 * 1024 * 1024;
        let mut seed = Sha256::new();
        seed.update(self.file_hash);
        seed.update((self.max_length as u64).to_le_bytes());
        seed.update(self.chunking.map_or(u64::MAX, |o| o as u64).to_le_bytes());
        self.cache = Some(PassageCache {
            // ~200 tokens a passage, the weight estimate's scale.
            map: quick_cache::sync::Cache::with_weighter(
                (capacity / (96 + 200 * 64)).max(16) as usize,
                capacity,
                SideWeight,
            ),
            seed,
            stats: Arc::new(PassageCacheStats {
                capacity_bytes: capacity,
                ..Default::default()
            }),
        });
        self
    }

    /// The passage cache's counters; `None` without a cache.
    pub fn passage_cache_stats(&self) -> Option<Arc<PassageCacheStats>> {
        self.cache.as_ref().map(|c| c.stats.clone())
    }

    /// A passage's side of a pair, from the cache when it holds it.
    fn passage(&self, text: &str) -> anyhow::Result<Encoding> {
        let Some(c) = &self.cache else {
            return self.side(text, 1);
        };
        let mut h = c.seed.clone();
        h.update(text.as_bytes());
        let digest = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        if let Some(e) = c.map.get(&key) {
            c.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok((*e).clone());
        }
        c.stats.misses.fetch_add(1, Ordering::Relaxed);
        let e = self.side(text, 1)?;
        c.map.insert(key, Arc::new(e.clone()));
        c.stats.bytes.store(c.map.weight(), Ordering::Relaxed);
        Ok(e)
    }

    /// One side of a pair, encoded alone exactly as `encode` encodes it inside the pair.
    fn side(&self, text: &str, type_id: u32) -> anyhow::Result<Encoding> {
        let err = |e| anyhow::anyhow!("tokenization failed: {e}");
        if let Some(w) = &self.words {
            // Unlimited in `chunk_max` mode, where the raw tokenizer reads the whole text.
            let limit = match self.chunking {
                Some(_) => usize::MAX,
                None => self.max_length,
            };
            if let Some(ids) = w.ids(self.raw.get_model(), text, limit)? {
                return Ok(from_ids(ids, type_id));
            }
        }
        if self.chunking.is_some() {
            let e = self.raw.encode_fast(text, false).map_err(err)?;
            return Ok(from_ids(e.get_ids().to_vec(), type_id));
        }
        // The truncating tokenizer stops tokenizing a text near `max_length` tokens (tokenizers
        // 0.23 `tokenize_with_limit`), and longest-first truncation of the pair depends on those
        // capped lengths, so each side goes through it too. Encoding a single text then also cuts
        // it to `max_length`, which encoding the pair does not: its overflow is joined back.
        let e = self.tok.encode_fast(text, false).map_err(err)?;
        let ids = std::iter::once(&e)
            .chain(e.get_overflowing())
            .flat_map(|p| p.get_ids().iter().copied())
            .collect();
        Ok(from_ids(ids, type_id))
    }

    /// Encodes an event's query, once for all its candidates.
    pub fn encode_query(&self, query: &str) -> anyhow::Result<EncodedQuery> {
        Ok(EncodedQuery(self.side(query, 0)?))
    }

    /// Encodes one candidate against a query encoded once, with the tokenizer's own truncation
    /// and post-processing: the same ids and type ids as `encode_candidate(query, passage)`.
    pub fn encode_with(
        &self,
        query: &EncodedQuery,
        passage: &str,
    ) -> anyhow::Result<EncodedCandidate> {
        let err = |e| anyhow::anyhow!("tokenization failed: {e}");
        let p = self.passage(passage)?;
        if let Some(overlap) = self.chunking {
            return self.windows(query.0.clone(), p, overlap);
        }
        // The tokenizer's own longest-first truncation and template, as `encode` applies them.
        let e = self
            .tok
            .post_process(query.0.clone(), Some(p), true)
            .map_err(err)?;
        let pair = EncodedPair {
            truncated: !e.get_overflowing().is_empty(),
            ids: e.get_ids().to_vec(),
            type_ids: e.get_type_ids().to_vec(),
        };
        Ok(EncodedCandidate {
            truncated: pair.truncated,
            chunked: false,
            pairs: vec![pair],
        })
    }

    /// Encodes one candidate according to the long-passage mode, query and passage together (the
    /// reference `encode_with` must match).
    pub fn encode_candidate(&self, query: &str, passage: &str) -> anyhow::Result<EncodedCandidate> {
        let Some(overlap) = self.chunking else {
            let p = self.encode(query, passage)?;
            return Ok(EncodedCandidate {
                truncated: p.truncated,
                chunked: false,
                pairs: vec![p],
            });
        };
        let err = |e| anyhow::anyhow!("tokenization failed: {e}");
        let q = self.raw.encode_fast(query, false).map_err(err)?;
        let p = self.raw.encode_fast(passage, false).map_err(err)?;
        self.windows(q, p, overlap)
    }

    /// `chunk_max`: the query cut to half the budget, the passage in overlapping windows.
    fn windows(
        &self,
        mut q: Encoding,
        mut p: Encoding,
        overlap: usize,
    ) -> anyhow::Result<EncodedCandidate> {
        let err = |e| anyhow::anyhow!("tokenization failed: {e}");
        let raw = &self.raw;
        let special = self.pair_special;
        let budget = self.max_length.saturating_sub(special);
        // A query longer than half the budget is cut so that passages keep room to be windowed.
        let q_truncated = q.len() > budget / 2;
        q.truncate(budget / 2, 0, TruncationDirection::Right);
        q.take_overflowing();
        let p_budget = budget - q.len();
        let chunked = p.len() > p_budget;
        let windows = if chunked {
            let stride = overlap.min(p_budget / 2);
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

    /// True when texts are split and normalized by `BertWords` rather than by the library.
    pub fn splits_words_itself(&self) -> bool {
        self.words.is_some()
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
