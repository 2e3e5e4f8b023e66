//! Small system helpers for the node plugin: running tools with a deadline,
//! reading the mount table, loop-device backing files, and stopping
//! processes by pid.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// How long one external tool (mkfs, mount, losetup, ...) may run.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs `program args...`, returning its stdout; a non-zero exit is an
/// `INTERNAL` error carrying the command and its stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = output(program, args).await?;
    if !out.status.success() {
        return Err(Error::Internal(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `program args...` to completion (bounded by [`TOOL_TIMEOUT`]).
pub async fn output(program: &str, args: &[&str]) -> Result<std::process::Output> {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(TOOL_TIMEOUT, child).await {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(e)) => Err(Error::internal(format!("running {program}"), e)),
        Err(_) => Err(Error::Internal(format!(
            "{program} {}: did not finish within {TOOL_TIMEOUT:?}",
            args.join(" ")
        ))),
    }
}

/// Undoes the octal escapes (`\040` for space, ...) of `/proc/self/mountinfo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every mount point in this mount namespace.
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Error::internal("/proc/self/mountinfo", e))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape(m)))
        .collect())
}

/// Whether `path` is a mount point (compared after resolving symlinks).
pub fn is_mount_point(path: &Path) -> Result<bool> {
    // A dead FUSE mount cannot be resolved itself (ENOTCONN): resolve its
    // parent instead.
    let p = std::fs::canonicalize(path).or_else(|e| match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).map(|p| p.join(name)),
        _ => Err(e),
    });
    match p {
        Ok(p) => Ok(mount_points()?.contains(&p)),
        Err(_) => Ok(false),
    }
}

/// Unmounts `path` if it is a mount point (every stacked mount on it).
pub async fn unmount_all(path: &Path) -> Result<()> {
    let p = path.display().to_string();
    for _ in 0..8 {
        if !is_mount_point(path)? {
            return Ok(());
        }
        run("umount", &[&p]).await?;
    }
    Err(Error::Internal(format!(
        "{p}: still mounted after 8 umounts"
    )))
}

/// The file behind loop device `dev` (`/dev/loopN`), if it is attached.
pub fn loop_backing_file(dev: &str) -> Option<PathBuf> {
    let name = Path::new(dev).file_name()?.to_str()?;
    let s = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(s.trim_end()))
}

/// Whether process `pid` exists and its command line contains `needle`
/// (guards against signalling a recycled pid).
pub fn process_matches(pid: u32, needle: &str) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(c) => {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(needle)
        }
        Err(_) => false,
    }
}

fn alive(pid: u32) -> bool {
    // A zombie has exited; it only waits for its parent to reap it.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z"),
        Err(_) => false,
    }
}

/// Sends SIGTERM to `pid` (if it still runs `needle`), waits up to
/// `grace`, then SIGKILL. Reaps it when it is our child.
pub async fn stop_process(pid: u32, needle: &str, grace: Duration) {
    if !process_matches(pid, needle) {
        return;
    }
    let ipid = pid as libc::pid_t;
    // SAFETY: kill(2) with a pid we started and just checked.
    unsafe { libc::kill(ipid, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    loop {
        reap(ipid);
        if !alive(pid) {
            break;
        }
        if Instant::now() >= deadline {
            // SAFETY: as above.
            unsafe { libc::kill(ipid, libc::SIGKILL) };
            tokio::time::sleep(Duration::from_millis(50)).await;
            reap(ipid);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects `pid`'s exit status if it is our child (no-op otherwise).
pub fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid with WNOHANG on a specific pid; harmless if not our child.
    unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
}

/// Size in bytes of a block device or file (seek to its end).
pub fn size_of(path: &Path) -> Result<u64> {
    use std::io::Seek;
    let mut f = std::fs::File::open(path).map_err(|e| Error::internal(path.display(), e))?;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|e| Error::internal(path.display(), e))
}

/// `statvfs` of a mounted filesystem: (total, available, used) bytes and
/// (total, free, used) inodes.
pub fn fs_usage(path: &Path) -> Result<([u64; 3], [u64; 3])> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::InvalidArgument(format!("{}: path contains NUL", path.display())))?;
    // SAFETY: statvfs writes into the zeroed struct we pass; c is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::internal(
            format!("statvfs {}", path.display()),
            std::io::Error::last_os_error(),
        ));
    }
    let bs = st.f_frsize as u64;
    let total = st.f_blocks as u64 * bs;
    let avail = st.f_bavail as u64 * bs;
    let used = total.saturating_sub(st.f_bfree as u64 * bs);
    let inodes = st.f_files as u64;
    let ifree = st.f_ffree as u64;
    Ok((
        [total, avail, used],
        [inodes, ifree, inodes.saturating_sub(ifree)],
    ))
}

/// The data size of a backing file, from `tandemctl inspect --json`.
pub async fn backing_size(tandemctl: &str, backing: &str) -> crate::error::Result<u64> {
    let out = run(tandemctl, &["inspect", backing, "--json"]).await?;
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v["size"].as_u64())
        .ok_or_else(|| {
            crate::error::Error::Internal(format!(
                "tandemctl inspect {backing}: no size in {out:?}"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), "/a b");
        assert_eq!(unescape(r"/tab\011x\134"), "/tab\tx\\");
        assert_eq!(unescape(r"/plain"), "/plain");
        assert_eq!(unescape(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_dir_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let d = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(d.path()).unwrap());
        assert!(!is_mount_point(&d.path().join("missing")).unwrap());
    }
}
