//! Metrics and health on real parts: a tansu broker, the `reranker` binary, and a real Prometheus
//! server (`/usr/bin/prometheus`, `scripts/setup.sh --with-prometheus`) scraping the worker every
//! second; assertions go through Prometheus' HTTP API. Also checks that the Grafana dashboard is
//! JSON, that every metric its PromQL names exists in a real `/metrics` scrape, and that Prometheus
//! accepts every expression.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use reranker::broker::{free_port, Storage};
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// One HTTP/1.0 GET (the server closes the connection after the response): status and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((status, body.to_string()))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Polls `f` every 200 ms until it returns `Some` or `timeout` passes.
fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if t0.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A Prometheus server scraping one target every second; killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Self {
        assert!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} missing: run scripts/setup.sh --with-prometheus"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: reranker\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write config");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port().expect("port"))
            .parse()
            .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn prometheus");
        let mut p = Self { child, addr, dir };
        let ready = wait_for(Duration::from_secs(60), || {
            if let Ok(Some(s)) = p.child.try_wait() {
                panic!("prometheus exited: {s}\n{}", p.log());
            }
            matches!(http_get(p.addr, "/-/ready"), Ok((200, _))).then_some(())
        });
        assert!(ready.is_some(), "prometheus not ready\n{}", p.log());
        p
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query: each series' labels and value. Panics on a query error.
    fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let (status, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", urlencode(expr)),
        )
        .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        assert!(
            status == 200 && v["status"] == "success",
            "query {expr} failed ({status}): {body}"
        );
        v["data"]["result"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .map(|r| {
                        let labels = r["metric"]
                            .as_object()
                            .map(|m| {
                                m.iter()
                                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let val = r["value"][1]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(f64::NAN);
                        (labels, val)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The single value of a scalar-like query, if any series matched.
    fn value(&self, expr: &str) -> Option<f64> {
        let r = self.query(expr);
        assert!(r.len() <= 1, "{expr} matched {} series: {r:?}", r.len());
        r.first().map(|(_, v)| *v)
    }

    /// Waits until `expr` has the value `want`; panics with the last value otherwise.
    fn wait_value(&self, expr: &str, want: f64, timeout: Duration) {
        let mut last = None;
        let ok = wait_for(timeout, || {
            last = self.value(expr);
            (last == Some(want)).then_some(())
        });
        assert!(ok.is_some(), "{expr}: want {want}, last {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dashboard_path() -> PathBuf {
    repo_root().join("helm/dashboards/reranker.json")
}

/// Every PromQL expression in a Grafana dashboard (panel targets and query variables).
fn dashboard_exprs(d: &Value) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        ("definition", Value::String(s)) => out.push(s.clone()),
                        _ => walk(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(d, &mut out);
    out
}

/// The metric names a PromQL expression selects: identifiers that are not functions, aggregation
/// operators, keywords, label names (inside `{}` or `by (...)`) or Grafana variables.
fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] = &[
        "sum",
        "min",
        "max",
        "avg",
        "count",
        "group",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
    ];
    let b = expr.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_to = |i: &mut usize, close: u8| {
        while *i < b.len() && b[*i] != close {
            if b[*i] == b'"' {
                *i += 1;
                while *i < b.len() && b[*i] != b'"' {
                    *i += if b[*i] == b'\\' { 2 } else { 1 };
                }
            }
            *i += 1;
        }
        *i += 1;
    };
    while i < b.len() {
        let c = b[i];
        if c == b'{' {
            skip_to(&mut i, b'}');
        } else if c == b'[' {
            skip_to(&mut i, b']');
        } else if c == b'"' {
            i += 1;
            skip_to(&mut i, b'"');
        } else if c == b'$' {
            i += 1;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut j = i;
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let call = j < b.len() && b[j] == b'(';
            if matches!(
                word,
                "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
            ) && call
            {
                i = j + 1;
                skip_to(&mut i, b')');
            } else if !call && !KEYWORDS.contains(&word) {
                names.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Metric names in a Prometheus text exposition.
fn exposition_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[test]
fn promql_name_extraction() {
    let got = promql_metric_names(
        "histogram_quantile(0.95, sum by (le) (rate(a_bucket{job=~\"$job\", x=\"}\"}[$__rate_interval]))) / on (instance) b_total + max by (l) (c)",
    );
    assert_eq!(got, ["a_bucket", "b_total", "c"].map(String::from).into());
}

/// Real broker, real worker, real Prometheus: readiness, and every key series exists and moves.
#[test]
fn prometheus_scrapes_worker_metrics_and_health() {
    let rt = rt();
    let mut broker = TansuBroker::start().expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("obs");
    rt.block_on(t.create(&bs, 2));

    let port = free_port().expect("port");
    let worker_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            format!("http.listen=\"{worker_addr}\""),
            "model.max_length=32".into(),
            "kafka.statistics_interval_ms=1000".into(),
            "http.broker_timeout_ms=5000".into(),
        ],
    );

    // Liveness once the model is loaded and the server is up.
    let live = wait_for(Duration::from_secs(180), || {
        if let Ok(Some(s)) = w.child.try_wait() {
            panic!("worker exited: {s}\n{}", w.log_text());
        }
        match http_get(worker_addr, "/healthz") {
            Ok((200, _)) => Some(()),
            _ => None,
        }
    });
    assert!(
        live.is_some(),
        "/healthz never answered 200\n{}",
        w.log_text()
    );

    // Readiness: 503 with a reason until partitions are assigned; 200 only after the assignment.
    let mut reasons = BTreeSet::new();
    let ready = wait_for(Duration::from_secs(90), || {
        let (status, body) = http_get(worker_addr, "/readyz").ok()?;
        match status {
            200 => Some(body),
            503 => {
                reasons.insert(body.trim().to_string());
                None
            }
            other => panic!("/readyz answered {other}: {body}"),
        }
    });
    assert!(
        ready.is_some(),
        "/readyz never turned 200; reasons seen: {reasons:?}\n{}",
        w.log_text()
    );
    assert!(
        !w.logged("partitions assigned").is_empty(),
        "ready before any assignment"
    );
    for r in &reasons {
        assert!(
            r == "not ready: no partitions assigned"
                || r.starts_with("not ready: broker not reachable"),
            "unexpected readiness reason {r:?}"
        );
    }
    eprintln!("readiness reasons seen before 200: {reasons:?}");

    let prom = Prometheus::start(worker_addr);
    let job = "{job=\"reranker\"}";
    prom.wait_value(&format!("up{job}"), 1.0, Duration::from_secs(30));
    // Before traffic: gauges are there, counters are not created yet.
    prom.wait_value(
        &format!("reranker_consumer_assigned_partitions{job}"),
        2.0,
        Duration::from_secs(30),
    );
    assert_eq!(
        prom.value(&format!("reranker_inflight_pairs{job}")),
        Some(0.0)
    );
    assert_eq!(
        prom.value(&format!("reranker_events_consumed_total{job}")),
        None
    );

    // Traffic: 30 SciFact events × 4 candidates over both partitions, and one malformed event.
    let events = scifact_events(30, 4);
    let mut inputs: Vec<Input> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("k{i}"), e, i as i32 % 2))
        .collect();
    inputs.push(Input {
        key: Some(b"broken".to_vec()),
        payload: Some(b"{\"schema_version\": 1, \"query\": ".to_vec()),
        partition: Some(0),
        headers: Vec::new(),
    });
    rt.block_on(produce(&bs, &t.input, &inputs));
    let recs = collect(&bs, &[&t.output, &t.dlq], Duration::from_secs(120), |r| {
        r.len() >= inputs.len()
    });
    assert_eq!(
        recs.len(),
        inputs.len(),
        "one record per input\n{}",
        w.log_text()
    );
    let dlq: Vec<&Record> = recs.iter().filter(|r| r.topic == t.dlq).collect();
    assert_eq!(dlq.len(), 1);
    let code = dlq[0].json()["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_string();

    let long = Duration::from_secs(60);
    prom.wait_value(
        &format!("sum(reranker_events_consumed_total{job})"),
        31.0,
        long,
    );
    prom.wait_value(
        &format!("sum(reranker_events_produced_total{job})"),
        30.0,
        long,
    );
    prom.wait_value(
        &format!(
            "sum(reranker_events_dead_lettered_total{{job=\"reranker\", error_code=\"{code}\"}})"
        ),
        1.0,
        long,
    );
    prom.wait_value(
        &format!("sum(reranker_pairs_scored_total{job})"),
        120.0,
        long,
    );
    prom.wait_value(
        &format!("sum(reranker_queue_wait_duration_seconds_count{job})"),
        120.0,
        long,
    );
    prom.wait_value(
        &format!("sum(reranker_tokenization_duration_seconds_count{job})"),
        30.0,
        long,
    );
    prom.wait_value(
        &format!("sum(reranker_event_duration_seconds_count{job})"),
        30.0,
        long,
    );
    prom.wait_value(&format!("reranker_inflight_pairs{job}"), 0.0, long);
    prom.wait_value(
        &format!("reranker_consumer_paused_partitions{job}"),
        0.0,
        long,
    );
    let batches = prom
        .value(&format!(
            "sum(reranker_inference_duration_seconds_count{job})"
        ))
        .expect("inference histogram");
    assert!(batches > 0.0);
    assert_eq!(
        prom.value(&format!("sum(reranker_batch_size_sum{job})")),
        Some(120.0),
        "batch sizes add up to the pairs scored"
    );
    assert_eq!(
        prom.value(&format!("sum(reranker_batch_size_count{job})")),
        Some(batches)
    );
    let padding = prom
        .value(&format!(
            "sum(reranker_batch_padding_ratio_sum{job}) / sum(reranker_batch_padding_ratio_count{job})"
        ))
        .expect("padding ratio");
    assert!((0.0..1.0).contains(&padding), "mean padding {padding}");
    let p99 = prom
        .value(&format!(
            "histogram_quantile(0.99, sum by (le) (reranker_inference_duration_seconds_bucket{job}))"
        ))
        .expect("inference p99");
    assert!(p99 > 0.0 && p99 < 10.0, "inference p99 {p99}");

    let info = prom.query(&format!("reranker_model_info{job}"));
    assert_eq!(info.len(), 1, "{info:?}");
    let (labels, v) = &info[0];
    assert_eq!(*v, 1.0);
    assert_eq!(labels["device"], "cpu");
    assert_eq!(
        labels["model_name"],
        model_dir().file_name().unwrap().to_string_lossy()
    );
    assert_eq!(labels["model_revision"].len(), 16, "{labels:?}");

    // Lag from librdkafka statistics: one series per partition, settling at 0 once committed.
    let lag = wait_for(long, || {
        let r = prom.query(&format!("reranker_consumer_lag{job}"));
        (r.len() == 2 && r.iter().all(|(_, v)| *v == 0.0)).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "lag series: {:?}",
            prom.query(&format!("reranker_consumer_lag{job}"))
        )
    });
    let parts: BTreeSet<&str> = lag
        .iter()
        .map(|(l, _)| {
            assert_eq!(l["messaging_destination_name"], t.input);
            l["messaging_destination_partition_id"].as_str()
        })
        .collect();
    assert_eq!(parts, ["0", "1"].into());

    // The dashboard: JSON, every metric it names is in a real scrape, and Prometheus accepts every
    // expression (Grafana's variables replaced).
    let (status, scrape) = http_get(worker_addr, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let exposed = exposition_names(&scrape);
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(dashboard_path()).expect("dashboard file"))
            .expect("dashboard is JSON");
    let exprs = dashboard_exprs(&dash);
    assert!(exprs.len() >= 20, "{} expressions", exprs.len());
    let mut used = BTreeSet::new();
    for e in &exprs {
        // Grafana's `label_values(SELECTOR, LABEL)`: only the selector is PromQL.
        let promql = match e.strip_prefix("label_values(") {
            Some(rest) => rest.rsplit_once(',').expect("label_values(sel, label)").0,
            None => e.as_str(),
        };
        for name in promql_metric_names(promql) {
            assert!(
                exposed.contains(&name),
                "dashboard metric `{name}` (in `{e}`) is not in the scrape:\n{exposed:?}"
            );
            used.insert(name);
        }
        let q = promql
            .replace("$__rate_interval", "1m")
            .replace("$job", ".*")
            .replace("$instance", ".*");
        prom.query(&q);
    }
    for want in [
        "reranker_events_consumed_total",
        "reranker_events_dead_lettered_total",
        "reranker_event_duration_seconds_bucket",
        "reranker_inference_duration_seconds_bucket",
        "reranker_batch_padding_ratio_bucket",
        "reranker_consumer_lag",
        "reranker_consumer_paused_partitions",
        "reranker_consumer_stalled_partitions",
        "reranker_inflight_pairs",
        "reranker_model_info",
    ] {
        assert!(used.contains(want), "dashboard does not chart {want}");
    }

    assert_eq!(http_get(worker_addr, "/healthz").expect("healthz").0, 200);
    assert_eq!(http_get(worker_addr, "/readyz").expect("readyz").0, 200);
    assert_eq!(http_get(worker_addr, "/nope").expect("404").0, 404);

    // No event text in the logs.
    let log = w.log_text();
    for e in events.iter().take(5) {
        let q = e["query"].as_str().unwrap();
        assert!(!log.contains(q), "query text logged: {q}");
    }
    assert_eq!(
        w.terminate(Duration::from_secs(60)),
        Some(0),
        "{}",
        w.log_text()
    );
    assert!(
        http_get(worker_addr, "/healthz").is_err(),
        "http server stops with the worker"
    );

    // Broker loss: a second worker turns ready, then /readyz names the broker once it is gone
    // (within http.broker_timeout_ms, before the group session could expire) while /healthz stays 200.
    let addr2: SocketAddr = format!("127.0.0.1:{}", free_port().expect("port"))
        .parse()
        .unwrap();
    let w2 = WorkerProc::spawn(
        &bs,
        &t,
        &[
            format!("http.listen=\"{addr2}\""),
            "model.max_length=32".into(),
            "kafka.statistics_interval_ms=500".into(),
            "http.broker_timeout_ms=2500".into(),
        ],
    );
    let ready = wait_for(Duration::from_secs(180), || {
        matches!(http_get(addr2, "/readyz"), Ok((200, _))).then_some(())
    });
    assert!(
        ready.is_some(),
        "second worker never ready\n{}",
        w2.log_text()
    );
    broker.kill();
    let t_kill = Instant::now();
    let reason = wait_for(Duration::from_secs(30), || {
        match http_get(addr2, "/readyz") {
            Ok((503, body)) => Some(body),
            _ => None,
        }
    })
    .expect("/readyz stays 200 without a broker");
    eprintln!(
        "after broker loss ({:.1?}): {}",
        t_kill.elapsed(),
        reason.trim()
    );
    assert!(
        reason.starts_with("not ready: broker not reachable"),
        "{reason}"
    );
    assert_eq!(http_get(addr2, "/healthz").expect("healthz").0, 200);
}

/// A partition that has records but whose fetches return nothing must not look like a quiet
/// topic. tansu's memory engine is such a broker (see tests/broker.rs): a group whose committed
/// offset lies inside the last record batch gets nothing there, and the watermark it reports is
/// below that offset. The worker must say so in a WARN
/// line with the partition, position and watermarks, in `reranker_consumer_stalled_partitions`,
/// and on `/readyz`.
#[test]
fn a_stalled_partition_is_logged_exported_and_named_by_readyz() {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::{Offset, TopicPartitionList};

    let rt = rt();
    let broker = TansuBroker::start_with(Storage::Memory).expect("broker");
    let bs = broker.bootstrap();
    let t = Topics::new("stall");
    rt.block_on(t.create(&bs, 1));
    // Small records in one batch: the memory engine then reports a high watermark of 1.
    let n = 43;
    let payloads: Vec<Vec<u8>> = (0..n).map(|i| format!("record {i}").into_bytes()).collect();
    let per_batch = produce_batched(&bs, &t.input, &payloads);
    assert!(per_batch >= 2.0, "{per_batch} records per batch");
    // Where a worker that stopped inside the last batch would have left the group.
    let committed = n as i64 - 3;
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bs)
        .set("group.id", &t.group)
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&t.input, 0, Offset::Offset(committed))
        .expect("tpl");
    c.commit(&tpl, CommitMode::Sync).expect("commit");
    drop(c);

    let port = free_port().expect("port");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let w = WorkerProc::spawn(
        &bs,
        &t,
        &[
            format!("http.listen=\"{addr}\""),
            "model.max_length=32".into(),
            "kafka.statistics_interval_ms=500".into(),
            "kafka.stall_warn_ms=2000".into(),
            "http.broker_timeout_ms=5000".into(),
        ],
    );
    let msg = "partition stalled: position not moving and not at the high watermark";
    assert!(
        w.wait_logged(msg, Duration::from_secs(180)),
        "no stall reported\n{}",
        w.log_text()
    );
    let line = &w.logged(msg)[0];
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["partition"], 0);
    assert_eq!(line["position"], committed);
    // Not at the watermark: here past it, the memory engine's wrong answer.
    assert_ne!(
        line["high_watermark"].as_i64().expect("high_watermark"),
        committed,
        "{line}"
    );
    assert!(line.get("low_watermark").is_some(), "{line}");

    let (status, scrape) = http_get(addr, "/metrics").expect("scrape");
    assert_eq!(status, 200);
    let stalled: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("reranker_consumer_stalled_partitions"))
        .collect();
    assert!(
        stalled.len() == 1 && stalled[0].ends_with(" 1"),
        "{stalled:?}"
    );
    let (status, body) = http_get(addr, "/readyz").expect("readyz");
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("partitions stalled")
            && body.contains(&format!("{}[0] at offset {committed}", t.input)),
        "{body}"
    );
}
