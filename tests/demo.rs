//! `reranker demo --broker mock`: the whole demo on librdkafka's in-process mock cluster, so a
//! first look needs no broker build.

mod common;

use std::process::Command;

#[test]
fn demo_runs_on_the_mock_cluster_and_names_its_model() {
    let o = Command::new(env!("CARGO_BIN_EXE_reranker"))
        .args(["demo", "--broker", "mock", "--scifact-events", "1"])
        .arg("--model-dir")
        .arg(common::model_dir())
        .args(["--set", "model.max_length=64"])
        .args(["--set", "http.listen=\"127.0.0.1:0\""])
        .env_remove("RUST_LOG")
        .output()
        .expect("run reranker demo");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{out}\n{err}");
    assert!(err.contains("mock cluster"), "{err}");
    assert!(err.contains("model: "), "{err}");
    if common::model_dir().ends_with("minilm-l6-ce") {
        assert!(err.contains("small MiniLM-L6 test cross-encoder"), "{err}");
    }
    assert!(out.contains("▶ demo-jim-carrey"), "{out}");
    assert!(out.contains("▶ scifact-0"), "{out}");
    assert!(out.contains("✗ dead letter (invalid_json)"), "{out}");
}
