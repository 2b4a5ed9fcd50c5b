//! What `/readyz` decides on, and the consumer facts the gauges read at scrape time.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use rdkafka::Statistics;

use crate::offsets::TopicPartition;
use crate::stall::{PartitionPosition, Stall, StallDetector};

/// Consumer lag of one assigned partition, with its attributes built once per statistics report.
struct LagPoint {
    attrs: [KeyValue; 2],
    lag: i64,
}

/// What `/readyz` and the gauges read; written by the rebalance and statistics callbacks, the
/// ingress loop and the worker's start/stop.
pub struct Health {
    epoch: Instant,
    broker_timeout: Duration,
    model_warmed: AtomicBool,
    draining: AtomicBool,
    assigned: AtomicUsize,
    /// Partitions paused by backpressure now.
    paused: Mutex<HashSet<TopicPartition>>,
    /// Every partition paused since the stall detector's last look: positions are sampled every
    /// statistics interval, and a pause between two samples must restart the clock like one seen
    /// at a sample.
    paused_since_observed: Mutex<HashSet<TopicPartition>>,
    /// Milliseconds after `epoch`, plus one, when a broker was last seen connected; 0 = never.
    broker_seen: AtomicU64,
    lag: Mutex<Vec<LagPoint>>,
    stalls: Mutex<Stalls>,
}

struct Stalls {
    detector: StallDetector,
    /// Stalled now, for `/readyz`, the gauge and whoever must stop on a stall.
    current: Vec<Stall>,
    /// Paused on purpose one by one (a replay range at its end); never a stall.
    done: HashSet<TopicPartition>,
}

