//! Fault suite: worker crashes, scaling the consumer group in and out, and a poison corpus — all on
//! a real broker with the real binary. Nothing may be lost: every input has an output or a dead letter.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn assert_nothing_lost(ids: &HashSet<String>, n: usize) {
    let lost: Vec<String> = (0..n)
        .map(|i| format!("req-{i}"))
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} events without output, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

/// Reads the output topic from the start until every id is present or the timeout passes,
/// calling `step` with the count of distinct ids seen so far.
fn wait_for_all(
    bs: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
    mut step: impl FnMut(usize),
) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut scanned = 0;
    collect(bs, &[topic], timeout, |recs| {
        for r in &recs[scanned..] {
            if let Some(id) = r.json()["request_id"].as_str() {
                ids.insert(id.to_string());
            }
        }
        scanned = recs.len();
        step(ids.len());
        ids.len() >= n
    });
    ids
}

/// Five SIGKILLs of the only worker, each restarted at once. The worker is a static group member
/// (`static_member`, KIP-345), as a StatefulSet pod would be: the restarted process takes the
/// killed member's place and its partitions without waiting for a session to expire. A dynamic
/// member restarted after a SIGKILL can be handed an empty assignment for good by tansu 0.6's
/// group coordinator (reproduced with plain consumers in `tests/tansu_group.rs`).
#[test]
fn five_sigkills_during_a_6k_event_run_lose_nothing() {
    // Enough for about 1,000 outputs between kills: each restart resumes inside a batch of
    // records committed part-way, which is what the kills are for; more events only add time.
    let n = 6_000;
    let events = tiny_events(n);
    let b = backlog("kill5", 4, &events);
    let mut args = fast_args();
    args.extend(static_member(&format!("{}-0", b.topics.group)));
    let mut worker = WorkerProc::spawn(&b.bootstrap, &b.topics, &args);
    let mut kills = 0;
    let t0 = Instant::now();
    let ids = wait_for_all(
        &b.bootstrap,
        &b.topics.output,
        n,
        Duration::from_secs(1200),
        |seen| {
            // Kill at roughly every sixth of the run, then restart at once.
            if kills < 5 && seen >= (kills + 1) * n / 6 {
                worker.kill();
                kills += 1;
                eprintln!("SIGKILL #{kills} at {seen} outputs, {:.0?}", t0.elapsed());
                worker = WorkerProc::spawn(&b.bootstrap, &b.topics, &args);
                let t = Instant::now();
                assert!(
                    worker.wait_partitions(Duration::from_secs(120)),
                    "restart #{kills} was never assigned partitions\n{}",
                    worker.log_text()
                );
                eprintln!("restart #{kills} assigned after {:.1?}", t.elapsed());
            }
        },
    );
    assert_eq!(kills, 5, "the run ended before five kills");
    assert_nothing_lost(&ids, n);
    eprintln!("{n} events, five SIGKILLs: {:.0?}", t0.elapsed());
}

/// Scale-out and scale-in happen at events, not at output counts: the added workers are
/// waited for until each has been assigned partitions, and only the second half of the input,
/// produced after that, counts toward scaling back in. So the three-worker phase exists however
/// fast the first worker drains its backlog.
#[test]
fn scaling_from_one_to_three_workers_and_back_loses_nothing() {
    let n = 6000;
    let parts = 6;
    let events = tiny_events(n);
    let inputs: Vec<Input> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("k{i}"), e, (i % parts) as i32))
        .collect();
    let b = backlog("scale", parts as i32, &events[..n / 2]);
    let args = fast_args();
    let first = WorkerProc::spawn(&b.bootstrap, &b.topics, &args);
    assert!(
        first.wait_partitions(Duration::from_secs(180)),
        "first worker never assigned\n{}",
        first.log_text()
    );
    let mut seen = SeenIds::default();
    collect(
        &b.bootstrap,
        &[&b.topics.output],
        Duration::from_secs(300),
        |r| seen.update(r, &b.topics.output) >= n / 10,
    );
    assert!(seen.ids.len() >= n / 10, "no progress with one worker");

    let mut extra: Vec<WorkerProc> = (0..2)
        .map(|_| WorkerProc::spawn(&b.bootstrap, &b.topics, &args))
        .collect();
    for w in &extra {
        assert!(
            w.wait_partitions(Duration::from_secs(180)),
            "an added worker was never assigned partitions\n{}",
            w.log_text()
        );
    }
    b.rt.block_on(produce(&b.bootstrap, &b.topics.input, &inputs[n / 2..]));
    let mut seen = SeenIds::default();
    collect(
        &b.bootstrap,
        &[&b.topics.output],
        Duration::from_secs(600),
        |r| seen.update(r, &b.topics.output) >= n / 2 + n / 5,
    );
    for w in &mut extra {
        assert_eq!(
            w.terminate(Duration::from_secs(60)),
            Some(0),
            "scale-in exits cleanly\n{}",
            w.log_text()
        );
    }
    let ids = wait_for_all(
        &b.bootstrap,
        &b.topics.output,
        n,
        Duration::from_secs(900),
        |_| {},
    );
    assert_nothing_lost(&ids, n);
    drop(first);
}

