//! End-to-end tests on real parts: a tansu broker process, the `reranker` binary, the real model,
//! and a Python reference scorer.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PARITY_TOL: f64 = 1e-4;

fn assert_sorted_and_ranked(out: &Value, k: usize) {
    let results = out["results"].as_array().expect("results");
    assert!(results.len() <= k);
    let mut prev = f64::INFINITY;
    for (i, r) in results.iter().enumerate() {
        let s = r["score"].as_f64().expect("score");
        assert!(s <= prev, "results not sorted best first: {out}");
        prev = s;
        assert_eq!(r["rank"].as_u64(), Some(i as u64 + 1));
        let rel = r["relevance"].as_f64().expect("relevance");
        assert!(
            (rel - 1.0 / (1.0 + (-s).exp())).abs() < 1e-5,
            "relevance is sigmoid(score)"
        );
    }
}

/// 500 events × 20 candidates over 4 partitions: every event comes out once, sorted, cut to top_n,
/// keyed like its input, and every score matches the reference scorer run pair by pair.
#[test]
fn round_trip_matches_reference_scores() {
    // Short sequences keep 10,000 pairs within CI time on 2 cores; parity does not depend on length.
    let max_length = 32;
    let events = scifact_events(500, 20);
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("roundtrip", 4, &events);

    let max_pairs = 32;
    let mut w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            format!("model.max_length={max_length}"),
            format!("batch.max_batch_pairs={max_pairs}"),
            "batch.max_wait_ms=20".into(),
        ],
    );
    let recs = collect(&bs, &[&t.output, &t.dlq], Duration::from_secs(900), |r| {
        r.len() >= events.len()
    });
    assert_eq!(
        w.terminate(Duration::from_secs(60)),
        Some(0),
        "clean exit on SIGTERM\n{}",
        w.log_text()
    );
    assert_eq!(
        recs.len(),
        events.len(),
        "exactly one record per input event"
    );
    assert!(
        recs.iter().all(|r| r.topic == t.output),
        "no dead letters for valid events"
    );

    let by_id: HashMap<String, &Value> = events
        .iter()
        .map(|e| (e["request_id"].as_str().unwrap().to_string(), e))
        .collect();
    let mut pairs = Vec::new();
    let mut got = Vec::new();
    let mut seen = HashSet::new();
    for r in &recs {
        let out = r.json();
        let id = out["request_id"].as_str().expect("request_id").to_string();
        assert!(seen.insert(id.clone()), "duplicate output for {id}");
        let input = by_id[&id];
        let n: usize = id.trim_start_matches("req-").parse().unwrap();
        assert_eq!(r.key_str(), format!("k{n}"), "output keeps the input key");
        assert_eq!(out["candidates"].as_u64(), Some(20));
        assert_eq!(out["results"].as_array().unwrap().len(), 5, "top_n = 5");
        assert_sorted_and_ranked(&out, 5);
        for res in out["results"].as_array().unwrap() {
            let orig = res["original_rank"].as_u64().unwrap() as usize - 1;
            let cand = &input["candidates"][orig];
            assert_eq!(res["id"], cand["id"]);
            pairs.push((
                input["query"].as_str().unwrap().to_string(),
                cand["text"].as_str().unwrap().to_string(),
            ));
            got.push(res["score"].as_f64().unwrap());
        }
    }
    let reference = reference_scores(&pairs, max_length);
    let worst = got
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= PARITY_TOL, "max |pipeline - reference| = {worst}");

    // With all four partitions backlogged, batches must be (nearly) full.
    let stopped = w.logged("stopped");
    let mean = stopped[0]["mean_batch_pairs"].as_f64().expect("stats");
    assert!(
        mean >= 0.9 * max_pairs as f64,
        "mean batch size {mean} vs max {max_pairs}"
    );
}

