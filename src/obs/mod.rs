//! Observability: one [`recorder::Recorder`] call per event feeds the OpenTelemetry instruments
//! and the totals that logs, `bench` and `replay` read; [`health`] decides readiness.

pub mod health;
pub mod http;
pub mod metrics;
pub mod recorder;
pub mod telemetry;
