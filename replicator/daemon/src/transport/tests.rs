//! Transport tests: real quinn endpoints on 127.0.0.1 with certificates made
//! by [`super::certs`].

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::certs::{create_ca, issue_node_cert, CaFiles, NodeCert};
use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn ca(name: &str) -> CaFiles {
    create_ca(name, 365 * DAY).unwrap()
}

fn valid(ca: &CaFiles, node: &str) -> NodeCert {
    let now = SystemTime::now();
    issue_node_cert(ca, node, now - HOUR, now + 90 * DAY).unwrap()
}

fn expired(ca: &CaFiles, node: &str) -> NodeCert {
    let now = SystemTime::now();
    issue_node_cert(ca, node, now - 10 * DAY, now - DAY).unwrap()
}

/// An identity presenting `cert` and trusting the CA certificates `trust`.
fn identity(cert: &NodeCert, trust: &[&CaFiles]) -> TlsIdentity {
    let roots: String = trust.iter().map(|c| c.cert_pem.as_str()).collect();
    TlsIdentity::from_pem(&cert.cert_pem, &cert.key_pem, &roots).unwrap()
}

fn bind(id: &TlsIdentity, allowed: &[&str]) -> PeerEndpoint {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    PeerEndpoint::bind(addr, id, allowed.iter().map(|s| s.to_string()).collect()).unwrap()
}

/// Log capture for one test (current-thread runtime: every task runs on the
/// test's thread, so a thread-local default subscriber sees them all).
#[derive(Clone, Default)]
struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Logs {
        self.clone()
    }
}

impl Logs {
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let sub = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new("tandem_daemon=debug"))
            .finish();
        (logs, tracing::subscriber::set_default(sub))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// WARN lines containing every one of `needles`.
    fn warn_with(&self, needles: &[&str]) -> bool {
        self.text()
            .lines()
            .any(|l| l.contains("WARN") && needles.iter().all(|n| l.contains(n)))
    }
}

