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
    let f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let rows: Vec<Value> = std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| Ok(serde_json::from_str(&l?)?))
        .collect::<anyhow::Result<_>>()?;
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

pub async fn run(mut cfg: Config, scifact: usize) -> anyhow::Result<()> {
    eprintln!("starting a local tansu broker…");
    let broker = TansuBroker::start()?;
    cfg.kafka.brokers = broker.bootstrap();
    create_topics(
        &cfg.kafka.brokers,
        &[
            (&cfg.kafka.input_topic, 4),
            (&cfg.kafka.output_topic, 4),
            (&cfg.kafka.dlq_topic, 1),
        ],
    )
    .await?;

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
