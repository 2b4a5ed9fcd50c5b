//! Fuzzes the event decoder with arbitrary record values.
//!
//! The decoder is compiled from `src/decode.rs` itself, with a stand-in for the one config type it
//! reads, so the fuzz build does not instrument rdkafka, ONNX Runtime and tokenizers as well.
#![no_main]

mod config {
    pub struct LimitsConfig {
        pub max_candidates: usize,
        pub max_query_bytes: usize,
        pub max_text_bytes: usize,
        pub max_event_bytes: usize,
    }
}

#[path = "../../src/decode.rs"]
#[allow(dead_code)]
mod decode;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = config::LimitsConfig {
        max_candidates: 8,
        max_query_bytes: 256,
        max_text_bytes: 1024,
        max_event_bytes: 64 * 1024,
    };
    // The first byte decides whether the record has a value at all (tombstones are input too).
    let payload = match data.split_first() {
        Some((0, _)) | None => None,
        Some((_, rest)) => Some(rest),
    };
    match decode::decode(payload, &limits, Some(1_000), 2_000) {
        Ok(ev) => {
            // Whatever is accepted honours the limits.
            assert!(ev.candidates.len() <= limits.max_candidates);
            assert!(!ev.query.trim().is_empty());
            assert!(ev.candidates.iter().all(|c| c.text.len() <= limits.max_text_bytes));
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
