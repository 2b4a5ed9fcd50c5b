//! OpenTelemetry traces end to end: a real broker, the real worker exporting OTLP/HTTP (JSON) to
//! a receiver in this test, and trace context in Kafka headers.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde_json::Value;

use common::*;

/// Collects every OTLP/HTTP JSON request body, by path.
#[derive(Clone, Default)]
struct Receiver(Arc<Mutex<Vec<(String, Value)>>>);

impl Receiver {
    fn bodies(&self, path: &str) -> Vec<Value> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn spans(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for b in self.bodies("/v1/traces") {
            for rs in b["resourceSpans"].as_array().into_iter().flatten() {
                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                    out.extend(ss["spans"].as_array().into_iter().flatten().cloned());
                }
            }
        }
        out
    }

    fn metric_names(&self) -> HashSet<String> {
        let mut out = HashSet::new();
        for b in self.bodies("/v1/metrics") {
            for rm in b["resourceMetrics"].as_array().into_iter().flatten() {
                for sm in rm["scopeMetrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten() {
                        if let Some(n) = m["name"].as_str() {
                            out.insert(n.to_string());
                        }
                    }
                }
            }
        }
        out
    }
}

async fn start_receiver(rt: &tokio::runtime::Runtime) -> (Receiver, String) {
    let recv = Receiver::default();
    async fn take(path: &'static str, State(r): State<Receiver>, body: Bytes) -> &'static str {
        let v: Value = serde_json::from_slice(&body).expect("OTLP JSON body");
        r.0.lock().unwrap().push((path.to_string(), v));
        "{}"
    }
    let app = Router::new()
        .route(
            "/v1/traces",
            post(|s: State<Receiver>, b: Bytes| take("/v1/traces", s, b)),
        )
        .route(
            "/v1/metrics",
            post(|s: State<Receiver>, b: Bytes| take("/v1/metrics", s, b)),
        )
        .with_state(recv.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(async move { axum::serve(listener, app).await });
    (recv, format!("http://{addr}"))
}

/// `attributes` of an OTLP JSON span as key → value (string or integer, as a string).
fn attrs(span: &Value) -> BTreeMap<String, String> {
    span["attributes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let v = &a["value"];
            let s = v["stringValue"]
                .as_str()
                .map(str::to_string)
                .or_else(|| v["intValue"].as_i64().map(|i| i.to_string()))
                .or_else(|| v["intValue"].as_str().map(str::to_string))?;
            Some((a["key"].as_str()?.to_string(), s))
        })
        .collect()
}

fn parse_traceparent(v: &[u8]) -> (String, String, String) {
    let s = std::str::from_utf8(v).expect("utf-8 traceparent");
    let parts: Vec<&str> = s.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {s:?}");
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1].len(), 32);
    assert_eq!(parts[2].len(), 16);
    (parts[1].into(), parts[2].into(), parts[3].into())
}

