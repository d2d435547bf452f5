//! Arbitrary bytes through the wire decoder as the stream reader feeds it, in arbitrary
//! chunks. The checks are in `tern_origin_link::fuzzing::decode_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tern_origin_link::fuzzing::decode_stream(data);
});
