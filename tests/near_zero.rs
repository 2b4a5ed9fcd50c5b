//! The near-zero-cost benchmark model (`reranker make-model`): written by the real binary, accepted
//! by `reranker check-model`, loaded by the worker's own loader; its scores are finite,
//! deterministic, differ between inputs and ignore padding.

mod common;

use std::process::Command;

use reranker::config::ModelConfig;
use reranker::model::{Scorer, TensorBatch};
use reranker::tokenize::PairTokenizer;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_reranker"))
}

/// `reranker make-model` from the bundled model's tokenizer into `dir`, which must succeed.
fn make_model(dir: &std::path::Path, args: &[&str]) {
    let out = bin()
        .arg("make-model")
        .args(args)
        .arg("--from")
        .arg(common::model_dir())
        .arg("--out")
        .arg(dir)
        .output()
        .expect("run make-model");
    assert!(
        out.status.success(),
        "make-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `reranker check-model` on `dir`, which must accept it; its report.
fn check_model(dir: &std::path::Path) -> String {
    let check = bin()
        .args([
            "check-model",
            "--set",
            "model.intra_op_threads=1",
            "--model",
        ])
        .arg(dir)
        .output()
        .expect("run check-model");
    let stdout = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        check.status.success(),
        "check-model rejected the generated model: {stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    stdout
}

#[test]
fn generated_model_loads_checks_and_scores_deterministically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("near-zero");
    make_model(&dir, &[]);
    for f in ["model.onnx", "tokenizer.json"] {
        assert!(dir.join(f).is_file(), "{f} missing from the generated dir");
    }
    assert!(!dir.join("reference.jsonl").exists());
    // Small: a vocabulary × 16 float table, not a transformer.
    let size = std::fs::metadata(dir.join("model.onnx"))
        .expect("model")
        .len();
    assert!(size < 4 << 20, "model.onnx is {size} bytes");

    // Written twice (into a second dir): byte for byte the same file.
    let dir2 = tmp.path().join("again");
    make_model(&dir2, &[]);
    assert_eq!(
        std::fs::read(dir.join("model.onnx")).unwrap(),
        std::fs::read(dir2.join("model.onnx")).unwrap(),
        "make-model is not deterministic"
    );

    let stdout = check_model(&dir);
    assert!(
        stdout.contains("inputs     input_ids, attention_mask, token_type_ids"),
        "{stdout}"
    );
    assert!(stdout.contains("outputs    logits (1 label(s)"), "{stdout}");
    assert!(stdout.contains("parity     no reference.jsonl"), "{stdout}");

    let cfg = ModelConfig {
        dir: dir.clone(),
        intra_op_threads: 1,
        ..ModelConfig::default()
    };
    let mut scorer = Scorer::load(&cfg, "near-zero").expect("load");
    assert!(scorer.info().has_token_type_ids);
    assert_eq!(scorer.info().num_labels, 1);
    let tok = PairTokenizer::from_file(&dir.join("tokenizer.json"), 256).expect("tokenizer");
    let q = "what does a cross-encoder do?";
    let passages = [
        "A cross-encoder reads a query and a passage together and scores their relevance.",
        "Ace Ventura: Pet Detective (1994): a pet detective searches for a stolen dolphin.",
        "Short.",
    ];
    let pairs: Vec<_> = passages.iter().map(|p| tok.encode(q, p).unwrap()).collect();
    // One padded batch (rows of different lengths) and each pair alone.
    let batch = scorer
        .score(&TensorBatch::from_pairs(pairs.iter(), tok.pad_id()))
        .expect("score batch");
    assert_eq!(batch.len(), pairs.len());
    for (i, p) in pairs.iter().enumerate() {
        let alone = scorer
            .score(&TensorBatch::from_pairs(std::iter::once(p), tok.pad_id()))
            .expect("score one");
        assert!(
            batch[i].logit.is_finite(),
            "logit {i} is {}",
            batch[i].logit
        );
        assert!(
            (alone[0].logit - batch[i].logit).abs() < 1e-5,
            "pair {i}: {} alone, {} padded in a batch",
            alone[0].logit,
            batch[i].logit
        );
    }
    for i in 0..pairs.len() {
        for j in i + 1..pairs.len() {
            assert_ne!(
                batch[i].logit, batch[j].logit,
                "pairs {i} and {j} score the same"
            );
        }
    }
    // A second load of the same file: the same scores.
    let mut again = Scorer::load(&cfg, "near-zero").expect("load again");
    let batch2 = again
        .score(&TensorBatch::from_pairs(pairs.iter(), tok.pad_id()))
        .expect("score again");
    let logits = |v: &[reranker::model::Score]| v.iter().map(|s| s.logit).collect::<Vec<_>>();
    assert_eq!(logits(&batch), logits(&batch2));
}

/// `bench --python-peer` on the generated model: the worker and scripts/python_peer.py each
/// rerank every event on one local tansu, and the report holds both figures and their ratio.
#[test]
fn bench_runs_the_worker_and_the_python_peer_on_the_same_events() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("near-zero");
    make_model(&dir, &[]);
    let out = bin()
        .current_dir(common::repo_root())
        .env("RUST_LOG", "warn")
        .args(["bench", "--events", "4", "--candidates", "20", "--json"])
        .args(["--set", "model.intra_op_threads=1", "--model-dir"])
        .arg(&dir)
        .arg("--python-peer")
        .arg(common::repo_root().join("scripts/python_peer.py"))
        .output()
        .expect("run bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench --python-peer failed (scripts/setup.sh --with-python installs the peer's packages): {stderr}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(r["events_done"], 4, "{r}");
    assert_eq!(r["pairs"], 80, "{r}");
    assert!(r["e2e_pairs_per_s"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["cpu_us_per_pair"].as_f64().unwrap() > 0.0, "{r}");
    let p = &r["python_peer"];
    assert_eq!(p["events"], 4, "{r}");
    assert_eq!(p["pairs"], 80, "{r}");
    assert_eq!(p["delivered"], 4, "{r}");
    for k in ["pairs_per_s", "cpu_us_per_pair", "speedup", "cpu_ratio"] {
        let v = p[k].as_f64().unwrap_or(f64::NAN);
        assert!(v.is_finite() && v > 0.0, "python_peer.{k} = {v}: {r}");
    }
}

/// GPU exports vary in their interface: int32 id inputs, fp16 logits. The worker reads the types
/// from the graph; the same weights behind each interface must score the same (bit for bit with
/// int32 ids, within half-precision rounding with fp16 logits) on real pairs.
#[test]
fn int32_ids_and_fp16_logits_score_like_int64_and_fp32() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let make = |name: &str, ids: &str, logits: &str| {
        let dir = tmp.path().join(name);
        make_model(&dir, &["--ids", ids, "--logits", logits]);
        let stdout = check_model(&dir);
        assert!(
            stdout.contains(&format!("types      ids {ids}, logits {logits}")),
            "{stdout}"
        );
        dir
    };
    let dirs = [
        make("i64-f32", "int64", "float32"),
        make("i32-f32", "int32", "float32"),
        make("i64-f16", "int64", "float16"),
        make("i32-f16", "int32", "float16"),
    ];
    let tok = PairTokenizer::from_file(&dirs[0].join("tokenizer.json"), 256).expect("tokenizer");
    let mut pairs = Vec::new();
    for e in common::scifact_events(4, 8) {
        let q = e["query"].as_str().expect("query");
        for c in e["candidates"].as_array().expect("candidates") {
            pairs.push(tok.encode(q, c["text"].as_str().expect("text")).unwrap());
        }
    }
    let batch = TensorBatch::from_pairs(pairs.iter(), tok.pad_id());
    let scores: Vec<Vec<f32>> = dirs
        .iter()
        .map(|dir| {
            let cfg = ModelConfig {
                dir: dir.clone(),
                intra_op_threads: 1,
                ..ModelConfig::default()
            };
            let mut s = Scorer::load(&cfg, "near-zero").expect("load");
            s.score(&batch)
                .expect("score")
                .iter()
                .map(|s| s.logit)
                .collect()
        })
        .collect();
    let fp32 = &scores[0];
    assert_eq!(fp32.len(), pairs.len());
    assert!(
        fp32.windows(2).any(|w| w[0] != w[1]),
        "the pairs must not all score alike"
    );
    assert_eq!(&scores[1], fp32, "int32 ids change the scores");
    for half in &scores[2..] {
        for (a, b) in fp32.iter().zip(half) {
            // Half precision keeps 11 significant bits: a relative error of at most 2^-11.
            assert!(
                (a - b).abs() <= a.abs() / 2048.0 + 1e-7,
                "fp16 logit {b} vs fp32 {a}"
            );
        }
        assert_ne!(half, fp32, "fp16 logits are rounded, so not all equal");
    }
}
