//! A real model that fails at run time on one token: the bundled cross-encoder plus a second
//! output, `Gather(table[1], max(input_ids == SENTINEL))`, whose index is out of bounds exactly
//! when a row holds the sentinel id. ONNX Runtime computes every output, so a batch holding the
//! sentinel fails with "indices element out of data bounds" and every other batch scores as the
//! plain model does (output 0 is untouched).
//!
//! No onnx package is needed: protobuf merges a repeated field's entries when a message is
//! concatenated, so appending a `ModelProto.graph` fragment with more nodes, initializers and
//! outputs adds them to the model's graph.

use std::path::Path;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint(((field as u64) << 3) | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

fn int_field(field: u32, v: u64, out: &mut Vec<u8>) {
    varint((field as u64) << 3, out);
    varint(v, out);
}

fn node(op: &str, inputs: &[&str], output: &str, attrs: &[(&str, i64)]) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        bytes_field(1, i.as_bytes(), &mut n);
    }
    bytes_field(2, output.as_bytes(), &mut n);
    bytes_field(3, format!("poison_{output}").as_bytes(), &mut n);
    bytes_field(4, op.as_bytes(), &mut n);
    for (name, v) in attrs {
        let mut a = Vec::new();
        bytes_field(1, name.as_bytes(), &mut a);
        int_field(3, *v as u64, &mut a);
        int_field(20, 2, &mut a); // AttributeProto.INT
        bytes_field(5, &a, &mut n);
    }
    n
}

fn tensor(name: &str, data_type: u64, dims: &[i64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        int_field(1, *d as u64, &mut t);
    }
    int_field(2, data_type, &mut t);
    bytes_field(8, name.as_bytes(), &mut t);
    bytes_field(9, raw, &mut t);
    t
}

/// Writes `dir` with the model of `model_dir` made to fail on token id `sentinel`, and its
/// tokenizer and config.
pub fn write_poisoned_model(model_dir: &Path, dir: &Path, sentinel: i64) {
    const FLOAT: u64 = 1;
    const INT64: u64 = 7;
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
    let mut tensor_type = Vec::new();
    int_field(1, FLOAT, &mut tensor_type);
    let mut type_proto = Vec::new();
    bytes_field(1, &tensor_type, &mut type_proto);
    let mut value_info = Vec::new();
    bytes_field(1, b"poison_check", &mut value_info);
    bytes_field(2, &type_proto, &mut value_info);
    bytes_field(12, &value_info, &mut graph);

    let mut model = std::fs::read(model_dir.join("model.onnx")).expect("model.onnx");
    bytes_field(7, &graph, &mut model);
    std::fs::write(dir.join("model.onnx"), model).expect("write model");
}
