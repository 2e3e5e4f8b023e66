//! The Prometheus endpoint of real tandemd processes: a replicated pair on
//! loopback (alpha primary with `[metrics] listen` in its config file, beta
//! secondary with `--metrics-listen`), known I/O through the NBD export,
//! then `/metrics` scraped over plain TCP and every counter checked against
//! what was done; a peer restart must count one reconnect. A second test
//! checks that an unbindable metrics address stops tandemd at start-up.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::repl_common::{
    cluster_certs, loopback_specs, node, peer_connected, wait_until, SIZE, UUID,
};
use tandem_tests::{block_on, heavy_lock, Daemon};

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind tcp");
    l.local_addr().expect("local_addr").port()
}

/// One HTTP exchange: sends `request` raw, returns (status line, headers, body).
fn http(port: u16, request: &[u8]) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(request).expect("send request");
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("read reply (server must close)");
    let text = String::from_utf8(out).expect("utf-8 reply");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header/body separator in {text:?}"));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Parsed exposition: (metric name, labels) → value.
struct Scrape {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
    body: String,
}

impl Scrape {
    fn get(port: u16) -> Scrape {
        let (status, headers, body) = http(
            port,
            b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
        assert!(
            headers.contains("Content-Type: application/openmetrics-text; version=1.0.0"),
            "{headers}"
        );
        assert!(
            headers.contains(&format!("Content-Length: {}", body.len())),
            "{headers}"
        );
        assert!(body.ends_with("# EOF\n"), "body does not end with # EOF");
        Scrape {
            samples: body
                .lines()
                .filter(|l| !l.starts_with('#') && !l.is_empty())
                .map(parse_sample)
                .collect(),
            body,
        }
    }

    /// The value of the one sample named `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| n == name && *l == want)
            .map(|(_, _, v)| *v)
            .collect();
        match found[..] {
            [v] => v,
            _ => panic!(
                "{} samples {name}{labels:?} in:\n{}",
                found.len(),
                self.body
            ),
        }
    }

    fn io(&self, what: &str, op: &str) -> f64 {
        self.value(what, &[("volume", "vol"), ("op", op)])
    }

    fn peer(&self, name: &str, peer: &str) -> f64 {
        self.value(name, &[("volume", "vol"), ("peer", peer)])
    }
}

/// `name{k="v",...} value` → parts (label values in these tests hold no
/// commas, quotes or braces).
fn parse_sample(line: &str) -> (String, BTreeMap<String, String>, f64) {
    let (series, value) = line
        .rsplit_once(' ')
        .unwrap_or_else(|| panic!("bad sample line {line:?}"));
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        v => v
            .parse()
            .unwrap_or_else(|e| panic!("bad value in {line:?}: {e}")),
    };
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => (n, rest.trim_end_matches('}')),
        None => (series, ""),
    };
    let labels = labels
        .split(',')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .unwrap_or_else(|| panic!("bad label in {line:?}"));
            (k.to_string(), v.trim_matches('"').to_string())
        })
        .collect();
    (name.to_string(), labels, value)
}

const OPS: [&str; 5] = ["read", "write", "flush", "trim", "write_zeroes"];

