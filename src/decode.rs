//! Decode and validate input events (`schemas/retrieval-result.v1.json`).
//!
//! Every failure maps to one stable [`ErrorCode`] that lands in the dead-letter record, so operators
//! can alert on codes without parsing messages.

use std::collections::{BTreeSet, HashSet};

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::LimitsConfig;
use crate::template::{MissingField, Template};

/// The major version this worker reads; any minor version of it (`"1.<minor>"`) is accepted.
pub const INPUT_SCHEMA_VERSION: u32 = 1;

/// Distinct unknown field names one event reports, at most: a hostile event could carry thousands.
pub const MAX_UNKNOWN_PER_EVENT: usize = 16;

/// How the worker reads events (`[input]`), beside the size limits.
#[derive(Debug, Clone, Copy, Default)]
pub struct Rules<'a> {
    /// Unknown fields are a `schema_violation` instead of being ignored.
    pub strict: bool,
    /// Builds each candidate's scored text from its fields; `None`: the `text` field.
    pub template: Option<&'a Template>,
    pub missing: MissingField,
}

#[derive(Debug)]
pub struct RetrievalResult {
    /// The major version (`1` and `"1.<minor>"` both read as 1).
    pub schema_version: u32,
    /// The minor version, when the event wrote `"<major>.<minor>"`.
    pub schema_minor: Option<u32>,
    pub request_id: String,
    pub query: String,
    pub candidates: Vec<Candidate>,
    pub top_n: Option<u32>,
    /// Results whose raw logit (`score`) is below this are dropped.
    pub min_score: Option<f64>,
    /// Results whose `relevance` (0..1) is below this are dropped.
    pub min_relevance: Option<f64>,
    /// Copy the scored texts into the output (overrides `output.include_text`).
    pub return_text: Option<bool>,
    /// Budget in ms counted from `produced_at` (or the record timestamp when absent).
    pub deadline_ms: Option<u64>,
    /// Milliseconds since the Unix epoch.
    pub produced_at: Option<i64>,
    /// `"interactive"`, `"bulk"` or a level 0–9 (see `[priority]`).
    pub priority: Option<Priority>,
    /// Fields this worker does not know and ignored (lenient mode only), each name once, at most
    /// [`MAX_UNKNOWN_PER_EVENT`]; candidate fields as `candidates[].<name>`.
    pub unknown_fields: BTreeSet<String>,
}

#[derive(Debug)]
pub struct Candidate {
    pub id: String,
    /// The text that is scored: the `text` field, or what `input.text_template` built.
    pub text: String,
    pub retriever_score: Option<f64>,
    /// Kept as raw JSON so it is passed through byte for byte.
    pub metadata: Option<Box<RawValue>>,
    /// The `text` field and the other fields the template names, until the text is built.
    fields: Vec<(String, String)>,
}

/// An event's `priority`: a named lane or a level 0–9 (higher is more urgent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Interactive,
    Bulk,
    Level(u8),
}

