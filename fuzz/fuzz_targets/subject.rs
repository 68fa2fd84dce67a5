#![no_main]

use libfuzzer_sys::fuzz_target;

// Properties: see herald::fuzzing::subject.
fuzz_target!(|data: &[u8]| herald::fuzzing::subject(data));
