//! Peer transport: QUIC ([quinn]) with mutual TLS ([rustls], `ring`
//! provider) between the nodes of a cluster. See `docs/security.md`.
//!
//! * Every node has a certificate signed by the cluster CA whose only
//!   subject alternative name is the node name (a DNS name); see [`certs`].
//! * [`PeerEndpoint`] is one UDP socket that is both a QUIC server (peers
//!   connect to it: [`PeerEndpoint::accept`]) and a client
//!   ([`PeerEndpoint::connect`]).
//! * Server side: the client must present a certificate chaining to the
//!   cluster CA (rustls `WebPkiClientVerifier`), and after the handshake its
//!   SAN DNS name must be one of the endpoint's `allowed_peers`; otherwise
//!   the connection is closed with [`CLOSE_UNEXPECTED_PEER`].
//! * Client side: the server's certificate must chain to the cluster CA and
//!   be valid for the expected peer name (used as the TLS server name).
//! * Only once the server has authenticated the client does it open the
//!   first server-initiated unidirectional stream and send a short greeting;
//!   [`PeerEndpoint::connect`] waits for it, so a refusal by the server is
//!   reported by `connect` itself rather than on first use. The greeting
//!   stream is consumed by `connect`; applications never see it.
//! * ALPN is [`ALPN`] (`tandem/4`); TLS 1.3 only; no 0-RTT and no session
//!   resumption (every connection checks certificates in full); datagrams
//!   unused.
//!
//! Refusals (foreign CA, expired certificate, unexpected node name) are
//! logged with `tracing::warn!` on both sides, and the connecting side gets
//! [`TransportError::Refused`] with a [`Refusal`] saying why.

pub mod certs;
#[cfg(test)]
mod tests;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, ConnectionError, Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, RootCertStore};
use tokio::sync::{mpsc, Mutex};
use tracing::{debug, info, warn};

/// The ALPN protocol identifier of the peer protocol.
pub const ALPN: &[u8] = b"tandem/4";
/// QUIC keep-alive interval: a PING is sent when nothing else was sent for
/// this long, so an idle but healthy connection never times out.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// QUIC idle timeout: a connection from which nothing was received for this
/// long (five missed keep-alives) is dead. This is also how long a connect
/// to an unreachable peer takes to fail.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent bidirectional and unidirectional streams a peer may open, so
/// that one large write does not hold back small ones.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Per-stream receive window: a whole 32 MiB write plus framing fits.
pub const STREAM_RECEIVE_WINDOW: u32 = 40 << 20;
/// Per-connection receive window (all streams together).
pub const CONNECTION_RECEIVE_WINDOW: u32 = 128 << 20;
/// Per-connection send buffer (all streams together).
pub const SEND_WINDOW: u64 = 128 << 20;
/// UDP socket receive and send buffer sizes. The kernel default (about
/// 200 KiB) overflows under a burst of replicated writes; every dropped
/// datagram is a QUIC loss that halves the congestion window. As root the
/// size is forced past `net.core.rmem_max`/`wmem_max`; otherwise it is
/// capped there (check `netstat -su` "receive buffer errors").
pub const SOCKET_BUFFER: usize = 16 << 20;
/// Largest UDP payload (QUIC packet) path-MTU discovery probes for, and the
/// largest this endpoint accepts. Discovery starts at 1200 bytes and settles
/// on what the path carries: 1452 on a 1500-byte Ethernet link, this bound on
/// jumbo-frame links and loopback. Why not 8972 (a 9000-byte jumbo frame):
/// quinn hands the kernel up to 10 packets per GSO send and Linux refuses a
/// send over 64 KiB, so 10 × 8972 fails with EMSGSIZE, the batch is lost,
/// and black-hole detection drops the MTU back to 1200. 6500 keeps every
/// batch under 64 KiB. Measured in-process (replication_throughput, memory
/// disks, loopback): 1 MiB writes at QD8 ran 655 MiB/s against 270–350 MiB/s
/// at 1452, and 4 KiB writes at QD32 45k IOPS against 28k.
pub const MAX_UDP_PAYLOAD: u16 = 6500;
/// Upper bound on one [`PeerEndpoint::connect`] (handshake and greeting);
/// an unreachable peer normally fails after [`IDLE_TIMEOUT`].
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Application close code: orderly shutdown.
pub const CLOSE_SHUTDOWN: VarInt = VarInt::from_u32(0);
/// Application close code: the client's certificate names a node that is
/// not among the server's allowed peers.
pub const CLOSE_UNEXPECTED_PEER: VarInt = VarInt::from_u32(0x10);
/// Application close code: the peer broke the connection-setup protocol
/// (wrong ALPN, bad greeting).
pub const CLOSE_PROTOCOL: VarInt = VarInt::from_u32(0x11);

