//! Online growth of a plain volume (`tandemctl resize`, docs/operations.md
//! "Growing a volume"): data written before is intact, the new area reads
//! as zeroes and takes writes, new NBD connections see the new size while
//! an open one keeps the old, shrinking is refused, and the size survives a
//! restart. Checked through NBD and on the backing file itself.

use std::process::Command;
use std::time::Duration;

use tandem_tests::{
    block_on, data_offset, inspect, read_file_at, run, run_ok, tandemctl, Daemon, Rng,
};

const MIB: u64 = 1 << 20;
const OLD: u64 = 64 * MIB;
const NEW: u64 = 160 * MIB;

fn resize(d: &Daemon, size: &str) -> std::process::Output {
    run(Command::new(tandemctl())
        .args(["resize", "vol", size, "--admin-socket"])
        .arg(d.admin_socket()))
}

#[test]
fn resize_grows_a_live_volume_keeping_data_and_zeroing_the_new_area() {
    let mut d = Daemon::builder().volume("vol", OLD).start();
    let backing = d.backing("vol").to_path_buf();
    // 1 MiB of pseudo-random data at 8 places, the last ending at the old end.
    let regions: Vec<(u64, Vec<u8>)> = (0..8u64)
        .map(|i| (i * 8 * MIB + 7 * MIB, Rng::new(100 + i).bytes(MIB as usize)))
        .collect();
    block_on(async {
        let mut old = d.client("vol").await;
        assert_eq!(old.export.size, OLD);
        for (off, data) in &regions {
            old.write(*off, data, false).await.expect("write before");
        }
        old.flush().await.expect("flush");

        // Grow while `old` stays connected.
        let out = resize(&d, "160M");
        assert!(
            out.status.success(),
            "resize failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("grown from 67108864 to 167772160"));

        // The open connection keeps its negotiated size (NBD cannot announce
        // a resize): past it is refused, before it still works.
        assert!(old.write(OLD, &[1; 4096], false).await.is_err());
        old.write(OLD - 4096, &[2; 4096], true)
            .await
            .expect("old connection still writes");

        let mut new = d.client("vol").await;
        assert_eq!(new.export.size, NEW, "a new connection sees the new size");
        for (i, (off, data)) in regions.iter().enumerate() {
            let mut got = vec![0; data.len()];
            new.read(*off, &mut got).await.expect("read old data");
            let want: &[u8] = if i == 7 {
                // the old connection's last write landed in region 7's tail
                &data[..data.len() - 4096]
            } else {
                data
            };
            assert!(got.starts_with(want), "region {i} changed by the resize");
        }
        let mut grown = vec![0xFF; 8 * MIB as usize];
        for off in (OLD..NEW).step_by(grown.len()) {
            new.read(off, &mut grown).await.expect("read new area");
            assert!(grown.iter().all(|&b| b == 0), "new area not zero at {off}");
        }
        let tail = Rng::new(999).bytes(MIB as usize);
        new.write(NEW - MIB, &tail, true)
            .await
            .expect("write at new end");
        let mut got = vec![0; tail.len()];
        new.read(NEW - MIB, &mut got).await.expect("read new end");
        assert_eq!(got, tail);
        assert!(new.read(NEW, &mut [0; 512]).await.is_err(), "past new end");
        new.disconnect().await.expect("disconnect");
        old.disconnect().await.expect("disconnect");
    });

    // Shrinking and unaligned sizes are refused with a clear error; the
    // same size again is a no-op.
    let out = resize(&d, "100M");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shrinking is not supported"), "{err}");
    let out = resize(&d, "167772161");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of the volume's block size"));
    assert!(run_ok(
        Command::new(tandemctl())
            .args(["resize", "vol", "160M", "--admin-socket"])
            .arg(d.admin_socket())
    )
    .contains("already 167772160 bytes"));
    assert_eq!(d.export_status("vol")["size"], NEW);

    // The backing file holds the same bytes, and the size survives a restart.
    d.stop();
    assert_eq!(inspect(&backing)["size"], NEW);
    let off = data_offset(&backing);
    assert!(std::fs::metadata(&backing).expect("stat").len() >= off + NEW);
    for (i, (o, data)) in regions.iter().enumerate().take(7) {
        assert_eq!(
            &read_file_at(&backing, off + o, data.len()),
            data,
            "region {i} on disk"
        );
    }
    assert_eq!(
        read_file_at(&backing, off + NEW - MIB, MIB as usize),
        Rng::new(999).bytes(MIB as usize)
    );
    d.start();
    block_on(async {
        let mut c = d.client("vol").await;
        assert_eq!(c.export.size, NEW);
        let mut got = vec![0; MIB as usize];
        c.read(regions[0].0, &mut got).await.expect("read");
        assert_eq!(got, regions[0].1);
        c.disconnect().await.expect("disconnect");
    });
}

/// A replicated volume is grown offline, one replica at a time: while the
/// sizes differ the replicas refuse to connect (nothing diverges); once
/// both are grown they connect, the old data is intact on both and writes
/// to the new area are replicated (both backings' data areas
/// byte-identical).
#[test]
fn a_replicated_volume_grows_offline_one_replica_at_a_time() {
    use crate::repl_common::{
        assert_same_data, connected_loopback_pair, data_area, peer_connected, wait_until, SIZE,
    };
    let _heavy = tandem_tests::heavy_lock();
    let (_certs, mut a, mut b) = connected_loopback_pair();
    let big = 3 * SIZE; // the bitmap slots move: they must be clear (in sync)
    let old = Rng::new(7).bytes(MIB as usize);
    block_on(async {
        let mut c = a.client("vol").await;
        c.write(SIZE - MIB, &old, true).await.expect("write");
        c.disconnect().await.expect("disconnect");
    });
    assert_same_data(&a, &b, "before growing");

    let offline = |d: &Daemon| {
        run_ok(
            Command::new(tandemctl())
                .args(["resize", "--offline"])
                .arg(d.backing("vol"))
                .arg(big.to_string()),
        )
    };
    // While tandemd runs, the backing is locked.
    let out = run(Command::new(tandemctl())
        .args(["resize", "--offline"])
        .arg(a.backing("vol"))
        .arg(big.to_string()));
    assert!(!out.status.success(), "offline resize of a backing in use");
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));

    a.stop();
    b.stop();
    assert!(offline(&a).contains("grown from"));
    a.start();
    b.start();
    // Different sizes: the handshake refuses, the replicas stay apart.
    wait_until(
        "alpha to refuse beta's size",
        Duration::from_secs(20),
        || a.log().contains("volume size mismatch") || b.log().contains("volume size mismatch"),
    );
    assert!(!peer_connected(&a));
    b.stop();
    assert!(offline(&b).contains("grown from"));
    b.start();
    wait_until(
        "the grown replicas to connect",
        Duration::from_secs(20),
        || peer_connected(&a) && peer_connected(&b),
    );
    let tail = Rng::new(8).bytes(MIB as usize);
    block_on(async {
        let mut c = a.client("vol").await;
        assert_eq!(c.export.size, big);
        let mut got = vec![0; MIB as usize];
        c.read(SIZE - MIB, &mut got).await.expect("read old");
        assert_eq!(got, old, "old data changed");
        c.read(SIZE, &mut got).await.expect("read new area");
        assert!(got.iter().all(|&x| x == 0), "new area not zero");
        c.write(big - MIB, &tail, true)
            .await
            .expect("write new area");
        c.disconnect().await.expect("disconnect");
    });
    let (da, db) = (data_area(&a, big), data_area(&b, big));
    assert!(da == db, "data areas differ after growth");
    assert_eq!(&da[(big - MIB) as usize..], &tail[..]);
    assert_eq!(&da[(SIZE - MIB) as usize..SIZE as usize], &old[..]);
}

