//! Pairs admitted but not yet finished: the backpressure signal. Added by the admission loop,
//! taken back when an event's output is acknowledged (or its work dropped on a revoke).

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Default, Debug)]
pub struct InflightPairs(AtomicUsize);

impl InflightPairs {
    pub fn add(&self, pairs: usize) {
        self.0.fetch_add(pairs, Ordering::SeqCst);
    }

    pub fn sub(&self, pairs: usize) {
        self.0.fetch_sub(pairs, Ordering::SeqCst);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}
