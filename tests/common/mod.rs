//! Test harness: a real tansu broker process, the real `reranker` binary as a child process, the
//! real model, and an independent Python reference scorer.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

#[allow(unused_imports)]
pub use reranker::broker::{create_topics, TansuBroker};

pub mod poison;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn model_dir() -> PathBuf {
    std::env::var_os("RERANKER_MODEL__DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("../shared/models/minilm-l6-ce"))
}

pub fn scifact_path() -> PathBuf {
    repo_root().join("../shared/data/scifact/retrieval-top100.jsonl.gz")
}

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A unique name per test so topics and groups never collide on a shared broker.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    )
}

#[derive(Clone, Debug)]
pub struct Topics {
    pub input: String,
    pub output: String,
    pub dlq: String,
    pub group: String,
}

impl Topics {
    pub fn new(name: &str) -> Self {
        Self {
            input: unique(&format!("{name}-in")),
            output: unique(&format!("{name}-out")),
            dlq: unique(&format!("{name}-dlq")),
            group: unique(&format!("{name}-group")),
        }
    }

    pub async fn create(&self, bootstrap: &str, partitions: i32) {
        create_topics(
            bootstrap,
            &[
                (&self.input, partitions),
                (&self.output, partitions),
                (&self.dlq, 1),
            ],
        )
        .await
        .expect("create topics");
    }
}

/// The worker binary running against a broker; killed on drop.
pub struct WorkerProc {
    pub child: Child,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

pub fn worker_cmd(
    bootstrap: &str,
    t: &Topics,
    extra: &[String],
) -> (Command, tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("worker.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_reranker"));
    cmd.arg("run")
        .arg("--brokers")
        .arg(bootstrap)
        .arg("--group-id")
        .arg(&t.group)
        .arg("--model-dir")
        .arg(model_dir())
        .args(["--set", &format!("kafka.input_topic=\"{}\"", t.input)])
        .args(["--set", &format!("kafka.output_topic=\"{}\"", t.output)])
        .args(["--set", &format!("kafka.dlq_topic=\"{}\"", t.dlq)])
        .args(["--set", "log.format=\"json\""])
        // Fast failover for restart tests; tansu honours the group session timeout.
        .args(["--set", "kafka.consumer.\"session.timeout.ms\"=\"6000\""])
        .args(["--set", "kafka.consumer.\"heartbeat.interval.ms\"=\"500\""])
        // Several workers run at once in some tests: a free port each unless a test names one.
        .args(["--set", "http.listen=\"127.0.0.1:0\""]);
    for e in extra {
        cmd.args(["--set", e]);
    }
    cmd.env_remove("RUST_LOG").stdout(Stdio::null());
    (cmd, dir, log)
}

impl WorkerProc {
    pub fn spawn(bootstrap: &str, t: &Topics, extra: &[String]) -> Self {
        Self::spawn_env(bootstrap, t, extra, &[])
    }

    pub fn spawn_env(bootstrap: &str, t: &Topics, extra: &[String], env: &[(&str, &str)]) -> Self {
        let (mut cmd, dir, log) = worker_cmd(bootstrap, t, extra);
        cmd.envs(env.iter().copied());
        let f = std::fs::File::create(&log).expect("log file");
        cmd.stderr(Stdio::from(f));
        let child = cmd.spawn().expect("spawn reranker");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log_lines(&self) -> Vec<Value> {
        let Ok(f) = std::fs::File::open(&self.log) else {
            return Vec::new();
        };
        std::io::BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Lines whose message equals `msg`.
    pub fn logged(&self, msg: &str) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|v| v["message"].as_str() == Some(msg))
            .collect()
    }

