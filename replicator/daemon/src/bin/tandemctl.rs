//! `tandemctl`: create and inspect volumes, query a running tandemd.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tandem_core::superblock::{self, Superblock, SUPERBLOCK_SIZE};
use tandem_daemon::admin::{self, AdminRequest};
use tandem_daemon::config::DEFAULT_ADMIN_SOCKET;
use tandem_daemon::storage::{sync::SyncEngine, Backing, BackingKind, DirectIo};

/// Tandem control tool.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Format a backing file or block device as a new volume.
    Create {
        /// Backing path (a file is created or extended; a block device is used whole).
        backing: PathBuf,
        /// Data size (e.g. 10G). Default for a block device: all of it minus metadata.
        #[arg(long, value_parser = tandem_daemon::parse_size)]
        size: Option<u64>,
        /// Volume name (at most 64 bytes).
        #[arg(long)]
        name: String,
        /// Logical block size: 512 or 4096.
        #[arg(long, default_value_t = 512)]
        block_size: u32,
        /// Volume UUID (default: random). Replicas of one volume share it.
        #[arg(long)]
        uuid: Option<String>,
        /// Overwrite an existing Tandem volume.
        #[arg(long)]
        force: bool,
        /// Create the replica Inconsistent: it holds no data yet and takes
        /// a full sync (all-zero regions skipped) from an UpToDate Primary
        /// when it connects. For a replica added to, or rebuilt for, a
        /// volume that already holds data. Without it every new replica is
        /// UpToDate (a new volume is all zeroes on every site).
        #[arg(long)]
        inconsistent: bool,
    },
    /// Print a backing's superblock.
    Inspect {
        /// Backing path.
        backing: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Make this node Primary for a replicated export.
    Promote {
        /// Export name.
        export: String,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Make this node Secondary for a replicated export.
    Demote {
        /// Export name.
        export: String,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Grow a volume. Online (default): a plain (unreplicated) export of
    /// the running tandemd; the backing is extended, the new area reads as
    /// zeroes, new NBD connections see the new size (existing ones keep the
    /// old one). With --offline: the backing of a stopped tandemd, e.g. each
    /// replica of a replicated volume in turn (they connect again once both
    /// have the same size). Shrinking is refused.
    Resize {
        /// Export name; with --offline, the backing file or device.
        target: PathBuf,
        /// New size (bytes, or with a K/M/G/T suffix).
        #[arg(value_parser = tandem_daemon::parse_size)]
        size: u64,
        /// Grow the backing TARGET directly (no tandemd may be using it).
        #[arg(long)]
        offline: bool,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Resolve a split brain by discarding this node's changes since the
    /// split: at the next handshake this node becomes the sync target and
    /// takes the peer's data (a bitmap-based resync). Run it on the node
    /// whose writes are to be thrown away, while it is Secondary.
    Resolve {
        /// Export name.
        export: String,
        /// Required: confirms that this node's changes are discarded.
        #[arg(long)]
        discard_my_data: bool,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Fault injection (tests, drills): make the export's local disk fail
    /// reads and/or writes with EIO, optionally only in a byte range of the
    /// volume. A replicated export then detaches its disk (docs/replication.md, R23).
    InjectFault {
        /// Export name.
        export: String,
        /// Fail reads.
        #[arg(long)]
        reads: bool,
        /// Fail writes, trims, write-zeroes (and flushes, without a range).
        #[arg(long)]
        writes: bool,
        /// Start of the failing range (bytes into the volume); needs --len.
        #[arg(long, requires = "len")]
        offset: Option<u64>,
        /// Length of the failing range in bytes; needs --offset.
        #[arg(long, requires = "offset")]
        len: Option<u64>,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// End fault injection on an export.
    ClearFault {
        /// Export name.
        export: String,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Show a running tandemd's exports: role, disk state, counters and,
    /// per peer, connection, replication, peer disk, requests in flight and
    /// bytes out of sync (like `drbdadm status`).
    Status {
        /// Only this export (default: all).
        export: Option<String>,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Compare this node's data with its peers' by checksum while I/O
    /// continues (online verify, run on the Primary) and report the byte
    /// ranges that differ; with --mark, resync them from this node.
    Verify {
        /// Export name.
        export: String,
        /// Only this peer (default: every connected peer).
        #[arg(long)]
        peer: Option<String>,
        /// Mark the differing blocks for resync from this node (the
        /// connection is re-established and a resync moves them).
        #[arg(long)]
        mark: bool,
        /// Wait until the verify finished and print its result (otherwise
        /// it runs in the background: see `tandemctl status`).
        #[arg(long)]
        wait: bool,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// Admin socket of the daemon.
        #[arg(long, default_value = DEFAULT_ADMIN_SOCKET)]
        admin_socket: PathBuf,
    },
    /// Manage the cluster CA that signs node certificates (peer mutual TLS).
    #[command(subcommand)]
    Ca(tandem_daemon::transport::certs::CaCommand),
    /// Issue node certificates signed by the cluster CA.
    #[command(subcommand)]
    Cert(tandem_daemon::transport::certs::CertCommand),
}

fn main() {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandemctl: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(real_main(cli)) {
        eprintln!("tandemctl: {e:#}");
        std::process::exit(1);
    }
}

async fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::Create {
            backing,
            size,
            name,
            block_size,
            uuid,
            force,
            inconsistent,
        } => {
            let uuid = match uuid {
                Some(u) => superblock::parse_uuid(&u)
                    .with_context(|| format!("--uuid {u:?} is not a UUID"))?,
                None => *uuid::Uuid::new_v4().as_bytes(),
            };
            let is_blockdev = std::fs::metadata(&backing)
                .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
                .unwrap_or(false);
            let size = match (size, is_blockdev) {
                (Some(s), _) => s,
                (None, true) => {
                    let b = Backing::open(&backing, DirectIo::Off, true, 512)?;
                    let len = b.len();
                    // Largest size whose metadata area still fits.
                    let mut s = len.saturating_sub(superblock::metadata_area_size(len));
                    s -= s % u64::from(block_size);
                    s
                }
                (None, false) => bail!("--size is required for a file backing"),
            };
            let size = size.div_ceil(u64::from(block_size)) * u64::from(block_size);
            let sb = Superblock::new(
                uuid,
                &name,
                size,
                block_size,
                tandem_daemon::demo::unix_now(),
            )
            .map_err(|e| anyhow::anyhow!("{}: {e}", backing.display()))?;
            if !is_blockdev {
                Backing::create_file(&backing, sb.backing_len())?;
            }
            let b = Backing::open(&backing, DirectIo::Off, false, block_size)?;
            b.lock(true)?;
            if b.kind() == BackingKind::BlockDevice && b.len() < sb.backing_len() {
                bail!(
                    "{}: device has {} bytes, the volume needs {}",
                    backing.display(),
                    b.len(),
                    sb.backing_len()
                );
            }
            let engine = SyncEngine::new(b);
            let sb = tandem_daemon::volume::create(&engine, &backing, sb, force).await?;
            if inconsistent {
                let mut rec = tandem_core::meta::MetaRecord::initial(
                    tandem_core::meta::DEFAULT_CHUNK,
                    tandem_core::repl::DiskState::Inconsistent,
                );
                rec.seq = 1;
                for off in tandem_core::meta::RECORD_OFFSETS {
                    let (_, res) = tandem_daemon::storage::Engine::write(
                        &engine,
                        off,
                        tandem_daemon::storage::IoBuf::from_slice(&rec.encode()),
                        true,
                    )
                    .await;
                    res.with_context(|| {
                        format!("{}: writing replica metadata", backing.display())
                    })?;
                }
            }
            println!(
                "created volume {:?} {} on {}: {} bytes, block size {}, data offset {}{}",
                sb.name,
                sb.uuid_string(),
                backing.display(),
                sb.size,
                sb.block_size,
                sb.data_offset,
                if inconsistent {
                    ", Inconsistent (waits for a full sync)"
                } else {
                    ""
                }
            );
        }
        Cmd::Inspect { backing, json } => {
            use std::io::Read;
            let mut buf = vec![0u8; 2 * SUPERBLOCK_SIZE];
            std::fs::File::open(&backing)
                .and_then(|mut f| f.read_exact(&mut buf))
                .with_context(|| format!("{}: reading superblocks", backing.display()))?;
            let sel = superblock::select(&buf[..SUPERBLOCK_SIZE], &buf[SUPERBLOCK_SIZE..])
                .map_err(|e| anyhow::anyhow!("{}: {e}", backing.display()))?;
            let sb = &sel.superblock;
            let other = sel.other_error.as_ref().map(|e| e.to_string());
            if json {
                let v = serde_json::json!({
                    "name": sb.name, "uuid": sb.uuid_string(), "size": sb.size,
                    "block_size": sb.block_size, "data_offset": sb.data_offset,
                    "format_version": sb.format_version, "seq": sb.seq,
                    "created_unix_secs": sb.created_unix_secs,
                    "copy_in_use": if sel.index == 0 { "A" } else { "B" }, "other_copy_error": other,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("volume:        {}", sb.name);
                println!("uuid:          {}", sb.uuid_string());
                println!("size:          {} bytes ({} MiB)", sb.size, sb.size >> 20);
                println!("block size:    {}", sb.block_size);
                println!("data offset:   {}", sb.data_offset);
                println!(
                    "format:        version {}, sequence {}",
                    sb.format_version, sb.seq
                );
                println!("copy in use:   {}", ["A", "B"][sel.index]);
                println!("other copy:    {}", other.as_deref().unwrap_or("ok"));
            }
        }
        Cmd::InjectFault {
            export,
            reads,
            writes,
            offset,
            len,
            admin_socket,
        } => {
            if !reads && !writes {
                bail!("give --reads, --writes or both");
            }
            let resp = admin::call(
                &admin_socket,
                &AdminRequest::InjectFault {
                    export: export.clone(),
                    reads,
                    writes,
                    offset,
                    len,
                },
            )
            .await?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{export}: fault injected (reads {reads}, writes {writes})");
        }
        Cmd::ClearFault {
            export,
            admin_socket,
        } => {
            let resp = admin::call(
                &admin_socket,
                &AdminRequest::ClearFault {
                    export: export.clone(),
                },
            )
            .await?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{export}: fault cleared");
        }
        Cmd::Promote {
            export,
            admin_socket,
        } => {
            let resp = admin::call(
                &admin_socket,
                &AdminRequest::Promote {
                    export: export.clone(),
                },
            )
            .await?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{export}: Primary");
        }
        Cmd::Demote {
            export,
            admin_socket,
        } => {
            let resp = admin::call(
                &admin_socket,
                &AdminRequest::Demote {
                    export: export.clone(),
                },
            )
            .await?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{export}: Secondary");
        }
        Cmd::Resize {
            target,
            size,
            offline: true,
            ..
        } => {
            let b = Backing::open(&target, DirectIo::Off, false, 512)?;
            b.lock(true)?;
            let engine = std::sync::Arc::new(SyncEngine::new(b));
            let v = tandem_daemon::volume::Volume::open(
                engine,
                &target,
                &tandem_daemon::volume::Expect::default(),
                false,
            )
            .await?;
            let before = v.grow(size).await?;
            if before == size {
                println!("{}: already {size} bytes", target.display());
            } else {
                println!("{}: grown from {before} to {size} bytes", target.display());
            }
        }
        Cmd::Resize {
            target,
            size,
            admin_socket,
            ..
        } => {
            let export = target.display().to_string();
            let resp = admin::call(
                &admin_socket,
                &AdminRequest::Resize {
                    export: export.clone(),
                    size,
                },
            )
            .await?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            match resp.previous_size {
                Some(before) if before != size => {
                    println!("{export}: grown from {before} to {size} bytes")
                }
                _ => println!("{export}: already {size} bytes"),
            }
            if let Some(warning) = resp.error {
                eprintln!("warning: {warning}");
            }
        }
        Cmd::Resolve {
            export,
            discard_my_data,
            admin_socket,
        } => {
            if !discard_my_data {
                bail!("resolve discards this node's changes since the split; say so with --discard-my-data (run it on the node to discard)");
            }
            let resp = admin::call(
                &admin_socket,
                &AdminRequest::Resolve {
                    export: export.clone(),
                    discard_my_data,
                },
            )
            .await?;
            if !resp.ok {
                bail!("{}", resp.error.unwrap_or_default());
            }
            println!("{export}: this node discards its changes at the next handshake and resyncs from its peer");
        }
        Cmd::Status {
            export,
            admin_socket,
            json,
        } => {
            let resp = admin::call(&admin_socket, &AdminRequest::Status).await?;
            if !resp.ok {
                bail!("tandemd: {}", resp.error.unwrap_or_default());
            }
            let mut st = resp.status.context("tandemd sent no status")?;
            if let Some(name) = &export {
                st.exports.retain(|e| &e.name == name);
                if st.exports.is_empty() {
                    bail!("no export named {name:?}");
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
                return Ok(());
            }
            print!("{}", human_status(&st));
        }
        Cmd::Verify {
            export,
            peer,
            mark,
            wait,
            json,
            admin_socket,
        } => verify(&admin_socket, &export, peer, mark, wait, json).await?,
        Cmd::Ca(cmd) => println!("{}", cmd.run()?),
        Cmd::Cert(cmd) => println!("{}", cmd.run()?),
    }
    Ok(())
}

/// `tandemctl status` without `--json`: one line per export, its counters,
/// and for a replicated export one line per peer, e.g.
/// `  beta role:Secondary connection:Connected replication:Established
/// peer-disk:UpToDate in-flight:0 out-of-sync:0B` (on one line).
fn human_status(st: &admin::Status) -> String {
    use std::fmt::Write;
    use tandem_daemon::format_size;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "tandemd {}  listening on {}",
        st.version,
        st.listeners.join(", ")
    );
    for e in &st.exports {
        let (role, disk) = e.replication.as_ref().map_or(("Primary", "UpToDate"), |r| {
            if r.detached {
                (r.role.as_str(), "Diskless(detached: local disk failed)")
            } else {
                (r.role.as_str(), r.disk.as_str())
            }
        });
        let _ = writeln!(
            o,
            "{} role:{role} disk:{disk}{}  size:{}  engine:{}  backing:{}",
            e.name,
            if e.read_only { " read-only" } else { "" },
            format_size(e.size),
            e.engine,
            e.backing
        );
        let _ = writeln!(
            o,
            "  connections:{} reads:{} ({}) writes:{} ({}) flushes:{} discards:{} invalid:{} io-errors:{}",
            e.connections,
            e.reads,
            format_size(e.read_bytes),
            e.writes,
            format_size(e.write_bytes),
            e.flushes,
            e.discards,
            e.invalid,
            e.io_errors
        );
        if let Some(r) = &e.replication {
            let _ = writeln!(o, "  in-flight:{} conflicts:{}", r.in_flight, r.conflicts);
            if let Some(q) = r.quorum.as_ref().filter(|q| q.witness || q.held > 0) {
                let _ = writeln!(
                    o,
                    "  quorum: witness:{} holder:{} held-writes:{} writes-alone:{}{}",
                    if !q.witness {
                        "none"
                    } else if q.witness_connected {
                        "connected"
                    } else {
                        "UNREACHABLE"
                    },
                    q.holder.as_deref().unwrap_or("-"),
                    q.held,
                    q.solo_granted,
                    if q.outdated {
                        " (OUTDATED by the witness: resync needed before promotion)"
                    } else if q.held > 0 {
                        " (SUSPENDED: writes wait for a peer or the witness)"
                    } else {
                        ""
                    }
                );
            }
            if r.discard_my_data {
                let _ = writeln!(
                    o,
                    "  discard-my-data: this node resyncs from its peer at the next handshake"
                );
            }
            for p in &r.peers {
                let _ = writeln!(
                    o,
                    "  {} role:{} connection:{} replication:{} peer-disk:{} in-flight:{} out-of-sync:{}{}",
                    p.name,
                    p.role,
                    p.connection,
                    p.replication,
                    p.disk,
                    p.in_flight,
                    format_size(p.out_of_sync_bytes),
                    if p.split_brain {
                        " (SPLIT BRAIN: both sides wrote while apart; refusing to connect)"
                    } else if p.outdated && p.sync.is_none() {
                        " (outdated: needs resync)"
                    } else {
                        ""
                    }
                );
                if let Some(s) = &p.sync {
                    // Blocks found identical by checksum (R26) count as done.
                    let covered = s.done_bytes + s.identical_bytes;
                    let total = covered + s.remaining_bytes;
                    if s.role == "SyncSource" && total > 0 {
                        let pct = covered as f64 * 100.0 / total as f64;
                        let filled = (pct / 5.0) as usize;
                        let _ = writeln!(
                            o,
                            "    {}: [{}{}] {:.1}% {} of {}{}",
                            s.role,
                            "#".repeat(filled),
                            ".".repeat(20 - filled.min(20)),
                            pct,
                            format_size(covered),
                            format_size(total),
                            s.eta_secs.map_or(String::new(), |e| format!("  eta {e}s"))
                        );
                        if s.compared_bytes > 0 {
                            let _ = writeln!(
                                o,
                                "    checksums: {} compared, {} identical (not sent), {} sent",
                                format_size(s.compared_bytes),
                                format_size(s.identical_bytes),
                                format_size(s.done_bytes)
                            );
                        }
                    } else {
                        let _ =
                            writeln!(o, "    {}: {} received", s.role, format_size(s.done_bytes));
                    }
                }
                if let Some(v) = &p.verify {
                    let state = match (&v.aborted, v.finished) {
                        (Some(why), _) => format!("aborted ({why})"),
                        (None, true) => "finished".to_string(),
                        (None, false) => "running".to_string(),
                    };
                    let _ = writeln!(
                        o,
                        "    verify: {state} {} of {} compared, {} in {} range(s) differ{}",
                        format_size(v.done_bytes),
                        format_size(v.total_bytes),
                        format_size(v.differing_bytes),
                        v.ranges.len(),
                        if v.marked { ", marked for resync" } else { "" }
                    );
                }
            }
        }
    }
    o
}

/// `tandemctl verify`: starts an online verify and, with `wait`, polls the
/// status until it finished and prints the differing ranges.
async fn verify(
    admin_socket: &std::path::Path,
    export: &str,
    peer: Option<String>,
    mark: bool,
    wait: bool,
    json: bool,
) -> Result<()> {
    use tandem_daemon::export::VerifyJson;
    use tandem_daemon::format_size;
    let resp = admin::call(
        admin_socket,
        &AdminRequest::Verify {
            export: export.to_string(),
            peer,
            mark,
        },
    )
    .await?;
    if !resp.ok {
        bail!("{}", resp.error.unwrap_or_default());
    }
    if let Some(e) = &resp.error {
        eprintln!("tandemctl: some peers refused: {e}");
    }
    let peers = resp.peers.unwrap_or_default();
    if !wait {
        if json {
            println!(
                "{}",
                serde_json::json!({ "export": export, "started": peers })
            );
        } else {
            println!(
                "{export}: online verify started with {} (see `tandemctl status {export}`)",
                peers.join(", ")
            );
        }
        return Ok(());
    }
    let results: Vec<(String, VerifyJson)> = loop {
        let resp = admin::call(admin_socket, &AdminRequest::Status).await?;
        if !resp.ok {
            bail!("tandemd: {}", resp.error.unwrap_or_default());
        }
        let st = resp.status.context("tandemd sent no status")?;
        let e = st
            .exports
            .iter()
            .find(|e| e.name == export)
            .with_context(|| format!("no export named {export:?}"))?;
        let r = e
            .replication
            .as_ref()
            .with_context(|| format!("export {export:?} is not replicated"))?;
        let got: Vec<(String, VerifyJson)> = r
            .peers
            .iter()
            .filter(|p| peers.contains(&p.name))
            .filter_map(|p| p.verify.clone().map(|v| (p.name.clone(), v)))
            .collect();
        if got.len() == peers.len() && got.iter().all(|(_, v)| v.finished) {
            break got;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    if json {
        let map: serde_json::Map<String, serde_json::Value> = results
            .iter()
            .map(|(n, v)| Ok((n.clone(), serde_json::to_value(v)?)))
            .collect::<Result<_>>()?;
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "export": export, "peers": map }))?
        );
    } else {
        for (name, v) in &results {
            let secs = v.elapsed_ms as f64 / 1000.0;
            if let Some(why) = &v.aborted {
                println!(
                    "{export} vs {name}: ABORTED after {} of {} ({why})",
                    format_size(v.done_bytes),
                    format_size(v.total_bytes)
                );
                continue;
            }
            if v.ranges.is_empty() {
                println!(
                    "{export} vs {name}: identical ({} compared in {secs:.1}s{})",
                    format_size(v.done_bytes),
                    skipped_note(v.skipped_bytes)
                );
                continue;
            }
            println!(
                "{export} vs {name}: {} in {} range(s) differ ({} compared in {secs:.1}s{})",
                format_size(v.differing_bytes),
                v.ranges.len(),
                format_size(v.done_bytes),
                skipped_note(v.skipped_bytes)
            );
            for (s, e) in &v.ranges {
                println!("  {s}-{e} ({})", format_size(e - s));
            }
            if v.marked {
                println!("  marked for resync from this node");
            }
        }
    }
    if let Some((name, v)) = results.iter().find(|(_, v)| v.aborted.is_some()) {
        bail!(
            "verify with {name} aborted: {}",
            v.aborted.as_deref().unwrap_or_default()
        );
    }
    Ok(())
}

fn skipped_note(skipped: u64) -> String {
    if skipped == 0 {
        String::new()
    } else {
        format!(
            "; {} kept being written and were not compared",
            tandem_daemon::format_size(skipped)
        )
    }
}
