//! The cluster certificate authority and node certificates for peer mutual
//! TLS (see `docs/security.md`).
//!
//! * `tandemctl ca create --dir DIR` writes `DIR/ca.crt` and `DIR/ca.key`
//!   (mode 0600) with [`create_ca`] and [`CaFiles::write`].
//! * `tandemctl cert issue --ca-dir DIR --node NAME --out-dir OUT` writes
//!   `OUT/NAME.crt` and `OUT/NAME.key` (mode 0600) with [`issue_node_cert`]
//!   and [`NodeCert::write`].
//!
//! All keys are ECDSA P-256, all files PEM. A node certificate carries the
//! node name as its only subject alternative name (a DNS name) and as its
//! common name, and may be used for both TLS server and client
//! authentication: each node is a server for some peers and a client of
//! others.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};

/// File name of the CA certificate inside a CA directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// Default CA common name.
pub const DEFAULT_CA_NAME: &str = "Tandem cluster CA";
/// Default CA validity in days (about ten years).
pub const DEFAULT_CA_DAYS: u32 = 3650;
/// Default node certificate validity in days (the CA/Browser Forum's old
/// maximum; rotate well before).
pub const DEFAULT_CERT_DAYS: u32 = 825;
/// Longest node name (one DNS label).
pub const MAX_NODE_NAME_LEN: usize = 63;

/// How far back `not_before` is set, to tolerate clock skew between nodes.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// A certificate tool error. Every variant names the file or the value at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{}: {action}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("reading", "creating", ...).
        action: &'static str,
        /// The OS error.
        error: std::io::Error,
    },
    /// A file holds something other than what is expected.
    #[error("{}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The CA already exists and `force` was not given.
    #[error("{}: a CA already exists here; refusing to overwrite it (use --force to replace it, which invalidates every node certificate it issued)", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A node name is not usable as a certificate name.
    #[error("node name {name:?}: {reason}")]
    InvalidNodeName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Bad validity arguments.
    #[error("validity: {0}")]
    Validity(String),
    /// Certificate generation failed.
    #[error("{what}: {error}")]
    Generate {
        /// What was being generated.
        what: String,
        /// The rcgen error.
        error: rcgen::Error,
    },
}

/// Checks that `name` can be a node name: 1–63 characters of `[a-z0-9-]`,
/// not starting or ending with `-`, and not all digits (a DNS name whose
/// last label is numeric is rejected by TLS stacks as a possible IPv4
/// address).
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let bad = |reason| {
        Err(CertError::InvalidNodeName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad("must not be empty");
    }
    if name.len() > MAX_NODE_NAME_LEN {
        return bad("must be at most 63 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("may only contain lowercase letters a-z, digits 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("must not start or end with '-'");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return bad("must not be all digits");
    }
    if rustls::pki_types::DnsName::try_from(name).is_err() {
        // Catches the remaining numeric-looking forms such as "0x1f".
        return bad("must not look like a number");
    }
    Ok(())
}

/// A cluster CA: certificate and private key, PEM.
#[derive(Clone)]
pub struct CaFiles {
    /// The CA certificate (PEM). Distribute this to every node as `ca.crt`.
    pub cert_pem: String,
    /// The CA private key (PKCS#8 PEM). Keep it off the nodes if you can.
    pub key_pem: String,
}

impl std::fmt::Debug for CaFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaFiles")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A node certificate and its private key, PEM.
#[derive(Clone)]
pub struct NodeCert {
    /// The node name (the certificate's SAN DNS name).
    pub node: String,
    /// The certificate (PEM).
    pub cert_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCert")
            .field("node", &self.node)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = *uuid::Uuid::new_v4().as_bytes();
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // no leading zero byte to strip
    SerialNumber::from_slice(&bytes)
}

fn generate_key(what: &str) -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertError::Generate {
        what: format!("{what}: generating an ECDSA P-256 key"),
        error: source,
    })
}

