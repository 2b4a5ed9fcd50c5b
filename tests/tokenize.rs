//! Tokenize once (the query once per event, each passage once) must give exactly the ids, type ids
//! and masks of encoding each pair whole: on the 254 reference rows and on every SciFact pair, at
//! lengths where longest-first truncation cuts one side or both, and in `chunk_max` windows.

use std::io::BufRead;
use std::path::PathBuf;

use reranker::config::LongPassages;
use reranker::tokenize::{EncodedCandidate, PairTokenizer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    std::env::var_os("RERANKER_MODEL__DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("../shared/models/minilm-l6-ce"))
}

fn tokenizer(max_length: usize, mode: LongPassages) -> PairTokenizer {
    PairTokenizer::from_file(&model_dir().join("tokenizer.json"), max_length)
        .expect("tokenizer loads")
        .with_long_passages(mode, 32)
        .expect("long-passage mode")
}

/// (query, passages) per SciFact query.
fn scifact() -> Vec<(String, Vec<String>)> {
    let path = root().join("../shared/data/scifact/retrieval-top100.jsonl.gz");
    let f = std::fs::File::open(&path).expect("scifact data");
    let r = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
    r.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(&l.expect("line")).expect("json");
            let passages = v["candidates"]
                .as_array()
                .expect("candidates")
                .iter()
                .map(|c| c["text"].as_str().expect("text").to_string())
                .collect();
            (v["query"].as_str().expect("query").to_string(), passages)
        })
        .collect()
}

/// Compares both ways of encoding every pair of `events`; returns (pairs, truncated, chunked).
fn same_both_ways(tok: &PairTokenizer, events: &[(String, Vec<String>)]) -> (usize, usize, usize) {
    let (mut pairs, mut truncated, mut chunked) = (0, 0, 0);
    for (query, passages) in events {
        let q = tok.encode_query(query).expect("query");
        for p in passages {
            let once: EncodedCandidate = tok.encode_with(&q, p).expect("encode once");
            let whole = tok.encode_candidate(query, p).expect("encode whole");
            assert_eq!(once, whole, "query {query:?} passage {p:?}");
            pairs += 1;
            truncated += once.truncated as usize;
            chunked += once.chunked as usize;
        }
    }
    (pairs, truncated, chunked)
}

#[test]
fn reference_rows_encode_the_same_once_and_whole() {
    let path = model_dir().join("reference.jsonl");
    let text = std::fs::read_to_string(&path).expect("reference.jsonl");
    let mut rows = 0;
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("row");
        let (query, passage) = (
            v["query"].as_str().expect("query"),
            v["passage"].as_str().expect("passage"),
        );
        let max_length = v["max_length"].as_u64().expect("max_length") as usize;
        let expected: Vec<u32> = v["input_ids"]
            .as_array()
            .expect("input_ids")
            .iter()
            .map(|x| x.as_u64().expect("id") as u32)
            .collect();
        let tok = tokenizer(max_length, LongPassages::Truncate);
        let q = tok.encode_query(query).expect("query");
        let once = tok.encode_with(&q, passage).expect("once");
        assert_eq!(once.pairs.len(), 1);
        assert_eq!(
            once.pairs[0].ids, expected,
            "row {rows}: ids vs PyTorch reference"
        );
        let whole = tok.encode(query, passage).expect("whole");
        assert_eq!(once.pairs[0], whole, "row {rows}");
        // The mask the batcher builds is one per id: the whole encoding's mask, unpadded.
        assert_eq!(whole.ids.len(), expected.len());
        rows += 1;
    }
    assert_eq!(rows, 254);
}

#[test]
fn scifact_pairs_encode_the_same_once_and_whole() {
    let events = scifact();
    assert!(events.len() >= 300);
    // 64: nearly every pair is cut, often both sides (long queries); 256: the default; 512: few.
    for max_length in [16, 64, 256, 512] {
        let tok = tokenizer(max_length, LongPassages::Truncate);
        let (pairs, truncated, _) = same_both_ways(&tok, &events);
        eprintln!("max_length {max_length}: {pairs} pairs, {truncated} truncated");
        assert!(pairs >= 30_000 && truncated > 0);
    }
}

#[test]
fn scifact_pairs_make_the_same_chunk_max_windows_once_and_whole() {
    let events = scifact();
    let tok = tokenizer(128, LongPassages::ChunkMax);
    let (pairs, _, chunked) = same_both_ways(&tok, &events);
    eprintln!("chunk_max at 128: {pairs} pairs, {chunked} chunked");
    assert!(chunked > 1000);
}

/// Pieces hostile text is made of: what the BERT normalizer removes, maps or splits (control
/// characters, Unicode whitespace, accents precomposed and combining, CJK, ASCII and Unicode
/// punctuation, U+FFFD), the added tokens' contents inside and between words, a word past
/// WordPiece's 100-character limit, and plain words.
const PIECES: &[&str] = &[
    "the", "Protein", "p53", "IL-6", "x", "don't", "α-helix", "naïve", "Cafe\u{301}", "ÉCOLE",
    "straße", "İstanbul", "ǅ", "野口里佳", "日本語", "한국어", "😀", "e=mc²", "μm", "±3.5%",
    "[SEP]", "[CLS]x", "a[MASK]b", "[sep]", "[UNK", "\u{0}", "\u{1}", "\u{7f}", "\u{b}", "\u{c}",
    "\u{ad}", "\u{200b}", "\u{feff}", "\u{fffd}", "\u{301}", "\u{a0}", "\u{3000}", "\u{2028}",
    "\u{85}", "—", "“quoted”", "¿qué?", "$", "^", "`", "|", "~", "<>", "...", "((", "))",
    "a!b\"c#d$e%f&g'h(i)j*k+l,m-n.o/p0q1r2s3t4u5v6w7x8y9z:A;B<C=D>E?F@G[H\\I]J^K_L`M{N|O}P~Q",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
];
const GLUE: &[&str] = &[" ", "", "  ", "\t", "\n", "\r\n", " \u{a0}", "-", "\u{301}"];

