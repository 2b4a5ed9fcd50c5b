//! A local tansu broker process for the demo and the tests (a Kafka-compatible broker that runs
//! without a JVM). Production deployments point `kafka.brokers` at a real cluster instead.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

pub struct TansuBroker {
    child: Child,
    pub port: u16,
    /// Holds the sqlite file; removed when the broker is dropped.
    _dir: tempfile::TempDir,
}

/// Where tansu keeps its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// A sqlite file in a fresh temporary directory: correct watermarks; the default everywhere.
    Sqlite,
    /// tansu 0.6's memory engine reports a partition's high watermark as one past the base
    /// offset of its last record batch, so a fetch positioned inside that batch (after a pause,
    /// a rebalance or a restart) waits forever. Only `tests/broker.rs` starts it, to show that
    /// its checks catch exactly this.
    Memory,
}

/// `tansu` on PATH, else where `cargo install` puts it.
pub fn tansu_binary() -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("tansu");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let p = PathBuf::from(std::env::var_os("HOME")?).join(".cargo/bin/tansu");
    p.is_file().then_some(p)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl TansuBroker {
    /// Starts a broker with [`Storage::Sqlite`] on a free loopback port.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(Storage::Sqlite)
    }

    pub fn start_with(storage: Storage) -> anyhow::Result<Self> {
        let bin = tansu_binary().context("tansu not found: run scripts/setup.sh --with-broker")?;
        let port = free_port()?;
        let url = format!("tcp://127.0.0.1:{port}");
        // tansu resolves a relative sqlite path against its working directory: a fresh temp dir
        // per broker, so runs never share (or inherit) a topic.
        let dir = tempfile::Builder::new()
            .prefix("tansu-")
            .tempdir()
            .context("cannot create the broker's directory")?;
        let storage = match storage {
            Storage::Sqlite => "sqlite://tansu.db",
            Storage::Memory => "memory://tansu/",
        };
        // tansu's tracing (`RUST_LOG`) writes to stdout, its panics to stderr: both to the file.
        let log = std::env::var_os("TANSU_LOG")
            .map(std::fs::File::create)
            .transpose()?;
        let (out, err) = match log {
            Some(f) => (Stdio::from(f.try_clone()?), Stdio::from(f)),
            None => (Stdio::null(), Stdio::null()),
        };
        let child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
                "--storage-engine",
                storage,
            ])
            .current_dir(dir.path())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("cannot start tansu")?;
        let mut b = Self {
            child,
            port,
            _dir: dir,
        };
        b.wait_ready(Duration::from_secs(30))?;
        Ok(b)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if let Some(status) = self.child.try_wait()? {
                bail!("tansu exited during start-up: {status}");
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "tansu did not listen on port {} within {timeout:?}",
            self.port
        )
    }

    /// Sends SIGKILL and waits (for restart tests).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for TansuBroker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates topics (idempotent: existing ones are fine).
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .context("cannot create admin client")?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(1)))
        .collect();
    let results = admin
        .create_topics(
            &new,
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .context("create_topics")?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((name, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {
                tracing::debug!(topic = %name, "topic exists")
            }
            Err((name, code)) => bail!("cannot create topic {name}: {code}"),
        }
    }
    Ok(())
}
