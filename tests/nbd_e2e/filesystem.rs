//! A real filesystem on a Tandem volume: nbdfuse exposes the export as a file,
//! a loop device turns it into a block device, ext4 lives on it. Files written
//! before a tandemd restart read back identically after it, and fsck is clean.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tandem_tests::{
    heavy_lock, require_fuse, require_loop, require_tools, run, run_ok, wait_timeout, Daemon, Rng,
};

const VOL: u64 = 256 << 20;

/// nbdfuse serving one export as `MOUNTDIR/nbd`. Unmounted and killed on drop.
struct Nbdfuse {
    dir: PathBuf,
    child: Option<Child>,
    log: PathBuf,
}

impl Nbdfuse {
    fn mount(dir: &Path, uri: &str, tag: &str) -> Nbdfuse {
        std::fs::create_dir_all(dir).expect("mkdir fuse dir");
        let pidfile = dir.with_extension(format!("{tag}.pid"));
        let log = dir.with_extension(format!("{tag}.log"));
        let _ = std::fs::remove_file(&pidfile);
        let logf = File::create(&log).expect("nbdfuse log");
        let child = Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(dir)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("dup"))
            .stderr(logf)
            .spawn()
            .expect("spawn nbdfuse");
        let mut f = Nbdfuse {
            dir: dir.to_path_buf(),
            child: Some(child),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if pidfile.exists() && f.file().exists() {
                break;
            }
            if let Some(st) = f.child.as_mut().unwrap().try_wait().expect("try_wait") {
                f.child = None;
                panic!(
                    "nbdfuse exited with {st}: {}",
                    std::fs::read_to_string(&f.log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nbdfuse not ready within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let len = std::fs::metadata(f.file()).expect("stat nbd file").len();
        assert_eq!(len, VOL, "nbdfuse file size");
        f
    }

    fn file(&self) -> PathBuf {
        self.dir.join("nbd")
    }

    /// Unmounts and checks nbdfuse exits cleanly.
    fn unmount(mut self) {
        run_ok(Command::new("fusermount3").arg("-u").arg(&self.dir));
        let mut c = self.child.take().expect("nbdfuse running");
        let st = wait_timeout(&mut c, Duration::from_secs(20)).unwrap_or_else(|| {
            let _ = c.kill();
            panic!("nbdfuse did not exit after fusermount3 -u")
        });
        assert!(
            st.success(),
            "nbdfuse exited with {st}: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }
}

impl Drop for Nbdfuse {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = run(Command::new("fusermount3")
                .arg("-u")
                .arg("-z")
                .arg(&self.dir));
            if wait_timeout(&mut c, Duration::from_secs(5)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A loop device on a file. Detached on drop.
struct LoopDev {
    dev: Option<String>,
}

impl LoopDev {
    fn attach(file: &Path) -> LoopDev {
        let out = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file));
        let dev = out.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
        LoopDev { dev: Some(dev) }
    }

    fn dev(&self) -> &str {
        self.dev.as_deref().expect("attached")
    }

    fn detach(mut self) {
        let dev = self.dev.take().expect("attached");
        run_ok(Command::new("losetup").arg("-d").arg(&dev));
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        if let Some(dev) = self.dev.take() {
            let _ = run(Command::new("losetup").arg("-d").arg(&dev));
        }
    }
}

/// A mounted filesystem. Unmounted (lazily if need be) on drop.
struct Mounted {
    dir: Option<PathBuf>,
}

impl Mounted {
    fn mount(dev: &str, dir: &Path) -> Mounted {
        std::fs::create_dir_all(dir).expect("mkdir mnt");
        run_ok(Command::new("mount").args(["-t", "ext4", dev]).arg(dir));
        Mounted {
            dir: Some(dir.to_path_buf()),
        }
    }

    fn path(&self) -> &Path {
        self.dir.as_deref().expect("mounted")
    }

    fn umount(mut self) {
        let dir = self.dir.take().expect("mounted");
        run_ok(Command::new("umount").arg(&dir));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            if !run(Command::new("umount").arg(&dir)).status.success() {
                let _ = run(Command::new("umount").arg("-l").arg(&dir));
            }
        }
    }
}

#[test]
fn ext4_on_nbdfuse_loop_survives_restart() {
    let tools = [
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("mount", "mount"),
        ("mkfs.ext4", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
    ];
    if !require_tools(&tools) || !require_fuse() || !require_loop() {
        return;
    }
    let _serial = heavy_lock();
    let mut d = Daemon::builder().volume("vol", VOL).start();
    let uri = d.uri("vol");
    let fuse_dir = d.dir().join("fuse");
    let mnt_dir = d.dir().join("mnt");

    // Files with random content: sizes from 64 KiB to ~3 MiB, one in a subdirectory.
    let mut rng = Rng::new(99);
    let files: Vec<(PathBuf, Vec<u8>)> = (0..6)
        .map(|i| {
            let name = if i == 5 {
                PathBuf::from("sub/dir/deep.bin")
            } else {
                PathBuf::from(format!("f{i}.bin"))
            };
            let len = (64 << 10) + rng.below(3 << 20) as usize;
            (name, rng.bytes(len))
        })
        .collect();

    {
        let fuse = Nbdfuse::mount(&fuse_dir, &uri, "first");
        let lo = LoopDev::attach(&fuse.file());
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F", lo.dev()]));
        let m = Mounted::mount(lo.dev(), &mnt_dir);
        for (name, data) in &files {
            let p = m.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).expect("mkdir");
            std::fs::write(&p, data).expect("write file");
        }
        run_ok(&mut Command::new("sync"));
        m.umount();
        lo.detach();
        fuse.unmount();
    }
    let st = d.export_status("vol");
    assert!(
        st["writes"].as_u64().unwrap_or(0) > 0,
        "no NBD writes reached tandemd: {st}"
    );
    assert!(
        st["flushes"].as_u64().unwrap_or(0) > 0,
        "sync/umount sent no NBD FLUSH: {st}"
    );

    d.restart();

    let fuse = Nbdfuse::mount(&fuse_dir, &uri, "second");
    let lo = LoopDev::attach(&fuse.file());
    let fsck = run(Command::new("e2fsck").args(["-f", "-n", lo.dev()]));
    assert!(
        fsck.status.success(),
        "e2fsck -fn found problems after restart ({}):\n{}{}",
        fsck.status,
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let m = Mounted::mount(lo.dev(), &mnt_dir);
    for (name, data) in &files {
        let p = m.path().join(name);
        let back = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert_eq!(
            back.len(),
            data.len(),
            "{} size after restart",
            name.display()
        );
        assert!(
            back == *data,
            "{} content differs after restart",
            name.display()
        );
    }
    m.umount();
    lo.detach();
    fuse.unmount();
    d.stop();
}
