//! The admin API: JSON lines over a root-only unix socket.
//!
//! Request: one JSON object per line, e.g. `{"cmd":"status"}`.
//! Response: one JSON object per line, `{"ok":true,...}` or
//! `{"ok":false,"error":"..."}`. `tandemctl` is the client.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::export::{ExportStatus, Exports};
use crate::nbd::server::{bind_unix, Shutdown};
use crate::storage::faulty::Fault;

/// An admin request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Status of every export.
    Status,
    /// Make this node Primary for a replicated export.
    Promote {
        /// Export name.
        export: String,
    },
    /// Make this node Secondary for a replicated export.
    Demote {
        /// Export name.
        export: String,
    },
    /// Resolve a split brain: this node volunteers to discard its data
    /// (it becomes the sync target at the next handshake; R24).
    Resolve {
        /// Export name.
        export: String,
        /// Discard this node's changes since the split (must be true; the
        /// field makes the intent explicit).
        discard_my_data: bool,
    },
    /// Start an online verify of a replicated export against its peers
    /// (R22); progress and result in the status (`peers[].verify`).
    Verify {
        /// Export name.
        export: String,
        /// Only this peer (default: every connected peer).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        peer: Option<String>,
        /// Mark the differing blocks for resync from this node.
        #[serde(default)]
        mark: bool,
    },
    /// Fault injection (tests, drills): from now on the export's local
    /// reads and/or writes fail with `EIO`, only inside `[offset,
    /// offset + len)` of the volume's data area when both are given, else
    /// everywhere (metadata included). Replaces an earlier fault.
    InjectFault {
        /// Export name.
        export: String,
        /// Fail reads.
        #[serde(default)]
        reads: bool,
        /// Fail writes, trims, write-zeroes (and flushes, without a range).
        #[serde(default)]
        writes: bool,
        /// Start of the range (data-area byte offset).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        /// Length of the range in bytes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        len: Option<u64>,
    },
    /// Ends fault injection on an export.
    ClearFault {
        /// Export name.
        export: String,
    },
    /// Grows a plain (unreplicated) export online to `size` bytes
    /// (`docs/operations.md`, "Growing a volume"). Shrinking is refused.
    Resize {
        /// Export name.
        export: String,
        /// New data-area size in bytes.
        size: u64,
    },
}

/// Daemon-wide status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// Daemon version.
    pub version: String,
    /// Listener addresses.
    pub listeners: Vec<String>,
    /// Exports.
    pub exports: Vec<ExportStatus>,
}

/// An admin response.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Error text when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Status, for `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// The peers a verify started with, for `verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Vec<String>>,
    /// The size before, for `resize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_size: Option<u64>,
}

/// Binds the admin socket with mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    let l = bind_unix(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("{}: chmod 0600", path.display()))?;
    Ok(l)
}

