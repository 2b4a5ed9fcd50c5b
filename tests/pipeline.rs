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
    let recs = answered_then_stopped(
        &bs,
        &[&t.output, &t.dlq],
        &mut w,
        events.len(),
        Duration::from_secs(900),
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
            "pipeline.admission_threads=1".into(),
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
        // The bound is checked per event, after its pairs are counted; the events still being
        // decoded by the one admission thread (two at most) count only once they are tokenized.
        // So it may be passed by three events' pairs at most.
        assert!(
            inflight < 64 + 3 * 10,
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

/// The grown input/output contract across Kafka: an event from a newer producer (minor version,
/// unknown fields at both levels) is scored rather than dead-lettered; candidates are scored by
/// the text `input.text_template` builds from their fields; `min_relevance` and `return_text`
/// per event, and `output.labels`, shape the output; a candidate without a templated field is a
/// `missing_template_field` dead letter. Every record validates against its published schema.
#[test]
fn contract_options_round_trip() {
    let max_length = 64;
    let base = scifact_events(1, 6).remove(0);
    let query = base["query"].as_str().unwrap().to_string();
    // Structured candidates: a title (the text's first words) beside the text, plus a field this
    // worker does not know.
    let candidates: Vec<Value> = base["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let text = c["text"].as_str().unwrap();
            let title: String = text
                .split_whitespace()
                .take(6)
                .collect::<Vec<_>>()
                .join(" ");
            json!({"id": c["id"], "title": title, "text": text, "url": "https://example.org/x"})
        })
        .collect();
    let event = |id: &str, extra: Value| {
        let mut e = json!({"schema_version": "1.1", "request_id": id, "query": query,
            "candidates": candidates, "top_n": 10, "tenant": {"name": "t", "tier": [1, 2]}});
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        e
    };
    let mut missing = candidates.clone();
    missing[2].as_object_mut().unwrap().remove("title");
    let events = [
        event("req-all", json!({"return_text": true})),
        event(
            "req-filtered",
            json!({"min_relevance": 0.12, "return_text": false}),
        ),
        event("req-missing", json!({"candidates": missing})),
    ];
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("contract", 1, &events);
    let mut w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            format!("model.max_length={max_length}"),
            r#"input.text_template="{title}\n{text}""#.into(),
            r#"input.missing_template_field="dead_letter""#.into(),
            r#"output.labels=[{name="unlikely",min_relevance=0.0},{name="likely",min_relevance=0.3},{name="very likely",min_relevance=0.7}]"#.into(),
        ],
    );
    let recs = answered_then_stopped(
        &bs,
        &[&t.output, &t.dlq],
        &mut w,
        events.len(),
        Duration::from_secs(300),
    );

    let schema = |name: &str| {
        let path = repo_root().join("schemas").join(name);
        let doc: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        jsonschema::draft202012::new(&doc).unwrap()
    };
    let (reranked, dead_letter) = (schema("reranked.v1.json"), schema("dead-letter.v1.json"));
    let mut outputs: HashMap<String, Value> = HashMap::new();
    for r in &recs {
        let v = r.json();
        if r.topic == t.dlq {
            assert!(dead_letter.is_valid(&v), "{v}");
            assert_eq!(v["error"]["code"], "missing_template_field", "{v}");
            assert_eq!(r.key_str(), "k2");
            continue;
        }
        assert!(reranked.is_valid(&v), "{v}");
        outputs.insert(v["request_id"].as_str().unwrap().to_string(), v);
    }
    let all = outputs["req-all"]["results"].as_array().unwrap();
    assert_eq!(
        all.len(),
        candidates.len(),
        "newer event scored, not dead-lettered"
    );
    assert_sorted_and_ranked(&outputs["req-all"], 10);

    // The scored text is the built one: the output echoes it (return_text) and the reference
    // scorer agrees on it.
    let mut pairs = Vec::new();
    for r in all {
        let c = &candidates[r["original_rank"].as_u64().unwrap() as usize - 1];
        let built = format!(
            "{}\n{}",
            c["title"].as_str().unwrap(),
            c["text"].as_str().unwrap()
        );
        assert_eq!(r["text"].as_str(), Some(built.as_str()));
        pairs.push((query.clone(), built));
        let rel = r["relevance"].as_f64().unwrap();
        let want = if rel >= 0.7 {
            "very likely"
        } else if rel >= 0.3 {
            "likely"
        } else {
            "unlikely"
        };
        assert_eq!(r["label"].as_str(), Some(want), "{r}");
    }
    let reference = reference_scores(&pairs, max_length);
    for (r, want) in all.iter().zip(&reference) {
        let got = r["score"].as_f64().unwrap();
        assert!(
            (got - want).abs() <= PARITY_TOL,
            "{got} vs reference {want}"
        );
    }

    // min_relevance keeps exactly the results at or above it; return_text false omits texts.
    let filtered = outputs["req-filtered"]["results"].as_array().unwrap();
    let expected: Vec<&Value> = all
        .iter()
        .filter(|r| r["relevance"].as_f64().unwrap() >= 0.12)
        .map(|r| &r["id"])
        .collect();
    let got: Vec<&Value> = filtered.iter().map(|r| &r["id"]).collect();
    assert_eq!(got, expected);
    // This query's candidates fall on both sides of 0.12 (0.08 to 0.48), so the threshold is exercised.
    assert!(!got.is_empty() && got.len() < all.len(), "{all:?}");
    assert!(filtered.iter().all(|r| r.get("text").is_none()));
    assert_eq!(
        outputs["req-filtered"]["candidates"].as_u64(),
        Some(candidates.len() as u64)
    );

    // Each unknown field name is logged once, however many events carry it.
    let logged: Vec<String> = w
        .logged("input field not known to this worker: ignored (input.strict = false); logged once per name")
        .iter()
        .map(|l| l["field"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut names = logged.clone();
    names.sort();
    assert_eq!(names, ["candidates[].url", "tenant"], "{logged:?}");
}

/// One pair that makes the model fail, among good traffic: a model that fails at run time on one
/// token (tests/common/poison.rs), one candidate of one event holding that token. Only that event
/// is dead-lettered, naming the candidate; every other event is answered with the reference scores.
#[test]
fn a_pair_that_fails_inference_alone_dead_letters_only_its_event() {
    let max_length = 32;
    let word = "zeppelin";
    let tok: Value = serde_json::from_slice(
        &std::fs::read(model_dir().join("tokenizer.json")).expect("tokenizer.json"),
    )
    .expect("tokenizer json");
    let sentinel = tok["model"]["vocab"][word]
        .as_i64()
        .expect("the sentinel is one token");
    let mut events = scifact_events(30, 10);
    assert!(
        !events
            .iter()
            .any(|e| e.to_string().to_lowercase().contains(word)),
        "the good traffic must not hold the sentinel"
    );
    let poisoned = events[15]["request_id"].as_str().unwrap().to_string();
    let bad_candidate = events[15]["candidates"][3]["id"].clone();
    let text = events[15]["candidates"][3]["text"].as_str().unwrap();
    events[15]["candidates"][3]["text"] = json!(format!("{word} {text}"));

    let dir = std::env::temp_dir().join(unique("poisoned-model"));
    common::poison::write_poisoned_model(&model_dir(), &dir, sentinel);
    let Backlog {
        bootstrap: bs,
        topics: t,
        broker: _broker,
        ..
    } = backlog("poison", 2, &events);
    let mut w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            format!("model.dir={:?}", dir.display().to_string()),
            format!("model.max_length={max_length}"),
            "batch.max_batch_pairs=32".into(),
            "batch.max_wait_ms=50".into(),
            "inference.retry_backoff_ms=10".into(),
        ],
    );
    let recs = answered_then_stopped(
        &bs,
        &[&t.output, &t.dlq],
        &mut w,
        events.len(),
        Duration::from_secs(600),
    );
    let _ = std::fs::remove_dir_all(&dir);

    let dead: Vec<Value> = recs
        .iter()
        .filter(|r| r.topic == t.dlq)
        .map(|r| r.json())
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "only the poisoned event is dead-lettered: {dead:?}"
    );
    let d = &dead[0];
    assert_eq!(d["error"]["code"], "inference_failed", "{d}");
    let message = d["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains(&format!("candidate {bad_candidate}"))
            && message.contains("out of data bounds"),
        "{message}"
    );
    let payload: Value =
        serde_json::from_str(d["payload"]["data"].as_str().expect("payload")).expect("json");
    assert_eq!(payload["request_id"].as_str(), Some(poisoned.as_str()));

    // The poisoned pair shared its batch with others, which were scored after the split.
    let stopped = w.logged("stopped");
    assert_eq!(
        stopped[0]["inference_retries"].as_u64(),
        Some(2),
        "inference.max_retries"
    );
    assert!(
        stopped[0]["inference_split_runs"].as_u64().unwrap_or(0) >= 2,
        "{}",
        stopped[0]
    );

    let by_id: HashMap<String, &Value> = events
        .iter()
        .map(|e| (e["request_id"].as_str().unwrap().to_string(), e))
        .collect();
    let (mut pairs, mut got) = (Vec::new(), Vec::new());
    for r in recs.iter().filter(|r| r.topic == t.output) {
        let out = r.json();
        let input = by_id[out["request_id"].as_str().expect("request_id")];
        assert_eq!(out["results"].as_array().map(Vec::len), Some(5));
        for res in out["results"].as_array().unwrap() {
            let orig = res["original_rank"].as_u64().unwrap() as usize - 1;
            pairs.push((
                input["query"].as_str().unwrap().to_string(),
                input["candidates"][orig]["text"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            ));
            got.push(res["score"].as_f64().unwrap());
        }
    }
    assert_eq!(got.len(), (events.len() - 1) * 5);
    let reference = reference_scores(&pairs, max_length);
    let worst = got
        .iter()
        .zip(&reference)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(worst <= PARITY_TOL, "max |pipeline - reference| = {worst}");
}

