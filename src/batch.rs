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
//! Every batch holds the most urgent waiting pair: the one whose time runs out first, where a
//! pair's time is the earlier of its wait limit (`enqueued + max_wait`) and its event's deadline.
//! Without deadlines that is the oldest pair, so no pair starves however the lengths fall; with
//! them, a pair whose deadline is near goes first, and the pairs around it are still chosen by
//! length. A deadline can only move a pair ahead of those whose wait limit is later, so an old
//! pair is passed over by at most the pairs whose deadline falls before its wait limit.

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
    /// The event's deadline, if it has one.
    pub deadline: Option<Instant>,
    pub lane: Lane,
}

/// Scheduling lane of an event's pairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    #[default]
    Interactive,
    Bulk,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchPolicy {
    pub max_pairs: usize,
    pub max_tokens: usize,
    pub max_wait: Duration,
    /// While bulk pairs wait, how many batches in a row may hold none of them.
    pub bulk_max_skips: u32,
    /// How many pairs a batch built around interactive pairs may hold, bulk fill included: a
    /// smaller batch runs sooner, and the interactive pairs wait for it.
    pub interactive_fill: usize,
}

impl BatchPolicy {
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let max_pairs = cfg.batch.max_batch_pairs;
        Self {
            max_pairs,
            max_tokens: cfg.batch.max_batch_tokens,
            max_wait: Duration::from_millis(cfg.batch.max_wait_ms),
            bulk_max_skips: cfg.priority.bulk_max_skipped_batches,
            interactive_fill: ((max_pairs as f64 * cfg.priority.interactive_batch_fill).ceil()
                as usize)
                .clamp(1, max_pairs),
        }
    }

    /// The pairs a batch built around interactive pairs may hold.
    fn interactive_batch(&self) -> usize {
        self.interactive_fill.min(self.max_pairs)
    }
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

enum Selection {
    All,
    /// Pool index of the bulk pair that must lead (the bulk lane is starved).
    Overdue(usize),
    /// Pool indices of the interactive pairs.
    InteractiveFirst(Vec<usize>),
}

pub struct Batcher {
    policy: BatchPolicy,
    /// In arrival order, so `pool[0]` is always the oldest.
    pool: Vec<PendingPair>,
    /// Bulk pairs in the pool.
    bulk_waiting: usize,
    /// Batches in a row that held no bulk pair while bulk pairs waited.
    bulk_skipped: u32,
}

impl Batcher {
    pub fn new(policy: BatchPolicy) -> Self {
        assert!(policy.max_pairs > 0, "max_pairs must be positive");
        Self {
            policy,
            pool: Vec::new(),
            bulk_waiting: 0,
            bulk_skipped: 0,
        }
    }

    pub fn push(&mut self, p: PendingPair) {
        if p.lane == Lane::Bulk {
            self.bulk_waiting += 1;
        }
        self.pool.push(p);
    }

    pub fn len(&self) -> usize {
        self.pool.len()
    }

    pub fn max_tokens(&self) -> usize {
        self.policy.max_tokens
    }

    /// Changes the token budget of the batches closed from now on.
    pub fn set_max_tokens(&mut self, max_tokens: usize) {
        self.policy.max_tokens = max_tokens;
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
        self.bulk_waiting = self.pool.iter().filter(|p| p.lane == Lane::Bulk).count();
    }

    /// A batch if a close condition holds at `now`.
    pub fn poll(&mut self, now: Instant) -> Option<Batch> {
        let oldest = self.pool.first()?;
        let timed_out = now >= oldest.enqueued + self.policy.max_wait;
        // Polled on every event admitted: when the whole pool fits both budgets and has not
        // waited long enough, no close condition can hold, and sorting it would be wasted. It is
        // also what keeps a two-lane pool from closing early: a batch built around the
        // interactive pairs leaves longer bulk pairs out, and `count < pool.len()` below would
        // read that as the token budget closing the batch.
        let n = self.pool.len();
        if !timed_out && n < self.policy.max_pairs {
            let longest = self.pool.iter().map(|p| p.pair.len()).max().unwrap_or(0);
            if n * longest <= self.policy.max_tokens {
                return None;
            }
        }
        let selection = self.select();
        // A batch built around interactive pairs is full at `interactive_fill`.
        let full = match selection {
            Selection::InteractiveFirst(_) => self.policy.interactive_batch(),
            _ => self.policy.max_pairs,
        };
        let chosen = self.choose(selection);
        let count = chosen.len();
        let reason = if count >= full {
            CloseReason::Full
        } else if count < self.pool.len() {
            // Fewer than max_pairs taken although more wait: the token budget stopped the batch.
            CloseReason::Tokens
        } else if timed_out {
            CloseReason::Timeout
        } else {
            return None;
        };
        Some(self.take(chosen, reason))
    }

