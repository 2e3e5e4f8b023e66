//! Harness for the CSI conformance tests: the real `tandem-csi` binary on a
//! temporary unix socket, and a tonic client connected to it.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_csi::csi;
use tandem_csi::csi::controller_client::ControllerClient;
use tandem_csi::csi::identity_client::IdentityClient;
use tandem_csi::csi::node_client::NodeClient;
use tandem_csi::csi::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use tonic::transport::{Channel, Endpoint, Uri};

pub mod crd;

/// Zone topology key.
pub const ZONE: &str = "topology.kubernetes.io/zone";
/// Node topology key.
pub const NODE: &str = "topology.tandem.io/node";

/// A `tandem-csi` process in its own temporary directory; killed on drop,
/// its log printed if the test is failing.
pub struct Driver {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// The three-zone inventory most tests use: two nodes in zone a, one in b,
/// one in c, each 10 GiB.
pub const INVENTORY: &str = r#"
[[node]]
name = "a1"
capacity_bytes = 10737418240
topology = { "topology.kubernetes.io/zone" = "a" }
[[node]]
name = "a2"
capacity_bytes = 10737418240
topology = { "topology.kubernetes.io/zone" = "a" }
[[node]]
name = "b1"
capacity_bytes = 10737418240
topology = { "topology.kubernetes.io/zone" = "b" }
[[node]]
name = "c1"
capacity_bytes = 10737418240
topology = { "topology.kubernetes.io/zone" = "c" }
"#;

pub const GIB: i64 = 1 << 30;

impl Driver {
    /// A controller with `inventory`, extra environment, started and ready.
    pub fn controller(inventory: &str, env: &[(&str, &str)]) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("tandem-csi-")
            .tempdir()
            .expect("temp dir");
        let inv = dir.path().join("nodes.toml");
        std::fs::write(&inv, inventory).expect("write inventory");
        let args = vec![
            "controller".to_string(),
            "--store".into(),
            format!("file:{}", dir.path().join("volumes").display()),
            "--nodes".into(),
            inv.display().to_string(),
        ];
        Self::start_with(dir, args, env)
    }

    /// Starts `tandem-csi ARGS --endpoint unix://DIR/csi.sock` and waits for the socket.
    pub fn start_with(dir: tempfile::TempDir, args: Vec<String>, env: &[(&str, &str)]) -> Driver {
        let mut d = Driver {
            socket: dir.path().join("csi.sock"),
            log: dir.path().join("tandem-csi.log"),
            dir,
            args,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        d.start();
        d
    }

    /// (Re)starts the process with the same arguments.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem-csi"));
        cmd.args(&self.args)
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket.display()))
            .arg("--log-level")
            .arg("debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn tandem-csi"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket).is_ok() {
                return;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!(
                    "tandem-csi exited with {st} before listening:\n{}",
                    self.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "tandem-csi not listening within 20 s:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit by itself (e.g. a crash hook); returns its code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                return st.code();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "tandem-csi did not exit within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait; asserts a clean exit and that the socket is gone.
    pub fn stop(&mut self) {
        let mut c = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(st) = c.try_wait().expect("try_wait") {
                assert!(
                    st.success(),
                    "tandem-csi exited with {st}:\n{}",
                    self.log_text()
                );
                break;
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                panic!("tandem-csi ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!self.socket.exists(), "socket left behind after SIGTERM");
    }

    /// Sets an environment variable for the next start.
    pub fn set_env(&mut self, k: &str, v: Option<&str>) {
        self.env.retain(|(key, _)| key != k);
        if let Some(v) = v {
            self.env.push((k.into(), v.into()));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn channel(&self) -> Channel {
        let path = self.socket.clone();
        Endpoint::try_from("http://[::]:50051")
            .expect("endpoint")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                tokio::net::UnixStream::connect(path.clone())
            }))
            .await
            .expect("connect to the CSI socket")
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn controller_client(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn node_client(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- tandem-csi log ----\n{}", self.log_text());
        }
    }
}

/// A capability: block or mount (`fs`), with `mode`.
pub fn cap(mode: Mode, block: bool, fs: &str) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })
        }),
    }
}

/// SINGLE_NODE_WRITER block.
pub fn rwo_block() -> csi::VolumeCapability {
    cap(Mode::SingleNodeWriter, true, "")
}

/// MULTI_NODE_MULTI_WRITER block.
pub fn rwx_block() -> csi::VolumeCapability {
    cap(Mode::MultiNodeMultiWriter, true, "")
}

/// String map from pairs.
pub fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A topology segment.
pub fn topo(pairs: &[(&str, &str)]) -> csi::Topology {
    csi::Topology {
        segments: map(pairs),
    }
}

/// A CreateVolume request: `name`, `bytes` required, caps, params.
pub fn create_req(
    name: &str,
    bytes: i64,
    caps: Vec<csi::VolumeCapability>,
    params: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: caps,
        parameters: map(params),
        ..Default::default()
    }
}

/// Asserts a call failed with `code`; returns the message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: tonic::Code,
) -> String {
    match r {
        Ok(v) => panic!("expected {code:?}, got OK: {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code; message: {}", s.message());
            s.message().to_string()
        }
    }
}

/// Runs a future on a fresh current-thread runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}
