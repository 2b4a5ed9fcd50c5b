//! `reranker replay`: runs the worker's pipeline over a fixed slice of the input topic — after a
//! model change, or to rebuild an output topic — without a consumer group: partitions are
//! assigned by hand from the start position, nothing is committed, and the run stops by itself at
//! the end offsets captured when it starts (or `--to`).

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;
use tokio::sync::watch;

use crate::config::Config;
use crate::offsets::TopicPartition;
use crate::worker::{PartitionRange, Source, Worker};

/// A start or end position: an offset (the same on every partition) or a record timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Offset(i64),
    /// Milliseconds since the epoch.
    Time(i64),
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(o) = s.parse::<i64>() {
            if o < 0 {
                return Err(format!("offset {o} is negative"));
            }
            return Ok(Self::Offset(o));
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Self::Time(t.timestamp_millis()))
            .map_err(|e| {
                format!("{s:?} is neither an offset nor an RFC 3339 timestamp (2024-05-01T12:00:00Z): {e}")
            })
    }
}

const META_TIMEOUT: Duration = Duration::from_secs(15);

/// Resolves `[from, to)` on every partition of `topic`, clamped to what the partition holds now.
/// Timestamps map to the first offset whose record timestamp is at or after them. Blocking.
pub fn plan(
    cfg: &Config,
    topic: &str,
    from: Position,
    to: Option<Position>,
) -> anyhow::Result<Vec<PartitionRange>> {
    let c: BaseConsumer = crate::kafka::client_config(&cfg.kafka, &[], &Default::default())
        .create()
        .context("cannot create Kafka client")?;
    let md = c
        .fetch_metadata(Some(topic), META_TIMEOUT)
        .with_context(|| format!("metadata of topic {topic}"))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if parts.is_empty() {
        bail!("topic {topic} does not exist or has no partitions");
    }
    let mut marks = Vec::new();
    for &p in &parts {
        let (low, high) = c
            .fetch_watermarks(topic, p, META_TIMEOUT)
            .with_context(|| format!("watermarks of {topic}/{p}"))?;
        marks.push((p, low, high));
    }
    let resolve = |pos: Position| -> anyhow::Result<Vec<i64>> {
        match pos {
            Position::Offset(o) => Ok(marks.iter().map(|&(_, l, h)| o.clamp(l, h)).collect()),
            Position::Time(ts) => {
                let mut tpl = TopicPartitionList::new();
                for &(p, _, _) in &marks {
                    tpl.add_partition_offset(topic, p, Offset::Offset(ts))?;
                }
                let found = c
                    .offsets_for_times(tpl, META_TIMEOUT)
                    .context("offsets_for_times")?;
                marks
                    .iter()
                    .map(|&(p, l, h)| {
                        let e = found
                            .find_partition(topic, p)
                            .context("partition missing from offsets_for_times")?;
                        Ok(match e.offset() {
                            Offset::Offset(o) => o.clamp(l, h),
                            // No record at or after the timestamp.
                            _ => h,
                        })
                    })
                    .collect()
            }
        }
    };
    tracing::debug!(topic, watermarks = ?marks, "partitions");
    let starts = resolve(from)?;
    let ends = match to {
        Some(t) => resolve(t)?,
        None => marks.iter().map(|&(_, _, h)| h).collect(),
    };
    Ok(marks
        .iter()
        .zip(starts.into_iter().zip(ends))
        .map(|(&(p, _, _), (start, end))| PartitionRange {
            tp: TopicPartition {
                topic: topic.to_string(),
                partition: p,
            },
            start,
            end: end.max(start),
        })
        .collect())
}

#[derive(Debug, Serialize)]
pub struct Summary {
    /// Records in the ranges that were consumed (reranked + dead letters).
    pub events: u64,
    pub reranked: u64,
    pub dead_letters: u64,
    pub pairs: u64,
    pub wall_s: f64,
    pub pairs_per_s: f64,
    /// `[partition, start, end)` per partition.
    pub ranges: Vec<(i32, i64, i64)>,
}

/// Plans the ranges, runs the pipeline over them with a progress bar on stderr (hidden when
/// stderr is not a terminal), and returns the summary.
pub async fn run(
    mut cfg: Config,
    from: Position,
    to: Option<Position>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Summary> {
    // A replay runs next to the serving worker: it must not take its metrics port.
    cfg.http.enabled = false;
    let topic = cfg.kafka.input_topic.clone();
    let c = cfg.clone();
    let ranges = tokio::task::spawn_blocking(move || plan(&c, &topic, from, to)).await??;
    let total: i64 = ranges.iter().map(|r| r.end - r.start).sum();
    let spans: Vec<(i32, i64, i64)> = ranges
        .iter()
        .map(|r| (r.tp.partition, r.start, r.end))
        .collect();
    tracing::info!(ranges = ?spans, records = total, "replay planned");
    if total == 0 {
        return Ok(Summary {
            events: 0,
            reranked: 0,
            dead_letters: 0,
            pairs: 0,
            wall_s: 0.0,
            pairs_per_s: 0.0,
            ranges: spans,
        });
    }
    let c = cfg.clone();
    // A replay must end: a partition that stops moving short of its end is an error.
    let worker = Worker::spawn_load(c).await?.stop_on_stall();
    let recorder = worker.recorder.clone();

    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total as u64),
        indicatif::ProgressDrawTarget::stderr(),
    );
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} events  {msg}  {elapsed_precise} ETA {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let t0 = Instant::now();
    let ticker = {
        let (bar, recorder) = (bar.clone(), recorder.clone());
        tokio::spawn(async move {
            let mut t = tokio::time::interval(Duration::from_millis(250));
            loop {
                t.tick().await;
                let s = recorder.snapshot();
                let pairs = s.pairs_scored;
                bar.set_position(s.finished());
                bar.set_message(format!(
                    "{:.1} pairs/s",
                    pairs as f64 / t0.elapsed().as_secs_f64().max(1e-3)
                ));
            }
        })
    };
    let result = worker.run_source(shutdown, Source::Ranges(ranges)).await;
    ticker.abort();
    bar.finish_and_clear();
    let s = result?;
    let wall_s = t0.elapsed().as_secs_f64();
    let (reranked, dead_letters, pairs) = (s.events_out, s.dead_letters, s.pairs_scored);
    Ok(Summary {
        events: reranked + dead_letters,
        reranked,
        dead_letters,
        pairs,
        wall_s,
        pairs_per_s: pairs as f64 / wall_s.max(1e-3),
        ranges: spans,
    })
}

pub fn print_summary(s: &Summary) {
    println!(
        "replayed {} events ({} reranked, {} dead letters), {} pairs in {:.1} s ({:.1} pairs/s)",
        s.events, s.reranked, s.dead_letters, s.pairs, s.wall_s, s.pairs_per_s
    );
    for (p, start, end) in &s.ranges {
        println!("  partition {p}: offsets [{start}, {end})");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_as_offsets_or_rfc3339() {
        assert_eq!("42".parse::<Position>(), Ok(Position::Offset(42)));
        assert_eq!(
            "1970-01-01T00:00:01.5Z".parse::<Position>(),
            Ok(Position::Time(1500))
        );
        assert_eq!(
            "1970-01-01T02:00:00+02:00".parse::<Position>(),
            Ok(Position::Time(0))
        );
        assert!("-1".parse::<Position>().is_err());
        assert!("yesterday".parse::<Position>().is_err());
    }
}
