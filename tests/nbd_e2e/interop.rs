//! Interoperability with the reference clients: libnbd's nbdinfo and nbdcopy,
//! QEMU's qemu-io, over the unix socket and over TCP.

use std::process::Command;
use std::time::Duration;

use tandem_tests::{
    block_on, data_offset, read_file_at, require, require_tools, run_timeout, Daemon, Json, Rng,
};

const VOL: u64 = 256 << 20;
const SMALL: u64 = 64 << 20;

fn nbdinfo_json(args: &[&str]) -> Json {
    let out = run_timeout(
        Command::new("nbdinfo").arg("--json").args(args),
        Duration::from_secs(30),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nbdinfo --json {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("nbdinfo JSON: {e}\n{stdout}"))
}

fn the_export(j: &Json) -> &Json {
    let exports = j["exports"].as_array().expect("nbdinfo exports[]");
    assert_eq!(exports.len(), 1, "expected one export: {j}");
    &exports[0]
}

fn check_export_info(e: &Json, size: u64, via: &str) {
    assert_eq!(e["export-size"], size, "size via {via}: {e}");
    for cap in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[cap], true, "{cap} via {via}: {e}");
    }
    assert_eq!(e["is_read_only"], false, "is_read_only via {via}: {e}");
    assert_eq!(
        e["block_size_minimum"], 512,
        "block_size_minimum via {via}: {e}"
    );
    assert_eq!(
        e["block_size_preferred"], 4096,
        "block_size_preferred via {via}: {e}"
    );
    assert_eq!(
        e["block_size_maximum"], 33_554_432,
        "block_size_maximum via {via}: {e}"
    );
}

#[test]
fn nbdinfo_reports_exports_over_unix_and_tcp() {
    if !require("nbdinfo", "libnbd-bin") {
        return;
    }
    let d = Daemon::builder()
        .volume("vol", VOL)
        .volume_with("small", SMALL, &["--block-size", "4096"])
        .tcp()
        .start();

    let j = nbdinfo_json(&[&d.uri("vol")]);
    assert_eq!(j["protocol"], "newstyle-fixed", "{j}");
    assert_eq!(j["structured"], true, "structured replies negotiated: {j}");
    let e = the_export(&j);
    assert_eq!(e["export-name"], "vol", "{j}");
    check_export_info(e, VOL, "unix socket");

    // A 4096-byte-block volume advertises 4096 as its minimum block size.
    let j = nbdinfo_json(&[&d.uri("small")]);
    let e = the_export(&j);
    assert_eq!(e["export-size"], SMALL, "{j}");
    assert_eq!(
        e["block_size_minimum"], 4096,
        "4k volume minimum block size: {j}"
    );

    // NBD_OPT_LIST (+ NBD_OPT_INFO for each) lists every export.
    let list_uri = format!("nbd+unix:///?socket={}", d.socket().display());
    let j = nbdinfo_json(&["--list", &list_uri]);
    let exports = j["exports"].as_array().expect("exports[]");
    let mut names: Vec<(&str, u64)> = exports
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap_or("?"),
                e["export-size"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![("small", SMALL), ("vol", VOL)],
        "nbdinfo --list: {j}"
    );

    // The default export (empty name) is the first one.
    let j = nbdinfo_json(&[&list_uri]);
    assert_eq!(the_export(&j)["export-size"], VOL, "default export: {j}");

    // TCP listener.
    let j = nbdinfo_json(&[&d.tcp_uri("vol")]);
    check_export_info(the_export(&j), VOL, "tcp");

    // An unknown export is refused (NBD_REP_ERR_UNKNOWN), not served.
    let out = run_timeout(
        Command::new("nbdinfo").arg(d.uri("nosuch")),
        Duration::from_secs(30),
    );
    assert!(
        !out.status.success(),
        "nbdinfo on an unknown export succeeded"
    );
}

