//! The worker's HTTP endpoint (`http.listen`): `/healthz`, `/readyz` and Prometheus `/metrics`.
//!
//! - `/healthz`: 200 while the process serves requests (liveness).
//! - `/readyz`: 200 once the model is warmed up, partitions are assigned and a broker was seen
//!   connected within `http.broker_timeout_ms`; otherwise 503 with a one-line reason. It turns
//!   503 again when shutdown starts.
//! - `/metrics`: Prometheus text exposition of [`super::metrics::Metrics`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::oneshot;

use super::health::Health;
use super::metrics::Metrics;

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

const TEXT: &str = "text/plain; charset=utf-8";

async fn healthz() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, TEXT)], "ok\n")
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    match s.health.readiness() {
        Ok(()) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, TEXT)],
            "ready\n".to_string(),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, TEXT)],
            format!("not ready: {reason}\n"),
        ),
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { metrics, health })
}

/// A running server; [`Server::stop`] ends it.
pub struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `listen` (an `IP:PORT`) and serves in a background task.
    pub async fn start(
        listen: &str,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> anyhow::Result<Self> {
        let addr: SocketAddr = listen
            .parse()
            .with_context(|| format!("http.listen {listen:?} is not IP:PORT"))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on http.listen = {listen}"))?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let app = router(metrics, health);
        let task = tokio::spawn(async move {
            let res = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = res {
                tracing::warn!(error = %e, "http server failed");
            }
        });
        tracing::info!(addr = %addr, "http server listening (/healthz, /readyz, /metrics)");
        Ok(Self { addr, stop, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in progress finish (a scraper's idle keep-alive connection
    /// does not hold it up for more than a second), and returns.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}
