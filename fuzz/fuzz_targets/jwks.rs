#![no_main]

use libfuzzer_sys::fuzz_target;

// Properties: see herald::fuzzing::jwks.
fuzz_target!(|data: &[u8]| herald::fuzzing::jwks(data));
