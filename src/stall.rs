//! Stall detection: a partition that is not paused on purpose, whose position is not at its high
//! watermark, and whose position has not moved for `kafka.stall_warn_ms`. A broker that reports a
//! wrong high watermark, or a fetch stuck in the client, would otherwise look like a quiet topic:
//! no error, no log line, `/readyz` green. Pure: the caller feeds positions and time.
//!
//! Behind the watermark is the usual case (records the worker does not get). A position *past*
//! the high watermark cannot happen on a correct broker (a consumer reads only below it), and is
//! what tansu 0.6's memory engine shows: it reports one past the base offset of the last record
//! batch, so a consumer restarted inside that batch sits past the watermark and gets nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::offsets::TopicPartition;

/// One partition as the client sees it (librdkafka statistics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionPosition {
    pub tp: TopicPartition,
    /// The next offset the worker will read; `None` until the client knows it.
    pub position: Option<i64>,
    pub low_watermark: i64,
    pub high_watermark: i64,
    /// Paused on purpose (backpressure, a replay range at its end): not expected to move.
    pub paused: bool,
}

/// A partition that stopped moving while behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stall {
    pub tp: TopicPartition,
    pub position: i64,
    pub low_watermark: i64,
    pub high_watermark: i64,
    pub since: Instant,
}

impl std::fmt::Display for Stall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}[{}] at offset {} (watermarks {}..{}) for {:.0?}",
            self.tp.topic,
            self.tp.partition,
            self.position,
            self.low_watermark,
            self.high_watermark,
            self.since.elapsed()
        )
    }
}

/// What changed with one observation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub stalled: Vec<Stall>,
    pub recovered: Vec<TopicPartition>,
}

struct Watch {
    position: i64,
    /// When the position was last seen to move (or the partition last caught up or paused).
    moved: Instant,
    stalled: bool,
}

pub struct StallDetector {
    threshold: Duration,
    parts: HashMap<TopicPartition, Watch>,
}

impl StallDetector {
    pub fn new(threshold: Duration) -> Self {
        Self {
            threshold,
            parts: HashMap::new(),
        }
    }

    /// Takes the current view of every assigned partition; partitions missing from it are no
    /// longer watched.
    pub fn observe(&mut self, now: Instant, view: &[PartitionPosition]) -> Changes {
        let mut changes = Changes::default();
        let mut seen = HashMap::with_capacity(view.len());
        for p in view {
            let Some(position) = p.position else {
                continue;
            };
            // An unknown watermark (-1, no fetch answered yet) says nothing either way.
            let behind = p.high_watermark >= 0 && p.high_watermark != position;
            let w = self.parts.remove(&p.tp).unwrap_or(Watch {
                position,
                moved: now,
                stalled: false,
            });
            let mut w = if position != w.position || !behind || p.paused {
                if w.stalled {
                    changes.recovered.push(p.tp.clone());
                }
                Watch {
                    position,
                    moved: now,
                    stalled: false,
                }
            } else {
                w
            };
            if !w.stalled && now.duration_since(w.moved) >= self.threshold {
                w.stalled = true;
                changes.stalled.push(Stall {
                    tp: p.tp.clone(),
                    position,
                    low_watermark: p.low_watermark,
                    high_watermark: p.high_watermark,
                    since: w.moved,
                });
            }
            seen.insert(p.tp.clone(), w);
        }
        self.parts = seen;
        changes
    }

    /// Partitions stalled now, by partition.
    pub fn stalled(&self) -> Vec<TopicPartition> {
        let mut v: Vec<TopicPartition> = self
            .parts
            .iter()
            .filter(|(_, w)| w.stalled)
            .map(|(tp, _)| tp.clone())
            .collect();
        v.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        v
    }
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

