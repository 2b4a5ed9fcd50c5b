//! `reranker demo`: the whole pipeline on one machine — a local broker, sample retrieval events,
//! the worker, and the reranked output printed as it arrives.

use std::collections::HashSet;
use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::broker::{create_topics, TansuBroker};
use crate::config::Config;
use crate::worker::Worker;

pub const SCIFACT: &str = "../shared/data/scifact/retrieval-top100.jsonl.gz";

/// The lesson's example: a keyword retriever ranks the wrong Jim Carrey film first.
pub fn jim_carrey_event() -> Value {
    json!({
        "schema_version": 1,
        "request_id": "demo-jim-carrey",
        "query": "What is the Jim Carrey movie where he and his best friend go on a road trip to Aspen?",
        "top_n": 4,
        "candidates": [
            {"id": "ace-ventura", "text": "Ace Ventura: Pet Detective (1994): a pet detective searches for the stolen dolphin mascot of the Miami Dolphins.", "retriever_score": 0.81},
            {"id": "sonic", "text": "Sonic the Hedgehog (2020): Jim Carrey plays Dr. Robotnik, who hunts a fast blue alien hedgehog.", "retriever_score": 0.79},
            {"id": "dumb-and-dumber", "text": "Dumb and Dumber (1994): two dim-witted best friends drive across the country to Aspen to return a briefcase.", "retriever_score": 0.74},
            {"id": "bruce-almighty", "text": "Bruce Almighty (2003): a TV reporter is given God's powers for a week.", "retriever_score": 0.72}
        ]
    })
}

/// SciFact retrieval results as input events: `n` events of `k` candidates, cycling through the
/// queries and taking successive first-stage windows (top 0..k, then k..2k, ...) so that events
/// differ. Request ids are `{prefix}{i}`.
pub fn scifact_events(
    path: &Path,
    n: usize,
    k: usize,
    top_n: usize,
    prefix: &str,
) -> anyhow::Result<Vec<Value>> {
    let rows = read_jsonl(path)?;
    anyhow::ensure!(!rows.is_empty(), "{} holds no queries", path.display());
    Ok((0..n)
        .map(|i| {
            let row = &rows[i % rows.len()];
            let window = i / rows.len();
            let cands: Vec<Value> = row["candidates"]
                .as_array()
                .map(|a| a.iter().skip(window * k).take(k).cloned().collect())
                .unwrap_or_default();
            json!({
                "schema_version": 1,
                "request_id": format!("{prefix}{i}"),
                "query": row["query"],
                "candidates": cands,
                "top_n": top_n,
            })
        })
        .collect())
}

/// One JSON value per line; gzip-compressed or plain (told apart by the gzip magic bytes).
pub fn read_jsonl(path: &Path) -> anyhow::Result<Vec<Value>> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut magic = [0u8; 2];
    let gz = std::io::Read::read(&mut f, &mut magic)? == 2 && magic == [0x1f, 0x8b];
    std::io::Seek::rewind(&mut f)?;
    let r: Box<dyn BufRead> = if gz {
        Box::new(std::io::BufReader::new(flate2::read::GzDecoder::new(f)))
    } else {
        Box::new(std::io::BufReader::new(f))
    };
    r.lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(&l?)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))
        })
        .collect()
}

/// Where the demo's topics live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoBroker {
    /// A local tansu broker process (a real Kafka protocol server; built by scripts/setup.sh).
    Tansu,
    /// librdkafka's in-process mock cluster: nothing to build or start, for a first look.
    Mock,
}

