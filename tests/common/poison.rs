//! A real model that fails at run time on one token: the bundled cross-encoder plus a second
//! output, `Gather(table[1], max(input_ids == SENTINEL))`, whose index is out of bounds exactly
//! when a row holds the sentinel id. ONNX Runtime computes every output, so a batch holding the
//! sentinel fails with "indices element out of data bounds" and every other batch scores as the
//! plain model does (output 0 is untouched).
//!
//! No onnx package is needed (the protobuf helpers are `reranker::model::synth`'s): protobuf
//! merges a repeated field's entries when a message is concatenated, so appending a
//! `ModelProto.graph` fragment with more nodes, initializers and outputs adds them to the model's
//! graph.

use std::path::Path;

use reranker::model::synth::{self, bytes_field, tensor, value_info, Attr, FLOAT, INT64};

fn node(op: &str, inputs: &[&str], output: &str, attrs: &[(&str, i64)]) -> Vec<u8> {
    let attrs: Vec<(&str, Attr)> = attrs.iter().map(|(n, v)| (*n, Attr::Int(*v))).collect();
    synth::node(op, inputs, output, &format!("poison_{output}"), &attrs)
}

/// Writes `dir` with the model of `model_dir` made to fail on token id `sentinel`, and its
/// tokenizer and config.
pub fn write_poisoned_model(model_dir: &Path, dir: &Path, sentinel: i64) {
    std::fs::create_dir_all(dir).expect("model dir");
    for f in ["tokenizer.json", "config.json"] {
        if model_dir.join(f).exists() {
            std::fs::copy(model_dir.join(f), dir.join(f)).expect("copy");
        }
    }
    let mut graph = Vec::new();
    let nodes = [
        node("Equal", &["input_ids", "poison_id"], "poison_eq", &[]),
        node(
            "Cast",
            &["poison_eq"],
            "poison_eq_i",
            &[("to", INT64 as i64)],
        ),
        // No axes: every dimension is reduced (all opsets).
        node(
            "ReduceMax",
            &["poison_eq_i"],
            "poison_any",
            &[("keepdims", 0)],
        ),
        node(
            "Gather",
            &["poison_table", "poison_any"],
            "poison_check",
            &[],
        ),
    ];
    for n in &nodes {
        bytes_field(1, n, &mut graph);
    }
    bytes_field(
        5,
        &tensor("poison_id", INT64, &[], &sentinel.to_le_bytes()),
        &mut graph,
    );
    bytes_field(
        5,
        &tensor("poison_table", FLOAT, &[1], &0f32.to_le_bytes()),
        &mut graph,
    );
    bytes_field(12, &value_info("poison_check", FLOAT, None), &mut graph);

    let mut model = std::fs::read(model_dir.join("model.onnx")).expect("model.onnx");
    bytes_field(7, &graph, &mut model);
    std::fs::write(dir.join("model.onnx"), model).expect("write model");
}