/// What the server sends on its first unidirectional stream once it has
/// authenticated the client.
const GREETING: &[u8] = b"tandem/4 welcome\n";
/// Authenticated connections waiting for [`PeerEndpoint::accept`].
const ACCEPT_QUEUE: usize = 64;

/// Why a TLS peer was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// The certificate does not chain to the cluster CA.
    UnknownIssuer,
    /// The certificate has expired (or is not yet valid).
    Expired,
    /// The certificate is valid but names an unexpected node.
    UnexpectedName,
    /// Another TLS failure.
    Other,
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RefusalKind::UnknownIssuer => {
                "unknown issuer (certificate not signed by the cluster CA)"
            }
            RefusalKind::Expired => "certificate expired (or not yet valid)",
            RefusalKind::UnexpectedName => "unexpected node name",
            RefusalKind::Other => "TLS handshake failure",
        })
    }
}

/// A refused connection: why, and which side refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The reason.
    pub kind: RefusalKind,
    /// True if the peer refused our certificate (or our node name); false if
    /// we refused the peer's.
    pub by_peer: bool,
    /// The TLS or peer-supplied detail.
    pub detail: String,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.by_peer {
            write!(f, "the peer refused us: {}", self.kind)?;
        } else {
            write!(f, "the peer's certificate was rejected: {}", self.kind)?;
        }
        if !self.detail.is_empty() {
            write!(f, " ({})", self.detail)?;
        }
        Ok(())
    }
}

/// A transport error. Errors about files name the file; errors about a
/// connection name the peer and its address.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Reading a certificate, key or CA file failed.
    #[error("{}: reading: {error}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A certificate, key or CA is unusable.
    #[error("{source_name}: {message}")]
    Identity {
        /// The file (or "certificate" / "private key" / "CA certificate" for
        /// in-memory PEM).
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// A peer name is not a valid node name.
    #[error("{field}: {error}")]
    InvalidPeerName {
        /// Where the name came from, e.g. `allowed_peers[2]` or `peer`.
        field: String,
        /// The validation error (it names the value).
        error: certs::CertError,
    },
    /// [`PeerEndpoint::bind`] was called outside a Tokio runtime.
    #[error(
        "binding the peer endpoint: no Tokio runtime (call PeerEndpoint::bind from within one)"
    )]
    NoRuntime,
    /// Binding the UDP socket failed.
    #[error("binding the peer endpoint on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        error: std::io::Error,
    },
    /// The connection could not even be started (bad address, endpoint
    /// shutting down).
    #[error("connecting to peer {peer:?} at {addr}: {error}")]
    Connect {
        /// Expected peer name.
        peer: String,
        /// Peer address.
        addr: SocketAddr,
        /// quinn's error.
        error: quinn::ConnectError,
    },
    /// TLS or node-name authentication failed.
    #[error("connection to peer {peer:?} at {addr} refused: {refusal}")]
    Refused {
        /// Expected peer name.
        peer: String,
        /// Peer address.
        addr: SocketAddr,
        /// Why.
        refusal: Refusal,
    },
    /// The connection failed for another reason (timeout, reset, ...).
    #[error("connection to peer {peer:?} at {addr} failed: {error}")]
    Connection {
        /// Expected peer name.
        peer: String,
        /// Peer address.
        addr: SocketAddr,
        /// quinn's error.
        error: ConnectionError,
    },
    /// The peer broke the connection-setup protocol.
    #[error("connection to peer {peer:?} at {addr}: {message}")]
    Protocol {
        /// Expected peer name.
        peer: String,
        /// Peer address.
        addr: SocketAddr,
        /// What happened.
        message: String,
    },
    /// The shutdown future of [`PeerEndpoint::connect_with_backoff`] fired.
    #[error("shutting down")]
    Shutdown,
    /// The endpoint is closed.
    #[error("the peer endpoint is closed")]
    Closed,
}

