//! The binaries we ship carry no test code: fault injection (`test-hooks`) exists only in test
//! executables. Regression test for features unified by `cargo build --release --bins`, which
//! once linked `FaultInjection::apply` into both agents.

use pgferry_tests::bin_path;

/// True if `needle` occurs in the file's bytes (symbol table, debug info or data).
fn contains(path: &std::path::Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    bytes.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn release_agents_do_not_contain_fault_injection() {
    // The scan finds the symbol where it is linked in: this test executable is built with
    // `test-hooks` (a dev-dependency feature) and links one of its functions.
    use pgferry_common::runtime::pump::FaultInjection;
    let make: fn(&[u8]) -> FaultInjection = FaultInjection::corrupt_chunk_containing;
    assert!(!std::hint::black_box(make)(b"x").fired());
    let here = std::env::current_exe().unwrap();
    assert!(
        contains(&here, b"FaultInjection"),
        "the scan does not find a name that is linked in"
    );
    // pgferry-certs is left out: it has integration tests of its own, so `cargo test
    // --workspace` relinks it with the unified features (it never runs an agent, and the pure
    // part it uses has no hooks). The agents have none, so what `cargo build --bins` made stays.
    for bin in ["pgferry-source", "pgferry-target"] {
        let p = bin_path(bin);
        assert!(
            !contains(&p, b"FaultInjection"),
            "{} contains test-only fault injection (a `test-hooks` feature was unified into the release build)",
            p.display()
        );
    }
}
