//! `tandemd demo`: the README's one-command demo of what Tandem is for.
//!
//! On loopback, with temporary backing files and a throw-away CA, it starts
//! three real processes — site A (`alpha`, Primary), site B (`beta`) and a
//! witness — runs a workload through A's NBD export, kills A with SIGKILL,
//! lets B promote itself with the witness's agreement, verifies every
//! acknowledged write on B, brings A back, and waits until B has resynced
//! it. It prints a timeline with the measured failover time and how much
//! the resync moved, and compares both sites' data areas at the end.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use tandem_core::superblock::Superblock;

use crate::admin::{self, AdminRequest};
use crate::demo::Timeline;
use crate::export::ReplicationStatus;
use crate::nbd::client::Client;
use crate::storage::{sync::SyncEngine, Backing, DirectIo};
use crate::transport::certs;

/// `tandemd demo` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SitesArgs {
    /// Volume size.
    #[arg(long, default_value = "256M", value_parser = crate::parse_size)]
    pub size: u64,
    /// How long the workload runs on site A before it is killed.
    #[arg(long, default_value = "3s", value_parser = crate::config::parse_duration)]
    pub workload: Duration,
    /// Directory for backings, certificates, sockets and logs (default: a
    /// new temporary directory, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Run the single-node demo instead (create, serve, write, restart,
    /// verify).
    #[arg(long)]
    pub single_node: bool,
    /// Single-node demo: keep serving after the checks until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
}