    pub fn wait_logged(&self, msg: &str, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if !self.logged(msg).is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    pub fn signal(&self, sig: i32) {
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.signal(libc::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn rss_kb(&self) -> Option<u64> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl WorkerProc {
    /// True once the worker logs an assignment with at least one partition (an eager rebalance
    /// logs `[]` when a member gets nothing).
    pub fn wait_partitions(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            let took = self.logged("partitions assigned").iter().any(|l| {
                l["partitions"]
                    .as_str()
                    .is_some_and(|p| p.chars().any(|c| c.is_ascii_digit()))
            });
            if took {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

/// Settings that make a worker a static group member (KIP-345) named `instance`, for tests that
/// SIGKILL a worker and start it again: the restarted process takes the killed member's place and
/// partitions at once, as a restarted StatefulSet pod does. A restarted *dynamic* member can be
/// handed an empty assignment for good by tansu 0.6's group coordinator (`tests/tansu_group.rs`).
/// The session is 30 s because tansu's static JoinGroup and SyncGroup each pause 3 s without
/// refreshing the member's last contact: with the usual 6 s a static member expires right after
/// it joins and rebalances for ever.
pub fn static_member(instance: &str) -> [String; 2] {
    [
        format!("kafka.consumer.\"group.instance.id\"=\"{instance}\""),
        "kafka.consumer.\"session.timeout.ms\"=\"30000\"".into(),
    ]
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: HashMap<String, Vec<u8>>,
    /// The record's timestamp (the producer's create time), in ms since the epoch.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    pub fn json(&self) -> Value {
        serde_json::from_slice(self.payload.as_deref().unwrap_or_default()).expect("JSON payload")
    }

    pub fn key_str(&self) -> String {
        String::from_utf8_lossy(self.key.as_deref().unwrap_or_default()).into_owned()
    }
}

pub struct Input {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub partition: Option<i32>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Input {
    pub fn json(key: &str, v: &Value, partition: i32) -> Self {
        Self {
            key: Some(key.as_bytes().to_vec()),
            payload: Some(serde_json::to_vec(v).expect("json")),
            partition: Some(partition),
            headers: Vec::new(),
        }
    }
}

pub async fn produce(bootstrap: &str, topic: &str, inputs: &[Input]) {
    produce_lingering(bootstrap, topic, inputs, 20).await
}

/// [`produce`] with the producer's `linger.ms`: a long linger puts a small input in one batch.
pub async fn produce_lingering(bootstrap: &str, topic: &str, inputs: &[Input], linger_ms: u32) {
    // As production producers do: idempotent, lingering, so that many records share a batch and
    // consumers must seek into multi-record batches after a pause, rebalance or restart.
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", linger_ms.to_string())
        .create()
        .expect("producer");
    let mut futs = Vec::new();
    for i in inputs {
        let mut h = OwnedHeaders::new();
        for (k, v) in &i.headers {
            h = h.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut r = FutureRecord::<[u8], [u8]>::to(topic).headers(h);
        if let Some(k) = &i.key {
            r = r.key(k);
        }
        if let Some(v) = &i.payload {
            r = r.payload(v);
        }
        if let Some(part) = i.partition {
            r = r.partition(part);
        }
        futs.push(p.send(r, Duration::from_secs(30)));
        if futs.len() >= 500 {
            for f in futs.drain(..) {
                f.await.map_err(|(e, _)| e).expect("produce");
            }
        }
    }
    for f in futs {
        f.await.map_err(|(e, _)| e).expect("produce");
    }
}

/// Records and batches sent, summed over the producer's statistics reports (each report's
/// `batchcnt` window covers only the interval since the one before).
#[derive(Clone, Default)]
struct BatchStats(std::sync::Arc<std::sync::Mutex<(i64, i64, usize)>>);

impl rdkafka::ClientContext for BatchStats {
    fn stats(&self, s: rdkafka::Statistics) {
        let mut t = self.0.lock().unwrap();
        for topic in s.topics.values() {
            t.0 += topic.batchcnt.sum;
            t.1 += topic.batchcnt.cnt;
        }
        t.2 += 1;
    }
}

impl rdkafka::producer::ProducerContext for BatchStats {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// Produces `payloads` (keyed, idempotent, `linger.ms` 50, all sent before the first batch
/// leaves) into partition 0 of `topic`; returns the mean number of records per batch, so a
/// test can show that it really reads inside multi-record batches.
pub fn produce_batched(bootstrap: &str, topic: &str, payloads: &[Vec<u8>]) -> f64 {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let ctx = BatchStats::default();
    let p: ThreadedProducer<BatchStats> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "50")
        .set("statistics.interval.ms", "100")
        .create_with_context(ctx.clone())
        .expect("producer");
    for (i, value) in payloads.iter().enumerate() {
        let key = format!("k{}", i % 7);
        let mut rec = BaseRecord::to(topic).key(&key).payload(value).partition(0);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e.rdkafka_error_code(),
                            Some(rdkafka::types::RDKafkaErrorCode::QueueFull)
                        ),
                        "produce: {e}"
                    );
                    rec = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    // The first report after the flush covers the last batches.
    let reports = ctx.0.lock().unwrap().2;
    let t0 = Instant::now();
    while ctx.0.lock().unwrap().2 < reports + 2 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (records, batches, _) = *ctx.0.lock().unwrap();
    assert_eq!(
        records,
        payloads.len() as i64,
        "every record counted in a batch"
    );
    records as f64 / batches.max(1) as f64
}

/// Reads topics from the beginning (manual assignment, no group) until `done` says so or the
/// timeout passes.
pub fn collect(
    bootstrap: &str,
    topics: &[&str],
    timeout: Duration,
    done: impl FnMut(&[Record]) -> bool,
) -> Vec<Record> {
    collect_with(bootstrap, topics, &[], timeout, done)
}

/// [`collect`] with extra consumer settings.
pub fn collect_with(
    bootstrap: &str,
    topics: &[&str],
    settings: &[(&str, &str)],
    timeout: Duration,
    mut done: impl FnMut(&[Record]) -> bool,
) -> Vec<Record> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", bootstrap)
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("topic.metadata.refresh.interval.ms", "1000");
    for (k, v) in settings {
        cc.set(*k, *v);
    }
    let c: BaseConsumer = cc.create().expect("consumer");
    c.subscribe(topics).expect("subscribe");
    let mut out = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < timeout && !done(&out) {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Record {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    headers,
                    timestamp_ms: m.timestamp().to_millis(),
                });
            }
            Some(Err(e)) => eprintln!("collect: {e}"),
            None => {}
        }
    }
    out
}

/// Count of distinct request ids among output records.
pub fn distinct_request_ids(recs: &[Record], topic: &str) -> std::collections::HashSet<String> {
    recs.iter()
        .filter(|r| r.topic == topic)
        .filter_map(|r| r.json()["request_id"].as_str().map(str::to_string))
        .collect()
}

/// SciFact retrieval results as input events (`req-{i}`, top_n 5); see `reranker::demo`.
pub fn scifact_events(n: usize, k: usize) -> Vec<Value> {
    reranker::demo::scifact_events(&scifact_path(), n, k, 5, "req-").expect("scifact data")
}

/// Scores pairs with `scripts/reference_score.py` (Python tokenizers + onnxruntime, one pair at a
/// time, no padding): independent of this crate's tokenizer wrapper, batcher and padding.
pub fn reference_scores(pairs: &[(String, String)], max_length: usize) -> Vec<f64> {
    let mut child = Command::new("python3")
        .arg(repo_root().join("scripts/reference_score.py"))
        .arg("--model-dir")
        .arg(model_dir())
        .arg("--max-length")
        .arg(max_length.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 reference scorer");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        let mut buf = Vec::new();
        for (q, p) in pairs {
            serde_json::to_writer(&mut buf, &serde_json::json!({"query": q, "passage": p}))
                .expect("json");
            buf.push(b'\n');
        }
        std::thread::spawn(move || stdin.write_all(&buf));
    }
    let out = child.wait_with_output().expect("reference scorer");
    assert!(out.status.success(), "reference scorer failed");
    out.stdout
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(&l.expect("line")).expect("json");
            v["logit"].as_f64().expect("logit")
        })
        .collect()
}

/// A broker with fresh topics whose input already holds `events`, spread round-robin over the
/// partitions and keyed `k{i}`.
pub struct Backlog {
    pub rt: tokio::runtime::Runtime,
    pub broker: TansuBroker,
    pub bootstrap: String,
    pub topics: Topics,
}

pub fn backlog(name: &str, partitions: i32, events: &[Value]) -> Backlog {
    let rt = rt();
    let broker = TansuBroker::start().expect("broker");
    let bootstrap = broker.bootstrap();
    let topics = Topics::new(name);
    rt.block_on(topics.create(&bootstrap, partitions));
    let inputs: Vec<Input> = events
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("k{i}"), e, i as i32 % partitions))
        .collect();
    rt.block_on(produce(&bootstrap, &topics.input, &inputs));
    Backlog {
        rt,
        broker,
        bootstrap,
        topics,
    }
}

