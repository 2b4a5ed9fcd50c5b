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

#[path = "../../src/template.rs"]
#[allow(dead_code)]
mod template;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let limits = config::LimitsConfig {
        max_candidates: 8,
        max_query_bytes: 256,
        max_text_bytes: 1024,
        max_event_bytes: 64 * 1024,
    };
    // The first byte decides whether the record has a value at all (tombstones are input too) and
    // which `[input]` rules apply: strict or not, templated or not, and the missing-field policy.
    let template = template::Template::parse("{title}\n{text}").ok();
    let (payload, flags) = match data.split_first() {
        Some((0, _)) | None => (None, 0),
        Some((&f, rest)) => (Some(rest), f),
    };
    let rules = decode::Rules {
        strict: flags & 2 != 0,
        template: template.as_ref().filter(|_| flags & 4 != 0),
        missing: if flags & 8 != 0 {
            template::MissingField::DeadLetter
        } else {
            template::MissingField::Empty
        },
    };
    match decode::decode_with(payload, &rules, &limits, Some(1_000), 2_000) {
        Ok(ev) => {
            // Whatever is accepted honours the limits.
            assert!(ev.candidates.len() <= limits.max_candidates);
            assert!(!ev.query.trim().is_empty());
            assert!(ev.candidates.iter().all(|c| c.text.len() <= limits.max_text_bytes));
            assert!(ev.unknown_fields.len() <= decode::MAX_UNKNOWN_PER_EVENT);
            assert!(!rules.strict || ev.unknown_fields.is_empty());
            assert!(ev.min_relevance.is_none_or(|m| (0.0..=1.0).contains(&m)));
        }
        Err(e) => assert!(!e.message.is_empty()),
    }
});
