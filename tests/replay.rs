//! `reranker replay` on a real tansu broker with the real binary and model: a timestamp range
//! selects exactly the events in it, the run stops by itself at the end offsets captured at start,
//! and two replays of the same input give the same outputs apart from `timings`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const MAX_LENGTH: &str = "model.max_length=32";

/// Produces `events` one at a time (each acknowledged before the next), round-robin over
/// `partitions`, stamped with the current time.
async fn produce_now(bs: &str, topic: &str, events: &[Value], partitions: i32) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bs)
        .create()
        .expect("producer");
    for (i, e) in events.iter().enumerate() {
        let key = e["request_id"].as_str().expect("id").to_string();
        let payload = serde_json::to_vec(e).expect("json");
        p.send(
            FutureRecord::to(topic)
                .key(&key)
                .payload(&payload)
                .partition(i as i32 % partitions),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("produce");
    }
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .expect("time")
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

struct Replay {
    child: std::process::Child,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

fn spawn_replay(bs: &str, t: &Topics, output: &str, range: &[&str]) -> Replay {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("replay.log");
    let child = Command::new(env!("CARGO_BIN_EXE_reranker"))
        .arg("replay")
        .args(["--brokers", bs, "--input", &t.input, "--output", output])
        .args(["--dlq", &t.dlq, "--json"])
        .arg("--model-dir")
        .arg(model_dir())
        .args(range)
        .args(["--set", MAX_LENGTH, "--set", "log.format=\"json\""])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn replay");
    Replay {
        child,
        log,
        _dir: dir,
    }
}

impl Replay {
    fn wait_logged(&self, msg: &str, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            if text.contains(msg) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Waits for the process to exit on its own and returns its JSON summary.
    fn summary(mut self, timeout: Duration) -> Value {
        let t0 = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                assert!(status.success(), "replay failed: {status}\n{log}");
                break;
            }
            assert!(
                t0.elapsed() < timeout,
                "replay did not stop by itself within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Shown when an assertion fails.
        eprintln!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        let out = self.child.wait_with_output().expect("output");
        serde_json::from_slice(&out.stdout).expect("JSON summary on stdout")
    }
}

/// Outputs by request id with `timings` removed; panics on a duplicate.
fn outputs(bs: &str, topic: &str, n: usize) -> BTreeMap<String, (String, Value)> {
    let recs = collect(bs, &[topic], Duration::from_secs(60), |r| r.len() >= n);
    // Anything beyond `n` would show up within a short grace period.
    let extra = collect(bs, &[topic], Duration::from_secs(2), |_| false);
    assert_eq!(extra.len(), recs.len(), "more outputs than expected");
    let mut by_id = BTreeMap::new();
    for r in &recs {
        let mut v = r.json();
        let id = v["request_id"].as_str().expect("id").to_string();
        assert!(
            v.as_object_mut()
                .expect("object")
                .remove("timings")
                .is_some(),
            "outputs carry timings"
        );
        assert!(
            by_id.insert(id.clone(), (r.key_str(), v)).is_none(),
            "duplicate output for {id}"
        );
    }
    by_id
}

#[test]
fn replay_selects_a_time_range_stops_by_itself_and_is_deterministic() {
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("replay");
    rt.block_on(t.create(&bs, 2));
    // Three groups of four events with a pause between them; the middle group is the range.
    // Record timestamps are the produce time: tansu answers offsets_for_times from the time it
    // stored each batch (not the record's CreateTime), a real Kafka from CreateTime; with both
    // equal to "now" the same bounds hold for either.
    let events = scifact_events(12, 3);
    let gap = Duration::from_millis(1500);
    rt.block_on(produce_now(&bs, &t.input, &events[..4], 2));
    std::thread::sleep(gap);
    let from_ms = reranker::now_ms();
    std::thread::sleep(gap);
    rt.block_on(produce_now(&bs, &t.input, &events[4..8], 2));
    std::thread::sleep(gap);
    let to_ms = reranker::now_ms();
    std::thread::sleep(gap);
    rt.block_on(produce_now(&bs, &t.input, &events[8..], 2));
    let in_range: HashSet<String> = (4..8).map(|i| format!("req-{i}")).collect();

    // The middle hour only.
    let out_range = unique("replay-range-out");
    let out_a = unique("replay-a-out");
    let out_b = unique("replay-b-out");
    rt.block_on(create_topics(
        &bs,
        &[(&out_range, 2), (&out_a, 2), (&out_b, 2)],
    ))
    .expect("topics");
    let from = rfc3339(from_ms);
    let to = rfc3339(to_ms);
    let t0 = Instant::now();
    let s = spawn_replay(&bs, &t, &out_range, &["--from", &from, "--to", &to])
        .summary(Duration::from_secs(120));
    eprintln!("range replay: {s} in {:.1?}", t0.elapsed());
    assert_eq!(s["events"], 4, "{s}");
    assert_eq!(s["dead_letters"], 0);
    assert_eq!(s["pairs"], 12, "4 events x 3 candidates");
    let range_out = outputs(&bs, &out_range, 4);
    assert_eq!(
        range_out.keys().cloned().collect::<HashSet<_>>(),
        in_range,
        "exactly the events stamped inside [from, to)"
    );

    // Everything, twice; more input arrives during the first run and must not be read: the end
    // offsets are the ones seen at start.
    let a = spawn_replay(&bs, &t, &out_a, &["--from", "0"]);
    assert!(
        a.wait_logged("replay planned", Duration::from_secs(60)),
        "replay did not plan"
    );
    let late = &scifact_events(16, 3)[12..];
    rt.block_on(produce_now(&bs, &t.input, late, 2));
    let sa = a.summary(Duration::from_secs(120));
    assert_eq!(
        sa["events"], 12,
        "stopped at the end offsets captured at start: {sa}"
    );
    let run_a = outputs(&bs, &out_a, 12);
    assert_eq!(
        run_a.keys().cloned().collect::<HashSet<_>>(),
        (0..12).map(|i| format!("req-{i}")).collect::<HashSet<_>>(),
    );

    // A second full replay, stopped by --to at the offsets the first one ended at.
    let ends: Vec<i64> = sa["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| r[2].as_i64().expect("end"))
        .collect();
    assert!(
        ends.iter().all(|&e| e == ends[0]),
        "round-robin: equal ends {ends:?}"
    );
    let to = ends[0].to_string();
    let sb = spawn_replay(&bs, &t, &out_b, &["--from", "0", "--to", &to])
        .summary(Duration::from_secs(120));
    assert_eq!(sb["events"], 12, "{sb}");
    let run_b = outputs(&bs, &out_b, 12);
    assert_eq!(
        run_a, run_b,
        "two replays of the same input differ beyond timings"
    );
    for (id, v) in &range_out {
        assert_eq!(
            &run_a[id], v,
            "{id}: scored in other batches (range-only replay), the output differs"
        );
    }
}
