//! The admission loop: consumes, decodes, tokenizes and admits events to the coordinator, rejects
//! what cannot be scored as dead letters, pauses its partitions while too many pairs are in flight,
//! seeks back after an aborted transaction, and ends replay ranges.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::coordinator::ToCoordinator;
use super::finish::{Finished, Outcome, Routes, Sink};
use super::inflight::InflightPairs;
use crate::assemble::{CandidateMeta, EventMeta};
use crate::batch::Lane;
use crate::config::{Config, DeadlineAction};
use crate::decode::{self, ErrorCode};
use crate::dlq::DlqInput;
use crate::kafka::consumer::{KafkaConsumer, RebalanceNote};
use crate::kafka::txn::Rewind;
use crate::obs::health::Health;
use crate::obs::recorder::Recorder;
use crate::obs::telemetry;
use crate::offsets::{SharedTracker, Ticket, TopicPartition};
use crate::tokenize::PairTokenizer;

/// One input record, as admission sees it: owned, so a pool thread can decode it while the loop
/// polls on (the payload is copied once, and moves into the event's metadata).
pub struct InRecord {
    pub tp: TopicPartition,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    /// The headers `output.propagate_headers` copies to the output.
    pub headers: Vec<(String, Vec<u8>)>,
    /// W3C trace-context headers, whatever `output.propagate_headers` says.
    pub trace: Vec<(String, Vec<u8>)>,
    /// The value of the `priority.header` header.
    pub priority: Option<Vec<u8>>,
}

impl InRecord {
    pub fn from_message(
        m: &BorrowedMessage<'_>,
        propagate: &[String],
        priority_header: &str,
    ) -> Self {
        let (mut headers, mut trace, mut priority) = (Vec::new(), Vec::new(), None);
        for h in m.headers().iter().flat_map(|hs| hs.iter()) {
            if !priority_header.is_empty() && h.key == priority_header {
                priority = h.value.map(<[u8]>::to_vec);
            }
            if propagate
                .iter()
                .any(|w| w == "*" || w.eq_ignore_ascii_case(h.key))
            {
                headers.push((
                    h.key.to_string(),
                    h.value.map(<[u8]>::to_vec).unwrap_or_default(),
                ));
            }
            let is_trace = h.key.eq_ignore_ascii_case("traceparent")
                || h.key.eq_ignore_ascii_case("tracestate");
            if let (true, Some(v)) = (is_trace, h.value) {
                trace.push((h.key.to_string(), v.to_vec()));
            }
        }
        Self {
            tp: TopicPartition {
                topic: m.topic().to_string(),
                partition: m.partition(),
            },
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis(),
            key: m.key().map(<[u8]>::to_vec),
            payload: m.payload().map(<[u8]>::to_vec),
            headers,
            trace,
            priority,
        }
    }
}

/// Decodes, tokenizes and admits records; knows nothing of the consumer. `register` runs in the
/// loop, in offset order; `prepare` (decode, tokenize, hand over) on any admission thread.
pub struct Admitter<S> {
    pub cfg: Arc<Config>,
    pub tokenizer: Arc<PairTokenizer>,
    pub tracker: SharedTracker,
    pub coord_tx: mpsc::UnboundedSender<ToCoordinator>,
    pub sink: S,
    pub routes: Arc<Routes>,
    pub inflight: Arc<InflightPairs>,
    pub lanes: Arc<PartitionLanes>,
    pub recorder: Arc<Recorder>,
    pub next_id: u64,
}

impl<S: Sink + Clone> Clone for Admitter<S> {
    fn clone(&self) -> Self {
        Self {
            cfg: self.cfg.clone(),
            tokenizer: self.tokenizer.clone(),
            tracker: self.tracker.clone(),
            coord_tx: self.coord_tx.clone(),
            sink: self.sink.clone(),
            routes: self.routes.clone(),
            inflight: self.inflight.clone(),
            lanes: self.lanes.clone(),
            recorder: self.recorder.clone(),
            next_id: self.next_id,
        }
    }
}

