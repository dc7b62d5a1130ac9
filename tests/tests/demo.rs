//! The README's main command works: `pgferry-demo` runs a whole migration and reports an
//! intact audit trail.

use std::process::Command;

use pgferry_tests::bin_path;

#[test]
fn the_readme_demo_migrates_a_cluster() {
    let out = Command::new(bin_path("pgferry-demo"))
        .args(["--megabytes", "10"])
        .output()
        .expect("running pgferry-demo");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for want in [
        "cutover complete: write downtime",
        "are on the new cluster",
        "the source is fenced: it refuses writes",
        "peer comparison: OK",
        "audit verdict: OK",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
}
