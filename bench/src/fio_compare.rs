//! `fio-compare`: runs the same fio workloads against one backing file three
//! ways — directly (`raw`), through `qemu-nbd`, and through `tandemd` — and
//! prints one comparison table. See `bench/README.md`.
//!
//! All targets use the data area of ONE Tandem-formatted file, so they share
//! the file system, the file's extents and its allocation state. Workloads run
//! one by one; for each workload every target runs back to back (the target
//! order rotates by round) to keep slow drift (thermal, page-cache, SSD
//! garbage collection) from favouring one target.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const EXPORT_NAME: &str = "bench";
/// Seconds of fio `ramp_time` (not measured) per job.
const RAMP_SECS: u64 = 1;

/// Compare fio results on a raw file, qemu-nbd and tandemd (same file, same data area).
#[derive(Parser, Debug)]
#[command(name = "fio-compare", version)]
struct Args {
    /// Parent directory for the work directory (backing file, sockets, logs).
    /// Must be on a file system with O_DIRECT (not tmpfs). A fresh
    /// `tandem-fio-*` subdirectory is created in it and removed afterwards.
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Data size of the volume (K/M/G/T suffixes, powers of 1024).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Measured seconds per job (plus 1 s of ramp).
    #[arg(long, default_value_t = 10)]
    runtime: u64,
    /// Rounds; each round runs every workload on every target.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Only run workloads whose name contains this substring.
    #[arg(long)]
    only: Option<String>,
    /// Targets to compare, comma separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "raw,qemu-nbd,tandem,tandem-repl"
    )]
    targets: Vec<Target>,
    /// tandemd binary (default: `tandemd` next to this executable).
    #[arg(long)]
    tandemd: Option<PathBuf>,
    /// tandemctl binary (default: `tandemctl` next to this executable).
    #[arg(long)]
    tandemctl: Option<PathBuf>,
    /// Also write all results (per round, medians, ratios, machine facts, commands) as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Keep the work directory (backing file, fio JSON, server logs).
    #[arg(long)]
    keep: bool,
    /// MTU of the veth link between the `tandem-repl` primary's and
    /// secondary's network namespaces (9000: jumbo frames, as on a dedicated
    /// replication link).
    #[arg(long, default_value_t = 9000, value_parser = clap::value_parser!(u32).range(1280..=65535))]
    repl_mtu: u32,
    /// Run the `tandem-repl` primary and secondary in the root network
    /// namespace, replicating over loopback, instead of in two network
    /// namespaces joined by a veth pair.
    #[arg(long)]
    repl_loopback: bool,
    /// Worker threads of each `tandem-repl` daemon (`[runtime]
    /// worker_threads`). Default: half the CPUs (at least 1), since the
    /// primary and the secondary, two sites in real life, share this machine.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
    repl_worker_threads: Option<u16>,
    /// Model two hosts on this one machine: fio and the NBD server under
    /// test (for `tandem-repl`, the primary) run on the first half of the
    /// CPUs, the `tandem-repl` secondary — the other site — on the second
    /// half (each command is started under `taskset -c`). Every target gets
    /// the same CPUs for fio and its server, so the ratios compare a site's
    /// own CPU; without it the secondary competes with fio and the primary.
    #[arg(long)]
    site_cpus: bool,
    /// Testing aid: don't call tandemctl; create a plain file and assume the
    /// data area starts at this byte offset.
    #[arg(long, hide = true)]
    assume_data_offset: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Target {
    Raw,
    QemuNbd,
    Tandem,
    /// tandemd primary replicating (protocol C, QUIC + mTLS) to a second
    /// tandemd whose backing is another file; the two run in separate network
    /// namespaces joined by a veth pair (loopback if that is unavailable).
    TandemRepl,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Raw => "raw",
            Target::QemuNbd => "qemu-nbd",
            Target::Tandem => "tandem",
            Target::TandemRepl => "tandem-repl",
        }
    }
}

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
    fsync: bool,
}

impl Workload {
    fn reads(&self) -> bool {
        self.rw.contains("read")
    }
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        fsync: false,
    },
    Workload {
        name: "randwrite-4k-qd1-fsync",
        rw: "randwrite",
        bs: "4k",
        iodepth: 1,
        fsync: true,
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
        fsync: false,
    },
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
        fsync: false,
    },
    Workload {
        name: "seqwrite-1m-qd8",
        rw: "write",
        bs: "1M",
        iodepth: 8,
        fsync: false,
    },
];

/// One fio job's numbers.
#[derive(Clone, Debug)]
struct Measurement {
    iops: f64,
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
    /// fsync latency percentiles (only for the fsync workload).
    sync_p50_us: Option<f64>,
    sync_p99_us: Option<f64>,
}

impl Measurement {
    /// p50 latency of one operation as the application sees it: the write's
    /// completion latency plus, for the fsync workload, the fsync's p50.
    fn op_p50_us(&self) -> f64 {
        self.p50_us + self.sync_p50_us.unwrap_or(0.0)
    }

    fn to_json(&self) -> Value {
        json!({
            "iops": self.iops,
            "mib_s": self.mib_s,
            "clat_p50_us": self.p50_us,
            "clat_p99_us": self.p99_us,
            "sync_p50_us": self.sync_p50_us,
            "sync_p99_us": self.sync_p99_us,
        })
    }
}

// ---------------------------------------------------------------------------
// Signals and child processes

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace
/// period) when the guard is dropped, including on errors and Ctrl-C.
struct Proc {
    child: Child,
    what: String,
    done: Option<ExitStatus>,
}

impl Proc {
    fn spawn(mut cmd: Command, what: &str, log: &Path) -> Result<Proc> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {what} ({:?})", cmd.get_program()))?;
        Ok(Proc {
            child,
            what: what.to_string(),
            done: None,
        })
    }

    /// User + system CPU seconds the process has used so far (0 if unknown).
    fn cpu_secs(&self) -> f64 {
        let Ok(stat) = fs::read_to_string(format!("/proc/{}/stat", self.child.id())) else {
            return 0.0;
        };
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 of the whole line.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no memory effects.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        (ticks(11) + ticks(12)) / hz
    }

    /// The process's current command name (`/proc/PID/comm`), e.g. to check
    /// that `ip netns exec` has exec'd its program (same pid) rather than
    /// forked it.
    fn comm(&self) -> String {
        fs::read_to_string(format!("/proc/{}/comm", self.child.id()))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.done.is_none() {
            self.done = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?;
        }
        Ok(self.done)
    }

    fn signal(&self, sig: libc::c_int) {
        if self.done.is_none() {
            if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
                // SAFETY: plain kill(2) on our own, not yet reaped, child.
                unsafe {
                    libc::kill(pid, sig);
                }
            }
        }
    }

    /// Waits up to `grace` for the process to exit by itself.
    fn wait_for(&mut self, grace: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + grace;
        loop {
            if let Some(st) = self.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, wait up to 10 s, then SIGKILL. Returns the exit status.
    fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.try_wait()? {
            return Ok(st);
        }
        self.signal(libc::SIGTERM);
        if let Some(st) = self.wait_for(Duration::from_secs(10))? {
            return Ok(st);
        }
        eprintln!(
            "warning: {} did not exit 10 s after SIGTERM; killing it",
            self.what
        );
        self.signal(libc::SIGKILL);
        let st = self
            .child
            .wait()
            .with_context(|| format!("waiting for {}", self.what))?;
        self.done = Some(st);
        Ok(st)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

// ---------------------------------------------------------------------------
// Small helpers

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a size like 256M or 1G"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes == 0 || bytes % MIB != 0 {
        return Err(format!("`{s}` must be a positive multiple of 1M"));
    }
    Ok(bytes)
}