/// Connects `client` to `server` expecting `peer`, asserts a refusal of
/// `kind` (by the peer or not), that nothing reached `server.accept()`, that
/// both sides logged a warning naming the reason, and that a warning holds
/// every word of `warn`.
async fn assert_refused(
    logs: &Logs,
    server: &PeerEndpoint,
    client: &PeerEndpoint,
    peer: &str,
    kind: RefusalKind,
    by_peer: bool,
    warn: &[&str],
) -> Refusal {
    let addr = server.local_addr().unwrap();
    let err = client.connect(addr, peer).await.unwrap_err();
    let refusal = match &err {
        TransportError::Refused { refusal, .. } => refusal.clone(),
        other => panic!("expected a refusal, got: {other}"),
    };
    assert_eq!(refusal.kind, kind, "{err}");
    assert_eq!(refusal.by_peer, by_peer, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(peer) && msg.contains(&addr.to_string()),
        "{msg}"
    );
    assert!(msg.contains(&kind.to_string()), "{msg}");
    // Nothing was delivered to the server's application.
    let accepted = tokio::time::timeout(Duration::from_millis(300), server.accept()).await;
    assert!(accepted.is_err(), "a refused connection reached accept()");
    // Both sides said why.
    let reason = kind.to_string();
    let client_side = logs.warn_with(&["peer connection refused", &reason]);
    let server_side = logs.warn_with(&["refused", &addr.ip().to_string(), &reason])
        || logs.warn_with(&["refused our certificate"]);
    eprintln!("--- logs ---\n{}", logs.text());
    assert!(client_side, "no client-side warning:\n{}", logs.text());
    assert!(server_side, "no server-side warning:\n{}", logs.text());
    assert!(
        logs.warn_with(warn),
        "no warning with {warn:?}:\n{}",
        logs.text()
    );
    eprintln!("{refusal}");
    refusal
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_large_and_small_streams() {
    let ca = ca("cluster");
    let a = bind(&identity(&valid(&ca, "node-a"), &[&ca]), &["node-b"]);
    let b = bind(&identity(&valid(&ca, "node-b"), &[&ca]), &["node-a"]);
    assert_eq!(a.node_name(), "node-a");
    let a_addr = a.local_addr().unwrap();

    let (client, (name, server)) = tokio::join!(
        async { b.connect(a_addr, "node-a").await.unwrap() },
        async { a.accept().await.unwrap() }
    );
    assert_eq!(name, "node-b");

    // Server: a task per stream; the first byte says which kind.
    let server_task = tokio::spawn(async move {
        let mut handlers = Vec::new();
        for _ in 0..2 {
            let (mut send, mut recv) = server.accept_bi().await.unwrap();
            handlers.push(tokio::spawn(async move {
                let mut kind = [0u8; 1];
                recv.read_exact(&mut kind).await.unwrap();
                match kind[0] {
                    b'L' => {
                        let data = recv.read_to_end(33 << 20).await.unwrap();
                        let mut reply = (data.len() as u64).to_le_bytes().to_vec();
                        reply.extend_from_slice(&crc32fast::hash(&data).to_le_bytes());
                        send.write_all(&reply).await.unwrap();
                        send.finish().unwrap();
                    }
                    b'S' => {
                        let mut msg = [0u8; 1024];
                        while recv.read_exact(&mut msg).await.is_ok() {
                            send.write_all(&msg).await.unwrap();
                        }
                        send.finish().unwrap();
                    }
                    k => panic!("unknown stream kind {k}"),
                }
            }));
        }
        for h in handlers {
            h.await.unwrap();
        }
        server
    });

    let big: Vec<u8> = (0..32u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let big_crc = crc32fast::hash(&big);
    let start = Instant::now();
    let large = {
        let client = client.clone();
        tokio::spawn(async move {
            let (mut send, mut recv) = client.open_bi().await.unwrap();
            send.write_all(b"L").await.unwrap();
            send.write_all(&big).await.unwrap();
            send.finish().unwrap();
            let reply = recv.read_to_end(64).await.unwrap();
            (reply, Instant::now())
        })
    };
    // Let the large write get going, then run small request/response
    // round trips on another stream.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (mut send, mut recv) = client.open_bi().await.unwrap();
    send.write_all(b"S").await.unwrap();
    let mut slowest = Duration::ZERO;
    let mut first_done = None;
    for i in 0..64u32 {
        let msg: Vec<u8> = (0..1024u32).map(|j| (i * 7 + j) as u8).collect();
        let t = Instant::now();
        send.write_all(&msg).await.unwrap();
        let mut echo = vec![0u8; 1024];
        recv.read_exact(&mut echo).await.unwrap();
        slowest = slowest.max(t.elapsed());
        first_done.get_or_insert_with(Instant::now);
        assert_eq!(echo, msg, "small message {i} corrupted");
    }
    send.finish().unwrap();
    let small_done = Instant::now();
    assert!(recv.read_to_end(16).await.unwrap().is_empty());

    let (reply, large_done) = large.await.unwrap();
    assert_eq!(reply.len(), 12);
    assert_eq!(u64::from_le_bytes(reply[..8].try_into().unwrap()), 32 << 20);
    assert_eq!(u32::from_le_bytes(reply[8..].try_into().unwrap()), big_crc);
    let large_took = large_done - start;
    eprintln!(
        "32 MiB in {:?}; 64 small round trips done after {:?}, slowest {:?}",
        large_took,
        small_done - start,
        slowest
    );
    // The small messages were not queued behind the large write: when the
    // large transfer takes long enough to tell, the first round trip
    // finishes long before it.
    if large_took > Duration::from_millis(300) {
        let first = first_done.unwrap();
        assert!(
            first < large_done,
            "the first small message waited for the 32 MiB write"
        );
    }
    let server = server_task.await.unwrap();
    client.close(CLOSE_SHUTDOWN, b"done");
    drop(server);
    a.close();
    b.close();
}

#[tokio::test]
async fn refuses_client_from_foreign_ca() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let foreign = ca("foreign");
    let server = bind(
        &identity(&valid(&cluster, "node-a"), &[&cluster]),
        &["node-b"],
    );
    // The client trusts the cluster CA (so it accepts the server) but
    // presents a certificate from another CA.
    let client = bind(
        &identity(&valid(&foreign, "node-b"), &[&cluster, &foreign]),
        &[],
    );
    assert_refused(
        &logs,
        &server,
        &client,
        "node-a",
        RefusalKind::UnknownIssuer,
        true,
        &["refused peer at", "unknown issuer"],
    )
    .await;
}

#[tokio::test]
async fn refuses_server_from_foreign_ca() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let foreign = ca("foreign");
    let server = bind(
        &identity(&valid(&foreign, "node-a"), &[&foreign, &cluster]),
        &["node-b"],
    );
    let client = bind(&identity(&valid(&cluster, "node-b"), &[&cluster]), &[]);
    assert_refused(
        &logs,
        &server,
        &client,
        "node-a",
        RefusalKind::UnknownIssuer,
        false,
        &["refused our certificate", "unknown issuer"],
    )
    .await;
}