/// Creates a new self-signed cluster CA valid from now (minus a few minutes
/// of clock-skew allowance) for `validity`. It may only sign end-entity
/// (node) certificates: path length 0.
pub fn create_ca(name: &str, validity: Duration) -> Result<CaFiles, CertError> {
    if name.trim().is_empty() {
        return Err(CertError::Validity("CA name must not be empty".into()));
    }
    if validity.is_zero() {
        return Err(CertError::Validity("CA validity must be positive".into()));
    }
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = (now - CLOCK_SKEW).into();
    params.not_after = (now + validity).into();
    params.serial_number = Some(random_serial());
    let key = generate_key("CA")?;
    let cert = params
        .self_signed(&key)
        .map_err(|source| CertError::Generate {
            what: format!("CA {name:?}: signing"),
            error: source,
        })?;
    Ok(CaFiles {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Issues a certificate for node `node`, signed by `ca`, valid from
/// `not_before` to `not_after` (tests pass past dates to get expired
/// certificates). The node name is validated with [`validate_node_name`].
pub fn issue_node_cert(
    ca: &CaFiles,
    node: &str,
    not_before: SystemTime,
    not_after: SystemTime,
) -> Result<NodeCert, CertError> {
    validate_node_name(node)?;
    if not_after <= not_before {
        return Err(CertError::Validity(format!(
            "node {node:?}: not_after must be later than not_before"
        )));
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(|source| CertError::Generate {
        what: "CA key: parsing".into(),
        error: source,
    })?;
    let issuer =
        Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).map_err(|source| CertError::Generate {
            what: "CA certificate: parsing".into(),
            error: source,
        })?;
    let gen_err = |source| CertError::Generate {
        what: format!("node {node:?}: issuing the certificate"),
        error: source,
    };
    let mut params = CertificateParams::new(vec![node.to_string()]).map_err(gen_err)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, node);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    let key = generate_key(&format!("node {node:?}"))?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    Ok(NodeCert {
        node: node.to_string(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Parses the first certificate of a PEM text, naming `path` on error.
fn parse_cert_pem(path: &Path, pem: &str) -> Result<Vec<u8>, CertError> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Invalid {
        path: path.to_path_buf(),
        message: format!("no PEM certificate found: {e}"),
    })?;
    x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a valid X.509 certificate: {e}"),
    })?;
    Ok(der.to_vec())
}

/// The `notAfter` time of a PEM certificate.
pub fn cert_not_after(path: &Path, pem: &str) -> Result<SystemTime, CertError> {
    let der = parse_cert_pem(path, pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::Invalid {
        path: path.to_path_buf(),
        message: format!("not a valid X.509 certificate: {e}"),
    })?;
    let secs = cert.validity().not_after.timestamp();
    Ok(if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        SystemTime::UNIX_EPOCH
    })
}

fn read_to_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        action: "reading",
        error: source,
    })
}

impl CaFiles {
    /// `DIR/ca.crt`.
    pub fn cert_path(dir: &Path) -> PathBuf {
        dir.join(CA_CERT_FILE)
    }

    /// `DIR/ca.key`.
    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join(CA_KEY_FILE)
    }

    /// Loads `DIR/ca.crt` and `DIR/ca.key`, checking that the certificate is
    /// a CA certificate and that the key parses and belongs to it.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = Self::cert_path(dir);
        let key_path = Self::key_path(dir);
        let cert_pem = read_to_string(&cert_path)?;
        let key_pem = read_to_string(&key_path)?;
        let der = parse_cert_pem(&cert_path, &cert_pem)?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| CertError::Invalid {
                path: cert_path.clone(),
                message: format!("not a valid X.509 certificate: {e}"),
            })?;
        if !cert.is_ca() {
            return Err(CertError::Invalid {
                path: cert_path,
                message: "not a CA certificate (basic constraints CA:FALSE or missing)".into(),
            });
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Invalid {
            path: key_path.clone(),
            message: format!("not a PEM private key rcgen can use: {e}"),
        })?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(CertError::Invalid {
                path: key_path,
                message: format!("this key does not belong to {}", cert_path.display()),
            });
        }
        Ok(CaFiles { cert_pem, key_pem })
    }

    /// Writes `DIR/ca.crt` (0644) and `DIR/ca.key` (0600), creating `DIR`
    /// (0700) if needed. Refuses to replace an existing CA unless `force`.
    /// Returns the two paths.
    pub fn write(&self, dir: &Path, force: bool) -> Result<(PathBuf, PathBuf), CertError> {
        let cert_path = Self::cert_path(dir);
        let key_path = Self::key_path(dir);
        if !force {
            for p in [&cert_path, &key_path] {
                if p.exists() {
                    return Err(CertError::Exists { path: p.clone() });
                }
            }
        }
        create_dir(dir)?;
        write_file(&key_path, &self.key_pem, 0o600)?;
        write_file(&cert_path, &self.cert_pem, 0o644)?;
        Ok((cert_path, key_path))
    }
}

