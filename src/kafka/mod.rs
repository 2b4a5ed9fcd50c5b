//! Kafka clients: the consumer with its rebalance callback, the idempotent producer, and the
//! transactional producer of exactly_once. Every client starts from [`client_config`].

use std::collections::BTreeMap;

use rdkafka::config::ClientConfig;

use crate::config::KafkaConfig;

pub mod consumer;
pub mod producer;
pub mod txn;

/// `bootstrap.servers`, then the role's defaults, then `[kafka.client]` and the role's own
/// section: settings from the configuration always win over the defaults.
pub fn client_config(
    k: &KafkaConfig,
    defaults: &[(&str, &str)],
    role: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &k.brokers);
    for (key, v) in defaults {
        c.set(*key, *v);
    }
    for (key, v) in k.client.iter().chain(role) {
        c.set(key, v);
    }
    c
}
