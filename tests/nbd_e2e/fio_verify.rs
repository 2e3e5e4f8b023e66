//! fio with its `nbd` engine: random writes of mixed sizes with crc32c
//! verification, a separate verify-only pass, and verification again after a
//! clean restart and after a SIGKILL + restart of tandemd.

use std::process::Command;
use std::time::Duration;

use tandem_core::nbd::Command as Cmd;
use tandem_tests::{block_on, heavy_lock, require, run_timeout, Daemon, Json};

const SIZE: u64 = 256 << 20;
const SEED: &str = "20260415";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Pass {
    /// Write everything, then read it back and verify (`--do_verify=1`).
    WriteAndVerify,
    /// Only read and verify what an identical write pass would have written.
    VerifyOnly,
}

/// Runs fio; returns (exit ok, parsed JSON job or None, combined output).
fn fio(uri: &str, pass: Pass) -> (bool, Option<Json>, String) {
    let mut cmd = Command::new("fio");
    // fio saves verify state files in its working directory; keep them out of the repo.
    cmd.arg("--verify_state_save=0")
        .current_dir(std::env::temp_dir());
    cmd.args([
        "--name=tandem-verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-256k",
        &format!("--size={SIZE}"),
        "--iodepth=16",
        "--verify=crc32c",
        "--verify_fatal=1",
        &format!("--randseed={SEED}"),
        "--output-format=json",
    ]);
    match pass {
        // fio's nbd engine refuses fdatasync; fsync=N issues NBD FLUSH.
        Pass::WriteAndVerify => cmd.args(["--do_verify=1", "--fsync=32"]),
        Pass::VerifyOnly => cmd.arg("--verify_only"),
    };
    let out = run_timeout(&mut cmd, Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let text = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let json = stdout
        .find('{')
        .and_then(|i| serde_json::from_str::<Json>(&stdout[i..]).ok())
        .and_then(|j| j["jobs"].get(0).cloned());
    (out.status.success(), json, text)
}

fn assert_pass(uri: &str, pass: Pass, when: &str) {
    let (ok, job, text) = fio(uri, pass);
    assert!(ok, "fio {pass:?} {when} failed:\n{text}");
    let job = job.unwrap_or_else(|| panic!("fio {pass:?} {when}: no JSON job in output:\n{text}"));
    assert_eq!(
        job["error"], 0,
        "fio {pass:?} {when} reported an error:\n{text}"
    );
    // Every byte of the export is written once (random map) and read back once.
    let read = job["read"]["io_bytes"].as_u64().unwrap_or(0);
    assert_eq!(
        read, SIZE,
        "fio {pass:?} {when} verified {read} bytes, expected {SIZE}:\n{text}"
    );
    if pass == Pass::WriteAndVerify {
        let written = job["write"]["io_bytes"].as_u64().unwrap_or(0);
        assert_eq!(
            written, SIZE,
            "fio wrote {written} bytes, expected {SIZE}:\n{text}"
        );
    }
}

fn fio_verify(engine: Option<&str>) {
    if !require("fio", "fio") {
        return;
    }
    let _serial = heavy_lock();
    let mut d = Daemon::builder().volume("vol", SIZE).engine(engine).start();
    let uri = d.uri("vol");
    let st = d.export_status("vol");
    assert_eq!(
        st["engine"],
        engine.unwrap_or("uring"),
        "engine in use: {st}"
    );

    assert_pass(&uri, Pass::WriteAndVerify, "(write pass)");
    assert_pass(&uri, Pass::VerifyOnly, "(second connection, same daemon)");

    d.restart();
    assert_pass(&uri, Pass::VerifyOnly, "after SIGTERM + restart");

    // Writes acknowledged before a crash of the daemon process are not lost.
    d.kill9();
    d.start();
    assert_pass(&uri, Pass::VerifyOnly, "after SIGKILL + restart");

    // Control: the verify pass really checks the exported data. Zero 1 MiB in
    // the middle of the export; fio must now report a verification failure.
    block_on(async {
        let mut c = d.client("vol").await;
        let e = c
            .raw(Cmd::WriteZeroes, 0, SIZE / 2, 1 << 20, &[])
            .await
            .expect("WRITE_ZEROES");
        assert_eq!(e, 0, "WRITE_ZEROES failed with NBD error {e}");
        c.disconnect().await.expect("disconnect");
    });
    let (ok, _, text) = fio(&uri, Pass::VerifyOnly);
    assert!(
        !ok,
        "fio verify-only passed although 1 MiB of the export was zeroed:\n{text}"
    );
    assert!(
        text.contains("verify") || text.contains("bad magic") || text.contains("crc32c"),
        "fio failed without a verification message:\n{text}"
    );
    d.assert_running();
    d.stop();
}

#[test]
fn fio_verify_default_engine() {
    fio_verify(None);
}

#[test]
fn fio_verify_sync_engine() {
    fio_verify(Some("sync"));
}