/// A node's TLS identity: its certificate and key and the cluster CA, ready
/// as QUIC server and client configurations.
#[derive(Clone)]
pub struct TlsIdentity {
    node_name: String,
    not_after: SystemTime,
    server: Arc<QuicServerConfig>,
    client: Arc<QuicClientConfig>,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("node_name", &self.node_name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn read_file(path: &Path) -> Result<String, TransportError> {
    std::fs::read_to_string(path).map_err(|source| TransportError::Read {
        path: path.to_path_buf(),
        error: source,
    })
}

/// DNS names in the subject alternative names of a DER certificate.
fn san_dns_names(der: &[u8]) -> Result<Vec<String>, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("not a valid X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    Ok(names)
}

fn not_after(der: &[u8]) -> SystemTime {
    match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => {
            let secs = c.validity().not_after.timestamp();
            SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
        }
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

impl TlsIdentity {
    /// Loads a node certificate (PEM; the first certificate is the node's,
    /// any others are intermediates), its private key (PEM) and the cluster
    /// CA certificate(s) (PEM). Every error names the file at fault.
    ///
    /// The node's own certificate must chain to the CA and carry a valid
    /// node name as a SAN DNS name. An expired (or nearly expired)
    /// certificate is loaded with a warning: peers will refuse it.
    pub fn load(cert_path: &Path, key_path: &Path, ca_path: &Path) -> Result<Self, TransportError> {
        let cert = read_file(cert_path)?;
        let key = read_file(key_path)?;
        let ca = read_file(ca_path)?;
        Self::build(
            (&cert_path.display().to_string(), &cert),
            (&key_path.display().to_string(), &key),
            (&ca_path.display().to_string(), &ca),
        )
    }

    /// Like [`TlsIdentity::load`] from PEM text in memory.
    pub fn from_pem(cert_pem: &str, key_pem: &str, ca_pem: &str) -> Result<Self, TransportError> {
        Self::build(
            ("certificate", cert_pem),
            ("private key", key_pem),
            ("CA certificate", ca_pem),
        )
    }

    /// The node name in this node's certificate.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// When this node's certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }

    fn build(
        (cert_name, cert_pem): (&str, &str),
        (key_name, key_pem): (&str, &str),
        (ca_name, ca_pem): (&str, &str),
    ) -> Result<Self, TransportError> {
        let err = |source_name: &str, message: String| TransportError::Identity {
            source_name: source_name.to_string(),
            message,
        };
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| err(cert_name, format!("bad PEM: {e}")))?;
        let Some(leaf) = chain.first().cloned() else {
            return Err(err(cert_name, "no PEM certificate found".into()));
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| err(key_name, format!("no usable PEM private key found: {e}")))?;
        let ca_certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(ca_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| err(ca_name, format!("bad PEM: {e}")))?;
        if ca_certs.is_empty() {
            return Err(err(ca_name, "no PEM certificate found".into()));
        }
        let mut roots = RootCertStore::empty();
        for (i, c) in ca_certs.into_iter().enumerate() {
            roots.add(c).map_err(|e| {
                err(
                    ca_name,
                    format!("certificate #{}: not usable as a CA: {e}", i + 1),
                )
            })?;
        }
        let roots = Arc::new(roots);

        let names = san_dns_names(&leaf).map_err(|m| err(cert_name, m))?;
        let Some(node_name) = names
            .iter()
            .find(|n| certs::validate_node_name(n).is_ok())
            .cloned()
        else {
            return Err(err(
                cert_name,
                format!(
                    "no node name among its subject alternative DNS names {names:?}; issue node certificates with `tandemctl cert issue`"
                ),
            ));
        };
        let not_after = not_after(&leaf);

        let provider = Arc::new(rustls::crypto::ring::default_provider());

        // Check our own certificate against the CA now, so a mismatched
        // ca.crt is a start-up error naming the files rather than a refusal
        // by every peer. Expiry is only a warning (peers will refuse us).
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(|e| err(ca_name, format!("building the certificate verifier: {e}")))?;
        let server_name = ServerName::try_from(node_name.clone())
            .map_err(|e| err(cert_name, format!("node name {node_name:?}: {e}")))?;
        match server_verifier.verify_server_cert(
            &leaf,
            &chain[1..],
            &server_name,
            &[],
            UnixTime::now(),
        ) {
            Ok(_) => {
                let left = not_after
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                if left < Duration::from_secs(30 * 86_400) {
                    warn!(
                        cert = cert_name,
                        node = %node_name,
                        days_left = left.as_secs() / 86_400,
                        "node certificate expires soon; re-issue it with `tandemctl cert issue`"
                    );
                }
            }
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Expired
                | rustls::CertificateError::ExpiredContext { .. }
                | rustls::CertificateError::NotValidYet
                | rustls::CertificateError::NotValidYetContext { .. },
            )) => {
                warn!(
                    cert = cert_name,
                    node = %node_name,
                    "node certificate is expired or not yet valid: peers will refuse this node; re-issue it with `tandemctl cert issue`"
                );
            }
            Err(e) => {
                return Err(err(
                    cert_name,
                    format!("not a valid node certificate for the cluster CA in {ca_name}: {e}"),
                ))
            }
        }

        let client_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| err(ca_name, format!("building the client verifier: {e}")))?;
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(cert_name, format!("TLS configuration: {e}")))?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(|e| err(key_name, format!("unusable with {cert_name}: {e}")))?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        server.max_early_data_size = 0;
        // No resumption: every connection verifies the peer's certificate
        // (chain, validity) in full.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        server.send_tls13_tickets = 0;
        let server = QuicServerConfig::try_from(server)
            .map_err(|e| err(cert_name, format!("QUIC TLS configuration: {e}")))?;

        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| err(cert_name, format!("TLS configuration: {e}")))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| err(key_name, format!("unusable with {cert_name}: {e}")))?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.enable_early_data = false;
        client.resumption = rustls::client::Resumption::disabled();
        let client = QuicClientConfig::try_from(client)
            .map_err(|e| err(cert_name, format!("QUIC TLS configuration: {e}")))?;

        Ok(TlsIdentity {
            node_name,
            not_after,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }
}

