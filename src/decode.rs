//! Decode and validate input events (`schemas/retrieval-result.v1.json`).
//!
//! Every failure maps to one stable [`ErrorCode`] that lands in the dead-letter record, so operators
//! can alert on codes without parsing messages.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::LimitsConfig;

pub const INPUT_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalResult {
    pub schema_version: u32,
    pub request_id: String,
    pub query: String,
    #[serde(deserialize_with = "candidate_objects")]
    pub candidates: Vec<Candidate>,
    #[serde(default)]
    pub top_n: Option<u32>,
    /// Results whose raw logit (`score`) is below this are dropped.
    #[serde(default)]
    pub min_score: Option<f64>,
    /// Budget in ms counted from `produced_at` (or the record timestamp when absent).
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Milliseconds since the Unix epoch.
    #[serde(default)]
    pub produced_at: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    pub id: String,
    pub text: String,
    #[serde(default)]
    pub retriever_score: Option<f64>,
    /// Kept as raw JSON so it is passed through byte for byte.
    #[serde(default)]
    pub metadata: Option<Box<RawValue>>,
}

/// serde's derived structs also accept a JSON array of the fields in order; the contract allows
/// only objects, so a map is required before the derived impl sees the input.
struct MapOnly<T>(std::marker::PhantomData<T>);

impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for MapOnly<T> {
    type Value = T;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
    }
}

fn candidate_objects<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Candidate>, D::Error> {
    struct Obj(Candidate);
    impl<'de> Deserialize<'de> for Obj {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(MapOnly(std::marker::PhantomData))
                .map(Obj)
        }
    }
    Ok(Vec::<Obj>::deserialize(d)?
        .into_iter()
        .map(|o| o.0)
        .collect())
}

fn parse_event(text: &str) -> serde_json::Result<RetrievalResult> {
    use serde::Deserializer as _;
    let mut de = serde_json::Deserializer::from_str(text);
    let ev = (&mut de).deserialize_map(MapOnly(std::marker::PhantomData))?;
    de.end()?;
    Ok(ev)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    EmptyPayload,
    InvalidUtf8,
    InvalidJson,
    SchemaViolation,
    UnsupportedSchemaVersion,
    EmptyQuery,
    EmptyRequestId,
    TooManyCandidates,
    TextTooLong,
    PayloadTooLarge,
    DuplicateCandidateId,
    DeadlineExceeded,
    /// The tokenizer rejected a candidate (a valid event that cannot be encoded).
    TokenizationFailed,
    InferenceFailed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EmptyPayload => "empty_payload",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidJson => "invalid_json",
            Self::SchemaViolation => "schema_violation",
            Self::UnsupportedSchemaVersion => "unsupported_schema_version",
            Self::EmptyQuery => "empty_query",
            Self::EmptyRequestId => "empty_request_id",
            Self::TooManyCandidates => "too_many_candidates",
            Self::TextTooLong => "text_too_long",
            Self::PayloadTooLarge => "payload_too_large",
            Self::DuplicateCandidateId => "duplicate_candidate_id",
            Self::DeadlineExceeded => "deadline_exceeded",
            Self::TokenizationFailed => "tokenization_failed",
            Self::InferenceFailed => "inference_failed",
        }
    }

    pub const ALL: [ErrorCode; 14] = [
        Self::EmptyPayload,
        Self::InvalidUtf8,
        Self::InvalidJson,
        Self::SchemaViolation,
        Self::UnsupportedSchemaVersion,
        Self::EmptyQuery,
        Self::EmptyRequestId,
        Self::TooManyCandidates,
        Self::TextTooLong,
        Self::PayloadTooLarge,
        Self::DuplicateCandidateId,
        Self::DeadlineExceeded,
        Self::TokenizationFailed,
        Self::InferenceFailed,
    ];
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
}

fn err(code: ErrorCode, message: impl Into<String>) -> DecodeError {
    DecodeError {
        code,
        message: message.into(),
    }
}

