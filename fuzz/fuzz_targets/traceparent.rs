//! `traceparent` header values: parse or not, never panic; what parses writes out
//! and parses back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_core::TraceContext;

fuzz_target!(|value: &str| {
    if let Some(ctx) = TraceContext::parse(value) {
        assert!(ctx.trace_id != 0 && ctx.span_id != 0);
        assert_eq!(TraceContext::parse(&ctx.to_header()), Some(ctx));
    }
});
