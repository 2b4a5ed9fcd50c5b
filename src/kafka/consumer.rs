//! The Kafka consumer: one per process (per-partition queues have open bugs upstream), offsets
//! stored only after output is acknowledged, and a rebalance callback that commits what is done
//! before partitions move.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaResult;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::kafka::txn::TxnHandle;
use crate::obs::health::Health;
use crate::offsets::{SharedTracker, TopicPartition};

/// Told to the coordinator so it can drop queued work of partitions that moved away.
#[derive(Debug)]
pub enum RebalanceNote {
    Revoked(Vec<TopicPartition>),
}

/// The worker's consumer.
pub type KafkaConsumer = rdkafka::consumer::StreamConsumer<RebalanceContext>;

pub struct RebalanceContext {
    pub tracker: SharedTracker,
    pub notes: mpsc::UnboundedSender<RebalanceNote>,
    /// Bumped on every assignment, so a paused ingress re-pauses partitions it was just given.
    pub assignments: Arc<AtomicU64>,
    /// Assigned partitions, broker reachability and consumer lag for `/readyz` and `/metrics`.
    pub health: Arc<Health>,
    /// exactly_once: the transaction thread, asked to commit before partitions move.
    pub txn: Option<TxnHandle>,
}

impl ClientContext for RebalanceContext {
    /// librdkafka statistics (every `kafka.statistics_interval_ms`): consumer lag per owned
    /// partition and whether any broker connection is up.
    fn stats(&self, statistics: rdkafka::Statistics) {
        self.health.on_statistics(&statistics);
    }
}

fn tps(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition {
            topic: e.topic().to_string(),
            partition: e.partition(),
        })
        .collect()
}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) if self.txn.is_some() => {
                let revoked = tps(tpl);
                {
                    // Completions of revoked partitions now count for nothing, so the commit
                    // below holds exactly what was released for them.
                    let mut t = self.tracker.lock();
                    for tp in &revoked {
                        t.revoke(tp);
                    }
                }
                // Fencing: the open transaction must end before the partitions go, or the next
                // owner would redo work whose outputs are still pending here. Blocks the consumer's
                // callback (as the synchronous commit of at_least_once does) until it ends.
                let committed = self
                    .txn
                    .as_ref()
                    .is_some_and(|t| t.commit_now(Duration::from_secs(90)));
                tracing::info!(partitions = ?revoked.iter().map(|t| t.partition).collect::<Vec<_>>(), committed, "partitions revoked; transaction ended");
                let _ = self.notes.send(RebalanceNote::Revoked(revoked));
            }
            Rebalance::Revoke(tpl) => {
                let revoked = tps(tpl);
                let mut commit = TopicPartitionList::new();
                {
                    let mut t = self.tracker.lock();
                    for tp in &revoked {
                        if let Some(point) = t.revoke(tp) {
                            let _ = commit.add_partition_offset(
                                &tp.topic,
                                tp.partition,
                                Offset::Offset(point),
                            );
                        }
                    }
                }
                // Commit the contiguous done point now: after the revoke this worker may not.
                if commit.count() > 0 {
                    match consumer.commit(&commit, CommitMode::Sync) {
                        Ok(()) => {
                            tracing::info!(partitions = ?revoked.iter().map(|t| t.partition).collect::<Vec<_>>(), "partitions revoked; committed done offsets")
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "commit on revoke failed; the next owner re-processes from the last commit")
                        }
                    }
                } else {
                    tracing::info!(partitions = ?revoked.iter().map(|t| t.partition).collect::<Vec<_>>(), "partitions revoked");
                }
                let _ = self.notes.send(RebalanceNote::Revoked(revoked));
            }
            Rebalance::Assign(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let assigned = tps(tpl);
            {
                let mut t = self.tracker.lock();
                for tp in &assigned {
                    t.assign(tp.clone());
                }
            }
            self.assignments.fetch_add(1, Ordering::SeqCst);
            // The group coordinator just answered.
            self.health.broker_seen();
            tracing::info!(partitions = ?assigned.iter().map(|t| t.partition).collect::<Vec<_>>(), "partitions assigned");
        }
        self.update_assigned(consumer);
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = ?offsets.to_topic_map(), "offsets committed"),
            Err(e) => tracing::warn!(error = %e, "offset commit failed"),
        }
    }
}

impl RebalanceContext {
    /// Counts the assignment after a rebalance (eager and cooperative protocols alike).
    fn update_assigned(&self, consumer: &BaseConsumer<Self>) {
        if let Ok(a) = consumer.assignment() {
            self.health.set_assigned(a.count());
        }
    }
}

/// The consumer's `fetch.wait.max.ms` unless `[kafka.consumer]` sets it (see below why not 500).
pub const FETCH_WAIT_MAX_MS: u64 = 100;

pub fn consumer_config(cfg: &Config) -> ClientConfig {
    let k = &cfg.kafka;
    let fetch_wait_ms = FETCH_WAIT_MAX_MS.to_string();
    let queue_kbytes = cfg.flow.fetch_queue_kbytes.to_string();
    let statistics_ms = k.statistics_interval_ms.to_string();
    super::client_config(
        k,
        &[
            ("group.id", &k.group_id),
            // Stored offsets are committed in the background; only acknowledged work is stored.
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            // A fetch that finds nothing waits this long at the broker. Kafka answers as soon as
            // data arrives, but not every Kafka-compatible broker does (tansu waits it out), and
            // then librdkafka's 500 ms lands on the latency of the next event after a quiet spell.
            ("fetch.wait.max.ms", &fetch_wait_ms),
            ("queued.max.messages.kbytes", &queue_kbytes),
            ("statistics.interval.ms", &statistics_ms),
        ],
        &k.consumer,
    )
}

/// Stores commit points; the background auto-commit sends them to the broker.
pub fn store(consumer: &impl Consumer<RebalanceContext>, points: &[(TopicPartition, i64)]) {
    let mut tpl = TopicPartitionList::new();
    for (tp, off) in points {
        let _ = tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*off));
    }
    if tpl.count() == 0 {
        return;
    }
    if let Err(e) = consumer.store_offsets(&tpl) {
        // Raced a revoke: the partition is gone and its point was committed in the callback.
        tracing::debug!(error = %e, "cannot store offsets");
    }
}
