#![no_main]

use libfuzzer_sys::fuzz_target;

// Properties: see herald::fuzzing::frame_reader.
fuzz_target!(|data: &[u8]| herald::fuzzing::frame_reader(data));
