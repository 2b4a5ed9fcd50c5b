//! Cross-partition, length-grouped micro-batcher.
//!
//! Pairs from every event and partition wait in one pool. The caller asks for a batch only when the
//! inference stage can take one, so under load the pool grows past one batch and the batcher can
//! pick pairs of similar length (little padding); under light load the wait timer closes batches.
//!
//! A batch closes on whichever comes first:
//! - `max_batch_pairs` pairs can be taken (`Full`),
//! - the padded cost (pairs × longest) would pass `max_batch_tokens` with one more pair (`Tokens`),
//! - the oldest waiting pair has waited `max_wait` (`Timeout`),
//! - the caller drains (`Drain`, on shutdown).
//!
//! Every batch holds the oldest waiting pair, so no pair starves however the lengths fall.

use std::time::{Duration, Instant};

use crate::tokenize::EncodedPair;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PairKey {
    pub event: u64,
    pub index: u32,
}

#[derive(Debug)]
pub struct PendingPair {
    pub key: PairKey,
    pub pair: EncodedPair,
    pub enqueued: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    pub max_pairs: usize,
    pub max_tokens: usize,
    pub max_wait: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    Full,
    Tokens,
    Timeout,
    Drain,
}

impl CloseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Tokens => "tokens",
            Self::Timeout => "timeout",
            Self::Drain => "drain",
        }
    }
}

#[derive(Debug)]
pub struct Batch {
    /// Sorted by length, shortest first.
    pub pairs: Vec<PendingPair>,
    pub reason: CloseReason,
    /// Longest pair: every row is padded to this.
    pub seq_len: usize,
    /// Sum of real (unpadded) tokens.
    pub real_tokens: usize,
}

impl Batch {
    pub fn padded_tokens(&self) -> usize {
        self.pairs.len() * self.seq_len
    }
}

pub struct Batcher {
    policy: BatchPolicy,
    /// In arrival order, so `pool[0]` is always the oldest.
    pool: Vec<PendingPair>,
}

struct Window {
    start: usize,
    end: usize,
}

impl Batcher {
    pub fn new(policy: BatchPolicy) -> Self {
        assert!(policy.max_pairs > 0, "max_pairs must be positive");
        Self {
            policy,
            pool: Vec::new(),
        }
    }

