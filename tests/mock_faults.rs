//! Broker faults on librdkafka's mock cluster, with the real binary and model: the broker goes
//! away for a while, and produce, fetch and offset-commit requests fail; the worker recovers
//! without a restart and every input still gets its output (at_least_once, the default).

mod common;

use std::time::{Duration, Instant};

use common::*;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

#[test]
fn broker_outage_and_request_errors_lose_nothing_without_a_restart() {
    use RDKafkaRespErr::*;
    let n = 1500;
    let m = mock_backlog("mock-faults", 3, n);
    let mut w = WorkerProc::spawn(&m.bootstrap, &m.topics, &fast_args());
    let t0 = Instant::now();
    let mut phase = 0;
    let mut down_at = None;
    let mut ids = SeenIds::default();
    let recs = collect(
        &m.bootstrap,
        &[&m.topics.output, &m.topics.dlq],
        Duration::from_secs(120),
        |r| {
            let seen = ids.update(r, &m.topics.output);
            if phase == 0 && seen >= n / 6 {
                // Every request kind the worker depends on fails a few times, retriable and not.
                m.cluster.request_errors(
                    RDKafkaApiKey::Produce,
                    &[
                        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                        RD_KAFKA_RESP_ERR__TRANSPORT,
                    ],
                );
                m.cluster.request_errors(
                    RDKafkaApiKey::Fetch,
                    &[
                        RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                        RD_KAFKA_RESP_ERR__TRANSPORT,
                        RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART,
                    ],
                );
                m.cluster.request_errors(
                    RDKafkaApiKey::OffsetCommit,
                    &[
                        RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
                        RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                        RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    ],
                );
                phase = 1;
            } else if phase == 1 && seen >= n / 3 {
                m.cluster.broker_down(1).expect("broker down");
                down_at = Some(Instant::now());
                eprintln!("broker down at {seen} outputs, {:.1?}", t0.elapsed());
                phase = 2;
            } else if phase == 2 && down_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(8)) {
                m.cluster.broker_up(1).expect("broker up");
                eprintln!("broker up at {seen} outputs, {:.1?}", t0.elapsed());
                phase = 3;
            }
            seen >= n
        },
    );
    assert_eq!(
        phase,
        3,
        "the run ended before the outage was over\n{}",
        w.log_text()
    );
    assert!(
        w.child.try_wait().expect("status").is_none(),
        "the worker survived without a restart"
    );
    let counts = counts_by_request(&recs, &m.topics.output);
    let lost = missing(&counts, n);
    if !lost.is_empty() {
        let log = w.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!(
            "worker log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    assert!(
        lost.is_empty(),
        "{} lost, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
    assert!(
        recs.iter().all(|r| r.topic == m.topics.output),
        "faults must not turn good events into dead letters"
    );
    assert_eq!(
        w.terminate(Duration::from_secs(60)),
        Some(0),
        "clean exit after the faults"
    );
}

/// A fatal producer error (here: a sequence gap, with `enable.gapless.guarantee`) cannot be
/// retried away: the worker stops with an error instead of spinning with its partitions stalled, commits
/// nothing it did not write, and a restarted worker finishes the stream.
#[test]
fn a_fatal_producer_error_stops_the_worker_and_a_restart_loses_nothing() {
    let n = 200;
    let m = mock_backlog("mock-fatal", 2, n);
    // After the inputs are written: the worker's first produce requests meet the error.
    m.cluster.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
    );
    let mut args = fast_args();
    args.push("kafka.producer.\"enable.gapless.guarantee\"=\"true\"".into());
    let mut w = WorkerProc::spawn(&m.bootstrap, &m.topics, &args);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = w.child.try_wait().expect("status") {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the worker kept running after a fatal producer error\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "exit {status:?}\n{}", w.log_text());
    assert!(
        !w.logged("fatal producer error; stopping the worker")
            .is_empty(),
        "{}",
        w.log_text()
    );
    let _w2 = WorkerProc::spawn(&m.bootstrap, &m.topics, &fast_args());
    let mut ids = SeenIds::default();
    let recs = collect(
        &m.bootstrap,
        &[&m.topics.output],
        Duration::from_secs(120),
        |r| ids.update(r, &m.topics.output) >= n,
    );
    let counts = counts_by_request(&recs, &m.topics.output);
    assert!(missing(&counts, n).is_empty(), "{:?}", missing(&counts, n));
}