/// A registered record: its offset is tracked, its span open, its event id given.
pub struct Registered {
    ticket: Ticket,
    span: tracing::Span,
    id: u64,
}

impl<S: Sink> Admitter<S> {
    /// Admits the record to the coordinator, or dead-letters it. Returns nothing: either way its
    /// offset completes once the output is acknowledged.
    pub fn admit(&mut self, r: InRecord) {
        if let Some(reg) = self.register(&r) {
            self.prepare(r, reg);
        }
    }

    /// Tracks the record's offset; `None` when its partition is not (or no longer) ours.
    pub fn register(&mut self, r: &InRecord) -> Option<Registered> {
        let ticket = self.tracker.lock().register(&r.tp, r.offset)?;
        self.recorder.consumed();
        let span = telemetry::event_span(
            &telemetry::InputRef {
                topic: &r.tp.topic,
                partition: r.tp.partition,
                offset: r.offset,
                group: &self.cfg.kafka.group_id,
                payload_bytes: r.payload.as_ref().map_or(0, Vec::len),
            },
            &r.trace,
        );
        let id = self.next_id;
        self.next_id += 1;
        Some(Registered { ticket, span, id })
    }

    /// Decodes and tokenizes a registered record and hands its pairs to the coordinator, or
    /// dead-letters it.
    pub fn prepare(&self, r: InRecord, reg: Registered) {
        let Registered { ticket, span, id } = reg;
        let _entered = span.enter();
        let rules = self.cfg.input.rules();
        let now_ms = crate::now_ms();
        let decoded = decode::decode_with(
            r.payload.as_deref(),
            &rules,
            &self.cfg.limits,
            r.timestamp_ms,
            now_ms,
        );
        let ev = match (decoded, self.cfg.deadline.action) {
            (Ok(ev), _) => ev,
            (Err(e), action) if e.code == ErrorCode::DeadlineExceeded => {
                self.recorder.deadline_missed(action.as_str());
                match action {
                    DeadlineAction::DeadLetter => {
                        return self.reject(&r, ticket, e.code, &e.message, &span)
                    }
                    DeadlineAction::Drop => return self.drop_expired(ticket, &span),
                    DeadlineAction::ScoreAnyway => match decode::decode_without_expiry(
                        r.payload.as_deref(),
                        &rules,
                        &self.cfg.limits,
                        r.timestamp_ms,
                    ) {
                        Ok(ev) => ev,
                        Err(e) => return self.reject(&r, ticket, e.code, &e.message, &span),
                    },
                }
            }
            (Err(e), _) => return self.reject(&r, ticket, e.code, &e.message, &span),
        };
        let lane = self.cfg.priority.lane(ev.priority, r.priority.as_deref());
        self.lanes.set(&r.tp, lane);
        // On this process's monotonic clock, for the coordinator and the batcher.
        let deadline = ev.deadline_at_ms(r.timestamp_ms).map(|at| {
            let left = u64::try_from(at.saturating_sub(now_ms)).unwrap_or(0);
            Instant::now() + Duration::from_millis(left)
        });
        if !ev.unknown_fields.is_empty() {
            self.recorder.unknown_fields(&ev.unknown_fields);
        }
        span.record("reranker.request_id", ev.request_id.as_str());
        span.record("reranker.candidates", ev.candidates.len() as i64);
        let tokenize_start = Instant::now();
        let mut pairs = Vec::with_capacity(ev.candidates.len());
        let (mut truncated, mut chunked) = (0u32, 0u32);
        // The query once for the whole event, not once per candidate.
        let query = match self.tokenizer.encode_query(&ev.query) {
            Ok(q) => q,
            Err(e) => {
                let msg = format!("query: {e}");
                return self.reject(&r, ticket, ErrorCode::TokenizationFailed, &msg, &span);
            }
        };
        for (i, c) in ev.candidates.iter().enumerate() {
            match self.tokenizer.encode_with(&query, &c.text) {
                Ok(enc) => {
                    truncated += enc.truncated as u32;
                    chunked += enc.chunked as u32;
                    pairs.extend(enc.pairs.into_iter().map(|p| (i as u32, p)));
                }
                Err(e) => {
                    let msg = format!("candidate {:?}: {e}", c.id);
                    return self.reject(&r, ticket, ErrorCode::TokenizationFailed, &msg, &span);
                }
            }
        }
        self.recorder.tokenized(tokenize_start.elapsed());
        span.record("reranker.pairs", pairs.len() as i64);
        let include_text = ev.return_text.unwrap_or(self.cfg.output.include_text);
        let top_n = ev
            .top_n
            .map(|n| n as usize)
            .unwrap_or(self.cfg.output.top_n)
            .min(self.cfg.output.max_top_n);
        let meta = EventMeta {
            id,
            ticket,
            key: r.key,
            headers: r.headers,
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
            min_relevance: ev.min_relevance.or(self.cfg.output.min_relevance),
            received_at: Instant::now(),
            deadline,
            lane,
            record_ts_ms: r.timestamp_ms,
            truncated,
            chunked,
            pairs: pairs.len(),
            payload: r.payload.unwrap_or_default(),
            trace: telemetry::span_context(&span),
            span: span.clone(),
        };
        self.inflight.add(pairs.len());
        let _ = self
            .coord_tx
            .send(ToCoordinator::Admit(Box::new(meta), pairs));
    }