fn bad_inputs() -> Vec<(Option<Vec<u8>>, &'static str)> {
    let long = "x".repeat(70_000);
    vec![
        (Some(b"{not json".to_vec()), "invalid_json"),
        (Some(vec![0xff, 0xfe, b'{', b'}']), "invalid_utf8"),
        (
            Some(br#"{"schema_version":1,"request_id":"r","query":"q"}"#.to_vec()),
            "schema_violation",
        ),
        (
            Some(br#"{"schema_version":2,"request_id":"r","query":"q","candidates":[]}"#.to_vec()),
            "unsupported_schema_version",
        ),
        (
            Some(br#"{"schema_version":1,"request_id":"r","query":"","candidates":[{"id":"a","text":"t"}]}"#.to_vec()),
            "empty_query",
        ),
        (
            Some(
                serde_json::to_vec(&json!({"schema_version":1,"request_id":"r","query":"q",
                    "candidates": (0..9).map(|i| json!({"id": i.to_string(), "text": "t"})).collect::<Vec<_>>()}))
                .unwrap(),
            ),
            "too_many_candidates",
        ),
        (
            Some(
                serde_json::to_vec(&json!({"schema_version":1,"request_id":"r","query":"q",
                    "candidates":[{"id":"a","text": long}]}))
                .unwrap(),
            ),
            "text_too_long",
        ),
        (None, "empty_payload"),
    ]
}

/// Every kind of bad input lands in the dead-letter topic with its code and the original bytes;
/// the good events around them all come out.
#[test]
fn bad_events_go_to_the_dead_letter_topic() {
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("dlq");
    rt.block_on(t.create(&bs, 2));
    let bad = bad_inputs();
    let mut inputs = Vec::new();
    let good = scifact_events(40, 4);
    let mut g = good.iter().enumerate();
    for (i, (payload, _)) in bad.iter().enumerate() {
        for _ in 0..5 {
            if let Some((j, e)) = g.next() {
                inputs.push(Input::json(&format!("good-{j}"), e, (j % 2) as i32));
            }
        }
        inputs.push(Input {
            key: Some(format!("bad-{i}").into_bytes()),
            payload: payload.clone(),
            partition: Some((i % 2) as i32),
            headers: vec![(
                "traceparent".into(),
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
            )],
        });
    }
    for (j, e) in g {
        inputs.push(Input::json(&format!("good-{j}"), e, (j % 2) as i32));
    }
    rt.block_on(produce(&bs, &t.input, &inputs));
    let _w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            "limits.max_candidates=8".into(),
            "limits.max_text_bytes=65536".into(),
            "model.max_length=64".into(),
        ],
    );
    let total = inputs.len();
    let recs = collect(&bs, &[&t.output, &t.dlq], Duration::from_secs(300), |r| {
        r.len() >= total
    });
    let dead: Vec<&Record> = recs.iter().filter(|r| r.topic == t.dlq).collect();
    assert_eq!(dead.len(), bad.len(), "one dead letter per bad input");
    for d in dead {
        let v = d.json();
        let i: usize = d
            .key_str()
            .trim_start_matches("bad-")
            .parse()
            .expect("bad key");
        let (payload, code) = &bad[i];
        assert_eq!(v["error"]["code"].as_str(), Some(*code), "{v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty());
        assert_eq!(v["source"]["topic"].as_str(), Some(t.input.as_str()));
        assert_eq!(v["source"]["partition"].as_i64(), Some((i % 2) as i64));
        assert!(v["source"]["offset"].as_i64().is_some());
        // The dead letter carries the event's own span, in the caller's trace.
        let tp = String::from_utf8_lossy(d.headers.get("traceparent").expect("traceparent"));
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-")
                && !tp.contains("b7ad6b7169203331"),
            "trace context travels with dead letters: {tp}"
        );
        // The original bytes are recoverable.
        let data = &v["payload"]["data"];
        match payload {
            None => assert!(data.is_null()),
            Some(p) => {
                let back = if v["payload"]["encoding"] == "base64" {
                    use base64::Engine;
                    base64::engine::general_purpose::STANDARD
                        .decode(data.as_str().unwrap())
                        .unwrap()
                } else {
                    data.as_str().unwrap().as_bytes().to_vec()
                };
                assert_eq!(&back, p);
            }
        }
    }
    let ids = distinct_request_ids(&recs, &t.output);
    assert_eq!(ids.len(), good.len(), "every good event is reranked");
}

/// SIGKILL mid-stream, start again: every input has an output (duplicates allowed, none missing).
#[test]
fn restart_after_sigkill_loses_nothing() {
    let events = scifact_events(400, 8);
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("restart", 4, &events);
    // A static member: the restart takes the killed member's partitions (see `static_member`).
    let mut args = vec!["model.max_length=32".to_string()];
    args.extend(static_member(&format!("{}-0", t.group)));
    let mut first = WorkerProc::spawn(&bs, &t, &args);
    // Kill it once part of the stream is out.
    let part = collect(&bs, &[&t.output], Duration::from_secs(300), |r| {
        r.len() >= 100
    });
    assert!(
        part.len() >= 100,
        "first worker produced output\n{}",
        first.log_text()
    );
    first.kill();
    let second = WorkerProc::spawn(&bs, &t, &args);
    assert!(
        second.wait_partitions(Duration::from_secs(120)),
        "the restarted worker was never assigned partitions\n{}",
        second.log_text()
    );
    let recs = collect(&bs, &[&t.output], Duration::from_secs(600), |r| {
        distinct_request_ids(r, &t.output).len() >= events.len()
    });
    let ids = distinct_request_ids(&recs, &t.output);
    let missing: Vec<_> = (0..events.len())
        .map(|i| format!("req-{i}"))
        .filter(|id| !ids.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "missing outputs after restart: {missing:?}"
    );
}

/// SIGTERM drains and commits: a successor in the same group re-emits nothing already done.
#[test]
fn sigterm_drains_commits_and_exits_zero() {
    let events = scifact_events(60, 4);
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("drain", 2, &events);
    let args = ["model.max_length=32".to_string()];
    let mut w = WorkerProc::spawn(&bs, &t, &args);
    let recs = collect(&bs, &[&t.output], Duration::from_secs(300), |r| {
        r.len() >= events.len()
    });
    assert_eq!(recs.len(), events.len());
    assert_eq!(
        w.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        w.log_text()
    );

    // A successor with the same group starts from the committed offsets: nothing to redo.
    let w2 = WorkerProc::spawn(&bs, &t, &args);
    assert!(
        w2.wait_logged("partitions assigned", Duration::from_secs(60)),
        "{}",
        w2.log_text()
    );
    std::thread::sleep(Duration::from_secs(5));
    let again = collect(&bs, &[&t.output], Duration::from_secs(10), |_| false);
    assert_eq!(
        again.len(),
        events.len(),
        "no re-processing after a clean shutdown"
    );
}

/// With a deep backlog and a tiny in-flight bound the worker pauses and resumes its partitions,
/// its memory stays bounded, and every event is still processed.
#[test]
fn backpressure_pauses_and_bounds_memory() {
    let events = scifact_events(600, 10);
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("backpressure", 4, &events);
    let w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            "model.max_length=32".into(),
            "batch.max_batch_pairs=16".into(),
            "flow.max_inflight_pairs=64".into(),
            "flow.fetch_queue_kbytes=256".into(),
        ],
    );
    let mut peak_rss = 0;
    let recs = collect(&bs, &[&t.output], Duration::from_secs(900), |r| {
        if let Some(rss) = w.rss_kb() {
            peak_rss = peak_rss.max(rss);
        }
        r.len() >= events.len()
    });
    assert_eq!(distinct_request_ids(&recs, &t.output).len(), events.len());
    let pauses = w.logged("backpressure: partitions paused");
    let resumes = w.logged("backpressure: partitions resumed");
    assert!(
        pauses.len() >= 2 && resumes.len() >= 2,
        "pauses {} resumes {}",
        pauses.len(),
        resumes.len()
    );
    for p in &pauses {
        let inflight = p["inflight_pairs"].as_u64().unwrap();
        // The bound is checked per event, so it may be passed by at most one event's pairs.
        assert!(
            inflight < 64 + 10,
            "in-flight {inflight} far past the bound"
        );
    }
    // The model and ONNX Runtime take ~300 MB; the backlog (~12 MB of events) must not add to it.
    assert!(peak_rss < 900 * 1024, "peak RSS {peak_rss} kB");
}

