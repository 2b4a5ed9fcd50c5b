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

#[test]
fn generated_model_loads_checks_and_scores_deterministically() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("near-zero");
    let out = bin()
        .args(["make-model", "--from"])
        .arg(common::model_dir())
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run make-model");
    assert!(
        out.status.success(),
        "make-model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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
    assert!(bin()
        .args(["make-model", "--from"])
        .arg(common::model_dir())
        .arg("--out")
        .arg(&dir2)
        .status()
        .expect("run make-model")
        .success());
    assert_eq!(
        std::fs::read(dir.join("model.onnx")).unwrap(),
        std::fs::read(dir2.join("model.onnx")).unwrap(),
        "make-model is not deterministic"
    );

    let check = bin()
        .args([
            "check-model",
            "--set",
            "model.intra_op_threads=1",
            "--model",
        ])
        .arg(&dir)
        .output()
        .expect("run check-model");
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "check-model rejected the generated model: {stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
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
    assert!(bin()
        .args(["make-model", "--from"])
        .arg(common::model_dir())
        .arg("--out")
        .arg(&dir)
        .status()
        .expect("run make-model")
        .success());
    let out = bin()
        .current_dir(common::repo_root())
        .env("RUST_LOG", "warn")
        .args(["bench", "--events", "4", "--candidates", "20", "--json"])
        .args(["--set", "model.intra_op_threads=1", "--model"])
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