    /// `deadline.action = "drop"`: no output, the offset completes.
    fn drop_expired(&self, ticket: Ticket, span: &tracing::Span) {
        self.sink.finish(Finished {
            rec: None,
            ticket,
            pairs: 0,
            outcome: Outcome::Dropped,
            span: span.clone(),
        });
    }

    fn reject(
        &self,
        r: &InRecord,
        ticket: Ticket,
        code: ErrorCode,
        message: &str,
        span: &tracing::Span,
    ) {
        let d = DlqInput {
            code,
            message,
            topic: &r.tp.topic,
            partition: r.tp.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            key: r.key.as_deref(),
            payload: r.payload.as_deref(),
        };
        let rec = self.routes.dead_letter(&d, r.headers.clone(), span);
        self.sink.finish(Finished {
            rec: Some(rec),
            ticket,
            pairs: 0,
            outcome: Outcome::DeadLetter(code),
            span: span.clone(),
        });
    }
}

/// Decodes and tokenizes on its own threads, at most two events per thread at a time: many events
/// in flight at once, across partitions, while the loop keeps polling (and the coordinator stays
/// the batcher's one owner). Events reach the coordinator in any order; offsets allow that.
pub struct AdmitPool {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    slots: Arc<Semaphore>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

type Job = (InRecord, Registered, OwnedSemaphorePermit);

impl AdmitPool {
    pub fn start<S: Sink + Clone>(admitter: &Admitter<S>, threads: usize) -> std::io::Result<Self> {
        let threads = threads.max(1);
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        // Dead letters are produced from these threads; producing spawns on the runtime.
        let rt = tokio::runtime::Handle::try_current().ok();
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let (a, rx, rt) = (admitter.clone(), rx.clone(), rt.clone());
            let h = std::thread::Builder::new()
                .name(format!("admit-{i}"))
                .spawn(move || {
                    let _rt = rt.as_ref().map(|h| h.enter());
                    loop {
                        // The lock is held only while this thread waits for the next job.
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok((r, reg, _slot)) = job else { return };
                        a.prepare(r, reg);
                    }
                })?;
            handles.push(h);
        }
        Ok(Self {
            jobs: Some(tx),
            slots: Arc::new(Semaphore::new(threads * 2)),
            threads: handles,
        })
    }

    /// Waits until a thread can take one more event.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    pub fn submit(&self, r: InRecord, reg: Registered, slot: OwnedSemaphorePermit) {
        if let Some(tx) = &self.jobs {
            let _ = tx.send((r, reg, slot));
        }
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }
}

impl Drop for AdmitPool {
    /// The threads finish what was handed over (its offsets are tracked and drained), then end.
    fn drop(&mut self) {
        self.jobs.take();
    }
}

