//! Harness for Tandem's end-to-end tests: real `tandemd`/`tandemctl`
//! processes in a temporary directory, external tools (fio, libnbd, qemu),
//! and a small blocking raw NBD client for protocol-level probing.
//!
//! The binaries are not built by `cargo test`; build them first with
//! `cargo build --release --workspace` (or without `--release`, matching the
//! test profile). Tests that need a missing tool or kernel feature print
//! `skipping: ...` and pass, unless `TANDEM_REQUIRE_ALL=1` (CI) makes that a
//! failure.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tandem_core::nbd::{
    self, decode_option_reply_header, encode_info_request, encode_option, opt, rep, Command as Cmd,
    Request, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, GREETING_LEN,
    OPTION_REPLY_HEADER_LEN, SIMPLE_REPLY_LEN,
};

pub use serde_json::Value as Json;

/// How long a daemon may take to become ready (or to exit when it must refuse to start).
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Binaries, tools, skips
// ---------------------------------------------------------------------------

/// `target/<profile>/` of the running test executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe
        .parent()
        .expect("test executable has a parent directory");
    // target/<profile>/deps/<test>-<hash> → target/<profile>
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// Path of a workspace binary (`tandemd`, `tandemctl`) built for the test's profile.
pub fn bin(name: &str) -> PathBuf {
    let dir = profile_dir();
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not found: run `cargo build --release --workspace` (or without --release, \
         matching the test profile) first",
        p.display()
    );
    p
}

/// `tandemd` next to the test executable.
pub fn tandemd() -> PathBuf {
    bin("tandemd")
}

/// `tandemctl` next to the test executable.
pub fn tandemctl() -> PathBuf {
    bin("tandemctl")
}

/// Whether CI asked for every test to really run (`TANDEM_REQUIRE_ALL=1`).
pub fn require_all() -> bool {
    std::env::var("TANDEM_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// Reports a skip: prints `skipping: <reason>` and returns false, or fails the
/// test when `TANDEM_REQUIRE_ALL=1`.
pub fn skip(reason: &str) -> bool {
    if require_all() {
        panic!("TANDEM_REQUIRE_ALL=1 but {reason}");
    }
    eprintln!("skipping: {reason}");
    false
}

fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .any(|d| {
            let p = d.join(tool);
            std::fs::metadata(&p).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
}

/// True when `tool` is installed; otherwise prints
/// `skipping: <tool> not installed (apt-get install <pkg>)` and returns false
/// (a failure under `TANDEM_REQUIRE_ALL=1`).
pub fn require(tool: &str, apt_package: &str) -> bool {
    on_path(tool)
        || skip(&format!(
            "{tool} not installed (apt-get install {apt_package})"
        ))
}

/// True when every `(tool, package)` is installed (reports the first missing one).
pub fn require_tools(tools: &[(&str, &str)]) -> bool {
    tools.iter().all(|(t, p)| require(t, p))
}

/// FUSE is usable: `/dev/fuse` opens read-write.
pub fn require_fuse() -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => true,
        Err(e) => skip(&format!("FUSE unavailable: /dev/fuse: {e}")),
    }
}

/// Loop devices are usable: we are root and `/dev/loop-control` opens.
pub fn require_loop() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return skip("loop devices and mount need root");
    }
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
    {
        Ok(_) => true,
        Err(e) => skip(&format!("loop devices unavailable: /dev/loop-control: {e}")),
    }
}

/// Serialises the heavy tests (fio, FUSE, loop devices) within one test binary,
/// so they stay correct even without `--test-threads=1`.
pub fn heavy_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a command to completion, capturing output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a command and panics (with its output) unless it exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command with a deadline; kills it (and panics) if it overruns.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    // Drain pipes on threads so a chatty child cannot block.
    let mut so = child.stdout.take().expect("stdout");
    let mut se = child.stderr.take().expect("stderr");
    let t1 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t1.join().unwrap_or_default();
            let stderr = t2.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
    };
    Output {
        status,
        stdout: t1.join().unwrap_or_default(),
        stderr: t2.join().unwrap_or_default(),
    }
}

/// Waits for a child up to `timeout`; `None` if it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes ANSI colour escapes (tracing colours its output even into files).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A directory under `/var/tmp` (a real disk, so O_DIRECT works; `/tmp` may be tmpfs).
pub fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tandem-e2e-")
        .tempdir_in("/var/tmp")
        .expect("creating a temp dir under /var/tmp")
}

