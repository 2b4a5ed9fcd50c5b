//! ONNX models written by hand (no onnx package): a few protobuf helpers and the near-zero-cost
//! cross-encoder that `reranker make-model` writes for benchmarks.
//!
//! The near-zero model has a cross-encoder's interface (inputs `input_ids`, `attention_mask`,
//! `token_type_ids`, int64 [batch, sequence]; output `logits`, float [batch, 1]) and computes
//! `logit = mean over unmasked tokens of (E[input_id] + T[token_type_id]) · w`: two embedding
//! lookups (Gather) from deterministic pseudo-random tables sized to the tokenizer's vocabulary, a
//! masked mean over the sequence (MatMul by the mask) and a dot product (MatMul). It reads every
//! token, so tokenization and padding still matter, and costs next to nothing to run: what is left
//! of an end-to-end benchmark is the host path and the broker.

use std::path::Path;

use anyhow::Context;

/// `TensorProto.DataType`.
pub const FLOAT: u64 = 1;
pub const INT64: u64 = 7;
pub const INT32: u64 = 6;
pub const FLOAT16: u64 = 10;

/// The element types of a generated model's interface: what GPU exports vary in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    pub ids: super::IdType,
    pub logits: super::LogitType,
}

impl Default for Interface {
    fn default() -> Self {
        Self {
            ids: super::IdType::I64,
            logits: super::LogitType::F32,
        }
    }
}

pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field (wire type 2): bytes, strings and embedded messages.
pub fn bytes_field(field: u32, data: &[u8], out: &mut Vec<u8>) {
    varint((u64::from(field) << 3) | 2, out);
    varint(data.len() as u64, out);
    out.extend_from_slice(data);
}

/// A varint field (wire type 0); negative values as two's complement, as protobuf's int64.
pub fn int_field(field: u32, v: i64, out: &mut Vec<u8>) {
    varint(u64::from(field) << 3, out);
    varint(v as u64, out);
}

/// An attribute's value.
pub enum Attr<'a> {
    Int(i64),
    Ints(&'a [i64]),
}

/// `NodeProto`: inputs, one output, a name, the op and its attributes (default domain).
pub fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    name: &str,
    attrs: &[(&str, Attr)],
) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        bytes_field(1, i.as_bytes(), &mut n);
    }
    bytes_field(2, output.as_bytes(), &mut n);
    bytes_field(3, name.as_bytes(), &mut n);
    bytes_field(4, op.as_bytes(), &mut n);
    for (attr_name, v) in attrs {
        let mut a = Vec::new();
        bytes_field(1, attr_name.as_bytes(), &mut a);
        match v {
            Attr::Int(i) => {
                int_field(3, *i, &mut a);
                int_field(20, 2, &mut a); // AttributeProto.INT
            }
            Attr::Ints(is) => {
                for i in *is {
                    int_field(8, *i, &mut a);
                }
                int_field(20, 7, &mut a); // AttributeProto.INTS
            }
        }
        bytes_field(5, &a, &mut n);
    }
    n
}

/// `TensorProto` with raw little-endian data.
pub fn tensor(name: &str, data_type: u64, dims: &[i64], raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        int_field(1, *d, &mut t);
    }
    int_field(2, data_type as i64, &mut t);
    bytes_field(8, name.as_bytes(), &mut t);
    bytes_field(9, raw, &mut t);
    t
}

/// A dimension of a `ValueInfoProto`'s shape: symbolic or fixed.
pub enum Dim<'a> {
    Param(&'a str),
    Value(i64),
}

/// `ValueInfoProto`: a graph input or output with its element type and (optional) shape.
pub fn value_info(name: &str, elem_type: u64, shape: Option<&[Dim]>) -> Vec<u8> {
    let mut tensor_type = Vec::new();
    int_field(1, elem_type as i64, &mut tensor_type);
    if let Some(dims) = shape {
        let mut s = Vec::new();
        for d in dims {
            let mut dim = Vec::new();
            match d {
                Dim::Value(v) => int_field(1, *v, &mut dim),
                Dim::Param(p) => bytes_field(2, p.as_bytes(), &mut dim),
            }
            bytes_field(1, &dim, &mut s);
        }
        bytes_field(2, &s, &mut tensor_type);
    }
    let mut type_proto = Vec::new();
    bytes_field(1, &tensor_type, &mut type_proto);
    let mut v = Vec::new();
    bytes_field(1, name.as_bytes(), &mut v);
    bytes_field(2, &type_proto, &mut v);
    v
}