/// Pause above `high` pairs in flight, resume at or below `low`.
#[derive(Debug, Clone, Copy)]
pub struct Backpressure {
    pub high: usize,
    pub low: usize,
    pub paused: bool,
}

impl Backpressure {
    pub fn new(cfg: &Config) -> Self {
        Self::at(cfg.flow.max_inflight_pairs, cfg.flow.resume_ratio)
    }

    /// Pause at `high` (at least 1), resume at `resume_ratio` of it.
    pub fn at(high: usize, resume_ratio: f64) -> Self {
        let high = high.max(1);
        Self {
            high,
            low: ((high as f64) * resume_ratio) as usize,
            paused: false,
        }
    }

    /// The pause state to switch to, if it changes.
    pub fn decide(&self, inflight: usize) -> Option<bool> {
        match self.paused {
            false if inflight >= self.high => Some(true),
            true if inflight <= self.low => Some(false),
            _ => None,
        }
    }
}

/// Lane-aware backpressure: two thresholds on the pairs in flight. Partitions whose latest event
/// was bulk pause first, at `(1 - flow.interactive_reserve_ratio) × max_inflight_pairs`; every
/// partition pauses at `max_inflight_pairs`. Kafka cannot fetch one lane of a partition and leave
/// the other, so lanes separate only where they have partitions of their own; a partition with no
/// event yet counts as interactive until one arrives (the overrun is bounded by the reserve).
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub all: Backpressure,
    pub bulk: Backpressure,
}

impl Flow {
    pub fn new(cfg: &Config) -> Self {
        let all = Backpressure::new(cfg);
        let high = ((all.high as f64) * (1.0 - cfg.flow.interactive_reserve_ratio)) as usize;
        let bulk = Backpressure::at(high, cfg.flow.resume_ratio);
        Self { all, bulk }
    }

    /// Moves either threshold's state; whether one changed.
    pub fn update(&mut self, inflight: usize) -> bool {
        let mut changed = false;
        for bp in [&mut self.all, &mut self.bulk] {
            if let Some(pause) = bp.decide(inflight) {
                bp.paused = pause;
                changed = true;
            }
        }
        changed
    }

    /// Whether a partition whose latest event was in `lane` (`None`: none yet) is paused now.
    pub fn pauses(&self, lane: Option<Lane>) -> bool {
        self.all.paused || (self.bulk.paused && lane == Some(Lane::Bulk))
    }
}

/// The lane of each partition's latest event, written by the admission threads as they decode.
#[derive(Debug, Default)]
pub struct PartitionLanes {
    lanes: std::sync::Mutex<HashMap<TopicPartition, Lane>>,
    /// Bumped when a partition changes lane: the loop re-decides its pauses only then.
    version: AtomicU64,
}

impl PartitionLanes {
    pub fn set(&self, tp: &TopicPartition, lane: Lane) {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if lanes.get(tp) != Some(&lane) {
            lanes.insert(tp.clone(), lane);
            self.version.fetch_add(1, Ordering::SeqCst);
        }
    }

    pub fn get(&self, tp: &TopicPartition) -> Option<Lane> {
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        lanes.get(tp).copied()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::SeqCst)
    }
}

/// End offsets of a replay's partitions; empty for the consumer group.
#[derive(Debug, Default)]
pub struct Ranges {
    /// End offset (exclusive) per partition.
    ends: HashMap<TopicPartition, i64>,
    /// Partitions not yet at their end.
    open: HashSet<TopicPartition>,
}

/// What to do with a record of a range partition.
#[derive(Debug, PartialEq, Eq)]
pub enum AtRange {
    /// Admit it.
    Admit,
    /// Admit it, and it is the partition's last.
    AdmitLast,
    /// Past the end: drop it and close the partition.
    Past,
}

impl Ranges {
    pub fn new(ends: HashMap<TopicPartition, i64>) -> Self {
        let open = ends.keys().cloned().collect();
        Self { ends, open }
    }

    pub fn at(&self, tp: &TopicPartition, offset: i64) -> AtRange {
        match self.ends.get(tp) {
            Some(&end) if offset >= end => AtRange::Past,
            Some(&end) if offset + 1 >= end => AtRange::AdmitLast,
            _ => AtRange::Admit,
        }
    }

