//! Replays the fuzzers' corpus (`fuzz/corpus/<target>/`, kept minimised in the repository) through
//! the fuzz entry points: every input the fuzzers found interesting stays checked by the ordinary
//! test run, without cargo-fuzz or a nightly flag.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let outcome = std::panic::catch_unwind(|| run(&bytes));
        assert!(outcome.is_ok(), "{} panicked", path.display());
        count += 1;
    }
    assert!(count > 0, "{}: an empty corpus", dir.display());
}

#[test]
fn headers_corpus() {
    replay("headers", amqp_tasks::fuzzing::headers);
}

#[test]
fn bincode_corpus() {
    replay("bincode", amqp_tasks::fuzzing::bincode);
}

#[test]
fn json_corpus() {
    replay("json", amqp_tasks::fuzzing::json);
}