/// A poisoned lock still holds a usable set: a gauge must not panic.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Health {
    /// `stall_after`: how long a partition may sit behind without moving before it counts as
    /// stalled (`kafka.stall_warn_ms`).
    pub fn new(broker_timeout: Duration, stall_after: Duration) -> Self {
        Self {
            epoch: Instant::now(),
            broker_timeout,
            model_warmed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            assigned: AtomicUsize::new(0),
            paused: Mutex::new(HashSet::new()),
            paused_since_observed: Mutex::new(HashSet::new()),
            broker_seen: AtomicU64::new(0),
            lag: Mutex::new(Vec::new()),
            stalls: Mutex::new(Stalls {
                detector: StallDetector::new(stall_after),
                current: Vec::new(),
                done: Default::default(),
            }),
        }
    }

    /// A partition the worker paused for good (its replay range is done).
    pub fn set_partition_done(&self, tp: TopicPartition) {
        self.lock_stalls().done.insert(tp);
    }

    /// Partitions stalled now (see [`crate::stall`]).
    pub fn stalled(&self) -> Vec<Stall> {
        self.lock_stalls().current.clone()
    }

    fn lock_stalls(&self) -> std::sync::MutexGuard<'_, Stalls> {
        self.stalls.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs the stall detector over the owned partitions of a statistics report; logs each stall
    /// and recovery once.
    fn observe_positions(&self, s: &Statistics) {
        // A drain pauses every partition without telling `paused`.
        let draining = self.draining.load(Ordering::Relaxed);
        let mut paused = std::mem::take(&mut *lock(&self.paused_since_observed));
        paused.extend(lock(&self.paused).iter().cloned());
        let mut st = self.lock_stalls();
        let mut view = Vec::new();
        for (topic, t) in &s.topics {
            for p in t
                .partitions
                .values()
                .filter(|p| p.partition >= 0 && p.desired)
            {
                let tp = TopicPartition {
                    topic: topic.clone(),
                    partition: p.partition,
                };
                // Where the application reads next; before its first record, where the fetcher
                // starts (librdkafka reports -1001 for "not known yet").
                let position = [p.app_offset, p.next_offset, p.committed_offset]
                    .into_iter()
                    .find(|o| *o >= 0);
                view.push(PartitionPosition {
                    paused: draining || paused.contains(&tp) || st.done.contains(&tp),
                    tp,
                    position,
                    low_watermark: p.lo_offset,
                    high_watermark: p.hi_offset,
                });
            }
        }
        let changes = st.detector.observe(Instant::now(), &view);
        for s in &changes.stalled {
            tracing::warn!(
                topic = %s.tp.topic,
                partition = s.tp.partition,
                position = s.position,
                low_watermark = s.low_watermark,
                high_watermark = s.high_watermark,
                stalled_ms = s.since.elapsed().as_millis() as u64,
                "partition stalled: position not moving and not at the high watermark"
            );
        }
        for tp in &changes.recovered {
            tracing::info!(topic = %tp.topic, partition = tp.partition, "partition moving again");
        }
        let stalled = st.detector.stalled();
        let mut current: Vec<Stall> = std::mem::take(&mut st.current)
            .into_iter()
            .filter(|s| stalled.contains(&s.tp))
            .collect();
        current.extend(changes.stalled);
        st.current = current;
    }

    pub fn set_model_warmed(&self) {
        self.model_warmed.store(true, Ordering::Relaxed);
    }

    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn set_assigned(&self, partitions: usize) {
        self.assigned.store(partitions, Ordering::Relaxed);
    }

    pub fn assigned(&self) -> usize {
        self.assigned.load(Ordering::Relaxed)
    }

    /// The partitions backpressure holds paused now (all, some or none of the assignment).
    pub fn set_paused(&self, paused: HashSet<TopicPartition>) {
        lock(&self.paused_since_observed).extend(paused.iter().cloned());
        *lock(&self.paused) = paused;
    }

    /// Partitions currently paused by backpressure.
    pub fn paused_partitions(&self) -> usize {
        lock(&self.paused).len()
    }

    /// A broker answered (group assignment) or a statistics report showed a connection up.
    pub fn broker_seen(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.broker_seen.store(ms, Ordering::Relaxed);
    }

    /// Takes the consumer's librdkafka statistics: broker connection state and per-partition lag
    /// of the partitions this consumer owns (`desired`).
    pub fn on_statistics(&self, s: &Statistics) {
        if s.brokers.values().any(|b| b.state == "UP") {
            self.broker_seen();
        }
        let mut points = Vec::new();
        for (topic, t) in &s.topics {
            for p in t.partitions.values() {
                // -1 is librdkafka's internal "unassigned" partition.
                if p.partition < 0 || !p.desired {
                    continue;
                }
                // Lag against the committed offset; before the first commit only the stored one
                // is known; unknown (-1) is left out rather than reported as zero.
                let lag = if p.consumer_lag >= 0 {
                    p.consumer_lag
                } else {
                    p.consumer_lag_stored
                };
                if lag < 0 {
                    continue;
                }
                points.push(LagPoint {
                    attrs: [
                        KeyValue::new("messaging.destination.name", topic.clone()),
                        KeyValue::new(
                            "messaging.destination.partition.id",
                            p.partition.to_string(),
                        ),
                    ],
                    lag,
                });
            }
        }
        *self.lag.lock().unwrap_or_else(|p| p.into_inner()) = points;
        self.observe_positions(s);
    }

    /// `Ok` when the worker can do its job; otherwise why not, for `/readyz`.
    pub fn readiness(&self) -> Result<(), NotReady> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(NotReady::ShuttingDown);
        }
        if !self.model_warmed.load(Ordering::Relaxed) {
            return Err(NotReady::ModelCold);
        }
        if self.assigned() == 0 {
            return Err(NotReady::NoPartitions);
        }
        let stalled = self.stalled();
        if !stalled.is_empty() {
            return Err(NotReady::Stalled(stalled));
        }
        match self.broker_seen.load(Ordering::Relaxed) {
            0 => Err(NotReady::BrokerNeverSeen),
            seen => {
                let age = Duration::from_millis(
                    (self.epoch.elapsed().as_millis() as u64 + 1).saturating_sub(seen),
                );
                if age > self.broker_timeout {
                    Err(NotReady::BrokerLost(age))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Consumer lag per owned partition, as of the last statistics report.
    pub fn each_lag(&self, mut f: impl FnMut(i64, &[KeyValue])) {
        let points = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        for p in points.iter() {
            f(p.lag, &p.attrs);
        }
    }
}

/// Why the worker is not ready; `Display` is the `/readyz` body.
#[derive(Debug, Clone, PartialEq)]
pub enum NotReady {
    ShuttingDown,
    ModelCold,
    NoPartitions,
    /// Partitions behind their high watermark whose position stopped moving.
    Stalled(Vec<Stall>),
    BrokerNeverSeen,
    /// No connected broker for this long.
    BrokerLost(Duration),
}

impl std::fmt::Display for NotReady {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ShuttingDown => f.write_str("shutting down"),
            Self::ModelCold => f.write_str("model not warmed up"),
            Self::NoPartitions => f.write_str("no partitions assigned"),
            Self::Stalled(stalled) => {
                let list: Vec<String> = stalled.iter().map(Stall::to_string).collect();
                write!(f, "partitions stalled: {}", list.join(", "))
            }
            Self::BrokerNeverSeen => {
                f.write_str("broker not reachable: no connected broker seen yet")
            }
            Self::BrokerLost(age) => write!(
                f,
                "broker not reachable: no connected broker for {:.1}s",
                age.as_secs_f64()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_names_what_is_missing() {
        let h = Health::new(Duration::from_millis(200), Duration::from_secs(60));
        assert_eq!(h.readiness().unwrap_err(), NotReady::ModelCold);
        h.set_model_warmed();
        assert_eq!(h.readiness().unwrap_err(), NotReady::NoPartitions);
        h.set_assigned(2);
        assert_eq!(h.readiness().unwrap_err(), NotReady::BrokerNeverSeen);
        h.broker_seen();
        assert_eq!(h.readiness(), Ok(()));
        std::thread::sleep(Duration::from_millis(300));
        let lost = h.readiness().unwrap_err();
        assert!(matches!(lost, NotReady::BrokerLost(_)), "{lost:?}");
        assert!(lost.to_string().starts_with("broker not reachable"));
        h.broker_seen();
        assert_eq!(h.readiness(), Ok(()));
        assert_eq!(h.paused_partitions(), 0);
        let tp = |partition| TopicPartition {
            topic: "in".into(),
            partition,
        };
        h.set_paused(HashSet::from([tp(0), tp(1)]));
        assert_eq!(h.paused_partitions(), 2);
        h.set_paused(HashSet::from([tp(1)]));
        assert_eq!(
            h.paused_partitions(),
            1,
            "a partial pause counts its partitions"
        );
        h.set_draining();
        assert_eq!(h.readiness().unwrap_err(), NotReady::ShuttingDown);
    }
}