    /// Marks the partition done; whether it was open.
    pub fn close(&mut self, tp: &TopicPartition) -> bool {
        self.open.remove(tp)
    }

    /// A range partition that reached its end: paused for good.
    pub fn is_closed(&self, tp: &TopicPartition) -> bool {
        self.ends.contains_key(tp) && !self.open.contains(tp)
    }

    /// A replay whose every partition reached its end.
    pub fn all_done(&self) -> bool {
        !self.ends.is_empty() && self.open.is_empty()
    }
}

/// Why the admission loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Shutdown,
    /// Every range partition reached its end offset.
    RangesDone,
    /// The producer that writes the outputs cannot go on.
    Fatal,
    /// A partition stalled and the run was asked to stop on stalls.
    Stalled,
}

pub struct AdmitLoop<S> {
    pub admitter: Admitter<S>,
    pub pool: AdmitPool,
    pub consumer: Arc<KafkaConsumer>,
    pub health: Arc<Health>,
    /// Bumped by the rebalance callback on every assignment.
    pub assignments: Arc<AtomicU64>,
    pub ranges: Ranges,
    pub rewinds: mpsc::UnboundedReceiver<Rewind>,
    pub fatal: Arc<AtomicBool>,
    pub stop_on_stall: bool,
}

impl<S: Sink> AdmitLoop<S> {
    pub async fn run(mut self, shutdown: &mut watch::Receiver<bool>) -> Exit {
        let exit = self.consume(shutdown).await;
        // Replays end here; the group keeps its partitions until the consumer is dropped.
        if exit == Exit::RangesDone {
            tracing::info!(
                events = self.admitter.recorder.snapshot().events_in,
                "every partition reached its end offset"
            );
        }
        exit
    }