/// The QUIC transport parameters used on both sides (see the constants).
pub fn transport_config() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE_INTERVAL));
    t.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32,
    ))));
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_CONCURRENT_STREAMS));
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t.send_window(SEND_WINDOW);
    t.send_fairness(true);
    t.datagram_receive_buffer_size(None);
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    t
}

/// Binds the UDP socket for a peer endpoint with [`SOCKET_BUFFER`]-sized
/// kernel buffers (best effort: a refusal only logs).
fn bind_udp(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{setsockopt, sockopt};
    let socket = std::net::UdpSocket::bind(addr)?;
    let forced = setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER)
        .and_then(|()| setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER));
    if let Err(e) = forced {
        debug!(error = %e, "forcing UDP buffer sizes refused; asking within the sysctl limits");
        let asked = setsockopt(&socket, sockopt::RcvBuf, &SOCKET_BUFFER)
            .and_then(|()| setsockopt(&socket, sockopt::SndBuf, &SOCKET_BUFFER));
        if let Err(e) = asked {
            warn!(error = %e, "setting UDP buffer sizes failed; replication may lose datagrams under load");
        }
    }
    Ok(socket)
}

/// Classifies a connection error as a TLS / authentication refusal, if it
/// is one.
pub fn classify_refusal(e: &ConnectionError) -> Option<Refusal> {
    fn alert_kind(code: u64, detail: &str) -> Option<RefusalKind> {
        if !(0x100..=0x1ff).contains(&code) {
            return None;
        }
        let alert = AlertDescription::from((code - 0x100) as u8);
        Some(match alert {
            AlertDescription::UnknownCA => RefusalKind::UnknownIssuer,
            // Another cluster's CA with the same name: the issuer is found by
            // name but its signature does not verify against our CA.
            AlertDescription::DecryptError => RefusalKind::UnknownIssuer,
            AlertDescription::BadCertificate if detail.contains("BadSignature") => {
                RefusalKind::UnknownIssuer
            }
            AlertDescription::CertificateExpired => RefusalKind::Expired,
            AlertDescription::BadCertificate
                if detail.contains("NotValidForName") || detail.contains("not valid for name") =>
            {
                RefusalKind::UnexpectedName
            }
            _ => RefusalKind::Other,
        })
    }
    fn alert_name(code: u64) -> String {
        format!(
            "TLS alert {:?}",
            AlertDescription::from((code - 0x100) as u8)
        )
    }
    match e {
        ConnectionError::TransportError(te) => {
            let code = u64::from(te.code);
            alert_kind(code, &te.reason).map(|kind| Refusal {
                kind,
                by_peer: false,
                detail: te.reason.clone(),
            })
        }
        ConnectionError::ConnectionClosed(cc) => {
            let code = u64::from(cc.error_code);
            let reason = String::from_utf8_lossy(&cc.reason).into_owned();
            alert_kind(code, &reason).map(|kind| Refusal {
                kind,
                by_peer: true,
                detail: if reason.is_empty() {
                    alert_name(code)
                } else {
                    format!("{}: {reason}", alert_name(code))
                },
            })
        }
        ConnectionError::ApplicationClosed(ac) if ac.error_code == CLOSE_UNEXPECTED_PEER => {
            Some(Refusal {
                kind: RefusalKind::UnexpectedName,
                by_peer: true,
                detail: String::from_utf8_lossy(&ac.reason).into_owned(),
            })
        }
        _ => None,
    }
}

