//! Streaming cross-encoder reranker: Kafka in, ONNX Runtime in the middle, Kafka out.
//!
//! The modules follow the pipeline: [`config`] → [`ingress`] → [`decode`] → [`tokenize`] →
//! [`batch`] → [`infer`] → [`assemble`] → [`egress`] / [`dlq`] → [`offsets`]; [`pipeline`] wires them.

pub mod assemble;
pub mod batch;
pub mod bench;
pub mod broker;
pub mod config;
pub mod decode;
pub mod demo;
pub mod dlq;
pub mod egress;
pub mod http;
pub mod infer;
pub mod ingress;
pub mod metrics;
pub mod offsets;
pub mod pipeline;
pub mod replay;
pub mod stall;
pub mod telemetry;
pub mod tokenize;
pub mod tools;
pub mod txn;
