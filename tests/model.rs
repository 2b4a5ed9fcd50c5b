//! Model-stage parity against the reference scores shipped beside the model (PyTorch +
//! transformers on the same weights), through this crate's tokenizer wrapper, padding and batching.

mod common;

use std::io::BufRead;

use reranker::config::ModelConfig;
use reranker::model::{Scorer, TensorBatch};
use reranker::tokenize::PairTokenizer;
use serde_json::Value;

fn reference_rows() -> Vec<Value> {
    let f =
        std::fs::File::open(common::model_dir().join("reference.jsonl")).expect("reference.jsonl");
    std::io::BufReader::new(f)
        .lines()
        .map(|l| serde_json::from_str(&l.expect("line")).expect("json"))
        .collect()
}

fn model_cfg(max_length: usize) -> ModelConfig {
    ModelConfig {
        dir: common::model_dir(),
        max_length,
        intra_op_threads: 2,
        ..ModelConfig::default()
    }
}

#[test]
fn tokenization_and_logits_match_the_reference() {
    let rows = reference_rows();
    assert!(rows.len() > 200);
    let mut scorer = Scorer::load(&model_cfg(512), "minilm-l6-ce").expect("model");
    assert!(
        scorer.info().has_token_type_ids,
        "MiniLM/BERT graphs take segment ids"
    );
    let mut worst = 0.0f64;
    let mut truncated_rows = 0;
    for max_length in [256usize, 512] {
        let tok = PairTokenizer::from_file(&common::model_dir().join("tokenizer.json"), max_length)
            .expect("tokenizer");
        let group: Vec<&Value> = rows
            .iter()
            .filter(|r| r["max_length"].as_u64() == Some(max_length as u64))
            .collect();
        let encoded: Vec<_> = group
            .iter()
            .map(|r| {
                tok.encode(r["query"].as_str().unwrap(), r["passage"].as_str().unwrap())
                    .expect("encode")
            })
            .collect();
        for (r, e) in group.iter().zip(&encoded) {
            let want: Vec<u32> = r["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(e.ids, want, "input_ids differ for {:?}", r["query"]);
            truncated_rows += e.truncated as usize;
        }
        // Score in padded batches of mixed lengths: padding must not change any logit.
        for (chunk_rows, chunk_enc) in group.chunks(16).zip(encoded.chunks(16)) {
            let t = TensorBatch::from_pairs(chunk_enc.iter(), tok.pad_id());
            let scores = scorer.score(&t).expect("score");
            for (r, s) in chunk_rows.iter().zip(scores) {
                let d = (s.logit as f64 - r["logit"].as_f64().unwrap()).abs();
                worst = worst.max(d);
            }
        }
    }
    assert!(worst <= 1e-4, "max |logit - reference| = {worst}");
    assert!(
        truncated_rows > 0,
        "the reference covers truncated pairs and they are flagged"
    );
}

#[test]
fn jim_carrey_ordering_matches_the_reference() {
    let rows: Vec<Value> = reference_rows()
        .into_iter()
        .filter(|r| {
            r["query"]
                .as_str()
                .unwrap_or("")
                .contains("road trip to Aspen")
                && r["max_length"] == 256
        })
        .collect();
    assert_eq!(rows.len(), 4);
    let tok = PairTokenizer::from_file(&common::model_dir().join("tokenizer.json"), 256).unwrap();
    let mut scorer = Scorer::load(&model_cfg(256), "m").unwrap();
    let enc: Vec<_> = rows
        .iter()
        .map(|r| {
            tok.encode(r["query"].as_str().unwrap(), r["passage"].as_str().unwrap())
                .unwrap()
        })
        .collect();
    let scores = scorer
        .score(&TensorBatch::from_pairs(enc.iter(), tok.pad_id()))
        .unwrap();
    let order = |v: Vec<f64>| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        idx
    };
    let ours = order(scores.iter().map(|s| s.logit as f64).collect());
    let reference = order(rows.iter().map(|r| r["logit"].as_f64().unwrap()).collect());
    assert_eq!(ours, reference);
}

#[test]
fn missing_model_files_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig {
        dir: dir.path().to_path_buf(),
        ..ModelConfig::default()
    };
    let err = Scorer::load(&cfg, "m")
        .err()
        .expect("must fail")
        .to_string();
    assert!(
        err.contains("model.onnx") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn chunk_max_windows_cover_long_passages() {
    use reranker::config::LongPassages;
    let path = common::model_dir().join("tokenizer.json");
    let max_length = 64;
    let chunker = PairTokenizer::from_file(&path, max_length)
        .unwrap()
        .with_long_passages(LongPassages::ChunkMax, 16)
        .unwrap();
    let truncating = PairTokenizer::from_file(&path, max_length).unwrap();
    let query = "which film has two friends driving to aspen";
    let filler =
        "The committee reviewed the annual budget and discussed parking arrangements at length. "
            .repeat(12);
    let passage = format!(
        "{filler}Dumb and Dumber: two dim-witted best friends drive across the country to Aspen."
    );

    let c = chunker.encode_candidate(query, &passage).unwrap();
    assert!(c.chunked && !c.truncated);
    assert!(c.pairs.len() >= 3, "{} windows", c.pairs.len());
    let q = truncating.encode(query, "x").unwrap();
    let q_len = q.type_ids.iter().take_while(|&&t| t == 0).count(); // [CLS] query [SEP]
    for w in &c.pairs {
        assert!(w.len() <= max_length);
        assert_eq!(
            w.ids[..q_len],
            q.ids[..q_len],
            "every window starts with the query"
        );
        assert_eq!(w.ids.len(), w.type_ids.len());
    }
    // The windows' passage parts, minus the overlaps, are exactly the passage's tokens.
    let full = chunker.encode_candidate(query, "").unwrap().pairs[0].clone();
    assert_eq!(full.len(), q_len + 1, "empty passage: [CLS] q [SEP] [SEP]");
    let body = |w: &reranker::tokenize::EncodedPair| w.ids[q_len..w.len() - 1].to_vec();
    let mut joined = body(&c.pairs[0]);
    for w in &c.pairs[1..] {
        let b = body(w);
        assert_eq!(
            &joined[joined.len() - 16..],
            &b[..16],
            "consecutive windows overlap by 16 tokens"
        );
        joined.extend_from_slice(&b[16..]);
    }
    let untruncated = PairTokenizer::from_file(&path, 4096)
        .unwrap()
        .encode(query, &passage)
        .unwrap();
    assert_eq!(joined, untruncated.ids[q_len..untruncated.len() - 1]);

    // A passage that fits in one window is encoded exactly as in truncate mode.
    let short = chunker
        .encode_candidate(query, "Dumb and Dumber (1994)")
        .unwrap();
    assert!(!short.chunked);
    assert_eq!(
        short.pairs,
        vec![truncating.encode(query, "Dumb and Dumber (1994)").unwrap()]
    );

    // The answer sits past the first window: the best window scores higher than the truncated pair.
    let mut scorer = Scorer::load(&model_cfg(max_length), "m").unwrap();
    let windows = scorer
        .score(&TensorBatch::from_pairs(c.pairs.iter(), chunker.pad_id()))
        .unwrap();
    let best = windows
        .iter()
        .map(|s| s.logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let t = truncating.encode(query, &passage).unwrap();
    let truncated = scorer
        .score(&TensorBatch::from_pairs(std::iter::once(&t), 0))
        .unwrap()[0]
        .logit;
    assert!(
        best > truncated,
        "best window {best} vs truncated {truncated}"
    );
}