/// Generated malformed records of every kind, interleaved with good events.
fn poison(i: usize) -> (Option<Vec<u8>>, &'static str) {
    let good = json!({"schema_version": 1, "request_id": format!("bad-{i}"), "query": "q",
        "candidates": [{"id": "a", "text": "t"}]});
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        Some(serde_json::to_vec(&v).unwrap())
    };
    match i % 12 {
        0 => (Some(format!("{{\"schema_version\": 1, \"request_id\": \"{i}\"").into_bytes()), "invalid_json"),
        1 => (Some((0..64).map(|j| ((i * 31 + j * 7) % 256) as u8 | 0x80).collect()), "invalid_utf8"),
        // Nesting bomb inside pass-through metadata: must hit the parser's depth limit, not the stack.
        2 => (
            Some(
                format!(
                    r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[{{"id":"a","text":"t","metadata":{}}}]}}"#,
                    "{\"a\":".repeat(5000)
                )
                .into_bytes(),
            ),
            "invalid_json",
        ),
        3 => (with(&|v| v["candidates"] = json!("not a list")), "schema_violation"),
        4 => (with(&|v| v["query"] = json!(42)), "schema_violation"),
        // (An unknown field is ignored now unless input.strict; a bad known one is still refused.)
        5 => (with(&|v| v["priority"] = json!("urgent")), "schema_violation"),
        6 => (with(&|v| v["schema_version"] = json!(99)), "unsupported_schema_version"),
        7 => (with(&|v| v["query"] = json!("\u{3000} \t")), "empty_query"),
        8 => (with(&|v| v["candidates"] = json!([{"id": "a", "text": "x"}, {"id": "a", "text": "y"}])), "duplicate_candidate_id"),
        9 => (with(&|v| v["candidates"][0]["text"] = json!("y".repeat(40_000))), "text_too_long"),
        10 => (None, "empty_payload"),
        _ => (with(&|v| v["candidates"] = json!((0..300).map(|j| json!({"id": j.to_string(), "text": "t"})).collect::<Vec<_>>())), "too_many_candidates"),
    }
}

#[test]
fn poison_corpus_is_dead_lettered_and_good_events_flow() {
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("poison");
    rt.block_on(t.create(&bs, 3));
    let good = tiny_events(300);
    let n_bad = 240;
    let mut inputs = Vec::new();
    for i in 0..good.len().max(n_bad) {
        if let Some(e) = good.get(i) {
            inputs.push(Input::json(&format!("good-{i}"), e, (i % 3) as i32));
        }
        if i < n_bad {
            inputs.push(Input {
                key: Some(format!("bad-{i}").into_bytes()),
                payload: poison(i).0,
                partition: Some((i % 3) as i32),
                headers: Vec::new(),
            });
        }
    }
    rt.block_on(produce(&bs, &t.input, &inputs));
    let _w = WorkerProc::spawn(&bs, &t, &fast_args());
    let total = inputs.len();
    let recs = collect(&bs, &[&t.output, &t.dlq], Duration::from_secs(600), |r| {
        r.len() >= total
    });
    let dead: Vec<&Record> = recs.iter().filter(|r| r.topic == t.dlq).collect();
    assert_eq!(dead.len(), n_bad, "every bad record dead-lettered once");
    for d in dead {
        let i: usize = d.key_str().trim_start_matches("bad-").parse().expect("key");
        let v = d.json();
        assert_eq!(
            v["error"]["code"].as_str(),
            Some(poison(i).1),
            "record {i}: {}",
            v["error"]
        );
    }
    let out = distinct_request_ids(&recs, &t.output);
    assert_eq!(out.len(), good.len(), "every good event reranked");
}
