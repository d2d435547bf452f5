//! Messages built from arbitrary bytes, encoded and decoded again. The checks are in
//! `tern_origin_link::fuzzing::encode_round_trip`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    tern_origin_link::fuzzing::encode_round_trip(data);
});