    async fn consume(&mut self, shutdown: &mut watch::Receiver<bool>) -> Exit {
        if self.ranges.all_done() {
            return Exit::RangesDone;
        }
        let mut flow = Flow::new(&self.admitter.cfg);
        let mut paused = HashSet::new();
        let mut seen_epoch = 0u64;
        let mut seen_lanes = 0u64;
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
            if self.stop_on_stall && !self.health.stalled().is_empty() {
                return Exit::Stalled;
            }
            if self.ranges.all_done() {
                return Exit::RangesDone;
            }
            // A free admission thread first: the backlog waits in the consumer, not in a queue.
            let slot = tokio::select! {
                biased;
                _ = shutdown.changed() => return Exit::Shutdown,
                s = self.pool.slot() => match s {
                    Some(s) => s,
                    None => return Exit::Shutdown,
                },
            };
            tokio::select! {
                biased;
                _ = shutdown.changed() => return Exit::Shutdown,
                Some(r) = self.rewinds.recv() => self.rewind(r),
                _ = tick.tick(), if !paused.is_empty() => {}
                _ = fatal_tick.tick() => {}
                msg = consumer.recv() => match msg {
                    Ok(m) => self.handle(&m, slot),
                    Err(rdkafka::error::KafkaError::PartitionEOF(p)) => self.close_range(p),
                    Err(e) => {
                        tracing::warn!(error = %e, "consume error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
            // librdkafka keeps an application pause on a partition through revoke and re-assign,
            // and a resume only reaches the partitions owned at that moment: a partition paused,
            // revoked and given back later would stay paused forever. So every new assignment
            // gets every partition's pause state stated.
            let epoch = self.assignments.load(Ordering::SeqCst);
            let restate = epoch != seen_epoch;
            seen_epoch = epoch;
            let inflight = self.admitter.inflight.get();
            let mut decide = flow.update(inflight) || restate;
            if flow.bulk.paused && !flow.all.paused {
                let v = self.admitter.lanes.version();
                decide |= v != seen_lanes;
                seen_lanes = v;
            }
            if decide {
                if let Err(e) = self.apply_pauses(&flow, &mut paused, restate, inflight) {
                    tracing::warn!(error = %e, "cannot set the pause state of the partitions");
                }
            }
        }
    }

    fn handle(&mut self, m: &BorrowedMessage<'_>, slot: OwnedSemaphorePermit) {
        let cfg = &self.admitter.cfg;
        let r = InRecord::from_message(m, &cfg.output.propagate_headers, &cfg.priority.header);
        match self.ranges.at(&r.tp, r.offset) {
            AtRange::Past => return self.close_range(r.tp.partition),
            AtRange::AdmitLast => self.close_range(r.tp.partition),
            AtRange::Admit => {}
        }
        // Registered here, in offset order, so revokes and rewinds see every ticket handed over.
        if let Some(reg) = self.admitter.register(&r) {
            self.pool.submit(r, reg, slot);
        }
    }

    /// After an aborted transaction: seek every rewound partition back to its last committed
    /// offset and drop the queued work the abort abandoned.
    fn rewind(&mut self, Rewind(points): Rewind) {
        let tps: Vec<TopicPartition> = points.iter().map(|(tp, _)| tp.clone()).collect();
        let _ = self
            .admitter
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
                    self.admitter.tracker.lock().rewound(&tp);
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
            topic: self.admitter.cfg.kafka.input_topic.clone(),
            partition,
        };
        if self.ranges.close(&tp) {
            tracing::debug!(partition, "range done");
        }
        self.health.set_partition_done(tp.clone());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.topic, tp.partition);
        let _ = self.consumer.pause(&tpl);
    }

    /// Pauses what `flow` says should be paused and resumes the rest of the assignment (all of
    /// it when `restate`, else only what this loop had paused); logs and counts the changes.
    fn apply_pauses(
        &self,
        flow: &Flow,
        paused: &mut HashSet<TopicPartition>,
        restate: bool,
        inflight: usize,
    ) -> rdkafka::error::KafkaResult<()> {
        let assignment = self.consumer.assignment()?;
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        let mut now = HashSet::new();
        let (mut newly, mut freed) = (0, 0);
        for el in assignment.elements() {
            let tp = TopicPartition {
                topic: el.topic().to_string(),
                partition: el.partition(),
            };
            if self.ranges.is_closed(&tp) {
                continue;
            }
            let was = paused.contains(&tp);
            if flow.pauses(self.admitter.lanes.get(&tp)) {
                if restate || !was {
                    pause.add_partition(el.topic(), el.partition());
                }
                newly += usize::from(!was);
                now.insert(tp);
            } else {
                if restate || was {
                    resume.add_partition(el.topic(), el.partition());
                }
                freed += usize::from(was);
            }
        }
        if pause.count() > 0 {
            self.consumer.pause(&pause)?;
        }
        if resume.count() > 0 {
            self.consumer.resume(&resume)?;
        }
        let lanes = if flow.all.paused { "all" } else { "bulk" };
        if newly > 0 {
            if paused.is_empty() {
                self.admitter.recorder.paused(true);
            }
            tracing::info!(
                inflight_pairs = inflight,
                partitions = now.len(),
                assigned = assignment.count(),
                lanes,
                "backpressure: partitions paused"
            );
        }
        if freed > 0 {
            if now.is_empty() {
                self.admitter.recorder.paused(false);
            }
            tracing::info!(
                inflight_pairs = inflight,
                partitions = now.len(),
                resumed = freed,
                "backpressure: partitions resumed"
            );
        }
        self.health.set_paused(now.clone());
        *paused = now;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::testing::{self, Collect};

    #[test]
    fn backpressure_pauses_at_high_and_resumes_at_low() {
        let mut bp = Backpressure {
            high: 100,
            low: 50,
            paused: false,
        };
        assert_eq!(bp.decide(99), None);
        assert_eq!(bp.decide(100), Some(true));
        bp.paused = true;
        assert_eq!(bp.decide(100), None);
        assert_eq!(bp.decide(51), None);
        assert_eq!(bp.decide(50), Some(false));
    }

    #[test]
    fn bulk_partitions_pause_first_and_the_reserve_keeps_the_rest_fetching() {
        let mut cfg = Config::default();
        cfg.flow.max_inflight_pairs = 1000;
        cfg.flow.resume_ratio = 0.5;
        cfg.flow.interactive_reserve_ratio = 0.25;
        let mut f = Flow::new(&cfg);
        let (bulk, interactive, fresh) = (Some(Lane::Bulk), Some(Lane::Interactive), None);
        assert!(!f.update(749));
        assert!(![bulk, interactive, fresh].into_iter().any(|l| f.pauses(l)));
        assert!(f.update(750), "bulk threshold: 3/4 of the bound");
        assert!(f.pauses(bulk));
        assert!(!f.pauses(interactive) && !f.pauses(fresh));
        assert!(f.update(1000));
        assert!([bulk, interactive, fresh].into_iter().all(|l| f.pauses(l)));
        assert!(f.update(500), "every partition resumes at half the bound");
        assert!(f.pauses(bulk) && !f.pauses(interactive));
        assert!(!f.update(376));
        assert!(f.update(375), "bulk resumes at half its own threshold");
        assert!(!f.pauses(bulk));

        cfg.flow.interactive_reserve_ratio = 0.0;
        let mut f = Flow::new(&cfg);
        assert!(f.update(1000));
        assert!(f.pauses(interactive), "no reserve: every partition at once");
    }

    #[test]
    fn a_partition_changes_lane_with_its_latest_event() {
        let lanes = PartitionLanes::default();
        let tp = TopicPartition {
            topic: "in".into(),
            partition: 3,
        };
        assert_eq!(lanes.get(&tp), None);
        lanes.set(&tp, Lane::Bulk);
        let v = lanes.version();
        lanes.set(&tp, Lane::Bulk);
        assert_eq!(lanes.version(), v, "the same lane again is no change");
        lanes.set(&tp, Lane::Interactive);
        assert_eq!(lanes.get(&tp), Some(Lane::Interactive));
        assert!(lanes.version() > v);
    }

    #[test]
    fn ranges_admit_up_to_their_end_and_close_there() {
        let tp = |partition| TopicPartition {
            topic: "in".into(),
            partition,
        };
        let mut r = Ranges::new(HashMap::from([(tp(0), 10), (tp(1), 5)]));
        assert_eq!(r.at(&tp(0), 8), AtRange::Admit);
        assert_eq!(r.at(&tp(0), 9), AtRange::AdmitLast);
        assert_eq!(r.at(&tp(0), 10), AtRange::Past);
        assert_eq!(r.at(&tp(2), 99), AtRange::Admit);
        assert!(!r.is_closed(&tp(0)));
        assert!(r.close(&tp(0)));
        assert!(!r.close(&tp(0)));
        assert!(r.is_closed(&tp(0)) && !r.is_closed(&tp(2)));
        assert!(!r.all_done());
        r.close(&tp(1));
        assert!(r.all_done());
        assert!(
            !Ranges::default().all_done(),
            "the group never ends by itself"
        );
    }

    /// The real tokenizer (`RERANKER_MODEL__DIR`, else ../shared/models); `None` skips the test.
    fn tokenizer() -> Option<PairTokenizer> {
        let dir = std::env::var_os("RERANKER_MODEL__DIR")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../shared/models/minilm-l6-ce")
            });
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            eprintln!("skipped: no tokenizer at {}", path.display());
            return None;
        }
        Some(PairTokenizer::from_file(&path, 128).unwrap())
    }

    fn admitter(
        tok: PairTokenizer,
    ) -> (
        Admitter<Collect>,
        mpsc::UnboundedReceiver<ToCoordinator>,
        Collect,
    ) {
        admitter_with(tok, Config::default())
    }

    fn admitter_with(
        tok: PairTokenizer,
        cfg: Config,
    ) -> (
        Admitter<Collect>,
        mpsc::UnboundedReceiver<ToCoordinator>,
        Collect,
    ) {
        let (coord_tx, coord_rx) = mpsc::unbounded_channel();
        let sink = Collect::default();
        let tracker = SharedTracker::default();
        tracker.lock().assign(TopicPartition {
            topic: "in".into(),
            partition: 0,
        });
        let a = Admitter {
            cfg: Arc::new(cfg),
            tokenizer: Arc::new(tok),
            tracker,
            coord_tx,
            sink: sink.clone(),
            routes: testing::routes(),
            inflight: Arc::new(InflightPairs::default()),
            lanes: Default::default(),
            recorder: testing::recorder(),
            next_id: 0,
        };
        (a, coord_rx, sink)
    }

    fn record(partition: i32, offset: i64, payload: &[u8]) -> InRecord {
        InRecord {
            tp: TopicPartition {
                topic: "in".into(),
                partition,
            },
            offset,
            timestamp_ms: None,
            key: Some(b"k".to_vec()),
            payload: Some(payload.to_vec()),
            headers: Vec::new(),
            trace: Vec::new(),
            priority: None,
        }
    }

    #[test]
    fn admits_valid_events_rejects_bad_ones_and_skips_revoked_partitions() {
        let Some(tok) = tokenizer() else { return };
        let (mut a, mut coord_rx, sink) = admitter(tok);
        let good = br#"{"schema_version":1,"request_id":"r1","query":"what is rust","candidates":[{"id":"a","text":"a language"},{"id":"b","text":"a fungus"}]}"#;
        a.admit(record(0, 0, good));
        match coord_rx.try_recv() {
            Ok(ToCoordinator::Admit(meta, pairs)) => {
                assert_eq!((meta.request_id.as_str(), pairs.len()), ("r1", 2));
                assert_eq!(meta.ticket.offset, 0);
            }
            _ => panic!("the valid event was not admitted"),
        }
        assert_eq!(a.inflight.get(), 2);

        a.admit(record(0, 1, b"{not json"));
        assert!(coord_rx.try_recv().is_err(), "a bad event is not admitted");
        {
            let done = sink.0.lock().unwrap();
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].rec.as_ref().map(|r| r.topic.as_str()), Some("dlq"));
            assert_eq!(done[0].outcome, Outcome::DeadLetter(ErrorCode::InvalidJson));
            assert_eq!(done[0].pairs, 0);
        }

        // Partition 1 is not (or no longer) assigned: its record belongs to another owner.
        a.admit(record(1, 0, good));
        assert!(coord_rx.try_recv().is_err());
        assert_eq!(sink.0.lock().unwrap().len(), 1);
        assert_eq!(a.recorder.snapshot().events_in, 2);
    }

    /// The per-event options reach the event's metadata: `return_text` over `output.include_text`,
    /// the event's `min_relevance` over `output.min_relevance`, and the templated text is what is
    /// kept (and tokenized).
    #[test]
    fn per_event_options_override_the_config() {
        let Some(tok) = tokenizer() else { return };
        let mut cfg = Config::default();
        cfg.output.include_text = true;
        cfg.output.min_relevance = Some(0.2);
        cfg.input.text_template =
            Some(crate::template::Template::parse("{title}: {text}").unwrap());
        let (mut a, mut coord_rx, sink) = admitter_with(tok, cfg);
        let mut next = |offset: i64, payload: &[u8]| {
            a.admit(record(0, offset, payload));
            match coord_rx.try_recv() {
                Ok(ToCoordinator::Admit(meta, _)) => meta,
                _ => panic!("not admitted: {}", String::from_utf8_lossy(payload)),
            }
        };
        let m = next(0, br#"{"schema_version":"1.1","request_id":"r","query":"q","x":1,"candidates":[{"id":"a","title":"T","text":"t"}]}"#);
        assert_eq!(m.candidates[0].text.as_deref(), Some("T: t"));
        assert_eq!(m.min_relevance, Some(0.2));
        let m = next(1, br#"{"schema_version":1,"request_id":"r","query":"q","return_text":false,"min_relevance":0.9,"candidates":[{"id":"a","text":"t"}]}"#);
        assert_eq!(m.candidates[0].text, None);
        assert_eq!(m.min_relevance, Some(0.9));
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
