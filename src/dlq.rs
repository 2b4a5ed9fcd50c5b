//! Dead-letter records (`schemas/dead-letter.v1.json`): the original bytes, why they failed, and
//! where they came from, so a record can be fixed and replayed.

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::decode::ErrorCode;

pub const DLQ_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub error: DlqError,
    pub source: DlqSource,
    pub payload: DlqPayload,
    pub worker: DlqWorker,
    pub failed_at_ms: i64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DlqError {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DlqSource {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub timestamp_ms: Option<i64>,
    /// Record key as UTF-8, or base64 when it is not UTF-8 (see `key_encoding`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub key_encoding: Option<Encoding>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Utf8,
    Base64,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DlqPayload {
    /// `null` for a record without a value.
    pub data: Option<String>,
    pub encoding: Encoding,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DlqWorker {
    pub name: String,
    pub version: String,
}

pub fn encode_bytes(b: &[u8]) -> (String, Encoding) {
    match std::str::from_utf8(b) {
        Ok(s) => (s.to_string(), Encoding::Utf8),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(b),
            Encoding::Base64,
        ),
    }
}

pub struct DlqInput<'a> {
    pub code: ErrorCode,
    pub message: &'a str,
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
}

pub fn render(i: &DlqInput<'_>, now_ms: i64) -> Vec<u8> {
    let (key, key_encoding) = match i.key.map(encode_bytes) {
        Some((k, e)) => (Some(k), Some(e)),
        None => (None, None),
    };
    let (data, encoding) = match i.payload.map(encode_bytes) {
        Some((d, e)) => (Some(d), e),
        None => (None, Encoding::Utf8),
    };
    let rec = DeadLetter {
        schema_version: DLQ_SCHEMA_VERSION,
        error: DlqError {
            code: i.code,
            message: i.message.to_string(),
        },
        source: DlqSource {
            topic: i.topic.to_string(),
            partition: i.partition,
            offset: i.offset,
            timestamp_ms: i.timestamp_ms,
            key,
            key_encoding,
        },
        payload: DlqPayload { data, encoding },
        worker: DlqWorker {
            name: env!("CARGO_PKG_NAME").into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        failed_at_ms: now_ms,
    };
    serde_json::to_vec(&rec).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payload_round_trips_through_base64() {
        let bytes = [0xffu8, 0x00, 0x7b];
        let out = render(
            &DlqInput {
                code: ErrorCode::InvalidUtf8,
                message: "bad",
                topic: "t",
                partition: 1,
                offset: 2,
                timestamp_ms: None,
                key: Some(b"k"),
                payload: Some(&bytes),
            },
            5,
        );
        let rec: DeadLetter = serde_json::from_slice(&out).unwrap();
        assert_eq!(rec.payload.encoding, Encoding::Base64);
        let back = base64::engine::general_purpose::STANDARD
            .decode(rec.payload.data.unwrap())
            .unwrap();
        assert_eq!(back, bytes);
        assert_eq!(rec.source.key.as_deref(), Some("k"));
    }
}