/// A deterministic xorshift: the same texts on every run.
fn hostile_texts(seed: u64, n: usize, max_pieces: usize) -> Vec<String> {
    let mut x = seed;
    let mut next = move |m: usize| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % m as u64) as usize
    };
    (0..n)
        .map(|_| {
            let k = next(max_pieces + 1);
            let mut s = String::new();
            for _ in 0..k {
                s.push_str(PIECES[next(PIECES.len())]);
                s.push_str(GLUE[next(GLUE.len())]);
            }
            s
        })
        .collect()
}

/// The tokenizer's own normalizer and pre-tokenizer are bypassed for BERT-style tokenizers
/// (`BertWords`); on text built to break that, the ids must still be the library's, in both
/// long-passage modes, at budgets that cut the query, the passage or both.
#[test]
fn hostile_text_encodes_the_same_once_and_whole() {
    let queries = hostile_texts(0x9e37_79b9_7f4a_7c15, 60, 12);
    let passages = hostile_texts(0xd1b5_4a32_d192_ed03, 60, 120);
    let events: Vec<(String, Vec<String>)> =
        queries.into_iter().map(|q| (q, passages.clone())).collect();
    for (max_length, mode) in [
        (8, LongPassages::Truncate),
        (33, LongPassages::Truncate),
        (128, LongPassages::Truncate),
        (512, LongPassages::Truncate),
        (48, LongPassages::ChunkMax),
    ] {
        let tok = tokenizer(max_length, mode);
        // Otherwise this compares the library with itself.
        assert!(tok.splits_words_itself());
        let (pairs, truncated, _) = same_both_ways(&tok, &events);
        // 512 leaves most of these texts whole: the path where no limit stops the words.
        assert!(
            pairs == 3600 && (truncated > 0 || max_length == 512),
            "{max_length} {mode:?}: {truncated}"
        );
    }
}

#[test]
fn longest_first_cuts_both_sides_when_both_are_long() {
    let tok = tokenizer(33, LongPassages::Truncate); // 30 tokens to share between the sides
    let long = |w: &str, n| vec![w; n].join(" ");
    for (nq, np) in [
        (40, 41),
        (41, 40),
        (40, 40),
        (10, 40),
        (40, 10),
        (29, 31),
        (31, 29),
    ] {
        let (query, passage) = (long("alpha", nq), long("beta", np));
        let q = tok.encode_query(&query).expect("query");
        let once = tok.encode_with(&q, &passage).expect("once");
        let whole = tok.encode(&query, &passage).expect("whole");
        assert_eq!(once.pairs[0], whole, "{nq} / {np}");
        assert!(whole.truncated && whole.ids.len() == 33, "{nq} / {np}");
    }
    let even = tokenizer(34, LongPassages::Truncate); // 31: one side gets the odd token
    for (nq, np) in [(40, 41), (41, 40), (40, 40), (16, 16), (15, 17)] {
        let (query, passage) = (long("alpha", nq), long("beta", np));
        let q = even.encode_query(&query).expect("query");
        let once = even.encode_with(&q, &passage).expect("once");
        assert_eq!(
            once.pairs[0],
            even.encode(&query, &passage).expect("whole"),
            "{nq} / {np}"
        );
    }
}

/// The passage cache (`pipeline.passage_cache_mb`) changes nothing but the work: on 40 SciFact
/// queries, encoding every pair twice through a cached tokenizer gives the ids of encoding each
/// pair whole, counts a miss per distinct passage and a hit for every repeat, and a 1 MiB cache
/// stays within its bound while it evicts. The chunk_max windows come out the same from it too.
#[test]
fn the_passage_cache_gives_the_same_ids_and_counts_its_hits() {
    let events: Vec<_> = scifact().into_iter().take(40).collect();
    let distinct: std::collections::HashSet<&str> = events
        .iter()
        .flat_map(|(_, ps)| ps.iter().map(String::as_str))
        .collect();
    let pairs: usize = events.iter().map(|(_, ps)| ps.len()).sum();
    for mode in [LongPassages::Truncate, LongPassages::ChunkMax] {
        let tok = tokenizer(128, mode).with_passage_cache(256);
        let stats = tok.passage_cache_stats().expect("a cache");
        same_both_ways(&tok, &events);
        same_both_ways(&tok, &events);
        let hits = stats.hits.load(std::sync::atomic::Ordering::Relaxed) as usize;
        let misses = stats.misses.load(std::sync::atomic::Ordering::Relaxed) as usize;
        assert_eq!(
            misses,
            distinct.len(),
            "{mode:?}: one miss per distinct passage"
        );
        assert_eq!(
            hits,
            2 * pairs - distinct.len(),
            "{mode:?}: every repeat hits"
        );
    }
    let small = tokenizer(128, LongPassages::Truncate).with_passage_cache(1);
    let stats = small.passage_cache_stats().expect("a cache");
    same_both_ways(&small, &events);
    let bytes = stats.bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        bytes > 0 && bytes <= stats.capacity_bytes,
        "{bytes} bytes in a {}-byte cache",
        stats.capacity_bytes
    );
    // Far more passages than fit: evicted ones miss again when they repeat.
    assert!(stats.misses.load(std::sync::atomic::Ordering::Relaxed) as usize >= distinct.len());
    assert!(tokenizer(128, LongPassages::Truncate)
        .with_passage_cache(0)
        .passage_cache_stats()
        .is_none());
}
