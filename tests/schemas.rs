//! The JSON Schemas in `schemas/` are the published wire contracts; these tests prove the serde
//! types in `src/` agree with them:
//!
//! * input (`retrieval-result.v1.json`): for a corpus of hand-written documents and for systematic
//!   mutations of a valid event, the schema's verdict equals `decode::decode`'s (with limits so
//!   large that only structural rules matter), and with `additionalProperties: false` added the
//!   schema's verdict equals that of a worker run with `input.strict`;
//! * compatibility: every event today's v1 schema (`tests/fixtures/retrieval-result.v1.0.json`)
//!   accepts is still accepted, strict or not, and outputs of a worker without the new options
//!   still validate against today's output schema (`tests/fixtures/reranked.v1.0.json`), whose
//!   successor only adds optional fields;
//! * outputs (`reranked.v1.json`, `dead-letter.v1.json`): everything `assemble::render` and
//!   `dlq::render` emit validates, and the dead-letter code enum lists exactly `ErrorCode::ALL`.
//!
//! Inputs where the two sides knowingly differ are pinned in `documented_divergences`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A named edit of a valid document.
type Mutation = (&'static str, fn(&mut Value));
/// Label, raw key bytes, expected key encoding.
type KeyCase<'a> = (&'a str, Option<&'a [u8]>, Option<&'a str>);

use base64::Engine;
use jsonschema::Validator;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use reranker::assemble::{self, CandidateMeta, Completed, EventMeta, ModelRef};
use reranker::config::{Label, LimitsConfig};
use reranker::decode::{self, ErrorCode, Rules};
use reranker::dlq::{self, DeadLetter, DlqInput};
use reranker::model::{sigmoid, Score};
use reranker::offsets::{Ticket, TopicPartition};

const INPUT: &str = "retrieval-result.v1.json";
const RERANKED: &str = "reranked.v1.json";
const DEAD_LETTER: &str = "dead-letter.v1.json";
const ALL_SCHEMAS: [&str; 3] = [INPUT, RERANKED, DEAD_LETTER];

fn load(name: &str) -> Value {
    load_from("schemas", name)
}

/// Today's schemas before the contract grew (issue 14), kept to prove compatibility.
const INPUT_V1_0: &str = "retrieval-result.v1.0.json";
const RERANKED_V1_0: &str = "reranked.v1.0.json";

