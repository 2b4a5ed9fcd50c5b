//! Wires the stages: ingress → decode → tokenize → batch → infer → assemble → egress → offsets.
//!
//! - The ingress loop (async) consumes, decodes, tokenizes and admits events, and pauses its
//!   partitions while too many pairs are in flight.
//! - The coordinator task owns the batcher and the assembler: no locks on the hot path.
//! - The inference thread owns the ONNX Runtime session.
//! - Each finished event is produced by its own task, whose acknowledgement completes the event's
//!   offset; the tracker turns completions into contiguous per-partition commit points.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::assemble::{self, Assembler, CandidateMeta, Completed, EventMeta, ModelRef};
use crate::batch::{BatchPolicy, Batcher, PairKey, PendingPair};
use crate::config::{Config, Guarantee};
use crate::decode::{self, ErrorCode};
use crate::dlq::{self, DlqInput};
use crate::egress::{Egress, OutRecord};
use crate::http;
use crate::infer::{self, InferRequest, InferResult, Scorer};
use crate::ingress::{self, IngressContext, RebalanceNote, Tracker};
use crate::metrics::{Health, Metrics, ModelLabels};
use crate::offsets::{OffsetTracker, Ticket, TopicPartition};
use crate::telemetry;
use crate::tokenize::{EncodedPair, PairTokenizer};
use crate::txn::{self, Rewind, TxnMsg};

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

/// Where an acknowledged event's offset goes.
#[derive(Clone)]
enum Commit {
    /// Stored for librdkafka's background auto-commit (at_least_once).
    Store,
    /// Nowhere: replays keep no position.
    Nothing,
    /// Into the open transaction, after the record (exactly_once).
    Txn(std::sync::mpsc::Sender<TxnMsg>),
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Counters logged periodically and at exit (and read by tests and the benchmark).
#[derive(Default, Debug)]
pub struct Stats {
    pub events_in: AtomicU64,
    pub events_out: AtomicU64,
    pub dead_letters: AtomicU64,
    pub pairs_scored: AtomicU64,
    pub batches: AtomicU64,
    pub real_tokens: AtomicU64,
    pub padded_tokens: AtomicU64,
    pub inference_us: AtomicU64,
    pub pauses: AtomicU64,
    pub resumes: AtomicU64,
}

impl Stats {
    /// Zeroes every counter (the benchmark measures after a warm-up event).
    pub fn reset(&self) {
        for a in [
            &self.events_in,
            &self.events_out,
            &self.dead_letters,
            &self.pairs_scored,
            &self.batches,
            &self.real_tokens,
            &self.padded_tokens,
            &self.inference_us,
            &self.pauses,
            &self.resumes,
        ] {
            a.store(0, Ordering::Relaxed);
        }
    }

    pub fn log(&self, what: &str) {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let batches = g(&self.batches).max(1) as f64;
        let real = g(&self.real_tokens).max(1) as f64;
        tracing::info!(
            events_in = g(&self.events_in),
            events_out = g(&self.events_out),
            dead_letters = g(&self.dead_letters),
            pairs_scored = g(&self.pairs_scored),
            batches = g(&self.batches),
            mean_batch_pairs = g(&self.pairs_scored) as f64 / batches,
            padding_ratio = g(&self.padded_tokens) as f64 / real,
            inference_s = g(&self.inference_us) as f64 / 1e6,
            pauses = g(&self.pauses),
            resumes = g(&self.resumes),
            "{what}"
        );
    }
}

/// Flow control shared by ingress, coordinator and produce tasks.
#[derive(Default)]
struct Flow {
    inflight_pairs: AtomicUsize,
}

/// Messages to the coordinator, on one channel so a revoke is seen after the admissions before it.
pub enum ToCoordinator {
    Admit(Box<EventMeta>, Vec<(u32, EncodedPair)>),
    Rebalance(RebalanceNote),
    Drain,
}

/// How an event ended, for the counters.
#[derive(Clone, Copy)]
enum Outcome {
    Reranked { record_ts_ms: Option<i64> },
    DeadLetter(ErrorCode),
}

/// What finishing an event needs: produce, then complete its offset.
#[derive(Clone)]
struct Finisher {
    egress: Egress,
    consumer: Arc<StreamConsumer<IngressContext>>,
    tracker: Tracker,
    flow: Arc<Flow>,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    /// `output.propagate_headers`: which trace-context headers the event's span may write.
    propagate: Arc<[String]>,
    commit: Commit,
}

impl Finisher {
    /// Produces a dead letter in place of the event's output; its offset completes the same way.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &self,
        topic: &str,
        d: &DlqInput<'_>,
        mut headers: Vec<(String, Vec<u8>)>,
        ticket: Ticket,
        pairs: usize,
        span: tracing::Span,
    ) {
        tracing::debug!(
            partition = d.partition,
            offset = d.offset,
            code = d.code.as_str(),
            "dead-lettering event"
        );
        telemetry::record_error(&span, d.code.as_str(), d.message);
        telemetry::inject(&span, &self.propagate, &mut headers);
        let rec = OutRecord {
            topic: topic.to_string(),
            key: d.key.map(<[u8]>::to_vec),
            payload: dlq::render(d, now_ms()),
            headers,
        };
        self.finish(rec, ticket, pairs, Outcome::DeadLetter(d.code), span);
    }

