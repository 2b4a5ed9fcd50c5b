//! Commands around the worker: benchmarks, the demo, tuning K and N, and the local broker they and
//! the tests use.

pub mod bench;
pub mod broker;
pub mod demo;
pub mod tune;