fn fixture_validator(name: &str) -> Validator {
    jsonschema::draft202012::new(&load_from("tests/fixtures", name))
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

fn load_from(dir: &str, name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

fn validator(name: &str) -> Validator {
    jsonschema::draft202012::new(&load(name))
        .unwrap_or_else(|e| panic!("{name} does not compile: {e}"))
}

fn errors(v: &Validator, doc: &Value) -> Vec<String> {
    v.iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect()
}

#[track_caller]
fn assert_valid(v: &Validator, doc: &Value, what: &str) {
    let errs = errors(v, doc);
    assert!(
        errs.is_empty(),
        "{what} violates its schema: {errs:#?}\n{doc:#}"
    );
}

// ---------------------------------------------------------------------------------------------
// The schemas themselves

#[test]
fn schemas_are_valid_draft_2020_12_and_compile() {
    for name in ALL_SCHEMAS {
        let schema = load(name);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{name}: $schema"
        );
        assert_eq!(
            schema["$id"],
            format!("https://github.com/reranker/schemas/{name}").as_str(),
            "{name}: $id"
        );
        assert!(schema["title"].is_string(), "{name}: title");
        assert!(schema["description"].is_string(), "{name}: description");
        if let Err(e) = jsonschema::draft202012::meta::validate(&schema) {
            panic!(
                "{name} is not a valid draft 2020-12 schema: {e} at {}",
                e.instance_path
            );
        }
        validator(name);
    }
}

/// The property descriptions are the user documentation: every property needs one.
#[test]
fn every_property_is_documented() {
    fn walk(name: &str, path: &str, node: &Value, missing: &mut Vec<String>) {
        match node {
            Value::Object(m) => {
                if let Some(Value::Object(props)) = m.get("properties") {
                    for (k, p) in props {
                        // Properties inside `if` / `then` refine a documented property.
                        let refinement = path.contains("/if") || path.contains("/then");
                        if !refinement && !p.get("description").is_some_and(Value::is_string) {
                            missing.push(format!("{name}: {path}/properties/{k}"));
                        }
                    }
                }
                for (k, v) in m {
                    walk(name, &format!("{path}/{k}"), v, missing);
                }
            }
            Value::Array(a) => {
                for (i, v) in a.iter().enumerate() {
                    walk(name, &format!("{path}/{i}"), v, missing);
                }
            }
            _ => {}
        }
    }
    let mut missing = Vec::new();
    for name in ALL_SCHEMAS {
        walk(name, "#", &load(name), &mut missing);
    }
    assert!(
        missing.is_empty(),
        "properties without a description: {missing:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Input: schema verdict == decode() verdict

fn generous_limits() -> LimitsConfig {
    LimitsConfig {
        max_candidates: usize::MAX,
        max_query_bytes: usize::MAX,
        max_text_bytes: usize::MAX,
        max_event_bytes: usize::MAX,
    }
}

/// What a consumer validating with the schema would conclude (bytes that are not JSON fail).
fn schema_accepts(v: &Validator, bytes: &[u8]) -> bool {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(doc) => v.is_valid(&doc),
        Err(_) => false,
    }
}

fn decode_verdict(bytes: &[u8]) -> Result<(), ErrorCode> {
    decode::decode(Some(bytes), &generous_limits(), None, 0)
        .map(|_| ())
        .map_err(|e| e.code)
}

fn strict_verdict(bytes: &[u8]) -> Result<(), ErrorCode> {
    let rules = Rules {
        strict: true,
        ..Rules::default()
    };
    decode::decode_with(Some(bytes), &rules, &generous_limits(), None, 0)
        .map(|_| ())
        .map_err(|e| e.code)
}

/// The input schema as a worker with `input.strict = true` reads it: no unlisted fields.
fn strict_validator() -> Validator {
    let mut schema = load(INPUT);
    schema["additionalProperties"] = json!(false);
    schema["$defs"]["candidate"]["additionalProperties"] = json!(false);
    jsonschema::draft202012::new(&schema).expect("strict schema compiles")
}

/// The default worker (unknown fields ignored) against the published schema, and a strict worker
/// against the schema closed with `additionalProperties: false`.
struct Readers {
    lenient: Validator,
    strict: Validator,
    /// Today's schema: whatever it accepts must stay accepted.
    v1_0: Validator,
}

impl Readers {
    fn new() -> Self {
        Self {
            lenient: validator(INPUT),
            strict: strict_validator(),
            v1_0: fixture_validator(INPUT_V1_0),
        }
    }

    /// Both pairs agree; returns the lenient verdict.
    #[track_caller]
    fn agree(&self, name: &str, bytes: &[u8]) -> bool {
        let lenient = assert_agree_with(&self.lenient, decode_verdict, name, bytes);
        let strict = assert_agree_with(
            &self.strict,
            strict_verdict,
            &format!("{name} (strict)"),
            bytes,
        );
        assert!(
            lenient || !strict,
            "{name}: strict accepts what lenient refuses"
        );
        if schema_accepts(&self.v1_0, bytes) {
            assert!(strict, "{name}: accepted by today's v1 schema, refused now");
        }
        lenient
    }
}

#[track_caller]
fn assert_agree_with(
    v: &Validator,
    verdict: fn(&[u8]) -> Result<(), ErrorCode>,
    name: &str,
    bytes: &[u8],
) -> bool {
    let by_schema = schema_accepts(v, bytes);
    let by_decode = verdict(bytes);
    if by_schema != by_decode.is_ok() {
        let why = serde_json::from_slice::<Value>(bytes)
            .map(|d| errors(v, &d))
            .unwrap_or_else(|e| vec![format!("not JSON: {e}")]);
        panic!(
            "{name}: schema says {}, decode says {by_decode:?}\nschema errors: {why:#?}\ndocument: {}",
            if by_schema { "valid" } else { "invalid" },
            String::from_utf8_lossy(bytes)
        );
    }
    by_schema
}

/// (name, document, expected verdict). Both the schema and decode() must reach the expected one.
const CORPUS: &[(&str, &str, bool)] = &[
    // ---- valid
    (
        "minimal",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[]}"#,
        true,
    ),
    (
        "every optional field",
        r#"{"schema_version":1,"request_id":"req-42","query":"what is a cross-encoder?",
            "candidates":[
              {"id":"doc-1","text":"A cross-encoder scores a pair jointly.","retriever_score":12.5,
               "metadata":{"source":"wiki","tags":["ml",1,null],"nested":{"a":{"b":[]}}}},
              {"id":"doc-2","text":"","retriever_score":-0.25,"metadata":{}}
            ],
            "top_n":5,"min_score":-2.5,"deadline_ms":30000,"produced_at":1700000000000}"#,
        true,
    ),
    (
        "optional fields null",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":null,"min_score":null,
            "deadline_ms":null,"produced_at":null,
            "candidates":[{"id":"a","text":"t","retriever_score":null,"metadata":null}]}"#,
        true,
    ),
    (
        "keys in another order",
        r#"{"candidates":[{"text":"t","id":"a"}],"query":"q","request_id":"r","schema_version":1}"#,
        true,
    ),
    (
        "query padded with whitespace",
        r#"{"schema_version":1,"request_id":" r ","query":"\t q \n","candidates":[]}"#,
        true,
    ),
    (
        "non-ASCII text",
        r#"{"schema_version":1,"request_id":"r\u3000x","query":"日本語の質問","candidates":[{"id":"ü","text":"naïve 🚀"}]}"#,
        true,
    ),
    (
        "whitespace-only candidate id is allowed",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":" ","text":"t"}]}"#,
        true,
    ),
    (
        "U+FEFF is not whitespace to trim()",
        r#"{"schema_version":1,"request_id":"r","query":"\ufeff","candidates":[]}"#,
        true,
    ),
    (
        "integer and exponent scores",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_score":0,"candidates":[{"id":"a","text":"t","retriever_score":3},{"id":"b","text":"t","retriever_score":1e-3}]}"#,
        true,
    ),
    (
        "top_n at u32::MAX",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":4294967295,"candidates":[]}"#,
        true,
    ),
    (
        "top_n 1",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":1,"candidates":[]}"#,
        true,
    ),
    (
        "deadline 0, produced in the future",
        r#"{"schema_version":1,"request_id":"r","query":"q","deadline_ms":0,"produced_at":1700000000000,"candidates":[]}"#,
        true,
    ),
    (
        "deadline_ms at u64::MAX, no start time",
        r#"{"schema_version":1,"request_id":"r","query":"q","deadline_ms":18446744073709551615,"candidates":[]}"#,
        true,
    ),
    (
        "negative produced_at",
        r#"{"schema_version":1,"request_id":"r","query":"q","produced_at":-5,"candidates":[]}"#,
        true,
    ),
    // ---- not an event at all
    ("empty document", "", false),
    ("truncated JSON", r#"{"schema_version":1,"#, false),
    ("JSON null", "null", false),
    ("JSON string", r#""event""#, false),
    ("JSON number", "1", false),
    ("empty array", "[]", false),
    // serde's derived structs would accept positional arrays; decode insists on objects.
    ("event as positional array", r#"[1,"r","q",[]]"#, false),
    (
        "candidate as positional array",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[["a","t"]]}"#,
        false,
    ),
    // ---- missing fields
    (
        "missing schema_version",
        r#"{"request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "missing request_id",
        r#"{"schema_version":1,"query":"q","candidates":[]}"#,
        false,
    ),
    (
        "missing query",
        r#"{"schema_version":1,"request_id":"r","candidates":[]}"#,
        false,
    ),
    (
        "missing candidates",
        r#"{"schema_version":1,"request_id":"r","query":"q"}"#,
        false,
    ),
    (
        "candidate without id",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"text":"t"}]}"#,
        false,
    ),
    (
        "candidate without text",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a"}]}"#,
        false,
    ),
    // ---- unknown fields: ignored (a strict worker refuses them; see `Readers`)
    (
        "unknown top-level field",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"extra":1}"#,
        true,
    ),
    (
        "unknown candidate field",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","score":1}]}"#,
        true,
    ),
    (
        "misspelt optional field (the price of leniency)",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[],"topN":3}"#,
        true,
    ),
    (
        "unknown fields of every type, nested",
        r#"{"schema_version":"1.4","request_id":"r","query":"q","tenant":null,"hints":{"a":[[{"b":[]}]]},
            "candidates":[{"id":"a","text":"t","title":"T","url":"https://x","lang":null,"rank":[1,2.5]}]}"#,
        true,
    ),
    // ---- min_relevance / return_text
    (
        "min_relevance bounds and return_text",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_relevance":0,"return_text":false,"candidates":[]}"#,
        true,
    ),
    (
        "min_relevance 1, return_text true",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_relevance":1,"return_text":true,"candidates":[]}"#,
        true,
    ),
    (
        "min_relevance and return_text null",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_relevance":null,"return_text":null,"candidates":[]}"#,
        true,
    ),
    (
        "min_relevance above 1",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_relevance":1.01,"candidates":[]}"#,
        false,
    ),
    (
        "negative min_relevance",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_relevance":-0.5,"candidates":[]}"#,
        false,
    ),
    (
        "min_relevance as string",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_relevance":"0.5","candidates":[]}"#,
        false,
    ),
    (
        "return_text as number",
        r#"{"schema_version":1,"request_id":"r","query":"q","return_text":1,"candidates":[]}"#,
        false,
    ),
    (
        "return_text as string",
        r#"{"schema_version":1,"request_id":"r","query":"q","return_text":"true","candidates":[]}"#,
        false,
    ),
    // ---- schema_version
    (
        "schema_version 2",
        r#"{"schema_version":2,"request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version 0",
        r#"{"schema_version":0,"request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version -1",
        r#"{"schema_version":-1,"request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version as string without minor",
        r#"{"schema_version":"1","request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version 1.0 as string",
        r#"{"schema_version":"1.0","request_id":"r","query":"q","candidates":[]}"#,
        true,
    ),
    (
        "schema_version minor 7",
        r#"{"schema_version":"1.7","request_id":"r","query":"q","candidates":[]}"#,
        true,
    ),
    (
        "schema_version minor with 9 digits",
        r#"{"schema_version":"1.123456789","request_id":"r","query":"q","candidates":[]}"#,
        true,
    ),
    (
        "schema_version minor with 10 digits",
        r#"{"schema_version":"1.1234567890","request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version minor with a leading zero",
        r#"{"schema_version":"1.01","request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version 2.0 as string",
        r#"{"schema_version":"2.0","request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version 1.2.3",
        r#"{"schema_version":"1.2.3","request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version 1.x padded",
        r#"{"schema_version":" 1.1","request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version as number 1.5",
        r#"{"schema_version":1.5,"request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "schema_version null",
        r#"{"schema_version":null,"request_id":"r","query":"q","candidates":[]}"#,
        false,
    ),
    // ---- request_id / query
    (
        "numeric request_id",
        r#"{"schema_version":1,"request_id":7,"query":"q","candidates":[]}"#,
        false,
    ),
    (
        "empty request_id",
        r#"{"schema_version":1,"request_id":"","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "whitespace request_id",
        r#"{"schema_version":1,"request_id":" \t","query":"q","candidates":[]}"#,
        false,
    ),
    (
        "empty query",
        r#"{"schema_version":1,"request_id":"r","query":"","candidates":[]}"#,
        false,
    ),
    (
        "whitespace query",
        r#"{"schema_version":1,"request_id":"r","query":"  \n\r\t","candidates":[]}"#,
        false,
    ),
    (
        "ideographic-space query",
        r#"{"schema_version":1,"request_id":"r","query":"\u3000","candidates":[]}"#,
        false,
    ),
    (
        "NEL and en-quad query",
        r#"{"schema_version":1,"request_id":"r","query":"\u0085\u2000\u200a\u00a0","candidates":[]}"#,
        false,
    ),
    (
        "line-separator query",
        r#"{"schema_version":1,"request_id":"r","query":"\u2028\u2029\u000b\f","candidates":[]}"#,
        false,
    ),
    (
        "query null",
        r#"{"schema_version":1,"request_id":"r","query":null,"candidates":[]}"#,
        false,
    ),
    (
        "query array",
        r#"{"schema_version":1,"request_id":"r","query":["q"],"candidates":[]}"#,
        false,
    ),
    // ---- candidates
    (
        "candidates object",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":{"id":"a","text":"t"}}"#,
        false,
    ),
    (
        "candidates null",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":null}"#,
        false,
    ),
    (
        "candidate is a string",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":["text"]}"#,
        false,
    ),
    (
        "candidate is null",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[null]}"#,
        false,
    ),
    (
        "empty candidate id",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"","text":"t"}]}"#,
        false,
    ),
    (
        "numeric candidate id",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":1,"text":"t"}]}"#,
        false,
    ),
    (
        "text null",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":null}]}"#,
        false,
    ),
    (
        "text number",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":5}]}"#,
        false,
    ),
    (
        "string retriever_score",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","retriever_score":"0.9"}]}"#,
        false,
    ),
    (
        "metadata array",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","metadata":[1]}]}"#,
        false,
    ),
    (
        "metadata string",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","metadata":"{}"}]}"#,
        false,
    ),
    (
        "metadata number",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","metadata":1}]}"#,
        false,
    ),
    (
        "metadata bool",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","metadata":true}]}"#,
        false,
    ),
    (
        "bad second candidate",
        r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t"},{"id":"b"}]}"#,
        false,
    ),
    // ---- top_n / min_score / deadline_ms / produced_at
    (
        "top_n 0",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":0,"candidates":[]}"#,
        false,
    ),
    (
        "negative top_n",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":-1,"candidates":[]}"#,
        false,
    ),
    (
        "top_n as string",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":"5","candidates":[]}"#,
        false,
    ),
    (
        "fractional top_n",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":1.5,"candidates":[]}"#,
        false,
    ),
    (
        "top_n over u32::MAX",
        r#"{"schema_version":1,"request_id":"r","query":"q","top_n":4294967296,"candidates":[]}"#,
        false,
    ),
    (
        "min_score as string",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_score":"0.5","candidates":[]}"#,
        false,
    ),
    (
        "min_score bool",
        r#"{"schema_version":1,"request_id":"r","query":"q","min_score":true,"candidates":[]}"#,
        false,
    ),
    (
        "negative deadline_ms",
        r#"{"schema_version":1,"request_id":"r","query":"q","deadline_ms":-1,"candidates":[]}"#,
        false,
    ),
    (
        "deadline_ms as string",
        r#"{"schema_version":1,"request_id":"r","query":"q","deadline_ms":"10","candidates":[]}"#,
        false,
    ),
    (
        "deadline_ms over u64::MAX",
        r#"{"schema_version":1,"request_id":"r","query":"q","deadline_ms":18446744073709551616,"candidates":[]}"#,
        false,
    ),
    (
        "produced_at as date string",
        r#"{"schema_version":1,"request_id":"r","query":"q","produced_at":"2024-01-01T00:00:00Z","candidates":[]}"#,
        false,
    ),
    (
        "fractional produced_at",
        r#"{"schema_version":1,"request_id":"r","query":"q","produced_at":1.5,"candidates":[]}"#,
        false,
    ),
];

