//! The README's main job: `tandemd demo` (two sites and a witness, site A
//! killed, site B takes over, every acknowledged write verified, site A
//! resynced) and `tandemd demo --single-node`, run as a newcomer would.

use std::process::Command;
use std::time::Duration;

use tandem_tests::{heavy_lock, run_timeout, tandemd};

fn demo(args: &[&str]) -> String {
    let out = run_timeout(
        Command::new(tandemd()).arg("demo").args(args),
        Duration::from_secs(300),
    );
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "tandemd demo {args:?} failed:\n{text}"
    );
    eprintln!("{text}");
    text
}

#[test]
fn the_two_site_demo_loses_no_acknowledged_write_and_resyncs_only_what_changed() {
    let _heavy = heavy_lock();
    let text = demo(&["--size", "64M", "--workload", "2s"]);
    for want in [
        "site A killed (SIGKILL)",
        "failover took",
        "acknowledged blocks read back intact",
        "was resynced in",
        "OK: site A was lost mid-write",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

#[test]
fn the_single_node_demo_reads_every_byte_back_after_a_restart() {
    let _heavy = heavy_lock();
    let text = demo(&["--single-node", "--size", "32M"]);
    assert!(
        text.contains("OK: every acknowledged write read back intact"),
        "{text}"
    );
}
