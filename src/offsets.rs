//! Per-partition contiguous commit points.
//!
//! Events finish out of order (batches mix partitions, produce acks race), but an offset may only be
//! committed once every earlier event of its partition is produced and acknowledged. Each partition
//! keeps the set of offsets still in flight; its commit point is the lowest of them, or one past the
//! highest seen when none is left.
//!
//! Each assignment of a partition gets a new generation: completions from before a revoke carry the
//! old generation and are ignored, so nothing is stored for a partition this worker no longer owns.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

/// The tracker shared by the consume loop, the rebalance callback, the produce tasks and the
/// transaction thread.
#[derive(Clone, Default)]
pub struct SharedTracker(Arc<Mutex<OffsetTracker>>);

impl SharedTracker {
    pub fn lock(&self) -> MutexGuard<'_, OffsetTracker> {
        // A panic elsewhere must not take offset tracking down with it; the state stays consistent
        // because every mutation is a single call.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Proof that an offset was registered; handed back on completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub tp: TopicPartition,
    pub offset: i64,
    pub generation: u64,
}

#[derive(Debug)]
struct PartitionState {
    generation: u64,
    in_flight: BTreeSet<i64>,
    /// One past the highest registered offset.
    next: Option<i64>,
    /// Last commit point reported, so unchanged points are not stored again.
    reported: Option<i64>,
    /// First offset registered in this generation: where an aborted transaction's work restarts
    /// when nothing was committed yet.
    first: Option<i64>,
    /// Last point committed (exactly_once: in a committed transaction).
    committed: Option<i64>,
    /// Set by a rewind until the consumer has seeked back: messages fetched before the seek are
    /// refused, or they would be admitted twice.
    rewinding: bool,
}

impl PartitionState {
    fn new(generation: u64) -> Self {
        Self {
            generation,
            in_flight: BTreeSet::new(),
            next: None,
            reported: None,
            first: None,
            committed: None,
            rewinding: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<TopicPartition, PartitionState>,
    next_generation: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts tracking a newly assigned partition (a fresh generation even if it was owned before).
    pub fn assign(&mut self, tp: TopicPartition) {
        self.next_generation += 1;
        self.parts
            .insert(tp, PartitionState::new(self.next_generation));
    }

    /// Abandons all work in flight on every owned partition (an aborted transaction): returns
    /// where each partition must be re-read from. Completions of the old generation are ignored
    /// from now on, and nothing is registered until [`Self::rewound`] says the consumer seeked.
    pub fn rewind_all(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut points = Vec::new();
        for (tp, s) in self.parts.iter_mut() {
            self.next_generation += 1;
            let point = s.committed.or(s.first);
            let mut fresh = PartitionState::new(self.next_generation);
            fresh.committed = point;
            fresh.rewinding = point.is_some();
            *s = fresh;
            if let Some(p) = point {
                points.push((tp.clone(), p));
            }
        }
        points
    }

    /// The consumer now fetches `tp` from its rewind point again.
    pub fn rewound(&mut self, tp: &TopicPartition) {
        if let Some(s) = self.parts.get_mut(tp) {
            s.rewinding = false;
        }
    }

    /// Records a commit point that the broker accepted.
    pub fn committed(&mut self, tp: &TopicPartition, point: i64) {
        if let Some(s) = self.parts.get_mut(tp) {
            s.committed = Some(point);
        }
    }

    /// Whether the ticket belongs to the current ownership of its partition.
    pub fn is_current(&self, t: &Ticket) -> bool {
        self.parts
            .get(&t.tp)
            .is_some_and(|s| s.generation == t.generation)
    }

    /// Stops tracking; returns the commit point reached, for a final commit before the partition goes.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        self.parts.remove(tp).and_then(|s| commit_point(&s))
    }

    /// Registers a consumed offset; `None` if the partition is not assigned (a message that raced a
    /// revoke), which the caller drops: the next owner consumes it again.
    pub fn register(&mut self, tp: &TopicPartition, offset: i64) -> Option<Ticket> {
        let s = self.parts.get_mut(tp)?;
        if s.rewinding {
            return None;
        }
        s.first.get_or_insert(offset);
        s.in_flight.insert(offset);
        // The consumer's position is already here: reaching it again is not progress to store.
        s.reported.get_or_insert(offset);
        s.next = Some(s.next.map_or(offset + 1, |n| n.max(offset + 1)));
        Some(Ticket {
            tp: tp.clone(),
            offset,
            generation: s.generation,
        })
    }

    /// Marks an offset done. Returns the new commit point when it moved (and the ticket is current).
    pub fn complete(&mut self, t: &Ticket) -> Option<i64> {
        let s = self.parts.get_mut(&t.tp)?;
        if s.generation != t.generation {
            return None;
        }
        s.in_flight.remove(&t.offset);
        let point = commit_point(s)?;
        if s.reported == Some(point) {
            return None;
        }
        s.reported = Some(point);
        Some(point)
    }

    /// Offsets admitted but not yet completed, over all partitions.
    pub fn in_flight(&self) -> usize {
        self.parts.values().map(|s| s.in_flight.len()).sum()
    }

    /// Current commit points of every owned partition that has seen traffic.
    pub fn commit_points(&self) -> Vec<(TopicPartition, i64)> {
        self.parts
            .iter()
            .filter_map(|(tp, s)| commit_point(s).map(|p| (tp.clone(), p)))
            .collect()
    }
}

fn commit_point(s: &PartitionState) -> Option<i64> {
    s.in_flight.first().copied().or(s.next)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition {
            topic: "in".into(),
            partition: p,
        }
    }