    /// Produces the record; on its acknowledgement completes the offset and ends the event's span.
    /// exactly_once: hands it to the transaction thread, which releases it in offset order.
    fn finish(
        &self,
        rec: OutRecord,
        ticket: Ticket,
        pairs: usize,
        outcome: Outcome,
        span: tracing::Span,
    ) {
        if let Commit::Txn(tx) = &self.commit {
            let this = self.clone();
            let done: txn::Done = Box::new(move |released| {
                drop(span);
                this.flow.inflight_pairs.fetch_sub(pairs, Ordering::SeqCst);
                if released {
                    this.count(outcome);
                }
            });
            if let Err(std::sync::mpsc::SendError(TxnMsg::Finished { done, .. })) =
                tx.send(TxnMsg::Finished { rec, ticket, done })
            {
                // The transaction thread stopped (fatal error): the work is redone by whoever
                // owns the partition next.
                done(false);
            }
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if !this.egress.send(&rec).await {
                // Not written: the offset stays uncommitted and the worker is stopping.
                return;
            }
            drop(span);
            let point = ingress::lock(&this.tracker).complete(&ticket);
            if let (Some(p), Commit::Store) = (point, &this.commit) {
                ingress::store(&*this.consumer, &[(ticket.tp.clone(), p)]);
            }
            this.flow.inflight_pairs.fetch_sub(pairs, Ordering::SeqCst);
            this.count(outcome);
        });
    }

    fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::Reranked { record_ts_ms } => {
                self.stats.events_out.fetch_add(1, Ordering::Relaxed);
                self.metrics.produced(record_ts_ms, now_ms());
            }
            Outcome::DeadLetter(code) => {
                self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                self.metrics.dead_lettered(code);
            }
        }
    }
}

pub struct Worker {
    cfg: Config,
    scorer: Scorer,
    tokenizer: Arc<PairTokenizer>,
    pub stats: Arc<Stats>,
}

impl Worker {
    /// Loads the model and tokenizer and warms the session up; slow, so done before joining the group.
    pub fn load(cfg: Config) -> anyhow::Result<Self> {
        let tokenizer = Arc::new(
            PairTokenizer::from_file(&cfg.model.dir.join("tokenizer.json"), cfg.model.max_length)?
                .with_long_passages(cfg.model.long_passages, cfg.model.chunk_overlap)?,
        );
        let mut scorer = Scorer::load(&cfg.model, &cfg.model_name())?;
        warm_up(&mut scorer, &tokenizer, &cfg)?;
        Ok(Self {
            cfg,
            scorer,
            tokenizer,
            stats: Arc::new(Stats::default()),
        })
    }

    /// Consumes until `shutdown` resolves, then drains in-flight work within the configured deadline,
    /// commits, and returns.
    pub async fn run(self, shutdown: watch::Receiver<bool>) -> anyhow::Result<Arc<Stats>> {
        self.run_source(shutdown, Source::Group).await
    }