/// One site (or the witness): a child `tandemd`, killed on drop.
struct Proc {
    name: &'static str,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("finding the tandemd binary")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(exe)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(pid) = i32::try_from(c.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(c) = &mut self.child {
            if let Ok(Some(st)) = c.try_wait() {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "{} exited ({st}); last log lines:\n{}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
    Ok(s.local_addr()?.port())
}

async fn replication(admin_socket: &Path) -> Result<ReplicationStatus> {
    let resp = admin::call(admin_socket, &AdminRequest::Status).await?;
    let st = resp.status.context("no status")?;
    st.exports
        .into_iter()
        .next()
        .and_then(|e| e.replication)
        .context("the export is not replicated")
}

async fn wait_for<F, Fut>(
    what: &str,
    timeout: Duration,
    procs: &mut [&mut Proc],
    mut f: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if f().await {
            return Ok(());
        }
        for p in procs.iter_mut() {
            p.check_alive()?;
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes a node sent as sync source, from its log file.
fn resynced_bytes(log: &Path) -> u64 {
    resynced_bytes_in_log(&std::fs::read_to_string(log).unwrap_or_default())
}

/// Bytes a node sent as sync source in finished resyncs, from its log text
/// (`SyncFinished { .., role: Source, bytes: N }` events).
pub fn resynced_bytes_in_log(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("SyncFinished") && l.contains("role: Source"))
        .filter_map(|l| {
            let rest = &l[l.find("bytes: ")? + 7..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..end].parse::<u64>().ok()
        })
        .sum()
}

fn data_crc(backing: &Path, size: u64) -> Result<u32> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(backing)?;
    let mut head = vec![0u8; 4096];
    f.read_exact(&mut head)?;
    let sb =
        Superblock::decode(&head).map_err(|e| anyhow::anyhow!("{}: {e}", backing.display()))?;
    f.seek(SeekFrom::Start(sb.data_offset))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(h.finalize())
}

/// Runs the two-site demo.
pub async fn run(args: SitesArgs) -> Result<()> {
    let t = Timeline(Instant::now());
    let (dir, _guard) = crate::demo::work_dir(args.dir.as_ref())?;
    let size = args.size.div_ceil(1 << 20) * (1 << 20);
    println!("Tandem demo: one volume on two sites (alpha, beta) and a witness, on loopback.");
    println!(
        "Every write is on both sites before it is acknowledged; losing a site loses nothing."
    );

    // A throw-away cluster CA and a certificate per node.
    let certs_dir = dir.join("certs");
    let ca = certs::create_ca("tandem demo CA", Duration::from_secs(86400))?;
    ca.write(&certs_dir, true)?;
    let now = SystemTime::now();
    for n in ["alpha", "beta", "witness"] {
        certs::issue_node_cert(
            &ca,
            n,
            now - Duration::from_secs(300),
            now + Duration::from_secs(86400),
        )?
        .write(&certs_dir)?;
    }

    // The same volume (same UUID) on both sites.
    let uuid = *uuid::Uuid::new_v4().as_bytes();
    for site in ["alpha", "beta"] {
        let backing = dir.join(format!("{site}.img"));
        let sb = Superblock::new(uuid, "demo", size, 512, crate::demo::unix_now())?;
        Backing::create_file(&backing, sb.backing_len())?;
        let engine = SyncEngine::new(Backing::open(&backing, DirectIo::Off, false, 512)?);
        crate::volume::create(&engine, &backing, sb, false).await?;
    }
    let (pa, pb, pw) = (free_udp_port()?, free_udp_port()?, free_udp_port()?);
    let ca_path = certs::CaFiles::cert_path(&certs_dir);
    let config = |me: &str, role: &str, port: u16, peer: &str, peer_port: u16| {
        format!(
            r#"[nbd]
unix = "{dir}/{me}-nbd.sock"
[admin]
socket = "{dir}/{me}-admin.sock"
[[export]]
name = "demo"
backing = "{dir}/{me}.img"
direct = "off"
[export.replication]
node = "{me}"
listen = "127.0.0.1:{port}"
cert = "{certs}/{me}.crt"
key = "{certs}/{me}.key"
ca = "{ca}"
role = "{role}"
witness = {{ name = "witness", address = "127.0.0.1:{pw}" }}
failover_timeout = "1s"
peers = [{{ name = "{peer}", address = "127.0.0.1:{peer_port}" }}]
"#,
            dir = dir.display(),
            certs = certs_dir.display(),
            ca = ca_path.display(),
        )
    };
    std::fs::write(
        dir.join("alpha.toml"),
        config("alpha", "primary", pa, "beta", pb),
    )?;
    std::fs::write(
        dir.join("beta.toml"),
        config("beta", "secondary", pb, "alpha", pa),
    )?;
    let s = |p: PathBuf| p.display().to_string();
    let mut witness = Proc {
        name: "witness",
        args: vec![
            "witness".into(),
            "--listen".into(),
            format!("127.0.0.1:{pw}"),
            "--allow".into(),
            "alpha,beta".into(),
            "--cert".into(),
            s(certs_dir.join("witness.crt")),
            "--key".into(),
            s(certs_dir.join("witness.key")),
            "--ca".into(),
            s(ca_path.clone()),
            "--state".into(),
            s(dir.join("witness.json")),
        ],
        log: dir.join("witness.log"),
        child: None,
    };
    let site = |name: &'static str| Proc {
        name,
        args: vec![
            "run".into(),
            "--config".into(),
            s(dir.join(format!("{name}.toml"))),
        ],
        log: dir.join(format!("{name}.log")),
        child: None,
    };
    let (mut a, mut b) = (site("alpha"), site("beta"));
    witness.start()?;
    a.start()?;
    b.start()?;
    let (adm_a, adm_b) = (dir.join("alpha-admin.sock"), dir.join("beta-admin.sock"));
    wait_for(
        "both sites and the witness to connect",
        Duration::from_secs(30),
        &mut [&mut a, &mut b, &mut witness],
        || {
            let (adm_a, adm_b) = (adm_a.clone(), adm_b.clone());
            async move {
                let ok = |r: Result<ReplicationStatus>| {
                    r.ok().is_some_and(|r| {
                        r.peers
                            .first()
                            .is_some_and(|p| p.replication == "Established")
                            && r.quorum.as_ref().is_some_and(|q| q.witness_connected)
                    })
                };
                ok(replication(&adm_a).await) && ok(replication(&adm_b).await)
            }
        },
    )
    .await?;
    t.say(format!(
        "site A (alpha, Primary) and site B (beta, Secondary) replicate a {} MiB volume over QUIC + mutual TLS; the witness sees both (logs in {})",
        size >> 20,
        dir.display()
    ));