#[test]
fn nbdcopy_round_trip_is_byte_exact() {
    if !require("nbdcopy", "libnbd-bin") {
        return;
    }
    let d = Daemon::builder().volume("small", SMALL).start();
    let src = d.dir().join("src.bin");
    let out = d.dir().join("out.bin");
    let data = Rng::new(7).bytes(SMALL as usize);
    std::fs::write(&src, &data).expect("write src");

    let copy = |from: &str, to: &str| {
        let o = run_timeout(
            Command::new("nbdcopy").args([from, to]),
            Duration::from_secs(60),
        );
        assert!(
            o.status.success(),
            "nbdcopy {from} {to} failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let uri = d.uri("small");
    copy(src.to_str().unwrap(), &uri);
    std::fs::File::create(&out).expect("create out");
    copy(&uri, out.to_str().unwrap());
    let back = std::fs::read(&out).expect("read out");
    assert_eq!(back.len(), data.len(), "copied-out size");
    if let Some(i) = back.iter().zip(&data).position(|(a, b)| a != b) {
        panic!("nbdcopy round trip differs first at byte {i}");
    }
    // The data sits in the backing file's data area, at data_offset.
    let on_disk = read_file_at(
        d.backing("small"),
        data_offset(d.backing("small")),
        SMALL as usize,
    );
    assert!(
        on_disk == data,
        "backing file data area differs from what was copied in"
    );
}

/// Runs qemu-io with `-c` commands; returns its stdout+stderr (asserting exit 0).
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    c.arg(uri);
    let o = run_timeout(&mut c, Duration::from_secs(60));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "qemu-io {cmds:?} exited with {}:\n{text}",
        o.status
    );
    text
}

fn assert_no_failure(text: &str, what: &str) {
    let lower = text.to_lowercase();
    assert!(
        !lower.contains("fail") && !lower.contains("error"),
        "qemu-io {what} reported a failure:\n{text}"
    );
}

#[test]
fn qemu_io_patterns_zeroes_and_discard() {
    if !require("qemu-io", "qemu-utils") {
        return;
    }
    let d = Daemon::builder().volume("vol", VOL).start();
    let uri = d.uri("vol");
    let out = qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            "write -P 0xcd 1M 1M",
            "read -P 0xcd 1M 1M",
            "write -z 1M 1M",
            "read -P 0 1M 1M",
            "write -f -P 0x5a 4M 64k", // FUA
            "read -P 0x5a 4M 64k",
            "write -P 0x77 8M 1M",
            "discard 8M 1M",
            "read -P 0 8M 1M",
            "write -P 0x33 255M 1M", // last MiB
            "flush",
        ],
    );
    assert_no_failure(&out, "write/read/zero/discard");
    assert!(
        out.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{out}"
    );
    assert!(
        out.contains("read 1048576/1048576 bytes at offset 1048576"),
        "{out}"
    );

    // A second qemu-io process (new connection) sees the same data.
    let out = qemu_io(
        &uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x33 255M 1M",
        ],
    );
    assert_no_failure(&out, "re-read");

    // Control: a wrong pattern is detected, so the checks above are meaningful.
    let o = run_timeout(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0xee 0 1M", &uri]),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        text.contains("Pattern verification failed"),
        "qemu-io did not detect a wrong pattern:\n{text}"
    );

    // And Tandem's own client agrees about the bytes qemu wrote.
    block_on(async {
        let mut c = d.client("vol").await;
        let mut buf = vec![0u8; 4096];
        c.read(0, &mut buf).await.expect("read");
        assert!(buf.iter().all(|&b| b == 0xab), "bytes at 0 are not 0xab");
        c.read((1 << 20) + 4096, &mut buf).await.expect("read");
        assert!(buf.iter().all(|&b| b == 0), "write -z range is not zero");
        c.disconnect().await.expect("disconnect");
    });

    // Reads past the end fail cleanly rather than returning data.
    let o = run_timeout(
        Command::new("qemu-io").args(["-f", "raw", "-c", "read 256M 4k", &uri]),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !text.contains("read 4096/4096"),
        "read past the end returned data:\n{text}"
    );
}

#[test]
fn qemu_io_over_tcp() {
    if !require_tools(&[("qemu-io", "qemu-utils")]) {
        return;
    }
    let d = Daemon::builder().volume("vol", VOL).tcp().start();
    let out = qemu_io(
        &d.tcp_uri("vol"),
        &["write -P 0x42 0 2M", "read -P 0x42 0 2M", "flush"],
    );
    assert_no_failure(&out, "over TCP");
    // Same bytes through the unix socket.
    let out = qemu_io(&d.uri("vol"), &["read -P 0x42 0 2M"]);
    assert_no_failure(&out, "unix after TCP write");
}