    /// [`Self::run`] with the input taken from `source`. With [`Source::Ranges`] it also returns
    /// by itself once every range is done.
    pub async fn run_source(
        self,
        mut shutdown: watch::Receiver<bool>,
        source: Source,
    ) -> anyhow::Result<Arc<Stats>> {
        let Worker {
            cfg,
            scorer,
            tokenizer,
            stats,
        } = self;
        let info = scorer.info().clone();
        tracing::info!(model = %info.name, revision = %info.revision, device = info.device, "model loaded");
        let model_ref = ModelRef {
            name: info.name.clone(),
            revision: info.revision.clone(),
            activation: info.activation.to_string(),
        };

        let health = Arc::new(Health::new(Duration::from_millis(
            cfg.http.broker_timeout_ms,
        )));
        // Worker::load warmed the session up before `run` could be called.
        health.set_model_warmed();
        let tracker: Tracker = Arc::new(std::sync::Mutex::new(OffsetTracker::new()));
        let (coord_tx, coord_rx) = mpsc::unbounded_channel::<ToCoordinator>();
        let (note_tx, mut note_rx) = mpsc::unbounded_channel::<RebalanceNote>();
        let assignments = Arc::new(AtomicU64::new(0));
        // Replays keep no position, so they need no transaction either: a failed replay is rerun.
        let exactly_once =
            matches!(source, Source::Group) && cfg.processing.guarantee == Guarantee::ExactlyOnce;
        let (txn_tx, txn_rx) = std::sync::mpsc::channel::<TxnMsg>();
        let ctx = IngressContext {
            tracker: tracker.clone(),
            notes: note_tx,
            assignments: assignments.clone(),
            health: health.clone(),
            txn: exactly_once.then(|| txn_tx.clone()),
        };
        let mut client_cfg = ingress::consumer_config(&cfg);
        match &source {
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
                            now_ms()
                        ),
                    )
                    .set("enable.auto.commit", "false")
                    // A range ending at the high watermark has no message at its end offset:
                    // the partition's EOF says it is done.
                    .set("enable.partition.eof", "true");
            }
        }
        let consumer: StreamConsumer<IngressContext> = client_cfg
            .create_with_context(ctx)
            .context("cannot create Kafka consumer")?;
        let consumer = Arc::new(consumer);
        let mut ranges: HashMap<TopicPartition, i64> = HashMap::new();
        match &source {
            Source::Group => consumer
                .subscribe(&[&cfg.kafka.input_topic])
                .context("cannot subscribe")?,
            Source::Ranges(rs) => {
                let mut tpl = TopicPartitionList::new();
                let mut t = ingress::lock(&tracker);
                for r in rs.iter().filter(|r| r.start < r.end) {
                    tpl.add_partition_offset(&r.tp.topic, r.tp.partition, Offset::Offset(r.start))?;
                    t.assign(r.tp.clone());
                    ranges.insert(r.tp.clone(), r.end);
                }
                drop(t);
                consumer.assign(&tpl).context("cannot assign partitions")?;
                assignments.fetch_add(1, Ordering::SeqCst);
                health.set_assigned(tpl.count());
            }
        }
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
        let flow = Arc::new(Flow::default());
        let metrics = Arc::new(Metrics::new(
            ModelLabels {
                name: &info.name,
                revision: &info.revision,
                device: info.device,
            },
            health.clone(),
            {
                let flow = flow.clone();
                move || flow.inflight_pairs.load(Ordering::Relaxed) as u64
            },
            &cfg.otel,
        )?);
        let http_server = if cfg.http.enabled {
            Some(http::Server::start(&cfg.http.listen, metrics.clone(), health.clone()).await?)
        } else {
            None
        };
        let (rewind_tx, rewind_rx) = mpsc::unbounded_channel::<Rewind>();
        let txn = if exactly_once {
            let (c, consumer, tracker, tx) = (
                cfg.clone(),
                consumer.clone(),
                tracker.clone(),
                txn_tx.clone(),
            );
            Some(
                tokio::task::spawn_blocking(move || {
                    txn::start(&c, consumer, tracker, rewind_tx, txn_rx, tx)
                })
                .await
                .context("transactional producer start panicked")??,
            )
        } else {
            drop(txn_rx);
            None
        };
        let commit = match (&source, exactly_once) {
            (Source::Ranges(_), _) => Commit::Nothing,
            (Source::Group, true) => Commit::Txn(txn_tx.clone()),
            (Source::Group, false) => Commit::Store,
        };
        let finisher_commit = commit.clone();
        let finisher = Finisher {
            egress: egress.clone(),
            consumer: consumer.clone(),
            tracker: tracker.clone(),
            flow: flow.clone(),
            stats: stats.clone(),
            metrics: metrics.clone(),
            propagate: cfg.output.propagate_headers.clone().into(),
            commit,
        };
        drop(txn_tx);

        let (infer_tx, infer_rx) = mpsc::channel::<InferRequest>(1);
        let (result_tx, result_rx) = mpsc::unbounded_channel::<InferResult>();
        let pad_id = tokenizer.pad_id();
        let infer_thread =
            infer::spawn(scorer, infer_rx, result_tx).context("cannot start inference thread")?;

        let coordinator = Coordinator {
            batcher: Batcher::new(BatchPolicy {
                max_pairs: cfg.batch.max_batch_pairs,
                max_tokens: cfg.batch.max_batch_tokens,
                max_wait: Duration::from_millis(cfg.batch.max_wait_ms),
            }),
            assembler: Assembler::new(),
            finisher: finisher.clone(),
            model: model_ref,
            output_topic: cfg.kafka.output_topic.clone(),
            dlq_topic: cfg.kafka.dlq_topic.clone(),
            pad_id,
            stats: stats.clone(),
            metrics: metrics.clone(),
            idle: Arc::new(AtomicBool::new(true)),
        };
        let coord_idle = coordinator.idle.clone();
        let coord_task = tokio::spawn(coordinator.run(coord_rx, infer_tx, result_rx));

        let stats_task = {
            let stats = stats.clone();
            tokio::spawn(async move {
                let mut t = tokio::time::interval(Duration::from_secs(30));
                t.tick().await;
                loop {
                    t.tick().await;
                    stats.log("progress");
                }
            })
        };

        let ingress = Ingress {
            cfg: &cfg,
            consumer: consumer.clone(),
            tokenizer,
            tracker: tracker.clone(),
            coord_tx: coord_tx.clone(),
            finisher,
            flow: flow.clone(),
            stats: stats.clone(),
            metrics: metrics.clone(),
            health: health.clone(),
            assignments,
            next_id: 0,
            open: ranges.keys().cloned().collect(),
            ranges,
            rewinds: rewind_rx,
            // Whichever producer writes the outputs can fail fatally.
            fatal: txn
                .as_ref()
                .map_or_else(|| egress.fatal.clone(), |t| t.fatal.clone()),
        };
        let exit = ingress.run(&mut shutdown).await;

        if exit == Exit::RangesDone {
            // Every partition reached its end: wait for what was admitted (no deadline: a replay
            // is done when its work is), unless asked to stop.
            tracing::info!("all ranges consumed; finishing admitted events");
            let _ = coord_tx.send(ToCoordinator::Drain);
            loop {
                if ingress::lock(&tracker).in_flight() == 0 && coord_idle.load(Ordering::SeqCst) {
                    break;
                }
                if *shutdown.borrow() {
                    break;
                }
                tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        }
        // Drain: stop fetching, let everything admitted finish, then commit.
        tracing::info!("shutting down: draining in-flight events");
        health.set_draining();
        if let Ok(a) = consumer.assignment() {
            let _ = consumer.pause(&a);
        }
        let _ = coord_tx.send(ToCoordinator::Drain);
        let deadline = Instant::now() + Duration::from_millis(cfg.shutdown.drain_timeout_ms);
        loop {
            let pending = ingress::lock(&tracker).in_flight();
            if (pending == 0 && coord_idle.load(Ordering::SeqCst)) || exit == Exit::Fatal {
                break;
            }
            if Instant::now() >= deadline {
                tracing::warn!(pending, "drain deadline passed; uncommitted events will be re-processed by the next owner");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        match (&finisher_commit, &txn) {
            (_, Some(t)) => {
                let (ack_tx, ack_rx) = std::sync::mpsc::channel();
                let committed = t.tx.send(TxnMsg::Close(ack_tx)).is_ok()
                    && tokio::task::spawn_blocking(move || {
                        ack_rx
                            .recv_timeout(Duration::from_secs(60))
                            .unwrap_or(false)
                    })
                    .await
                    .unwrap_or(false);
                if !committed {
                    tracing::warn!("final transaction not committed; the next owner re-processes from the last commit");
                }
            }
            (Commit::Store, None) => {
                let points = ingress::lock(&tracker).commit_points();
                ingress::store(&*consumer, &points);
                if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
                    // Nothing stored since the last auto-commit is reported as an error too.
                    tracing::debug!(error = %e, "final commit");
                }
            }
            _ => {}
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
            let _ = tokio::task::spawn_blocking(move || t.thread.join()).await;
        }
        if let Some(s) = http_server {
            s.stop().await;
        }
        stats.log("stopped");
        if exit == Exit::Fatal {
            anyhow::bail!("the Kafka producer was fenced or failed fatally; see the log");
        }
        Ok(stats)
    }
}

