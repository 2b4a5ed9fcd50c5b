//! `reranker bench`: the whole pipeline against a broker, measured against the bare session.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use crate::model::{Scorer, TensorBatch};
use crate::tokenize::{EncodedPair, PairTokenizer};

/// Options of the end-to-end benchmark.
pub struct E2eOptions {
    pub events: usize,
    pub candidates: usize,
    /// Events per second; 0 produces the whole backlog at once (throughput mode).
    pub rate: f64,
    /// Stop measuring after this long, whatever is still queued (overload runs).
    pub max_seconds: Option<f64>,
    pub partitions: i32,
    /// Use this broker instead of starting a local tansu.
    pub brokers: Option<String>,
    pub data: std::path::PathBuf,
    /// After the worker: run this Python peer (scripts/python_peer.py) on the same input topic,
    /// broker and model, and report its pairs/s beside the worker's.
    pub python_peer: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

#[derive(Debug, Serialize)]
pub struct E2eReport {
    pub events: usize,
    /// Events with output within the run; fewer than `events` when `max_seconds` cut it short.
    pub events_done: usize,
    pub pairs: usize,
    pub max_length: usize,
    pub max_batch_pairs: usize,
    pub offered_rate_events_per_s: Option<f64>,
    /// First produce to last output, start-up included.
    pub wall_s: f64,
    /// Steady state: pairs after the first output ÷ time from first to last output.
    pub e2e_pairs_per_s: f64,
    pub e2e_events_per_s: f64,
    /// Input produce time → output consumed, milliseconds.
    pub latency_ms: Percentiles,
    /// The output reader's `fetch.wait.max.ms`: up to this much of each latency is the reader's.
    pub reader_fetch_wait_ms: u64,
    pub batches: u64,
    pub mean_batch_pairs: f64,
    /// Fraction of the batches' token slots that are padding (as `reranker_batch_padding_ratio`).
    pub padding_ratio: f64,
    /// Mean wall time of one inference batch.
    pub mean_batch_inference_ms: f64,
    /// `batch.max_wait_ms` + 2 × the mean batch: what p99 should stay under at half of max
    /// throughput (one batch in flight when an event arrives, then its own).
    pub latency_bound_ms: f64,
    /// Process CPU time (user + system, every thread) from the first produce to the last output,
    /// per pair reranked: the worker, plus this benchmark's own producer and reader (the broker
    /// runs in another process and is not counted).
    pub cpu_us_per_pair: f64,
    /// Highest resident set size sampled while the worker ran (the bare sessions excluded).
    pub peak_rss_mb: f64,
    /// The same pairs scored by the bare session in ideal batches (sorted by length, full),
    /// before and after the end-to-end run.
    pub bare_pairs_per_s_before: f64,
    pub bare_pairs_per_s_after: f64,
    /// The faster of the two: a machine busy with something else in one phase must not flatter
    /// the ratio.
    pub bare_pairs_per_s: f64,
    /// End-to-end pairs/s ÷ bare pairs/s.
    pub efficiency: f64,
    /// The Python peer on the same events, broker and model (`--python-peer`).
    pub python_peer: Option<PeerReport>,
}

/// What scripts/python_peer.py prints, and the worker's figures over its.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct PeerReport {
    pub events: usize,
    pub pairs: usize,
    pub pairs_per_s: f64,
    /// The Python process's CPU time (every thread, librdkafka's included) per pair.
    pub cpu_us_per_pair: f64,
    /// Outputs the peer's producer saw delivered.
    #[serde(default)]
    pub delivered: usize,
    /// Worker pairs/s ÷ peer pairs/s.
    #[serde(default)]
    pub speedup: f64,
    /// Peer CPU µs/pair ÷ worker (process) CPU µs/pair.
    #[serde(default)]
    pub cpu_ratio: f64,
}

fn percentiles(mut v: Vec<f64>) -> Percentiles {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * q).round() as usize]
    };
    Percentiles {
        p50: at(0.50),
        p95: at(0.95),
        p99: at(0.99),
        max: at(1.0),
    }
}