/// `1G`, `256M`, ... (the largest unit that divides exactly).
fn format_size(bytes: u64) -> String {
    for (unit, m) in [
        ("T", 1u64 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ] {
        if bytes % m == 0 {
            return format!("{}{unit}", bytes / m);
        }
    }
    bytes.to_string()
}

fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=,./:+@%".contains(c));
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn tail(path: &Path, lines: usize) -> String {
    let Ok(text) = fs::read_to_string(path) else {
        return String::new();
    };
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs a short command and returns its trimmed stdout; errors if it fails.
fn output_of(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Checks that `tool` can be executed, with an apt hint otherwise.
fn require_tool(tool: &str, apt_package: &str) -> Result<()> {
    match Command::new(tool)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => bail!(
            "`{tool}` is not installed (not found in PATH); install it with `apt-get install {apt_package}`"
        ),
        Err(e) => Err(e).with_context(|| format!("running `{tool} --version`")),
    }
}

fn require_binary(path: &Path, what: &str, flag: &str) -> Result<()> {
    ensure!(
        path.is_file(),
        "{what} not found at {}; build it with `cargo build --release -p tandem-daemon` \
         (bench/fio.sh does this) or pass {flag} PATH",
        path.display()
    );
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

// ---------------------------------------------------------------------------
// fio

/// Runs fio (whose command line must write its JSON to `json_out` with
/// `--output`); kills it on Ctrl-C or after `timeout`.
fn run_fio(cmd: Command, json_out: &Path, log: &Path, timeout: Duration) -> Result<Value> {
    let mut fio = Proc::spawn(cmd, "fio", log)?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = fio.try_wait()? {
            break st;
        }
        check_interrupted()?;
        if Instant::now() >= deadline {
            bail!(
                "fio did not finish within {} s; last output:\n{}",
                timeout.as_secs(),
                tail(log, 20)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    check_interrupted()?;
    ensure!(
        status.success(),
        "fio failed ({status}); output ({}):\n{}",
        log.display(),
        tail(log, 20)
    );
    let text = fs::read_to_string(json_out)
        .with_context(|| format!("reading fio output {}", json_out.display()))?;
    // fio can print notes before the JSON document; start at the first '{'.
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio output {}", json_out.display()))?;
    serde_json::from_str(&text[start..])
        .with_context(|| format!("parsing fio JSON {}", json_out.display()))
}

fn num(v: &Value, what: &str) -> Result<f64> {
    v.as_f64()
        .ok_or_else(|| anyhow!("fio JSON: `{what}` missing or not a number"))
}

fn percentile_us(lat: &Value, p: &str, what: &str) -> Result<f64> {
    Ok(num(&lat["percentile"][p], &format!("{what}.percentile[{p}]"))? / 1000.0)
}

fn parse_measurement(v: &Value, reads: bool) -> Result<Measurement> {
    let job = v["jobs"]
        .as_array()
        .and_then(|j| j.first())
        .ok_or_else(|| anyhow!("fio JSON has no jobs"))?;
    let error = job["error"].as_i64().unwrap_or(0);
    ensure!(error == 0, "fio job reported error {error}");
    let side_name = if reads { "read" } else { "write" };
    let side = &job[side_name];
    let ios = num(&side["total_ios"], &format!("{side_name}.total_ios"))?;
    ensure!(ios > 0.0, "fio completed no {side_name} I/O");
    let iops = num(&side["iops"], &format!("{side_name}.iops"))?;
    let bw_bytes = match side["bw_bytes"].as_f64() {
        Some(b) => b,
        None => num(&side["bw"], &format!("{side_name}.bw"))? * 1024.0,
    };
    let clat = &side["clat_ns"];
    let what = format!("{side_name}.clat_ns");
    let sync = &job["sync"]["lat_ns"];
    let has_sync = job["sync"]["total_ios"].as_f64().unwrap_or(0.0) > 0.0;
    Ok(Measurement {
        iops,
        mib_s: bw_bytes / MIB as f64,
        p50_us: percentile_us(clat, "50.000000", &what)?,
        p99_us: percentile_us(clat, "99.000000", &what)?,
        sync_p50_us: if has_sync {
            Some(percentile_us(sync, "50.000000", "sync.lat_ns")?)
        } else {
            None
        },
        sync_p99_us: if has_sync {
            Some(percentile_us(sync, "99.000000", "sync.lat_ns")?)
        } else {
            None
        },
    })
}

// ---------------------------------------------------------------------------
// The run

struct Bench {
    args: Args,
    work: PathBuf,
    file: PathBuf,
    data_offset: u64,
    tandemd: PathBuf,
    tandemctl: PathBuf,
    /// The replicated setup, when `tandem-repl` is a target.
    repl: Option<ReplSetup>,
    /// Commands in first-use order, deduplicated.
    commands: Vec<(String, String)>,
    /// CPU seconds per written GiB of the last job, when it wrote anything.
    last_cpu: Option<CpuPerGib>,
    /// `--site-cpus`: the CPU lists of the local site (fio, the server) and
    /// of the remote one (the `tandem-repl` secondary).
    site_cpus: Option<(String, String)>,
}

/// Which of the two modelled hosts a process runs on (`--site-cpus`).
#[derive(Debug, Clone, Copy)]
enum Site {
    /// fio and the NBD server under test.
    Local,
    /// The `tandem-repl` secondary.
    Remote,
}

/// The CPU lists for `--site-cpus`: the CPUs this process may use, split
/// in two halves (local site first).
fn site_cpu_lists() -> Result<(String, String)> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
        .ok_or_else(|| anyhow!("no Cpus_allowed_list in /proc/self/status"))?;
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
        cpus.extend(a..=b);
    }
    ensure!(
        cpus.len() >= 2,
        "--site-cpus needs at least 2 CPUs; this process may use {list}"
    );
    let join = |v: &[usize]| {
        v.iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let half = cpus.len() / 2;
    Ok((join(&cpus[..half]), join(&cpus[half..])))
}

/// `cmd` run by `taskset -c CPUS` (which execs it: same pid).
fn under_taskset(cmd: Command, cpus: &str) -> Command {
    let mut c = Command::new("taskset");
    c.arg("-c")
        .arg(cpus)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        c.current_dir(d);
    }
    c
}

/// CPU seconds per GiB fio wrote, per process of one job.
#[derive(Debug, Clone, Copy)]
struct CpuPerGib {
    /// The NBD server (the primary for `tandem-repl`); `None` for `raw`.
    server: Option<f64>,
    /// The `tandem-repl` secondary.
    secondary: Option<f64>,
    /// fio itself (from its `usr_cpu` + `sys_cpu` over the job's runtime).
    fio: f64,
}

impl CpuPerGib {
    fn total(&self) -> f64 {
        self.server.unwrap_or(0.0) + self.secondary.unwrap_or(0.0) + self.fio
    }

    fn to_json(self) -> Value {
        let mut v = json!({ "fio": self.fio, "total": self.total() });
        if let Some(x) = self.server {
            v["server"] = json!(x);
        }
        if let Some(x) = self.secondary {
            v["secondary"] = json!(x);
        }
        v
    }
}

impl Bench {
    fn record(&mut self, label: String, cmd: &Command) {
        let line = command_line(cmd);
        if !self.commands.iter().any(|(_, l)| *l == line) {
            self.commands.push((label, line));
        }
    }

    fn socket(&self, target: Target) -> PathBuf {
        self.work.join(format!("{}.sock", target.name()))
    }

    fn uri(&self, target: Target) -> String {
        format!(
            "nbd+unix:///{EXPORT_NAME}?socket={}",
            self.socket(target).display()
        )
    }

    fn server_command(&self, target: Target) -> Option<Command> {
        let c = self.server_command_unpinned(target)?;
        Some(self.pinned(c, Site::Local))
    }

    /// With `--site-cpus`, `cmd` under `taskset -c` on `site`'s CPUs.
    fn pinned(&self, cmd: Command, site: Site) -> Command {
        match &self.site_cpus {
            Some((local, remote)) => {
                let cpus = match site {
                    Site::Local => local,
                    Site::Remote => remote,
                };
                under_taskset(cmd, cpus)
            }
            None => cmd,
        }
    }

    fn server_command_unpinned(&self, target: Target) -> Option<Command> {
        let sock = self.socket(target);
        match target {
            Target::Raw => None,
            Target::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.arg("--persistent")
                    .arg("--cache=none")
                    .arg("--aio=io_uring")
                    .arg(format!("--socket={}", sock.display()))
                    .arg(format!("--export-name={EXPORT_NAME}"))
                    .arg("--image-opts")
                    .arg(format!(
                        "driver=raw,offset={},size={},file.driver=file,file.filename={}",
                        self.data_offset,
                        self.args.size,
                        self.file.display()
                    ));
                Some(c)
            }
            Target::Tandem => {
                let mut c = Command::new(&self.tandemd);
                c.arg("run")
                    .arg("--export")
                    .arg(format!("{EXPORT_NAME}={}", self.file.display()))
                    .arg("--nbd-unix")
                    .arg(&sock)
                    // Keep the admin socket in the work dir: the default
                    // (/run/tandem/admin.sock) may belong to a real daemon.
                    .arg("--admin-socket")
                    .arg(self.work.join("tandem-admin.sock"));
                Some(c)
            }
            Target::TandemRepl => {
                // In the primary's network namespace, if there is one. The
                // NBD and admin sockets are unix sockets, i.e. files in the
                // work directory: fio and tandemctl reach them from the root
                // namespace.
                let r = self.repl.as_ref()?;
                let mut c = r.net.tandemd(Side::Primary, &self.tandemd);
                c.arg("run")
                    .arg("--config")
                    .arg(&r.primary_config)
                    .arg("--nbd-unix")
                    .arg(&sock)
                    .arg("--admin-socket")
                    .arg(self.work.join("repl-primary-admin.sock"));
                Some(c)
            }
        }
    }

    /// The replication secondary's command (in its own network namespace,
    /// if there is one).
    fn secondary_command(&self) -> Result<Command> {
        let r = self
            .repl
            .as_ref()
            .ok_or_else(|| anyhow!("replicated setup missing"))?;
        let mut c = r.net.tandemd(Side::Secondary, &self.tandemd);
        c.arg("run")
            .arg("--config")
            .arg(&r.secondary_config)
            .arg("--nbd-unix")
            .arg(self.work.join("repl-secondary.sock"))
            .arg("--admin-socket")
            .arg(self.work.join("repl-secondary-admin.sock"));
        Ok(self.pinned(c, Site::Remote))
    }

    /// Waits until the primary reports its peer Connected.
    fn wait_replicating(&self) -> Result<()> {
        let admin = self.work.join("repl-primary-admin.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            check_interrupted()?;
            let out = Command::new(&self.tandemctl)
                .arg("status")
                .arg("--json")
                .arg("--admin-socket")
                .arg(&admin)
                .output();
            if let Ok(o) = out {
                if let Ok(v) = serde_json::from_slice::<Value>(&o.stdout) {
                    if v["exports"][0]["replication"]["peers"][0]["connection"] == "Connected" {
                        return Ok(());
                    }
                }
            }
            ensure!(
                Instant::now() < deadline,
                "tandem-repl: the primary did not connect to the secondary within 20 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts an NBD server and waits until `nbdinfo` sees the export with the right size.
    fn start_server(&self, target: Target, cmd: Command, log: &Path) -> Result<Proc> {
        let sock = self.socket(target);
        let _ = fs::remove_file(&sock);
        let mut server = Proc::spawn(cmd, target.name(), log)?;
        let uri = self.uri(target);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last_err = String::from("socket never appeared");
        loop {
            check_interrupted()?;
            if let Some(st) = server.try_wait()? {
                bail!(
                    "{} exited during startup ({st}); log {}:\n{}",
                    target.name(),
                    log.display(),
                    tail(log, 20)
                );
            }
            if sock.exists() {
                match output_of("nbdinfo", &["--size", &uri]) {
                    Ok(out) => {
                        let size: u64 = out.parse().with_context(|| {
                            format!("nbdinfo --size printed `{out}`, not a number")
                        })?;
                        ensure!(
                            size == self.args.size,
                            "{} exports {size} bytes, expected {}",
                            target.name(),
                            self.args.size
                        );
                        return Ok(server);
                    }
                    Err(e) => last_err = format!("{e:#}"),
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready after 20 s ({last_err}); log {}:\n{}",
                    target.name(),
                    log.display(),
                    tail(log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn fio_command(&self, target: Target, w: &Workload) -> Command {
        let mut c = Command::new("fio");
        c.arg(format!("--name={}-{}", w.name, target.name()))
            .arg(format!("--rw={}", w.rw))
            .arg(format!("--bs={}", w.bs))
            .arg(format!("--iodepth={}", w.iodepth))
            .arg("--numjobs=1")
            .arg("--group_reporting")
            .arg("--time_based")
            .arg(format!("--runtime={}", self.args.runtime))
            .arg(format!("--ramp_time={RAMP_SECS}"))
            .arg("--randrepeat=0")
            .arg("--output-format=json");
        if w.fsync {
            c.arg("--fsync=1");
        }
        match target {
            Target::Raw => {
                c.arg("--ioengine=io_uring")
                    .arg("--direct=1")
                    .arg(format!("--filename={}", self.file.display()))
                    .arg(format!("--offset={}", self.data_offset))
                    .arg(format!("--size={}", self.args.size));
            }
            Target::QemuNbd | Target::Tandem | Target::TandemRepl => {
                c.arg("--ioengine=nbd")
                    .arg(format!("--uri={}", self.uri(target)))
                    .arg(format!("--size={}", self.args.size));
            }
        }
        self.pinned(c, Site::Local)
    }

    fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.args.runtime + RAMP_SECS + 120)
    }

    fn run_job(&mut self, target: Target, w: &Workload, round: u32) -> Result<Measurement> {
        let secondary_cmd = match target {
            Target::TandemRepl => Some(self.secondary_command()?),
            _ => None,
        };
        if let Some(c) = &secondary_cmd {
            self.record("tandem-repl secondary".into(), c);
        }
        let server_cmd = self.server_command(target);
        if let Some(c) = &server_cmd {
            self.record(format!("{} server", target.name()), c);
        }
        let base = format!("{}-{}-r{}", w.name, target.name(), round + 1);
        let json_out = self.work.join(format!("{base}.json"));
        let log = self.work.join(format!("{base}.fio.log"));
        let server_log = self.work.join(format!("{base}.server.log"));
        let mut fio = self.fio_command(target, w);
        fio.arg(format!("--output={}", json_out.display()));
        if round == 0 {
            self.record(format!("{} / {}", w.name, target.name()), &fio);
        }

        let mut secondary = match secondary_cmd {
            Some(c) => {
                let log = self.work.join(format!("{base}.secondary.log"));
                Some(Proc::spawn(c, "tandem-repl secondary", &log)?)
            }
            None => None,
        };
        let server = match server_cmd {
            Some(c) => Some(self.start_server(target, c, &server_log)?),
            None => None,
        };
        if target == Target::TandemRepl {
            self.wait_replicating()?;
            // The CPU figures read /proc/PID/stat of the spawned children;
            // `ip netns exec` execs tandemd in place, so PID is tandemd's.
            for p in [server.as_ref(), secondary.as_ref()].into_iter().flatten() {
                let comm = p.comm();
                if comm != "tandemd" {
                    eprintln!(
                        "warning: {} runs as `{comm}`, not `tandemd`; its CPU figure is not tandemd's",
                        p.what
                    );
                }
            }
        }
        self.last_cpu = None;
        let cpu_before =
            [server.as_ref(), secondary.as_ref()].map(|p| p.map_or(0.0, Proc::cpu_secs));
        let result = run_fio(fio, &json_out, &log, self.job_timeout());
        let cpu = [server.as_ref(), secondary.as_ref()].map(|p| p.map_or(0.0, Proc::cpu_secs));
        if let Ok(v) = &result {
            let job = &v["jobs"][0];
            let written = job["write"]["io_bytes"].as_f64().unwrap_or(0.0);
            if written > 0.0 {
                let gib = written / (1u64 << 30) as f64;
                let per = |i: usize| (cpu[i] - cpu_before[i]) / gib;
                // fio's figures are percentages of its job runtime (ms).
                let fio_pct =
                    job["usr_cpu"].as_f64().unwrap_or(0.0) + job["sys_cpu"].as_f64().unwrap_or(0.0);
                let runtime_s = job["job_runtime"].as_f64().unwrap_or(0.0) / 1000.0;
                let c = CpuPerGib {
                    server: server.as_ref().map(|_| per(0)),
                    secondary: secondary.as_ref().map(|_| per(1)),
                    fio: fio_pct / 100.0 * runtime_s / gib,
                };
                let mut line = String::from("    CPU s per written GiB:");
                if let Some(x) = c.server {
                    let who = if target == Target::TandemRepl {
                        "primary"
                    } else {
                        "server"
                    };
                    line += &format!(" {who} {x:.2}");
                }
                if let Some(x) = c.secondary {
                    line += &format!(", secondary {x:.2}");
                }
                line += &format!(", fio {:.2}, total {:.2}", c.fio, c.total());
                println!("{line}");
                self.last_cpu = Some(c);
            }
        }
        if let Some(mut s) = server {
            let st = s.stop()?;
            // SIGTERM is the expected way out; anything else is worth a warning.
            if !st.success() && st.code().is_some() {
                eprintln!(
                    "warning: {} exited with {st} after the job; log {}",
                    target.name(),
                    server_log.display()
                );
            }
        }
        if let Some(s) = secondary.as_mut() {
            s.stop()?;
        }
        let v = result.with_context(|| format!("{} on {}", w.name, target.name()))?;
        parse_measurement(&v, w.reads()).with_context(|| format!("{} on {}", w.name, target.name()))
    }

    /// Writes a file's whole data area once (sequential 1M, O_DIRECT).
    fn fill_file(&mut self, name: &str, file: &Path) -> Result<Measurement> {
        let mut c = Command::new("fio");
        c.arg(format!("--name={name}"))
            .arg("--rw=write")
            .arg("--bs=1M")
            .arg("--iodepth=8")
            .arg("--ioengine=io_uring")
            .arg("--direct=1")
            .arg("--end_fsync=1")
            .arg(format!("--filename={}", file.display()))
            .arg(format!("--offset={}", self.data_offset))
            .arg(format!("--size={}", self.args.size))
            .arg("--output-format=json");
        let json_out = self.work.join(format!("{name}.json"));
        c.arg(format!("--output={}", json_out.display()));
        self.record(format!("{name} data area"), &c);
        let log = self.work.join(format!("{name}.fio.log"));
        let v = run_fio(c, &json_out, &log, Duration::from_secs(3600))
            .with_context(|| format!("{name}: filling {}", file.display()))?;
        parse_measurement(&v, false).with_context(|| format!("{name}: filling {}", file.display()))
    }

    fn fill(&mut self) -> Result<()> {
        let file = self.file.clone();
        let m = self.fill_file("fill", &file)?;
        if let Some(secondary) = self.repl.as_ref().map(|r| r.secondary_file.clone()) {
            // The secondary's backing gets the same treatment, so replicated
            // writes land on allocated blocks as they do on the primary.
            self.fill_file("fill-secondary", &secondary)?;
        }
        println!(
            "filled {} of data area at {:.0} MiB/s",
            format_size(self.args.size),
            m.mib_s
        );
        Ok(())
    }
}

/// Files and network of the replicated target.
struct ReplSetup {
    secondary_file: PathBuf,
    primary_config: PathBuf,
    secondary_config: PathBuf,
    net: ReplNet,
}

#[derive(Clone, Copy)]
enum Side {
    Primary,
    Secondary,
}

/// Where the two tandemd of `tandem-repl` run and talk QUIC.
enum ReplNet {
    /// Primary in namespace `a`, secondary in `b`, joined by a veth pair.
    Netns(NetnsPair),
    /// Both in the root namespace, over 127.0.0.1; `note` says why.
    Loopback { note: String },
}

impl ReplNet {
    /// Chooses and sets up the network (prints what it chose).
    fn new(args: &Args) -> ReplNet {
        if args.repl_loopback {
            println!("tandem-repl: loopback (--repl-loopback)");
            return ReplNet::Loopback {
                note: "--repl-loopback".into(),
            };
        }
        match NetnsPair::create(args.repl_mtu) {
            Ok(p) => {
                println!(
                    "tandem-repl: primary in netns {} ({}), secondary in netns {} ({}), veth mtu {}",
                    p.a, p.addr_a, p.b, p.addr_b, p.mtu
                );
                ReplNet::Netns(p)
            }
            Err(e) => {
                let reason = format!("{e:#}");
                println!("tandem-repl: network namespaces unavailable ({reason}); using loopback");
                ReplNet::Loopback { note: reason }
            }
        }
    }

    /// `netns veth mtu 9000` or `loopback`.
    fn placement(&self) -> String {
        match self {
            ReplNet::Netns(p) => format!("netns veth mtu {}", p.mtu),
            ReplNet::Loopback { .. } => "loopback".into(),
        }
    }

    /// The placement with details, for the results header.
    fn describe(&self) -> String {
        match self {
            ReplNet::Netns(p) => format!(
                "{} ({} {} <-> {} {})",
                self.placement(),
                p.a,
                p.addr_a,
                p.b,
                p.addr_b
            ),
            ReplNet::Loopback { note } => {
                let mtu = self.mtu().map_or("unknown".into(), |m| m.to_string());
                format!("loopback (lo mtu {mtu}; {note})")
            }
        }
    }

    /// MTU of the link the replication traffic crosses.
    fn mtu(&self) -> Option<u32> {
        match self {
            ReplNet::Netns(p) => Some(p.mtu),
            ReplNet::Loopback { .. } => fs::read_to_string("/sys/class/net/lo/mtu")
                .ok()
                .and_then(|s| s.trim().parse().ok()),
        }
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "placement": self.placement(),
            "mtu": self.mtu(),
        });
        match self {
            ReplNet::Netns(p) => {
                v["namespaces"] = json!([p.a, p.b]);
                v["addresses"] = json!([p.addr_a, p.addr_b]);
            }
            ReplNet::Loopback { note } => v["loopback_reason"] = json!(note),
        }
        v
    }

    /// QUIC address of one side.
    fn addr(&self, side: Side, loopback_port: u16) -> String {
        match (self, side) {
            (ReplNet::Netns(p), Side::Primary) => format!("{}:{REPL_PORT}", p.addr_a),
            (ReplNet::Netns(p), Side::Secondary) => format!("{}:{REPL_PORT}", p.addr_b),
            (ReplNet::Loopback { .. }, _) => format!("127.0.0.1:{loopback_port}"),
        }
    }

    /// `tandemd`, or `ip netns exec NS tandemd` (ip execs, so the child's
    /// pid is tandemd's).
    fn tandemd(&self, side: Side, tandemd: &Path) -> Command {
        match self {
            ReplNet::Netns(p) => {
                let ns = match side {
                    Side::Primary => &p.a,
                    Side::Secondary => &p.b,
                };
                let mut c = Command::new(&p.ip);
                c.args(["netns", "exec", ns]).arg(tandemd);
                c
            }
            ReplNet::Loopback { .. } => Command::new(tandemd),
        }
    }
}

/// QUIC port of both sides when each has a namespace (and address) of its own.
const REPL_PORT: u16 = 7100;

/// Path of iproute2's `ip` (PATH, then /usr/sbin, /sbin).
fn ip_tool() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join("ip"))
        .find(|p| p.is_file())
}

/// Two network namespaces `tandem-bench-PID-a`/`-b` joined by a veth pair
/// (`tbenchPIDa` in a, `tbenchPIDb` in b) with `10.213.N.1/24` and
/// `10.213.N.2/24` (N from the pid), loopback up in both. Dropping it deletes
/// the namespaces it created, and with them the veth pair. Stop the processes
/// inside first: a namespace outlives `ip netns del` while a process uses it.
struct NetnsPair {
    ip: PathBuf,
    a: String,
    b: String,
    veth_a: String,
    veth_b: String,
    addr_a: String,
    addr_b: String,
    mtu: u32,
    /// Namespaces this guard created, and so deletes.
    created: Vec<String>,
    /// The setup commands, for the report.
    commands: Vec<String>,
}

impl NetnsPair {
    fn create(mtu: u32) -> Result<NetnsPair> {
        let ip = ip_tool().ok_or_else(|| anyhow!("`ip` not found; install iproute2"))?;
        let pid = std::process::id();
        let net = pid % 254 + 1;
        let mut pair = NetnsPair {
            ip,
            a: format!("tandem-bench-{pid}-a"),
            b: format!("tandem-bench-{pid}-b"),
            veth_a: format!("tbench{pid}a"),
            veth_b: format!("tbench{pid}b"),
            addr_a: format!("10.213.{net}.1"),
            addr_b: format!("10.213.{net}.2"),
            mtu,
            created: Vec::new(),
            commands: Vec::new(),
        };
        let result = pair.setup();
        // SAFETY: geteuid has no side effects.
        let euid = unsafe { libc::geteuid() };
        match result {
            Ok(()) => Ok(pair), // on error, dropping `pair` undoes the part done
            Err(e) if euid != 0 => Err(e.context(format!("not root (euid {euid})"))),
            Err(e) => Err(e),
        }
    }

    fn setup(&mut self) -> Result<()> {
        let (a, b) = (self.a.clone(), self.b.clone());
        // Leftovers of an earlier run with the same pid that was killed
        // before it could clean up.
        for ns in [&a, &b] {
            if ["/run/netns", "/var/run/netns"]
                .iter()
                .any(|d| Path::new(d).join(ns).exists())
            {
                let _ = Command::new(&self.ip)
                    .args(["netns", "del", ns])
                    .stdin(Stdio::null())
                    .output();
            }
        }
        for ns in [&a, &b] {
            check_interrupted()?;
            self.ip(&["netns", "add", ns])?;
            self.created.push(ns.clone());
        }
        let (va, vb) = (self.veth_a.clone(), self.veth_b.clone());
        self.ip(&[
            "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ])?;
        let mtu = self.mtu.to_string();
        for (ns, dev, addr) in [
            (&a, &va, self.addr_a.clone()),
            (&b, &vb, self.addr_b.clone()),
        ] {
            check_interrupted()?;
            self.ip(&["-n", ns, "link", "set", "lo", "up"])?;
            self.ip(&["-n", ns, "link", "set", dev, "mtu", &mtu])?;
            self.ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            self.ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(())
    }

    /// Runs `ip ARGS` in the root namespace and records it.
    fn ip(&mut self, args: &[&str]) -> Result<()> {
        let mut c = Command::new(&self.ip);
        c.args(args).stdin(Stdio::null());
        self.commands.push(command_line(&c));
        run_checked(&mut c).map(drop)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let out = Command::new(&self.ip)
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .output();
            match out {
                Ok(o) if o.status.success() => {}
                Ok(o) => eprintln!(
                    "warning: `ip netns del {ns}` failed ({}): {}; remove it by hand",
                    o.status,
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => eprintln!("warning: `ip netns del {ns}` failed: {e}; remove it by hand"),
            }
        }
    }
}

fn free_udp_port() -> Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("binding a UDP port")?;
    Ok(s.local_addr()?.port())
}

fn run_checked(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", command_line(cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        command_line(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Certificates, a secondary backing with the primary's UUID, the network
/// (two namespaces and a veth pair, or loopback) and the two configurations
/// of the replicated target (protocol C).
fn setup_repl(work: &Path, file: &Path, args: &Args, tandemctl: &Path) -> Result<ReplSetup> {
    let certs = work.join("certs");
    run_checked(
        Command::new(tandemctl)
            .args(["ca", "create", "--dir"])
            .arg(&certs),
    )?;
    for node in ["alpha", "beta"] {
        run_checked(
            Command::new(tandemctl)
                .args(["cert", "issue", "--ca-dir"])
                .arg(&certs)
                .args(["--node", node, "--out-dir"])
                .arg(&certs),
        )?;
    }
    let v: Value = serde_json::from_str(&run_checked(
        Command::new(tandemctl)
            .arg("inspect")
            .arg(file)
            .arg("--json"),
    )?)
    .context("tandemctl inspect --json")?;
    let uuid = v["uuid"]
        .as_str()
        .ok_or_else(|| anyhow!("tandemctl inspect --json: no uuid"))?
        .to_string();
    let secondary_file = work.join("secondary.img");
    run_checked(
        Command::new(tandemctl)
            .arg("create")
            .arg(&secondary_file)
            .arg("--size")
            .arg(format_size(args.size))
            .arg("--name")
            .arg(EXPORT_NAME)
            .arg("--uuid")
            .arg(&uuid),
    )?;
    let net = ReplNet::new(args);
    let (pa, pb) = match net {
        ReplNet::Netns(_) => (REPL_PORT, REPL_PORT),
        ReplNet::Loopback { .. } => (free_udp_port()?, free_udp_port()?),
    };
    let (pa, pb) = (net.addr(Side::Primary, pa), net.addr(Side::Secondary, pb));
    let workers = repl_worker_threads(args);
    let config = |me: &str,
                  role: &str,
                  listen: &str,
                  peer: &str,
                  peer_addr: &str,
                  backing: &Path| {
        format!(
            "[runtime]\nworker_threads = {workers}\n[[export]]\nname = \"{EXPORT_NAME}\"\nbacking = \"{}\"\n[export.replication]\nnode = \"{me}\"\nlisten = \"{listen}\"\ncert = \"{c}/{me}.crt\"\nkey = \"{c}/{me}.key\"\nca = \"{c}/ca.crt\"\nrole = \"{role}\"\npeers = [{{ name = \"{peer}\", address = \"{peer_addr}\" }}]\n",
            backing.display(),
            c = certs.display()
        )
    };
    let primary_config = work.join("repl-primary.toml");
    let secondary_config = work.join("repl-secondary.toml");
    fs::write(
        &primary_config,
        config("alpha", "primary", &pa, "beta", &pb, file),
    )?;
    fs::write(
        &secondary_config,
        config("beta", "secondary", &pb, "alpha", &pa, &secondary_file),
    )?;
    Ok(ReplSetup {
        secondary_file,
        primary_config,
        secondary_config,
        net,
    })
}

/// Worker threads of each `tandem-repl` daemon: `--repl-worker-threads`,
/// else half the CPUs (the two sites share this machine), at least one.
fn repl_worker_threads(args: &Args) -> usize {
    args.repl_worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        usize::from,
    )
}

/// Creates the backing file and returns the data area's offset.
fn create_volume(
    args: &Args,
    file: &Path,
    tandemctl: &Path,
) -> Result<(u64, Vec<(String, String)>)> {
    if let Some(off) = args.assume_data_offset {
        ensure!(
            off % 4096 == 0,
            "--assume-data-offset must be a multiple of 4096"
        );
        let f = File::create(file).with_context(|| format!("creating {}", file.display()))?;
        f.set_len(off + args.size)
            .with_context(|| format!("sizing {}", file.display()))?;
        return Ok((
            off,
            vec![(
                "create (assumed layout, no tandemctl)".into(),
                format!(
                    "truncate -s {} {}",
                    off + args.size,
                    shell_quote(&file.to_string_lossy())
                ),
            )],
        ));
    }
    let mut create = Command::new(tandemctl);
    create
        .arg("create")
        .arg(file)
        .arg("--size")
        .arg(format_size(args.size))
        .arg("--name")
        .arg(EXPORT_NAME);
    let mut inspect = Command::new(tandemctl);
    inspect.arg("inspect").arg(file).arg("--json");
    let cmds = vec![
        ("create volume".to_string(), command_line(&create)),
        ("inspect volume".to_string(), command_line(&inspect)),
    ];
    let out = create.output().context("running tandemctl create")?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        command_line(&create),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let out = inspect.output().context("running tandemctl inspect")?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        command_line(&inspect),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "tandemctl inspect --json printed invalid JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let data_offset = v["data_offset"]
        .as_u64()
        .ok_or_else(|| anyhow!("tandemctl inspect --json: no numeric `data_offset` in {v}"))?;
    let size = v["size"]
        .as_u64()
        .ok_or_else(|| anyhow!("tandemctl inspect --json: no numeric `size` in {v}"))?;
    ensure!(
        size == args.size,
        "tandemctl created a volume of {size} bytes, expected {}",
        args.size
    );
    ensure!(
        data_offset % 4096 == 0,
        "data_offset {data_offset} is not 4 KiB aligned; O_DIRECT would fail"
    );
    Ok((data_offset, cmds))
}

/// Fails early if the file system refuses O_DIRECT (tmpfs, some overlays).
fn check_o_direct(file: &Path) -> Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(file)
        .map(drop)
        .with_context(|| {
            format!(
                "opening {} with O_DIRECT failed: its file system does not support direct I/O \
                 (tmpfs?); choose another --dir",
                file.display()
            )
        })
}

fn check_free_space(dir: &Path, need: u64) -> Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Ok(()); // fio will report a real problem.
    }
    #[allow(clippy::useless_conversion)] // the field types are u32 on some targets
    let free = u64::from(st.f_bavail).saturating_mul(u64::from(st.f_frsize));
    ensure!(
        free >= need,
        "{} has {} MiB free, the backing file needs {} MiB",
        dir.display(),
        free / MIB,
        need / MIB
    );
    Ok(())
}

fn machine_facts(args: &Args, tandemd: &Path) -> Vec<(&'static str, String)> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let mem = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .map(|l| l.trim_start_matches("MemTotal:").trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let nproc = std::thread::available_parallelism()
        .map(|n| n.to_string())
        .unwrap_or_else(|_| "unknown".into());
    let dir = args.dir.to_string_lossy();
    let fstype = output_of("findmnt", &["-n", "-o", "FSTYPE", "--target", &dir])
        .or_else(|_| output_of("stat", &["-f", "-c", "%T", &dir]))
        .unwrap_or_else(|e| format!("unknown ({e:#})"));
    let mount = output_of(
        "findmnt",
        &["-n", "-o", "SOURCE,FSTYPE,OPTIONS", "--target", &dir],
    )
    .unwrap_or_else(|_| "unknown".into());
    let version = |p: &str| {
        output_of(p, &["--version"])
            .map(|s| first_line(&s))
            .unwrap_or_else(|_| "not available".into())
    };
    let mut facts = vec![
        ("nproc", nproc),
        ("cpu", cpu),
        ("memory", mem),
        ("kernel", first_line(&read("/proc/sys/kernel/osrelease"))),
        ("fio", version("fio")),
        ("qemu-nbd", version("qemu-nbd")),
        ("nbdinfo", version("nbdinfo")),
        ("dir", args.dir.display().to_string()),
        ("dir fs type", fstype),
        ("dir mount", mount),
    ];
    if args.targets.contains(&Target::Tandem) {
        facts.push(("tandemd", tandemd.display().to_string()));
    }
    facts
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("fio-compare: error: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut args = Args::parse();
    install_signal_handlers();
    ensure!(args.rounds >= 1, "--rounds must be at least 1");
    ensure!(args.runtime >= 1, "--runtime must be at least 1");
    let mut targets = Vec::new();
    for t in &args.targets {
        if !targets.contains(t) {
            targets.push(*t);
        }
    }
    args.targets = targets;
    ensure!(!args.targets.is_empty(), "--targets is empty");

    let workloads: Vec<&Workload> = WORKLOADS
        .iter()
        .filter(|w| args.only.as_deref().is_none_or(|s| w.name.contains(s)))
        .collect();
    if workloads.is_empty() {
        let names: Vec<_> = WORKLOADS.iter().map(|w| w.name).collect();
        bail!(
            "--only {:?} matches no workload; workloads: {}",
            args.only.as_deref().unwrap_or(""),
            names.join(", ")
        );
    }

    // Tools and binaries.
    require_tool("fio", "fio")?;
    let wants_nbd = args.targets.iter().any(|t| *t != Target::Raw);
    if wants_nbd {
        require_tool("nbdinfo", "libnbd-bin")?;
        ensure!(
            output_of("fio", &["--enghelp=nbd"]).is_ok(),
            "this fio has no `nbd` ioengine (built without libnbd); install Debian/Ubuntu's \
             `fio` package (3.20 or newer), which includes it"
        );
    }
    if args.targets.contains(&Target::QemuNbd) {
        require_tool("qemu-nbd", "qemu-utils")?;
    }
    let exe = std::env::current_exe().context("locating this executable")?;
    let tandemd = args
        .tandemd
        .clone()
        .unwrap_or_else(|| exe.with_file_name("tandemd"));
    let tandemctl = args
        .tandemctl
        .clone()
        .unwrap_or_else(|| exe.with_file_name("tandemctl"));
    if args.targets.contains(&Target::Tandem) || args.targets.contains(&Target::TandemRepl) {
        require_binary(&tandemd, "tandemd", "--tandemd")?;
    }
    if args.assume_data_offset.is_none() {
        require_binary(&tandemctl, "tandemctl", "--tandemctl")?;
    }

    // Work directory.
    fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("tandem-fio-")
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a work directory in {}", args.dir.display()))?;
    let work = tmp.path().to_path_buf();
    let keep = args.keep;
    // Keep or remove the directory on every exit path (servers are stopped
    // before, by their own guards, since they are dropped first).
    let _dir_guard = DirGuard(Some(tmp), keep);

    let facts = machine_facts(&args, &tandemd);
    println!("== machine");
    for (k, v) in &facts {
        println!("{k:>12}: {v}");
    }
    println!("{:>12}: {}", "work dir", work.display());
    println!();

    check_free_space(&work, args.size + 64 * MIB)?;
    let file = work.join("volume.img");
    let (data_offset, create_cmds) = create_volume(&args, &file, &tandemctl)?;
    check_o_direct(&file)?;
    println!(
        "volume {}: data area {} at offset {} ({} MiB)",
        file.display(),
        format_size(args.size),
        data_offset,
        data_offset / MIB
    );

    let repl = if args.targets.contains(&Target::TandemRepl) {
        Some(setup_repl(&work, &file, &args, &tandemctl)?)
    } else {
        None
    };
    let mut create_cmds = create_cmds;
    if let Some(ReplNet::Netns(p)) = repl.as_ref().map(|r| &r.net) {
        create_cmds.push(("tandem-repl network".into(), p.commands.join("\n")));
    }
    // Dropped after every server and before the work directory; when it
    // holds namespaces, dropping it deletes them (on errors and Ctrl-C too).
    let site_cpus = if args.site_cpus {
        let (local, remote) = site_cpu_lists()?;
        println!("site CPUs: fio and the server (tandem-repl primary) on {local}, the tandem-repl secondary on {remote}");
        Some((local, remote))
    } else {
        None
    };
    let mut bench = Bench {
        args,
        work,
        file,
        data_offset,
        tandemd,
        tandemctl,
        repl,
        commands: create_cmds,
        last_cpu: None,
        site_cpus,
    };
    bench.fill()?;
    check_interrupted()?;

    let targets = bench.args.targets.clone();
    let rounds = bench.args.rounds;
    let n_jobs = workloads.len() * targets.len() * rounds as usize;
    let eta = n_jobs as u64 * (bench.args.runtime + RAMP_SECS + 1);
    println!(
        "running {n_jobs} jobs ({} workloads x {} targets x {rounds} rounds), about {} min",
        workloads.len(),
        targets.len(),
        eta.div_ceil(60)
    );

    // results[(workload index, target)] = one Measurement per round.
    let mut results: BTreeMap<(usize, usize), Vec<Measurement>> = BTreeMap::new();
    let mut per_round = Vec::new();
    for round in 0..rounds {
        for (wi, w) in workloads.iter().enumerate() {
            let k = round as usize % targets.len();
            let order: Vec<Target> = targets[k..].iter().chain(&targets[..k]).copied().collect();
            for t in order {
                check_interrupted()?;
                let m = bench.run_job(t, w, round)?;
                println!(
                    "  round {} {:<24} {:<11} {:>10.0} IOPS {:>9.1} MiB/s  p50 {:>8.1} µs  p99 {:>8.1} µs",
                    round + 1,
                    w.name,
                    t.name(),
                    m.iops,
                    m.mib_s,
                    m.p50_us,
                    m.p99_us
                );
                let ti = targets.iter().position(|x| *x == t).unwrap_or(0);
                let mut entry = json!({
                    "round": round + 1,
                    "workload": w.name,
                    "target": t.name(),
                    "result": m.to_json(),
                });
                if t == Target::TandemRepl {
                    if let Some(r) = &bench.repl {
                        entry["placement"] = json!(r.net.placement());
                    }
                }
                if let Some(c) = bench.last_cpu {
                    entry["cpu_s_per_written_gib"] = c.to_json();
                }
                per_round.push(entry);
                results.entry((wi, ti)).or_default().push(m);
            }
        }
    }

    // Summary (medians across rounds).
    let med = |v: &[Measurement], f: fn(&Measurement) -> f64| median(v.iter().map(f).collect());
    let summary = |wi: usize, ti: usize| -> Option<Measurement> {
        let v = results.get(&(wi, ti))?;
        let opt = |f: fn(&Measurement) -> Option<f64>| {
            let xs: Vec<f64> = v.iter().filter_map(f).collect();
            (!xs.is_empty()).then(|| median(xs))
        };
        Some(Measurement {
            iops: med(v, |m| m.iops),
            mib_s: med(v, |m| m.mib_s),
            p50_us: med(v, |m| m.p50_us),
            p99_us: med(v, |m| m.p99_us),
            sync_p50_us: opt(|m| m.sync_p50_us),
            sync_p99_us: opt(|m| m.sync_p99_us),
        })
    };

    let mut table = String::new();
    let _ = writeln!(
        table,
        "\n== results ({} s per job{}, data size {})",
        bench.args.runtime,
        if rounds > 1 {
            format!(", median of {rounds} rounds")
        } else {
            String::new()
        },
        format_size(bench.args.size)
    );
    if let Some(r) = &bench.repl {
        let _ = writeln!(table, "tandem-repl placement: {}", r.net.describe());
        let _ = writeln!(
            table,
            "tandem-repl daemons: {} worker thread(s) each (--repl-worker-threads); tandem: 2",
            repl_worker_threads(&bench.args)
        );
    }
    if let Some((l, r)) = &bench.site_cpus {
        let _ = writeln!(
            table,
            "site CPUs (--site-cpus): fio + server/primary on {l}, tandem-repl secondary on {r}"
        );
    }
    let spread = rounds > 1;
    let _ = write!(
        table,
        "{:<24} {:<11} {:>10} {:>9} {:>9} {:>9}",
        "workload", "target", "IOPS", "MiB/s", "p50 µs", "p99 µs"
    );
    if spread {
        let _ = write!(table, "  {:>19}", "IOPS min..max");
    }
    table.push('\n');
    let mut summary_json = Vec::new();
    let mut ratios_json = Vec::new();
    let mut ratio_lines = String::new();
    for (wi, w) in workloads.iter().enumerate() {
        for (ti, t) in targets.iter().enumerate() {
            let Some(m) = summary(wi, ti) else { continue };
            let _ = write!(
                table,
                "{:<24} {:<11} {:>10.0} {:>9.1} {:>9.1} {:>9.1}",
                w.name,
                t.name(),
                m.iops,
                m.mib_s,
                m.p50_us,
                m.p99_us
            );
            if spread {
                let v = &results[&(wi, ti)];
                let lo = v.iter().map(|m| m.iops).fold(f64::INFINITY, f64::min);
                let hi = v.iter().map(|m| m.iops).fold(f64::NEG_INFINITY, f64::max);
                let _ = write!(table, "  {:>9.0}..{:<9.0}", lo, hi);
            }
            if let (Some(s50), Some(s99)) = (m.sync_p50_us, m.sync_p99_us) {
                let _ = write!(table, "   (fsync p50 {s50:.1} / p99 {s99:.1} µs)");
            }
            table.push('\n');
            let mut entry = json!({
                "workload": w.name,
                "target": t.name(),
                "result": m.to_json(),
            });
            if let (Target::TandemRepl, Some(r)) = (t, &bench.repl) {
                entry["placement"] = json!(r.net.placement());
            }
            summary_json.push(entry);
        }
        // Ratios: tandem vs qemu-nbd and raw; qemu-nbd vs raw.
        let get = |t: Target| {
            targets
                .iter()
                .position(|x| *x == t)
                .and_then(|ti| summary(wi, ti))
        };
        let pairs = [
            (Target::Tandem, Target::QemuNbd),
            (Target::Tandem, Target::Raw),
            (Target::QemuNbd, Target::Raw),
            (Target::TandemRepl, Target::QemuNbd),
            (Target::TandemRepl, Target::Tandem),
        ];
        let mut parts = Vec::new();
        for (a, b) in pairs {
            if let (Some(ma), Some(mb)) = (get(a), get(b)) {
                let iops = ma.iops / mb.iops;
                // With fsync=1 the write's own clat hides the cost (the
                // fsync is a separate op): compare write + fsync p50 instead.
                let p50 = ma.op_p50_us() / mb.op_p50_us();
                let label = if w.fsync { "p50 write+fsync" } else { "p50" };
                parts.push(format!(
                    "{}/{}: IOPS {:.2}x, {label} {:.2}x",
                    a.name(),
                    b.name(),
                    iops,
                    p50
                ));
                ratios_json.push(json!({
                    "workload": w.name,
                    "ratio": format!("{}/{}", a.name(), b.name()),
                    "iops": iops,
                    "p50": p50,
                    "p50_basis": if w.fsync { "write clat p50 + fsync p50" } else { "clat p50" },
                }));
            }
        }
        if !parts.is_empty() {
            let _ = writeln!(ratio_lines, "{:<24} {}", w.name, parts.join("   "));
        }
    }
    print!("{table}");
    if !ratio_lines.is_empty() {
        println!(
            "\n== ratios (IOPS: higher is better for the first; p50 latency: lower is better)"
        );
        print!("{ratio_lines}");
    }
    println!("\n== commands");
    for (label, line) in &bench.commands {
        println!("# {label}\n{line}");
    }

    if let Some(path) = &bench.args.json {
        let doc = json!({
            "machine": facts.iter().map(|(k, v)| (k.to_string(), Value::String(v.clone()))).collect::<serde_json::Map<_, _>>(),
            "config": {
                "size": bench.args.size,
                "data_offset": bench.data_offset,
                "runtime_s": bench.args.runtime,
                "ramp_s": RAMP_SECS,
                "rounds": rounds,
                "targets": targets.iter().map(|t| t.name()).collect::<Vec<_>>(),
                "site_cpus": bench.site_cpus.as_ref().map(|(l, r)| json!({"local": l, "remote": r})),
                "repl": bench.repl.as_ref().map(|r| {
                    let mut v = r.net.to_json();
                    v["worker_threads"] = json!(repl_worker_threads(&bench.args));
                    v
                }),
                "workloads": workloads.iter().map(|w| json!({
                    "name": w.name, "rw": w.rw, "bs": w.bs, "iodepth": w.iodepth, "fsync": w.fsync,
                })).collect::<Vec<_>>(),
            },
            "results": per_round,
            "summary": summary_json,
            "ratios": ratios_json,
            "commands": bench.commands.iter().map(|(l, c)| json!({"label": l, "command": c})).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc)?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    if keep {
        println!("\nkept work directory {}", bench.work.display());
    }
    Ok(())
}

/// Removes the work directory on drop unless `--keep`.
struct DirGuard(Option<tempfile::TempDir>, bool);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            if self.1 {
                let _ = dir.keep();
            } else {
                let path = dir.path().to_path_buf();
                if let Err(e) = dir.close() {
                    eprintln!("warning: could not remove {}: {e}", path.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert!(parse_size("1000").is_err());
        assert!(parse_size("x").is_err());
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(1536 << 20), "1536M");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("--size=1G"), "--size=1G");
        assert_eq!(
            shell_quote("--uri=nbd+unix:///bench?socket=/x"),
            "'--uri=nbd+unix:///bench?socket=/x'"
        );
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }

    #[test]
    fn parses_fio_json() {
        let v = json!({"jobs": [{"error": 0,
            "write": {"total_ios": 10, "iops": 1000.5, "bw_bytes": 4194304,
                      "clat_ns": {"percentile": {"50.000000": 50000, "99.000000": 99000}}},
            "sync": {"total_ios": 0, "lat_ns": {}}}]});
        let m = parse_measurement(&v, false).unwrap();
        assert_eq!(m.iops, 1000.5);
        assert_eq!(m.mib_s, 4.0);
        assert_eq!(m.p50_us, 50.0);
        assert_eq!(m.p99_us, 99.0);
        assert!(m.sync_p50_us.is_none());
        assert!(parse_measurement(&v, true).is_err());
        assert!(parse_measurement(&json!({}), false).is_err());
    }
}
