use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;

use reranker::config::{self, Config};
use reranker::worker::Worker;

#[derive(Parser)]
#[command(
    name = "reranker",
    version,
    about = "Kafka streaming cross-encoder reranker"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the worker: consume retrieval results, publish reranked top-N.
    Run(ConfigArgs),
    /// Re-run a slice of the input topic through the model (no consumer group, nothing committed);
    /// stops by itself at the end offsets seen at start, or at --to.
    Replay(ReplayArgs),
    /// Print the effective configuration (secrets redacted) and exit.
    Config(ConfigArgs),
    /// Start a local broker, feed sample events, run the worker and print what it publishes.
    Demo(DemoArgs),
    /// Load a model: print its inputs/outputs and provider, check parity against reference.jsonl
    /// when present, and measure throughput per batch size.
    CheckModel(CheckModelArgs),
    /// Benchmarks. `--model-only`: pairs/s of the bare ONNX Runtime session per batch shape.
    Bench(BenchArgs),
    /// Write a near-zero-cost model directory for benchmarks: a cross-encoder's inputs and output
    /// computed as an embedding lookup, a masked mean and a dot product, with --from's tokenizer.
    MakeModel(MakeModelArgs),
    /// Choose K (candidates reranked per event) and N (outputs): quality before/after reranking
    /// and cost per K on labelled retrieval results; recommends the smallest K within 1% of the
    /// best nDCG@10.
    Tune(TuneArgs),
}

#[derive(Args, Clone)]
struct CheckModelArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Model directory (overrides model.dir).
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct MakeModelArgs {
    /// Model directory whose tokenizer.json (and config.json) the new model uses; its vocabulary
    /// sizes the embedding table.
    #[arg(long, env = "RERANKER_MODEL__DIR")]
    from: PathBuf,
    /// Directory to write (created; model.onnx is replaced).
    #[arg(long)]
    out: PathBuf,
    /// Embedding dimension.
    #[arg(long, default_value_t = 16)]
    dim: usize,
    /// Seed of the embedding and weight tables.
    #[arg(long, default_value_t = 13)]
    seed: u64,
    /// Element type of the id inputs (int64 or int32), as exports differ.
    #[arg(long, default_value = "int64", value_parser = ["int64", "int32"])]
    ids: String,
    /// Element type of the logits (float32 or float16, as fp16 exports keep).
    #[arg(long, default_value = "float32", value_parser = ["float32", "float16"])]
    logits: String,
}

#[derive(Args, Clone)]
struct BenchArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Benchmark the bare session only (no broker).
    #[arg(long)]
    model_only: bool,
    /// Priority lanes (no broker): a bulk backlog of --events × --candidates scored alone, then
    /// with interactive events arriving every --interactive-every-ms; interactive latency vs its
    /// bound and the backlog's throughput ratio.
    #[arg(long)]
    lanes: bool,
    #[arg(long, default_value_t = 1000)]
    interactive_every_ms: u64,
    #[arg(long, default_value_t = 10)]
    interactive_candidates: usize,
    /// Benchmark the host side only (decode, tokenize, batch, assemble, render; no broker, a
    /// no-op scorer) for each `--threads`, beside the bare tokenizer on the same pairs.
    #[arg(long)]
    host_only: bool,
    /// Host-only: admission thread counts (default 1, 2, … up to the cores).
    #[arg(long, value_delimiter = ',')]
    threads: Vec<usize>,
    /// End-to-end: events to produce (SciFact queries, cycled).
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// End-to-end: candidates per event.
    #[arg(long, default_value_t = 10)]
    candidates: usize,
    /// End-to-end: events per second; 0 = the whole backlog at once (throughput).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// End-to-end: stop measuring after this many seconds with the rest of the input still
    /// queued (overload runs: offer far more than the worker can take, watch memory).
    #[arg(long)]
    max_seconds: Option<f64>,
    /// End-to-end: an existing broker (default: start a local tansu).
    #[arg(long)]
    bench_brokers: Option<String>,
    #[arg(long, default_value = reranker::demo::SCIFACT)]
    data: PathBuf,
    /// End-to-end: then run the Python peer (default scripts/python_peer.py; RERANKER_PYTHON
    /// names the interpreter) on the same events, broker and model, and print the ratio.
    #[arg(
        long,
        num_args = 0..=1,
        default_missing_value = "scripts/python_peer.py",
        conflicts_with_all = ["model_only", "host_only", "lanes"]
    )]
    python_peer: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,16,32,64")]
    batch_sizes: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
    seq_lens: Vec<usize>,
    /// Seconds of timed runs per shape.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// TOML file; defaults apply when omitted.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers (kafka.brokers).
    #[arg(long)]
    brokers: Option<String>,
    /// Consumer group (kafka.group_id).
    #[arg(long)]
    group_id: Option<String>,
    /// Model directory (model.dir).
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// Any key: --set batch.max_wait_ms=5 (repeatable; wins over file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args, Clone)]
struct ReplayArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Start: an offset (on every partition) or an RFC 3339 timestamp (first record at or after it).
    #[arg(long)]
    from: reranker::replay::Position,
    /// End, exclusive: an offset or an RFC 3339 timestamp (default: the end of each partition now).
    #[arg(long)]
    to: Option<reranker::replay::Position>,
    /// Topic to read (kafka.input_topic).
    #[arg(long)]
    input: String,
    /// Topic to write the reranked events to (kafka.output_topic).
    #[arg(long)]
    output: String,
    /// Dead-letter topic (kafka.dlq_topic).
    #[arg(long)]
    dlq: Option<String>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Clone)]