/// Deadlines are honoured while events wait: a burst of 60 events × 10 candidates, each with 3 s
/// to live from its production, is far more work than 3 s of the real model on this machine. The
/// events that are not scored in time leave the queue as `deadline_exceeded` dead letters (not at
/// decode: they were read in time), the others are answered, and nothing is lost.
#[test]
fn events_whose_deadline_passes_in_the_queue_are_dead_lettered_before_inference() {
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("deadline");
    rt.block_on(t.create(&bs, 2));
    let mut w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            "model.max_length=128".into(),
            "batch.max_batch_pairs=16".into(),
            "batch.max_wait_ms=20".into(),
        ],
    );
    assert!(
        w.wait_partitions(Duration::from_secs(120)),
        "{}",
        w.log_text()
    );
    let mut events = scifact_events(60, 10);
    for e in &mut events {
        e["deadline_ms"] = json!(3000);
    }
    let inputs: Vec<Input> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("k{i}"), e, i as i32 % 2))
        .collect();
    rt.block_on(produce(&bs, &t.input, &inputs));
    let recs = answered_then_stopped(
        &bs,
        &[&t.output, &t.dlq],
        &mut w,
        events.len(),
        Duration::from_secs(300),
    );
    let outputs = recs.iter().filter(|r| r.topic == t.output).count();
    let dead: Vec<Value> = recs
        .iter()
        .filter(|r| r.topic == t.dlq)
        .map(|r| r.json())
        .collect();
    assert!(outputs > 0, "the first events are scored in time");
    assert!(
        !dead.is_empty(),
        "60 × 10 pairs of 128 tokens take more than 3 s here"
    );
    for d in &dead {
        assert_eq!(d["error"]["code"], "deadline_exceeded", "{d}");
        let m = d["error"]["message"].as_str().unwrap_or("");
        assert!(
            m.contains("before its pairs were scored"),
            "left the queue, not refused at decode: {m}"
        );
    }
    let stopped = w.logged("stopped");
    assert_eq!(
        stopped[0]["deadline_missed"].as_u64(),
        Some(dead.len() as u64)
    );
    // Expired pairs never reached the model.
    let scored = stopped[0]["pairs_scored"].as_u64().expect("pairs_scored");
    assert!(scored < 600, "{scored} pairs scored");
}

