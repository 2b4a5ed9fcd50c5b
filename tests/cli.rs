//! The model-facing subcommands through the real binary: check-model, bench --model-only, and the
//! loud failure of `device = "cuda"` where CUDA cannot run.

mod common;

use std::process::Command;

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reranker"))
        .args(args)
        .output()
        .expect("run reranker");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_model_reports_io_device_and_parity() {
    let dir = common::model_dir();
    let (ok, out, err) = run(&["check-model", "--model", dir.to_str().unwrap()]);
    assert!(ok, "check-model failed:\n{out}\n{err}");
    assert!(
        out.contains("input_ids, attention_mask, token_type_ids"),
        "{out}"
    );
    assert!(out.contains("device     cpu"), "{out}");
    assert!(out.contains("activation sigmoid"), "{out}");
    assert!(
        out.contains("orderings differing 0/") && out.contains("→ OK"),
        "{out}"
    );
    assert!(out.contains("pairs/s"), "{out}");
}

#[test]
fn bench_model_only_reports_every_shape() {
    let dir = common::model_dir();
    let (ok, out, err) = run(&[
        "bench",
        "--model-only",
        "--json",
        "--seconds",
        "0.05",
        "--batch-sizes",
        "1,4",
        "--seq-lens",
        "16,32",
        "--model-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out).expect("JSON rows");
    assert_eq!(rows.len(), 4);
    for r in &rows {
        assert!(r["pairs_per_s"].as_f64().unwrap() > 0.0);
        assert!(r["runs"].as_u64().unwrap() >= 2);
    }
}

#[test]
fn cuda_that_cannot_start_fails_loudly() {
    let dir = common::model_dir();
    let (ok, out, err) = run(&[
        "check-model",
        "--model",
        dir.to_str().unwrap(),
        "--set",
        "model.device=\"cuda\"",
    ]);
    assert!(!ok, "device = cuda must not silently run on CPU:\n{out}");
    assert!(err.contains("CUDA cannot be used"), "{err}");
}