/// librdkafka's in-process mock cluster (transactions, consumer groups, fault injection; tansu has
/// no transactions). Its brokers listen on loopback TCP, so the real worker binary can be pointed
/// at it from a child process and SIGKILLed like against a real cluster.
///
/// The mock does not implement read_committed: it writes no transaction markers and reports no
/// aborted transactions, so records of an aborted or never-committed transaction stay visible.
/// Tests on it can assert exactly-once strictly only where no transaction aborts.
pub struct Mock {
    pub cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    pub bootstrap: String,
    pub topics: Topics,
}

pub fn mock(name: &str, partitions: i32) -> Mock {
    let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
    let topics = Topics::new(name);
    for (t, p) in [
        (&topics.input, partitions),
        (&topics.output, partitions),
        (&topics.dlq, 1),
    ] {
        cluster.create_topic(t, p, 1).expect("mock topic");
    }
    let bootstrap = cluster.bootstrap_servers();
    Mock {
        cluster,
        bootstrap,
        topics,
    }
}

/// A mock cluster whose input topic holds `n` tiny events (`req-i`, key `ki`, round robin over
/// the partitions).
pub fn mock_backlog(name: &str, partitions: i32, n: usize) -> Mock {
    let m = mock(name, partitions);
    let inputs: Vec<Input> = tiny_events(n)
        .iter()
        .enumerate()
        .map(|(i, e)| Input::json(&format!("k{i}"), e, i as i32 % partitions))
        .collect();
    rt().block_on(produce(&m.bootstrap, &m.topics.input, &inputs));
    m
}

