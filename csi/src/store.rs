//! Volume records and where they are kept.
//!
//! The controller persists a record *before* acting on it (state
//! [`VolumeState::Creating`]), so a CreateVolume retried after a crash finds
//! the record and resumes with the same id and placement instead of placing
//! the volume twice. [`VolumeStore`] is the seam: [`FileStore`] (one JSON
//! file per volume in a directory) serves standalone use and tests;
//! [`crate::kube_store::KubeStore`] keeps one `TandemVolume` custom resource
//! per volume (`deploy/crds.yaml`) for clusters. [`StoreKind`] is the
//! `--store` flag that picks one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::params::VolumeParams;

/// Version of the record format written by this build.
pub const RECORD_VERSION: u32 = 1;

/// Lifecycle state of a volume record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VolumeState {
    /// Persisted, replicas not yet all set up; a retry resumes.
    Creating,
    /// Created.
    Ready,
    /// Being deleted; a retry finishes the deletion.
    Deleting,
}

/// One replica of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// Node holding the replica.
    pub node: String,
    /// Its value of the volume's topology key.
    pub zone: String,
    /// Where the replica's `tandemd` listens for its peers (QUIC, UDP):
    /// the node's inventory address and a port the controller allocated
    /// for this volume. `None` when the node has no address in the
    /// inventory: the volume is then not replicated by the driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::SocketAddr>,
}

/// A node without a replica that uses the volume through the replicas
/// (remote attach): its `tandemd` is a diskless client (R28), every write
/// on every replica before it completes, reads forwarded to a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Client {
    /// Node the volume is attached to.
    pub node: String,
    /// Where the client's `tandemd` listens for the replicas (QUIC, UDP),
    /// allocated like a replica's address.
    pub address: std::net::SocketAddr,
}

/// A node a volume is published (attached) to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Node id.
    pub node: String,
    /// Published read-only.
    pub readonly: bool,
    /// Published with MULTI_NODE_MULTI_WRITER.
    pub multi_node: bool,
}

/// Everything the controller knows about one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    /// Record format version ([`RECORD_VERSION`]).
    pub version: u32,
    /// CSI volume id (`tdm-<uuid>`).
    pub id: String,
    /// CSI name the CO chose (idempotency key).
    pub name: String,
    /// Volume UUID, shared by all replicas.
    pub uuid: uuid::Uuid,
    /// Size in bytes.
    pub size: u64,
    /// StorageClass parameters.
    pub params: VolumeParams,
    /// Replicas in placement order.
    pub replicas: Vec<Replica>,
    /// Node of the disk-less witness, when `params.witness`.
    pub witness: Option<String>,
    /// Lifecycle state.
    pub state: VolumeState,
    /// Nodes the volume is published to (at most two: dual-primary).
    pub attachments: Vec<Attachment>,
    /// The node the volume was first published to: the only replica that
    /// holds its data until the driver wires up replication. Other nodes
    /// must not create a blank replica and serve it in its place.
    #[serde(default)]
    pub initialized_on: Option<String>,
    /// The replicas' `tandemd`s allow two Primaries (`allow_two_primaries`):
    /// the volume was created for `MULTI_NODE_MULTI_WRITER` block access
    /// with protocol C (live migration).
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// Where the witness node's `tandemd witness` for this volume listens,
    /// when the volume has a witness and is replicated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub witness_address: Option<std::net::SocketAddr>,
    /// Diskless clients: published nodes that hold no replica (remote
    /// attach). The replicas list them as `diskless` peers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<Client>,
}

impl VolumeRecord {
    /// Whether the node agents replicate this volume: every replica has a
    /// replication address.
    pub fn replicated(&self) -> bool {
        !self.replicas.is_empty() && self.replicas.iter().all(|r| r.address.is_some())
    }
}

/// Where volume records live. Implementations must make `put` durable before
/// returning and must be safe to call from several threads.
pub trait VolumeStore: Send + Sync {
    /// The record with this volume id, if any.
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>>;
    /// Creates or replaces a record.
    fn put(&self, record: &VolumeRecord) -> Result<()>;
    /// Removes a record; removing a missing record is not an error.
    fn delete(&self, id: &str) -> Result<()>;
    /// Every record, sorted by id.
    fn list(&self) -> Result<Vec<VolumeRecord>>;
}

/// Which store a binary uses: the `--store` flag, `file:DIR` or
/// `kubernetes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    /// [`FileStore`] in this directory.
    File(PathBuf),
    /// [`crate::kube_store::KubeStore`], configured in-cluster or from
    /// `KUBECONFIG`.
    Kubernetes,
}

impl std::str::FromStr for StoreKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<StoreKind, String> {
        if s == "kubernetes" {
            return Ok(StoreKind::Kubernetes);
        }
        match s.strip_prefix("file:") {
            Some(dir) if !dir.is_empty() => Ok(StoreKind::File(PathBuf::from(dir))),
            _ => Err(format!(
                "{s:?}: expected file:DIR (e.g. file:/var/lib/tandem-csi/volumes) or kubernetes"
            )),
        }
    }
}

impl std::fmt::Display for StoreKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKind::File(dir) => write!(f, "file:{}", dir.display()),
            StoreKind::Kubernetes => f.write_str("kubernetes"),
        }
    }
}