// ---------------------------------------------------------------------------
// Deterministic random data
// ---------------------------------------------------------------------------

/// A small seeded PRNG (xorshift64*), enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator (seed 0 is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

// ---------------------------------------------------------------------------
// Volumes
// ---------------------------------------------------------------------------

/// Runs `tandemctl create PATH --size SIZE --name NAME [extra...]`.
pub fn create_volume(path: &Path, name: &str, size: u64, extra: &[&str]) {
    run_ok(
        Command::new(tandemctl())
            .arg("create")
            .arg(path)
            .args(["--size", &size.to_string(), "--name", name])
            .args(extra),
    );
}

/// `tandemctl inspect PATH --json`.
pub fn inspect(path: &Path) -> Json {
    let out = run_ok(
        Command::new(tandemctl())
            .arg("inspect")
            .arg(path)
            .arg("--json"),
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("tandemctl inspect --json: {e}\n{out}"))
}

/// Data offset of a volume's backing (from `tandemctl inspect --json`).
pub fn data_offset(path: &Path) -> u64 {
    inspect(path)["data_offset"]
        .as_u64()
        .expect("inspect --json has data_offset")
}

/// Reads `len` bytes of a backing file at `offset` with ordinary file I/O.
pub fn read_file_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut v = vec![0u8; len];
    f.read_exact(&mut v).expect("read");
    v
}

/// Overwrites bytes of a file at `offset`.
pub fn write_file_at(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

// ---------------------------------------------------------------------------
// The daemon
// ---------------------------------------------------------------------------

/// One export of a [`Daemon`].
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// Export (and volume) name.
    pub name: String,
    /// Backing file.
    pub backing: PathBuf,
}

/// Builder for a [`Daemon`].
#[derive(Debug, Default)]
pub struct DaemonBuilder {
    volumes: Vec<(String, u64, Vec<String>)>,
    engine: Option<String>,
    tcp: bool,
    extra: Vec<String>,
    netns: Option<String>,
}

impl DaemonBuilder {
    /// Formats a volume `name` of `size` bytes and exports it under the same name.
    pub fn volume(mut self, name: &str, size: u64) -> Self {
        self.volumes.push((name.into(), size, Vec::new()));
        self
    }

    /// Like [`DaemonBuilder::volume`] with extra `tandemctl create` flags.
    pub fn volume_with(mut self, name: &str, size: u64, create_flags: &[&str]) -> Self {
        self.volumes.push((
            name.into(),
            size,
            create_flags.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// `--engine NAME` (default: the daemon's default engine).
    pub fn engine(mut self, engine: Option<&str>) -> Self {
        self.engine = engine.map(str::to_string);
        self
    }

    /// Also listen on TCP (127.0.0.1, a free port).
    pub fn tcp(mut self) -> Self {
        self.tcp = true;
        self
    }

    /// Extra `tandemd run` arguments.
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.into());
        self
    }

    /// Runs tandemd inside network namespace `name`
    /// (`ip netns exec NAME tandemd ...`; `ip` execs, so the child *is*
    /// tandemd). The unix sockets stay reachable from the root namespace.
    /// Not combinable with [`DaemonBuilder::tcp`] (the readiness probe
    /// connects from the root namespace).
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.into());
        self
    }

    /// Creates the directory and volumes, then starts the daemon and waits until it is ready.
    pub fn start(self) -> Daemon {
        let mut d = self.prepare();
        d.start();
        d
    }

    /// Creates the directory and volumes without starting the daemon.
    pub fn prepare(self) -> Daemon {
        let dir = temp_dir();
        let mut exports = Vec::new();
        for (name, size, flags) in &self.volumes {
            let backing = dir.path().join(format!("{name}.img"));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            create_volume(&backing, name, *size, &flags);
            exports.push(ExportSpec {
                name: name.clone(),
                backing,
            });
        }
        assert!(
            !(self.tcp && self.netns.is_some()),
            "DaemonBuilder: .tcp() and .netns() cannot be combined"
        );
        let tcp_port = self.tcp.then(free_tcp_port);
        Daemon {
            netns: self.netns,
            nbd_socket: dir.path().join("nbd.sock"),
            admin_socket: dir.path().join("admin.sock"),
            log_path: dir.path().join("tandemd.log"),
            exports,
            engine: self.engine,
            tcp_port,
            extra: self.extra,
            config: None,
            child: None,
            starts: 0,
            dir,
        }
    }
}

