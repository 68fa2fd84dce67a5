#![no_main]

use libfuzzer_sys::fuzz_target;

// Properties: see herald::fuzzing::config.
fuzz_target!(|data: &[u8]| herald::fuzzing::config(data));