#[test]
fn trace_context_flows_from_input_to_output_and_spans_are_exported() {
    let rt = rt();
    let mut broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("traces");
    rt.block_on(t.create(&bs, 2));
    let (recv, endpoint) = rt.block_on(start_receiver(&rt));

    // Distinct caller traces per event (random ids, so a hard-coded answer cannot pass), two
    // events without any context, and one malformed event with context.
    let salt = std::process::id() as u128;
    let events = scifact_events(14, 3);
    let mut inputs = Vec::new();
    let mut sent: HashMap<String, (String, String)> = HashMap::new(); // key -> (trace, parent span)
    for (i, e) in events.iter().enumerate() {
        let key = format!("k{i}");
        let mut input = Input::json(&key, e, i as i32 % 2);
        if i >= 2 {
            let trace = format!("{:032x}", (salt << 64) ^ (0x5eed_0000 + i as u128));
            let span = format!("{:016x}", 0xabc0_0000_u64 + i as u64);
            input.headers.push((
                "traceparent".into(),
                format!("00-{trace}-{span}-01").into_bytes(),
            ));
            input
                .headers
                .push(("tracestate".into(), format!("caller=k{i}").into_bytes()));
            sent.insert(key, (trace, span));
        }
        inputs.push(input);
    }
    let bad_trace = format!("{:032x}", (salt << 64) ^ 0xbad);
    inputs.push(Input {
        key: Some(b"broken".to_vec()),
        payload: Some(b"{\"schema_version\": 1, \"query\": ".to_vec()),
        partition: Some(0),
        headers: vec![(
            "traceparent".into(),
            format!("00-{bad_trace}-00000000000000aa-01").into_bytes(),
        )],
    });
    rt.block_on(produce(&bs, &t.input, &inputs));

    let mut w = WorkerProc::spawn_env(
        &bs,
        &t,
        &[
            "model.max_length=64".into(),
            "otel.traces=true".into(),
            "otel.metrics=true".into(),
            "otel.metrics_interval_ms=500".into(),
            "otel.protocol=\"http/json\"".into(),
            format!("otel.endpoint=\"{endpoint}\""),
        ],
        &[("OTEL_BSP_SCHEDULE_DELAY", "200")],
    );
    let recs = collect(&bs, &[&t.output, &t.dlq], Duration::from_secs(180), |r| {
        r.len() >= inputs.len()
    });
    assert_eq!(recs.len(), inputs.len(), "{}", w.log_text());

    // Kafka headers: the output carries the caller's trace with the worker's span as parent.
    let mut out_span: HashMap<String, String> = HashMap::new(); // key -> our span id
    for r in recs.iter().filter(|r| r.topic == t.output) {
        let key = r.key_str();
        let tp = r.headers.get("traceparent").expect("traceparent on output");
        let (trace, span, flags) = parse_traceparent(tp);
        assert_eq!(flags, "01", "sampled flag kept");
        match sent.get(&key) {
            Some((want_trace, parent)) => {
                assert_eq!(&trace, want_trace, "{key}: same trace as the input");
                assert_ne!(
                    &span, parent,
                    "{key}: the worker's own span, not the caller's"
                );
                assert_eq!(
                    r.headers.get("tracestate").map(|v| v.as_slice()),
                    Some(format!("caller={key}").as_bytes()),
                    "{key}: tracestate passes on"
                );
            }
            None => assert!(
                !sent.values().any(|(t, _)| *t == trace),
                "an input without context starts its own trace"
            ),
        }
        out_span.insert(key, span);
    }
    assert_eq!(out_span.len(), events.len());
    let dead = recs.iter().find(|r| r.topic == t.dlq).expect("dead letter");
    let (dead_trace, dead_span, _) = parse_traceparent(&dead.headers["traceparent"]);
    assert_eq!(dead_trace, bad_trace);

    // Exported spans: one consumer span per event, a child of the caller's span, whose id is
    // the one in the output's headers; batch spans link to the events they carried.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (spans, metric_names) = loop {
        let spans = recs_spans(&recv);
        let names = recv.metric_names();
        let have_all = out_span
            .values()
            .chain([&dead_span])
            .all(|id| spans.contains_key(id));
        if (have_all && names.contains("reranker.events.produced")) || Instant::now() > deadline {
            break (spans, names);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for (key, id) in &out_span {
        let s = spans
            .get(id)
            .unwrap_or_else(|| panic!("no span {id} for {key}; got {}", spans.len()));
        assert_eq!(
            s["name"].as_str(),
            Some(format!("process {}", t.input).as_str())
        );
        assert!(
            s["kind"] == 5 || s["kind"] == "SPAN_KIND_CONSUMER",
            "{}",
            s["kind"]
        );
        let a = attrs(s);
        assert_eq!(a["messaging.system"], "kafka");
        assert_eq!(a["messaging.destination.name"], t.input);
        assert_eq!(a["messaging.consumer.group.name"], t.group);
        assert_eq!(a["reranker.candidates"], "3");
        let input_partition = key[1..].parse::<i32>().unwrap() % 2;
        assert_eq!(
            a["messaging.destination.partition.id"],
            input_partition.to_string()
        );
        if let Some((trace, parent)) = sent.get(key) {
            assert_eq!(s["traceId"].as_str(), Some(trace.as_str()));
            assert_eq!(s["parentSpanId"].as_str(), Some(parent.as_str()));
        } else {
            assert!(s["parentSpanId"].as_str().unwrap_or("").is_empty());
        }
    }
    let ds = &spans[&dead_span];
    assert_eq!(
        ds["status"]["code"], 2,
        "dead letter span is an error: {ds}"
    );
    assert_eq!(attrs(ds)["error.type"], "invalid_json");

    let batches: Vec<&Value> = spans.values().filter(|s| s["name"] == "infer").collect();
    assert!(!batches.is_empty());
    let mut linked = HashSet::new();
    for b in &batches {
        let links = b["links"].as_array().cloned().unwrap_or_default();
        let a = attrs(b);
        assert_eq!(
            a["messaging.batch.message_count"],
            links.len().to_string(),
            "one link per event in the batch"
        );
        for l in links {
            linked.insert(l["spanId"].as_str().unwrap_or("").to_string());
        }
    }
    for (key, id) in &out_span {
        assert!(linked.contains(id), "{key}: no batch span links to it");
    }
    eprintln!(
        "{} spans exported, {} batch spans linking {} events",
        spans.len(),
        batches.len(),
        linked.len()
    );
    // Metrics go over OTLP too when asked.
    for m in [
        "reranker.events.consumed",
        "reranker.events.produced",
        "reranker.pairs.scored",
    ] {
        assert!(metric_names.contains(m), "{m} not pushed: {metric_names:?}");
    }
    assert_eq!(w.terminate(Duration::from_secs(30)), Some(0));
    broker.kill();
}

/// Spans by span id.
fn recs_spans(recv: &Receiver) -> HashMap<String, Value> {
    recv.spans()
        .into_iter()
        .filter_map(|s| Some((s["spanId"].as_str()?.to_string(), s)))
        .collect()
}
