//! HTTP responses: status line, headers, Range answers and channel document bodies
//! (docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| metrica_fuzz::http_response(data));