/// Priority lanes across Kafka: a backlog of 60 bulk events (the worker's `priority.default`)
/// and, produced last, one event whose record header says `priority: 9`. The worker admits the
/// whole backlog at once, so the late event's pairs meet ~600 bulk pairs in the pool: as an
/// interactive event they lead the next batch, where oldest-first batching would score them about
/// last. Measured by each output's `timings.end_to_end_ms` (record timestamp to output): the
/// interactive event must finish before at least three quarters of the bulk events.
#[test]
fn an_interactive_event_overtakes_a_bulk_backlog() {
    let mut events = scifact_events(61, 10);
    let urgent = events[60]["request_id"].as_str().unwrap().to_string();
    events[60]["candidates"] = json!(events[60]["candidates"].as_array().unwrap()[..4]);
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("lanes");
    rt.block_on(t.create(&bs, 2));
    let mut inputs: Vec<Input> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("k{i}"), e, i as i32 % 2))
        .collect();
    inputs[60].headers.push(("priority".into(), b"9".to_vec()));
    rt.block_on(produce(&bs, &t.input, &inputs));
    let mut w = bulk_by_default(&bs, &t, &[]);
    let recs = answered_then_stopped(
        &bs,
        &[&t.output, &t.dlq],
        &mut w,
        events.len(),
        Duration::from_secs(600),
    );
    assert!(recs.iter().all(|r| r.topic == t.output), "no dead letters");
    let mut bulk = Vec::new();
    let mut interactive = None;
    for r in &recs {
        let out = r.json();
        let ms = out["timings"]["end_to_end_ms"]
            .as_f64()
            .expect("end_to_end_ms");
        if out["request_id"] == urgent.as_str() {
            interactive = Some(ms);
        } else {
            bulk.push(ms);
        }
    }
    let interactive = interactive.expect("the interactive event was answered");
    let later = bulk.iter().filter(|&&ms| ms > interactive).count();
    assert!(
        later * 4 >= bulk.len() * 3,
        "the interactive event took {interactive} ms; only {later} of {} bulk events took longer",
        bulk.len()
    );
}