fn free_tcp_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// A `tandemd run` process in its own temporary directory. Killed on drop;
/// if the test is panicking, its log is printed.
#[derive(Debug)]
pub struct Daemon {
    dir: tempfile::TempDir,
    nbd_socket: PathBuf,
    admin_socket: PathBuf,
    log_path: PathBuf,
    exports: Vec<ExportSpec>,
    engine: Option<String>,
    tcp_port: Option<u16>,
    extra: Vec<String>,
    config: Option<PathBuf>,
    child: Option<Child>,
    starts: u32,
    netns: Option<String>,
}

impl Daemon {
    /// A builder.
    pub fn builder() -> DaemonBuilder {
        DaemonBuilder::default()
    }

    /// The temporary directory (removed on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The NBD unix socket.
    pub fn socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// The admin socket.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// `nbd+unix:///EXPORT?socket=SOCK`.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_socket.display())
    }

    /// `nbd://127.0.0.1:PORT/EXPORT` (requires [`DaemonBuilder::tcp`]).
    pub fn tcp_uri(&self, export: &str) -> String {
        format!(
            "nbd://127.0.0.1:{}/{export}",
            self.tcp_port.expect("daemon built without .tcp()")
        )
    }

    /// The TCP port, if any.
    pub fn tcp_port(&self) -> Option<u16> {
        self.tcp_port
    }

    /// Backing file of an export.
    pub fn backing(&self, export: &str) -> &Path {
        &self
            .exports
            .iter()
            .find(|e| e.name == export)
            .unwrap_or_else(|| panic!("no export {export:?}"))
            .backing
    }

    /// The `tandemd run` arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["run".to_string()];
        if let Some(c) = &self.config {
            a.push("--config".into());
            a.push(c.display().to_string());
        } else {
            for e in &self.exports {
                a.push("--export".into());
                a.push(format!("{}={}", e.name, e.backing.display()));
            }
        }
        a.push("--nbd-unix".into());
        a.push(self.nbd_socket.display().to_string());
        if let Some(p) = self.tcp_port {
            a.push("--nbd-tcp".into());
            a.push(format!("127.0.0.1:{p}"));
        }
        a.push("--admin-socket".into());
        a.push(self.admin_socket.display().to_string());
        if let Some(e) = &self.engine {
            a.push("--engine".into());
            a.push(e.clone());
        }
        a.extend(self.extra.iter().cloned());
        a
    }

    /// Starts tandemd (stderr appended to the log file) and waits until both
    /// sockets accept connections. Panics (with the log) if it exits or times out.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "daemon already running");
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .expect("open log");
        writeln!(log, "=== test harness: start #{} ===", self.starts).expect("write log");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(ip_tool());
                c.args(["netns", "exec", ns]).arg(tandemd());
                c
            }
            None => Command::new(tandemd()),
        };
        let child = cmd
            .args(self.args())
            .env_remove("RUST_LOG")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawning tandemd");
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(st) = self
                .child
                .as_mut()
                .expect("child")
                .try_wait()
                .expect("try_wait")
            {
                self.child = None;
                panic!(
                    "tandemd exited during start-up with {st}; log:\n{}",
                    self.log()
                );
            }
            let nbd_ok = UnixStream::connect(&self.nbd_socket).is_ok();
            let admin_ok = UnixStream::connect(&self.admin_socket).is_ok();
            let tcp_ok = self
                .tcp_port
                .is_none_or(|p| std::net::TcpStream::connect(("127.0.0.1", p)).is_ok());
            if nbd_ok && admin_ok && tcp_ok {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "tandemd not ready within {START_TIMEOUT:?} (nbd socket {nbd_ok}, admin socket {admin_ok}, tcp {tcp_ok}); log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().expect("try_wait").is_none(),
            None => false,
        }
    }

    /// Asserts the daemon is still running (with the log if not).
    pub fn assert_running(&mut self) {
        if !self.is_running() {
            panic!("tandemd is no longer running; log:\n{}", self.log());
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon not running").id()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait (up to 30 s), and assert a clean exit 0.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("daemon not running");
        // SAFETY: plain kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM): {}", std::io::Error::last_os_error());
        match wait_timeout(&mut c, Duration::from_secs(30)) {
            Some(st) => assert!(
                st.success(),
                "tandemd exited with {st} after SIGTERM (expected 0); log:\n{}",
                self.log()
            ),
            None => {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "tandemd did not exit within 30 s of SIGTERM; log:\n{}",
                    self.log()
                );
            }
        }
    }

    /// Uses a TOML configuration file (written to the daemon's directory)
    /// instead of `--export` flags; sockets and engine still come from flags.
    /// `{dir}` in the text is replaced by the daemon's directory.
    pub fn set_config(&mut self, toml: &str) -> PathBuf {
        let p = self.dir.path().join("tandemd.toml");
        let text = toml.replace("{dir}", &self.dir.path().display().to_string());
        std::fs::write(&p, text).expect("write config");
        self.config = Some(p.clone());
        p
    }

    /// Appends `tandemd run` arguments (takes effect at the next start).
    pub fn add_args(&mut self, args: &[&str]) {
        self.extra.extend(args.iter().map(|a| a.to_string()));
    }

    /// Runs `tandemd` with this daemon's arguments expecting it to refuse to
    /// start (see [`tandemd_must_refuse`]); returns its stderr.
    pub fn must_refuse(&self) -> String {
        assert!(self.child.is_none(), "daemon already running");
        let args = self.args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        tandemd_must_refuse(&args)
    }

    /// `stop()` then `start()` on the same backings.
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    /// The daemon's log so far (all starts, ANSI escapes removed).
    pub fn log(&self) -> String {
        strip_ansi(&std::fs::read_to_string(&self.log_path).unwrap_or_default())
    }

    /// `tandemctl status --admin-socket ... --json`.
    pub fn status(&self) -> Json {
        let out = run_ok(
            Command::new(tandemctl())
                .arg("status")
                .arg("--admin-socket")
                .arg(&self.admin_socket)
                .arg("--json"),
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("tandemctl status --json: {e}\n{out}"))
    }

    /// The status entry of one export.
    pub fn export_status(&self, export: &str) -> Json {
        let st = self.status();
        st["exports"]
            .as_array()
            .expect("status has exports[]")
            .iter()
            .find(|e| e["name"] == export)
            .unwrap_or_else(|| panic!("no export {export:?} in status {st}"))
            .clone()
    }

    /// Connects the async client from `tandem_daemon` (structured replies, `NBD_OPT_GO`).
    pub async fn client(&self, export: &str) -> tandem_daemon::nbd::client::Client {
        tandem_daemon::nbd::client::Client::connect_unix(&self.nbd_socket, export)
            .await
            .unwrap_or_else(|e| panic!("connecting to export {export:?}: {e:#}"))
    }

    /// Opens a raw connection (greeting already read).
    pub fn raw(&self) -> RawConn {
        RawConn::connect(&self.nbd_socket)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- tandemd log ({}) ----\n{}\n---- end of tandemd log ----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// Runs `tandemd ARGS` expecting it to refuse to start: it must exit non-zero
/// within [`START_TIMEOUT`]. Returns its stderr (ANSI removed). Panics if it
/// keeps running (it served something it should have refused) or exits 0.
pub fn tandemd_must_refuse(args: &[&str]) -> String {
    let mut cmd = Command::new(tandemd());
    cmd.args(args).env_remove("RUST_LOG").env("NO_COLOR", "1");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning tandemd");
    let st = wait_timeout(&mut child, START_TIMEOUT);
    if st.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait");
    let stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr));
    match st {
        None => {
            panic!("tandemd {args:?} kept running instead of refusing to start; stderr:\n{stderr}")
        }
        Some(s) if s.success() => {
            panic!("tandemd {args:?} exited 0 instead of refusing; stderr:\n{stderr}")
        }
        Some(_) => stderr,
    }
}

