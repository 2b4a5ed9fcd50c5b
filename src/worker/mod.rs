//! The worker: loads the model, wires the tasks, and shuts them down in order.
//!
//! - The admission loop ([`admit`], async) consumes, decodes, tokenizes and admits events, and
//!   pauses its partitions while too many pairs are in flight ([`inflight`]).
//! - The coordinator task ([`coordinator`]) owns the batcher and the assembler: no locks on the
//!   hot path.
//! - The inference thread ([`crate::model`]) owns the ONNX Runtime session.
//! - Each finished event is produced by its own task ([`finish`]), whose acknowledgement completes
//!   the event's offset; the tracker turns completions into contiguous per-partition commit points.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::assemble::ModelRef;
use crate::config::{Config, Guarantee};
use crate::kafka::consumer::{self, KafkaConsumer, RebalanceContext, RebalanceNote};
use crate::kafka::producer::Egress;
use crate::kafka::txn::{self, Rewind};
use crate::model::{self, InferRequest, InferResult, Scorer};
use crate::obs::health::Health;
use crate::obs::http;
use crate::obs::metrics::{Metrics, ModelLabels};
use crate::obs::recorder::{Recorder, Snapshot};
use crate::offsets::{SharedTracker, TopicPartition};
use crate::tokenize::PairTokenizer;

pub mod admit;
pub mod coordinator;
pub mod finish;
pub mod inflight;
#[cfg(test)]
mod testing;

use admit::{AdmitLoop, AdmitPool, Admitter, Exit, Ranges};
use coordinator::{Coordinator, ToCoordinator, Wiring};
use finish::{Commit, Finisher, Routes};
use inflight::InflightPairs;

/// Where the worker's input comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The consumer group (`kafka.group_id`): subscribe and run until shutdown.
    Group,
    /// Fixed offset ranges by manual assignment, without a group or commits (`reranker replay`):
    /// stops by itself once every partition reached its end and everything admitted is acknowledged.
    Ranges(Vec<PartitionRange>),
}

/// Offsets `[start, end)` of one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionRange {
    pub tp: TopicPartition,
    pub start: i64,
    pub end: i64,
}

/// Why the worker stopped by itself; the uncommitted events go to the next owner.
#[derive(Debug)]
pub enum Stopped {
    /// The producer that writes the outputs was fenced or failed fatally.
    ProducerFailed,
    /// Partitions stalled and the run was asked to stop on stalls ([`Worker::stop_on_stall`]).
    Stalled(Vec<String>),
}

impl std::fmt::Display for Stopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::ProducerFailed => {
                f.write_str("the Kafka producer was fenced or failed fatally; see the log")
            }
            Self::Stalled(list) => write!(
                f,
                "stopped: partitions stalled (position not moving and not at the high watermark): {}",
                list.join(", ")
            ),
        }
    }
}

impl std::error::Error for Stopped {}

pub struct Worker {
    cfg: Config,
    scorer: Scorer,
    tokenizer: Arc<PairTokenizer>,
    health: Arc<Health>,
    inflight: Arc<InflightPairs>,
    /// Every count of this worker; read it while it runs (`bench`, `replay`).
    pub recorder: Arc<Recorder>,
    /// Stop with an error when a partition stalls, instead of only reporting it.
    stop_on_stall: bool,
}

impl Worker {
    /// Loads the model and tokenizer and warms the session up; slow, so done before joining the
    /// group. Blocking: see [`Self::spawn_load`].
    pub fn load(cfg: Config) -> anyhow::Result<Self> {
        let tokenizer = Arc::new(
            PairTokenizer::from_file(&cfg.model.dir.join("tokenizer.json"), cfg.model.max_length)?
                .with_long_passages(cfg.model.long_passages, cfg.model.chunk_overlap)?
                .with_passage_cache(cfg.pipeline.passage_cache_mb),
        );
        let mut scorer = Scorer::load(&cfg.model, &cfg.model_name())?;
        model::warm_up::warm_up(&mut scorer, &tokenizer, &cfg)?;
        let health = Arc::new(Health::new(
            Duration::from_millis(cfg.http.broker_timeout_ms),
            cfg.stall_after(),
        ));
        health.set_model_warmed();
        let inflight = Arc::new(InflightPairs::default());
        let info = scorer.info();
        let mut metrics = Metrics::new(
            ModelLabels {
                name: &info.name,
                revision: &info.revision,
                device: info.device,
            },
            health.clone(),
            {
                let inflight = inflight.clone();
                move || inflight.get() as u64
            },
            &cfg.otel,
        )?;
        if let Some(stats) = tokenizer.passage_cache_stats() {
            metrics.observe_passage_cache(stats);
        }
        Ok(Self {
            cfg,
            scorer,
            tokenizer,
            health,
            inflight,
            recorder: Arc::new(Recorder::new(metrics)),
            stop_on_stall: false,
        })
    }