impl Priority {
    /// Parses a record header's value: the same words and levels as the field.
    pub fn from_header(v: &[u8]) -> Option<Self> {
        match std::str::from_utf8(v).ok()?.trim() {
            "interactive" => Some(Self::Interactive),
            "bulk" => Some(Self::Bulk),
            n => n.parse::<u8>().ok().filter(|&l| l <= 9).map(Self::Level),
        }
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Priority;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("\"interactive\", \"bulk\" or an integer 0 to 9")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Priority, E> {
                match v {
                    "interactive" => Ok(Priority::Interactive),
                    "bulk" => Ok(Priority::Bulk),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Priority, E> {
                match u8::try_from(v) {
                    Ok(l) if l <= 9 => Ok(Priority::Level(l)),
                    _ => Err(E::invalid_value(de::Unexpected::Unsigned(v), &self)),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Priority, E> {
                match u64::try_from(v) {
                    Ok(u) => self.visit_u64(u),
                    Err(_) => Err(E::invalid_value(de::Unexpected::Signed(v), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// Decodes the event object. Hand-written instead of derived so that unknown keys can be
/// ignored or refused by configuration, fields named by the template captured, and every repeated
/// key refused (JSON Schema would see only the last value of a repeated key).
struct EventSeed<'r> {
    rules: &'r Rules<'r>,
}

fn repeated<E: de::Error>(key: &str) -> E {
    E::custom(format_args!("duplicate field `{key}`"))
}

fn set<'de, T: Deserialize<'de>, A: MapAccess<'de>>(
    slot: &mut Option<T>,
    key: &str,
    map: &mut A,
) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(repeated(key));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// Skips an unknown field's value (iteratively in serde_json: no recursion on nesting bombs), or
/// refuses it when strict.
fn unknown<'de, A: MapAccess<'de>>(
    key: String,
    rules: &Rules<'_>,
    seen: &mut HashSet<String>,
    map: &mut A,
) -> Result<String, A::Error> {
    if rules.strict {
        return Err(de::Error::custom(format_args!(
            "unknown field `{key}` (input.strict is on)"
        )));
    }
    if !seen.insert(key.clone()) {
        return Err(repeated(&key));
    }
    map.next_value::<IgnoredAny>()?;
    Ok(key)
}

/// `1`, or `"<major>.<minor>"` with both parts plain decimal (no sign, no leading zero).
struct Version(u32, Option<u32>);

impl<'de> Deserialize<'de> for Version {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Version;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an integer version or a string \"<major>.<minor>\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Version, E> {
                u32::try_from(v)
                    .map(|m| Version(m, None))
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Version, E> {
                u64::try_from(v)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Version, E> {
                fn part(s: &str) -> Option<u32> {
                    let plain = (s == "0" || !s.starts_with('0'))
                        && (1..=9).contains(&s.len())
                        && s.bytes().all(|b| b.is_ascii_digit());
                    plain.then(|| s.parse().ok()).flatten()
                }
                v.split_once('.')
                    .and_then(|(a, b)| Some(Version(part(a)?, Some(part(b)?))))
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Visitor<'de> for EventSeed<'_> {
    type Value = RetrievalResult;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RetrievalResult, A::Error> {
        let mut version: Option<Version> = None;
        let (mut request_id, mut query) = (None::<String>, None::<String>);
        let mut candidates: Option<(Vec<Candidate>, BTreeSet<String>)> = None;
        // Optional fields: Some(None) is an explicit null (allowed, and still a repeat if twice).
        let mut top_n: Option<Option<u32>> = None;
        let (mut min_score, mut min_relevance) = (None::<Option<f64>>, None::<Option<f64>>);
        let mut return_text: Option<Option<bool>> = None;
        let mut deadline_ms: Option<Option<u64>> = None;
        let mut produced_at: Option<Option<i64>> = None;
        let mut priority: Option<Option<Priority>> = None;
        let (mut seen, mut unknown_fields) = (HashSet::new(), BTreeSet::new());
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "schema_version" => set(&mut version, &key, &mut map)?,
                "request_id" => set(&mut request_id, &key, &mut map)?,
                "query" => set(&mut query, &key, &mut map)?,
                "candidates" => {
                    if candidates.is_some() {
                        return Err(repeated(&key));
                    }
                    candidates = Some(map.next_value_seed(CandidatesSeed { rules: self.rules })?);
                }
                "top_n" => set(&mut top_n, &key, &mut map)?,
                "min_score" => set(&mut min_score, &key, &mut map)?,
                "min_relevance" => set(&mut min_relevance, &key, &mut map)?,
                "return_text" => set(&mut return_text, &key, &mut map)?,
                "deadline_ms" => set(&mut deadline_ms, &key, &mut map)?,
                "produced_at" => set(&mut produced_at, &key, &mut map)?,
                "priority" => set(&mut priority, &key, &mut map)?,
                _ => {
                    let k = unknown(key, self.rules, &mut seen, &mut map)?;
                    if unknown_fields.len() < MAX_UNKNOWN_PER_EVENT {
                        unknown_fields.insert(k);
                    }
                }
            }
        }
        let Version(schema_version, schema_minor) =
            version.ok_or_else(|| de::Error::missing_field("schema_version"))?;
        let (candidates, in_candidates) =
            candidates.ok_or_else(|| de::Error::missing_field("candidates"))?;
        for k in in_candidates {
            if unknown_fields.len() >= MAX_UNKNOWN_PER_EVENT {
                break;
            }
            unknown_fields.insert(format!("candidates[].{k}"));
        }
        Ok(RetrievalResult {
            schema_version,
            schema_minor,
            request_id: request_id.ok_or_else(|| de::Error::missing_field("request_id"))?,
            query: query.ok_or_else(|| de::Error::missing_field("query"))?,
            candidates,
            top_n: top_n.flatten(),
            min_score: min_score.flatten(),
            min_relevance: min_relevance.flatten(),
            return_text: return_text.flatten(),
            deadline_ms: deadline_ms.flatten(),
            produced_at: produced_at.flatten(),
            priority: priority.flatten(),
            unknown_fields,
        })
    }
}

impl<'de> DeserializeSeed<'de> for EventSeed<'_> {
    type Value = RetrievalResult;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<RetrievalResult, D::Error> {
        // A map is required: serde's derived structs would also take a positional array.
        d.deserialize_map(self)
    }
}

/// The candidate array; also returns the unknown candidate field names (bounded).
struct CandidatesSeed<'r> {
    rules: &'r Rules<'r>,
}

impl<'de> DeserializeSeed<'de> for CandidatesSeed<'_> {
    type Value = (Vec<Candidate>, BTreeSet<String>);

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for CandidatesSeed<'_> {
    type Value = (Vec<Candidate>, BTreeSet<String>);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of candidate objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let (mut out, mut names) = (Vec::new(), BTreeSet::new());
        while let Some(c) = seq.next_element_seed(CandidateSeed {
            rules: self.rules,
            unknown: &mut names,
        })? {
            out.push(c);
        }
        Ok((out, names))
    }
}

struct CandidateSeed<'r, 'n> {
    rules: &'r Rules<'r>,
    unknown: &'n mut BTreeSet<String>,
}

impl<'de> DeserializeSeed<'de> for CandidateSeed<'_, '_> {
    type Value = Candidate;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Candidate, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CandidateSeed<'_, '_> {
    type Value = Candidate;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Candidate, A::Error> {
        let mut id = None::<String>;
        let mut text = None::<String>;
        let mut retriever_score: Option<Option<f64>> = None;
        let mut metadata: Option<Option<Box<RawValue>>> = None;
        let mut fields: Vec<(String, String)> = Vec::new();
        let mut seen = HashSet::new();
        let template = self.rules.template;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "id" => set(&mut id, &key, &mut map)?,
                "text" => set(&mut text, &key, &mut map)?,
                "retriever_score" => set(&mut retriever_score, &key, &mut map)?,
                "metadata" => set(&mut metadata, &key, &mut map)?,
                k if template.is_some_and(|t| t.names(k)) => {
                    if !seen.insert(key.clone()) {
                        return Err(repeated(&key));
                    }
                    // A field the template places must be text; null counts as missing.
                    if let Some(v) = map.next_value::<Option<String>>()? {
                        fields.push((key, v));
                    }
                }
                _ => {
                    let k = unknown(key, self.rules, &mut seen, &mut map)?;
                    if self.unknown.len() < MAX_UNKNOWN_PER_EVENT {
                        self.unknown.insert(k);
                    }
                }
            }
        }
        let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
        let text = match (text, template) {
            (None, None) => return Err(de::Error::missing_field("text")),
            (text, None) => text.unwrap_or_default(),
            // Under a template `text` is one field among others, missing or not; the scored text
            // is built once the event is known to be valid.
            (text, Some(_)) => {
                fields.extend(text.map(|t| ("text".to_string(), t)));
                String::new()
            }
        };
        Ok(Candidate {
            id,
            text,
            retriever_score: retriever_score.flatten(),
            metadata: metadata.flatten(),
            fields,
        })
    }
}

fn parse_event(text: &str, rules: &Rules<'_>) -> serde_json::Result<RetrievalResult> {
    let mut de = serde_json::Deserializer::from_str(text);
    let ev = EventSeed { rules }.deserialize(&mut de)?;
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
    /// `input.missing_template_field = "dead_letter"` and a candidate lacks a field of
    /// `input.text_template`.
    MissingTemplateField,
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
            Self::MissingTemplateField => "missing_template_field",
            Self::TokenizationFailed => "tokenization_failed",
            Self::InferenceFailed => "inference_failed",
        }
    }

    pub const ALL: [ErrorCode; 15] = [
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
        Self::MissingTemplateField,
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

/// Parses and validates one record value under the default [`Rules`] (unknown fields ignored, the
/// `text` field scored). `now_ms` and `record_ts_ms` decide deadline expiry.
pub fn decode(
    payload: Option<&[u8]>,
    limits: &LimitsConfig,
    record_ts_ms: Option<i64>,
    now_ms: i64,
) -> Result<RetrievalResult, DecodeError> {
    decode_with(payload, &Rules::default(), limits, record_ts_ms, now_ms)
}

impl RetrievalResult {
    /// When the event's `deadline_ms` runs out (Unix ms): counted from `produced_at`, else the
    /// record timestamp; `None` without a deadline or a start.
    pub fn deadline_at_ms(&self, record_ts_ms: Option<i64>) -> Option<i64> {
        let budget = i64::try_from(self.deadline_ms?).unwrap_or(i64::MAX);
        Some(self.produced_at.or(record_ts_ms)?.saturating_add(budget))
    }
}

/// As [`decode_with`], but an event whose deadline has already passed is still returned (for
/// `deadline.action = "score_anyway"`).
pub fn decode_without_expiry(
    payload: Option<&[u8]>,
    rules: &Rules<'_>,
    limits: &LimitsConfig,
    record_ts_ms: Option<i64>,
) -> Result<RetrievalResult, DecodeError> {
    decode_with(payload, rules, limits, record_ts_ms, i64::MIN)
}

/// Parses and validates one record value; on success every candidate's `text` is the text to
/// score.
pub fn decode_with(
    payload: Option<&[u8]>,
    rules: &Rules<'_>,
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
    let mut ev = parse_event(text, rules).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Data => err(ErrorCode::SchemaViolation, e.to_string()),
            Category::Syntax | Category::Eof | Category::Io => {
                err(ErrorCode::InvalidJson, e.to_string())
            }
        }
    })?;
    validate(&mut ev, rules, limits, record_ts_ms, now_ms)?;
    Ok(ev)
}

fn validate(
    ev: &mut RetrievalResult,
    rules: &Rules<'_>,
    limits: &LimitsConfig,
    record_ts_ms: Option<i64>,
    now_ms: i64,
) -> Result<(), DecodeError> {
    if ev.schema_version != INPUT_SCHEMA_VERSION {
        return Err(err(
            ErrorCode::UnsupportedSchemaVersion,
            format!(
                "schema_version {} is not supported (this worker reads {INPUT_SCHEMA_VERSION} and \"{INPUT_SCHEMA_VERSION}.<minor>\")",
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
    if let Some(m) = ev.min_relevance {
        if !(0.0..=1.0).contains(&m) {
            return Err(err(
                ErrorCode::SchemaViolation,
                format!("min_relevance {m} is not between 0 and 1"),
            ));
        }
    }
    for (i, c) in ev.candidates.iter_mut().enumerate() {
        let fields = std::mem::take(&mut c.fields);
        if let Some(t) = rules.template {
            let id = c.id.as_str();
            let field = |name: &str| match name {
                "id" => Some(id),
                _ => fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| v.as_str()),
            };
            c.text = t.render(field, rules.missing).map_err(|name| {
                err(
                    ErrorCode::MissingTemplateField,
                    format!("candidates[{i}] has no `{name}` for input.text_template"),
                )
            })?;
        }
    }
    let mut seen = HashSet::with_capacity(ev.candidates.len());
    for (i, c) in ev.candidates.iter().enumerate() {
        if c.text.len() > limits.max_text_bytes {
            let what = if rules.template.is_some() {
                "text built by input.text_template"
            } else {
                "text"
            };
            return Err(err(
                ErrorCode::TextTooLong,
                format!(
                    "candidates[{i}].{what} is {} bytes, limit is {}",
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
            // (`decode_without_expiry` passes i64::MIN: nothing has expired before any clock.)
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
    fn priority_is_a_lane_name_or_a_level_up_to_9() {
        let ev = |p: &str| {
            let doc = format!(
                r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[],"priority":{p}}}"#
            );
            decode(Some(doc.as_bytes()), &limits(), None, 0).map(|e| e.priority)
        };
        assert_eq!(ev(r#""bulk""#).unwrap(), Some(Priority::Bulk));
        assert_eq!(ev(r#""interactive""#).unwrap(), Some(Priority::Interactive));
        assert_eq!(ev("9").unwrap(), Some(Priority::Level(9)));
        assert_eq!(ev("null").unwrap(), None);
        for bad in ["10", "-1", "1.5", r#""urgent""#, "true", "[]"] {
            assert_eq!(
                ev(bad).unwrap_err().code,
                ErrorCode::SchemaViolation,
                "{bad}"
            );
        }
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
            decode_with(
                Some(br#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"extra":1}"#),
                &Rules { strict: true, ..Rules::default() },
                &limits(),
                None,
                0
            )
            .unwrap_err()
            .code,
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
mod evolution {
    use super::*;
    use crate::template::{MissingField, Template};

    fn limits() -> LimitsConfig {
        LimitsConfig {
            max_candidates: 8,
            max_query_bytes: 50,
            max_text_bytes: 20,
            max_event_bytes: 10_000,
        }
    }

    fn with(rules: &Rules<'_>, doc: &str) -> Result<RetrievalResult, ErrorCode> {
        decode_with(Some(doc.as_bytes()), rules, &limits(), None, 0).map_err(|e| e.code)
    }

    const NEWER: &str = r#"{"schema_version":"1.3","request_id":"r","query":"q","tenant":"t","ranker_hints":{"a":[[[]]]},
        "candidates":[{"id":"a","text":"t","url":"u","lang":null},{"id":"b","text":"t","url":"v"}]}"#;

    #[test]
    fn unknown_fields_are_ignored_and_named_unless_strict() {
        let ev = with(&Rules::default(), NEWER).expect("lenient");
        assert_eq!((ev.schema_version, ev.schema_minor), (1, Some(3)));
        let names: Vec<&str> = ev.unknown_fields.iter().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "candidates[].lang",
                "candidates[].url",
                "ranker_hints",
                "tenant"
            ]
        );
        let strict = Rules {
            strict: true,
            ..Rules::default()
        };
        assert_eq!(
            with(&strict, NEWER).unwrap_err(),
            ErrorCode::SchemaViolation
        );
        // Known fields only: strict and lenient agree, and nothing is reported.
        let plain = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t"}]}"#;
        assert!(with(&strict, plain).is_ok());
        assert!(with(&Rules::default(), plain)
            .unwrap()
            .unknown_fields
            .is_empty());
    }

    #[test]
    fn unknown_names_per_event_are_bounded() {
        let extra: String = (0..100).map(|i| format!(r#","f{i}":{i}"#)).collect();
        let doc = format!(
            r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[]{extra}}}"#
        );
        let ev = with(&Rules::default(), &doc).unwrap();
        assert_eq!(ev.unknown_fields.len(), MAX_UNKNOWN_PER_EVENT);
    }

    #[test]
    fn repeated_keys_are_refused_known_or_not() {
        for doc in [
            r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"x":1,"x":2}"#,
            r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"top_n":null,"top_n":2}"#,
            r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","u":1,"u":1}]}"#,
        ] {
            assert_eq!(
                with(&Rules::default(), doc).unwrap_err(),
                ErrorCode::SchemaViolation,
                "{doc}"
            );
        }
    }

    #[test]
    fn schema_versions() {
        let doc = |v: &str| {
            format!(r#"{{"schema_version":{v},"request_id":"r","query":"q","candidates":[]}}"#)
        };
        for ok in ["1", r#""1.0""#, r#""1.12""#, r#""1.999999999""#] {
            assert!(with(&Rules::default(), &doc(ok)).is_ok(), "{ok}");
        }
        for (v, want) in [
            ("2", ErrorCode::UnsupportedSchemaVersion),
            (r#""2.0""#, ErrorCode::UnsupportedSchemaVersion),
            (r#""0.9""#, ErrorCode::UnsupportedSchemaVersion),
            (r#""1""#, ErrorCode::SchemaViolation),
            (r#""1.""#, ErrorCode::SchemaViolation),
            (r#""1.01""#, ErrorCode::SchemaViolation),
            (r#""1.-1""#, ErrorCode::SchemaViolation),
            (r#""1.1.1""#, ErrorCode::SchemaViolation),
            (r#""1.1000000000""#, ErrorCode::SchemaViolation),
            (r#"" 1.0""#, ErrorCode::SchemaViolation),
            ("1.0", ErrorCode::SchemaViolation),
            ("-1", ErrorCode::SchemaViolation),
        ] {
            assert_eq!(with(&Rules::default(), &doc(v)).unwrap_err(), want, "{v}");
        }
    }

    #[test]
    fn min_relevance_and_return_text() {
        let doc = |extra: &str| {
            format!(r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[]{extra}}}"#)
        };
        let ev = with(
            &Rules::default(),
            &doc(r#","min_relevance":0.5,"return_text":true"#),
        )
        .unwrap();
        assert_eq!((ev.min_relevance, ev.return_text), (Some(0.5), Some(true)));
        for bad in [
            r#","min_relevance":1.5"#,
            r#","min_relevance":-0.1"#,
            r#","return_text":1"#,
        ] {
            assert_eq!(
                with(&Rules::default(), &doc(bad)).unwrap_err(),
                ErrorCode::SchemaViolation,
                "{bad}"
            );
        }
    }

    #[test]
    fn templates_build_the_scored_text() {
        let t = Template::parse("{title}: {text}").unwrap();
        let empty = Rules {
            strict: true,
            template: Some(&t),
            missing: MissingField::Empty,
        };
        let dead = Rules {
            missing: MissingField::DeadLetter,
            ..empty
        };
        let doc = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[
            {"id":"a","title":"T","text":"body"},{"id":"b","text":"only"},{"id":"c","title":"U","text":null}]}"#;
        // `text: null` is a type error whatever the template says.
        assert_eq!(with(&empty, doc).unwrap_err(), ErrorCode::SchemaViolation);
        let doc = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[
            {"id":"a","title":"T","text":"body"},{"id":"b","text":"only"},{"id":"c","title":"U","url":null}]}"#;
        // Strict still refuses fields the template does not name.
        assert_eq!(with(&empty, doc).unwrap_err(), ErrorCode::SchemaViolation);
        let doc = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[
            {"id":"a","title":"T","text":"body"},{"id":"b","text":"only"},{"id":"c","title":"U"},{"id":"d","title":null,"text":"x"}]}"#;
        let texts: Vec<String> = with(&empty, doc)
            .unwrap()
            .candidates
            .into_iter()
            .map(|c| c.text)
            .collect();
        assert_eq!(texts, ["T: body", ": only", "U: ", ": x"]);
        assert_eq!(
            with(&dead, doc).unwrap_err(),
            ErrorCode::MissingTemplateField
        );
        // A templated field must be a string.
        let doc = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","title":7,"text":"b"}]}"#;
        assert_eq!(with(&empty, doc).unwrap_err(), ErrorCode::SchemaViolation);
        // The text limit (20 bytes here) applies to the built text.
        let doc = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","title":"0123456789","text":"0123456789"}]}"#;
        assert_eq!(with(&empty, doc).unwrap_err(), ErrorCode::TextTooLong);
        // `{id}` reads the candidate id.
        let t = Template::parse("[{id}] {text}").unwrap();
        let rules = Rules {
            template: Some(&t),
            ..Rules::default()
        };
        let doc = r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"b"}]}"#;
        assert_eq!(with(&rules, doc).unwrap().candidates[0].text, "[a] b");
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
        // An ignored field is skipped without recursion, however deep, closed or not.
        let deep = |close: bool| {
            format!(
                r#"{{"schema_version":1,"request_id":"r","query":"q","candidates":[{{"id":"a","text":"t","x":{}{}}}],"y":{}{}}}"#,
                "[".repeat(500_000),
                if close {
                    "]".repeat(500_000)
                } else {
                    String::new()
                },
                "{\"a\":".repeat(100_000),
                if close {
                    "1".to_string() + &"}".repeat(100_000)
                } else {
                    String::new()
                },
            )
        };
        assert!(decode(Some(deep(true).as_bytes()), &limits, None, 0).is_ok());
        let e = decode(Some(deep(false).as_bytes()), &limits, None, 0).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidJson, "{}", e.message);
    }
}