// ---------------------------------------------------------------------------
// Raw blocking NBD client
// ---------------------------------------------------------------------------

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    /// Option answered.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply: u32,
    /// Reply data.
    pub data: Vec<u8>,
}

/// A simple (non-structured) reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimpleReply {
    /// Cookie echoed.
    pub cookie: u64,
    /// NBD error (0 = ok).
    pub error: u32,
}

/// A blocking raw NBD connection for protocol probing. Transmission uses
/// simple replies (no `NBD_OPT_STRUCTURED_REPLY`) unless the caller negotiates it.
#[derive(Debug)]
pub struct RawConn {
    /// The socket.
    pub s: UnixStream,
    cookie: u64,
}

impl RawConn {
    /// Connects and reads/checks the 18-byte newstyle greeting.
    pub fn connect(path: &Path) -> RawConn {
        let s =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let mut c = RawConn { s, cookie: 100 };
        let g = c.read_n(GREETING_LEN);
        assert_eq!(&g[..8], &nbd::NBDMAGIC.to_be_bytes(), "greeting magic");
        assert_eq!(&g[8..16], &nbd::IHAVEOPT.to_be_bytes(), "greeting IHAVEOPT");
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        assert!(
            hflags & nbd::FLAG_FIXED_NEWSTYLE != 0,
            "server must advertise fixed newstyle"
        );
        c
    }

