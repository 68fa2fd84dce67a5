//! Replays every committed fuzz corpus file, the seeds and the inputs of
//! fixed crashes (`fuzz/corpus/<target>/`), through the functions the fuzz
//! targets call, under a plain `cargo test`. `scripts/fuzz.sh` runs the
//! fuzzer itself.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use herald::fuzzing;

fn replay(target: &str, check: fn(&[u8])) {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&directory)
        .unwrap_or_else(|error| panic!("{}: {error}", directory.display()))
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", directory.display());
    let failed: Vec<String> = files
        .iter()
        .filter(|file| {
            let data = std::fs::read(file).unwrap();
            catch_unwind(AssertUnwindSafe(|| check(&data))).is_err()
        })
        .map(|file| file.display().to_string())
        .collect();
    assert!(failed.is_empty(), "{target} fails on {failed:#?}");
}

#[test]
fn frame_reader() {
    replay("frame_reader", fuzzing::frame_reader);
}

#[test]
fn request() {
    replay("request", fuzzing::request);
}

#[test]
fn token() {
    replay("token", fuzzing::token);
}

#[test]
fn channel() {
    replay("channel", fuzzing::channel);
}

#[test]
fn subject() {
    replay("subject", fuzzing::subject);
}

#[test]
fn config() {
    replay("config", fuzzing::config);
}

#[test]
fn jwks() {
    replay("jwks", fuzzing::jwks);
}
