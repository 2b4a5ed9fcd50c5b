//! Exactly-once egress: one transactional producer on its own thread (every transactional call
//! blocks), committing outputs, dead letters and input offsets together once per commit interval.
//!
//! Events finish out of order, but a transaction may only hold the outputs of a contiguous prefix
//! of each partition: an output beyond the committed offset would be produced again after a crash.
//! So finished events wait here until every earlier offset of their partition has finished, and
//! are released into the open transaction in offset order; the transaction's offsets are the
//! points reached by what was released.
//!
//! On an abortable error the transaction is aborted and every owned partition is rewound to its
//! last committed offset (the ingress seeks; queued work is dropped), so aborted work is redone.
//! A fatal error (fenced by a newer instance with the same `transactional.id`) stops the worker.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::kafka::producer::{producer_config, OutRecord};
use crate::offsets::{SharedTracker, Ticket, TopicPartition};

/// What became of a finished event handed to the transaction thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Release {
    /// Its record went into the open transaction.
    Released,
    /// Stale after a revoke or rewind, or the thread stopped: the work is redone or belongs
    /// elsewhere.
    Discarded,
}

/// Called once per finished event.
pub type Done = Box<dyn FnOnce(Release) + Send>;

/// The consumer's group metadata, read at each commit (it changes with every rebalance).
pub type GroupMetadata = Box<dyn Fn() -> Option<ConsumerGroupMetadata> + Send>;

enum TxnMsg {
    Finished {
        /// `None`: nothing to publish (a dropped event); its offset is still released.
        rec: Option<OutRecord>,
        ticket: Ticket,
        done: Done,
    },
    /// Commit the open transaction now (revoke); answers whether it committed.
    CommitNow(std_mpsc::Sender<bool>),
    /// Commit and stop (shutdown, after the drain); answers whether it committed.
    Close(std_mpsc::Sender<bool>),
}

/// The one way to talk to the transaction thread; cheap to clone.
#[derive(Clone)]
pub struct TxnHandle(std_mpsc::Sender<TxnMsg>);

impl TxnHandle {
    /// Hands over a finished event; `done` is called when it is released or discarded.
    pub fn finished(&self, rec: Option<OutRecord>, ticket: Ticket, done: Done) {
        if let Err(std_mpsc::SendError(TxnMsg::Finished { done, .. })) =
            self.0.send(TxnMsg::Finished { rec, ticket, done })
        {
            // The thread stopped (fatal error): the work is redone by whoever owns the
            // partition next.
            done(Release::Discarded);
        }
    }

    /// Commits the open transaction now (before partitions move); blocks. Whether it committed.
    pub fn commit_now(&self, timeout: Duration) -> bool {
        self.ask(TxnMsg::CommitNow, timeout)
    }

    /// Commits and stops the thread (shutdown, after the drain); blocks. Whether it committed.
    pub fn close(&self, timeout: Duration) -> bool {
        self.ask(TxnMsg::Close, timeout)
    }

    fn ask(&self, msg: fn(std_mpsc::Sender<bool>) -> TxnMsg, timeout: Duration) -> bool {
        let (ack_tx, ack_rx) = std_mpsc::channel();
        self.0.send(msg(ack_tx)).is_ok() && ack_rx.recv_timeout(timeout).unwrap_or(false)
    }
}

/// Asks the ingress to seek partitions back after an abort; it answers by clearing each
/// partition's rewinding mark in the tracker.
#[derive(Debug)]
pub struct Rewind(pub Vec<(TopicPartition, i64)>);

const TXN_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TxnEgress {
    pub handle: TxnHandle,
    pub thread: std::thread::JoinHandle<()>,
    /// Set when the producer was fenced or hit a fatal error: the worker must stop.
    pub fatal: Arc<AtomicBool>,
}

struct Pending {
    rec: Option<OutRecord>,
    ticket: Ticket,
    done: Done,
}

struct TxnThread {
    producer: ThreadedProducer<DefaultProducerContext>,
    group: GroupMetadata,
    tracker: SharedTracker,
    rewind: mpsc::UnboundedSender<Rewind>,
    fatal: Arc<AtomicBool>,
    interval: Duration,
    /// Finished events waiting for earlier offsets of their partition.
    held: HashMap<TopicPartition, BTreeMap<i64, Pending>>,
    /// Commit points reached by the records in the open transaction.
    offsets: HashMap<TopicPartition, i64>,
    /// Records produced into the open transaction.
    produced: usize,
}

