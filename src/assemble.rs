//! Assemble per-event results: gather the scores of an event's pairs (which may arrive in several
//! batches), sort, apply `top_n` / `min_score`, and render the `reranked` v1 record
//! (`schemas/reranked.v1.json`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::value::RawValue;

use crate::batch::PairKey;
use crate::config::Label;
use crate::model::Score;
use crate::offsets::Ticket;

pub const OUTPUT_SCHEMA_VERSION: u32 = 1;

/// Everything about an admitted event except its tokens.
#[derive(Debug)]
pub struct EventMeta {
    pub id: u64,
    pub ticket: Ticket,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub request_id: String,
    pub query: String,
    pub candidates: Vec<CandidateMeta>,
    pub top_n: usize,
    pub min_score: Option<f64>,
    /// The event's `min_relevance`, else `output.min_relevance`.
    pub min_relevance: Option<f64>,
    pub received_at: Instant,
    /// When the event's `deadline_ms` runs out, on this process's clock.
    pub deadline: Option<Instant>,
    pub lane: crate::batch::Lane,
    pub record_ts_ms: Option<i64>,
    pub truncated: u32,
    /// Candidates scored as several windows (`model.long_passages = "chunk_max"`).
    pub chunked: u32,
    /// Model inputs for this event: one per candidate, more when passages are windowed.
    pub pairs: usize,
    /// Source record value, kept only while needed for a dead letter (inference failure).
    pub payload: Vec<u8>,
    /// Open from consume to the acknowledgement of the event's output.
    pub span: tracing::Span,
    /// The span's context, for the links of the batches that carry the event's pairs.
    pub trace: opentelemetry::trace::SpanContext,
}

#[derive(Debug)]
pub struct CandidateMeta {
    pub id: String,
    /// The scored text, kept only when the event's `return_text` (else `output.include_text`) asks.
    pub text: Option<String>,
    pub retriever_score: Option<f64>,
    pub metadata: Option<Box<RawValue>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelRef {
    pub name: String,
    pub revision: String,
    /// How `relevance` was derived from `score`: "sigmoid" or "softmax".
    pub activation: String,
}

#[derive(Serialize)]
pub struct Reranked<'a> {
    pub schema_version: u32,
    pub request_id: &'a str,
    pub query: &'a str,
    pub results: Vec<RankedResult<'a>>,
    pub model: &'a ModelRef,
    /// Candidates scored (before top_n / min_score).
    pub candidates: usize,
    /// Candidates shortened by longest-first truncation at model.max_length.
    pub truncated: u32,
    /// Candidates split into overlapping windows and scored as their best window.
    pub chunked: u32,
    pub timings: Timings,
}

#[derive(Serialize)]
pub struct RankedResult<'a> {
    pub id: &'a str,
    /// 1-based, best first.
    pub rank: usize,
    /// 1-based position in the input's candidate list.
    pub original_rank: usize,
    /// Raw model logit.
    pub score: f32,
    /// Normalised relevance in 0..1 (see `model.activation`).
    pub relevance: f32,
    /// The `output.labels` entry the relevance falls in; absent when none are configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retriever_score: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<&'a str>,
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct Timings {
    /// Admission to the start of the first batch holding one of the event's pairs.
    pub queue_ms: f64,
    /// Sum of the run times of the batches that carried the event's pairs.
    pub inference_ms: f64,
    /// Record timestamp to output; absent when the record has no timestamp.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_to_end_ms: Option<f64>,
}

struct Pending {
    meta: EventMeta,
    scores: Vec<Option<Score>>,
    remaining: usize,
    first_start: Option<Instant>,
    inference: Duration,
}

/// A fully scored event.
pub struct Completed {
    pub meta: EventMeta,
    pub scores: Vec<Score>,
    pub queue: Duration,
    pub inference: Duration,
}

#[derive(Default)]
pub struct Assembler {
    events: HashMap<u64, Pending>,
}

impl Assembler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Starts waiting for an event's scores; an event without candidates completes at once.
    pub fn insert(&mut self, meta: EventMeta) -> Option<Completed> {
        let n = meta.candidates.len();
        if n == 0 || meta.pairs == 0 {
            return Some(Completed {
                meta,
                scores: Vec::new(),
                queue: Duration::ZERO,
                inference: Duration::ZERO,
            });
        }
        self.events.insert(
            meta.id,
            Pending {
                remaining: meta.pairs,
                meta,
                scores: vec![None; n],
                first_start: None,
                inference: Duration::ZERO,
            },
        );
        None
    }

    /// Records the scores of one batch; returns the events it completed.
    pub fn record(
        &mut self,
        keys: &[PairKey],
        scores: &[Score],
        started: Instant,
        elapsed: Duration,
    ) -> Vec<Completed> {
        let mut touched: Vec<u64> = Vec::new();
        for (k, s) in keys.iter().zip(scores) {
            let Some(p) = self.events.get_mut(&k.event) else {
                continue; // dropped (revoked partition or failed event)
            };
            let Some(slot) = p.scores.get_mut(k.index as usize) else {
                continue;
            };
            // Windows of one passage share a slot: the best one stands for the candidate.
            if slot.is_none_or(|old| s.logit > old.logit) {
                *slot = Some(*s);
            }
            p.remaining = p.remaining.saturating_sub(1);
            if touched.last() != Some(&k.event) && !touched.contains(&k.event) {
                touched.push(k.event);
                p.inference += elapsed;
                p.first_start.get_or_insert(started);
            }
        }
        touched
            .into_iter()
            .filter_map(|id| {
                if self.events.get(&id)?.remaining > 0 {
                    return None;
                }
                let p = self.events.remove(&id)?;
                let queue = p
                    .first_start
                    .map(|s| s.saturating_duration_since(p.meta.received_at))
                    .unwrap_or_default();
                Some(Completed {
                    scores: p
                        .scores
                        .into_iter()
                        .map(|s| {
                            s.unwrap_or(Score {
                                logit: f32::NAN,
                                relevance: f32::NAN,
                            })
                        })
                        .collect(),
                    meta: p.meta,
                    queue,
                    inference: p.inference,
                })
            })
            .collect()
    }

    /// Removes an event (its batch failed, or its partition was revoked).
    pub fn get(&self, id: u64) -> Option<&EventMeta> {
        self.events.get(&id).map(|p| &p.meta)
    }

    pub fn remove(&mut self, id: u64) -> Option<EventMeta> {
        self.events.remove(&id).map(|p| p.meta)
    }

    /// Ids of events matching a predicate on their metadata.
    pub fn ids_where(&self, mut f: impl FnMut(&EventMeta) -> bool) -> Vec<u64> {
        self.events
            .iter()
            .filter(|(_, p)| f(&p.meta))
            .map(|(id, _)| *id)
            .collect()
    }
}