/// A worker whose events are bulk unless they say otherwise, with small batches of the real model
/// (so a backlog lasts), and `extra` settings.
fn bulk_by_default(bs: &str, t: &Topics, extra: &[String]) -> WorkerProc {
    let mut args: Vec<String> = vec![
        "model.max_length=128".into(),
        "batch.max_batch_pairs=16".into(),
        "priority.default=\"bulk\"".into(),
    ];
    args.extend_from_slice(extra);
    WorkerProc::spawn(bs, t, &args)
}

/// Lane-aware backpressure across Kafka: a bulk backlog on partitions 0 and 1 holds the worker at
/// its bulk threshold, and interactive events (header `priority: 9`) produced to partition 2 one
/// by one are still fetched at once, not after the backlog has drained to the resume point.
///
/// Measured in bulk events answered while each interactive event waited (output record
/// timestamps). Lane-aware, 1–2 each; pausing every partition at the bound instead
/// (`LANE_TEST_RESERVE=0` sets `interactive_reserve_ratio = 0`) they waited behind 102–105 of the
/// 120 bulk events, as the fetcher refilled from the bulk partitions at every resume. The bound
/// is half of the (400 − 40) pairs = 18 events of 20 pairs that one pause cycle drains.
#[test]
fn interactive_partitions_keep_fetching_while_bulk_backpressure_pauses_the_rest() {
    let bulk_events = scifact_events(120, 20);
    let mut interactive = scifact_events(125, 4).split_off(120);
    for (i, e) in interactive.iter_mut().enumerate() {
        e["request_id"] = json!(format!("urgent-{i}"));
    }
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("lanebp");
    rt.block_on(t.create(&bs, 3));
    let inputs: Vec<Input> = bulk_events
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("b{i}"), e, i as i32 % 2))
        .collect();
    rt.block_on(produce(&bs, &t.input, &inputs));
    let mut w = bulk_by_default(
        &bs,
        &t,
        &[
            "flow.max_inflight_pairs=400".into(),
            "flow.resume_ratio=0.1".into(),
            format!(
                "flow.interactive_reserve_ratio={}",
                std::env::var("LANE_TEST_RESERVE").unwrap_or("0.5".into())
            ),
        ],
    );
    assert!(
        w.wait_logged("backpressure: partitions paused", Duration::from_secs(180)),
        "the bulk backlog never reached the bulk threshold\n{}",
        w.log_text()
    );
    for (i, e) in interactive.iter().enumerate() {
        let mut input = Input::json(&format!("u{i}"), e, 2);
        input.headers.push(("priority".into(), b"9".to_vec()));
        rt.block_on(produce(&bs, &t.input, &[input]));
        std::thread::sleep(Duration::from_millis(700));
    }
    // Until every interactive event is answered; the bulk backlog is left to the drain.
    let is_urgent = |r: &Record| {
        r.json()["request_id"]
            .as_str()
            .is_some_and(|id| id.starts_with("urgent-"))
    };
    let recs = collect(&bs, &[&t.output, &t.dlq], Duration::from_secs(600), |r| {
        r.iter().filter(|r| is_urgent(r)).count() >= interactive.len()
    });
    assert_eq!(
        w.terminate(Duration::from_secs(120)),
        Some(0),
        "{}",
        w.log_text()
    );
    assert!(recs.iter().all(|r| r.topic == t.output), "no dead letters");

    let answered_at = |r: &Record| r.timestamp_ms.expect("output timestamp");
    let bulk_done: Vec<i64> = recs
        .iter()
        .filter(|r| !is_urgent(r))
        .map(answered_at)
        .collect();
    let mut overtaken_by = Vec::new();
    for r in recs.iter().filter(|r| is_urgent(r)) {
        let out = answered_at(r);
        let waited = r.json()["timings"]["end_to_end_ms"]
            .as_f64()
            .expect("end_to_end_ms") as i64;
        let produced = out - waited;
        overtaken_by.push(
            bulk_done
                .iter()
                .filter(|&&at| at > produced && at < out)
                .count(),
        );
    }
    assert_eq!(overtaken_by.len(), interactive.len());
    assert!(
        bulk_done.len() < bulk_events.len(),
        "the backlog drained before the interactive events were answered: nothing was measured"
    );
    eprintln!(
        "bulk events answered while each interactive event waited: {overtaken_by:?}; \
         {} of {} bulk events answered by then",
        bulk_done.len(),
        bulk_events.len()
    );
    let worst = overtaken_by.iter().max().copied().unwrap_or(0);
    assert!(
        worst <= 9,
        "bulk events answered while each interactive event waited: {overtaken_by:?}"
    );
    // The mechanism: the two bulk partitions were paused without the interactive one.
    let bulk_pauses = w.logged("backpressure: partitions paused");
    assert!(
        bulk_pauses
            .iter()
            .any(|p| p["lanes"] == "bulk" && p["partitions"] == 2 && p["assigned"] == 3),
        "no pause of the two bulk partitions alone: {bulk_pauses:?}"
    );
}