/// Serves admin requests until `shutdown`.
pub async fn serve(
    listener: UnixListener,
    exports: Arc<Exports>,
    listeners: Vec<String>,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let exports = exports.clone();
                    let listeners = listeners.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle(stream, &exports, &listeners).await {
                            debug!("admin connection: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

async fn handle(stream: UnixStream, exports: &Exports, listeners: &[String]) -> Result<()> {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Some(line) = lines.next_line().await? {
        let resp = match serde_json::from_str::<AdminRequest>(&line) {
            Ok(AdminRequest::Status) => {
                let mut list = Vec::new();
                for e in exports.iter() {
                    list.push(e.full_status().await);
                }
                AdminResponse {
                    ok: true,
                    error: None,
                    peers: None,
                    previous_size: None,
                    status: Some(Status {
                        version: env!("CARGO_PKG_VERSION").to_string(),
                        listeners: listeners.to_vec(),
                        exports: list,
                    }),
                }
            }
            Ok(AdminRequest::Promote { export }) => role_change(exports, &export, true).await,
            Ok(AdminRequest::Demote { export }) => role_change(exports, &export, false).await,
            Ok(AdminRequest::Resolve {
                export,
                discard_my_data,
            }) => resolve(exports, &export, discard_my_data).await,
            Ok(AdminRequest::Verify { export, peer, mark }) => {
                verify(exports, &export, peer.as_deref(), mark).await
            }
            Ok(AdminRequest::InjectFault {
                export,
                reads,
                writes,
                offset,
                len,
            }) => inject_fault(exports, &export, reads, writes, offset, len),
            Ok(AdminRequest::ClearFault { export }) => {
                inject_fault(exports, &export, false, false, None, None)
            }
            Ok(AdminRequest::Resize { export, size }) => resize(exports, &export, size).await,
            Err(e) => failure(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

async fn resize(exports: &Exports, name: &str, size: u64) -> AdminResponse {
    let Some(export) = exports.get(name).filter(|_| !name.is_empty()) else {
        return failure(format!("no export named {name:?}"));
    };
    if let Some(r) = &export.replicator {
        // R29: this node coordinates; every connected replica grows first.
        if let Err(e) = export.volume.check_grow(size).await {
            return failure(format!("resize refused: {e}"));
        }
        return match r.grow(size).await {
            Ok(Ok(rep)) => {
                let mut resp = AdminResponse {
                    ok: true,
                    error: None,
                    status: None,
                    peers: None,
                    previous_size: Some(rep.from),
                };
                if !rep.failed.is_empty() {
                    let names: Vec<String> = rep
                        .failed
                        .iter()
                        .map(|(p, why)| format!("{p}: {why}"))
                        .collect();
                    resp.error = Some(format!(
                        "grown, but these peers did not grow and are disconnected until grown to {size} bytes: {}",
                        names.join("; ")
                    ));
                }
                tracing::info!(export = %name, from = rep.from, to = size, "replicated export grown by admin request");
                resp
            }
            Ok(Err(e)) => failure(format!("resize refused: {e}")),
            Err(_) => failure(format!("export {name:?}: replication driver stopped")),
        };
    }
    match export.volume.grow(size).await {
        Ok(before) => {
            if before != size {
                tracing::info!(export = %name, from = before, to = size, "export grown by admin request");
            }
            AdminResponse {
                ok: true,
                error: None,
                status: None,
                peers: None,
                previous_size: Some(before),
            }
        }
        Err(e) => failure(format!("resize refused: {e}")),
    }
}

fn failure(error: String) -> AdminResponse {
    AdminResponse {
        ok: false,
        error: Some(error),
        status: None,
        peers: None,
        previous_size: None,
    }
}

async fn verify(exports: &Exports, name: &str, peer: Option<&str>, mark: bool) -> AdminResponse {
    let Some(export) = exports.get(name).filter(|_| !name.is_empty()) else {
        return failure(format!("no export named {name:?}"));
    };
    let Some(r) = &export.replicator else {
        return failure(format!("export {name:?} is not replicated"));
    };
    let names: Vec<String> = match peer {
        Some(p) if r.peer_id(p).is_none() => {
            return failure(format!("export {name:?} has no peer named {p:?}"))
        }
        Some(p) => vec![p.to_string()],
        None => r.peer_names().to_vec(),
    };
    let mut started = Vec::new();
    let mut errors = Vec::new();
    for n in names {
        let Some(id) = r.peer_id(&n) else { continue };
        match r.verify(id, mark).await {
            Ok(Ok(())) => started.push(n),
            // Without a named peer, peers that are not connected are skipped.
            Ok(Err(tandem_core::repl::VerifyError::NotConnected(_))) if peer.is_none() => {}
            Ok(Err(e)) => errors.push(format!("{n}: {e}")),
            Err(e) => return failure(e.to_string()),
        }
    }
    if started.is_empty() {
        if errors.is_empty() {
            return failure(format!("export {name:?}: no peer is connected"));
        }
        return failure(format!("verify refused: {}", errors.join("; ")));
    }
    tracing::info!(export = %name, peers = ?started, mark, "online verify started by admin request");
    AdminResponse {
        ok: true,
        error: if errors.is_empty() {
            None
        } else {
            Some(errors.join("; "))
        },
        status: None,
        peers: Some(started),
        previous_size: None,
    }
}

async fn resolve(exports: &Exports, name: &str, discard_my_data: bool) -> AdminResponse {
    let Some(export) = exports.get(name).filter(|_| !name.is_empty()) else {
        return failure(format!("no export named {name:?}"));
    };
    let Some(r) = &export.replicator else {
        return failure(format!("export {name:?} is not replicated"));
    };
    if !discard_my_data {
        return failure(
            "resolve needs discard_my_data: run it on the node whose changes are to be discarded"
                .into(),
        );
    }
    match r.resolve(true).await {
        Ok(Ok(())) => {
            tracing::warn!(export = %name, "split brain: this node will discard its changes at the next handshake");
            AdminResponse {
                ok: true,
                error: None,
                status: None,
                peers: None,
                previous_size: None,
            }
        }
        Ok(Err(e)) => failure(format!("resolve refused: {e}")),
        Err(e) => failure(e.to_string()),
    }
}

async fn role_change(exports: &Exports, name: &str, promote: bool) -> AdminResponse {
    let Some(export) = exports.get(name).filter(|_| !name.is_empty()) else {
        return failure(format!("no export named {name:?}"));
    };
    let Some(r) = &export.replicator else {
        return failure(format!("export {name:?} is not replicated"));
    };
    let res = if promote {
        r.promote().await
    } else {
        r.demote().await
    };
    match res {
        Ok(Ok(())) => {
            tracing::info!(export = %name, promote, "role changed by admin request");
            AdminResponse {
                ok: true,
                error: None,
                status: None,
                peers: None,
                previous_size: None,
            }
        }
        Ok(Err(e)) => failure(format!(
            "{}: {e}",
            if promote {
                "promote refused"
            } else {
                "demote refused"
            }
        )),
        Err(e) => failure(e.to_string()),
    }
}

fn inject_fault(
    exports: &Exports,
    name: &str,
    reads: bool,
    writes: bool,
    offset: Option<u64>,
    len: Option<u64>,
) -> AdminResponse {
    let Some(export) = exports.get(name).filter(|_| !name.is_empty()) else {
        return failure(format!("no export named {name:?}"));
    };
    let sb = export.volume.superblock();
    let range = match (offset, len) {
        (None, None) => None,
        (Some(o), Some(l)) if l > 0 && o.checked_add(l).is_some_and(|e| e <= sb.size) => {
            Some((sb.data_offset + o, sb.data_offset + o + l))
        }
        (Some(_), Some(_)) => {
            return failure(format!(
                "fault range must be non-empty and inside the volume ({} bytes)",
                sb.size
            ))
        }
        _ => return failure("give both offset and len, or neither".into()),
    };
    let fault = Fault {
        reads,
        writes,
        range,
    };
    export.faults.set(fault);
    if reads || writes {
        warn!(export = %name, reads, writes, ?offset, ?len, "fault injection armed by admin request: local I/O will fail with EIO");
    } else {
        tracing::info!(export = %name, "fault injection cleared by admin request");
    }
    AdminResponse {
        ok: true,
        error: None,
        status: None,
        peers: None,
        previous_size: None,
    }
}

/// Client side: sends one request and returns the response.
pub async fn call(path: &Path, req: &AdminRequest) -> Result<AdminResponse> {
    let stream = UnixStream::connect(path).await.with_context(|| {
        format!(
            "connecting to the admin socket {} (is tandemd running? try --admin-socket)",
            path.display()
        )
    })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    w.write_all(&line).await?;
    let mut lines = BufReader::new(r).lines();
    let resp = lines
        .next_line()
        .await?
        .context("tandemd closed the admin connection without answering")?;
    serde_json::from_str(&resp).context("malformed admin response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::Export;
    use crate::storage::faulty::{FaultSwitch, FaultyEngine};
    use crate::storage::memory::MemoryEngine;
    use crate::storage::{Engine, IoBuf};
    use crate::volume::Volume;
    use tandem_core::superblock::Superblock;

    /// One export "v" of 1 MiB on a faulty memory engine.
    async fn exports() -> (Exports, Arc<Volume>) {
        let sb = Superblock::new([3; 16], "v", 1 << 20, 512, 0).expect("superblock");
        let mem = MemoryEngine::new(sb.backing_len());
        crate::volume::create(&mem, Path::new("mem"), sb, false)
            .await
            .expect("create");
        let switch = FaultSwitch::new();
        let engine: Arc<dyn Engine> = Arc::new(FaultyEngine::new(Arc::new(mem), switch.clone()));
        let v = Arc::new(
            Volume::open(engine, Path::new("mem"), &Default::default(), false)
                .await
                .expect("open"),
        );
        let mut e = Export::new("v".into(), String::new(), v.clone());
        e.faults = switch;
        (Exports::new(vec![Arc::new(e)]), v)
    }

    async fn write_ok(v: &Volume, at: u64) -> bool {
        v.write(at, IoBuf::from_slice(&[1; 512]), false)
            .await
            .1
            .is_ok()
    }

    #[tokio::test]
    async fn inject_fault_works_in_volume_offsets_and_checks_its_range() {
        let (ex, v) = exports().await;
        // A range is in bytes of the volume's data area.
        let r = inject_fault(&ex, "v", false, true, Some(4096), Some(512));
        assert!(r.ok, "{:?}", r.error);
        assert!(write_ok(&v, 0).await);
        assert!(!write_ok(&v, 4096).await);
        assert!(write_ok(&v, 4608).await);
        // Bad ranges and names are refused, the fault in force stays.
        for (o, l) in [
            (Some(0), Some(0)),
            (Some(1 << 20), Some(512)),
            (Some(0), None),
        ] {
            let r = inject_fault(&ex, "v", true, true, o, l);
            assert!(!r.ok, "{o:?} {l:?}");
        }
        assert!(!inject_fault(&ex, "nope", true, true, None, None).ok);
        assert!(!write_ok(&v, 4096).await);
        // Cleared: everything works again.
        assert!(inject_fault(&ex, "v", false, false, None, None).ok);
        assert!(write_ok(&v, 4096).await);
        // The request JSON the CLI sends.
        let req: AdminRequest = serde_json::from_str(
            r#"{"cmd":"inject_fault","export":"v","reads":true,"writes":false,"offset":0,"len":4096}"#,
        )
        .expect("parse");
        assert!(matches!(
            req,
            AdminRequest::InjectFault {
                reads: true,
                writes: false,
                offset: Some(0),
                len: Some(4096),
                ..
            }
        ));
        let req: AdminRequest =
            serde_json::from_str(r#"{"cmd":"clear_fault","export":"v"}"#).expect("parse");
        assert!(matches!(req, AdminRequest::ClearFault { .. }));
    }
}
