//! The coordinator task owns the batcher and the assembler, so the hot path takes no locks: it
//! admits events' pairs, closes batches when the model can take one, routes results back to their
//! events, drops the work of partitions that moved away, and flushes everything on drain.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::finish::{Finished, Outcome, Routes, Sink};
use super::inflight::InflightPairs;
use crate::assemble::{self, Assembler, Completed, EventMeta, ModelRef};
use crate::batch::{Batch, Batcher, PairKey, PendingPair};
use crate::decode::ErrorCode;
use crate::dlq::DlqInput;
use crate::kafka::consumer::RebalanceNote;
use crate::model::{InferError, InferRequest, InferResult};
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
    pub pad_id: u32,
    pub recorder: Arc<Recorder>,
    pub inflight: Arc<InflightPairs>,
    /// Admission threads hand events over in any order, so an event registered before a revoke or
    /// rewind can arrive after the coordinator dropped that partition's work: checked on arrival.
    /// `None` where nothing is revoked (host-only bench, unit tests).
    pub tracker: Option<SharedTracker>,
    /// True when nothing waits in the batcher or assembler (read by the shutdown drain).
    pub idle: Arc<AtomicBool>,
}

impl<S: Sink> Coordinator<S> {
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
        self.recorder.batch(&BatchRun {
            rows: res.rows,
            seq_len: res.seq_len,
            real_tokens: res.real_tokens,
            started: res.started,
            elapsed: res.elapsed,
            enqueued: &res.enqueued,
        });
        match res.scores {
            Ok(scores) => {
                self.recorder.scored(scores.len());
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
        self.inflight.sub(pairs);
        tracing::info!(
            events = ids.len(),
            pairs,
            "dropped queued work of revoked partitions"
        );
    }

    fn emit(&self, done: Completed) {
        if let Some(bad) = done.scores.iter().find(|s| !s.logit.is_finite()) {
            return self.dead_letter(done.meta, &InferError::NonFinite(bad.logit));
        }
        let payload = assemble::render(&done, &self.model, crate::now_ms());
        let m = done.meta;
        let rec = self.routes.output(m.key, payload, m.headers, &m.span);
        self.sink.finish(Finished {
            rec,
            ticket: m.ticket,
            pairs: m.pairs,
            outcome: Outcome::Reranked {
                record_ts_ms: m.record_ts_ms,
            },
            span: m.span,
        });
    }

    fn dead_letter(&self, m: EventMeta, error: &InferError) {
        let message = error.to_string();
        let d = DlqInput {
            code: ErrorCode::InferenceFailed,
            message: &message,
            topic: &m.ticket.tp.topic,
            partition: m.ticket.tp.partition,
            offset: m.ticket.offset,
            timestamp_ms: m.record_ts_ms,
            key: m.key.as_deref(),
            payload: Some(&m.payload),
        };
        let rec = self.routes.dead_letter(&d, m.headers.clone(), &m.span);
        self.sink.finish(Finished {
            rec,
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
        start_with(max_wait, None)
    }

    fn start_with(max_wait: Duration, tracker: Option<SharedTracker>) -> Harness {
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
                max_tokens: 4096,
                max_wait,
            }),
            assembler: Assembler::new(),
            sink: h.sink.clone(),
            routes: testing::routes(),
            model: ModelRef {
                name: "m".into(),
                revision: "r".into(),
                activation: "sigmoid".into(),
            },
            pad_id: 0,
            recorder: h.recorder.clone(),
            inflight: h.inflight.clone(),
            tracker,
            idle: h.idle.clone(),
        };
        tokio::spawn(c.run(rx, infer_tx, results_rx));
        h
    }

    impl Harness {
        /// Admits event `id` of `partition` with `n` one-pair candidates, as the admission loop does.
        fn admit(&self, id: u64, partition: i32, n: usize) {
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
                received_at: Instant::now(),
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
            self.results
                .send(InferResult {
                    keys: req.keys,
                    scores,
                    started: Instant::now(),
                    elapsed: Duration::from_millis(1),
                    enqueued: req.enqueued,
                    rows: req.tensors.rows,
                    seq_len: req.tensors.seq_len,
                    real_tokens: req.real_tokens,
                    reason: req.reason,
                })
                .unwrap();
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
        let mut h = start_with(Duration::from_secs(3600), Some(tracker.clone()));
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