#[test]
fn input_corpus_schema_agrees_with_decode() {
    let readers = Readers::new();
    assert!(CORPUS.len() >= 25);
    let mut wrong = Vec::new();
    for &(name, doc, expected) in CORPUS {
        let verdict = readers.agree(name, doc.as_bytes());
        if verdict != expected {
            wrong.push(format!(
                "{name}: both say {verdict}, corpus expects {expected}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// Values of every JSON type, used to overwrite fields. (No `1.0`-style floats: see
/// `documented_divergences`.)
fn palette() -> Vec<Value> {
    vec![
        Value::Null,
        json!(true),
        json!(0),
        json!(1),
        json!(2),
        json!(-1),
        json!(1.5),
        json!(4294967296u64),
        json!(""),
        json!(" "),
        json!("x"),
        json!("1"),
        json!([]),
        json!([1]),
        json!([{ "id": "z", "text": "t" }]),
        json!({}),
        json!({ "k": 1 }),
        json!({ "id": "z", "text": "t" }),
    ]
}

fn full_event() -> Value {
    json!({
        "schema_version": 1,
        "request_id": "req-1",
        "query": "query",
        "candidates": [
            { "id": "a", "text": "alpha", "retriever_score": 0.5, "metadata": { "m": [1, 2] } },
            { "id": "b", "text": "beta" }
        ],
        "top_n": 3,
        "min_score": 0.25,
        "min_relevance": 0.5,
        "return_text": true,
        "deadline_ms": 1000,
        "produced_at": 1700000000000i64,
        "priority": "bulk"
    })
}

/// Deletes, retypes and adds keys of a valid event at both levels; schema and decode must agree
/// on every variant.
#[test]
fn input_mutations_schema_agrees_with_decode() {
    let readers = Readers::new();
    let mut today = full_event();
    for k in ["min_relevance", "return_text", "priority"] {
        today.as_object_mut().unwrap().remove(k);
    }
    assert!(schema_accepts(
        &readers.v1_0,
        &serde_json::to_vec(&today).unwrap()
    ));
    let (mut accepted, mut rejected) = (0, 0);
    // Today's full event (whose mutations today's schema accepts must stay accepted) and one with
    // the new fields.
    for (era, base) in [("v1.0", today), ("v1.1", full_event())] {
        let (a, r) = mutations_agree(&readers, era, &base);
        accepted += a;
        rejected += r;
    }
    // Make sure the mutations exercise both verdicts.
    assert!(
        accepted > 40 && rejected > 200,
        "accepted {accepted}, rejected {rejected}"
    );
}

fn mutations_agree(readers: &Readers, era: &str, base: &Value) -> (usize, usize) {
    assert!(readers.agree(era, &serde_json::to_vec(base).unwrap()));

    let mut variants: Vec<(String, Value)> = Vec::new();
    let top = base.as_object().unwrap().clone();
    let cand = base["candidates"][0].as_object().unwrap().clone();

    let mut with_top =
        |name: String, m: Map<String, Value>| variants.push((name, Value::Object(m)));
    for key in top.keys() {
        let mut m = top.clone();
        m.remove(key);
        with_top(format!("delete {key}"), m);
        for (i, val) in palette().into_iter().enumerate() {
            let mut m = top.clone();
            m.insert(key.clone(), val);
            with_top(format!("{key} = palette[{i}]"), m);
        }
    }
    for (i, val) in palette().into_iter().enumerate() {
        let mut m = top.clone();
        m.insert("extra".into(), val);
        with_top(format!("add extra = palette[{i}]"), m);
    }

    let mut with_cand = |name: String, c: Map<String, Value>| {
        let mut m = top.clone();
        m["candidates"][0] = Value::Object(c);
        variants.push((name, Value::Object(m)));
    };
    for key in cand.keys() {
        let mut c = cand.clone();
        c.remove(key);
        with_cand(format!("delete candidates[0].{key}"), c);
        for (i, val) in palette().into_iter().enumerate() {
            let mut c = cand.clone();
            c.insert(key.clone(), val);
            with_cand(format!("candidates[0].{key} = palette[{i}]"), c);
        }
    }
    for (i, val) in palette().into_iter().enumerate() {
        let mut c = cand.clone();
        c.insert("extra".into(), val);
        with_cand(format!("add candidates[0].extra = palette[{i}]"), c);
    }
    for (i, val) in palette().into_iter().enumerate() {
        let mut m = top.clone();
        m["candidates"][1] = val;
        variants.push((format!("candidates[1] = palette[{i}]"), Value::Object(m)));
    }

    let (mut accepted, mut rejected) = (0, 0);
    for (name, doc) in &variants {
        if readers.agree(&format!("{era}: {name}"), &serde_json::to_vec(doc).unwrap()) {
            accepted += 1;
        } else {
            rejected += 1;
        }
    }
    (accepted, rejected)
}

/// Inputs where the schema and decode() knowingly disagree. Each is pinned so a change on either
/// side is noticed: if one of these starts to fail, move the case into `CORPUS` (and update the
/// schema descriptions).
#[test]
fn documented_divergences() {
    let v = validator(INPUT);
    let cases: &[(&str, &str, bool, Result<(), ErrorCode>)] = &[
        // Not expressible in JSON Schema (documented in the `candidates` description).
        (
            "duplicate candidate ids",
            r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t"},{"id":"a","text":"u"}]}"#,
            true,
            Err(ErrorCode::DuplicateCandidateId),
        ),
        // JSON Schema sees the parsed value (last key wins); serde rejects the repeated field.
        (
            "repeated key",
            r#"{"schema_version":1,"request_id":"r","query":"q","query":"q2","candidates":[]}"#,
            true,
            Err(ErrorCode::SchemaViolation),
        ),
        // The same for keys the worker does not know and would otherwise ignore.
        (
            "repeated unknown key",
            r#"{"schema_version":1,"request_id":"r","query":"q","candidates":[{"id":"a","text":"t","x":1,"x":1}]}"#,
            true,
            Err(ErrorCode::SchemaViolation),
        ),
        // JSON Schema compares numbers by value (and its "integer" is any number with a zero
        // fraction), while serde wants an integer token. (`"top_n": 5.0` is the same divergence
        // for spec-conformant validators; jsonschema-rs happens to reject 5.0 against
        // `"type": ["integer", "null"]`, so it is not pinned here.)
        (
            "schema_version written as 1e0",
            r#"{"schema_version":1e0,"request_id":"r","query":"q","candidates":[]}"#,
            true,
            Err(ErrorCode::SchemaViolation),
        ),
    ];
    let mut changed = Vec::new();
    for (name, doc, schema_expected, decode_expected) in cases {
        let by_schema = schema_accepts(&v, doc.as_bytes());
        let by_decode = decode_verdict(doc.as_bytes());
        if by_schema != *schema_expected || by_decode != *decode_expected {
            changed.push(format!(
                "{name}: schema {by_schema} (pinned {schema_expected}), decode {by_decode:?} (pinned {decode_expected:?})"
            ));
        }
    }
    assert!(
        changed.is_empty(),
        "a documented divergence changed: {changed:#?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Output: reranked

fn sig(logit: f32) -> Score {
    Score {
        logit,
        relevance: sigmoid(logit),
    }
}

fn cand(
    id: &str,
    text: Option<&str>,
    retriever_score: Option<f64>,
    metadata: Option<&str>,
) -> CandidateMeta {
    CandidateMeta {
        id: id.into(),
        text: text.map(Into::into),
        retriever_score,
        metadata: metadata.map(|m| RawValue::from_string(m.to_string()).unwrap()),
    }
}

fn completed(
    candidates: Vec<CandidateMeta>,
    scores: Vec<Score>,
    top_n: usize,
    min_score: Option<f64>,
    record_ts_ms: Option<i64>,
) -> Completed {
    assert_eq!(candidates.len(), scores.len());
    let n_pairs = candidates.len();
    Completed {
        meta: EventMeta {
            id: 1,
            ticket: Ticket {
                tp: TopicPartition {
                    topic: "retrieval-results".into(),
                    partition: 3,
                },
                offset: 42,
                generation: 1,
            },
            key: Some(b"req-1".to_vec()),
            headers: vec![("traceparent".into(), b"00-abc-def-01".to_vec())],
            request_id: "req-1".into(),
            query: "what is a cross-encoder?".into(),
            candidates,
            top_n,
            min_score,
            min_relevance: None,
            received_at: Instant::now(),
            deadline: None,
            lane: Default::default(),
            record_ts_ms,
            truncated: 1,
            chunked: 0,
            pairs: n_pairs,
            payload: Vec::new(),
            span: tracing::Span::none(),
            trace: opentelemetry::trace::SpanContext::empty_context(),
        },
        scores,
        queue: Duration::from_micros(1500),
        inference: Duration::from_micros(12_345),
    }
}

fn sigmoid_model() -> ModelRef {
    ModelRef {
        name: "ms-marco-MiniLM-L-6-v2".into(),
        revision: "0123456789abcdef".into(),
        activation: "sigmoid".into(),
    }
}

#[test]
fn rendered_reranked_records_match_the_schema() {
    let v = validator(RERANKED);
    let v1_0 = fixture_validator(RERANKED_V1_0);
    let model = sigmoid_model();
    let softmax = ModelRef {
        activation: "softmax".into(),
        ..sigmoid_model()
    };
    const META: &str = r#"{ "source" : "wiki",  "n": 1.50, "tags": ["a", null] }"#;
    let full = || {
        vec![
            cand("a", Some("alpha"), Some(0.5), Some(META)),
            cand("b", Some(""), Some(-3.0), Some("{}")),
            cand("c", Some("gamma"), None, None),
            cand("d", None, Some(7.0), None),
            cand("e", None, None, Some(r#"{"x":{"y":[]}}"#)),
        ]
    };
    let scores = || vec![sig(0.1), sig(2.0), sig(-1.0), sig(2.0), sig(100.0)];
    let bare = || {
        (0..5)
            .map(|i| cand(&format!("id-{i}"), None, None, None))
            .collect::<Vec<_>>()
    };

    let cases: Vec<(&str, Completed, &ModelRef, usize)> = vec![
        (
            "all fields, with timestamp",
            completed(full(), scores(), 10, None, Some(1_700_000_000_000)),
            &model,
            5,
        ),
        (
            "no optional fields, no timestamp",
            completed(bare(), scores(), 10, None, None),
            &model,
            5,
        ),
        (
            "top_n cut",
            completed(full(), scores(), 2, None, Some(0)),
            &model,
            2,
        ),
        (
            "min_score filter",
            completed(full(), scores(), 10, Some(0.5), None),
            &model,
            3,
        ),
        (
            "min_score drops everything",
            completed(full(), scores(), 10, Some(1e9), None),
            &model,
            0,
        ),
        (
            "zero candidates",
            completed(Vec::new(), Vec::new(), 10, None, Some(1)),
            &model,
            0,
        ),
        (
            "softmax, extreme logits",
            completed(
                bare(),
                vec![
                    Score {
                        logit: -1e30,
                        relevance: 0.0,
                    },
                    Score {
                        logit: 1e30,
                        relevance: 1.0,
                    },
                    sig(-100.0),
                    Score {
                        logit: 0.0,
                        relevance: 0.5,
                    },
                    sig(f32::MAX),
                ],
                3,
                None,
                Some(2_000_000_000_000), // in the future: end_to_end_ms clamps at 0
            ),
            &softmax,
            3,
        ),
    ];
    for (name, c, m, n_results) in cases {
        let bytes = assemble::render(&c, m, &[], 1_700_000_000_250);
        let doc: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_valid(&v, &doc, name);
        // Without the new options the output is what today's consumers validate against.
        assert_valid(&v1_0, &doc, &format!("{name} (today's v1 schema)"));

        let results = doc["results"].as_array().unwrap();
        assert_eq!(results.len(), n_results, "{name}: results");
        assert_eq!(
            doc["candidates"],
            c.meta.candidates.len(),
            "{name}: candidates"
        );
        assert_eq!(
            doc["timings"].get("end_to_end_ms").is_some(),
            c.meta.record_ts_ms.is_some(),
            "{name}: end_to_end_ms is present exactly when the record had a timestamp"
        );
        for r in results {
            let i = r["original_rank"].as_u64().unwrap() as usize - 1;
            let cm = &c.meta.candidates[i];
            assert_eq!(r["id"], cm.id.as_str());
            // Optional fields are omitted, never null.
            assert_eq!(r.get("text").is_some(), cm.text.is_some(), "{name}: text");
            assert_eq!(
                r.get("retriever_score").is_some(),
                cm.retriever_score.is_some(),
                "{name}"
            );
            assert_eq!(
                r.get("metadata").is_some(),
                cm.metadata.is_some(),
                "{name}: metadata"
            );
        }
    }

    // Metadata is passed through byte for byte.
    let c = completed(full(), scores(), 10, None, None);
    let text = String::from_utf8(assemble::render(&c, &model, &[], 0)).unwrap();
    assert!(text.contains(&format!(r#""metadata":{META}"#)), "{text}");
}

#[test]
fn reranked_schema_rejects_what_render_never_emits() {
    let v = validator(RERANKED);
    let c = completed(
        vec![cand("a", Some("t"), Some(1.0), Some("{}"))],
        vec![sig(1.0)],
        10,
        None,
        Some(0),
    );
    let good: Value =
        serde_json::from_slice(&assemble::render(&c, &sigmoid_model(), &labels(), 5)).unwrap();
    assert_valid(&v, &good, "baseline");
    let bad: Vec<Mutation> = vec![
        ("extra top-level key", |d| d["extra"] = json!(1)),
        ("extra result key", |d| d["results"][0]["extra"] = json!(1)),
        ("schema_version 2", |d| d["schema_version"] = json!(2)),
        ("rank 0", |d| d["results"][0]["rank"] = json!(0)),
        ("original_rank 0", |d| {
            d["results"][0]["original_rank"] = json!(0)
        }),
        ("relevance above 1", |d| {
            d["results"][0]["relevance"] = json!(1.5)
        }),
        ("relevance below 0", |d| {
            d["results"][0]["relevance"] = json!(-0.1)
        }),
        ("score null", |d| d["results"][0]["score"] = Value::Null),
        ("text null", |d| d["results"][0]["text"] = Value::Null),
        ("metadata array", |d| {
            d["results"][0]["metadata"] = json!([])
        }),
        ("label null", |d| d["results"][0]["label"] = Value::Null),
        ("empty label", |d| d["results"][0]["label"] = json!("")),
        ("unknown activation", |d| {
            d["model"]["activation"] = json!("relu")
        }),
        ("model without revision", |d| {
            d["model"].as_object_mut().unwrap().remove("revision");
        }),
        ("timings without queue_ms", |d| {
            d["timings"].as_object_mut().unwrap().remove("queue_ms");
        }),
        ("end_to_end_ms null", |d| {
            d["timings"]["end_to_end_ms"] = Value::Null
        }),
        ("negative candidates", |d| d["candidates"] = json!(-1)),
    ];
    for (name, mutate) in bad {
        let mut doc = good.clone();
        mutate(&mut doc);
        assert!(!v.is_valid(&doc), "schema accepts {name}: {doc}");
    }
}

fn labels() -> Vec<Label> {
    [("unlikely", 0.0), ("likely", 0.3), ("very likely", 0.7)]
        .into_iter()
        .map(|(name, min_relevance)| Label {
            name: name.into(),
            min_relevance,
        })
        .collect()
}

#[test]
fn labels_and_min_relevance_render_to_the_schema() {
    let v = validator(RERANKED);
    let bare = || {
        (0..5)
            .map(|i| cand(&format!("id-{i}"), Some("t"), None, None))
            .collect::<Vec<_>>()
    };
    // relevance: 0.119, 0.5, 0.731, 0.881, 0.269
    let scores = || vec![sig(-2.0), sig(0.0), sig(1.0), sig(2.0), sig(-1.0)];
    let render = |min_score, min_relevance| {
        let mut c = completed(bare(), scores(), 10, min_score, None);
        c.meta.min_relevance = min_relevance;
        let doc: Value =
            serde_json::from_slice(&assemble::render(&c, &sigmoid_model(), &labels(), 0)).unwrap();
        assert_valid(&v, &doc, "labelled");
        doc["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["id"].as_str().unwrap().to_string(),
                    r["label"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let ids = |v: Vec<(String, String)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
    assert_eq!(
        render(None, None)
            .into_iter()
            .map(|(_, l)| l)
            .collect::<Vec<_>>(),
        [
            "very likely",
            "very likely",
            "likely",
            "unlikely",
            "unlikely"
        ]
    );
    assert_eq!(ids(render(None, Some(0.5))), ["id-3", "id-2", "id-1"]);
    // Both thresholds apply when both are set.
    assert_eq!(ids(render(Some(0.5), Some(0.2))), ["id-3", "id-2"]);
    assert_eq!(ids(render(Some(-1.5), Some(0.7))), ["id-3", "id-2"]);
    assert!(render(None, Some(1.0)).is_empty());
}

/// The output schema only grew by optional fields: drop them and the descriptions, and today's
/// schema is what remains.
#[test]
fn reranked_schema_only_adds_optional_fields() {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("description");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut now = load(RERANKED);
    let mut then = load_from("tests/fixtures", RERANKED_V1_0);
    let added = now["$defs"]["result"]["properties"]
        .as_object_mut()
        .unwrap()
        .remove("label")
        .expect("label");
    assert_eq!(added["type"], "string");
    assert!(!now["$defs"]["result"]["required"]
        .as_array()
        .unwrap()
        .contains(&json!("label")));
    strip(&mut now);
    strip(&mut then);
    assert_eq!(
        now, then,
        "reranked.v1.json changed beyond adding optional fields"
    );
}

/// The input schema only loosened: today's schema with the new optional fields and without
/// `additionalProperties: false` and with the schema_version alternatives is today's schema.
#[test]
fn input_schema_only_loosens() {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("description");
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut now = load(INPUT);
    let mut then = load_from("tests/fixtures", INPUT_V1_0);
    for k in ["min_relevance", "return_text", "priority"] {
        now["properties"]
            .as_object_mut()
            .unwrap()
            .remove(k)
            .expect(k);
    }
    assert!(now["properties"]["schema_version"]["anyOf"]
        .as_array()
        .unwrap()
        .contains(&json!({ "const": 1 })));
    now["properties"]["schema_version"] = json!({ "const": 1 });
    for path in ["", "/$defs/candidate"] {
        let m = then.pointer_mut(path).unwrap().as_object_mut().unwrap();
        assert_eq!(m.remove("additionalProperties"), Some(json!(false)));
    }
    strip(&mut now);
    strip(&mut then);
    assert_eq!(
        now, then,
        "retrieval-result.v1.json changed beyond loosening"
    );
}

// ---------------------------------------------------------------------------------------------
// Output: dead letters

#[test]
fn rendered_dead_letters_match_the_schema() {
    let v = validator(DEAD_LETTER);
    let utf8_payload: &[u8] =
        br#"{"schema_version":2,"request_id":"r","query":"q","candidates":[]}"#;
    let binary_payload: &[u8] = &[0xff, 0xfe, 0x00, 0x7b, 0x80];
    let payloads: [(&str, Option<&[u8]>, &str); 4] = [
        ("utf8 payload", Some(utf8_payload), "utf8"),
        ("binary payload", Some(binary_payload), "base64"),
        ("empty payload", Some(b""), "utf8"),
        ("no payload", None, "utf8"),
    ];
    let keys: [KeyCase; 3] = [
        ("no key", None, None),
        ("utf8 key", Some(b"req-1"), Some("utf8")),
        ("binary key", Some(&[0x00, 0xc3, 0x28]), Some("base64")),
    ];
    let mut n = 0;
    for code in ErrorCode::ALL {
        for &(pname, payload, encoding) in &payloads {
            for &(kname, key, key_encoding) in &keys {
                for timestamp_ms in [None, Some(1_700_000_000_000i64)] {
                    let what = format!(
                        "{} / {pname} / {kname} / ts {timestamp_ms:?}",
                        code.as_str()
                    );
                    let bytes = dlq::render(
                        &DlqInput {
                            code,
                            message: "something went wrong: \"quoted\"\n",
                            topic: "retrieval-results",
                            partition: 3,
                            offset: 42,
                            timestamp_ms,
                            key,
                            payload,
                        },
                        1_700_000_000_500,
                    );
                    let doc: Value =
                        serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
                    assert_valid(&v, &doc, &what);

                    assert_eq!(doc["error"]["code"], code.as_str(), "{what}");
                    assert_eq!(doc["payload"]["encoding"], encoding, "{what}");
                    assert_eq!(
                        doc["source"]["key_encoding"].as_str(),
                        key_encoding,
                        "{what}"
                    );
                    assert_eq!(doc["source"].get("key").is_some(), key.is_some(), "{what}");
                    assert_eq!(
                        doc["source"].get("timestamp_ms").is_some(),
                        timestamp_ms.is_some(),
                        "{what}"
                    );
                    // The original bytes can be recovered.
                    let data = doc["payload"]["data"].as_str();
                    let back = match encoding {
                        "base64" => data
                            .map(|d| base64::engine::general_purpose::STANDARD.decode(d).unwrap()),
                        _ => data.map(|d| d.as_bytes().to_vec()),
                    };
                    assert_eq!(back.as_deref(), payload, "{what}");
                    // And the record reads back into the serde type.
                    let rec: DeadLetter = serde_json::from_slice(&bytes).unwrap();
                    assert_eq!(rec.error.code, code);
                    n += 1;
                }
            }
        }
    }
    assert_eq!(n, ErrorCode::ALL.len() * 4 * 3 * 2);
}

#[test]
fn dead_letter_code_enum_is_exactly_error_code_all() {
    // Adding a variant breaks this match, so whoever adds one is sent here (and to ALL, below).
    fn listed(c: ErrorCode) -> bool {
        match c {
            ErrorCode::EmptyPayload
            | ErrorCode::InvalidUtf8
            | ErrorCode::InvalidJson
            | ErrorCode::SchemaViolation
            | ErrorCode::UnsupportedSchemaVersion
            | ErrorCode::EmptyQuery
            | ErrorCode::EmptyRequestId
            | ErrorCode::TooManyCandidates
            | ErrorCode::TextTooLong
            | ErrorCode::PayloadTooLarge
            | ErrorCode::DuplicateCandidateId
            | ErrorCode::DeadlineExceeded
            | ErrorCode::MissingTemplateField
            | ErrorCode::TokenizationFailed
            | ErrorCode::InferenceFailed => true,
        }
    }
    let every_variant = [
        ErrorCode::EmptyPayload,
        ErrorCode::InvalidUtf8,
        ErrorCode::InvalidJson,
        ErrorCode::SchemaViolation,
        ErrorCode::UnsupportedSchemaVersion,
        ErrorCode::EmptyQuery,
        ErrorCode::EmptyRequestId,
        ErrorCode::TooManyCandidates,
        ErrorCode::TextTooLong,
        ErrorCode::PayloadTooLarge,
        ErrorCode::DuplicateCandidateId,
        ErrorCode::DeadlineExceeded,
        ErrorCode::MissingTemplateField,
        ErrorCode::TokenizationFailed,
        ErrorCode::InferenceFailed,
    ];
    for c in every_variant {
        assert!(
            listed(c) && ErrorCode::ALL.contains(&c),
            "{c:?} is missing from ErrorCode::ALL"
        );
    }

    let schema = load(DEAD_LETTER);
    let in_schema: Vec<&str> = schema["properties"]["error"]["properties"]["code"]["enum"]
        .as_array()
        .expect("error.code.enum")
        .iter()
        .map(|c| c.as_str().expect("string code"))
        .collect();
    let in_schema_set: BTreeSet<&str> = in_schema.iter().copied().collect();
    assert_eq!(
        in_schema.len(),
        in_schema_set.len(),
        "duplicate codes in the schema"
    );
    let in_code: BTreeSet<&str> = ErrorCode::ALL.iter().map(|c| c.as_str()).collect();
    assert_eq!(
        in_schema_set, in_code,
        "dead-letter.v1.json error.code enum vs ErrorCode::ALL"
    );
    // as_str() and the serde name must be the same string.
    for c in ErrorCode::ALL {
        assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        // Every code is documented in the enum's description.
        let doc = schema["properties"]["error"]["properties"]["code"]["description"]
            .as_str()
            .unwrap();
        assert!(
            doc.contains(&format!("`{}`", c.as_str())),
            "{} is not described",
            c.as_str()
        );
    }
}

#[test]
fn dead_letter_schema_rejects_what_render_never_emits() {
    let v = validator(DEAD_LETTER);
    let good: Value = serde_json::from_slice(&dlq::render(
        &DlqInput {
            code: ErrorCode::InvalidJson,
            message: "m",
            topic: "t",
            partition: 0,
            offset: 0,
            timestamp_ms: Some(1),
            key: Some(b"k"),
            payload: Some(&[0xff]),
        },
        2,
    ))
    .unwrap();
    assert_valid(&v, &good, "baseline");
    let bad: Vec<Mutation> = vec![
        ("unknown code", |d| d["error"]["code"] = json!("oops")),
        ("extra key", |d| d["extra"] = json!(1)),
        ("key without key_encoding", |d| {
            d["source"].as_object_mut().unwrap().remove("key_encoding");
        }),
        ("key_encoding without key", |d| {
            d["source"].as_object_mut().unwrap().remove("key");
        }),
        ("base64 data that is not base64", |d| {
            d["payload"]["data"] = json!("{not base64}")
        }),
        ("unknown encoding", |d| {
            d["payload"]["encoding"] = json!("hex")
        }),
        ("missing data", |d| {
            d["payload"].as_object_mut().unwrap().remove("data");
        }),
        ("timestamp_ms null", |d| {
            d["source"]["timestamp_ms"] = Value::Null
        }),
        ("negative offset", |d| d["source"]["offset"] = json!(-1)),
        ("schema_version 2", |d| d["schema_version"] = json!(2)),
        ("worker without version", |d| {
            d["worker"].as_object_mut().unwrap().remove("version");
        }),
    ];
    for (name, mutate) in bad {
        let mut doc = good.clone();
        mutate(&mut doc);
        assert!(!v.is_valid(&doc), "schema accepts {name}: {doc}");
    }
}