/// A handle for the consumer's rebalance callback, which must exist before the consumer does and
/// so before [`start`]; `start` serves it.
pub fn channel() -> (TxnHandle, TxnReceiver) {
    let (tx, rx) = std_mpsc::channel();
    (TxnHandle(tx), TxnReceiver(rx))
}

/// The thread's end of [`channel`].
pub struct TxnReceiver(std_mpsc::Receiver<TxnMsg>);

/// Creates the transactional producer and fences older incarnations (`init_transactions`). Blocks:
/// call off the async runtime.
pub fn start(
    cfg: &Config,
    group: GroupMetadata,
    tracker: SharedTracker,
    rewind: mpsc::UnboundedSender<Rewind>,
    (handle, TxnReceiver(rx)): (TxnHandle, TxnReceiver),
) -> anyhow::Result<TxnEgress> {
    let id = cfg.transactional_id();
    let producer: ThreadedProducer<DefaultProducerContext> = producer_config(&cfg.kafka)
        .set("transactional.id", &id)
        .create()
        .context("cannot create the transactional producer")?;
    producer
        .init_transactions(TXN_TIMEOUT)
        .with_context(|| format!("init_transactions (transactional.id {id})"))?;
    producer.begin_transaction().context("begin_transaction")?;
    tracing::info!(transactional_id = %id, "transactional producer ready");
    let fatal = Arc::new(AtomicBool::new(false));
    let mut t = TxnThread {
        producer,
        group,
        tracker,
        rewind,
        fatal: fatal.clone(),
        interval: Duration::from_millis(cfg.processing.commit_interval_ms),
        held: HashMap::new(),
        offsets: HashMap::new(),
        produced: 0,
    };
    let thread = std::thread::Builder::new()
        .name("reranker-txn".into())
        .spawn(move || t.run(rx))
        .context("cannot start the transaction thread")?;
    Ok(TxnEgress {
        handle,
        thread,
        fatal,
    })
}

impl TxnThread {
    fn run(&mut self, rx: std_mpsc::Receiver<TxnMsg>) {
        let mut next_commit = Instant::now() + self.interval;
        loop {
            if self.fatal.load(Ordering::SeqCst) {
                // Drain callers so that nobody waits on a dead thread.
                for msg in rx.iter() {
                    match msg {
                        TxnMsg::Finished { done, .. } => done(Release::Discarded),
                        TxnMsg::CommitNow(ack) | TxnMsg::Close(ack) => {
                            let _ = ack.send(false);
                        }
                    }
                }
                return;
            }
            let wait = next_commit.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(TxnMsg::Finished { rec, ticket, done }) => {
                    self.finished(rec, ticket, done);
                    // A steady stream of completions must not postpone the commit.
                    if Instant::now() >= next_commit {
                        self.commit();
                        next_commit = Instant::now() + self.interval;
                    }
                }
                Ok(TxnMsg::CommitNow(ack)) => {
                    let ok = self.commit();
                    let _ = ack.send(ok);
                    next_commit = Instant::now() + self.interval;
                }
                Ok(TxnMsg::Close(ack)) => {
                    let ok = self.commit();
                    self.discard_held();
                    let _ = ack.send(ok);
                    return;
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    self.commit();
                    next_commit = Instant::now() + self.interval;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => {
                    if !self.commit() {
                        tracing::warn!("final transaction did not commit; its events are re-processed from the last commit");
                    }
                    self.discard_held();
                    return;
                }
            }
        }
    }

    fn finished(&mut self, rec: Option<OutRecord>, ticket: Ticket, done: Done) {
        let point = {
            let mut t = self.tracker.lock();
            if !t.is_current(&ticket) {
                drop(t);
                return done(Release::Discarded);
            }
            t.complete(&ticket)
        };
        let tp = ticket.tp.clone();
        let held = self.held.entry(tp.clone()).or_default();
        held.insert(ticket.offset, Pending { rec, ticket, done });
        let Some(point) = point else { return };
        // Everything below the new point is finished: release it in offset order.
        let rest = held.split_off(&point);
        let ready = std::mem::replace(held, rest);
        for (_, p) in ready {
            if let Some(rec) = &p.rec {
                self.produce(rec);
            }
            (p.done)(Release::Released);
        }
        self.offsets.insert(tp, point);
    }

