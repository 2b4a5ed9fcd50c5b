//! The coordinator task owns the batcher and the assembler, so the hot path takes no locks: it
//! admits events' pairs, closes batches when the model can take one, routes results back to their
//! events, drops the work of partitions that moved away, and flushes everything on drain.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::finish::{Finished, Outcome, Routes, Sink};
use super::inflight::InflightPairs;
use crate::assemble::{self, Assembler, Completed, EventMeta, ModelRef};
use crate::batch::{Batch, Batcher, PairKey, PendingPair};
use crate::config::{DeadlineAction, Label};
use crate::decode::ErrorCode;
use crate::dlq::DlqInput;
use crate::kafka::consumer::RebalanceNote;
use crate::model::{InferError, InferRequest, InferResult, Score};
use crate::obs::metrics::BatchRun;
use crate::obs::recorder::Recorder;
use crate::offsets::{SharedTracker, TopicPartition};
use crate::tokenize::EncodedPair;

/// Messages to the coordinator, on one channel so a revoke is seen after the admissions before it.
pub enum ToCoordinator {
    Admit(Box<EventMeta>, Vec<(u32, EncodedPair)>),
    Rebalance(RebalanceNote),
    Drain,
}

pub struct Coordinator<S> {
    pub batcher: Batcher,
    pub assembler: Assembler,
    pub sink: S,
    pub routes: Arc<Routes>,
    pub model: ModelRef,
    /// `output.labels`, written into each result.
    pub labels: Vec<Label>,
    pub pad_id: u32,
    pub recorder: Arc<Recorder>,
    pub inflight: Arc<InflightPairs>,
    /// Admission threads hand events over in any order, so an event registered before a revoke or
    /// rewind can arrive after the coordinator dropped that partition's work: checked on arrival.
    /// `None` where nothing is revoked (host-only bench, unit tests).
    pub tracker: Option<SharedTracker>,
    /// True when nothing waits in the batcher or assembler (read by the shutdown drain).
    pub idle: Arc<AtomicBool>,
    /// `batch.max_batch_tokens`, restored after an out-of-memory cooldown.
    pub max_tokens: usize,
    /// The smallest budget an out-of-memory failure may shrink it to (`model.max_length`).
    pub min_tokens: usize,
    /// `inference.oom_cooldown_ms`.
    pub budget_cooldown: Duration,
    pub budget_restore_at: Option<Instant>,
    /// `deadline.action`: what an event whose deadline passes while it waits becomes.
    pub deadline_action: DeadlineAction,
    /// Deadlines of waiting events, earliest first (entries of events already gone are skipped).
    pub deadlines: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64)>>,
}

/// What a coordinator is wired to; the rest of its state comes from the configuration.
pub struct Wiring<S> {
    pub sink: S,
    pub routes: Arc<Routes>,
    pub model: ModelRef,
    pub pad_id: u32,
    pub recorder: Arc<Recorder>,
    pub inflight: Arc<InflightPairs>,
    pub tracker: Option<SharedTracker>,
    pub idle: Arc<AtomicBool>,
}

impl<S: Sink> Coordinator<S> {
    pub fn new(cfg: &crate::config::Config, w: Wiring<S>) -> Self {
        Self {
            batcher: Batcher::new(crate::batch::BatchPolicy::from_config(cfg)),
            assembler: Assembler::new(),
            sink: w.sink,
            routes: w.routes,
            model: w.model,
            labels: cfg.output.labels.clone(),
            pad_id: w.pad_id,
            recorder: w.recorder,
            inflight: w.inflight,
            tracker: w.tracker,
            idle: w.idle,
            max_tokens: cfg.batch.max_batch_tokens,
            min_tokens: cfg.model.max_length,
            budget_cooldown: Duration::from_millis(cfg.inference.oom_cooldown_ms),
            budget_restore_at: None,
            deadline_action: cfg.deadline.action,
            deadlines: Default::default(),
        }
    }

