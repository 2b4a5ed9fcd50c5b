//! Streaming cross-encoder reranker: Kafka in, ONNX Runtime in the middle, Kafka out.
//!
//! The modules follow the data flow (see ARCHITECTURE.md): [`kafka::consumer`] →
//! [`worker::admit`] ([`decode`] with [`template`], [`tokenize`]) → [`batch`] → [`model`] →
//! [`assemble`] → [`worker::finish`] ([`dlq`]) → [`kafka::producer`] | [`kafka::txn`] →
//! [`offsets`];
//! [`worker`] wires them, [`obs`] observes them, [`tools`] are the commands around them.

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
pub mod stall;
pub mod template;
pub mod tokenize;
pub mod tools;
pub mod worker;

// The tests' and tools' paths from before the tools moved.
pub use tools::{broker, demo};

/// Wall-clock milliseconds since the epoch (record timestamps, dead letters, outputs).
pub fn now_ms() -> i64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
