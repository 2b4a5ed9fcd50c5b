//! Streaming cross-encoder reranker: Kafka in, ONNX Runtime in the middle, Kafka out.

pub mod assemble;
pub mod batch;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod kafka;
pub mod model;
pub mod obs;
pub mod offsets;
pub mod replay;
pub mod tokenize;
pub mod tools;
pub mod worker;

// The old flat paths, until the modules are split along the new tree.
pub use kafka::{consumer as ingress, producer as egress, txn};
pub use model as infer;
pub use obs::{http, metrics, telemetry};
pub use tools::{bench, broker, demo};
pub use worker as pipeline;
