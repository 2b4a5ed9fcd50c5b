//! processing.guarantee = "exactly_once" on librdkafka's mock cluster (tansu has no
//! transactions), with the real binary and model, read by `read_committed` consumers. The mock
//! writes no abort markers, so aborted records stay visible there: the strict count-per-request
//! check runs on hand-overs without aborts, and the abort test checks that aborted work is redone
//! and nothing is lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

fn read(
    bs: &str,
    topics: &[&str],
    timeout: Duration,
    done: impl FnMut(&[Record]) -> bool,
) -> Vec<Record> {
    collect_with(
        bs,
        topics,
        &[("isolation.level", "read_committed")],
        timeout,
        done,
    )
}

fn eos_args(txn_id: &str) -> Vec<String> {
    // fp32 at 32 tokens: slow enough (~10 s for the run) that partitions move mid-run.
    let mut a = vec![
        "model.max_length=32".to_string(),
        "batch.max_batch_pairs=32".to_string(),
    ];
    a.extend([
        "processing.guarantee=\"exactly_once\"".to_string(),
        format!("processing.transactional_id=\"{txn_id}\""),
        "processing.commit_interval_ms=200".to_string(),
    ]);
    a
}

/// Distinct request ids committed to `topic` so far. Manual assignment: joining a group on the
/// mock takes its 3 s initial rebalance delay, longer than a poll of progress should.
fn seen(bs: &str, topic: &str) -> usize {
    let ids: std::collections::HashSet<String> = committed(bs, topic)
        .iter()
        .filter_map(|v| Some(v["request_id"].as_str()?.to_string()))
        .collect();
    ids.len()
}

/// Every committed record on `topic`, read from the start by partition until 1.5 s pass idle.
fn committed(bs: &str, topic: &str) -> Vec<serde_json::Value> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bs)
        .set("group.id", unique("peek"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(5))
        .expect("metadata");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in md.topics().iter().flat_map(|t| t.partitions()) {
        tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
            .expect("partition");
    }
    c.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_millis(1500) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            idle = Instant::now();
            out.push(serde_json::from_slice(m.payload().unwrap_or_default()).expect("JSON output"));
        }
    }
    out
}

fn wait_until(w: &WorkerProc, what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() >= timeout {
            let log = w.log_text();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            panic!(
                "timed out waiting for {what}; worker log tail:\n{}",
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Partitions move twice (a second worker joins, then the first leaves) while events are in flight
/// on both: each revoke ends the open transaction with exactly the outputs released for it, so the
/// next owner starts where the committed outputs end: every input's output appears exactly once.
#[test]
#[ignore = "needs a broker that stores TxnOffsetCommit offsets: librdkafka's mock answers it without storing them (rdkafka_mock_handlers.c), so a successor restarts from the beginning"]
fn hand_overs_between_workers_output_every_input_exactly_once() {
    let n = 1500;
    let m = mock_backlog("eos-handover", 4, n);
    let t0 = Instant::now();
    let mut a = WorkerProc::spawn(&m.bootstrap, &m.topics, &eos_args("eos-a"));
    wait_until(
        &a,
        "a quarter of the outputs",
        Duration::from_secs(90),
        || seen(&m.bootstrap, &m.topics.output) >= n / 4,
    );
    let b = WorkerProc::spawn(&m.bootstrap, &m.topics, &eos_args("eos-b"));
    wait_until(
        &b,
        "the second worker's partitions",
        Duration::from_secs(60),
        || !b.logged("partitions assigned").is_empty(),
    );
    let at_join = seen(&m.bootstrap, &m.topics.output);
    assert_eq!(
        a.terminate(Duration::from_secs(60)),
        Some(0),
        "first worker exits cleanly\n{}",
        a.log_text()
    );
    let recs = read(
        &m.bootstrap,
        &[&m.topics.output, &m.topics.dlq],
        Duration::from_secs(120),
        |r| r.len() >= n,
    );
    // Late duplicates would arrive after the last missing output: read everything again.
    std::thread::sleep(Duration::from_secs(2));
    let later = committed(&m.bootstrap, &m.topics.output);
    eprintln!(
        "{} outputs in {:.1?}; second worker joined at {at_join}",
        later.len(),
        t0.elapsed()
    );
    assert!(
        at_join < n,
        "the hand-over happened after all work was done; nothing was tested"
    );
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for v in &later {
        *counts
            .entry(v["request_id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(
        missing(&counts, n).is_empty(),
        "missing: {:?}",
        missing(&counts, n)
    );
    let dups: Vec<(&String, &usize)> = counts.iter().filter(|(_, c)| **c > 1).collect();
    assert!(
        dups.is_empty(),
        "{} inputs output more than once, e.g. {:?}",
        dups.len(),
        &dups[..dups.len().min(5)]
    );
    assert_eq!(recs.len(), n, "one record per input, no dead letters");
    assert_eq!(later.len(), n, "nothing more arrived later");
    let revokes = a.logged("partitions revoked; transaction ended");
    assert!(
        !revokes.is_empty() && revokes.iter().all(|l| l["committed"] == true),
        "the first worker ended its transaction on every revoke: {revokes:?}"
    );
}

/// A TxnOffsetCommit refused with a non-retriable error makes the transaction abortable: the
/// worker aborts it, rewinds to the last commit and redoes the work, without a restart. The mock
/// writes no abort markers, so a reader sees the aborted records that had reached it: every copy
/// beyond one per input must be one of the records the worker reports in its aborted transaction.
#[test]
fn an_aborted_transaction_is_redone_without_a_restart() {
    let n = 600;
    let m = mock_backlog("eos-abort", 2, n);
    // The first offset commit inside a transaction fails, whenever it comes.
    m.cluster.request_errors(
        RDKafkaApiKey::TxnOffsetCommit,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
    );
    let mut w = WorkerProc::spawn(&m.bootstrap, &m.topics, &eos_args("eos-abort"));
    wait_until(&w, "every output", Duration::from_secs(120), || {
        seen(&m.bootstrap, &m.topics.output) >= n
    });
    let all = committed(&m.bootstrap, &m.topics.output);
    let aborts = w.logged("transaction failed; aborting it and re-processing from the last commit");
    assert_eq!(aborts.len(), 1, "one injected error, one abort: {aborts:?}");
    let aborted = aborts[0]["records"].as_u64().unwrap_or(0) as usize;
    assert!(aborted > 0, "the aborted transaction held records");
    assert!(
        !w.logged("rewound to the last commit").is_empty(),
        "the ingress sought back"
    );
    assert!(
        w.child.try_wait().expect("status").is_none(),
        "the worker recovered without a restart"
    );
    let mut counts: std::collections::HashMap<String, usize> = Default::default();
    for v in &all {
        *counts
            .entry(v["request_id"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    assert!(missing(&counts, n).is_empty(), "{:?}", missing(&counts, n));
    // Aborted records still queued in the client are purged by the abort; those already sent
    // stay visible on the mock. Either way no copy beyond them.
    let extra = all.len() - n;
    assert!(
        extra <= aborted && counts.values().all(|c| *c <= 2),
        "{extra} extra copies but only {aborted} records were aborted"
    );
    eprintln!("{aborted} records aborted and redone; {} read", all.len());
    assert_eq!(w.terminate(Duration::from_secs(60)), Some(0));
}
