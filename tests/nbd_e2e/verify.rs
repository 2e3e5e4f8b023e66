//! Online verify (R22, promises 49 and 50): two tandemd processes, data
//! written through the primary's export, a few 4 KiB blocks corrupted
//! directly in the secondary's backing file. `tandemctl verify` on the
//! primary, run while a writer keeps writing elsewhere, reports exactly
//! those blocks; with `--mark` the resync repairs them and the two data
//! areas end byte-identical.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::repl_common::{
    assert_same_data, connected_loopback_pair, peer, status_text, wait_until, SIZE,
};
use tandem_tests::{
    block_on, data_offset, heavy_lock, read_file_at, require, run, tandemctl, wait_timeout,
    write_file_at, Daemon, Json, Rng,
};

/// The blocks corrupted on beta (4 KiB block numbers): the first, two
/// adjacent ones, one in the middle and the last of the volume.
const CORRUPT: [u64; 5] = [0, 100, 101, 2000, SIZE / 4096 - 1];
/// The background writer's region: far from every corrupted block.
const WRITER: (u64, u64) = (32 << 20, 16 << 20);

/// `tandemctl verify vol --wait --json [extra]` on `d`: the result for beta.
fn verify_json(d: &Daemon, extra: &[&str]) -> Json {
    let out = run(Command::new(tandemctl())
        .args(["verify", "vol", "--wait", "--json"])
        .args(extra)
        .arg("--admin-socket")
        .arg(d.admin_socket()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tandemctl verify failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Json = serde_json::from_str(&stdout).expect("tandemctl verify --json output");
    v["peers"]["beta"].clone()
}

fn ranges(v: &Json) -> Vec<(u64, u64)> {
    v["ranges"]
        .as_array()
        .expect("ranges")
        .iter()
        .map(|r| {
            (
                r[0].as_u64().expect("range start"),
                r[1].as_u64().expect("range end"),
            )
        })
        .collect()
}

/// The corrupted blocks as merged byte ranges.
fn expected() -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for b in CORRUPT {
        let (s, e) = (b * 4096, (b + 1) * 4096);
        match out.last_mut() {
            Some(last) if last.1 == s => last.1 = e,
            _ => out.push((s, e)),
        }
    }
    out
}

#[test]
fn online_verify_finds_exactly_the_corrupted_blocks_and_resyncs_them() {
    if !require("fio", "fio") {
        return;
    }
    let _heavy = heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();

    // Data everywhere, through the primary.
    block_on(async {
        let mut c = a.client("vol").await;
        let mut rng = Rng::new(49);
        for k in 0..SIZE / (1 << 20) {
            c.write(k << 20, &rng.bytes(1 << 20), false)
                .await
                .expect("write on alpha");
        }
        c.flush().await.expect("flush on alpha");
    });
    assert_same_data(&a, &b, "alpha and beta after the writes");

    // Identical replicas: nothing differs.
    let v = verify_json(&a, &[]);
    assert_eq!(v["finished"], true, "{v}");
    assert_eq!(v["done_bytes"], SIZE, "{v}");
    assert_eq!(v["differing_bytes"], 0, "{v}");

    // Corrupt blocks of beta's data area behind its back.
    let backing = b.backing("vol").to_path_buf();
    let off = data_offset(&backing);
    for blk in CORRUPT {
        let at = off + blk * 4096;
        let mut data = read_file_at(&backing, at, 4096);
        data[(blk as usize * 7) % 4096] ^= 0x5a;
        write_file_at(&backing, at, &data);
    }

    // Verify while a writer keeps writing (to other blocks): exactly the
    // corrupted blocks are reported, no block of the writer's region.
    let mut writer = Command::new("fio")
        .current_dir(std::env::temp_dir())
        .args([
            "--name=bg",
            "--ioengine=nbd",
            &format!("--uri={}", a.uri("vol")),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            &format!("--offset={}", WRITER.0),
            &format!("--size={}", WRITER.1),
            "--iodepth=8",
            "--time_based",
            "--runtime=6",
            "--randseed=50",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn fio");
    let writes = |d: &Daemon| d.export_status("vol")["writes"].as_u64().unwrap_or(0);
    let before = writes(&a);
    wait_until(
        "the background writer to write",
        Duration::from_secs(20),
        || writes(&a) > before + 50,
    );
    let started = Instant::now();
    let v = verify_json(&a, &[]);
    let during = writes(&a) > before + 50 && wait_timeout(&mut writer, Duration::ZERO).is_none();
    assert_eq!(v["finished"], true, "{v}");
    assert!(v["aborted"].is_null(), "{v}");
    assert_eq!(v["done_bytes"], SIZE, "{v}");
    assert_eq!(ranges(&v), expected(), "exactly the corrupted blocks: {v}");
    assert_eq!(v["differing_bytes"], CORRUPT.len() as u64 * 4096, "{v}");
    assert_eq!(v["marked"], false, "{v}");
    assert!(during, "the writer was still writing when verify ended");
    eprintln!("verify under writes took {:?}: {v}", started.elapsed());
    let status = wait_timeout(&mut writer, Duration::from_secs(60)).expect("fio to finish");
    assert!(status.success(), "background fio failed");

    // Nothing was changed by a verify without --mark.
    let p = peer(&a);
    assert_eq!(p["replication"], "Established", "{p}");
    assert_eq!(p["out_of_sync_bytes"], 0, "{p}");
    assert_eq!(p["verify"]["differing_bytes"], v["differing_bytes"], "{p}");

    let text = status_text(&a);
    assert!(
        text.contains("    verify: finished 64MiB of 64MiB compared, 20KiB in 4 range(s) differ\n"),
        "tandemctl status:\n{text}"
    );
    // The Secondary cannot verify against the Primary (its writes reach
    // the Secondary's disk first): refused, saying why.
    let out = run(Command::new(tandemctl())
        .args(["verify", "vol", "--admin-socket"])
        .arg(b.admin_socket()));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("is Primary; run verify on the Primary"),
        "tandemctl verify on beta: {err}"
    );

    // Human output names the ranges.
    let out = run(Command::new(tandemctl())
        .args(["verify", "vol", "--wait", "--admin-socket"])
        .arg(a.admin_socket()));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("vol vs beta: 20KiB in 4 range(s) differ")
            && text.contains("  409600-417792 (8KiB)\n"),
        "tandemctl verify:\n{text}"
    );

    // --mark: the differing chunks are resynced from alpha.
    let v = verify_json(&a, &["--mark"]);
    assert_eq!(ranges(&v), expected(), "{v}");
    assert_eq!(v["marked"], true, "{v}");
    wait_until("alpha to resync beta", Duration::from_secs(30), || {
        let p = peer(&a);
        p["connection"] == "Connected"
            && p["replication"] == "Established"
            && p["out_of_sync_bytes"] == 0
            && p["outdated"] == false
    });
    wait_until("beta to be UpToDate", Duration::from_secs(10), || {
        b.export_status("vol")["replication"]["disk"] == "UpToDate"
    });
    assert_same_data(&a, &b, "alpha and beta after the resync of the marks");
    let v = verify_json(&a, &[]);
    assert_eq!(v["differing_bytes"], 0, "{v}");
    let log = a.log();
    assert!(
        log.contains("online verify found differing blocks")
            && log.contains("online verify found the replicas identical"),
        "alpha's log:\n{log}"
    );
    b.stop();
    a.stop();
}
