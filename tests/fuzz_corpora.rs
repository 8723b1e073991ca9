//! The fuzz targets' saved corpora and regressions (`fuzz/corpus/<target>/`,
//! `fuzz/regressions/<target>/`) replayed through the same property checks the fuzzer runs
//! (`tests/support/fuzz_checks.rs`), so every input the fuzzer kept, and every finding, is
//! checked by the normal test suite without a fuzzer installed.

#![allow(clippy::unwrap_used, reason = "test code: a failed unwrap is a failed test")]

#[path = "support/fuzz_checks.rs"]
mod fuzz_checks;

use std::path::Path;

/// Run `check` on every file under the target's corpus and regression folders; the corpus must
/// not be empty (a missing corpus would make this test pass on nothing).
fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut replayed = 0;
    for folder in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            // A fuzzer running on the same corpus may replace a file while this reads.
            let input = match std::fs::read(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                read => read.unwrap(),
            };
            let outcome = std::panic::catch_unwind(|| check(&input));
            assert!(outcome.is_ok(), "{target}: {} fails its property", path.display());
            replayed += 1;
        }
    }
    assert!(
        replayed > 0,
        "{target}: no saved corpus under fuzz/corpus/{target}"
    );
}

#[test]
fn request_body_corpus() {
    replay("request_body", fuzz_checks::request_body);
}

#[test]
fn sse_corpus() {
    replay("sse", fuzz_checks::sse);
}

#[test]
fn mask_restore_corpus() {
    replay("mask_restore", fuzz_checks::mask_restore);
}

#[test]
fn exposition_corpus() {
    replay("exposition", fuzz_checks::exposition);
}

#[test]
fn config_corpus() {
    replay("config", fuzz_checks::config);
}

#[test]
fn extproc_stream_corpus() {
    replay("extproc_stream", fuzz_checks::extproc_stream);
}
