//! `tandemd demo`: the README's one-command demo. Creates a volume on a
//! temporary backing file, serves it over NBD on a unix socket, writes
//! through a real NBD connection, restarts the server from disk and shows
//! that every byte reads back intact.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tandem_core::superblock::Superblock;

use crate::config::{AdminConfig, Config, EngineKind, ExportConfig, NbdConfig};
use crate::daemon;
use crate::nbd::client::Client;
use crate::storage::{sync::SyncEngine, Backing, DirectIo};

/// Demo options.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Volume size.
    #[arg(long, default_value = "256M", value_parser = crate::parse_size)]
    pub size: u64,
    /// Directory for the backing file and sockets (default: a new temporary
    /// directory under /var/tmp, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep serving after the checks until Ctrl-C.
    #[arg(long)]
    pub serve: bool,
    /// Storage engine.
    #[arg(long, value_enum, default_value_t = EngineKind::Uring)]
    pub engine: EngineKind,
}

/// Prints messages with the seconds elapsed since the demo started.
pub(crate) struct Timeline(pub(crate) Instant);

impl Timeline {
    pub(crate) fn say(&self, msg: impl AsRef<str>) {
        println!("[{:7.2}s] {}", self.0.elapsed().as_secs_f64(), msg.as_ref());
    }
}

