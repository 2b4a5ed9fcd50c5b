//! Tools around the worker (not on its data path).

pub mod tune;
