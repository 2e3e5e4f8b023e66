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
            Err(e) => failure(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&resp)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
    Ok(())
}

fn failure(error: String) -> AdminResponse {
    AdminResponse {
        ok: false,
        error: Some(error),
        status: None,
        peers: None,
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