/// Small deterministic generator for demo data.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// The demo's working directory: `dir` (created if needed), or a new
/// temporary directory under /var/tmp (or /tmp) removed when the returned
/// guard drops.
pub(crate) fn work_dir(dir: Option<&PathBuf>) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if let Some(d) = dir {
        std::fs::create_dir_all(d)?;
        return Ok((d.clone(), None));
    }
    let base = if std::path::Path::new("/var/tmp").is_dir() {
        "/var/tmp"
    } else {
        "/tmp"
    };
    let g = tempfile::Builder::new()
        .prefix("tandem-demo-")
        .tempdir_in(base)?;
    Ok((g.path().to_path_buf(), Some(g)))
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let t = Timeline(Instant::now());
    let (dir, _guard) = work_dir(args.dir.as_ref())?;
    let size = args.size.div_ceil(4096) * 4096;
    println!("Tandem demo: one volume on a backing file, served over NBD by tandemd");
    let backing = dir.join("demo.img");
    let sb = Superblock::new(
        *uuid::Uuid::new_v4().as_bytes(),
        "demo",
        size,
        512,
        unix_now(),
    )?;
    Backing::create_file(&backing, sb.backing_len())?;
    let engine = SyncEngine::new(Backing::open(&backing, DirectIo::Off, false, 512)?);
    crate::volume::create(&engine, &backing, sb.clone(), false).await?;
    drop(engine);
    t.say(format!(
        "created volume \"demo\" ({}) on {}: {} MiB, block size 512, data area at offset {} KiB",
        sb.uuid_string(),
        backing.display(),
        size >> 20,
        sb.data_offset >> 10
    ));

    let socket = dir.join("nbd.sock");
    let config = Config {
        nbd: NbdConfig {
            unix: Some(socket.clone()),
            tcp: None,
        },
        admin: AdminConfig {
            socket: dir.join("admin.sock"),
        },
        log: Default::default(),
        metrics: None,
        runtime: Default::default(),
        exports: vec![ExportConfig {
            name: "demo".into(),
            backing: backing.clone(),
            diskless: false,
            size: None,
            block_size: None,
            volume: Some("demo".into()),
            uuid: Some(sb.uuid_string()),
            description: "tandem demo volume".into(),
            engine: args.engine,
            direct: DirectIo::Auto,
            read_only: false,
            queue_depth: 256,
            replication: None,
        }],
    };
    config.validate("demo")?;
    let running = daemon::start(&config, true).await?;
    let engine_desc = running
        .exports
        .get("demo")
        .map(|e| {
            format!(
                "{} engine, direct I/O alignment {}",
                e.volume.engine().kind(),
                e.volume.engine().alignment()
            )
        })
        .unwrap_or_default();
    let uri = format!("nbd+unix:///demo?socket={}", socket.display());
    t.say(format!("tandemd serving {uri} ({engine_desc})"));

    // What the volume should hold, byte for byte.
    let mut model = vec![0u8; size as usize];
    let mut rng = XorShift(0x7a6d_656d_6f21);
    let mut c = Client::connect_unix(&socket, "demo").await?;
    let seq = (size / 4).min(64 << 20) as usize;
    let start = Instant::now();
    for off in (0..seq).step_by(1 << 20) {
        let end = (off + (1 << 20)).min(seq);
        rng.fill(&mut model[off..end]);
        c.write(off as u64, &model[off..end], false).await?;
    }
    let seq_secs = start.elapsed().as_secs_f64();
    let blocks = size / 4096;
    let n = 2000;
    let start = Instant::now();
    for _ in 0..n {
        let off = (rng.next() % blocks * 4096) as usize;
        rng.fill(&mut model[off..off + 4096]);
        c.write(off as u64, &model[off..off + 4096], false).await?;
    }
    let rand_secs = start.elapsed().as_secs_f64();
    c.flush().await?;
    t.say(format!(
        "wrote {} MiB sequentially ({:.0} MiB/s) and {n} random 4 KiB writes ({:.0} IOPS at queue depth 1), then FLUSH",
        seq >> 20,
        (seq >> 20) as f64 / seq_secs,
        n as f64 / rand_secs
    ));
    let trim_off = (size / 2) & !((1 << 20) - 1);
    c.trim(trim_off, 1 << 20).await?;
    model[trim_off as usize..(trim_off + (1 << 20)) as usize].fill(0);
    let mut back = vec![0xffu8; 1 << 20];
    c.read(trim_off, &mut back).await?;
    if back.iter().any(|&b| b != 0) {
        bail!("trimmed range does not read back as zeroes");
    }
    t.say(format!(
        "trimmed 1 MiB at offset {} MiB: reads back as zeroes",
        trim_off >> 20
    ));
    c.disconnect().await?;
    running.stop().await?;
    t.say("stopped tandemd (volumes flushed)");

    let running = daemon::start(&config, true).await.context("restarting")?;
    t.say("restarted tandemd from the backing file: superblock verified (name and UUID match)");
    let mut c = Client::connect_unix(&socket, "demo").await?;
    let expect = crc32fast_hash(&model);
    let mut got = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut mismatches = 0u64;
    let start = Instant::now();
    for off in (0..size).step_by(buf.len()) {
        let len = ((size - off) as usize).min(buf.len());
        c.read(off, &mut buf[..len]).await?;
        got.update(&buf[..len]);
        if buf[..len] != model[off as usize..off as usize + len] {
            mismatches += 1;
        }
    }
    let got = got.finalize();
    t.say(format!(
        "read back all {} MiB ({:.0} MiB/s): crc32 {got:#010x}, expected {expect:#010x}",
        size >> 20,
        (size >> 20) as f64 / start.elapsed().as_secs_f64()
    ));
    if got != expect || mismatches != 0 {
        bail!("data mismatch after restart: {mismatches} differing 4 MiB chunks");
    }
    c.disconnect().await?;
    if let Ok(out) = std::process::Command::new("nbdinfo").arg(&uri).output() {
        if out.status.success() {
            println!("--- nbdinfo {uri}");
            print!("{}", String::from_utf8_lossy(&out.stdout));
            println!("---");
        }
    }
    println!("OK: every acknowledged write read back intact after a restart.");
    if args.serve {
        println!("Serving {uri} until Ctrl-C; try: qemu-io -f raw '{uri}' -c 'read -v 0 512'");
        tokio::signal::ctrl_c().await?;
    }
    running.stop().await?;
    Ok(())
}

fn crc32fast_hash(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

/// Seconds since the Unix epoch (informational timestamps only).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