/// Parses and validates one record value. `now_ms` and `record_ts_ms` decide deadline expiry.
pub fn decode(
    payload: Option<&[u8]>,
    limits: &LimitsConfig,
    record_ts_ms: Option<i64>,
    now_ms: i64,
) -> Result<RetrievalResult, DecodeError> {
    let bytes = match payload {
        None => {
            return Err(err(
                ErrorCode::EmptyPayload,
                "record has no value (tombstone)",
            ))
        }
        Some(b) if b.iter().all(u8::is_ascii_whitespace) => {
            return Err(err(ErrorCode::EmptyPayload, "record value is empty"))
        }
        Some(b) => b,
    };
    if bytes.len() > limits.max_event_bytes {
        return Err(err(
            ErrorCode::PayloadTooLarge,
            format!(
                "record value is {} bytes, limit is {}",
                bytes.len(),
                limits.max_event_bytes
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        err(
            ErrorCode::InvalidUtf8,
            format!("record value is not UTF-8: {e}"),
        )
    })?;
    let ev = parse_event(text).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => err(ErrorCode::SchemaViolation, e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                err(ErrorCode::InvalidJson, e.to_string())
            }
        }
    })?;
    validate(&ev, limits, record_ts_ms, now_ms)?;
    Ok(ev)
}