#[tokio::test]
async fn refuses_expired_client_cert() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let server = bind(
        &identity(&valid(&cluster, "node-a"), &[&cluster]),
        &["node-b"],
    );
    let client = bind(&identity(&expired(&cluster, "node-b"), &[&cluster]), &[]);
    assert_refused(
        &logs,
        &server,
        &client,
        "node-a",
        RefusalKind::Expired,
        true,
        &["refused peer at", "expired"],
    )
    .await;
}

#[tokio::test]
async fn refuses_expired_server_cert() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let server = bind(
        &identity(&expired(&cluster, "node-a"), &[&cluster]),
        &["node-b"],
    );
    let client = bind(&identity(&valid(&cluster, "node-b"), &[&cluster]), &[]);
    assert_refused(
        &logs,
        &server,
        &client,
        "node-a",
        RefusalKind::Expired,
        false,
        &["refused our certificate", "expired"],
    )
    .await;
}

#[tokio::test]
async fn refuses_client_not_in_allowed_peers() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let server = bind(
        &identity(&valid(&cluster, "node-a"), &[&cluster]),
        &["node-b"],
    );
    let client = bind(&identity(&valid(&cluster, "node-c"), &[&cluster]), &[]);
    let r = assert_refused(
        &logs,
        &server,
        &client,
        "node-a",
        RefusalKind::UnexpectedName,
        true,
        &["refused peer at", "unexpected node name", "node-c"],
    )
    .await;
    assert!(r.detail.contains("node-c"), "{r}");
}

#[tokio::test]
async fn refuses_server_with_wrong_name() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let server = bind(
        &identity(&valid(&cluster, "node-a"), &[&cluster]),
        &["node-b"],
    );
    let client = bind(&identity(&valid(&cluster, "node-b"), &[&cluster]), &[]);
    // node-b expects to reach node-z at the address where node-a listens.
    let r = assert_refused(
        &logs,
        &server,
        &client,
        "node-z",
        RefusalKind::UnexpectedName,
        false,
        &["refused our certificate"],
    )
    .await;
    assert!(r.detail.contains("node-z"), "{r}");
}

#[tokio::test]
async fn backoff_retries_until_shutdown_and_then_connects() {
    let (logs, _g) = Logs::capture();
    let cluster = ca("cluster");
    let server = bind(
        &identity(&valid(&cluster, "node-a"), &[&cluster]),
        &["node-b"],
    );
    let client = bind(&identity(&valid(&cluster, "node-b"), &[&cluster]), &[]);
    let addr = server.local_addr().unwrap();

    // Refused every time (wrong expected name): retries with 50, 100, 200 ms
    // ... until shutdown.
    let start = Instant::now();
    let err = client
        .connect_with_backoff(
            addr,
            "node-z",
            Duration::from_millis(50),
            Duration::from_millis(200),
            tokio::time::sleep(Duration::from_millis(700)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TransportError::Shutdown), "{err}");
    assert!(start.elapsed() < Duration::from_secs(3));
    let text = logs.text();
    assert!(text.contains("attempt=3"), "{text}");

    // Invalid peer names are not retried.
    let err = client
        .connect_with_backoff(
            addr,
            "Bad_Name",
            Duration::from_millis(10),
            Duration::from_millis(10),
            std::future::pending(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::InvalidPeerName { .. }),
        "{err}"
    );

    let conn = client
        .connect_with_backoff(
            addr,
            "node-a",
            Duration::from_millis(100),
            Duration::from_secs(5),
            std::future::pending(),
        )
        .await
        .unwrap();
    let (name, _server_conn) = server.accept().await.unwrap();
    assert_eq!(name, "node-b");
    assert!(logs
        .text()
        .lines()
        .any(|l| l.contains("INFO") && l.contains("connected to peer") && l.contains("node-a")));
    conn.close(CLOSE_SHUTDOWN, b"");
}