    fn produce(&mut self, rec: &OutRecord) {
        let mut r = BaseRecord::<[u8], [u8]>::to(&rec.topic)
            .payload(&rec.payload)
            .headers(rec.kafka_headers());
        if let Some(k) = &rec.key {
            r = r.key(k);
        }
        loop {
            match self.producer.send(r) {
                Ok(()) => break,
                Err((
                    KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    r = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    // The transaction is in an error state now; commit fails and aborts it, and
                    // the rewind redoes this record.
                    tracing::warn!(topic = %rec.topic, error = %e, "produce into the transaction failed");
                    break;
                }
            }
        }
        self.produced += 1;
    }

    /// Commits the open transaction (or aborts and rewinds it) and begins the next one. Returns
    /// whether everything produced so far is committed.
    fn commit(&mut self) -> bool {
        self.prune_stale();
        if self.produced == 0 && self.offsets.is_empty() {
            return true;
        }
        let t0 = Instant::now();
        match self.try_commit() {
            Ok(()) => {
                {
                    let mut t = self.tracker.lock();
                    for (tp, p) in &self.offsets {
                        t.committed(tp, *p);
                    }
                }
                tracing::debug!(
                    records = self.produced,
                    partitions = self.offsets.len(),
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    "transaction committed"
                );
                self.offsets.clear();
                self.produced = 0;
                self.begin();
                true
            }
            Err(e) => {
                self.abort(&e);
                false
            }
        }
    }

    fn try_commit(&mut self) -> Result<(), KafkaError> {
        if !self.offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (tp, p) in &self.offsets {
                tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*p))?;
            }
            let meta = (self.group)().ok_or(KafkaError::NoMessageReceived)?;
            retry(|| {
                self.producer
                    .send_offsets_to_transaction(&tpl, &meta, TXN_TIMEOUT)
            })?;
        }
        retry(|| self.producer.commit_transaction(TXN_TIMEOUT))
    }

    fn abort(&mut self, e: &KafkaError) {
        if is_fatal(e) {
            tracing::error!(error = %e, "transactional producer fenced or failed fatally; stopping (a newer instance owns this transactional.id, or the broker refused it)");
            self.fatal.store(true, Ordering::SeqCst);
            self.discard_held();
            return;
        }
        tracing::warn!(error = %e, records = self.produced, "transaction failed; aborting it and re-processing from the last commit");
        if let Err(e) = self.producer.abort_transaction(TXN_TIMEOUT) {
            tracing::error!(error = %e, "abort_transaction failed; stopping");
            self.fatal.store(true, Ordering::SeqCst);
            self.discard_held();
            return;
        }
        // Fence the abandoned work first (its completions now count for nothing), then have the
        // ingress seek back; the coordinator drops its queued events on the same note.
        let points = self.tracker.lock().rewind_all();
        self.discard_held();
        self.offsets.clear();
        self.produced = 0;
        tracing::info!(partitions = ?points.iter().map(|(tp, p)| (tp.partition, *p)).collect::<Vec<_>>(), "transaction aborted; rewinding");
        let _ = self.rewind.send(Rewind(points));
        self.begin();
    }

    fn begin(&mut self) {
        if let Err(e) = self.producer.begin_transaction() {
            tracing::error!(error = %e, "begin_transaction failed; stopping");
            self.fatal.store(true, Ordering::SeqCst);
        }
    }

    /// Held events of partitions that were revoked or rewound will never be released here.
    fn prune_stale(&mut self) {
        let t = self.tracker.lock();
        let mut stale = Vec::new();
        for held in self.held.values_mut() {
            let keys: Vec<i64> = held
                .iter()
                .filter(|(_, p)| !t.is_current(&p.ticket))
                .map(|(k, _)| *k)
                .collect();
            for k in keys {
                if let Some(p) = held.remove(&k) {
                    stale.push(p);
                }
            }
        }
        drop(t);
        self.held.retain(|_, h| !h.is_empty());
        for p in stale {
            (p.done)(Release::Discarded);
        }
    }

    fn discard_held(&mut self) {
        for (_, held) in self.held.drain() {
            for (_, p) in held {
                (p.done)(Release::Discarded);
            }
        }
    }
}

fn is_fatal(e: &KafkaError) -> bool {
    match e {
        KafkaError::Transaction(t) => t.is_fatal(),
        _ => false,
    }
}

/// Retries a transactional call while librdkafka says the same call may simply be repeated.
fn retry(mut f: impl FnMut() -> Result<(), KafkaError>) -> Result<(), KafkaError> {
    let mut backoff = Duration::from_millis(50);
    for _ in 0..10 {
        match f() {
            Err(KafkaError::Transaction(e)) if e.is_retriable() && !e.txn_requires_abort() => {
                tracing::debug!(error = %e, "retriable transactional error; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
    f()
}