/// The SAN DNS names of the peer's certificate on an established connection.
fn peer_names(conn: &Connection) -> Vec<String> {
    conn.peer_identity()
        .and_then(|id| id.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|chain| chain.first().and_then(|c| san_dns_names(c).ok()))
        .unwrap_or_default()
}

fn negotiated_alpn(conn: &Connection) -> Option<Vec<u8>> {
    conn.handshake_data()
        .and_then(|h| h.downcast::<HandshakeData>().ok())
        .and_then(|h| h.protocol)
}

/// One QUIC endpoint (one UDP socket) that accepts connections from allowed
/// peers and connects to peers, all authenticated with mutual TLS.
pub struct PeerEndpoint {
    endpoint: Endpoint,
    node_name: String,
    incoming: Mutex<mpsc::Receiver<(String, Connection)>>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for PeerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerEndpoint")
            .field("node_name", &self.node_name)
            .field("local_addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Drop for PeerEndpoint {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl PeerEndpoint {
    /// Binds `addr` (port 0 picks one) as both QUIC server and client with
    /// `identity`. Incoming connections are accepted only from clients whose
    /// certificate chains to the cluster CA and names one of
    /// `allowed_peers`. Must be called within a Tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &TlsIdentity,
        allowed_peers: Vec<String>,
    ) -> Result<Self, TransportError> {
        for (i, p) in allowed_peers.iter().enumerate() {
            certs::validate_node_name(p).map_err(|source| TransportError::InvalidPeerName {
                field: format!("allowed_peers[{i}]"),
                error: source,
            })?;
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(TransportError::NoRuntime);
        }
        let transport = Arc::new(transport_config());
        let mut server = quinn::ServerConfig::with_crypto(identity.server.clone());
        server.transport_config(transport.clone());
        let mut client = quinn::ClientConfig::new(identity.client.clone());
        client.transport_config(transport);
        let bind_err = |error| TransportError::Bind { addr, error };
        let socket = bind_udp(addr).map_err(bind_err)?;
        let runtime = quinn::default_runtime().ok_or(TransportError::NoRuntime)?;
        let mut endpoint_config = quinn::EndpointConfig::default();
        endpoint_config
            .max_udp_payload_size(MAX_UDP_PAYLOAD)
            .map_err(|e| bind_err(std::io::Error::other(e.to_string())))?;
        let mut endpoint =
            Endpoint::new(endpoint_config, Some(server), socket, runtime).map_err(bind_err)?;
        endpoint.set_default_client_config(client);
        let (tx, rx) = mpsc::channel(ACCEPT_QUEUE);
        let allowed: Arc<HashSet<String>> = Arc::new(allowed_peers.into_iter().collect());
        let acceptor = tokio::spawn(accept_loop(endpoint.clone(), allowed, tx));
        info!(
            node = identity.node_name(),
            addr = %endpoint.local_addr().unwrap_or(addr),
            "peer endpoint listening"
        );
        Ok(PeerEndpoint {
            endpoint,
            node_name: identity.node_name.clone(),
            incoming: Mutex::new(rx),
            acceptor,
        })
    }