    // Workload: 4 writers on site A, each on its own region, 4 KiB writes
    // with a pattern naming writer and sequence number.
    let sock_a = dir.join("alpha-nbd.sock");
    let region = (size / 4).min(4 << 20);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let sock = sock_a.clone();
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut acked: HashMap<u64, Vec<u8>> = HashMap::new();
            let mut maybe: Option<(u64, Vec<u8>)> = None;
            let Ok(mut c) = Client::connect_unix(&sock, "demo").await else {
                return (acked, maybe);
            };
            for i in 0u64.. {
                let off = w * region + (i * 4096) % region;
                let mut data = vec![0u8; 4096];
                data[..16].copy_from_slice(&[w.to_le_bytes(), i.to_le_bytes()].concat());
                data[16..].fill((w * 37 + i) as u8 | 1);
                match c.write(off, &data, false).await {
                    Ok(()) => {
                        acked.insert(off, data);
                    }
                    Err(_) => {
                        maybe = Some((off, data));
                        break;
                    }
                }
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
            }
            (acked, maybe)
        }));
    }
    t.say(format!(
        "workload: 4 writers, random 4 KiB writes through site A's NBD export, for {:.1} s",
        args.workload.as_secs_f64()
    ));
    tokio::time::sleep(args.workload).await;
    a.kill9();
    let killed = Instant::now();
    t.say("site A killed (SIGKILL) in the middle of the workload");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut results = Vec::new();
    for w in writers {
        results.push(w.await.context("writer task")?);
    }
    let acked: usize = results.iter().map(|(a, _)| a.len()).sum();
    t.say(format!(
        "{acked} distinct blocks were acknowledged to the writers before site A died"
    ));

    // Site B promotes itself once the witness agrees.
    wait_for(
        "site B to take over",
        Duration::from_secs(60),
        &mut [&mut b, &mut witness],
        || {
            let adm_b = adm_b.clone();
            async move {
                replication(&adm_b)
                    .await
                    .ok()
                    .is_some_and(|r| r.role == "Primary")
            }
        },
    )
    .await?;
    let sock_b = dir.join("beta-nbd.sock");
    let mut c = Client::connect_unix(&sock_b, "demo").await?;
    let marker_off = size - (1 << 20);
    c.write(marker_off, &[0x42; 4096], false).await?;
    let failover = killed.elapsed();
    t.say(format!(
        "site B promoted itself (the witness granted it) and acknowledged a new write: failover took {:.2} s",
        failover.as_secs_f64()
    ));
    let mut buf = vec![0u8; 4096];
    let mut checked = 0usize;
    for (acked, maybe) in &results {
        for (off, data) in acked {
            c.read(*off, &mut buf).await?;
            let ok = buf == *data || maybe.as_ref().is_some_and(|(o, d)| o == off && buf == *d);
            if !ok {
                bail!("DATA LOSS: the acknowledged write at offset {off} is not on site B");
            }
            checked += 1;
        }
    }
    c.flush().await?;
    t.say(format!(
        "verified on site B: all {checked} acknowledged blocks read back intact"
    ));
    c.disconnect().await?;

    // Site A returns; the witness tells it that it missed writes.
    a.start()?;
    t.say("site A restarted (its configuration still says Primary)");
    let back = Instant::now();
    wait_for(
        "site B to resync site A",
        Duration::from_secs(120),
        &mut [&mut a, &mut b, &mut witness],
        || {
            let (adm_a, adm_b) = (adm_a.clone(), adm_b.clone());
            async move {
                let (ra, rb) = (replication(&adm_a).await, replication(&adm_b).await);
                match (ra, rb) {
                    (Ok(ra), Ok(rb)) => {
                        ra.role == "Secondary"
                            && ra.disk == "UpToDate"
                            && rb.peers.first().is_some_and(|p| {
                                p.replication == "Established" && p.out_of_sync_bytes == 0
                            })
                    }
                    _ => false,
                }
            }
        },
    )
    .await?;
    let moved = resynced_bytes(&b.log);
    t.say(format!(
        "site A stood down (the witness said it missed writes) and was resynced in {:.2} s: {} KiB moved of a {} MiB volume ({:.2}%)",
        back.elapsed().as_secs_f64(),
        moved >> 10,
        size >> 20,
        moved as f64 * 100.0 / size as f64
    ));
    b.stop();
    a.stop();
    witness.stop();
    let (ca_crc, cb_crc) = (
        data_crc(&dir.join("alpha.img"), size)?,
        data_crc(&dir.join("beta.img"), size)?,
    );
    t.say(format!(
        "stopped; data areas: site A crc32 {ca_crc:#010x}, site B crc32 {cb_crc:#010x}"
    ));
    if ca_crc != cb_crc {
        bail!("the two sites' data areas differ after the resync");
    }
    println!(
        "OK: site A was lost mid-write, site B took over in {:.2} s with all {checked} acknowledged writes, and site A came back with only {} KiB resynced.",
        failover.as_secs_f64(),
        moved >> 10
    );
    Ok(())
}