fn rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The broker and fresh topics of one run (a local tansu unless `--bench-brokers`); the broker
/// lives as long as the returned value.
async fn bench_broker(
    cfg: &mut crate::config::Config,
    opt: &E2eOptions,
) -> anyhow::Result<Option<crate::broker::TansuBroker>> {
    let broker = match &opt.brokers {
        Some(b) => {
            cfg.kafka.brokers = b.clone();
            None
        }
        None => {
            let b = crate::broker::TansuBroker::start()?;
            cfg.kafka.brokers = b.bootstrap();
            Some(b)
        }
    };
    let run_id = format!("{}-{}", std::process::id(), crate::now_ms());
    cfg.kafka.input_topic = format!("bench-in-{run_id}");
    cfg.kafka.output_topic = format!("bench-out-{run_id}");
    cfg.kafka.dlq_topic = format!("bench-dlq-{run_id}");
    cfg.kafka.group_id = format!("bench-{run_id}");
    // A benchmark must not collide with a worker already serving the default metrics port.
    cfg.http.listen = "127.0.0.1:0".into();
    crate::broker::create_topics(
        &cfg.kafka.brokers,
        &[
            (&cfg.kafka.input_topic, opt.partitions),
            (&cfg.kafka.output_topic, opt.partitions),
            (&cfg.kafka.dlq_topic, 1),
        ],
    )
    .await?;
    Ok(broker)
}

/// Samples this process's resident set size every 100 ms; the peak so far is in the mutex.
fn spawn_rss_sampler() -> (
    tokio::task::JoinHandle<()>,
    std::sync::Arc<std::sync::Mutex<f64>>,
) {
    let peak_rss = std::sync::Arc::new(std::sync::Mutex::new(0f64));
    let peak = peak_rss.clone();
    let sampler = tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_millis(100));
        loop {
            t.tick().await;
            if let Ok(mut p) = peak.lock() {
                *p = p.max(rss_mb());
            }
        }
    });
    (sampler, peak_rss)
}

/// Produces the events, all at once (`rate` 0) or paced, recording each one's send time.
fn spawn_producer(
    producer: rdkafka::producer::FutureProducer,
    topic: String,
    events: Vec<serde_json::Value>,
    rate: f64,
    sent: std::sync::Arc<std::sync::Mutex<HashMap<String, i64>>>,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    use rdkafka::producer::FutureRecord;
    tokio::spawn(async move {
        let mut tick =
            (rate > 0.0).then(|| tokio::time::interval(Duration::from_secs_f64(1.0 / rate)));
        let mut pending = Vec::new();
        for ev in events {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            let id = ev["request_id"].as_str().unwrap_or_default().to_string();
            let payload = serde_json::to_vec(&ev)?;
            sent.lock()
                .map_err(|_| anyhow::anyhow!("lock"))?
                .insert(id.clone(), crate::now_ms());
            let fut = producer.send_result(FutureRecord::to(&topic).key(&id).payload(&payload));
            let fut = fut.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
            pending.push(fut);
        }
        for f in pending {
            f.await?.map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
        }
        anyhow::Ok(())
    })
}