#[tokio::test]
async fn bind_rejects_bad_allowed_peer_names() {
    let cluster = ca("cluster");
    let id = identity(&valid(&cluster, "node-a"), &[&cluster]);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let err = PeerEndpoint::bind(addr, &id, vec!["node-b".into(), "Node_C".into()]).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("allowed_peers[1]") && msg.contains("\"Node_C\""),
        "{msg}"
    );
}

#[test]
fn bind_outside_runtime_is_an_error() {
    let cluster = ca("cluster");
    let id = identity(&valid(&cluster, "node-a"), &[&cluster]);
    let err = PeerEndpoint::bind("127.0.0.1:0".parse().unwrap(), &id, vec![]).unwrap_err();
    assert!(matches!(err, TransportError::NoRuntime), "{err}");
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = ca("cluster");
    let foreign = ca("foreign");
    let node = valid(&cluster, "node-a");
    let other = valid(&cluster, "node-b");
    let cert = write(dir.path(), "node-a.crt", &node.cert_pem);
    let key = write(dir.path(), "node-a.key", &node.key_pem);
    let ca_crt = write(dir.path(), "ca.crt", &cluster.cert_pem);

    let id = TlsIdentity::load(&cert, &key, &ca_crt).unwrap();
    assert_eq!(id.node_name(), "node-a");

    let check = |r: Result<TlsIdentity, TransportError>, file: &Path, what: &str| {
        let msg = r.unwrap_err().to_string();
        assert!(msg.contains(&file.display().to_string()), "{msg}");
        assert!(msg.contains(what), "{what:?} not in {msg}");
    };
    let missing = dir.path().join("missing.crt");
    check(
        TlsIdentity::load(&missing, &key, &ca_crt),
        &missing,
        "No such file",
    );
    let missing_key = dir.path().join("missing.key");
    check(
        TlsIdentity::load(&cert, &missing_key, &ca_crt),
        &missing_key,
        "No such file",
    );
    let missing_ca = dir.path().join("missing-ca.crt");
    check(
        TlsIdentity::load(&cert, &key, &missing_ca),
        &missing_ca,
        "No such file",
    );

    let garbage = write(dir.path(), "garbage.pem", "not pem at all\n");
    check(
        TlsIdentity::load(&garbage, &key, &ca_crt),
        &garbage,
        "no PEM certificate",
    );
    check(
        TlsIdentity::load(&cert, &garbage, &ca_crt),
        &garbage,
        "private key",
    );
    check(
        TlsIdentity::load(&cert, &key, &garbage),
        &garbage,
        "no PEM certificate",
    );

    // A key that belongs to another certificate.
    let wrong_key = write(dir.path(), "node-b.key", &other.key_pem);
    check(
        TlsIdentity::load(&cert, &wrong_key, &ca_crt),
        &wrong_key,
        "node-a.crt",
    );

    // A certificate from another CA than ca.crt.
    let foreign_cert = valid(&foreign, "node-a");
    let fc = write(dir.path(), "foreign.crt", &foreign_cert.cert_pem);
    let fk = write(dir.path(), "foreign.key", &foreign_cert.key_pem);
    check(TlsIdentity::load(&fc, &fk, &ca_crt), &fc, "UnknownIssuer");

    // An expired certificate loads (with a warning): peers refuse it.
    let old = expired(&cluster, "node-a");
    let oc = write(dir.path(), "old.crt", &old.cert_pem);
    let ok = write(dir.path(), "old.key", &old.key_pem);
    let id = TlsIdentity::load(&oc, &ok, &ca_crt).unwrap();
    assert!(id.not_after() < SystemTime::now());
}