impl NodeCert {
    /// `OUT/NODE.crt`.
    pub fn cert_path(out_dir: &Path, node: &str) -> PathBuf {
        out_dir.join(format!("{node}.crt"))
    }

    /// `OUT/NODE.key`.
    pub fn key_path(out_dir: &Path, node: &str) -> PathBuf {
        out_dir.join(format!("{node}.key"))
    }

    /// Writes `OUT/NODE.crt` (0644) and `OUT/NODE.key` (0600), creating
    /// `OUT` (0700) if needed. Existing files are replaced atomically (this
    /// is how a node certificate is rotated). Returns the two paths.
    pub fn write(&self, out_dir: &Path) -> Result<(PathBuf, PathBuf), CertError> {
        let cert_path = Self::cert_path(out_dir, &self.node);
        let key_path = Self::key_path(out_dir, &self.node);
        create_dir(out_dir)?;
        write_file(&key_path, &self.key_pem, 0o600)?;
        write_file(&cert_path, &self.cert_pem, 0o644)?;
        Ok((cert_path, key_path))
    }
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| CertError::Io {
            path: dir.to_path_buf(),
            action: "creating directory",
            error: source,
        })
}

/// Writes `contents` to `path` with `mode` via a temporary file in the same
/// directory and a rename, so a reader never sees a partial file and a key
/// is never readable by others, even briefly.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertError> {
    let io_err = |action, source| CertError::Io {
        path: path.to_path_buf(),
        action,
        error: source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        // The umask may have cleared bits; set the mode exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", e));
    }
    Ok(())
}

/// `tandemctl ca ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create the cluster CA: DIR/ca.crt and DIR/ca.key (mode 0600).
    Create {
        /// Directory for ca.crt and ca.key (created 0700 if missing).
        #[arg(long)]
        dir: PathBuf,
        /// CA common name.
        #[arg(long, default_value = DEFAULT_CA_NAME)]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CA_DAYS)]
        days: u32,
        /// Replace an existing CA (every certificate it issued stops being trusted).
        #[arg(long)]
        force: bool,
    },
}

/// `tandemctl cert ...`.
#[derive(Debug, clap::Subcommand)]
pub enum CertCommand {
    /// Issue (or re-issue, to rotate) a node certificate: OUT/NAME.crt and OUT/NAME.key.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Node name: 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'.
        #[arg(long)]
        node: String,
        /// Output directory (created 0700 if missing).
        #[arg(long)]
        out_dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = DEFAULT_CERT_DAYS)]
        days: u32,
    },
}

fn days(days: u32, what: &str) -> Result<Duration, CertError> {
    if days == 0 {
        return Err(CertError::Validity(format!(
            "--days for {what} must be at least 1"
        )));
    }
    Ok(Duration::from_secs(u64::from(days) * 86_400))
}

