//! Helpers shared by the replication end-to-end tests.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tandem_tests::{run_ok, run_timeout, tandemctl};

/// Size of the replicated test volumes.
pub const SIZE: u64 = 64 << 20;

/// fio write+verify (or `--verify_only`) through `uri`; extra args appended.
pub fn fio_cmd(uri: &str, verify_only: bool, extra: &[&str]) -> Command {
    let mut cmd = Command::new("fio");
    cmd.arg("--verify_state_save=0")
        .current_dir(std::env::temp_dir())
        .args([
            "--name=repl",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            &format!("--size={SIZE}"),
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--randseed=91",
        ]);
    if verify_only {
        cmd.arg("--verify_only");
    } else {
        cmd.args(["--do_verify=1", "--fsync=32"]);
    }
    cmd.args(extra);
    cmd
}

pub fn fio(uri: &str, verify_only: bool) {
    let out = run_timeout(
        &mut fio_cmd(uri, verify_only, &[]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "fio (verify_only={verify_only}) failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn issue(certs: &Path, node: &str) {
    run_ok(
        Command::new(tandemctl())
            .args(["cert", "issue", "--ca-dir"])
            .arg(certs)
            .args(["--node", node, "--out-dir"])
            .arg(certs),
    );
}

/// A CA in `dir` with certificates for alpha and beta.
pub fn cluster_certs(dir: &Path) {
    run_ok(
        Command::new(tandemctl())
            .args(["ca", "create", "--dir"])
            .arg(dir),
    );
    for n in ["alpha", "beta"] {
        issue(dir, n);
    }
}