/// Backpressure with events of production size (100 candidates of 300–1,000 bytes, batched by
/// the producer): the worker pauses and resumes inside multi-record batches, and every event
/// still gets its output.
#[test]
fn backpressure_with_production_sized_events_answers_every_event() {
    let events = realistic_events(43);
    for e in &events {
        let c = e["candidates"].as_array().expect("candidates");
        assert_eq!(c.len(), 100);
        assert!(c.iter().all(|c| {
            let l = c["text"].as_str().expect("text").len();
            (298..=1000).contains(&l)
        }));
    }
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("bp-real", 2, &events);
    let w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            "model.file=\"model_int8.onnx\"".into(),
            "model.max_length=16".into(),
            "batch.max_batch_pairs=64".into(),
            "flow.max_inflight_pairs=250".into(),
            "flow.fetch_queue_kbytes=64".into(),
            "kafka.statistics_interval_ms=1000".into(),
        ],
    );
    let mut seen = SeenIds::default();
    collect(&bs, &[&t.output], Duration::from_secs(600), |r| {
        seen.update(r, &t.output) >= events.len()
    });
    let missing: Vec<String> = (0..events.len())
        .map(|i| format!("req-{i}"))
        .filter(|id| !seen.ids.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} events without output: {missing:?}\n{}",
        missing.len(),
        events.len(),
        w.log_text()
    );
    let pauses = w.logged("backpressure: partitions paused").len();
    let resumes = w.logged("backpressure: partitions resumed").len();
    assert!(
        pauses >= 2 && resumes >= 2,
        "pauses {pauses} resumes {resumes}"
    );
    assert!(
        w.logged("partition stalled: position not moving and not at the high watermark")
            .is_empty(),
        "{}",
        w.log_text()
    );
}