impl CaCommand {
    /// Runs the command; returns the text to print.
    pub fn run(&self) -> Result<String, CertError> {
        match self {
            CaCommand::Create {
                dir,
                name,
                days: d,
                force,
            } => {
                let validity = days(*d, "the CA")?;
                if !force {
                    for p in [CaFiles::cert_path(dir), CaFiles::key_path(dir)] {
                        if p.exists() {
                            return Err(CertError::Exists { path: p });
                        }
                    }
                }
                let ca = create_ca(name, validity)?;
                let (cert, key) = ca.write(dir, *force)?;
                Ok(format!(
                    "created CA {name:?} valid for {d} days:\n  certificate: {}\n  private key: {} (mode 0600; keep it safe, ideally offline)",
                    cert.display(),
                    key.display()
                ))
            }
        }
    }
}

impl CertCommand {
    /// Runs the command; returns the text to print.
    pub fn run(&self) -> Result<String, CertError> {
        match self {
            CertCommand::Issue {
                ca_dir,
                node,
                out_dir,
                days: d,
            } => {
                validate_node_name(node)?;
                let validity = days(*d, "the node certificate")?;
                let ca = CaFiles::load(ca_dir)?;
                let now = SystemTime::now();
                let not_after = now + validity;
                let cert = issue_node_cert(&ca, node, now - CLOCK_SKEW, not_after)?;
                let replaced = NodeCert::cert_path(out_dir, node).exists();
                let (cert_path, key_path) = cert.write(out_dir)?;
                let mut out = format!(
                    "{} certificate for node {node:?} valid for {d} days:\n  certificate: {}\n  private key: {} (mode 0600)",
                    if replaced { "re-issued" } else { "issued" },
                    cert_path.display(),
                    key_path.display()
                );
                let ca_cert_path = CaFiles::cert_path(ca_dir);
                if let Ok(ca_not_after) = cert_not_after(&ca_cert_path, &ca.cert_pem) {
                    if ca_not_after < not_after {
                        out.push_str(&format!(
                            "\n  warning: the CA ({}) expires before this certificate; peers stop trusting it when the CA expires",
                            ca_cert_path.display()
                        ));
                    }
                }
                Ok(out)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["a", "node1", "node-1", "db-03-east", "1a", &"x".repeat(63)] {
            validate_node_name(ok).unwrap_or_else(|e| panic!("{ok:?}: {e}"));
        }
        for (bad, why) in [
            ("", "empty"),
            (&"x".repeat(64) as &str, "63"),
            ("Node1", "lowercase"),
            ("node_1", "lowercase"),
            ("node.1", "lowercase"),
            ("nöde", "lowercase"),
            ("-node", "start or end"),
            ("node-", "start or end"),
            ("123", "digits"),
            ("0x1f", "number"),
        ] {
            let e = validate_node_name(bad).expect_err(bad).to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
    }

    #[test]
    fn issue_rejects_bad_names_and_validity() {
        let ca = create_ca("test CA", Duration::from_secs(3600)).unwrap();
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert!(matches!(
            issue_node_cert(&ca, "Bad_Name", now, now + hour),
            Err(CertError::InvalidNodeName { .. })
        ));
        assert!(matches!(
            issue_node_cert(&ca, "node1", now, now - hour),
            Err(CertError::Validity(_))
        ));
        assert!(create_ca("", hour).is_err());
        assert!(create_ca("x", Duration::ZERO).is_err());
    }

    #[test]
    fn issued_cert_has_san_and_usages() {
        let ca = create_ca("test CA", Duration::from_secs(86_400)).unwrap();
        let now = SystemTime::now();
        let node = issue_node_cert(&ca, "node-a", now, now + Duration::from_secs(3600)).unwrap();
        let der = parse_cert_pem(Path::new("node-a.crt"), &node.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(san.value.general_names.len(), 1);
        assert_eq!(
            crate::transport::san_dns_names(&der).unwrap(),
            vec!["node-a"]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(!cert.is_ca());
        let ca_der = parse_cert_pem(Path::new("ca.crt"), &ca.cert_pem).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca_cert.is_ca());
        assert_eq!(cert.issuer(), ca_cert.subject());
    }

    #[test]
    fn ca_files_roundtrip_modes_and_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let cmd = CaCommand::Create {
            dir: ca_dir.clone(),
            name: DEFAULT_CA_NAME.into(),
            days: 10,
            force: false,
        };
        cmd.run().unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&ca_dir.join(CA_CERT_FILE)), 0o644);
        let first = fs::read_to_string(ca_dir.join(CA_CERT_FILE)).unwrap();
        // A second create without --force refuses and leaves the CA alone.
        let e = cmd.run().unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("--force"), "{e}");
        assert_eq!(
            fs::read_to_string(ca_dir.join(CA_CERT_FILE)).unwrap(),
            first
        );
        CaCommand::Create {
            dir: ca_dir.clone(),
            name: "other".into(),
            days: 10,
            force: true,
        }
        .run()
        .unwrap();
        assert_ne!(
            fs::read_to_string(ca_dir.join(CA_CERT_FILE)).unwrap(),
            first
        );

        let out = dir.path().join("certs");
        let issue = CertCommand::Issue {
            ca_dir: ca_dir.clone(),
            node: "node-b".into(),
            out_dir: out.clone(),
            days: 5,
        };
        let msg = issue.run().unwrap();
        assert!(msg.starts_with("issued"), "{msg}");
        assert_eq!(mode(&out.join("node-b.key")), 0o600);
        assert!(issue.run().unwrap().starts_with("re-issued"));
        let loaded = CaFiles::load(&ca_dir).unwrap();
        assert!(loaded.cert_pem.contains("BEGIN CERTIFICATE"));
    }