    /// The bound address (useful after binding port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// This node's name (from its certificate).
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The next authenticated incoming connection: the peer's node name and
    /// the connection. Refused connections are logged and never returned.
    /// Fails with [`TransportError::Closed`] once the endpoint is closed.
    pub async fn accept(&self) -> Result<(String, Connection), TransportError> {
        self.incoming
            .lock()
            .await
            .recv()
            .await
            .ok_or(TransportError::Closed)
    }

    /// Connects to the node `peer` at `addr`: the server's certificate must
    /// chain to the cluster CA and be valid for `peer`, and the server must
    /// accept our certificate and node name. Returns only once the server
    /// has authenticated us (see the module documentation).
    pub async fn connect(
        &self,
        addr: SocketAddr,
        peer: &str,
    ) -> Result<Connection, TransportError> {
        certs::validate_node_name(peer).map_err(|source| TransportError::InvalidPeerName {
            field: "peer".into(),
            error: source,
        })?;
        let connecting =
            self.endpoint
                .connect(addr, peer)
                .map_err(|source| TransportError::Connect {
                    peer: peer.to_string(),
                    addr,
                    error: source,
                })?;
        let conn_err = |source: ConnectionError| match classify_refusal(&source) {
            Some(refusal) => TransportError::Refused {
                peer: peer.to_string(),
                addr,
                refusal,
            },
            None => TransportError::Connection {
                peer: peer.to_string(),
                addr,
                error: source,
            },
        };
        let protocol = |message: String| TransportError::Protocol {
            peer: peer.to_string(),
            addr,
            message,
        };
        let attempt = async {
            let conn = connecting.await.map_err(conn_err)?;
            if negotiated_alpn(&conn).as_deref() != Some(ALPN) {
                conn.close(CLOSE_PROTOCOL, b"ALPN tandem/4 required");
                return Err(protocol("the peer did not negotiate ALPN tandem/4".into()));
            }
            let mut greeting = conn.accept_uni().await.map_err(conn_err)?;
            let got = greeting
                .read_to_end(GREETING.len())
                .await
                .map_err(|e| match e {
                    quinn::ReadToEndError::Read(quinn::ReadError::ConnectionLost(c)) => conn_err(c),
                    other => protocol(format!("reading the greeting: {other}")),
                })?;
            if got != GREETING {
                conn.close(CLOSE_PROTOCOL, b"bad greeting");
                return Err(protocol(format!(
                    "bad greeting {:?}",
                    String::from_utf8_lossy(&got)
                )));
            }
            Ok(conn)
        };
        let result = match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
            Ok(r) => r,
            Err(_) => Err(protocol(format!(
                "no greeting within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))),
        };
        match &result {
            Ok(_) => debug!(peer, %addr, "connected to peer"),
            Err(TransportError::Refused { refusal, .. }) => warn!(
                peer,
                %addr,
                reason = %refusal.kind,
                by_peer = refusal.by_peer,
                "peer connection refused: {refusal}"
            ),
            Err(e) => debug!(peer, %addr, "peer connection failed: {e}"),
        }
        result
    }

    /// [`PeerEndpoint::connect`] until it succeeds or `shutdown` completes,
    /// waiting `initial` after the first failure and doubling up to `max`.
    /// Each failure is logged at debug (refusals also at warn by `connect`),
    /// the success at info. Gives up early only on errors retrying cannot
    /// fix (invalid peer name, endpoint closed).
    pub async fn connect_with_backoff(
        &self,
        addr: SocketAddr,
        peer: &str,
        initial: Duration,
        max: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Connection, TransportError> {
        tokio::pin!(shutdown);
        let mut delay = initial.min(max);
        let mut attempt: u64 = 0;
        loop {
            attempt += 1;
            let result = tokio::select! {
                biased;
                _ = &mut shutdown => return Err(TransportError::Shutdown),
                r = self.connect(addr, peer) => r,
            };
            match result {
                Ok(conn) => {
                    info!(peer, %addr, attempt, "connected to peer");
                    return Ok(conn);
                }
                Err(e @ TransportError::InvalidPeerName { .. }) => return Err(e),
                Err(TransportError::Connect {
                    error: quinn::ConnectError::EndpointStopping,
                    ..
                }) => return Err(TransportError::Closed),
                Err(e) => {
                    debug!(peer, %addr, attempt, retry_in_ms = delay.as_millis() as u64, "{e}");
                }
            }
            tokio::select! {
                biased;
                _ = &mut shutdown => return Err(TransportError::Shutdown),
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(max);
        }
    }

    /// Closes every connection ([`CLOSE_SHUTDOWN`]) and stops accepting.
    pub fn close(&self) {
        self.acceptor.abort();
        self.endpoint.close(CLOSE_SHUTDOWN, b"shutting down");
    }

    /// Waits until every connection is fully closed (call after
    /// [`PeerEndpoint::close`] so peers see the close).
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }
}

async fn accept_loop(
    endpoint: Endpoint,
    allowed: Arc<HashSet<String>>,
    tx: mpsc::Sender<(String, Connection)>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let allowed = allowed.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Some((name, conn)) = authenticate(incoming, &allowed).await {
                if let Err(mpsc::error::SendError((_, conn))) = tx.send((name, conn)).await {
                    conn.close(CLOSE_SHUTDOWN, b"shutting down");
                }
            }
        });
    }
}