    /// Sends raw bytes.
    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    /// Sends raw bytes, tolerating a peer that already closed.
    pub fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b);
    }

    /// Reads exactly `n` bytes (panics on EOF/timeout).
    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
        v
    }

    /// True if the server closes the connection within `timeout` (EOF or reset),
    /// discarding anything it still sends.
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        self.s.set_read_timeout(Some(timeout)).expect("timeout");
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {
                    if Instant::now() >= deadline {
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false, // timeout
            }
        }
    }

    /// Sends the client flags.
    pub fn client_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes());
    }

    /// Sends fixed-newstyle + no-zeroes client flags.
    pub fn fixed_newstyle(&mut self) {
        self.client_flags(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    }

    /// Sends an option request.
    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut m = Vec::new();
        encode_option(&mut m, option, data);
        self.send(&m);
    }

    /// Reads one option reply.
    pub fn option_reply(&mut self) -> OptReply {
        let h = self.read_n(OPTION_REPLY_HEADER_LEN);
        let h = decode_option_reply_header(&h).expect("option reply magic");
        assert!(
            h.length <= 1 << 20,
            "implausible option reply length {}",
            h.length
        );
        let data = self.read_n(h.length as usize);
        OptReply {
            option: h.option,
            reply: h.reply,
            data,
        }
    }

    /// Sends an option and reads replies up to and including the final one
    /// (ACK or an error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        let mut v = Vec::new();
        loop {
            let r = self.option_reply();
            assert_eq!(r.option, option, "reply for another option");
            let last = r.reply == rep::ACK || r.reply & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// `NBD_OPT_GO` for `export`; returns all replies (last one ACK or error).
    pub fn go(&mut self, export: &str) -> Vec<OptReply> {
        let mut d = Vec::new();
        encode_info_request(&mut d, export, &[]);
        self.option(opt::GO, &d)
    }

    /// Full handshake (fixed newstyle, no structured replies, `NBD_OPT_GO`);
    /// returns (size, transmission flags).
    pub fn handshake(&mut self, export: &str) -> (u64, u16) {
        self.fixed_newstyle();
        let replies = self.go(export);
        assert_eq!(
            replies.last().map(|r| r.reply),
            Some(rep::ACK),
            "OPT_GO {export:?} refused: {replies:?}"
        );
        export_info(&replies).expect("OPT_GO sent NBD_INFO_EXPORT")
    }

    /// Sends a request header (and payload); returns its cookie.
    pub fn request(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> u64 {
        self.cookie += 1;
        let r = Request {
            flags,
            command: Cmd::from_code(command),
            cookie: self.cookie,
            offset,
            length,
        };
        let mut h = Vec::with_capacity(nbd::REQUEST_LEN + payload.len());
        r.encode(&mut h);
        h.extend_from_slice(payload);
        self.send(&h);
        self.cookie
    }

    /// Reads one simple reply header.
    pub fn simple_reply(&mut self) -> SimpleReply {
        let h = self.read_n(SIMPLE_REPLY_LEN);
        match nbd::decode_reply_header(&h).expect("reply magic") {
            nbd::ReplyHeader::Simple { cookie, error } => SimpleReply { cookie, error },
            other => panic!("expected a simple reply, got {other:?}"),
        }
    }

    /// Sends a request and returns the NBD error of its simple reply (0 = ok);
    /// for a successful READ the data is read and returned.
    pub fn call(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        let cookie = self.request(command, flags, offset, length, payload);
        let r = self.simple_reply();
        assert_eq!(r.cookie, cookie, "reply cookie");
        let data = if r.error == 0 && command == 0 {
            self.read_n(length as usize)
        } else {
            Vec::new()
        };
        (r.error, data)
    }

    /// Writes then reads back `data` at `offset`, asserting success and equality.
    pub fn write_read_check(&mut self, offset: u64, data: &[u8]) {
        let (e, _) = self.call(1, 0, offset, data.len() as u32, data);
        assert_eq!(e, 0, "WRITE at {offset} failed with NBD error {e}");
        let (e, back) = self.call(0, 0, offset, data.len() as u32, &[]);
        assert_eq!(e, 0, "READ at {offset} failed with NBD error {e}");
        assert!(
            back == data,
            "READ at {offset} returned different data than written"
        );
    }
}

/// Extracts (size, flags) from the `NBD_INFO_EXPORT` reply among option replies.
pub fn export_info(replies: &[OptReply]) -> Option<(u64, u16)> {
    replies.iter().find_map(|r| {
        (r.reply == rep::INFO && r.data.len() == 12 && r.data[..2] == [0, 0]).then(|| {
            (
                u64::from_be_bytes(r.data[2..10].try_into().expect("8 bytes")),
                u16::from_be_bytes([r.data[10], r.data[11]]),
            )
        })
    })
}

/// Runs a future on a fresh current-thread tokio runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

// ---------------------------------------------------------------------------
// Network namespaces
// ---------------------------------------------------------------------------

/// Path of iproute2's `ip` (PATH, then `/usr/sbin`, `/sbin`).
pub fn ip_tool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].iter().map(PathBuf::from))
        .map(|d| d.join("ip"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("ip"))
}

