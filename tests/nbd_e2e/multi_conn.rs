//! Multi-conn (`NBD_FLAG_CAN_MULTI_CONN`): several connections to one export
//! see one consistent volume, and a FLUSH on any connection covers writes
//! completed on every other one.

use tandem_tests::{block_on, data_offset, read_file_at, Daemon, Rng};

const VOL: u64 = 256 << 20;

#[test]
fn flush_on_one_connection_covers_writes_on_another() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let backing = d.backing("vol").to_path_buf();
    let base = data_offset(&backing);
    let mut rng = Rng::new(11);
    let x = rng.bytes(1 << 20);
    let y = rng.bytes(256 << 10);
    let off_x = 100 << 20;
    let off_y = VOL - (256 << 10);

    block_on(async {
        let mut a = d.client("vol").await;
        let mut b = d.client("vol").await;
        assert!(
            a.export.flags & tandem_core::nbd::tflag::CAN_MULTI_CONN != 0,
            "export does not advertise CAN_MULTI_CONN"
        );
        // Write on A without FUA, flush on B.
        a.write(off_x, &x, false).await.expect("write on A");
        b.write(off_y, &y, false).await.expect("write on B");
        b.flush().await.expect("flush on B");
        // B reads A's data, A reads B's data.
        let mut back = vec![0u8; x.len()];
        b.read(off_x, &mut back).await.expect("read on B");
        assert!(back == x, "connection B does not see connection A's write");
        let mut back = vec![0u8; y.len()];
        a.read(off_y, &mut back).await.expect("read on A");
        assert!(back == y, "connection A does not see connection B's write");
        a.disconnect().await.expect("disconnect A");
        b.disconnect().await.expect("disconnect B");
    });
    // The flushed data is in the backing file's data area.
    assert!(
        read_file_at(&backing, base + off_x, x.len()) == x,
        "backing file at data_offset + {off_x} does not hold A's write after B's FLUSH"
    );
    assert!(
        read_file_at(&backing, base + off_y, y.len()) == y,
        "backing file at data_offset + {off_y} does not hold B's write"
    );
    // Nothing leaked into the metadata area before the data offset.
    assert!(
        read_file_at(&backing, 8192, (base - 8192) as usize)
            .iter()
            .all(|&b| b == 0),
        "NBD writes landed in the metadata area"
    );
    // Still there after the daemon is killed and restarted.
    d.kill9();
    d.start();
    block_on(async {
        let mut c = d.client("vol").await;
        let mut back = vec![0u8; x.len()];
        c.read(off_x, &mut back).await.expect("read after restart");
        assert!(back == x, "flushed data lost across kill -9 + restart");
        c.disconnect().await.expect("disconnect");
    });
    d.stop();
}

#[test]
fn concurrent_connections_write_disjoint_regions_consistently() {
    let d = Daemon::builder().volume("vol", VOL).start();
    const CONNS: u64 = 4;
    const REGION: u64 = 16 << 20;
    let results = block_on(async {
        let mut tasks = Vec::new();
        for i in 0..CONNS {
            let sock = d.socket().to_path_buf();
            tasks.push(tokio::spawn(async move {
                let mut c = tandem_daemon::nbd::client::Client::connect_unix(&sock, "vol")
                    .await
                    .expect("connect");
                let mut rng = Rng::new(100 + i);
                let mut off = i * REGION;
                while off < (i + 1) * REGION {
                    let len = (1 + rng.below(32)) * 4096;
                    let len = len.min((i + 1) * REGION - off);
                    let data = rng.bytes(len as usize);
                    c.write(off, &data, rng.below(4) == 0).await.expect("write");
                    off += len;
                }
                c.flush().await.expect("flush");
                c.disconnect().await.expect("disconnect");
            }));
        }
        let mut r = Vec::new();
        for t in tasks {
            r.push(t.await);
        }
        r
    });
    for r in results {
        r.expect("writer task panicked");
    }
    // Every region, read through one fresh connection, matches its writer's stream.
    block_on(async {
        let mut c = d.client("vol").await;
        for i in 0..CONNS {
            let mut rng = Rng::new(100 + i);
            let mut off = i * REGION;
            while off < (i + 1) * REGION {
                let len = (1 + rng.below(32)) * 4096;
                let len = len.min((i + 1) * REGION - off);
                let want = rng.bytes(len as usize);
                let _fua = rng.below(4);
                let mut back = vec![0u8; len as usize];
                c.read(off, &mut back).await.expect("read");
                assert!(
                    back == want,
                    "region of connection {i} differs at offset {off}"
                );
                off += len;
            }
        }
        c.disconnect().await.expect("disconnect");
    });
}