impl StoreKind {
    /// Opens the store.
    pub fn open(&self) -> Result<std::sync::Arc<dyn VolumeStore>> {
        Ok(match self {
            StoreKind::File(dir) => std::sync::Arc::new(FileStore::open(dir)?),
            StoreKind::Kubernetes => std::sync::Arc::new(crate::kube_store::KubeStore::connect()?),
        })
    }
}

/// One `<id>.json` file per volume in a directory, written atomically
/// (temporary file, fsync, rename, fsync of the directory).
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

/// Whether `id` is safe as a file name and a tandemd export name.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl FileStore {
    /// Opens (creating if needed) the store directory.
    pub fn open(dir: &Path) -> Result<FileStore> {
        fs::create_dir_all(dir)
            .map_err(|e| Error::internal(format!("creating {}", dir.display()), e))?;
        Ok(FileStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: &str) -> Result<PathBuf> {
        if !valid_id(id) {
            return Err(Error::NotFound(format!("volume {id:?} does not exist")));
        }
        Ok(self.dir.join(format!("{id}.json")))
    }

    fn read(path: &Path) -> Result<VolumeRecord> {
        let text = fs::read_to_string(path).map_err(|e| Error::internal(path.display(), e))?;
        let rec: VolumeRecord = serde_json::from_str(&text).map_err(|e| {
            Error::internal(format!("{}: corrupt volume record", path.display()), e)
        })?;
        if rec.version > RECORD_VERSION {
            return Err(Error::Internal(format!(
                "{}: record version {} is newer than this driver's {RECORD_VERSION}",
                path.display(),
                rec.version
            )));
        }
        Ok(rec)
    }
}

impl VolumeStore for FileStore {
    fn get(&self, id: &str) -> Result<Option<VolumeRecord>> {
        let path = match self.path(id) {
            Ok(p) => p,
            Err(_) => return Ok(None),
        };
        if !path.exists() {
            return Ok(None);
        }
        Self::read(&path).map(Some)
    }

    fn put(&self, record: &VolumeRecord) -> Result<()> {
        let path = self.path(&record.id)?;
        let tmp = self.dir.join(format!(".{}.json.tmp", record.id));
        let ctx = |e: std::io::Error| Error::internal(format!("writing {}", path.display()), e);
        let json =
            serde_json::to_vec_pretty(record).map_err(|e| Error::internal("encoding record", e))?;
        let mut f = fs::File::create(&tmp).map_err(ctx)?;
        f.write_all(&json).map_err(ctx)?;
        f.sync_all().map_err(ctx)?;
        fs::rename(&tmp, &path).map_err(ctx)?;
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx)
    }

    fn delete(&self, id: &str) -> Result<()> {
        let path = self.path(id)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::internal(format!("removing {}", path.display()), e)),
        }
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::internal(self.dir.display(), e))
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        let rd = fs::read_dir(&self.dir).map_err(|e| Error::internal(self.dir.display(), e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::internal(self.dir.display(), e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            out.push(Self::read(&entry.path())?);
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: &str) -> VolumeRecord {
        VolumeRecord {
            version: RECORD_VERSION,
            id: id.into(),
            name: format!("name-{id}"),
            uuid: uuid::Uuid::nil(),
            size: 1 << 20,
            params: VolumeParams::default(),
            replicas: vec![Replica {
                node: "n1".into(),
                zone: "a".into(),
                address: None,
            }],
            witness: None,
            state: VolumeState::Creating,
            attachments: vec![],
            initialized_on: None,
            allow_two_primaries: false,
            witness_address: None,
            clients: vec![],
        }
    }

    #[test]
    fn file_store_round_trips_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.get("v1").unwrap(), None);
        s.put(&rec("v2")).unwrap();
        s.put(&rec("v1")).unwrap();
        let mut r = rec("v1");
        r.state = VolumeState::Ready;
        s.put(&r).unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        assert_eq!(s.get("v1").unwrap(), Some(r));
        assert_eq!(
            s.list()
                .unwrap()
                .iter()
                .map(|r| r.id.as_str())
                .collect::<Vec<_>>(),
            ["v1", "v2"]
        );
        s.delete("v1").unwrap();
        s.delete("v1").unwrap();
        assert_eq!(s.get("v1").unwrap(), None);
        // Ids that are not file-name safe never reach the file system.
        assert_eq!(s.get("../etc/passwd").unwrap(), None);
    }

    #[test]
    fn store_flag_parses_file_and_kubernetes() {
        assert_eq!(
            "file:/x/y".parse::<StoreKind>(),
            Ok(StoreKind::File("/x/y".into()))
        );
        assert_eq!("kubernetes".parse::<StoreKind>(), Ok(StoreKind::Kubernetes));
        for bad in ["", "file:", "/x/y", "k8s"] {
            let e = bad.parse::<StoreKind>().unwrap_err();
            assert!(e.contains("file:DIR"), "{e}");
        }
        assert_eq!(StoreKind::File("/x".into()).to_string(), "file:/x");
    }

    #[test]
    fn corrupt_or_newer_records_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("bad.json"), b"{not json").unwrap();
        let e = s.get("bad").unwrap_err();
        assert!(e.to_string().contains("bad.json"), "{e}");
        let mut r = rec("new");
        r.version = RECORD_VERSION + 1;
        fs::write(dir.path().join("new.json"), serde_json::to_vec(&r).unwrap()).unwrap();
        assert!(s.get("new").unwrap_err().to_string().contains("newer"));
    }
}