    /// For runs that must end (benchmarks, replays): a stalled partition stops the worker with an
    /// error naming it, rather than leaving the run waiting forever. A serving worker only
    /// reports it (log, metric, `/readyz`): the broker may recover.
    pub fn stop_on_stall(mut self) -> Self {
        self.stop_on_stall = true;
        self
    }

    /// [`Self::load`] off the async runtime.
    pub async fn spawn_load(cfg: Config) -> anyhow::Result<Self> {
        tokio::task::spawn_blocking(move || Self::load(cfg))
            .await
            .context("model loading panicked")?
    }

    /// Consumes until `shutdown` resolves, then drains in-flight work within the configured deadline,
    /// commits, and returns.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<Snapshot> {
        self.run_source(shutdown, Source::Group).await
    }

    /// [`Self::run`] with the input taken from `source`. With [`Source::Ranges`] it also returns
    /// by itself once every range is done.
    pub async fn run_source(
        self,
        mut shutdown: watch::Receiver<bool>,
        source: Source,
    ) -> anyhow::Result<Snapshot> {
        let Worker {
            cfg,
            scorer,
            tokenizer,
            health,
            inflight,
            recorder,
            stop_on_stall,
        } = self;
        let cfg = Arc::new(cfg);
        let info = scorer.info().clone();
        tracing::info!(model = %info.name, revision = %info.revision, device = info.device, "model loaded");
        let model_ref = ModelRef {
            name: info.name.clone(),
            revision: info.revision.clone(),
            activation: info.activation.to_string(),
        };

        let tracker = SharedTracker::default();
        let (coord_tx, coord_rx) = mpsc::unbounded_channel::<ToCoordinator>();
        let (note_tx, mut note_rx) = mpsc::unbounded_channel::<RebalanceNote>();
        let assignments = Arc::new(AtomicU64::new(0));
        // Replays keep no position, so they need no transaction either: a failed replay is rerun.
        let exactly_once =
            matches!(source, Source::Group) && cfg.processing.guarantee == Guarantee::ExactlyOnce;
        let txn_channel = txn::channel();
        let ctx = RebalanceContext {
            tracker: tracker.clone(),
            notes: note_tx,
            assignments: assignments.clone(),
            health: health.clone(),
            txn: exactly_once.then(|| txn_channel.0.clone()),
        };
        let (consumer, ranges) = connect(&cfg, &source, exactly_once, ctx, &tracker, &health)?;
        // Rebalance notes arrive on the consumer's callback; forward them in order with admissions.
        {
            let coord_tx = coord_tx.clone();
            tokio::spawn(async move {
                while let Some(n) = note_rx.recv().await {
                    if coord_tx.send(ToCoordinator::Rebalance(n)).is_err() {
                        break;
                    }
                }
            });
        }

        let egress = Egress::new(&cfg.kafka)?;
        let http_server = if cfg.http.enabled {
            Some(http::Server::start(&cfg.http.listen, recorder.metrics(), health.clone()).await?)
        } else {
            None
        };
        let (rewind_tx, rewind_rx) = mpsc::unbounded_channel::<Rewind>();
        let txn = if exactly_once {
            let (c, tracker) = (cfg.clone(), tracker.clone());
            let c2 = consumer.clone();
            let group: txn::GroupMetadata = Box::new(move || c2.group_metadata());
            let channel = txn_channel;
            Some(
                tokio::task::spawn_blocking(move || {
                    txn::start(&c, group, tracker, rewind_tx, channel)
                })
                .await
                .context("transactional producer start panicked")??,
            )
        } else {
            drop(txn_channel);
            None
        };
        let commit = match (&source, &txn) {
            (Source::Ranges(_), _) => Commit::Nothing,
            (Source::Group, Some(t)) => Commit::Txn(t.handle.clone()),
            (Source::Group, None) => Commit::Store,
        };
        let store_on_exit = matches!(commit, Commit::Store);
        let finisher = Finisher {
            egress: egress.clone(),
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            inflight: inflight.clone(),
            recorder: recorder.clone(),
            commit,
        };
        let routes = Arc::new(Routes {
            output_topic: cfg.kafka.output_topic.clone(),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
            propagate: cfg.output.propagate_headers.clone(),
        });

        let (infer_tx, infer_rx) = mpsc::channel::<InferRequest>(1);
        let (result_tx, result_rx) = mpsc::unbounded_channel::<InferResult>();
        let pad_id = tokenizer.pad_id();
        let infer_thread = model::spawn(scorer, retry_policy(&cfg), infer_rx, result_tx)
            .context("cannot start inference thread")?;

        let coord_idle = Arc::new(AtomicBool::new(true));
        let coordinator = Coordinator::new(
            &cfg,
            Wiring {
                sink: finisher.clone(),
                routes: routes.clone(),
                model: model_ref,
                pad_id,
                recorder: recorder.clone(),
                inflight: inflight.clone(),
                tracker: Some(tracker.clone()),
                idle: coord_idle.clone(),
            },
        );
        let coord_task = tokio::spawn(coordinator.run(coord_rx, infer_tx, result_rx));

        let stats_task = {
            let recorder = recorder.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(30));
                t.tick().await;
                loop {
                    t.tick().await;
                    recorder.log("progress");
                }
            })
        };

        let admitter = Admitter {
            cfg: cfg.clone(),
            tokenizer,
            tracker: tracker.clone(),
            coord_tx: coord_tx.clone(),
            sink: finisher,
            routes,
            inflight,
            lanes: Default::default(),
            recorder: recorder.clone(),
            next_id: 0,
        };
        let threads = cfg.pipeline.admission_threads(&cfg.model);
        let pool =
            AdmitPool::start(&admitter, threads).context("cannot start admission threads")?;
        tracing::info!(threads, "admission threads started");
        let admit_loop = AdmitLoop {
            admitter,
            pool,
            consumer: consumer.clone(),
            health: health.clone(),
            assignments,
            ranges,
            rewinds: rewind_rx,
            stop_on_stall,
            // Whichever producer writes the outputs can fail fatally.
            fatal: txn
                .as_ref()
                .map_or_else(|| egress.fatal.clone(), |t| t.fatal.clone()),
        };
        let exit = admit_loop.run(&mut shutdown).await;
        let drained = || tracker.lock().in_flight() == 0 && coord_idle.load(Ordering::SeqCst);

        if exit == Exit::RangesDone {
            // Every partition reached its end: wait for what was admitted (no deadline: a replay
            // is done when its work is), unless asked to stop.
            tracing::info!("all ranges consumed; finishing admitted events");
            let _ = coord_tx.send(ToCoordinator::Drain);
            wait_until(&drained, None, Some(&mut shutdown)).await;
        }
        // Drain: stop fetching, let everything admitted finish, then commit.
        tracing::info!("shutting down: draining in-flight events");
        health.set_draining();
        if let Ok(a) = consumer.assignment() {
            let _ = consumer.pause(&a);
        }
        let _ = coord_tx.send(ToCoordinator::Drain);
        if !matches!(exit, Exit::Fatal | Exit::Stalled) {
            let deadline = Instant::now() + Duration::from_millis(cfg.shutdown.drain_timeout_ms);
            if !wait_until(&drained, Some(deadline), None).await {
                let pending = tracker.lock().in_flight();
                tracing::warn!(pending, "drain deadline passed; uncommitted events will be re-processed by the next owner");
            }
        }
        if let Some(t) = &txn {
            let h = t.handle.clone();
            let committed = tokio::task::spawn_blocking(move || h.close(Duration::from_secs(60)))
                .await
                .unwrap_or(false);
            if !committed {
                tracing::warn!("final transaction not committed; the next owner re-processes from the last commit");
            }
        } else if store_on_exit {
            let points = tracker.lock().commit_points();
            consumer::store(&*consumer, &points);
            if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                // Nothing stored since the last auto-commit is reported as an error too.
                tracing::debug!(error = %e, "final commit");
            }
        }
        egress.flush(Duration::from_secs(5));
        stats_task.abort();
        coord_task.abort();
        drop(coord_tx);
        consumer.unsubscribe();
        drop(consumer);
        // The inference thread ends when the coordinator's sender is dropped with the task.
        let _ = tokio::task::spawn_blocking(move || infer_thread.join()).await;
        if let Some(t) = txn {
            let thread = t.thread;
            drop(t.handle);
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(s) = http_server {
            s.stop().await;
        }
        recorder.log("stopped");
        match exit {
            Exit::Fatal => Err(Stopped::ProducerFailed.into()),
            Exit::Stalled => {
                let list = health.stalled().iter().map(|s| s.to_string()).collect();
                Err(Stopped::Stalled(list).into())
            }
            Exit::Shutdown | Exit::RangesDone => Ok(recorder.snapshot()),
        }
    }
}