    #[test]
    fn cli_errors_name_files_and_fields() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = CertCommand::Issue {
            ca_dir: missing.clone(),
            node: "node1".into(),
            out_dir: dir.path().join("out"),
            days: 1,
        }
        .run()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(&missing.join("ca.crt").display().to_string()),
            "{e}"
        );

        let e = CertCommand::Issue {
            ca_dir: missing.clone(),
            node: "Bad Name".into(),
            out_dir: dir.path().join("out"),
            days: 1,
        }
        .run()
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"Bad Name\""), "{e}");

        let e = CaCommand::Create {
            dir: dir.path().join("ca"),
            name: "x".into(),
            days: 0,
            force: false,
        }
        .run()
        .unwrap_err()
        .to_string();
        assert!(e.contains("--days"), "{e}");

        // A CA directory whose key does not match its certificate.
        let a = create_ca("a", Duration::from_secs(3600)).unwrap();
        let b = create_ca("b", Duration::from_secs(3600)).unwrap();
        let ca_dir = dir.path().join("mixed");
        CaFiles {
            cert_pem: a.cert_pem.clone(),
            key_pem: b.key_pem.clone(),
        }
        .write(&ca_dir, false)
        .unwrap();
        let e = CaFiles::load(&ca_dir).unwrap_err().to_string();
        assert!(e.contains("ca.key") && e.contains("does not belong"), "{e}");

        // A node certificate is not a CA.
        let now = SystemTime::now();
        let node = issue_node_cert(&a, "n1", now, now + Duration::from_secs(60)).unwrap();
        let not_ca = dir.path().join("notca");
        CaFiles {
            cert_pem: node.cert_pem,
            key_pem: node.key_pem,
        }
        .write(&not_ca, false)
        .unwrap();
        let e = CaFiles::load(&not_ca).unwrap_err().to_string();
        assert!(e.contains("ca.crt") && e.contains("not a CA"), "{e}");

        // Garbage in the certificate file.
        let garbage = dir.path().join("garbage");
        fs::create_dir(&garbage).unwrap();
        fs::write(garbage.join(CA_CERT_FILE), "hello").unwrap();
        fs::write(garbage.join(CA_KEY_FILE), &a.key_pem).unwrap();
        let e = CaFiles::load(&garbage).unwrap_err().to_string();
        assert!(
            e.contains("ca.crt") && e.contains("no PEM certificate"),
            "{e}"
        );
    }
}