    /// A batch regardless of timers (shutdown drain); `None` when empty.
    pub fn flush(&mut self) -> Option<Batch> {
        if self.pool.is_empty() {
            return None;
        }
        let chosen = self.choose(Selection::All);
        Some(self.take(chosen, CloseReason::Drain))
    }

    /// Which pairs the next batch is built from. When `bulk_max_skips` batches in a row held no
    /// bulk pair while bulk pairs waited, the oldest bulk pair leads the next batch, among all
    /// pairs: the starvation bound. Otherwise, when both lanes wait, the batch is built around the
    /// interactive pairs (and filled up with bulk ones); with one lane, around the most urgent pair.
    fn select(&self) -> Selection {
        let interactive: Vec<usize> = (0..self.pool.len())
            .filter(|&i| self.pool[i].lane == Lane::Interactive)
            .collect();
        if self.bulk_waiting == 0 || interactive.is_empty() {
            return Selection::All;
        }
        if self.bulk_skipped >= self.policy.bulk_max_skips {
            if let Some(i) = self.pool.iter().position(|p| p.lane == Lane::Bulk) {
                return Selection::Overdue(i);
            }
        }
        Selection::InteractiveFirst(interactive)
    }

    /// When a pair's time runs out: its wait limit or its deadline.
    fn due(&self, p: &PendingPair) -> Instant {
        let limit = p.enqueued + self.policy.max_wait;
        p.deadline.map_or(limit, |d| d.min(limit))
    }