    pub fn push(&mut self, p: PendingPair) {
        self.pool.push(p);
    }

    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pool.is_empty()
    }

    /// When the oldest pair's wait runs out; `None` when nothing waits.
    pub fn deadline(&self) -> Option<Instant> {
        self.pool.first().map(|p| p.enqueued + self.policy.max_wait)
    }

    /// Drops waiting pairs (e.g. of partitions revoked in a rebalance).
    pub fn retain(&mut self, mut keep: impl FnMut(&PairKey) -> bool) {
        self.pool.retain(|p| keep(&p.key));
    }

    /// A batch if a close condition holds at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Batch> {
        let oldest = self.pool.first()?;
        let timed_out = now >= oldest.enqueued + self.policy.max_wait;
        // Polled on every event admitted: when the whole pool fits both budgets and has not
        // waited long enough, no close condition can hold, and sorting it would be wasted.
        let n = self.pool.len();
        if !timed_out && n < self.policy.max_pairs {
            let longest = self.pool.iter().map(|p| p.pair.len()).max().unwrap_or(0);
            if n * longest <= self.policy.max_tokens {
                return None;
            }
        }
        let (order, window) = self.choose();
        let count = window.end - window.start;
        let reason = if count >= self.policy.max_pairs {
            CloseReason::Full
        } else if count < self.pool.len() {
            // Fewer than max_pairs taken although more wait: the token budget stopped the window.
            CloseReason::Tokens
        } else if timed_out {
            CloseReason::Timeout
        } else {
            return None;
        };
        Some(self.take(order, window, reason))
    }

    /// A batch regardless of timers (shutdown drain); `None` when empty.
    pub fn flush(&mut self) -> Option<Batch> {
        if self.pool.is_empty() {
            return None;
        }
        let (order, window) = self.choose();
        Some(self.take(order, window, CloseReason::Drain))
    }

    /// Sorts pool indices by length and picks the window holding the oldest pair that takes the most
    /// pairs within both budgets, wasting the fewest padded tokens among those.
    fn choose(&self) -> (Vec<usize>, Window) {
        let mut order: Vec<usize> = (0..self.pool.len()).collect();
        // Stable sort keeps arrival order among equal lengths.
        order.sort_by_key(|&i| self.pool[i].pair.len());
        let lens: Vec<usize> = order.iter().map(|&i| self.pool[i].pair.len()).collect();
        let mut prefix = Vec::with_capacity(lens.len() + 1);
        prefix.push(0usize);
        for l in &lens {
            prefix.push(prefix.last().copied().unwrap_or(0) + l);
        }
        let k = order.iter().position(|&i| i == 0).unwrap_or(0);
        let n = lens.len();
        let (max_pairs, max_tokens) = (self.policy.max_pairs, self.policy.max_tokens);

        let mut best = Window {
            start: k,
            end: k + 1,
        };
        let mut best_waste = 0usize;
        let lo = (k + 1).saturating_sub(max_pairs);
        for start in lo..=k {
            // Lengths ascend, so a window's padded cost grows with its end: take the furthest end
            // that fits both budgets.
            let mut end = (start + max_pairs).min(n);
            while end > k + 1 && (end - start) * lens[end - 1] > max_tokens {
                end -= 1;
            }
            let count = end - start;
            if count * lens[end - 1] > max_tokens && count > 1 {
                continue; // even the shortest window through the oldest pair is over budget
            }
            let waste = count * lens[end - 1] - (prefix[end] - prefix[start]);
            let best_count = best.end - best.start;
            if count > best_count || (count == best_count && waste < best_waste) {
                best = Window { start, end };
                best_waste = waste;
            }
        }
        (order, best)
    }

    fn take(&mut self, order: Vec<usize>, w: Window, reason: CloseReason) -> Batch {
        let mut chosen = vec![false; self.pool.len()];
        for &i in &order[w.start..w.end] {
            chosen[i] = true;
        }
        let mut taken = Vec::with_capacity(w.end - w.start);
        let mut rest = Vec::with_capacity(self.pool.len() - (w.end - w.start));
        for (i, p) in std::mem::take(&mut self.pool).into_iter().enumerate() {
            if chosen[i] {
                taken.push(p);
            } else {
                rest.push(p);
            }
        }
        self.pool = rest;
        taken.sort_by_key(|p| p.pair.len());
        let seq_len = taken.last().map(|p| p.pair.len()).unwrap_or(0);
        let real_tokens = taken.iter().map(|p| p.pair.len()).sum();
        Batch {
            pairs: taken,
            reason,
            seq_len,
            real_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(event: u64, len: usize, at: Instant) -> PendingPair {
        PendingPair {
            key: PairKey { event, index: 0 },
            pair: EncodedPair {
                ids: vec![1; len],
                type_ids: vec![0; len],
                truncated: false,
            },
            enqueued: at,
        }
    }

    fn policy(max_pairs: usize, max_tokens: usize, wait_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_pairs,
            max_tokens,
            max_wait: Duration::from_millis(wait_ms),
        }
    }

    #[test]
    fn closes_when_full() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(4, 10_000, 1000));
        for i in 0..3 {
            b.push(pair(i, 10, t0));
        }
        assert!(
            b.poll(t0).is_none(),
            "3 of 4 pairs and no timeout must wait"
        );
        b.push(pair(3, 10, t0));
        let batch = b.poll(t0).expect("full batch");
        assert_eq!(batch.reason, CloseReason::Full);
        assert_eq!(batch.pairs.len(), 4);
        assert!(b.is_empty());
    }

    #[test]
    fn closes_on_token_budget() {
        let t0 = Instant::now();
        // 3 pairs of 100 fit in 300 padded tokens; a 4th would not.
        let mut b = Batcher::new(policy(8, 300, 1000));
        for i in 0..3 {
            b.push(pair(i, 100, t0));
        }
        assert!(
            b.poll(t0).is_none(),
            "exactly at budget with nothing else waiting: wait"
        );
        b.push(pair(3, 100, t0));
        let batch = b.poll(t0).expect("token-bound batch");
        assert_eq!(batch.reason, CloseReason::Tokens);
        assert_eq!(batch.pairs.len(), 3);
        assert!(batch.padded_tokens() <= 300);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn closes_on_timeout_with_a_partial_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(32, 10_000, 5));
        b.push(pair(0, 10, t0));
        b.push(pair(1, 12, t0 + Duration::from_millis(2)));
        assert_eq!(b.deadline(), Some(t0 + Duration::from_millis(5)));
        assert!(b.poll(t0 + Duration::from_millis(4)).is_none());
        let batch = b.poll(t0 + Duration::from_millis(5)).expect("timed out");
        assert_eq!(batch.reason, CloseReason::Timeout);
        assert_eq!(batch.pairs.len(), 2);
        assert_eq!(batch.seq_len, 12);
        assert_eq!(batch.real_tokens, 22);
    }

    #[test]
    fn flush_drains_everything() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(2, 10_000, 1000));
        for i in 0..3 {
            b.push(pair(i, 5, t0));
        }
        let mut n = 0;
        while let Some(batch) = b.flush() {
            assert_eq!(batch.reason, CloseReason::Drain);
            n += batch.pairs.len();
        }
        assert_eq!(n, 3);
    }

    #[test]
    fn groups_pairs_by_length() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(8, 100_000, 1000));
        // Interleaved short and long pairs: a FIFO batcher would pad every batch to the long length.
        let lens = [
            10, 200, 12, 210, 11, 190, 13, 205, 9, 199, 14, 201, 10, 198, 12, 202,
        ];
        for (i, &l) in lens.iter().enumerate() {
            b.push(pair(i as u64, l, t0 + Duration::from_micros(i as u64)));
        }
        let first = b.poll(t0).expect("full");
        let second = b.poll(t0).expect("full");
        let total_real: usize = lens.iter().sum();
        let padded = first.padded_tokens() + second.padded_tokens();
        assert!(
            first.pairs.iter().all(|p| p.pair.len() < 20),
            "oldest is short: its batch holds the shorts"
        );
        assert!(second.pairs.iter().all(|p| p.pair.len() > 150));
        assert!(
            (padded as f64) / (total_real as f64) < 1.1,
            "padding ratio {padded}/{total_real}"
        );
    }

    #[test]
    fn oldest_pair_is_always_in_the_next_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(4, 100_000, 1000));
        b.push(pair(99, 500, t0)); // the oldest is an outlier in length
        for i in 0..12 {
            b.push(pair(i, 10, t0 + Duration::from_millis(1)));
        }
        let batch = b.poll(t0).expect("full");
        assert!(batch.pairs.iter().any(|p| p.key.event == 99));
    }

    #[test]
    fn a_pair_over_the_token_budget_still_runs_alone() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(4, 50, 0));
        b.push(pair(0, 80, t0));
        b.push(pair(1, 80, t0));
        let batch = b.poll(t0).expect("must not stall");
        assert_eq!(batch.pairs.len(), 1);
    }

    #[test]
    fn retain_drops_revoked_work() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(4, 1000, 10));
        for i in 0..4 {
            b.push(pair(i, 5, t0));
        }
        b.retain(|k| k.event % 2 == 0);
        assert_eq!(b.len(), 2);
    }
}