    #[test]
    fn commit_point_waits_for_earlier_offsets() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        let a = t.register(&tp(0), 10).unwrap();
        let b = t.register(&tp(0), 11).unwrap();
        let c = t.register(&tp(0), 12).unwrap();
        assert_eq!(
            t.complete(&c),
            None,
            "10 and 11 still in flight: the point stays at 10"
        );
        assert_eq!(t.complete(&a), Some(11));
        assert_eq!(t.complete(&b), Some(13), "all done: one past the highest");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        t.assign(tp(1));
        let a = t.register(&tp(0), 5).unwrap();
        let b = t.register(&tp(1), 7).unwrap();
        assert_eq!(t.complete(&b), Some(8));
        assert_eq!(t.commit_points().len(), 2);
        assert_eq!(t.complete(&a), Some(6));
    }

    #[test]
    fn completions_from_before_a_revoke_are_ignored() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        let old = t.register(&tp(0), 3).unwrap();
        assert_eq!(
            t.revoke(&tp(0)),
            Some(3),
            "nothing done: point stays at the first in-flight offset"
        );
        assert!(t.register(&tp(0), 4).is_none(), "not owned: not admitted");
        t.assign(tp(0));
        let new = t.register(&tp(0), 3).unwrap();
        assert_eq!(
            t.complete(&old),
            None,
            "stale generation must not move the new owner's point"
        );
        assert_eq!(t.complete(&new), Some(4));
    }

    #[test]
    fn rewind_restarts_from_the_last_commit_and_fences_old_work() {
        let mut t = OffsetTracker::new();
        t.assign(tp(0));
        t.assign(tp(1));
        let a = t.register(&tp(0), 5).unwrap();
        assert_eq!(t.complete(&a), Some(6));
        t.committed(&tp(0), 6);
        let b = t.register(&tp(0), 6).unwrap();
        let c = t.register(&tp(1), 40).unwrap();
        let mut points = t.rewind_all();
        points.sort();
        assert_eq!(
            points,
            vec![(tp(0), 6), (tp(1), 40)],
            "committed point, else the first offset seen"
        );
        assert!(!t.is_current(&b) && !t.is_current(&c));
        assert_eq!(t.complete(&b), None, "aborted work completes into nothing");
        assert!(
            t.register(&tp(0), 7).is_none(),
            "fetched before the seek: refused"
        );
        t.rewound(&tp(0));
        let again = t.register(&tp(0), 6).unwrap();
        assert_eq!(t.complete(&again), Some(7));
        let mut again = t.rewind_all();
        again.sort();
        assert_eq!(
            again,
            vec![(tp(0), 6), (tp(1), 40)],
            "a second abort before any commit rewinds to the same points"
        );
    }
}