/// R29: a replicated volume grows online, coordinated by its Primary, while
/// fio (`verify=crc32c`) writes through the Primary's export: the Secondary
/// grows first, then the Primary; the replicas stay connected; fio verifies
/// every block it wrote; new NBD connections see the new size, a write to
/// the new area lands on both backings, and both data areas are
/// byte-identical. The Secondary refuses to coordinate while the Primary
/// is connected; shrinking is refused.
#[test]
fn a_replicated_volume_grows_online_while_fio_writes() {
    use crate::repl_common::{
        connected_loopback_pair, data_area, fio, fio_cmd, peer_connected, SIZE,
    };
    let _heavy = tandem_tests::heavy_lock();
    let (_certs, a, b) = connected_loopback_pair();
    // 64 MiB to 192 MiB: the bitmap slots move on disk (all clear).
    let big = 3 * SIZE;
    let grow = |d: &Daemon, size: u64| resize(d, &size.to_string());
    let out = grow(&b, big);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("peer alpha is Primary"), "{err}");

    let mut writer = fio_cmd(&a.uri("vol"), false, &["--loops=4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fio");
    std::thread::sleep(Duration::from_millis(700));
    let out = grow(&a, big);
    assert!(
        out.status.success(),
        "online resize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("grown from"));
    assert!(
        writer.try_wait().expect("fio").is_none(),
        "fio finished before the growth did: it did not overlap"
    );
    let done = writer.wait_with_output().expect("fio");
    assert!(
        done.status.success(),
        "fio during the growth: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(!grow(&a, SIZE).status.success(), "shrinking");
    for d in [&a, &b] {
        assert_eq!(d.export_status("vol")["size"], big);
        assert_eq!(inspect(d.backing("vol"))["size"], big);
    }
    assert!(
        peer_connected(&a) && peer_connected(&b),
        "replicas stayed connected"
    );
    assert!(!a.log().contains("size mismatch") && !b.log().contains("size mismatch"));

    let tail = Rng::new(9).bytes(MIB as usize);
    block_on(async {
        let mut c = a.client("vol").await;
        assert_eq!(c.export.size, big);
        let mut got = vec![0; MIB as usize];
        c.read(SIZE, &mut got).await.expect("read new area");
        assert!(got.iter().all(|&x| x == 0), "new area not zero");
        c.write(big - MIB, &tail, true)
            .await
            .expect("write new area");
        c.disconnect().await.expect("disconnect");
    });
    fio(&a.uri("vol"), true);
    let (da, db) = (data_area(&a, big), data_area(&b, big));
    let first_diff = da.iter().zip(&db).position(|(x, y)| x != y);
    assert_eq!(first_diff, None, "data areas differ after online growth");
    assert_eq!(&da[(big - MIB) as usize..], &tail[..]);
}