fn validate(
    ev: &RetrievalResult,
    limits: &LimitsConfig,
    record_ts_ms: Option<i64>,
    now_ms: i64,
) -> Result<(), DecodeError> {
    if ev.schema_version != INPUT_SCHEMA_VERSION {
        return Err(err(
            ErrorCode::UnsupportedSchemaVersion,
            format!(
                "schema_version {} is not supported (this worker reads {INPUT_SCHEMA_VERSION})",
                ev.schema_version
            ),
        ));
    }
    if ev.request_id.trim().is_empty() {
        return Err(err(ErrorCode::EmptyRequestId, "request_id is empty"));
    }
    if ev.query.trim().is_empty() {
        return Err(err(ErrorCode::EmptyQuery, "query is empty"));
    }
    if ev.query.len() > limits.max_query_bytes {
        return Err(err(
            ErrorCode::TextTooLong,
            format!(
                "query is {} bytes, limit is {}",
                ev.query.len(),
                limits.max_query_bytes
            ),
        ));
    }
    if ev.candidates.len() > limits.max_candidates {
        return Err(err(
            ErrorCode::TooManyCandidates,
            format!(
                "{} candidates, limit is {}",
                ev.candidates.len(),
                limits.max_candidates
            ),
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(ev.candidates.len());
    for (i, c) in ev.candidates.iter().enumerate() {
        if c.text.len() > limits.max_text_bytes {
            return Err(err(
                ErrorCode::TextTooLong,
                format!(
                    "candidates[{i}].text is {} bytes, limit is {}",
                    c.text.len(),
                    limits.max_text_bytes
                ),
            ));
        }
        if c.id.is_empty() {
            return Err(err(
                ErrorCode::SchemaViolation,
                format!("candidates[{i}].id is empty"),
            ));
        }
        if !seen.insert(c.id.as_str()) {
            return Err(err(
                ErrorCode::DuplicateCandidateId,
                format!("candidates[{i}].id {:?} appears twice", c.id),
            ));
        }
        if let Some(m) = &c.metadata {
            if !m.get().trim_start().starts_with('{') {
                return Err(err(
                    ErrorCode::SchemaViolation,
                    format!("candidates[{i}].metadata must be an object"),
                ));
            }
        }
        if let Some(s) = c.retriever_score {
            if !s.is_finite() {
                return Err(err(
                    ErrorCode::SchemaViolation,
                    format!("candidates[{i}].retriever_score is not finite"),
                ));
            }
        }
    }
    if ev.top_n == Some(0) {
        return Err(err(ErrorCode::SchemaViolation, "top_n must be at least 1"));
    }
    if let Some(budget) = ev.deadline_ms {
        if let Some(start) = ev.produced_at.or(record_ts_ms) {
            let elapsed = now_ms.saturating_sub(start);
            if elapsed > i64::try_from(budget).unwrap_or(i64::MAX) {
                return Err(err(
                    ErrorCode::DeadlineExceeded,
                    format!(
                        "deadline of {budget} ms passed {elapsed} ms after the event was produced"
                    ),
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_candidates: 3,
            max_query_bytes: 50,
            max_text_bytes: 100,
            max_event_bytes: 10_000,
        }
    }

    fn code(payload: &[u8]) -> ErrorCode {
        decode(Some(payload), &limits(), Some(0), 0)
            .unwrap_err()
            .code
    }

    #[test]
    fn accepts_a_valid_event_and_keeps_metadata_bytes() {
        let raw = br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","metadata":{"k": [1, 2]}}]}"#;
        let ev = decode(Some(raw), &limits(), None, 0).expect("valid");
        assert_eq!(
            ev.candidates[0].metadata.as_ref().map(|m| m.get()),
            Some(r#"{"k": [1, 2]}"#)
        );
    }

    #[test]
    fn each_bad_input_gets_its_code() {
        assert_eq!(
            decode(None, &limits(), None, 0).unwrap_err().code,
            ErrorCode::EmptyPayload
        );
        assert_eq!(code(b"\xff\xfe{}"), ErrorCode::InvalidUtf8);
        assert_eq!(code(b"{\"schema_version\":"), ErrorCode::InvalidJson);
        assert_eq!(code(b"not json"), ErrorCode::InvalidJson);
        assert_eq!(code(br#"[1,"r","q",[]]"#), ErrorCode::SchemaViolation);
        assert_eq!(
            code(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[["a","t"]]}"#),
            ErrorCode::SchemaViolation
        );
        assert_eq!(
            code(br#"{"schema_version":1,"request_id":"r","query":"q"}"#),
            ErrorCode::SchemaViolation
        );
        assert_eq!(
            code(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"extra":1}"#),
            ErrorCode::SchemaViolation
        );
        assert_eq!(
            code(br#"{"schema_version":2,"request_id":"r","query":"q","candidates":[]}"#),
            ErrorCode::UnsupportedSchemaVersion
        );
        assert_eq!(
            code(br#"{"schema_version":1,"request_id":"r","query":"  ","candidates":[]}"#),
            ErrorCode::EmptyQuery
        );
        assert_eq!(code(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"1","text":""},{"id":"2","text":""},{"id":"3","text":""},{"id":"4","text":""}]}"#), ErrorCode::TooManyCandidates);
        let long = format!(
            r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[{{"id":"1","text":"{}"}}]}}"#,
            "x".repeat(101)
        );
        assert_eq!(code(long.as_bytes()), ErrorCode::TextTooLong);
        assert_eq!(code(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"1","text":"a"},{"id":"1","text":"b"}]}"#), ErrorCode::DuplicateCandidateId);
        assert_eq!(code(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"1","text":"a","metadata":[1]}]}"#), ErrorCode::SchemaViolation);
        assert_eq!(
            decode(Some(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"deadline_ms":10,"produced_at":1000}"#), &limits(), None, 2000).unwrap_err().code,
            ErrorCode::DeadlineExceeded
        );
    }
}

#[cfg(test)]
mod hostile {
    use super::*;

    #[test]
    fn nesting_bombs_fail_cleanly() {
        let limits = crate::config::LimitsConfig::default();
        let top = "[".repeat(100_000);
        let inner = format!(
            r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":{}"#,
            "[".repeat(100_000)
        );
        let meta = format!(
            r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[{{"id":"a","text":"t","metadata":{}}}]}}"#,
            "{\"a\":".repeat(50_000)
        );
        for (doc, want) in [
            (top, ErrorCode::SchemaViolation),
            (inner, ErrorCode::SchemaViolation),
            (meta, ErrorCode::InvalidJson),
        ] {
            let e = decode(Some(doc.as_bytes()), &limits, None, 0).unwrap_err();
            assert_eq!(e.code, want, "{}", e.message);
        }
    }
}