/// Runs every batch shape the worker will see once, so the first real events do not pay for
/// ONNX Runtime's lazy allocations and kernel selection.
fn warm_up(scorer: &mut Scorer, tok: &PairTokenizer, cfg: &Config) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let pair = tok.encode("warm up", "warm up")?;
    let mut len = 16usize;
    loop {
        let l = len.min(cfg.model.max_length);
        let mut p = pair.clone();
        p.ids.resize(l, tok.pad_id());
        p.type_ids.resize(l, 1);
        let rows = (cfg.batch.max_batch_tokens / l).clamp(1, cfg.batch.max_batch_pairs);
        let batch: Vec<&EncodedPair> = std::iter::repeat_n(&p, rows).collect();
        scorer.score(&infer::TensorBatch::from_pairs(
            batch.into_iter(),
            tok.pad_id(),
        ))?;
        if l >= cfg.model.max_length {
            break;
        }
        len *= 4;
    }
    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        "model warmed up"
    );
    Ok(())
}

struct Ingress<'a> {
    cfg: &'a Config,
    consumer: Arc<StreamConsumer<IngressContext>>,
    tokenizer: Arc<PairTokenizer>,
    tracker: Tracker,
    coord_tx: mpsc::UnboundedSender<ToCoordinator>,
    finisher: Finisher,
    flow: Arc<Flow>,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    assignments: Arc<AtomicU64>,
    next_id: u64,
    /// End offset (exclusive) per partition of a [`Source::Ranges`] run; empty for the group.
    ranges: HashMap<TopicPartition, i64>,
    /// Range partitions not yet at their end.
    open: HashSet<TopicPartition>,
    rewinds: mpsc::UnboundedReceiver<Rewind>,
    fatal: Arc<AtomicBool>,
}