// Held for their Drop: the broker lives until the demo ends.
#[allow(dead_code)]
enum Running {
    Tansu(TansuBroker),
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

/// SHA-256 prefixes (the outputs' `model.revision`) of the small test model in
/// ../shared/models/minilm-l6-ce: model.onnx and model_int8.onnx.
const BUNDLED_REVISIONS: [&str; 2] = ["e2c92fb83adf110b", "6b2b74f8b4bdc42d"];

/// What the demo says about its model before it starts: its name and file, and, for the small
/// bundled test model, that it is not one to judge reranking by.
pub fn model_banner(cfg: &Config) -> Vec<String> {
    let file = cfg.model.dir.join(&cfg.model.file);
    let Ok(rev) = crate::model::file_revision(&file) else {
        return Vec::new(); // the worker's load names the problem
    };
    let mut lines = vec![format!(
        "model: {} @ {rev} ({})",
        cfg.model_name(),
        file.display()
    )];
    if BUNDLED_REVISIONS.contains(&rev.as_str()) {
        lines.push(
            "note: this is the small MiniLM-L6 test cross-encoder from ../shared (a few CPU-hours of training; it misranks the Jim Carrey example): fine for plumbing, not for quality; pass --model-dir a published cross-encoder export for real use (README: \"Model and quality\")".into(),
        );
    }
    lines
}

pub async fn run(mut cfg: Config, scifact: usize, broker: DemoBroker) -> anyhow::Result<()> {
    for line in model_banner(&cfg) {
        eprintln!("{line}");
    }
    let (input, output, dlq) = (
        cfg.kafka.input_topic.clone(),
        cfg.kafka.output_topic.clone(),
        cfg.kafka.dlq_topic.clone(),
    );
    let topics = [(input.as_str(), 4), (output.as_str(), 4), (dlq.as_str(), 1)];
    let broker = match broker {
        DemoBroker::Tansu => {
            eprintln!("starting a local tansu broker…");
            let b = TansuBroker::start()?;
            cfg.kafka.brokers = b.bootstrap();
            create_topics(&cfg.kafka.brokers, &topics).await?;
            Running::Tansu(b)
        }
        DemoBroker::Mock => {
            eprintln!(
                "starting librdkafka's in-process mock cluster (no broker process; `--broker tansu` runs a real one)…"
            );
            let c =
                rdkafka::mocking::MockCluster::new(1).context("cannot start the mock cluster")?;
            for (t, p) in topics {
                c.create_topic(t, p, 1)
                    .with_context(|| format!("cannot create mock topic {t}"))?;
            }
            cfg.kafka.brokers = c.bootstrap_servers();
            Running::Mock(c)
        }
    };

    let mut events = vec![jim_carrey_event()];
    match scifact_events(Path::new(SCIFACT), scifact, 20, 3, "scifact-") {
        Ok(mut s) => events.append(&mut s),
        Err(e) => eprintln!("(skipping SciFact samples: {e:#})"),
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .create()?;
    let mut expected = HashSet::new();
    for ev in &events {
        let id = ev["request_id"].as_str().unwrap_or_default().to_string();
        let payload = serde_json::to_vec(ev)?;
        producer
            .send(
                FutureRecord::to(&cfg.kafka.input_topic)
                    .key(&id)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        expected.insert(id);
    }
    // One malformed event, to show the dead-letter path.
    producer
        .send(
            FutureRecord::to(&cfg.kafka.input_topic)
                .key("demo-broken")
                .payload("{\"schema_version\": 1, \"query\": "),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    eprintln!(
        "produced {} retrieval events and 1 malformed one to `{}`; loading the model…",
        events.len(),
        cfg.kafka.input_topic
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let c = cfg.clone();
    let worker = tokio::task::spawn_blocking(move || Worker::load(c)).await??;
    let worker_task = tokio::spawn(worker.run(stop_rx));

    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", "reranker-demo-reader")
        .set("auto.offset.reset", "earliest")
        .create()?;
    reader.subscribe(&[&cfg.kafka.output_topic, &cfg.kafka.dlq_topic])?;
    let mut dead = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while !expected.is_empty() || dead == 0 {
        let msg = tokio::time::timeout_at(deadline, reader.recv())
            .await
            .context("timed out waiting for output")??;
        let v: Value = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        if msg.topic() == cfg.kafka.dlq_topic {
            dead += 1;
            println!(
                "\n✗ dead letter ({}): {}",
                v["error"]["code"].as_str().unwrap_or("?"),
                v["error"]["message"].as_str().unwrap_or("?")
            );
            continue;
        }
        let id = v["request_id"].as_str().unwrap_or_default().to_string();
        expected.remove(&id);
        print_reranked(&v);
    }
    let _ = stop_tx.send(true);
    worker_task.await??;
    // Clients first, so nothing reconnects to a broker that is going away.
    drop(reader);
    drop(producer);
    drop(broker);
    eprintln!("done.");
    Ok(())
}

fn print_reranked(v: &Value) {
    println!(
        "\n▶ {}  query: {}",
        v["request_id"].as_str().unwrap_or("?"),
        v["query"].as_str().unwrap_or("?")
    );
    for r in v["results"].as_array().into_iter().flatten() {
        println!(
            "   #{} (was #{})  score {:>7.3}  relevance {:.3}  {}",
            r["rank"],
            r["original_rank"],
            r["score"].as_f64().unwrap_or(f64::NAN),
            r["relevance"].as_f64().unwrap_or(f64::NAN),
            r["id"].as_str().unwrap_or("?")
        );
    }
    println!(
        "   model {} @ {}, {} candidates, {} truncated, queue {} ms, inference {} ms",
        v["model"]["name"].as_str().unwrap_or("?"),
        v["model"]["revision"].as_str().unwrap_or("?"),
        v["candidates"],
        v["truncated"],
        v["timings"]["queue_ms"],
        v["timings"]["inference_ms"]
    );
}
