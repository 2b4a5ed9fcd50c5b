//! Broker conformance: what every other test takes for granted about the local broker, checked
//! first and on its own (`scripts/test.sh` runs this binary before the rest and stops if it fails).
//!
//! Records are produced the way real producers send them (idempotent, keyed, `linger.ms`), so
//! many share one record batch, and every read starts *inside* a batch: a broker that gets
//! batch boundaries wrong cannot pass. tansu 0.6's memory engine is such a broker: it reports a
//! partition's high watermark as one past the base offset of its last batch (43 records of 100 B
//! in one batch: high watermark 1), so a consumer positioned inside that batch waits forever.
//! `memory_engine_fails_the_checks` shows that these checks catch exactly that.

mod common;

use std::time::{Duration, Instant};

use common::{rt, unique};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use reranker::broker::{create_topics, Storage, TansuBroker};

/// How long a read may wait for records that the broker has acknowledged.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

fn payload(i: usize, size: usize) -> Vec<u8> {
    let mut v = format!("record-{i}:").into_bytes();
    v.extend((0..size.saturating_sub(v.len())).map(|j| b'a' + ((i + j) % 26) as u8));
    v
}

/// Produces `n` records of `size` bytes into partition 0 of `topic`; returns the mean number of
/// records per batch.
fn produce_batched(bootstrap: &str, topic: &str, n: usize, size: usize) -> f64 {
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| payload(i, size)).collect();
    common::produce_batched(bootstrap, topic, &payloads)
}

fn consumer(bootstrap: &str, group: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "100")
        .set("session.timeout.ms", "6000")
        .create()
        .expect("consumer")
}

/// Reads until `want` records arrived or [`READ_TIMEOUT`]; checks offsets and payloads.
fn read(c: &BaseConsumer, from: i64, want: usize, size: usize) -> Result<(), String> {
    let t0 = Instant::now();
    let mut next = from;
    while next < from + want as i64 {
        if t0.elapsed() > READ_TIMEOUT {
            return Err(format!(
                "stalled at offset {next}: {} of {want} records from offset {from} within {READ_TIMEOUT:?}",
                next - from
            ));
        }
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if m.offset() != next {
                    return Err(format!("expected offset {next}, got {}", m.offset()));
                }
                if m.payload() != Some(payload(next as usize, size).as_slice()) {
                    return Err(format!("wrong payload at offset {next}"));
                }
                next += 1;
            }
            Some(Err(e)) => return Err(format!("consume error: {e}")),
            None => {}
        }
    }
    Ok(())
}

fn assign_at(c: &BaseConsumer, topic: &str, offset: i64) {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .expect("tpl");
    c.assign(&tpl).expect("assign");
}

/// The checks on one topic of `n` records of `size` bytes; each failure is a sentence.
fn check_topic(b: &TansuBroker, n: usize, size: usize) -> Vec<String> {
    let bs = b.bootstrap();
    let topic = unique(&format!("conf-{size}"));
    rt().block_on(create_topics(&bs, &[(&topic, 1)]))
        .expect("create topic");
    let per_batch = produce_batched(&bs, &topic, n, size);
    // Otherwise the checks below would not be reading inside batches.
    assert!(
        per_batch >= 2.0,
        "{size} B records: {per_batch:.1} records per batch; the test needs batching"
    );
    let what = format!("{n} records of {size} B ({per_batch:.1} per batch)");
    let mut failures = Vec::new();
    let mut fail = |check: &str, e: String| failures.push(format!("{what}: {check}: {e}"));

    // 1. The high watermark is one past the last record.
    let c = consumer(&bs, &unique("conf"));
    match c.fetch_watermarks(&topic, 0, Duration::from_secs(10)) {
        Ok((low, high)) if low == 0 && high == n as i64 => {}
        Ok((low, high)) => fail(
            "watermarks",
            format!("low {low}, high {high}; expected 0 and {n} (last offset + 1)"),
        ),
        Err(e) => fail("watermarks", e.to_string()),
    }

    // 2. A fetch that starts inside the last batch.
    let inside = n as i64 - 2;
    assign_at(&c, &topic, inside);
    if let Err(e) = read(&c, inside, 2, size) {
        fail("fetch from inside the last batch", e);
    }

    // 3. Pause and resume in the middle of a batch (librdkafka drops its prefetched records and
    //    fetches again from the application's position).
    let c = consumer(&bs, &unique("conf"));
    assign_at(&c, &topic, 0);
    let half = n / 2;
    match read(&c, 0, half, size) {
        Err(e) => fail("read before pause", e),
        Ok(()) => {
            let a = c.assignment().expect("assignment");
            c.pause(&a).expect("pause");
            // Let the paused fetcher purge what it had prefetched.
            for _ in 0..5 {
                assert!(c.poll(Duration::from_millis(100)).is_none(), "paused");
            }
            c.resume(&a).expect("resume");
            if let Err(e) = read(&c, half as i64, n - half, size) {
                fail("resume in the middle of a batch", e);
            }
        }
    }

    // 4. A group member commits inside a batch and stops; the next one starts there.
    let group = unique("conf-group");
    let c = consumer(&bs, &group);
    c.subscribe(&[&topic]).expect("subscribe");
    let at = n as i64 - 3;
    match read(&c, 0, at as usize, size) {
        Err(e) => fail("group read before commit", e),
        Ok(()) => {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&topic, 0, Offset::Offset(at))
                .expect("tpl");
            c.commit(&tpl, CommitMode::Sync).expect("commit");
            drop(c);
            let c = consumer(&bs, &group);
            c.subscribe(&[&topic]).expect("subscribe");
            if let Err(e) = read(&c, at, 3, size) {
                fail("restart from a committed offset inside a batch", e);
            }
        }
    }
    failures
}

fn check(storage: Storage) -> Vec<String> {
    let b = TansuBroker::start_with(storage).expect("broker");
    let mut failures = check_topic(&b, 43, 100);
    failures.extend(check_topic(&b, 43, 40_000));
    failures
}

#[test]
fn local_broker_conforms() {
    let failures = check(Storage::Sqlite);
    assert!(
        failures.is_empty(),
        "the local broker breaks what the tests rely on; no other result of this suite can be \
         trusted until it is fixed:\n  {}",
        failures.join("\n  ")
    );
}

/// The checks above are not vacuous: the engine with the known watermark bug fails them.
#[test]
fn memory_engine_fails_the_checks() {
    let failures = check(Storage::Memory);
    eprintln!("memory engine:\n  {}", failures.join("\n  "));
    assert!(
        failures.iter().any(|f| f.contains("watermarks")),
        "the memory engine's high watermark bug went unnoticed: {failures:?}"
    );
    assert!(
        failures.iter().any(|f| f.contains("stalled")),
        "no read inside a batch stalled on the memory engine: {failures:?}"
    );
}