    /// Picks the pool indices of the next batch: among the selected pairs, the length-sorted
    /// window through the leading (else the most urgent) pair that takes the most pairs within both
    /// budgets, wasting the fewest padded tokens among those; then, if room is left, the other
    /// pairs closest in length that still fit.
    fn choose(&self, selection: Selection) -> Vec<usize> {
        let (mut order, lead, lane_first) = match selection {
            Selection::All => ((0..self.pool.len()).collect(), None, false),
            Selection::Overdue(i) => ((0..self.pool.len()).collect(), Some(i), false),
            Selection::InteractiveFirst(v) => (v, None, true),
        };
        // Stable sort keeps arrival order among equal lengths.
        order.sort_by_key(|&i| self.pool[i].pair.len());
        let lens: Vec<usize> = order.iter().map(|&i| self.pool[i].pair.len()).collect();
        let mut prefix = Vec::with_capacity(lens.len() + 1);
        prefix.push(0usize);
        for l in &lens {
            prefix.push(prefix.last().copied().unwrap_or(0) + l);
        }
        let mut k = 0;
        for (pos, &i) in order.iter().enumerate() {
            if lead == Some(i) {
                k = pos;
                break;
            }
            if lead.is_none() && self.due(&self.pool[i]) < self.due(&self.pool[order[k]]) {
                k = pos;
            }
        }
        let n = lens.len();
        let (max_pairs, max_tokens) = (self.policy.max_pairs, self.policy.max_tokens);

        let (mut best_start, mut best_end) = (k, k + 1);
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
                continue; // even the shortest window through the urgent pair is over budget
            }
            let waste = count * lens[end - 1] - (prefix[end] - prefix[start]);
            let best_count = best_end - best_start;
            if count > best_count || (count == best_count && waste < best_waste) {
                (best_start, best_end) = (start, end);
                best_waste = waste;
            }
        }
        let mut chosen = order[best_start..best_end].to_vec();
        let fill = self.policy.interactive_batch();
        if lane_first && chosen.len() < fill {
            // Room left: fill it with bulk pairs, closest in length first, no longer than the
            // interactive pairs (a longer one would make every row of the batch slower), up to
            // `interactive_fill` pairs (a fuller batch would keep the interactive ones longer).
            let seq = lens[best_end - 1];
            let mut first = vec![false; self.pool.len()];
            for &i in &order {
                first[i] = true;
            }
            let mut rest: Vec<usize> = (0..self.pool.len()).filter(|&i| !first[i]).collect();
            rest.sort_by_key(|&i| self.pool[i].pair.len().abs_diff(seq));
            for i in rest {
                if chosen.len() >= fill {
                    break;
                }
                if self.pool[i].pair.len() <= seq && (chosen.len() + 1) * seq <= max_tokens {
                    chosen.push(i);
                }
            }
        }
        chosen
    }

    fn take(&mut self, indices: Vec<usize>, reason: CloseReason) -> Batch {
        let mut chosen = vec![false; self.pool.len()];
        for &i in &indices {
            chosen[i] = true;
        }
        let mut taken = Vec::with_capacity(indices.len());
        let mut rest = Vec::with_capacity(self.pool.len() - indices.len());
        for (i, p) in std::mem::take(&mut self.pool).into_iter().enumerate() {
            if chosen[i] {
                taken.push(p);
            } else {
                rest.push(p);
            }
        }
        self.pool = rest;
        let bulk_taken = taken.iter().filter(|p| p.lane == Lane::Bulk).count();
        if bulk_taken > 0 {
            self.bulk_skipped = 0;
        } else if self.bulk_waiting > 0 {
            self.bulk_skipped += 1;
        }
        self.bulk_waiting -= bulk_taken;
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
            deadline: None,
            lane: Lane::Interactive,
        }
    }

    fn policy(max_pairs: usize, max_tokens: usize, wait_ms: u64) -> BatchPolicy {
        BatchPolicy {
            max_pairs,
            max_tokens,
            max_wait: Duration::from_millis(wait_ms),
            bulk_max_skips: 2,
            interactive_fill: max_pairs,
        }
    }

    fn bulk(event: u64, len: usize, at: Instant) -> PendingPair {
        PendingPair {
            lane: Lane::Bulk,
            ..pair(event, len, at)
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
    fn a_near_deadline_leads_the_next_batch_with_pairs_of_its_length() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let fill = |b: &mut Batcher| {
            for i in 0..8 {
                b.push(pair(i, 10, t0)); // the oldest pairs are short
            }
            for i in 8..16 {
                b.push(pair(i, 300, t0 + ms(1)));
            }
        };
        let mut b = Batcher::new(policy(4, 100_000, 1000));
        fill(&mut b);
        b.push(pair(99, 300, t0 + ms(2)));
        let batch = b.poll(t0).expect("full");
        assert!(
            batch.pairs.iter().all(|p| p.pair.len() == 10),
            "no deadline: the oldest lead"
        );

        let mut b = Batcher::new(policy(4, 100_000, 1000));
        fill(&mut b);
        let mut urgent = pair(99, 300, t0 + ms(2));
        urgent.deadline = Some(t0 + ms(50)); // before the shorts' wait limit (t0 + 1000 ms)
        b.push(urgent);
        let batch = b.poll(t0).expect("full");
        assert!(batch.pairs.iter().any(|p| p.key.event == 99));
        assert!(
            batch.pairs.iter().all(|p| p.pair.len() == 300),
            "grouped by length"
        );

        // A deadline later than the oldest pair's wait limit changes nothing.
        let mut b = Batcher::new(policy(4, 100_000, 1000));
        fill(&mut b);
        let mut relaxed = pair(99, 300, t0 + ms(2));
        relaxed.deadline = Some(t0 + ms(5000));
        b.push(relaxed);
        let batch = b.poll(t0).expect("full");
        assert!(batch.pairs.iter().all(|p| p.pair.len() == 10));
    }

    #[test]
    fn interactive_pairs_go_first_and_bulk_pairs_fill_the_rest() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(policy(8, 100_000, 10));
        for i in 0..40 {
            b.push(bulk(i, 20 + (i as usize % 5), t0)); // an older bulk backlog
        }
        for i in 100..103 {
            b.push(pair(i, 22, t0 + ms(5)));
        }
        let batch = b.poll(t0 + ms(20)).expect("full");
        assert_eq!(batch.reason, CloseReason::Full);
        let interactive = batch.pairs.iter().filter(|p| p.key.event >= 100).count();
        assert_eq!(
            interactive, 3,
            "every interactive pair is in the next batch"
        );
        // The bulk fill is the closest in length to the interactive pairs, and none is longer.
        assert!(batch.pairs.iter().all(|p| p.pair.len() == 22));
        assert_eq!(b.len(), 35);
    }

    #[test]
    fn a_batch_built_around_interactive_pairs_holds_at_most_interactive_fill() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut b = Batcher::new(BatchPolicy {
            interactive_fill: 4,
            ..policy(8, 100_000, 10)
        });
        for i in 0..40 {
            b.push(bulk(i, 22, t0));
        }
        for i in 100..103 {
            b.push(pair(i, 22, t0 + ms(5)));
        }
        let batch = b.poll(t0 + ms(20)).expect("timed out");
        let interactive = batch.pairs.iter().filter(|p| p.key.event >= 100).count();
        assert_eq!(
            (interactive, batch.pairs.len()),
            (3, 4),
            "3 interactive + 1 bulk"
        );
        assert_eq!(batch.reason, CloseReason::Full);
        // With no interactive pair left, bulk batches are full again.
        assert_eq!(b.poll(t0 + ms(20)).expect("full").pairs.len(), 8);
    }

    #[test]
    fn at_most_bulk_max_skips_batches_in_a_row_pass_the_bulk_lane_over() {
        let t0 = Instant::now();
        let mut b = Batcher::new(policy(4, 100_000, 10));
        b.push(bulk(0, 300, t0)); // long: never a length neighbour of the interactive pairs
        for i in 1..40 {
            b.push(pair(i, 10, t0 + Duration::from_millis(1)));
        }
        let led_by_bulk: Vec<bool> = (0..6)
            .map(|_| {
                let batch = b.poll(t0).expect("full");
                batch.pairs.iter().any(|p| p.key.event == 0)
            })
            .collect();
        // Two batches pass it over (bulk_max_skips = 2), the third takes it; then no bulk waits.
        assert_eq!(led_by_bulk, [false, false, true, false, false, false]);
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