    pub async fn run(
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
                self.restore_budget(Instant::now());
                let batch = if draining {
                    self.batcher.flush()
                } else {
                    self.batcher.poll(Instant::now())
                };
                // The permit is taken only with a batch: dropping it when no close condition
                // holds would re-reserve the slot at once, and the loop would spin until one did.
                if let Some(b) = batch {
                    if let Some(p) = permit.take() {
                        let links = self.links(&b);
                        p.send(InferRequest::from_batch(b, self.pad_id, links));
                    }
                }
            }
            self.idle.store(
                self.batcher.is_empty() && self.assembler.is_empty(),
                Ordering::SeqCst,
            );
            let deadline = self.batcher.deadline();
            let expiry = self.next_expiry();
            tokio::select! {
                p = infer_tx.clone().reserve_owned(), if permit.is_none() && !self.batcher.is_empty() => {
                    match p {
                        Ok(p) => permit = Some(p),
                        Err(_) => return, // inference thread gone
                    }
                }
                _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now).into()), if permit.is_some() && deadline.is_some() && !draining => {}
                _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now).into()), if expiry.is_some() => {
                    self.expire(Instant::now());
                }
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
    fn links(&self, b: &Batch) -> Vec<opentelemetry::trace::SpanContext> {
        let mut seen = HashSet::new();
        b.pairs
            .iter()
            .filter(|p| seen.insert(p.key.event))
            .filter_map(|p| self.assembler.get(p.key.event))
            .map(|m| m.trace.clone())
            .collect()
    }

    fn admit(&mut self, meta: EventMeta, pairs: Vec<(u32, EncodedPair)>) {
        if let Some(false) = self
            .tracker
            .as_ref()
            .map(|t| t.lock().is_current(&meta.ticket))
        {
            self.inflight.sub(meta.pairs);
            return;
        }
        let now = Instant::now();
        let id = meta.id;
        let (deadline, lane) = (meta.deadline, meta.lane);
        if deadline.is_some() && self.deadline_action != DeadlineAction::ScoreAnyway {
            self.deadlines
                .push(std::cmp::Reverse((deadline.unwrap_or(now), id)));
        }
        for (candidate, pair) in pairs {
            self.batcher.push(PendingPair {
                key: PairKey {
                    event: id,
                    index: candidate,
                },
                pair,
                enqueued: now,
                deadline,
                lane,
            });
        }
        if let Some(done) = self.assembler.insert(meta) {
            self.emit(done);
        }
    }

    fn on_result(&mut self, res: InferResult) {
        self.recorder.batch(&BatchRun {
            rows: res.rows,
            seq_len: res.seq_len,
            real_tokens: res.real_tokens,
            started: res.started,
            elapsed: res.elapsed,
            enqueued: &res.enqueued,
        });
        if res.retries > 0 || res.split_runs > 0 {
            self.recorder
                .inference_recovery(res.retries, res.split_runs);
        }
        if res.out_of_memory {
            self.shrink_budget();
        }
        // Events with a pair that failed on its own are dead-lettered, naming the candidate;
        // the scores of every other pair of the batch stand.
        let mut failed: Vec<(u64, u32, InferError)> = Vec::new();
        for (k, r) in res.keys.iter().zip(&res.scores) {
            if let Err(e) = r {
                if !failed.iter().any(|(id, _, _)| *id == k.event) {
                    failed.push((k.event, k.index, e.clone()));
                }
            }
        }
        for (id, index, e) in &failed {
            self.batcher.retain(|k| k.event != *id);
            if let Some(meta) = self.assembler.remove(*id) {
                let candidate = meta
                    .candidates
                    .get(*index as usize)
                    .map_or("?", |c| c.id.as_str());
                tracing::error!(error = %e, rows = res.rows, seq_len = res.seq_len, request_id = %meta.request_id, candidate, "inference failed for a pair on its own; dead-lettering its event");
                let message = format!("candidate {candidate:?}: {e}");
                self.dead_letter(meta, ErrorCode::InferenceFailed, &message);
            }
        }
        let (keys, scores): (Vec<PairKey>, Vec<Score>) = res
            .keys
            .iter()
            .zip(res.scores)
            .filter_map(|(k, r)| Some((*k, r.ok()?)))
            .unzip();
        self.recorder.scored(scores.len());
        for done in self
            .assembler
            .record(&keys, &scores, res.started, res.elapsed)
        {
            self.emit(done);
        }
    }

    /// When the earliest deadline of a waiting event passes.
    fn next_expiry(&mut self) -> Option<Instant> {
        while let Some(std::cmp::Reverse((at, id))) = self.deadlines.peek().copied() {
            if self.assembler.get(id).is_some() {
                return Some(at);
            }
            self.deadlines.pop();
        }
        None
    }

    /// Events whose deadline has passed leave before inference: their waiting pairs are dropped,
    /// and a batch already running for them is not waited for (its scores are ignored).
    pub fn expire(&mut self, now: Instant) {
        while let Some(std::cmp::Reverse((at, id))) = self.deadlines.peek().copied() {
            if at > now {
                break;
            }
            self.deadlines.pop();
            let Some(meta) = self.assembler.remove(id) else {
                continue;
            };
            self.batcher.retain(|k| k.event != id);
            self.recorder.deadline_missed(self.deadline_action.as_str());
            let waited = now.saturating_duration_since(meta.received_at);
            tracing::debug!(request_id = %meta.request_id, waited_ms = waited.as_millis() as u64, action = self.deadline_action.as_str(), "deadline passed while the event waited");
            match self.deadline_action {
                DeadlineAction::Drop => self.sink.finish(Finished {
                    rec: None,
                    ticket: meta.ticket,
                    pairs: meta.pairs,
                    outcome: Outcome::Dropped,
                    span: meta.span,
                }),
                _ => {
                    let message = format!(
                        "deadline passed after {} ms in the worker, before its pairs were scored",
                        waited.as_millis()
                    );
                    self.dead_letter(meta, ErrorCode::DeadlineExceeded, &message);
                }
            }
        }
    }

    /// An allocation failure halves the batch token budget (not below one pair's worth) until
    /// `budget_cooldown` passes without another.
    fn shrink_budget(&mut self) {
        let before = self.batcher.max_tokens();
        let after = (before / 2).max(self.min_tokens);
        self.batcher.set_max_tokens(after);
        self.budget_restore_at = Some(Instant::now() + self.budget_cooldown);
        self.recorder.token_budget(after);
        tracing::warn!(
            before,
            after,
            cooldown_ms = self.budget_cooldown.as_millis() as u64,
            "inference ran out of memory; batch token budget halved for a while"
        );
    }

    fn restore_budget(&mut self, now: Instant) {
        if self.budget_restore_at.is_some_and(|t| now >= t) {
            self.budget_restore_at = None;
            self.batcher.set_max_tokens(self.max_tokens);
            self.recorder.token_budget(self.max_tokens);
            tracing::info!(max_tokens = self.max_tokens, "batch token budget restored");
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
        self.inflight.sub(pairs);
        tracing::info!(
            events = ids.len(),
            pairs,
            "dropped queued work of revoked partitions"
        );
    }

    fn emit(&self, done: Completed) {
        if let Some(bad) = done.scores.iter().find(|s| !s.logit.is_finite()) {
            let message = InferError::NonFinite(bad.logit).to_string();
            return self.dead_letter(done.meta, ErrorCode::InferenceFailed, &message);
        }
        if self.deadline_action == DeadlineAction::ScoreAnyway
            && done.meta.deadline.is_some_and(|d| Instant::now() > d)
        {
            self.recorder
                .deadline_missed(DeadlineAction::ScoreAnyway.as_str());
        }
        let payload = assemble::render(&done, &self.model, &self.labels, crate::now_ms());
        let m = done.meta;
        let rec = self.routes.output(m.key, payload, m.headers, &m.span);
        self.sink.finish(Finished {
            rec: Some(rec),
            ticket: m.ticket,
            pairs: m.pairs,
            outcome: Outcome::Reranked {
                record_ts_ms: m.record_ts_ms,
            },
            span: m.span,
        });
    }

    fn dead_letter(&self, m: EventMeta, code: ErrorCode, message: &str) {
        let d = DlqInput {
            code,
            message,
            topic: &m.ticket.tp.topic,
            partition: m.ticket.tp.partition,
            offset: m.ticket.offset,
            timestamp_ms: m.record_ts_ms,
            key: m.key.as_deref(),
            payload: Some(&m.payload),
        };
        let rec = self.routes.dead_letter(&d, m.headers.clone(), &m.span);
        self.sink.finish(Finished {
            rec: Some(rec),
            ticket: m.ticket.clone(),
            pairs: m.pairs,
            outcome: Outcome::DeadLetter(d.code),
            span: m.span.clone(),
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::assemble::CandidateMeta;
    use crate::batch::BatchPolicy;
    use crate::model::Score;
    use crate::offsets::Ticket;
    use crate::worker::testing::{self, Collect};

    /// The coordinator on its task; the test plays the admission loop and the model.
    struct Harness {
        tx: mpsc::UnboundedSender<ToCoordinator>,
        model_rx: mpsc::Receiver<InferRequest>,
        results: mpsc::UnboundedSender<InferResult>,
        sink: Collect,
        inflight: Arc<InflightPairs>,
        idle: Arc<AtomicBool>,
        recorder: Arc<Recorder>,
    }

    fn start(max_wait: Duration) -> Harness {
        start_with(max_wait, 4096, DeadlineAction::DeadLetter, None)
    }

    /// `max_tokens` is also the budget restored 200 ms after an out-of-memory failure.
    fn start_with(
        max_wait: Duration,
        max_tokens: usize,
        action: DeadlineAction,
        tracker: Option<SharedTracker>,
    ) -> Harness {
        let (tx, rx) = mpsc::unbounded_channel();
        let (infer_tx, model_rx) = mpsc::channel(1);
        let (results, results_rx) = mpsc::unbounded_channel();
        let h = Harness {
            tx,
            model_rx,
            results,
            sink: Collect::default(),
            inflight: Arc::new(InflightPairs::default()),
            idle: Arc::new(AtomicBool::new(true)),
            recorder: testing::recorder(),
        };
        let c = Coordinator {
            batcher: Batcher::new(BatchPolicy {
                max_pairs: 8,
                max_tokens,
                max_wait,
                bulk_max_skips: 3,
                interactive_fill: 8,
            }),
            assembler: Assembler::new(),
            sink: h.sink.clone(),
            routes: testing::routes(),
            model: ModelRef {
                name: "m".into(),
                revision: "r".into(),
                activation: "sigmoid".into(),
            },
            labels: Vec::new(),
            pad_id: 0,
            recorder: h.recorder.clone(),
            inflight: h.inflight.clone(),
            tracker,
            idle: h.idle.clone(),
            max_tokens,
            min_tokens: 5,
            budget_cooldown: Duration::from_millis(200),
            budget_restore_at: None,
            deadline_action: action,
            deadlines: Default::default(),
        };
        tokio::spawn(c.run(rx, infer_tx, results_rx));
        h
    }

    impl Harness {
        /// Admits event `id` of `partition` with `n` one-pair candidates, as the admission loop does.
        fn admit(&self, id: u64, partition: i32, n: usize) {
            self.admit_due(id, partition, n, None)
        }

        fn admit_due(&self, id: u64, partition: i32, n: usize, deadline: Option<Instant>) {
            let meta = EventMeta {
                id,
                ticket: Ticket {
                    tp: TopicPartition {
                        topic: "in".into(),
                        partition,
                    },
                    offset: id as i64,
                    generation: 1,
                },
                key: None,
                headers: Vec::new(),
                request_id: format!("req-{id}"),
                query: "q".into(),
                candidates: (0..n)
                    .map(|i| CandidateMeta {
                        id: format!("c{i}"),
                        text: None,
                        retriever_score: None,
                        metadata: None,
                    })
                    .collect(),
                top_n: n,
                min_score: None,
                min_relevance: None,
                received_at: Instant::now(),
                deadline,
                lane: Default::default(),
                record_ts_ms: None,
                truncated: 0,
                chunked: 0,
                pairs: n,
                payload: b"{}".to_vec(),
                span: tracing::Span::none(),
                trace: opentelemetry::trace::SpanContext::empty_context(),
            };
            let pairs = (0..n as u32)
                .map(|i| {
                    let pair = EncodedPair {
                        ids: vec![101, 7, 102, 8, 102],
                        type_ids: vec![0, 0, 0, 1, 1],
                        truncated: false,
                    };
                    (i, pair)
                })
                .collect();
            self.inflight.add(n);
            self.tx
                .send(ToCoordinator::Admit(Box::new(meta), pairs))
                .unwrap();
        }

        async fn next_batch(&mut self) -> InferRequest {
            tokio::time::timeout(Duration::from_secs(5), self.model_rx.recv())
                .await
                .expect("no batch closed")
                .expect("coordinator gone")
        }

        /// Answers a batch as the inference thread would.
        fn reply(&self, req: InferRequest, scores: Result<Vec<Score>, InferError>) {
            let rows = match scores {
                Ok(s) => s.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e); req.keys.len()],
            };
            self.reply_rows(req, rows, false)
        }

        fn reply_rows(
            &self,
            req: InferRequest,
            scores: Vec<Result<Score, InferError>>,
            out_of_memory: bool,
        ) {
            let out = crate::model::isolate::Isolated {
                rows: scores,
                retries: 0,
                split_runs: 0,
                out_of_memory,
            };
            self.results.send(req.finish(out, Instant::now())).unwrap();
        }

        async fn finished(&self, n: usize) -> Vec<(String, Outcome)> {
            for _ in 0..500 {
                if self.sink.0.lock().unwrap().len() >= n {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.sink.topics()
        }
    }

    fn scores(n: usize, logit: f32) -> Vec<Score> {
        vec![
            Score {
                logit,
                relevance: crate::model::sigmoid(logit),
            };
            n
        ]
    }

    #[tokio::test]
    async fn admitted_pairs_close_into_a_batch_and_the_result_finishes_the_event() {
        let mut h = start(Duration::from_millis(5));
        h.admit(1, 0, 3);
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 3);
        assert!(req.keys.iter().all(|k| k.event == 1));
        h.reply(req, Ok(scores(3, 1.0)));
        let done = h.finished(1).await;
        assert_eq!(
            done,
            vec![("out".to_string(), Outcome::Reranked { record_ts_ms: None })]
        );
        let s = h.recorder.snapshot();
        assert_eq!((s.batches, s.pairs_scored), (1, 3));
        // In-flight pairs are given back by the sink on acknowledgement, not here.
        assert_eq!(h.inflight.get(), 3);
    }

    /// CPU time of the calling thread: the coordinator's, on a current-thread test runtime.
    fn thread_cpu() -> Duration {
        // SAFETY: clock_gettime only writes the struct it is given.
        let mut t: libc::timespec = unsafe { std::mem::zeroed() };
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
        Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
    }

    /// Pairs waiting for `max_wait` with the model's slot free must leave the coordinator parked.
    /// It once dropped the reserved slot whenever no batch could close, reserved it again at
    /// once, and spun a core until the batch timed out (on a quiet stream: always).
    #[tokio::test]
    async fn pairs_waiting_for_max_wait_do_not_spin_the_coordinator() {
        let mut h = start(Duration::from_millis(400));
        h.admit(1, 0, 2);
        let cpu = thread_cpu();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let used = thread_cpu() - cpu;
        // Parked, it wakes a handful of times; spinning, it takes whatever share of the 300 ms
        // the scheduler gives it.
        assert!(
            used < Duration::from_millis(30),
            "coordinator used {used:?} of CPU while waiting"
        );
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 2);
    }

    #[tokio::test]
    async fn failed_or_non_finite_inference_dead_letters_the_events() {
        let mut h = start(Duration::from_millis(5));
        h.admit(1, 0, 2);
        let req = h.next_batch().await;
        h.reply(req, Err(InferError::Run("boom".into())));
        h.admit(2, 0, 1);
        let req = h.next_batch().await;
        h.reply(req, Ok(scores(1, f32::NAN)));
        let dead = Outcome::DeadLetter(ErrorCode::InferenceFailed);
        assert_eq!(
            h.finished(2).await,
            vec![("dlq".to_string(), dead), ("dlq".to_string(), dead)]
        );
    }

    #[tokio::test]
    async fn a_pair_that_fails_alone_dead_letters_only_its_event_naming_the_candidate() {
        let mut h = start(Duration::from_millis(5));
        h.admit(1, 0, 2);
        h.admit(2, 0, 3);
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 5);
        let bad = PairKey { event: 2, index: 1 };
        let rows = req
            .keys
            .iter()
            .map(|k| {
                if *k == bad {
                    Err(InferError::Run("poisoned".into()))
                } else {
                    Ok(scores(1, 1.0)[0])
                }
            })
            .collect();
        h.reply_rows(req, rows, false);
        let mut done = h.finished(2).await;
        done.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            done,
            vec![
                (
                    "dlq".to_string(),
                    Outcome::DeadLetter(ErrorCode::InferenceFailed)
                ),
                ("out".to_string(), Outcome::Reranked { record_ts_ms: None }),
            ]
        );
        let v = h.sink.0.lock().unwrap();
        let dlq = v
            .iter()
            .find_map(|f| f.rec.as_ref().filter(|r| r.topic == "dlq"))
            .unwrap();
        let text = String::from_utf8_lossy(&dlq.payload);
        assert!(text.contains(r#"candidate \"c1\": poisoned"#), "{text}");
        assert_eq!(h.recorder.snapshot().pairs_scored, 4);
    }

    #[tokio::test]
    async fn out_of_memory_halves_the_token_budget_until_the_cooldown_passes() {
        // Pairs are 5 tokens: a 40-token budget holds 8 of them, a halved one 4.
        let mut h = start_with(
            Duration::from_millis(1),
            40,
            DeadlineAction::DeadLetter,
            None,
        );
        h.admit(1, 0, 8);
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 8);
        let rows = (0..8).map(|_| Ok(scores(1, 0.0)[0])).collect();
        h.reply_rows(req, rows, true);
        assert_eq!(h.finished(1).await.len(), 1, "the result was handled");
        h.admit(2, 0, 8);
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 4, "budget halved");
        h.reply(req, Ok(scores(4, 0.0)));
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 4);
        tokio::time::sleep(Duration::from_millis(250)).await;
        h.admit(3, 0, 8);
        h.reply(req, Ok(scores(4, 0.0)));
        let req = h.next_batch().await;
        assert_eq!(req.keys.len(), 8, "budget restored after the cooldown");
    }

    /// The model is busy with event 1, so event 2 waits past its deadline.
    async fn expire_behind_a_busy_model(action: DeadlineAction) -> Vec<(String, Outcome)> {
        let mut h = start_with(Duration::from_millis(1), 4096, action, None);
        h.admit(1, 0, 8);
        // Event 1's batch fills the model's one-slot queue; nothing else is handed over.
        tokio::time::sleep(Duration::from_millis(20)).await;
        h.admit_due(2, 0, 2, Some(Instant::now() + Duration::from_millis(30)));
        h.admit(3, 0, 1);
        let done = h.finished(1).await;
        assert_eq!(h.recorder.snapshot().deadline_missed, 1);
        let busy = h.next_batch().await;
        assert!(busy.keys.iter().all(|k| k.event == 1));
        // The expired event's pairs left the pool: the next batch holds event 3 only.
        h.reply(busy, Ok(scores(8, 0.0)));
        let next = h.next_batch().await;
        assert!(next.keys.iter().all(|k| k.event == 3), "{:?}", next.keys);
        done
    }

    #[tokio::test]
    async fn an_event_whose_deadline_passes_while_queued_leaves_before_inference() {
        assert_eq!(
            expire_behind_a_busy_model(DeadlineAction::DeadLetter).await,
            vec![(
                "dlq".to_string(),
                Outcome::DeadLetter(ErrorCode::DeadlineExceeded)
            )]
        );
        assert_eq!(
            expire_behind_a_busy_model(DeadlineAction::Drop).await,
            vec![("(none)".to_string(), Outcome::Dropped)]
        );
    }

    #[tokio::test]
    async fn revoked_work_is_dropped_and_drain_flushes_the_rest() {
        // A batch never closes on time here: only the drain closes it.
        let mut h = start(Duration::from_secs(3600));
        h.admit(1, 0, 2);
        h.admit(2, 1, 3);
        h.tx.send(ToCoordinator::Rebalance(RebalanceNote::Revoked(vec![
            TopicPartition {
                topic: "in".into(),
                partition: 0,
            },
        ])))
        .unwrap();
        h.tx.send(ToCoordinator::Drain).unwrap();
        let req = h.next_batch().await;
        assert!(req.keys.iter().all(|k| k.event == 2), "{:?}", req.keys);
        assert_eq!(req.keys.len(), 3);
        // The revoked event's pairs are no longer in flight.
        assert_eq!(h.inflight.get(), 3);
        assert!(!h.idle.load(Ordering::SeqCst));
        h.reply(req, Ok(scores(3, 0.5)));
        assert_eq!(h.finished(1).await.len(), 1);
        for _ in 0..100 {
            if h.idle.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(h.idle.load(Ordering::SeqCst), "drained coordinator is idle");
    }

    #[tokio::test]
    async fn an_event_registered_before_a_revoke_and_arriving_after_it_is_dropped() {
        let tracker = SharedTracker::default();
        let p0 = TopicPartition {
            topic: "in".into(),
            partition: 0,
        };
        tracker.lock().assign(p0.clone()); // generation 1, the harness's tickets
        let mut h = start_with(
            Duration::from_secs(3600),
            4096,
            DeadlineAction::DeadLetter,
            Some(tracker.clone()),
        );
        h.admit(1, 0, 2);
        for _ in 0..500 {
            if !h.idle.load(Ordering::SeqCst) {
                break; // event 1 is in the batcher
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // An admission thread still holds event 2 while the partition is revoked and given back.
        tracker.lock().revoke(&p0);
        tracker.lock().assign(p0.clone());
        h.admit(2, 0, 3);
        h.tx.send(ToCoordinator::Drain).unwrap();
        let req = h.next_batch().await;
        assert!(req.keys.iter().all(|k| k.event == 1), "{:?}", req.keys);
        assert_eq!(req.keys.len(), 2);
        assert_eq!(
            h.inflight.get(),
            2,
            "the stale event's pairs are given back"
        );
    }
}