struct DemoArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Extra SciFact queries fed after the built-in examples.
    #[arg(long, default_value_t = 3)]
    scifact_events: usize,
    /// `mock`: librdkafka's in-process mock cluster, nothing to build; `tansu`: a real broker process.
    #[arg(long, value_enum, default_value = "tansu")]
    broker: reranker::demo::DemoBroker,
}

#[derive(Args, Clone)]
struct TuneArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Labelled retrieval results, JSONL or .jsonl.gz: SciFact rows {query_id, query,
    /// candidates} or retrieval-result events (request_id = the qrels' query id).
    #[arg(long, default_value = reranker::demo::SCIFACT)]
    data: PathBuf,
    /// Relevance judgments: TSV query-id, corpus-id, score.
    #[arg(long, default_value = reranker::tools::tune::SCIFACT_QRELS)]
    qrels: PathBuf,
    /// Candidates per event to rerank.
    #[arg(long = "k", value_delimiter = ',', default_value = "10,20,50,100")]
    ks: Vec<usize>,
    /// Outputs per event: recall@N is reported for each.
    #[arg(long = "n", value_delimiter = ',', default_value = "3,10")]
    ns: Vec<usize>,
    /// Judged queries to evaluate (0 = all); the max-K pass scores queries × max(K) pairs.
    #[arg(long, default_value_t = 50)]
    queries: usize,
    /// Events per K timed for pairs/s and latency.
    #[arg(long, default_value_t = 10)]
    cost_queries: usize,
    /// JSON report (per-K metrics and every score).
    #[arg(long, default_value = "tune-report.json")]
    out: PathBuf,
    /// Plot of quality and cost against K (SVG).
    #[arg(long, default_value = "tune-report.svg")]
    plot: PathBuf,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, config::ConfigError> {
        let mut overrides = Vec::new();
        if let Some(b) = &self.brokers {
            overrides.push(format!("kafka.brokers={}", toml_str(b)));
        }
        if let Some(g) = &self.group_id {
            overrides.push(format!("kafka.group_id={}", toml_str(g)));
        }
        if let Some(d) = &self.model_dir {
            overrides.push(format!("model.dir={}", toml_str(&d.to_string_lossy())));
        }
        overrides.extend(self.set.iter().cloned());
        config::load(self.config.as_deref(), &overrides)
    }
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot install SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
        }
        let _ = tx.send(true);
    });
    rx
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(real_main(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Config(a) => {
            let cfg = a.load()?;
            print!("{}", cfg.redacted_toml());
            Ok(())
        }
        Cmd::Run(a) => {
            let cfg = a.load()?;
            let _telemetry = reranker::obs::telemetry::init(&cfg.log, &cfg.otel)?;
            tracing::info!(config = %cfg.redacted_toml().replace('\n', "; "), "starting");
            let shutdown = shutdown_signal();
            let worker = Worker::spawn_load(cfg.clone()).await?;
            worker.run(shutdown).await?;
            Ok(())
        }
        Cmd::Replay(a) => {
            let mut args = a.config.clone();
            args.set
                .push(format!("kafka.input_topic={}", toml_str(&a.input)));
            args.set
                .push(format!("kafka.output_topic={}", toml_str(&a.output)));
            if let Some(d) = &a.dlq {
                args.set.push(format!("kafka.dlq_topic={}", toml_str(d)));
            }
            let cfg = args.load()?;
            let _telemetry = reranker::obs::telemetry::init(&cfg.log, &cfg.otel)?;
            let summary = reranker::replay::run(cfg, a.from, a.to, shutdown_signal()).await?;
            if a.json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                reranker::replay::print_summary(&summary);
            }
            Ok(())
        }
        Cmd::CheckModel(a) => {
            let mut cfg = a.config.load()?;
            if let Some(m) = a.model {
                cfg.model.dir = m;
            }
            let _telemetry = reranker::obs::telemetry::init(&cfg.log, &cfg.otel)?;
            tokio::task::spawn_blocking(move || reranker::tools::bench::check_model(&cfg.model))
                .await?
        }
        Cmd::MakeModel(a) => {
            use reranker::model::{synth, IdType, LogitType};
            let io = synth::Interface {
                ids: if a.ids == "int32" {
                    IdType::I32
                } else {
                    IdType::I64
                },
                logits: if a.logits == "float16" {
                    LogitType::F16
                } else {
                    LogitType::F32
                },
            };
            let vocab = synth::write_near_zero_dir(&a.from, &a.out, a.dim, a.seed, io)?;
            eprintln!(
                "wrote {}: near-zero model (vocabulary {vocab} × {} embedding, masked mean, dot product) and the tokenizer of {}",
                a.out.join("model.onnx").display(),
                a.dim,
                a.from.display()
            );
            Ok(())
        }
        Cmd::Bench(a) => {
            let cfg = a.config.load()?;
            let _telemetry = reranker::obs::telemetry::init(&cfg.log, &cfg.otel)?;
            if a.lanes {
                let opts = reranker::tools::bench::LanesOptions {
                    bulk_events: a.events,
                    candidates: a.candidates,
                    interactive_every: std::time::Duration::from_millis(a.interactive_every_ms),
                    interactive_candidates: a.interactive_candidates,
                    data: a.data.clone(),
                };
                let report =
                    tokio::task::spawn_blocking(move || reranker::tools::bench::lanes(&cfg, &opts))
                        .await??;
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    reranker::tools::bench::print_lanes(&report);
                }
                return Ok(());
            }
            if a.host_only {
                let threads = if a.threads.is_empty() {
                    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                    (1..=cores.max(2)).collect()
                } else {
                    a.threads.clone()
                };
                let opts = reranker::tools::bench::HostOptions {
                    events: a.events,
                    candidates: a.candidates,
                    threads,
                    data: a.data.clone(),
                };
                let report = tokio::task::spawn_blocking(move || {
                    reranker::tools::bench::host_only(&cfg, &opts)
                })
                .await??;
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    reranker::tools::bench::print_host(&report);
                }
                return Ok(());
            }
            if !a.model_only {
                let report = reranker::tools::bench::end_to_end(
                    cfg,
                    reranker::tools::bench::E2eOptions {
                        events: a.events,
                        candidates: a.candidates,
                        rate: a.rate,
                        max_seconds: a.max_seconds,
                        partitions: a.partitions,
                        brokers: a.bench_brokers.clone(),
                        data: a.data.clone(),
                        python_peer: a.python_peer.clone(),
                    },
                )
                .await?;
                if a.json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    reranker::tools::bench::print_e2e(&report);
                }
                return Ok(());
            }
            let rows = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let mut scorer = reranker::model::Scorer::load(&cfg.model, &cfg.model_name())?;
                eprintln!(
                    "bare ONNX Runtime session: {} on {}, intra-op threads {}",
                    scorer.info().file.display(),
                    scorer.info().device,
                    cfg.model.intra_op_threads
                );
                reranker::tools::bench::model_only(
                    &mut scorer,
                    &a.batch_sizes,
                    &a.seq_lens,
                    std::time::Duration::from_secs_f64(a.seconds),
                )
            })
            .await??;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                reranker::tools::bench::print_table(&rows);
            }
            Ok(())
        }
        Cmd::Demo(a) => {
            let cfg = a.config.load()?;
            let _telemetry = reranker::obs::telemetry::init(&cfg.log, &cfg.otel)?;
            reranker::demo::run(cfg, a.scifact_events, a.broker).await
        }
        Cmd::Tune(a) => {
            let cfg = a.config.load()?;
            let _telemetry = reranker::obs::telemetry::init(&cfg.log, &cfg.otel)?;
            let opts = reranker::tools::tune::TuneOptions {
                data: a.data.clone(),
                qrels: a.qrels.clone(),
                ks: a.ks.clone(),
                ns: a.ns.clone(),
                queries: a.queries,
                cost_queries: a.cost_queries,
                progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let report =
                tokio::task::spawn_blocking(move || reranker::tools::tune::run(&cfg, &opts))
                    .await??;
            std::fs::write(&a.out, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("cannot write {}", a.out.display()))?;
            std::fs::write(&a.plot, reranker::tools::tune::svg(&report))
                .with_context(|| format!("cannot write {}", a.plot.display()))?;
            print!("{}", reranker::tools::tune::table(&report));
            eprintln!(
                "wrote {} and {} in {:.0} s",
                a.out.display(),
                a.plot.display(),
                report.wall_s
            );
            Ok(())
        }
    }
}