/// Indices of candidates, best first, after `min_score`, `min_relevance` and `top_n`. Relevance
/// thresholds are compared in f32, the precision `relevance` is computed and written in, so a
/// result written as 0.7 passes a threshold of 0.7.
pub fn rank(
    scores: &[Score],
    top_n: usize,
    min_score: Option<f64>,
    min_relevance: Option<f64>,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len())
        .filter(|&i| min_score.is_none_or(|m| scores[i].logit as f64 >= m))
        .filter(|&i| min_relevance.is_none_or(|m| scores[i].relevance >= m as f32))
        .collect();
    // Ties keep the retriever's order, so equal scores rank deterministically.
    order.sort_by(|&a, &b| scores[b].logit.total_cmp(&scores[a].logit).then(a.cmp(&b)));
    order.truncate(top_n);
    order
}

/// The label of a relevance: the last whose threshold it reaches (labels are validated to be
/// increasing; compared in f32 like `rank`); none for an unscored (NaN) candidate.
pub fn label(labels: &[Label], relevance: f32) -> Option<&str> {
    labels
        .iter()
        .rev()
        .find(|l| relevance >= l.min_relevance as f32)
        .map(|l| l.name.as_str())
}

/// Renders the output record; `labels` is `output.labels`.
pub fn render(c: &Completed, model: &ModelRef, labels: &[Label], now_ms: i64) -> Vec<u8> {
    let m = &c.meta;
    let results = rank(&c.scores, m.top_n, m.min_score, m.min_relevance)
        .into_iter()
        .enumerate()
        .map(|(r, i)| {
            let cand = &m.candidates[i];
            RankedResult {
                id: &cand.id,
                rank: r + 1,
                original_rank: i + 1,
                score: c.scores[i].logit,
                relevance: c.scores[i].relevance,
                label: label(labels, c.scores[i].relevance),
                retriever_score: cand.retriever_score,
                metadata: cand.metadata.as_deref(),
                text: cand.text.as_deref(),
            }
        })
        .collect();
    let out = Reranked {
        schema_version: OUTPUT_SCHEMA_VERSION,
        request_id: &m.request_id,
        query: &m.query,
        results,
        model,
        candidates: m.candidates.len(),
        truncated: m.truncated,
        chunked: m.chunked,
        timings: Timings {
            queue_ms: ms(c.queue),
            inference_ms: ms(c.inference),
            end_to_end_ms: m.record_ts_ms.map(|ts| (now_ms - ts).max(0) as f64),
        },
    };
    // Serializing plain structs of strings and finite numbers cannot fail; NaN renders as null.
    serde_json::to_vec(&out).unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(logit: f32) -> Score {
        Score {
            logit,
            relevance: crate::model::sigmoid(logit),
        }
    }

    #[test]
    fn rank_sorts_filters_and_truncates() {
        let scores = [s(0.1), s(2.0), s(-1.0), s(2.0), s(0.5)];
        assert_eq!(
            rank(&scores, 10, None, None),
            vec![1, 3, 4, 0, 2],
            "ties keep input order"
        );
        assert_eq!(rank(&scores, 2, None, None), vec![1, 3]);
        assert_eq!(rank(&scores, 10, Some(0.2), None), vec![1, 3, 4]);
        // sigmoid(0.4) ~ 0.599: both thresholds apply when both are set.
        assert_eq!(rank(&scores, 10, None, Some(0.599)), vec![1, 3, 4]);
        assert_eq!(rank(&scores, 10, Some(1.0), Some(0.5)), vec![1, 3]);
        assert!(rank(&scores, 10, Some(0.0), Some(0.9)).is_empty());
    }

    #[test]
    fn labels_follow_their_thresholds() {
        let l = |name: &str, min_relevance| Label {
            name: name.into(),
            min_relevance,
        };
        let labels = [l("unlikely", 0.0), l("likely", 0.3), l("very likely", 0.7)];
        assert_eq!(label(&labels, 0.0), Some("unlikely"));
        assert_eq!(label(&labels, 0.299), Some("unlikely"));
        assert_eq!(label(&labels, 0.3), Some("likely"));
        assert_eq!(label(&labels, 0.7), Some("very likely"));
        assert_eq!(label(&labels, 1.0), Some("very likely"));
        assert_eq!(label(&labels, f32::NAN), None);
        assert_eq!(label(&[], 0.5), None);
    }
}