/// Runs `ip ARGS` (in the root namespace), returning its output.
pub fn ip(args: &[&str]) -> Output {
    run(Command::new(ip_tool()).args(args))
}

/// Runs `ip netns exec NS PROGRAM ARGS...` and panics unless it exits 0.
pub fn netns_exec_ok(ns: &str, program: &str, args: &[&str]) -> String {
    run_ok(
        Command::new(ip_tool())
            .args(["netns", "exec", ns, program])
            .args(args),
    )
}

/// Two network namespaces `tdm-<pid>-a` / `tdm-<pid>-b` joined by a veth pair
/// (`tdma<pid>` in a, `tdmb<pid>` in b) with addresses
/// `10.203.<pid % 250>.1/30` and `.2/30`, loopback up in both. Dropping it
/// deletes both namespaces (which deletes the veth pair too).
#[derive(Debug)]
pub struct NetnsPair {
    /// Namespace of side a.
    pub a: String,
    /// Namespace of side b.
    pub b: String,
    /// The veth interface in `a`.
    pub veth_a: String,
    /// The veth interface in `b`.
    pub veth_b: String,
    /// Address of `veth_a`.
    pub addr_a: String,
    /// Address of `veth_b`.
    pub addr_b: String,
}

impl NetnsPair {
    /// Creates the pair, or reports a skip and returns `None`: a missing `ip`
    /// tool goes through [`require`] (a failure under `TANDEM_REQUIRE_ALL=1`);
    /// namespaces being unavailable (permission, kernel) is always a skip.
    pub fn create() -> Option<NetnsPair> {
        if !require("ip", "iproute2") {
            return None;
        }
        let pid = std::process::id();
        let net = pid % 250;
        let pair = NetnsPair {
            a: format!("tdm-{pid}-a"),
            b: format!("tdm-{pid}-b"),
            veth_a: format!("tdma{pid}"),
            veth_b: format!("tdmb{pid}"),
            addr_a: format!("10.203.{net}.1"),
            addr_b: format!("10.203.{net}.2"),
        };
        // Leftovers of an earlier run with the same pid (crash): remove them.
        pair.delete();
        for ns in [&pair.a, &pair.b] {
            let out = ip(&["netns", "add", ns]);
            if !out.status.success() {
                eprintln!(
                    "skipping: network namespaces unavailable (ip netns add {ns}: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                return None; // drop deletes whatever was created
            }
        }
        let out = ip(&[
            "link",
            "add",
            &pair.veth_a,
            "netns",
            &pair.a,
            "type",
            "veth",
            "peer",
            "name",
            &pair.veth_b,
            "netns",
            &pair.b,
        ]);
        if !out.status.success() {
            eprintln!(
                "skipping: network namespaces unavailable (veth pair: {})",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        for (ns, dev, addr) in [
            (&pair.a, &pair.veth_a, &pair.addr_a),
            (&pair.b, &pair.veth_b, &pair.addr_b),
        ] {
            netns_exec_ok(ns, "ip", &["link", "set", "lo", "up"]);
            netns_exec_ok(
                ns,
                "ip",
                &["addr", "add", &format!("{addr}/30"), "dev", dev],
            );
            netns_exec_ok(ns, "ip", &["link", "set", dev, "up"]);
        }
        Some(pair)
    }

    fn delete(&self) {
        for ns in [&self.a, &self.b] {
            let _ = ip(&["netns", "delete", ns]);
        }
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        self.delete();
    }
}