/// splitmix64: a deterministic table from a seed, no RNG crate.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` floats uniform in [-1, 1), little-endian.
fn table(n: usize, state: &mut u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        let x = (splitmix(state) >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// The near-zero-cost cross-encoder's `model.onnx` bytes (IR 8, opset 17).
pub fn near_zero_model(vocab: usize, dim: usize, seed: u64, io: Interface) -> Vec<u8> {
    let (v, d) = (vocab as i64, dim as i64);
    let mut state = seed;
    let mut g = Vec::new();
    let batch_seq = [Dim::Param("batch"), Dim::Param("sequence")];
    let nodes = [
        // [B, S, D]: token and segment embeddings.
        node(
            "Gather",
            &["tok_emb", "input_ids"],
            "e_tok",
            "tok_gather",
            &[("axis", Attr::Int(0))],
        ),
        node(
            "Gather",
            &["type_emb", "token_type_ids"],
            "e_type",
            "type_gather",
            &[("axis", Attr::Int(0))],
        ),
        node("Add", &["e_tok", "e_type"], "e", "emb_add", &[]),
        // [B, 1, S] float mask; its sum per row, at least 1: [B, 1].
        node(
            "Cast",
            &["attention_mask"],
            "mask_f",
            "mask_cast",
            &[("to", Attr::Int(FLOAT as i64))],
        ),
        node(
            "Unsqueeze",
            &["mask_f", "axis_1"],
            "mask_row",
            "mask_unsqueeze",
            &[],
        ),
        node(
            "ReduceSum",
            &["mask_f", "axis_1"],
            "count_raw",
            "mask_count",
            &[("keepdims", Attr::Int(1))],
        ),
        node(
            "Max",
            &["count_raw", "one"],
            "count",
            "count_at_least_1",
            &[],
        ),
        // Masked sum over the sequence [B, 1, D], dot with w [D, 1]: [B, 1, 1] → [B, 1].
        node("MatMul", &["mask_row", "e"], "sum", "masked_sum", &[]),
        node("MatMul", &["sum", "w"], "dot3", "dot", &[]),
        node("Squeeze", &["dot3", "axis_2"], "dot", "squeeze", &[]),
        node("Div", &["dot", "count"], "logits_f32", "mean", &[]),
        // An fp16 export's output: the same values rounded to half precision.
        node(
            "Cast",
            &["logits_f32"],
            "logits",
            "logits_cast",
            &[(
                "to",
                Attr::Int(match io.logits {
                    super::LogitType::F32 => FLOAT,
                    super::LogitType::F16 => FLOAT16,
                } as i64),
            )],
        ),
    ];
    for n in &nodes {
        bytes_field(1, n, &mut g);
    }
    bytes_field(2, b"near_zero_cross_encoder", &mut g);
    let inits = [
        tensor("tok_emb", FLOAT, &[v, d], &table(vocab * dim, &mut state)),
        tensor("type_emb", FLOAT, &[2, d], &table(2 * dim, &mut state)),
        tensor("w", FLOAT, &[d, 1], &table(dim, &mut state)),
        tensor("one", FLOAT, &[], &1f32.to_le_bytes()),
        tensor("axis_1", INT64, &[1], &1i64.to_le_bytes()),
        tensor("axis_2", INT64, &[1], &2i64.to_le_bytes()),
    ];
    for t in &inits {
        bytes_field(5, t, &mut g);
    }
    let ids = match io.ids {
        super::IdType::I64 => INT64,
        super::IdType::I32 => INT32,
    };
    for name in ["input_ids", "attention_mask", "token_type_ids"] {
        bytes_field(11, &value_info(name, ids, Some(&batch_seq)), &mut g);
    }
    let logits = match io.logits {
        super::LogitType::F32 => FLOAT,
        super::LogitType::F16 => FLOAT16,
    };
    bytes_field(
        12,
        &value_info(
            "logits",
            logits,
            Some(&[Dim::Param("batch"), Dim::Value(1)]),
        ),
        &mut g,
    );

    let mut m = Vec::new();
    int_field(1, 8, &mut m); // ir_version
    bytes_field(2, b"reranker make-model", &mut m);
    bytes_field(3, env!("CARGO_PKG_VERSION").as_bytes(), &mut m);
    let mut opset = Vec::new();
    bytes_field(1, b"", &mut opset);
    int_field(2, 17, &mut opset);
    bytes_field(8, &opset, &mut m);
    bytes_field(7, &g, &mut m);
    m
}

/// Files copied from the source model directory when present (the tokenizer is required).
const COPIED: [&str; 4] = [
    "tokenizer.json",
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Writes `out` as a model directory: the near-zero `model.onnx` with an embedding table sized
/// to `from`'s tokenizer, and `from`'s tokenizer (and config) files. No `reference.jsonl`, so
/// `check-model` skips parity. Returns the vocabulary size.
pub fn write_near_zero_dir(
    from: &Path,
    out: &Path,
    dim: usize,
    seed: u64,
    io: Interface,
) -> anyhow::Result<usize> {
    anyhow::ensure!(dim > 0, "the embedding dimension must be at least 1");
    let tok_path = from.join("tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&tok_path)
        .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", tok_path.display()))?;
    let vocab = tok.get_vocab_size(true);
    anyhow::ensure!(vocab > 0, "{} has an empty vocabulary", tok_path.display());
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for f in COPIED {
        let src = from.join(f);
        if src.exists() {
            // Read and written, not copied: a read-only source (a shared model dir) must not
            // make the copy read-only, or the next make-model into `out` could not replace it.
            let data =
                std::fs::read(&src).with_context(|| format!("cannot read {}", src.display()))?;
            let dst = out.join(f);
            let _ = std::fs::remove_file(&dst);
            std::fs::write(&dst, data)
                .with_context(|| format!("cannot write {}", dst.display()))?;
        }
    }
    // A stale reference from an earlier model would fail check-model's parity.
    let stale = out.join("reference.jsonl");
    if stale.exists() {
        std::fs::remove_file(&stale)
            .with_context(|| format!("cannot remove {}", stale.display()))?;
    }
    let path = out.join("model.onnx");
    let tmp = out.join("model.onnx.tmp");
    std::fs::write(&tmp, near_zero_model(vocab, dim, seed, io))
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(vocab)
}