/// Events the size production sends: SciFact queries with 100 candidates each, every passage cut
/// or extended to between 300 and 1,000 bytes (~40 KB an event), `req-0..n`.
pub fn realistic_events(n: usize) -> Vec<Value> {
    let base = scifact_events(n.min(300), 100);
    (0..n)
        .map(|i| {
            let mut e = base[i % base.len()].clone();
            e["request_id"] = serde_json::json!(format!("req-{i}"));
            let cands = e["candidates"].as_array_mut().expect("candidates");
            let texts: Vec<String> = cands
                .iter()
                .map(|c| c["text"].as_str().unwrap_or_default().to_string())
                .collect();
            for (j, c) in cands.iter_mut().enumerate() {
                let want = 300 + (i * 131 + j * 37) % 701;
                let mut t = texts[j].clone();
                let mut k = j;
                while t.len() < want {
                    k = (k + 1) % texts.len();
                    t.push(' ');
                    t.push_str(&texts[k]);
                }
                let mut cut = want;
                while !t.is_char_boundary(cut) {
                    cut -= 1;
                }
                t.truncate(cut);
                c["text"] = serde_json::json!(t);
            }
            e
        })
        .collect()
}

/// One-candidate SciFact events `req-0..n`; delivery is under test, not scores.
pub fn tiny_events(n: usize) -> Vec<Value> {
    let base = scifact_events(300, 1);
    (0..n)
        .map(|i| {
            let mut e = base[i % base.len()].clone();
            e["request_id"] = serde_json::json!(format!("req-{i}"));
            e
        })
        .collect()
}

/// The int8 model at 16 tokens: fast enough for a few thousand events per test.
pub fn fast_args() -> Vec<String> {
    vec![
        "model.file=\"model_int8.onnx\"".into(),
        "model.max_length=16".into(),
        "batch.max_batch_pairs=64".into(),
        "batch.max_batch_tokens=1024".into(),
    ]
}

/// Collects from `topics` until `n` records arrived (or `timeout` passed), stops the worker with
/// SIGTERM, and asserts a clean exit and exactly `n` records: one per input event.
pub fn answered_then_stopped(
    bootstrap: &str,
    topics: &[&str],
    w: &mut WorkerProc,
    n: usize,
    timeout: Duration,
) -> Vec<Record> {
    let recs = collect(bootstrap, topics, timeout, |r| r.len() >= n);
    assert_eq!(
        w.terminate(Duration::from_secs(60)),
        Some(0),
        "clean exit on SIGTERM\n{}",
        w.log_text()
    );
    assert_eq!(recs.len(), n, "one record per event\n{}", w.log_text());
    recs
}

/// Output records per request id (topic `topic` only).
pub fn counts_by_request(recs: &[Record], topic: &str) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in recs.iter().filter(|r| r.topic == topic) {
        if let Some(id) = r.json()["request_id"].as_str() {
            *m.entry(id.to_string()).or_default() += 1;
        }
    }
    m
}

pub fn missing(counts: &HashMap<String, usize>, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("req-{i}"))
        .filter(|id| !counts.contains_key(id))
        .collect()
}

/// Counts distinct request ids of `topic` as records arrive, parsing each record once (a
/// `collect` callback sees the whole list on every call).
#[derive(Default)]
pub struct SeenIds {
    scanned: usize,
    pub ids: std::collections::HashSet<String>,
}

impl SeenIds {
    pub fn update(&mut self, recs: &[Record], topic: &str) -> usize {
        for r in &recs[self.scanned..] {
            if r.topic != topic {
                continue;
            }
            if let Some(id) = r.json()["request_id"].as_str() {
                self.ids.insert(id.to_string());
            }
        }
        self.scanned = recs.len();
        self.ids.len()
    }
}