/// Why the ingress loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    Shutdown,
    /// Every range partition reached its end offset.
    RangesDone,
    /// The transactional producer cannot go on.
    Fatal,
}

impl Ingress<'_> {
    async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Exit {
        let exit = self.consume(shutdown).await;
        // Replays end here; the group keeps its partitions until the consumer is dropped.
        if exit == Exit::RangesDone {
            tracing::info!(
                events = self.stats.events_in.load(Ordering::Relaxed),
                "every partition reached its end offset"
            );
        }
        exit
    }

    async fn consume(&mut self, shutdown: &mut watch::Receiver<bool>) -> Exit {
        if !self.ranges.is_empty() && self.open.is_empty() {
            return Exit::RangesDone;
        }
        let high = self.cfg.flow.max_inflight_pairs;
        let low = ((high as f64) * self.cfg.flow.resume_ratio) as usize;
        let mut paused = false;
        let mut seen_epoch = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let consumer = self.consumer.clone();
        let mut fatal_tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            if *shutdown.borrow() {
                return Exit::Shutdown;
            }
            if self.fatal.load(Ordering::SeqCst) {
                return Exit::Fatal;
            }
            if !self.ranges.is_empty() && self.open.is_empty() {
                return Exit::RangesDone;
            }
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Exit::Shutdown,
                Some(r) = self.rewinds.recv() => self.rewind(r),
                _ = tick.tick(), if paused => {
                    if self.flow.inflight_pairs.load(Ordering::SeqCst) <= low {
                        self.set_paused(false);
                        paused = false;
                    }
                }
                _ = fatal_tick.tick() => {}
                msg = consumer.recv() => match msg {
                    Ok(m) => self.handle(&m),
                    Err(rdkafka::error::KafkaError::PartitionEOF(p)) => self.close_range(p),
                    Err(e) => {
                        tracing::warn!(error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
            let epoch = self.assignments.load(Ordering::SeqCst);
            if epoch != seen_epoch {
                // librdkafka keeps an application pause on a partition through revoke and
                // re-assign, and a resume only reaches the partitions owned at that moment: a
                // partition paused, revoked and given back later would stay paused forever.
                // State the current pause state for every new assignment.
                seen_epoch = epoch;
                self.apply_pause(paused);
            }
            if !paused && self.flow.inflight_pairs.load(Ordering::SeqCst) >= high {
                self.set_paused(true);
                paused = true;
            }
        }
    }

    /// After an aborted transaction: seek every rewound partition back to its last committed
    /// offset and drop the queued work the abort abandoned.
    fn rewind(&mut self, Rewind(points): Rewind) {
        let tps: Vec<TopicPartition> = points.iter().map(|(tp, _)| tp.clone()).collect();
        let _ = self
            .coord_tx
            .send(ToCoordinator::Rebalance(RebalanceNote::Revoked(tps)));
        for (tp, offset) in points {
            // A seek waits for the fetcher; it is short, but not for a runtime thread to idle in.
            let res = tokio::task::block_in_place(|| {
                self.consumer.seek(
                    &tp.topic,
                    tp.partition,
                    Offset::Offset(offset),
                    Duration::from_secs(10),
                )
            });
            match res {
                Ok(()) => {
                    ingress::lock(&self.tracker).rewound(&tp);
                    tracing::info!(
                        partition = tp.partition,
                        offset,
                        "rewound to the last commit"
                    );
                }
                // Still marked rewinding: nothing of it is admitted, the next rebalance or
                // restart resumes it from the committed offset.
                Err(e) => {
                    tracing::error!(partition = tp.partition, offset, error = %e, "cannot seek back after an abort")
                }
            }
        }
    }

    /// A range partition reached its end: stop fetching it.
    fn close_range(&mut self, partition: i32) {
        let tp = TopicPartition {
            topic: self.cfg.kafka.input_topic.clone(),
            partition,
        };
        if self.open.remove(&tp) {
            tracing::debug!(partition, "range done");
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        let _ = self.consumer.pause(&tpl);
    }

    fn apply_pause(&self, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let res = if pause {
            self.consumer.pause(&assignment)
        } else {
            self.consumer.resume(&assignment)
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, pause, "cannot set the pause state of new partitions");
        }
    }

    fn set_paused(&self, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let inflight = self.flow.inflight_pairs.load(Ordering::SeqCst);
        let res = if pause {
            self.stats.pauses.fetch_add(1, Ordering::Relaxed);
            self.consumer.pause(&assignment)
        } else {
            self.stats.resumes.fetch_add(1, Ordering::Relaxed);
            self.consumer.resume(&assignment)
        };
        if res.is_ok() {
            self.health.set_paused(pause);
        }
        match res {
            Ok(()) => tracing::info!(
                inflight_pairs = inflight,
                partitions = assignment.count(),
                "{}",
                if pause {
                    "backpressure: partitions paused"
                } else {
                    "backpressure: partitions resumed"
                }
            ),
            Err(e) => tracing::warn!(error = %e, pause, "cannot change pause state"),
        }
    }

    fn handle(&mut self, m: &rdkafka::message::BorrowedMessage<'_>) {
        let tp = TopicPartition {
            topic: m.topic().to_string(),
            partition: m.partition(),
        };
        if let Some(&end) = self.ranges.get(&tp) {
            if m.offset() >= end {
                return self.close_range(tp.partition);
            }
            if m.offset() + 1 >= end {
                self.close_range(tp.partition);
            }
        }
        let Some(ticket) = ingress::lock(&self.tracker).register(&tp, m.offset()) else {
            return; // raced a revoke; the new owner consumes it
        };
        self.stats.events_in.fetch_add(1, Ordering::Relaxed);
        self.metrics.events_consumed.add(1, &[]);
        let ts = m.timestamp().to_millis();
        let headers = self.propagated_headers(m);
        let span = telemetry::event_span(
            &telemetry::Source {
                topic: &tp.topic,
                partition: tp.partition,
                offset: m.offset(),
                group: &self.cfg.kafka.group_id,
                payload_bytes: m.payload().map_or(0, <[u8]>::len),
            },
            &trace_headers(m),
        );
        let _entered = span.enter();
        let ev = match decode::decode(m.payload(), &self.cfg.limits, ts, now_ms()) {
            Ok(ev) => ev,
            Err(e) => return self.reject(m, &tp, ticket, headers, e.code, &e.message, &span),
        };
        span.record("reranker.request_id", ev.request_id.as_str());
        span.record("reranker.candidates", ev.candidates.len() as i64);
        let tokenize_start = Instant::now();
        let mut pairs = Vec::with_capacity(ev.candidates.len());
        let (mut truncated, mut chunked) = (0u32, 0u32);
        for (i, c) in ev.candidates.iter().enumerate() {
            match self.tokenizer.encode_candidate(&ev.query, &c.text) {
                Ok(enc) => {
                    truncated += enc.truncated as u32;
                    chunked += enc.chunked as u32;
                    pairs.extend(enc.pairs.into_iter().map(|p| (i as u32, p)));
                }
                Err(e) => {
                    let msg = format!("candidate {:?}: {e}", c.id);
                    return self.reject(
                        m,
                        &tp,
                        ticket,
                        headers,
                        ErrorCode::TokenizationFailed,
                        &msg,
                        &span,
                    );
                }
            }
        }
        self.metrics
            .tokenization
            .record(tokenize_start.elapsed().as_secs_f64(), &[]);
        span.record("reranker.pairs", pairs.len() as i64);
        let key = m.key().map(<[u8]>::to_vec);
        let include_text = self.cfg.output.include_text;
        let top_n = ev
            .top_n
            .map(|n| n as usize)
            .unwrap_or(self.cfg.output.top_n)
            .min(self.cfg.output.max_top_n);
        let meta = EventMeta {
            id: self.next_id,
            ticket,
            key,
            headers,
            request_id: ev.request_id,
            query: ev.query,
            candidates: ev
                .candidates
                .into_iter()
                .map(|c| CandidateMeta {
                    id: c.id,
                    text: include_text.then_some(c.text),
                    retriever_score: c.retriever_score,
                    metadata: c.metadata,
                })
                .collect(),
            top_n,
            min_score: ev.min_score,
            received_at: Instant::now(),
            record_ts_ms: ts,
            truncated,
            chunked,
            pairs: pairs.len(),
            payload: m.payload().map(<[u8]>::to_vec).unwrap_or_default(),
            trace: telemetry::span_context(&span),
            span: span.clone(),
        };
        self.next_id += 1;
        self.flow
            .inflight_pairs
            .fetch_add(pairs.len(), Ordering::SeqCst);
        let _ = self
            .coord_tx
            .send(ToCoordinator::Admit(Box::new(meta), pairs));
    }

    #[allow(clippy::too_many_arguments)]
    fn reject(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
        tp: &TopicPartition,
        ticket: Ticket,
        headers: Vec<(String, Vec<u8>)>,
        code: ErrorCode,
        message: &str,
        span: &tracing::Span,
    ) {
        let d = DlqInput {
            code,
            message,
            topic: &tp.topic,
            partition: tp.partition,
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key(),
            payload: m.payload(),
        };
        self.finisher.dead_letter(
            &self.cfg.kafka.dlq_topic,
            &d,
            headers,
            ticket,
            0,
            span.clone(),
        );
    }

    fn propagated_headers(
        &self,
        m: &rdkafka::message::BorrowedMessage<'_>,
    ) -> Vec<(String, Vec<u8>)> {
        let Some(hs) = m.headers() else {
            return Vec::new();
        };
        let want = &self.cfg.output.propagate_headers;
        hs.iter()
            .filter(|h| {
                want.iter()
                    .any(|w| w == "*" || w.eq_ignore_ascii_case(h.key))
            })
            .map(|h| {
                (
                    h.key.to_string(),
                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                )
            })
            .collect()
    }
}

/// The input's W3C trace-context headers, whatever `output.propagate_headers` says.
fn trace_headers(m: &rdkafka::message::BorrowedMessage<'_>) -> Vec<(String, Vec<u8>)> {
    let Some(hs) = m.headers() else {
        return Vec::new();
    };
    hs.iter()
        .filter(|h| {
            h.key.eq_ignore_ascii_case("traceparent") || h.key.eq_ignore_ascii_case("tracestate")
        })
        .filter_map(|h| Some((h.key.to_string(), h.value?.to_vec())))
        .collect()
}

struct Coordinator {
    batcher: Batcher,
    assembler: Assembler,
    finisher: Finisher,
    model: ModelRef,
    output_topic: String,
    dlq_topic: String,
    pad_id: u32,
    stats: Arc<Stats>,
    metrics: Arc<Metrics>,
    /// True when nothing waits in the batcher or assembler (read by the shutdown drain).
    idle: Arc<AtomicBool>,
}

impl Coordinator {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<ToCoordinator>,
        infer_tx: mpsc::Sender<InferRequest>,
        mut results: mpsc::UnboundedReceiver<InferResult>,
    ) {
        let mut permit: Option<mpsc::OwnedPermit<InferRequest>> = None;
        let mut draining = false;
        loop {
            // Hand a batch to the model whenever its slot is free and a close condition holds.
            if permit.is_some() {
                let batch = if draining {
                    self.batcher.flush()
                } else {
                    self.batcher.poll(Instant::now())
                };
                if let (Some(b), Some(p)) = (batch, permit.take()) {
                    let links = self.links(&b);
                    p.send(InferRequest::from_batch(b, self.pad_id, links));
                }
            }
            self.idle.store(
                self.batcher.is_empty() && self.assembler.is_empty(),
                Ordering::SeqCst,
            );
            let deadline = self.batcher.deadline();
            tokio::select! {
                p = infer_tx.clone().reserve_owned(), if permit.is_none() && !self.batcher.is_empty() => {
                    match p {
                        Ok(p) => permit = Some(p),
                        Err(_) => return, // inference thread gone
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if permit.is_some() && deadline.is_some() && !draining => {}
                msg = rx.recv() => match msg {
                    Some(ToCoordinator::Admit(meta, pairs)) => self.admit(*meta, pairs),
                    Some(ToCoordinator::Rebalance(RebalanceNote::Revoked(tps))) => self.drop_revoked(&tps),
                    Some(ToCoordinator::Drain) => draining = true,
                    None => return,
                },
                Some(res) = results.recv() => self.on_result(res),
            }
        }
    }

    /// One span context per event in the batch, for the batch span's links.
    fn links(&self, b: &crate::batch::Batch) -> Vec<opentelemetry::trace::SpanContext> {
        let mut seen = HashSet::new();
        b.pairs
            .iter()
            .filter(|p| seen.insert(p.key.event))
            .filter_map(|p| self.assembler.get(p.key.event))
            .map(|m| m.trace.clone())
            .collect()
    }

    fn admit(&mut self, meta: EventMeta, pairs: Vec<(u32, EncodedPair)>) {
        let now = Instant::now();
        let id = meta.id;
        for (candidate, pair) in pairs {
            self.batcher.push(PendingPair {
                key: PairKey {
                    event: id,
                    index: candidate,
                },
                pair,
                enqueued: now,
            });
        }
        if let Some(done) = self.assembler.insert(meta) {
            self.emit(done);
        }
    }

    fn on_result(&mut self, res: InferResult) {
        let s = &self.stats;
        s.batches.fetch_add(1, Ordering::Relaxed);
        s.real_tokens
            .fetch_add(res.real_tokens as u64, Ordering::Relaxed);
        s.padded_tokens
            .fetch_add((res.rows * res.seq_len) as u64, Ordering::Relaxed);
        s.inference_us
            .fetch_add(res.elapsed.as_micros() as u64, Ordering::Relaxed);
        self.metrics.batch(
            res.rows,
            res.seq_len,
            res.real_tokens,
            res.started,
            res.elapsed,
            &res.enqueued,
        );
        match res.scores {
            Ok(scores) => {
                s.pairs_scored
                    .fetch_add(scores.len() as u64, Ordering::Relaxed);
                self.metrics.pairs_scored.add(scores.len() as u64, &[]);
                for done in self
                    .assembler
                    .record(&res.keys, &scores, res.started, res.elapsed)
                {
                    self.emit(done);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rows = res.rows, seq_len = res.seq_len, "inference failed; dead-lettering the batch's events");
                let ids: HashSet<u64> = res.keys.iter().map(|k| k.event).collect();
                for id in ids {
                    self.batcher.retain(|k| k.event != id);
                    if let Some(meta) = self.assembler.remove(id) {
                        self.dead_letter(meta, &e);
                    }
                }
            }
        }
    }

    fn drop_revoked(&mut self, tps: &[TopicPartition]) {
        let ids: HashSet<u64> = self
            .assembler
            .ids_where(|m| tps.contains(&m.ticket.tp))
            .into_iter()
            .collect();
        if ids.is_empty() {
            return;
        }
        self.batcher.retain(|k| !ids.contains(&k.event));
        let mut pairs = 0;
        for id in &ids {
            if let Some(m) = self.assembler.remove(*id) {
                pairs += m.pairs;
            }
        }
        self.finisher
            .flow
            .inflight_pairs
            .fetch_sub(pairs, Ordering::SeqCst);
        tracing::info!(
            events = ids.len(),
            pairs,
            "dropped queued work of revoked partitions"
        );
    }

    fn emit(&self, done: Completed) {
        if let Some(bad) = done.scores.iter().find(|s| !s.logit.is_finite()) {
            let msg = format!("model returned a non-finite score ({})", bad.logit);
            return self.dead_letter(done.meta, &msg);
        }
        let payload = assemble::render(&done, &self.model, now_ms());
        let pairs = done.meta.pairs;
        let record_ts_ms = done.meta.record_ts_ms;
        let mut m = done.meta;
        telemetry::inject(&m.span, &self.finisher.propagate, &mut m.headers);
        self.finisher.finish(
            OutRecord {
                topic: self.output_topic.clone(),
                key: m.key,
                payload,
                headers: m.headers,
            },
            m.ticket,
            pairs,
            Outcome::Reranked { record_ts_ms },
            m.span,
        );
    }

    fn dead_letter(&self, m: EventMeta, error: &str) {
        let d = DlqInput {
            code: ErrorCode::InferenceFailed,
            message: error,
            topic: &m.ticket.tp.topic,
            partition: m.ticket.tp.partition,
            offset: m.ticket.offset,
            timestamp_ms: m.record_ts_ms,
            key: m.key.as_deref(),
            payload: Some(&m.payload),
        };
        self.finisher.dead_letter(
            &self.dlq_topic,
            &d,
            m.headers.clone(),
            m.ticket.clone(),
            m.pairs,
            m.span.clone(),
        );
    }
}
