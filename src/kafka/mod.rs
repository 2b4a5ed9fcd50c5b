pub mod consumer;
pub mod producer;
pub mod txn;