/// Server side of connection setup: TLS handshake (client certificate
/// chaining to the CA), node-name check, greeting. Logs refusals.
async fn authenticate(
    incoming: quinn::Incoming,
    allowed: &HashSet<String>,
) -> Option<(String, Connection)> {
    let remote = incoming.remote_address();
    let handshake = async {
        let connecting = incoming.accept()?;
        connecting.await
    };
    let conn = match handshake.await {
        Ok(c) => c,
        Err(e) => {
            match classify_refusal(&e) {
                Some(r) if r.by_peer => warn!(
                    %remote,
                    reason = %r.kind,
                    "peer at {remote} refused our certificate: {} ({})",
                    r.kind,
                    r.detail
                ),
                Some(r) => warn!(
                    %remote,
                    reason = %r.kind,
                    "refused peer at {remote}: {} ({})",
                    r.kind,
                    r.detail
                ),
                None => debug!(%remote, "incoming peer connection failed: {e}"),
            }
            return None;
        }
    };
    if negotiated_alpn(&conn).as_deref() != Some(ALPN) {
        warn!(%remote, "refused peer at {remote}: ALPN tandem/4 not negotiated");
        conn.close(CLOSE_PROTOCOL, b"ALPN tandem/4 required");
        return None;
    }
    let names = peer_names(&conn);
    let Some(name) = names.iter().find(|n| allowed.contains(*n)).cloned() else {
        let presented = names.join(", ");
        warn!(
            %remote,
            presented = %presented,
            reason = %RefusalKind::UnexpectedName,
            "refused peer at {remote}: unexpected node name {presented:?} (not among the allowed peers)"
        );
        conn.close(
            CLOSE_UNEXPECTED_PEER,
            format!("unexpected node name {presented:?}").as_bytes(),
        );
        return None;
    };
    let greet = async {
        let mut s = conn.open_uni().await?;
        s.write_all(GREETING).await?;
        s.finish()?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    };
    if let Err(e) = greet.await {
        debug!(%remote, peer = %name, "sending the greeting failed: {e}");
        return None;
    }
    info!(%remote, peer = %name, "peer connected");
    Some((name, conn))
}