/// Produces retrieval events to a broker, runs the worker in this process, reads every output,
/// then scores the same pairs with the bare session: both figures come from one run on one machine.
pub async fn end_to_end(
    mut cfg: crate::config::Config,
    opt: E2eOptions,
) -> anyhow::Result<E2eReport> {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let events = crate::demo::scifact_events(&opt.data, opt.events, opt.candidates, 10, "bench-")?;
    let pairs_total: usize = events
        .iter()
        .map(|e| e["candidates"].as_array().map_or(0, Vec::len))
        .sum();
    let _broker = bench_broker(&mut cfg, &opt).await?;

    // An overload run stops early: the bare session then scores what the worker got through.
    let bare_before = if opt.max_seconds.is_none() {
        eprintln!("scoring the pairs with a bare session…");
        bare_pairs_per_s(&cfg, &events)?
    } else {
        0.0
    };

    eprintln!("loading and warming the model…");
    // The process's high-water mark would include the bare session: sample while the worker runs.
    let (sampler, peak_rss) = spawn_rss_sampler();
    let c = cfg.clone();
    let worker = crate::worker::Worker::spawn_load(c).await?.stop_on_stall();
    let recorder = worker.recorder.clone();
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", format!("{}-reader", cfg.kafka.group_id))
        .set("auto.offset.reset", "earliest")
        // tansu answers a long-poll only when it times out, so the reader's wait adds to the
        // latency it measures; but each empty fetch costs tansu a few ms of CPU (at 5 ms, ~60% of
        // a core taken from the worker on a small machine). Paced runs measure latency and poll
        // at 5 ms; backlog runs measure throughput and poll as the worker does.
        .set("fetch.wait.max.ms", reader_wait_ms(opt.rate).to_string())
        .create()?;
    reader.subscribe(&[&cfg.kafka.output_topic, &cfg.kafka.dlq_topic])?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut worker_task = tokio::spawn(worker.run(stop_rx));

    // Like the retrievers that feed a worker: idempotent and batching.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .create()?;
    // One event through first, not counted: latency is the pipeline's, not the group join's.
    let warm = crate::demo::jim_carrey_event();
    producer
        .send(
            FutureRecord::to(&cfg.kafka.input_topic)
                .key("bench-warm-up")
                .payload(&serde_json::to_vec(&warm)?),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(600), reader.recv()) => {
            r.context("the warm-up event got no output")??;
        }
        r = &mut worker_task => return Err(worker_ended(r)),
    }
    // Counted from here, so that the worker's counters describe only the measured events.
    let before = recorder.snapshot();

    // Produce (all at once, or paced) while recording each event's send time.
    let sent: std::sync::Arc<std::sync::Mutex<HashMap<String, i64>>> = Default::default();
    let (cpu0, t0) = (super::host::cpu_time(), Instant::now());
    let producing = spawn_producer(
        producer.clone(),
        cfg.kafka.input_topic.clone(),
        events.clone(),
        opt.rate,
        sent.clone(),
    );

    let mut latencies = Vec::with_capacity(opt.events);
    let mut last = t0;
    let mut first: Option<(Instant, usize)> = None;
    let cut = opt.max_seconds.map(|s| t0 + Duration::from_secs_f64(s));
    let deadline = tokio::time::Instant::from_std(cut.unwrap_or(t0 + Duration::from_secs(3600)));
    while latencies.len() < opt.events {
        // A worker that stops (a stalled partition, a fatal error) ends the benchmark with its error.
        let msg = tokio::select! {
            r = tokio::time::timeout_at(deadline, reader.recv()) => match r {
                Ok(m) => m?,
                Err(_) if cut.is_some() => break,
                Err(_) => anyhow::bail!("benchmark timed out"),
            },
            r = &mut worker_task => return Err(worker_ended(r)),
        };
        let now = crate::now_ms();
        last = Instant::now();
        anyhow::ensure!(
            msg.topic() == cfg.kafka.output_topic,
            "an event was dead-lettered"
        );
        let v: serde_json::Value = serde_json::from_slice(msg.payload().unwrap_or_default())?;
        let id = v["request_id"].as_str().unwrap_or_default();
        first.get_or_insert((last, v["candidates"].as_u64().unwrap_or(0) as usize));
        if let Some(at) = sent.lock().map_err(|_| anyhow::anyhow!("lock"))?.get(id) {
            latencies.push((now - at) as f64);
        }
        if latencies.len() % 50 == 0 {
            eprintln!("  {} / {} events reranked", latencies.len(), opt.events);
        }
    }
    let events_done = latencies.len();
    let cpu = super::host::cpu_time().saturating_sub(cpu0);
    if cut.is_some() {
        producing.abort();
    } else {
        producing.await??;
    }
    let wall = last.duration_since(t0).as_secs_f64();
    // Events go out in any order; every SciFact event has the same number of candidates.
    let pairs_done = pairs_total * events_done / opt.events.max(1);
    let _ = stop_tx.send(true);
    worker_task.await??;
    sampler.abort();
    let peak_rss_mb = peak_rss.lock().map(|p| *p).unwrap_or(f64::NAN);
    let measured = recorder.snapshot().since(&before);
    let mean_batch_inference_ms = measured.mean_batch_inference_ms();

    eprintln!("scoring the same pairs with a bare session again…");
    let bare_after = bare_pairs_per_s(&cfg, &events[..events_done.max(1).min(events.len())])?;
    let bare = bare_before.max(bare_after);
    // Steady state, first output to last: group join and model start-up are not throughput.
    let e2e = match first {
        Some((t, n)) if last > t => (pairs_done - n) as f64 / last.duration_since(t).as_secs_f64(),
        _ => pairs_done as f64 / wall,
    };
    let cpu_us_per_pair = cpu.as_secs_f64() * 1e6 / pairs_done.max(1) as f64;
    let python_peer = match &opt.python_peer {
        Some(script) => {
            let mut p = run_python_peer(script, &cfg, &opt, events_done).await?;
            p.speedup = e2e / p.pairs_per_s;
            p.cpu_ratio = p.cpu_us_per_pair / cpu_us_per_pair;
            Some(p)
        }
        None => None,
    };
    Ok(E2eReport {
        events: opt.events,
        events_done,
        pairs: pairs_total,
        max_length: cfg.model.max_length,
        max_batch_pairs: cfg.batch.max_batch_pairs,
        offered_rate_events_per_s: (opt.rate > 0.0).then_some(opt.rate),
        wall_s: wall,
        e2e_pairs_per_s: e2e,
        e2e_events_per_s: e2e * opt.events as f64 / pairs_total.max(1) as f64,
        latency_ms: percentiles(latencies),
        reader_fetch_wait_ms: reader_wait_ms(opt.rate),
        batches: measured.batches,
        mean_batch_pairs: measured.mean_batch_pairs(),
        padding_ratio: measured.padding_ratio(),
        mean_batch_inference_ms,
        latency_bound_ms: cfg.batch.max_wait_ms as f64 + 2.0 * mean_batch_inference_ms,
        cpu_us_per_pair,
        peak_rss_mb,
        bare_pairs_per_s_before: bare_before,
        bare_pairs_per_s_after: bare_after,
        bare_pairs_per_s: bare,
        efficiency: e2e / bare,
        python_peer,
    })
}

