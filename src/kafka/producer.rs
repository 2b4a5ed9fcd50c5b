//! Kafka egress: an idempotent producer for reranked and dead-letter records.
//!
//! A record is retried until the broker acknowledges it: the offset of its input is stored only
//! after that ack, so giving up would either lose the event or stall the partition's commit point.
//! The one exception is a fatal producer error (e.g. the idempotent producer's sequence state is
//! lost): no retry can succeed, so the worker stops and the uncommitted events go to the next
//! owner, instead of retrying forever with its partitions stalled.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;

pub struct OutRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl OutRecord {
    pub fn kafka_headers(&self) -> OwnedHeaders {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        headers
    }
}

/// How a send ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Acked,
    /// The producer failed fatally and the record was not written: the worker is stopping.
    Fatal,
}

#[derive(Clone)]
pub struct Egress {
    producer: FutureProducer,
    /// Set on a fatal producer error; the ingress stops the worker when it sees it.
    pub fatal: Arc<AtomicBool>,
}

pub fn producer_config(k: &KafkaConfig) -> ClientConfig {
    super::client_config(
        k,
        // Retries inside librdkafka must not duplicate or reorder records.
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "5"),
        ],
        &k.producer,
    )
}

impl Egress {
    pub fn new(k: &KafkaConfig) -> anyhow::Result<Self> {
        let producer: FutureProducer = producer_config(k)
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create Kafka producer: {e}"))?;
        Ok(Self {
            producer,
            fatal: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Sends until acknowledged, backing off between failed attempts.
    pub async fn send(&self, rec: &OutRecord) -> Delivery {
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0u32;
        loop {
            if self.fatal.load(Ordering::SeqCst) {
                return Delivery::Fatal;
            }
            let mut fr = FutureRecord::<[u8], [u8]>::to(&rec.topic)
                .payload(&rec.payload)
                .headers(rec.kafka_headers());
            if let Some(k) = &rec.key {
                fr = fr.key(k);
            }
            match self.producer.send(fr, Timeout::Never).await {
                Ok(_) => return Delivery::Acked,
                Err((e, _)) => {
                    if let Some((code, reason)) = self.producer.client().fatal_error() {
                        tracing::error!(?code, %reason, "fatal producer error; stopping the worker");
                        self.fatal.store(true, Ordering::SeqCst);
                        return Delivery::Fatal;
                    }
                    attempt += 1;
                    tracing::warn!(topic = %rec.topic, attempt, error = %e, "produce failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    pub fn flush(&self, timeout: Duration) {
        if let Err(e) = self.producer.flush(timeout) {
            tracing::warn!(error = %e, "producer flush did not complete");
        }
    }
}
