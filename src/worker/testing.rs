//! Fakes for the worker's in-process tests: no broker, no model.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::finish::{Finished, Outcome, Routes, Sink};
use crate::config::OtelConfig;
use crate::obs::health::Health;
use crate::obs::metrics::{Metrics, ModelLabels};
use crate::obs::recorder::Recorder;

/// Collects finished events instead of producing them.
#[derive(Clone, Default)]
pub struct Collect(pub Arc<Mutex<Vec<Finished>>>);

impl Sink for Collect {
    fn finish(&self, f: Finished) {
        self.0.lock().unwrap().push(f);
    }
}

impl Collect {
    pub fn topics(&self) -> Vec<(String, Outcome)> {
        let v = self.0.lock().unwrap();
        v.iter()
            .map(|f| {
                let topic = f.rec.as_ref().map_or("(none)", |r| r.topic.as_str());
                (topic.to_string(), f.outcome)
            })
            .collect()
    }
}

pub fn recorder() -> Arc<Recorder> {
    let metrics = Metrics::new(
        ModelLabels {
            name: "m",
            revision: "r",
            device: "cpu",
        },
        Arc::new(Health::new(Duration::from_secs(1), Duration::from_secs(60))),
        || 0,
        &OtelConfig::default(),
    )
    .unwrap();
    Arc::new(Recorder::new(metrics))
}

pub fn routes() -> Arc<Routes> {
    Arc::new(Routes {
        output_topic: "out".into(),
        dlq_topic: "dlq".into(),
        propagate: Vec::new(),
    })
}