#[test]
fn metrics_endpoint_counts_io_and_replication() {
    let _heavy = heavy_lock();
    let certs = tempfile::tempdir().expect("tempdir");
    cluster_certs(certs.path());
    let (sa, sb) = loopback_specs(certs.path());
    let (ma, mb) = (free_tcp_port(), free_tcp_port());
    // alpha: [metrics] in the config file; beta: the command-line flag.
    let mut a = node(sa);
    let cfg = std::fs::read_to_string(a.dir().join("tandemd.toml")).expect("alpha config");
    a.set_config(&format!("[metrics]\nlisten = \"127.0.0.1:{ma}\"\n{cfg}"));
    let mut b = node(sb);
    b.add_args(&["--metrics-listen", &format!("127.0.0.1:{mb}")]);
    a.start();
    b.start();
    wait_until("alpha and beta to connect", Duration::from_secs(20), || {
        peer_connected(&a) && peer_connected(&b)
    });

    // Before any I/O: every series exists and is zero.
    let s0 = Scrape::get(ma);
    for op in OPS {
        for m in [
            "tandem_io_requests_total",
            "tandem_io_bytes_total",
            "tandem_io_errors_total",
            "tandem_io_latency_seconds_count",
        ] {
            assert_eq!(s0.io(m, op), 0.0, "{m} {op} before any I/O");
        }
    }
    assert_eq!(
        s0.value("tandem_volume_info", &[("volume", "vol"), ("uuid", UUID)]),
        1.0
    );

    // Known I/O through alpha's export.
    const WRITES: u64 = 40;
    const READS: u64 = 12;
    const LEN: u64 = 64 << 10;
    const TRIM: u32 = 1 << 20;
    block_on(async {
        let mut c = a.client("vol").await;
        let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
        for i in 0..WRITES {
            c.write(i * LEN, &data, i % 10 == 0).await.expect("write");
        }
        let mut back = vec![0u8; LEN as usize];
        for i in 0..READS {
            c.read(i * LEN, &mut back).await.expect("read");
            assert_eq!(back, data, "read {i} returned other data");
        }
        c.flush().await.expect("flush");
        c.trim(SIZE - u64::from(TRIM), TRIM).await.expect("trim");
        c.disconnect().await.expect("disconnect");
    });
    // A write on the secondary is refused (EPERM): an error on beta.
    block_on(async {
        let mut c = b.client("vol").await;
        assert!(
            c.write(0, &[1u8; 4096], false).await.is_err(),
            "secondary accepted a write"
        );
    });

    let s = Scrape::get(ma);
    assert_eq!(s.io("tandem_io_requests_total", "write"), WRITES as f64);
    assert_eq!(
        s.io("tandem_io_bytes_total", "write"),
        (WRITES * LEN) as f64
    );
    assert_eq!(s.io("tandem_io_requests_total", "read"), READS as f64);
    assert_eq!(s.io("tandem_io_bytes_total", "read"), (READS * LEN) as f64);
    assert_eq!(s.io("tandem_io_requests_total", "flush"), 1.0);
    assert_eq!(s.io("tandem_io_requests_total", "trim"), 1.0);
    assert_eq!(s.io("tandem_io_bytes_total", "trim"), f64::from(TRIM));
    assert_eq!(s.io("tandem_io_requests_total", "write_zeroes"), 0.0);
    for op in OPS {
        assert_eq!(s.io("tandem_io_errors_total", op), 0.0, "errors {op}");
        // The histogram saw exactly the requests counted, each with a
        // positive latency, and its buckets are cumulative.
        let n = s.io("tandem_io_requests_total", op);
        assert_eq!(
            s.io("tandem_io_latency_seconds_count", op),
            n,
            "latency count {op}"
        );
        let inf = s.value(
            "tandem_io_latency_seconds_bucket",
            &[("volume", "vol"), ("op", op), ("le", "+Inf")],
        );
        assert_eq!(inf, n, "+Inf bucket {op}");
        let sum = s.io("tandem_io_latency_seconds_sum", op);
        assert!(
            (n == 0.0 && sum == 0.0) || (sum > 0.0 && sum < 60.0 * n),
            "latency sum {op}: {sum}"
        );
        let buckets: Vec<f64> = s
            .samples
            .iter()
            .filter(|(name, l, _)| {
                name == "tandem_io_latency_seconds_bucket" && l["volume"] == "vol" && l["op"] == op
            })
            .map(|(_, _, v)| *v)
            .collect();
        assert_eq!(buckets.len(), 21, "20 buckets + +Inf for {op}");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "buckets not cumulative: {buckets:?}"
        );
    }
    // The pair is healthy: connected, RTT measured, nothing queued or lost.
    assert_eq!(s.peer("tandem_peer_connected", "beta"), 1.0);
    let rtt = s.peer("tandem_peer_rtt_seconds", "beta");
    assert!(rtt > 0.0 && rtt < 1.0, "loopback rtt {rtt}");
    assert_eq!(s.peer("tandem_peer_reconnects_total", "beta"), 0.0);
    assert_eq!(s.peer("tandem_peer_checksum_errors_total", "beta"), 0.0);
    assert_eq!(s.peer("tandem_peer_bad_frames_total", "beta"), 0.0);
    assert_eq!(s.peer("tandem_peer_outdated", "beta"), 0.0);
    // Protocol C: every frame was written before its write completed, and
    // nothing stays queued. (A frame sent after the last reply — the flush
    // of the client's disconnect, a keepalive — may be on its way for a
    // moment on a busy machine, hence the wait.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let sq = loop {
        let sq = Scrape::get(ma);
        if sq.peer("tandem_replication_backlog_frames", "beta") == 0.0 || Instant::now() >= deadline
        {
            break sq;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(sq.peer("tandem_replication_backlog_frames", "beta"), 0.0);
    assert_eq!(sq.peer("tandem_replication_backlog_bytes", "beta"), 0.0);
    let vol = [("volume", "vol")];
    assert_eq!(s.value("tandem_replication_requests_in_flight", &vol), 0.0);
    assert_eq!(s.value("tandem_replication_primary", &vol), 1.0);
    assert_eq!(s.value("tandem_io_invalid_requests_total", &vol), 0.0);

    let sb = Scrape::get(mb);
    assert_eq!(sb.value("tandem_replication_primary", &vol), 0.0);
    assert_eq!(sb.peer("tandem_peer_connected", "alpha"), 1.0);
    assert_eq!(sb.io("tandem_io_requests_total", "write"), 1.0);
    assert_eq!(sb.io("tandem_io_errors_total", "write"), 1.0);
    assert_eq!(sb.io("tandem_io_bytes_total", "write"), 0.0);
    assert_eq!(sb.io("tandem_io_latency_seconds_count", "write"), 1.0);

    // Anything but GET /metrics is refused.
    let (st, _, _) = http(ma, b"GET / HTTP/1.1\r\n\r\n");
    assert_eq!(st, "HTTP/1.1 404 Not Found");
    let (st, _, _) = http(ma, b"BREW /metrics HTCPCP/1.0\r\n\r\n");
    assert_eq!(st, "HTTP/1.1 400 Bad Request");
    let (st, _, _) = http(ma, b"DELETE /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(st, "HTTP/1.1 405 Method Not Allowed");

    // Restart beta: alpha sees the link drop and come back as one reconnect.
    // (alpha may notice the old connection is gone only at its idle
    // timeout, so wait for the counter itself; overshooting 1 fails.)
    b.restart();
    wait_until(
        "alpha to count one reconnect",
        Duration::from_secs(30),
        || {
            let n = Scrape::get(ma).peer("tandem_peer_reconnects_total", "beta");
            assert!(n <= 1.0, "{n} reconnects counted for one peer restart");
            n == 1.0
        },
    );
    wait_until("beta to reconnect", Duration::from_secs(30), || {
        peer_connected(&a) && peer_connected(&b)
    });
    let s = Scrape::get(ma);
    assert_eq!(s.peer("tandem_peer_reconnects_total", "beta"), 1.0);
    assert_eq!(s.peer("tandem_peer_connected", "beta"), 1.0);
    let sb = Scrape::get(mb);
    assert_eq!(
        sb.peer("tandem_peer_reconnects_total", "alpha"),
        0.0,
        "fresh process"
    );
    a.stop();
    b.stop();
}

#[test]
fn metrics_listen_that_cannot_bind_stops_startup() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let d = Daemon::builder()
        .volume("v", 8 << 20)
        .arg("--metrics-listen")
        .arg(&addr)
        .prepare();
    let err = d.must_refuse();
    assert!(
        err.contains(&format!(
            "[metrics].listen {addr}: binding the metrics listener"
        )),
        "{err}"
    );
    assert!(err.contains("in use"), "{err}");
    let err = Daemon::builder()
        .volume("v", 8 << 20)
        .arg("--metrics-listen")
        .arg("localhost:80")
        .prepare()
        .must_refuse();
    assert!(err.contains("--metrics-listen"), "{err}");
}