/// Creates the consumer and subscribes it (the group) or assigns it its ranges (a replay).
fn connect(
    cfg: &Config,
    source: &Source,
    exactly_once: bool,
    ctx: RebalanceContext,
    tracker: &SharedTracker,
    health: &Health,
) -> anyhow::Result<(Arc<KafkaConsumer>, Ranges)> {
    let mut client_cfg = consumer::consumer_config(cfg);
    match source {
        Source::Group if exactly_once => {
            // Offsets travel inside the transaction, never on their own.
            client_cfg.set("enable.auto.commit", "false");
        }
        Source::Group => {}
        Source::Ranges(_) => {
            // librdkafka's consumer API wants a group id even for manual assignment; this one
            // never joins (no subscribe) and never commits.
            client_cfg
                .set(
                    "group.id",
                    format!(
                        "{}-replay-{}-{}",
                        cfg.kafka.group_id,
                        std::process::id(),
                        crate::now_ms()
                    ),
                )
                .set("enable.auto.commit", "false")
                // A range ending at the high watermark has no message at its end offset:
                // the partition's EOF says it is done.
                .set("enable.partition.eof", "true");
        }
    }
    let assignments = ctx.assignments.clone();
    let consumer: KafkaConsumer = client_cfg
        .create_with_context(ctx)
        .context("cannot create Kafka consumer")?;
    let mut ends = HashMap::new();
    match source {
        Source::Group => consumer
            .subscribe(&[&cfg.kafka.input_topic])
            .context("cannot subscribe")?,
        Source::Ranges(rs) => {
            let mut tpl = TopicPartitionList::new();
            let mut t = tracker.lock();
            for r in rs.iter().filter(|r| r.start < r.end) {
                tpl.add_partition_offset(&r.tp.topic, r.tp.partition, Offset::Offset(r.start))?;
                t.assign(r.tp.clone());
                ends.insert(r.tp.clone(), r.end);
            }
            drop(t);
            consumer.assign(&tpl).context("cannot assign partitions")?;
            assignments.fetch_add(1, Ordering::SeqCst);
            health.set_assigned(tpl.count());
        }
    }
    Ok((Arc::new(consumer), Ranges::new(ends)))
}

/// Polls `done` until it holds (true), the deadline passes or shutdown is asked for (false).
async fn wait_until(
    done: &(dyn Fn() -> bool + Sync),
    deadline: Option<Instant>,
    mut shutdown: Option<&mut watch::Receiver<bool>>,
) -> bool {
    loop {
        if done() {
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        let poll = tokio::time::sleep(Duration::from_millis(10));
        match shutdown.as_deref_mut() {
            Some(s) if *s.borrow() => return false,
            Some(s) => {
                tokio::select! {
                    _ = s.changed() => {}
                    _ = poll => {}
                }
            }
            None => poll.await,
        }
    }
}

fn retry_policy(cfg: &Config) -> model::isolate::RetryPolicy {
    model::isolate::RetryPolicy {
        max_retries: cfg.inference.max_retries,
        backoff: Duration::from_millis(cfg.inference.retry_backoff_ms),
    }
}
