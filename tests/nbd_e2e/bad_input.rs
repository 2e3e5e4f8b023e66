//! Hostile and broken clients: every malformed request gets the error the
//! protocol prescribes (or the connection is closed when the stream is out of
//! step), the daemon logs and counts it, and a healthy client doing verified
//! I/O on the same export at the same time never notices.

use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tandem_core::nbd::{
    cmdflag, opt, rep, Command as Cmd, CLIENT_FLAG_NO_ZEROES, IHAVEOPT, REQUEST_MAGIC,
};
use tandem_tests::{block_on, Daemon, RawConn, Rng};

const VOL: u64 = 256 << 20;
/// The healthy client works in the last 16 MiB; the probes use the first MiBs.
const HEALTHY_BASE: u64 = VOL - (16 << 20);
const MAX: u32 = 32 << 20;

const READ: u16 = 0;
const WRITE: u16 = 1;
const TRIM: u16 = 4;
const WRITE_ZEROES: u16 = 6;

const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

/// (description, command, flags, offset, length, payload, expected NBD error).
type Case<'a> = (&'a str, u16, u16, u64, u32, &'a [u8], u32);

const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Background client: random writes (some FUA), read-back verification,
/// periodic flushes, until told to stop. Returns verified operations.
fn healthy_client(
    d: &Daemon,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<u64, String>> {
    let sock = d.socket().to_path_buf();
    std::thread::spawn(move || {
        block_on(async move {
            let mut c = tandem_daemon::nbd::client::Client::connect_unix(&sock, "vol")
                .await
                .map_err(|e| format!("connect: {e:#}"))?;
            let mut rng = Rng::new(1234);
            let mut ops = 0u64;
            while !stop.load(Ordering::Relaxed) || ops < 20 {
                let len = (1 + rng.below(64) as usize) * 4096;
                let off = HEALTHY_BASE + rng.below((16 << 20) / 4096 - 64) * 4096;
                let data = rng.bytes(len);
                c.write(off, &data, ops % 3 == 0)
                    .await
                    .map_err(|e| format!("op {ops}: write: {e:#}"))?;
                let mut back = vec![0u8; len];
                c.read(off, &mut back)
                    .await
                    .map_err(|e| format!("op {ops}: read: {e:#}"))?;
                if back != data {
                    return Err(format!("op {ops}: read-back at {off} (len {len}) differs"));
                }
                if ops % 8 == 0 {
                    c.flush()
                        .await
                        .map_err(|e| format!("op {ops}: flush: {e:#}"))?;
                }
                ops += 1;
            }
            c.disconnect()
                .await
                .map_err(|e| format!("disconnect: {e:#}"))?;
            Ok(ops)
        })
    })
}

/// Connects a raw client in transmission on export "vol".
fn transmission(d: &Daemon) -> RawConn {
    let mut c = d.raw();
    let (size, _) = c.handshake("vol");
    assert_eq!(size, VOL);
    c
}

#[test]
fn bad_requests_and_handshakes_are_refused_while_others_keep_working() {
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let stop = Arc::new(AtomicBool::new(false));
    let healthy = healthy_client(&d, stop.clone());
    let mut rng = Rng::new(5);
    let mut invalid_sent = 0u64;

    // ---- In-band errors: the reply carries the error, the connection lives on.
    let mut c = transmission(&d);
    let ok_data = rng.bytes(8192);
    c.write_read_check(0, &ok_data);
    let big = vec![0x5au8; (33 << 20) as usize];
    let cases: Vec<Case> = vec![
        ("READ misaligned offset", READ, 0, 1, 512, &[], EINVAL),
        ("READ misaligned length", READ, 0, 0, 100, &[], EINVAL),
        (
            "WRITE misaligned offset",
            WRITE,
            0,
            100,
            512,
            &ok_data[..512],
            EINVAL,
        ),
        (
            "WRITE misaligned length",
            WRITE,
            0,
            0,
            100,
            &ok_data[..100],
            EINVAL,
        ),
        ("READ zero length", READ, 0, 0, 0, &[], EINVAL),
        ("WRITE zero length", WRITE, 0, 0, 0, &[], EINVAL),
        ("TRIM zero length", TRIM, 0, 0, 0, &[], EINVAL),
        ("READ past end", READ, 0, VOL, 4096, &[], EINVAL),
        (
            "READ straddling end",
            READ,
            0,
            VOL - 4096,
            8192,
            &[],
            EINVAL,
        ),
        (
            "READ offset near u64::MAX",
            READ,
            0,
            u64::MAX - 4095,
            4096,
            &[],
            EINVAL,
        ),
        (
            "WRITE past end",
            WRITE,
            0,
            VOL,
            4096,
            &ok_data[..4096],
            ENOSPC,
        ),
        (
            "WRITE straddling end",
            WRITE,
            0,
            VOL - 512,
            1024,
            &ok_data[..1024],
            ENOSPC,
        ),
        ("TRIM past end", TRIM, 0, VOL, 4096, &[], ENOSPC),
        (
            "TRIM offset overflow",
            TRIM,
            0,
            u64::MAX - 511,
            512,
            &[],
            ENOSPC,
        ),
        (
            "WRITE_ZEROES straddling end",
            WRITE_ZEROES,
            0,
            VOL - 512,
            1024,
            &[],
            ENOSPC,
        ),
        (
            "READ of 32 MiB + 4 KiB",
            READ,
            0,
            0,
            MAX + 4096,
            &[],
            EOVERFLOW,
        ),
        ("WRITE of 33 MiB", WRITE, 0, 0, 33 << 20, &big, EOVERFLOW),
        ("unknown command 99", 99, 0, 0, 4096, &[], EINVAL),
        (
            "READ with unknown flag 0x8000",
            READ,
            0x8000,
            0,
            4096,
            &[],
            EINVAL,
        ),
        (
            "WRITE with NO_HOLE (write-zeroes only)",
            WRITE,
            cmdflag::NO_HOLE,
            0,
            512,
            &ok_data[..512],
            EINVAL,
        ),
    ];
    for (i, (what, cmd, flags, off, len, payload, want)) in cases.into_iter().enumerate() {
        let (got, data) = c.call(cmd, flags, off, len, payload);
        assert_eq!(got, want, "{what}: expected NBD error {want}, got {got}");
        assert!(data.is_empty(), "{what}: an error reply carried data");
        invalid_sent += 1;
        // The same connection is still in step and serves valid requests.
        let probe = rng.bytes(4096);
        c.write_read_check(((i as u64) + 1) * (1 << 20), &probe);
    }
    // The refused writes did not touch the data: offset 0 still holds ok_data.
    let (e, back) = c.call(READ, 0, 0, 8192, &[]);
    assert_eq!(e, 0);
    assert!(back == ok_data, "a refused WRITE modified offset 0");
    // Valid edge cases: the very last block, the maximum size, WRITE_ZEROES(NO_HOLE).
    c.write_read_check(VOL - 512, &ok_data[..512]);
    let max = rng.bytes(MAX as usize);
    c.write_read_check(64 << 20, &max);
    let (e, _) = c.call(
        WRITE_ZEROES,
        cmdflag::NO_HOLE | cmdflag::FUA,
        64 << 20,
        1 << 20,
        &[],
    );
    assert_eq!(e, 0, "WRITE_ZEROES NO_HOLE|FUA");
    let (e, z) = c.call(READ, 0, 64 << 20, 1 << 20, &[]);
    assert_eq!(e, 0);
    assert!(
        z.iter().all(|&b| b == 0),
        "WRITE_ZEROES range does not read back as zeroes"
    );

    // ---- Same errors through structured replies (Tandem's own client).
    block_on(async {
        let mut s = d.client("vol").await;
        assert!(s.export.structured, "structured replies negotiated");
        let e = s
            .raw(Cmd::Read, 0, VOL, 4096, &[])
            .await
            .expect("read past end");
        assert_eq!(e, EINVAL, "structured READ past end");
        let e = s
            .raw(Cmd::Read, 0, 0, MAX + 512, &[])
            .await
            .expect("read > max");
        assert_eq!(e, EOVERFLOW, "structured READ > 32 MiB");
        let e = s
            .raw(Cmd::Write, 0, VOL, 4096, &ok_data[..4096])
            .await
            .expect("write past end");
        assert_eq!(e, ENOSPC, "structured WRITE past end");
        let e = s.raw(Cmd::Unknown(99), 0, 0, 0, &[]).await.expect("cmd 99");
        assert_eq!(e, EINVAL, "structured unknown command");
        invalid_sent += 4;
        let mut b = vec![0u8; 8192];
        s.read(0, &mut b).await.expect("read after errors");
        assert!(b == ok_data, "structured read after errors");
        s.disconnect().await.expect("disconnect");
    });

    // ---- Out-of-step streams: the connection is closed (and logged).
    // Garbage request magic.
    let mut g = transmission(&d);
    let mut junk = vec![0u8; 28];
    junk[..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    g.send(&junk);
    assert!(
        g.closed_within(CLOSE_WAIT),
        "garbage request magic: connection not closed"
    );

    // Truncated request header, then the client closes its side.
    let mut t = transmission(&d);
    t.send(&REQUEST_MAGIC.to_be_bytes());
    t.send(&[0u8; 6]);
    t.s.shutdown(Shutdown::Write).expect("shutdown");
    assert!(
        t.closed_within(CLOSE_WAIT),
        "truncated request: connection not closed"
    );

    // WRITE whose payload never fully arrives.
    let mut t = transmission(&d);
    t.request(WRITE, 0, 0, 1 << 20, &ok_data[..1000]);
    t.s.shutdown(Shutdown::Write).expect("shutdown");
    assert!(
        t.closed_within(CLOSE_WAIT),
        "truncated WRITE payload: connection not closed"
    );

    // Garbage instead of client flags.
    let mut h = d.raw();
    h.send(b"GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE!");
    assert!(
        h.closed_within(CLOSE_WAIT),
        "garbage handshake: connection not closed"
    );

    // Client flags without fixed newstyle (old newstyle client).
    let mut h = d.raw();
    h.client_flags(CLIENT_FLAG_NO_ZEROES);
    assert!(
        h.closed_within(CLOSE_WAIT),
        "client without fixed newstyle: connection not closed"
    );

    // Option header with a bad magic.
    let mut h = d.raw();
    h.fixed_newstyle();
    h.send(&[0x42; 16]);
    assert!(
        h.closed_within(CLOSE_WAIT),
        "bad option magic: connection not closed"
    );

    // Option announcing ~4 GiB of data: refused without reading (or allocating) it.
    let mut h = d.raw();
    h.fixed_newstyle();
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hdr.extend_from_slice(&opt::GO.to_be_bytes());
    hdr.extend_from_slice(&0xffff_fff0u32.to_be_bytes());
    h.send(&hdr);
    assert!(
        h.closed_within(CLOSE_WAIT),
        "huge option length: connection not closed"
    );

    // EXPORT_NAME for an unknown export: no error reply exists, so close.
    let mut h = d.raw();
    h.fixed_newstyle();
    h.send_option(opt::EXPORT_NAME, b"nosuch");
    assert!(
        h.closed_within(CLOSE_WAIT),
        "EXPORT_NAME unknown: connection not closed"
    );

    // Abrupt disconnects at every handshake stage.
    for stage in 0..3 {
        let mut h = d.raw();
        if stage >= 1 {
            h.fixed_newstyle();
        }
        if stage >= 2 {
            h.send(&IHAVEOPT.to_be_bytes());
        }
        drop(h);
    }

    // ---- Negotiation errors that are answered and let negotiation continue.
    let mut n = d.raw();
    n.fixed_newstyle();
    let r = n.go("nosuch");
    assert_eq!(r.len(), 1, "OPT_GO unknown export: {r:?}");
    assert_eq!(r[0].reply, rep::ERR_UNKNOWN, "OPT_GO unknown export: {r:?}");
    let r = n.option(99, &[]);
    assert_eq!(
        r.last().unwrap().reply,
        rep::ERR_UNSUP,
        "unknown option 99: {r:?}"
    );
    let r = n.option(opt::GO, &[0, 0, 0, 9, b'x']); // name length beyond the data
    assert_eq!(
        r.last().unwrap().reply,
        rep::ERR_INVALID,
        "malformed OPT_GO: {r:?}"
    );
    let r = n.option(opt::LIST, &[]);
    let servers = r.iter().filter(|x| x.reply == rep::SERVER).count();
    assert_eq!(
        (servers, r.last().unwrap().reply),
        (1, rep::ACK),
        "OPT_LIST: {r:?}"
    );
    let r = n.go("vol");
    assert_eq!(
        r.last().unwrap().reply,
        rep::ACK,
        "OPT_GO after errors: {r:?}"
    );
    n.write_read_check(2 << 20, &rng.bytes(4096));

    // OPT_ABORT is acknowledged, then the server closes.
    let mut a = d.raw();
    a.fixed_newstyle();
    let r = a.option(opt::ABORT, &[]);
    assert_eq!(r.last().unwrap().reply, rep::ACK, "OPT_ABORT: {r:?}");
    assert!(
        a.closed_within(CLOSE_WAIT),
        "OPT_ABORT: connection not closed"
    );

    // ---- The daemon survived all of it and the healthy client never failed.
    stop.store(true, Ordering::Relaxed);
    let ops = healthy
        .join()
        .expect("healthy client thread panicked")
        .unwrap_or_else(|e| panic!("healthy client failed while bad clients were served: {e}"));
    assert!(
        ops >= 20,
        "healthy client made only {ops} verified operations"
    );
    d.assert_running();
    let st = d.export_status("vol");
    let invalid = st["invalid"].as_u64().expect("status invalid counter");
    assert!(
        invalid >= invalid_sent,
        "invalid-request counter {invalid} < {invalid_sent} invalid requests sent: {st}"
    );
    assert_eq!(st["io_errors"], 0, "no storage errors expected: {st}");
    let log = d.log();
    assert!(
        log.contains("request magic"),
        "garbage request magic not logged:\n{log}"
    );
    assert!(
        log.contains("client flags"),
        "bad client flags not logged:\n{log}"
    );
    assert!(
        log.contains("16384"),
        "oversized option not logged with its limit:\n{log}"
    );
    assert!(!log.contains("panicked"), "tandemd logged a panic:\n{log}");
    // A fresh connection still works, and the daemon shuts down cleanly.
    let mut f = transmission(&d);
    f.write_read_check(3 << 20, &rng.bytes(65536));
    drop(f);
    drop(n);
    d.stop();
}

/// The NBD spec (proto.md, "Command flags"): `NBD_CMD_FLAG_FUA` "is valid for
/// all commands, provided `NBD_FLAG_SEND_FUA` has been negotiated, in which
/// case the server MUST accept all commands with this bit set (even by
/// ignoring the bit)", noting that existing clients set it on other commands
/// (older QEMU sets it on FLUSH).
#[test]
fn fua_flag_is_accepted_on_every_command() {
    const FLUSH: u16 = 3;
    let d = Daemon::builder().volume("vol", VOL).start();
    let mut c = transmission(&d);
    let data = Rng::new(8).bytes(4096);
    let (e, _) = c.call(WRITE, cmdflag::FUA, 0, 4096, &data);
    assert_eq!(e, 0, "WRITE+FUA");
    let (e, _) = c.call(TRIM, cmdflag::FUA, 1 << 20, 4096, &[]);
    assert_eq!(e, 0, "TRIM+FUA");
    let (e, back) = c.call(READ, cmdflag::FUA, 0, 4096, &[]);
    assert_eq!(
        e, 0,
        "READ+FUA must be accepted (spec: server MUST accept FUA on all commands)"
    );
    assert!(back == data, "READ+FUA data");
    let (e, _) = c.call(FLUSH, cmdflag::FUA, 0, 0, &[]);
    assert_eq!(
        e, 0,
        "FLUSH+FUA must be accepted (spec: server MUST accept FUA on all commands)"
    );
}

/// A volume formatted with 4096-byte blocks advertises and enforces 4096.
#[test]
fn four_k_volume_enforces_its_block_size() {
    let d = Daemon::builder()
        .volume_with("vol", VOL, &["--block-size", "4096"])
        .start();
    let mut c = d.raw();
    c.fixed_newstyle();
    let replies = c.go("vol");
    let bs = replies
        .iter()
        .find(|r| r.reply == rep::INFO && r.data.len() == 14 && r.data[..2] == [0, 3])
        .expect("NBD_INFO_BLOCK_SIZE sent");
    let min = u32::from_be_bytes(bs.data[2..6].try_into().unwrap());
    assert_eq!(min, 4096, "minimum block size of a 4k volume");
    let data = Rng::new(4).bytes(8192);
    assert_eq!(
        c.call(READ, 0, 512, 4096, &[]).0,
        EINVAL,
        "READ at 512 on a 4k volume"
    );
    assert_eq!(
        c.call(READ, 0, 0, 512, &[]).0,
        EINVAL,
        "READ of 512 bytes on a 4k volume"
    );
    assert_eq!(
        c.call(WRITE, 0, 512, 4096, &data[..4096]).0,
        EINVAL,
        "WRITE at 512 on a 4k volume"
    );
    assert_eq!(
        c.call(TRIM, 0, 0, 2048, &[]).0,
        EINVAL,
        "TRIM of 2048 bytes on a 4k volume"
    );
    c.write_read_check(4096, &data);
    c.write_read_check(VOL - 4096, &data[..4096]);
}