    fn pos(p: i32, position: i64, high: i64, paused: bool) -> PartitionPosition {
        PartitionPosition {
            tp: tp(p),
            position: Some(position),
            low_watermark: 0,
            high_watermark: high,
            paused,
        }
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn behind_and_not_moving_for_the_threshold_is_a_stall_once() {
        let mut d = StallDetector::new(T);
        let t0 = Instant::now();
        assert_eq!(d.observe(t0, &[pos(0, 29, 43, false)]), Changes::default());
        let c = d.observe(t0 + T - Duration::from_millis(1), &[pos(0, 29, 43, false)]);
        assert!(c.stalled.is_empty(), "not yet");
        let c = d.observe(t0 + T, &[pos(0, 29, 43, false)]);
        assert_eq!(c.stalled.len(), 1);
        assert_eq!(
            (c.stalled[0].position, c.stalled[0].high_watermark),
            (29, 43)
        );
        assert_eq!(c.stalled[0].since, t0);
        assert_eq!(d.stalled(), vec![tp(0)]);
        // Reported once, not on every observation.
        assert!(d
            .observe(t0 + 2 * T, &[pos(0, 29, 43, false)])
            .stalled
            .is_empty());
        assert_eq!(d.stalled(), vec![tp(0)]);
    }

    #[test]
    fn a_position_past_the_high_watermark_that_does_not_move_is_a_stall() {
        let mut d = StallDetector::new(T);
        let t0 = Instant::now();
        d.observe(t0, &[pos(0, 40, 1, false)]);
        let c = d.observe(t0 + T, &[pos(0, 40, 1, false)]);
        assert_eq!(c.stalled.len(), 1);
        // An unknown watermark is not evidence.
        let mut d = StallDetector::new(T);
        d.observe(t0, &[pos(0, 40, -1, false)]);
        assert!(d
            .observe(t0 + T, &[pos(0, 40, -1, false)])
            .stalled
            .is_empty());
    }

    #[test]
    fn moving_caught_up_or_paused_partitions_never_stall() {
        let mut d = StallDetector::new(T);
        let t0 = Instant::now();
        for i in 0..10u32 {
            let now = t0 + T * i;
            let c = d.observe(
                now,
                &[
                    pos(0, i as i64, 100, false), // moving
                    pos(1, 43, 43, false),        // caught up
                    pos(2, 10, 43, true),         // paused on purpose
                ],
            );
            assert_eq!(c, Changes::default(), "step {i}");
        }
        assert!(d.stalled().is_empty());
    }

    #[test]
    fn the_clock_restarts_after_a_pause_and_a_stall_recovers_when_it_moves() {
        let mut d = StallDetector::new(T);
        let t0 = Instant::now();
        d.observe(t0, &[pos(0, 5, 43, false)]);
        // Last seen paused at t0 + T: only the time after that counts.
        d.observe(t0 + T, &[pos(0, 5, 43, true)]);
        assert!(d
            .observe(t0 + T + T / 2, &[pos(0, 5, 43, false)])
            .stalled
            .is_empty());
        assert_eq!(
            d.observe(t0 + 2 * T, &[pos(0, 5, 43, false)]).stalled.len(),
            1
        );
        let c = d.observe(t0 + 3 * T, &[pos(0, 6, 43, false)]);
        assert_eq!(c.recovered, vec![tp(0)]);
        assert!(d.stalled().is_empty());
    }

    #[test]
    fn revoked_and_unknown_positions_are_forgotten() {
        let mut d = StallDetector::new(T);
        let t0 = Instant::now();
        d.observe(t0, &[pos(0, 5, 43, false)]);
        d.observe(t0 + T, &[pos(0, 5, 43, false)]);
        assert_eq!(d.stalled(), vec![tp(0)]);
        // Revoked: no longer in the view.
        d.observe(t0 + 2 * T, &[]);
        assert!(d.stalled().is_empty());
        let unknown = PartitionPosition {
            position: None,
            ..pos(1, 0, 43, false)
        };
        for i in 0..5 {
            assert_eq!(
                d.observe(t0 + T * i, std::slice::from_ref(&unknown)),
                Changes::default()
            );
        }
    }
}