/// Runs the Python peer on the benchmark's input topic (its own group, from the beginning) with
/// the same model, `max_length`, batch size, intra-op threads and spinning setting, writing to a
/// topic of its own; the worker has
/// stopped by then, so the two never share the machine.
async fn run_python_peer(
    script: &std::path::Path,
    cfg: &crate::config::Config,
    opt: &E2eOptions,
    events: usize,
) -> anyhow::Result<PeerReport> {
    let output = format!("{}-python", cfg.kafka.output_topic);
    crate::broker::create_topics(&cfg.kafka.brokers, &[(&output, opt.partitions)]).await?;
    let python = std::env::var("RERANKER_PYTHON").unwrap_or_else(|_| "python3".into());
    eprintln!(
        "running the Python peer ({python} {}) on the same events…",
        script.display()
    );
    let out = tokio::process::Command::new(&python)
        .arg(script)
        .args(["--brokers", &cfg.kafka.brokers])
        .args(["--input", &cfg.kafka.input_topic])
        .args(["--output", &output])
        .args(["--group", &format!("{}-python", cfg.kafka.group_id)])
        .arg("--model")
        .arg(&cfg.model.dir)
        .arg("--model-file")
        .arg(&cfg.model.file)
        .args(["--events", &events.to_string()])
        .args(["--id-prefix", "bench-"])
        .args(["--max-length", &cfg.model.max_length.to_string()])
        .args(["--batch", &cfg.batch.max_batch_pairs.to_string()])
        .args(["--threads", &cfg.model.intra_op_threads.to_string()])
        .args(cfg.model.allow_spinning.then_some("--spinning"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .await
        .with_context(|| format!("cannot run {python} {}", script.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "the Python peer failed ({}); `scripts/setup.sh --with-python` installs what it needs",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line)
        .with_context(|| format!("the Python peer printed no report (stdout: {stdout:?})"))
}

/// The error of a worker that ended while the benchmark still waited for outputs.
fn worker_ended(
    r: Result<anyhow::Result<crate::obs::recorder::Snapshot>, tokio::task::JoinError>,
) -> anyhow::Error {
    match r {
        Ok(Err(e)) => e.context("the worker stopped before the benchmark's events were reranked"),
        Ok(Ok(_)) => {
            anyhow::anyhow!("the worker stopped before the benchmark's events were reranked")
        }
        Err(e) => anyhow::anyhow!("the worker task failed: {e}"),
    }
}

/// The ceiling: the benchmark's own pairs, tokenized beforehand (not timed), sorted by length and
/// cut into full batches within the same budgets, scored back to back.
fn bare_pairs_per_s(
    cfg: &crate::config::Config,
    events: &[serde_json::Value],
) -> anyhow::Result<f64> {
    let tok =
        PairTokenizer::from_file(&cfg.model.dir.join("tokenizer.json"), cfg.model.max_length)?;
    let mut pairs = Vec::new();
    for e in events {
        let q = e["query"].as_str().unwrap_or_default();
        for c in e["candidates"].as_array().into_iter().flatten() {
            pairs.push(tok.encode(q, c["text"].as_str().unwrap_or_default())?);
        }
    }
    pairs.sort_by_key(EncodedPair::len);
    let mut batches: Vec<Vec<&EncodedPair>> = vec![Vec::new()];
    for p in &pairs {
        let cur = batches.last_mut().expect("non-empty");
        let fits = cur.len() < cfg.batch.max_batch_pairs
            && (cur.len() + 1) * p.len() <= cfg.batch.max_batch_tokens;
        if fits || cur.is_empty() {
            cur.push(p);
        } else {
            batches.push(vec![p]);
        }
    }
    let tensors: Vec<TensorBatch> = batches
        .iter()
        .map(|b| TensorBatch::from_pairs(b.iter().copied(), tok.pad_id()))
        .collect();
    let mut scorer = Scorer::load(&cfg.model, &cfg.model_name())?;
    let t0 = Instant::now();
    for t in &tensors {
        scorer.score(t)?;
    }
    Ok(pairs.len() as f64 / t0.elapsed().as_secs_f64())
}

/// The output reader's `fetch.wait.max.ms` (see where it is set).
fn reader_wait_ms(rate: f64) -> u64 {
    if rate > 0.0 {
        5
    } else {
        crate::kafka::consumer::FETCH_WAIT_MAX_MS
    }
}

pub fn print_e2e(r: &E2eReport) {
    println!(
        "end-to-end  {:>8.1} pairs/s  {:>7.2} events/s  ({} of {} events, {} pairs offered, {:.1} s)",
        r.e2e_pairs_per_s, r.e2e_events_per_s, r.events_done, r.events, r.pairs, r.wall_s
    );
    println!(
        "bare ORT    {:>8.1} pairs/s  (same pairs, ideal full length-sorted batches; {:.1} before, {:.1} after)",
        r.bare_pairs_per_s, r.bare_pairs_per_s_before, r.bare_pairs_per_s_after
    );
    println!("efficiency  {:>8.3}", r.efficiency);
    println!(
        "CPU         {:>8.1} µs/pair  (this process, first produce to last output: worker + bench producer and reader)",
        r.cpu_us_per_pair
    );
    println!(
        "latency ms  p50 {:.0}  p95 {:.0}  p99 {:.0}  max {:.0}  (max_wait + 2 × mean batch = {:.0}; reader polls every {} ms)",
        r.latency_ms.p50,
        r.latency_ms.p95,
        r.latency_ms.p99,
        r.latency_ms.max,
        r.latency_bound_ms,
        r.reader_fetch_wait_ms
    );
    println!("batches     {}  mean {:.1} pairs (max {})  padding ratio {:.3}  mean batch inference {:.0} ms", r.batches, r.mean_batch_pairs, r.max_batch_pairs, r.padding_ratio, r.mean_batch_inference_ms);
    println!("peak RSS    {:.0} MB", r.peak_rss_mb);
    if let Some(p) = &r.python_peer {
        println!(
            "python peer {:>8.1} pairs/s  {:>7.1} CPU µs/pair  ({} events, {} pairs; same broker, events, model, max_length, batch size)",
            p.pairs_per_s, p.cpu_us_per_pair, p.events, p.pairs
        );
        println!(
            "vs python   {:>8.2}× pairs/s  {:.2}× less CPU per pair",
            p.speedup, p.cpu_ratio
        );
    }
}
