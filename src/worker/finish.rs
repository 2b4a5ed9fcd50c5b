//! Finishing an event: its output record (reranked or dead letter) is produced, and only the
//! acknowledgement completes its offset. The coordinator and the admission loop hand finished
//! events to a [`Sink`]; tests use a fake one.

use std::sync::Arc;

use crate::dlq::{self, DlqInput};
use crate::kafka::consumer::{self, KafkaConsumer};
use crate::kafka::producer::{Delivery, Egress, OutRecord};
use crate::kafka::txn::{Release, TxnHandle};
use crate::obs::recorder::Recorder;
use crate::obs::telemetry;
use crate::offsets::{SharedTracker, Ticket};

use super::inflight::InflightPairs;
use crate::decode::ErrorCode;

/// How an event ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Reranked {
        record_ts_ms: Option<i64>,
    },
    DeadLetter(ErrorCode),
    /// Its deadline passed and `deadline.action = "drop"`: nothing published.
    Dropped,
}

/// An event's output, ready to produce.
pub struct Finished {
    /// `None` for a dropped event: only its offset completes.
    pub rec: Option<OutRecord>,
    pub ticket: Ticket,
    /// Its pairs, given back to the in-flight count once it is done.
    pub pairs: usize,
    pub outcome: Outcome,
    /// Ends when the output is acknowledged.
    pub span: tracing::Span,
}

pub trait Sink: Send + 'static {
    fn finish(&self, f: Finished);
}

/// Where outputs go and which headers they carry: the one place output and dead-letter records
/// are built.
pub struct Routes {
    pub output_topic: String,
    pub dlq_topic: String,
    /// `output.propagate_headers`: which trace-context headers the event's span may write.
    pub propagate: Vec<String>,
}

impl Routes {
    /// A dead letter in place of the event's output.
    pub fn dead_letter(
        &self,
        d: &DlqInput<'_>,
        mut headers: Vec<(String, Vec<u8>)>,
        span: &tracing::Span,
    ) -> OutRecord {
        tracing::debug!(
            partition = d.partition,
            offset = d.offset,
            code = d.code.as_str(),
            "dead-lettering event"
        );
        telemetry::record_error(span, d.code.as_str(), d.message);
        telemetry::inject(span, &self.propagate, &mut headers);
        OutRecord {
            topic: self.dlq_topic.clone(),
            key: d.key.map(<[u8]>::to_vec),
            payload: dlq::render(d, crate::now_ms()),
            headers,
        }
    }

    pub fn output(
        &self,
        key: Option<Vec<u8>>,
        payload: Vec<u8>,
        mut headers: Vec<(String, Vec<u8>)>,
        span: &tracing::Span,
    ) -> OutRecord {
        telemetry::inject(span, &self.propagate, &mut headers);
        OutRecord {
            topic: self.output_topic.clone(),
            key,
            payload,
            headers,
        }
    }
}

/// Where an acknowledged event's offset goes.
#[derive(Clone)]
pub enum Commit {
    /// Stored for librdkafka's background auto-commit (at_least_once).
    Store,
    /// Nowhere: replays keep no position.
    Nothing,
    /// Into the open transaction, after the record (exactly_once).
    Txn(TxnHandle),
}

/// The Kafka sink: produce, then complete the offset.
#[derive(Clone)]
pub struct Finisher {
    pub egress: Egress,
    pub consumer: Arc<KafkaConsumer>,
    pub tracker: SharedTracker,
    pub inflight: Arc<InflightPairs>,
    pub recorder: Arc<Recorder>,
    pub commit: Commit,
}

impl Sink for Finisher {
    /// Produces the record; on its acknowledgement completes the offset and ends the event's span.
    /// exactly_once: hands it to the transaction thread, which releases it in offset order.
    fn finish(&self, f: Finished) {
        let Finished {
            rec,
            ticket,
            pairs,
            outcome,
            span,
        } = f;
        if let Commit::Txn(txn) = &self.commit {
            let this = self.clone();
            txn.finished(
                rec,
                ticket,
                Box::new(move |release| {
                    drop(span);
                    this.inflight.sub(pairs);
                    if release == Release::Released {
                        this.count(outcome);
                    }
                }),
            );
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Some(rec) = &rec {
                if this.egress.send(rec).await == Delivery::Fatal {
                    // Not written: the offset stays uncommitted and the worker is stopping.
                    return;
                }
            }
            drop(span);
            let point = this.tracker.lock().complete(&ticket);
            if let (Some(p), Commit::Store) = (point, &this.commit) {
                consumer::store(&*this.consumer, &[(ticket.tp.clone(), p)]);
            }
            this.inflight.sub(pairs);
            this.count(outcome);
        });
    }
}

impl Finisher {
    fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::Reranked { record_ts_ms } => self.recorder.produced(record_ts_ms),
            Outcome::DeadLetter(code) => self.recorder.dead_lettered(code),
            Outcome::Dropped => {}
        }
    }
}
