//! The kernel `nbd` attacher: a volume's NBD export as `/dev/nbdN`, set up
//! over generic netlink (the `nbd` family, `include/uapi/linux/nbd-netlink.h`)
//! the way `nbd-client` does it, without the ioctl interface.
//!
//! 1. [`handshake`] opens unix-socket connections to the volume's `tandemd`
//!    and negotiates each (fixed newstyle, `NBD_OPT_GO`, **no** structured
//!    replies: the kernel reads simple replies only), leaving them in the
//!    transmission phase.
//! 2. [`Nbd::connect`] hands their file descriptors to the kernel with
//!    `NBD_CMD_CONNECT` (size, block size, the export's transmission flags,
//!    a request timeout, the volume id as backend identifier) and learns the
//!    device index it chose. The kernel keeps its own reference to the
//!    sockets; ours are closed afterwards.
//! 3. [`Nbd::disconnect`] (`NBD_CMD_DISCONNECT`) ends it; the device is
//!    destroyed with it (`NBD_CFLAG_DESTROY_ON_DISCONNECT`).
//! 4. [`Nbd::resize`] (`NBD_CMD_RECONFIGURE` with a new size) grows the
//!    device online (kernels since 5.3).
//!
//! Where the `nbd` module is missing (these development machines), the
//! family does not resolve and [`available`] is false: the node plugin uses
//! `nbdfuse` + a loop device instead.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use netlink_packet_core::{
    emit_u32, emit_u64, parse_u32, DecodeError, DefaultNla, Emitable, NetlinkMessage,
    NetlinkPayload, Nla, NlaBuffer, NlasIterator, Parseable, ParseableParametrized, NLA_F_NESTED,
    NLM_F_ACK, NLM_F_REQUEST,
};
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};
use netlink_sys::{protocols::NETLINK_GENERIC, Socket, SocketAddr};
use tandem_core::nbd::{
    decode_info_reply, decode_option_reply_header, encode_info_request, encode_option, info, opt,
    rep, tflag, InfoReply, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, GREETING_LEN,
    IHAVEOPT, NBDMAGIC, OPTION_REPLY_HEADER_LEN,
};

/// The generic netlink family of the kernel's nbd driver.
pub const FAMILY: &str = "nbd";
const VERSION: u8 = 1;

/// `NBD_CMD_*` of the nbd family.
pub mod cmd {
    /// Configure a device (sockets, size, flags); the reply names its index.
    pub const CONNECT: u8 = 1;
    /// Disconnect a device.
    pub const DISCONNECT: u8 = 2;
    /// Change a connected device (here: its size).
    pub const RECONFIGURE: u8 = 3;
}

/// `NBD_ATTR_*` of the nbd family.
pub mod attr {
    /// u32: the device index (`/dev/nbdN`).
    pub const INDEX: u16 = 1;
    /// u64: device size in bytes.
    pub const SIZE_BYTES: u16 = 2;
    /// u64: logical block size.
    pub const BLOCK_SIZE_BYTES: u16 = 3;
    /// u64: request timeout in seconds.
    pub const TIMEOUT: u16 = 4;
    /// u64: the export's transmission flags (`NBD_FLAG_*`).
    pub const SERVER_FLAGS: u16 = 5;
    /// u64: `NBD_CFLAG_*`.
    pub const CLIENT_FLAGS: u16 = 6;
    /// nested: `NBD_SOCK_ITEM { NBD_SOCK_FD u32 }`, one per connection.
    pub const SOCKETS: u16 = 7;
    /// string: who serves the device (shown in `/sys/block/nbdN/backend`).
    pub const BACKEND_IDENTIFIER: u16 = 10;
    /// Inside `SOCKETS`: one socket.
    pub const SOCK_ITEM: u16 = 1;
    /// Inside `SOCK_ITEM`: its file descriptor (u32).
    pub const SOCK_FD: u16 = 1;
}

/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`: the device goes away with its
/// connection.
pub const CFLAG_DESTROY_ON_DISCONNECT: u64 = 1;

/// Seconds the kernel waits for a request before failing it. Generous: a
/// replicated write may wait for a peer timeout (5 s) and a reconnection.
pub const REQUEST_TIMEOUT_SECS: u64 = 120;

/// One attribute of an nbd-family message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAttr {
    /// `NBD_ATTR_INDEX`.
    Index(u32),
    /// A u64 attribute (`SIZE_BYTES`, `BLOCK_SIZE_BYTES`, `TIMEOUT`,
    /// `SERVER_FLAGS`, `CLIENT_FLAGS`).
    U64(u16, u64),
    /// `NBD_ATTR_SOCKETS` with these file descriptors.
    Sockets(Vec<u32>),
    /// `NBD_ATTR_BACKEND_IDENTIFIER`.
    Backend(String),
    /// Anything else the kernel sends.
    Other(DefaultNla),
}

struct SockFd(u32);

impl Nla for SockFd {
    fn value_len(&self) -> usize {
        4
    }
    fn kind(&self) -> u16 {
        attr::SOCK_FD
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        emit_u32(buffer, self.0).expect("4-byte buffer");
    }
}

struct SockItem(SockFd);

impl Nla for SockItem {
    fn value_len(&self) -> usize {
        self.0.buffer_len()
    }
    fn kind(&self) -> u16 {
        attr::SOCK_ITEM | NLA_F_NESTED
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        self.0.emit(buffer)
    }
}

impl NbdAttr {
    fn items(fds: &[u32]) -> Vec<SockItem> {
        fds.iter().map(|fd| SockItem(SockFd(*fd))).collect()
    }
}

impl Nla for NbdAttr {
    fn value_len(&self) -> usize {
        match self {
            NbdAttr::Index(_) => 4,
            NbdAttr::U64(..) => 8,
            NbdAttr::Sockets(fds) => Self::items(fds).as_slice().buffer_len(),
            NbdAttr::Backend(s) => s.len() + 1,
            NbdAttr::Other(nla) => nla.value_len(),
        }
    }
    fn kind(&self) -> u16 {
        match self {
            NbdAttr::Index(_) => attr::INDEX,
            NbdAttr::U64(kind, _) => *kind,
            NbdAttr::Sockets(_) => attr::SOCKETS | NLA_F_NESTED,
            NbdAttr::Backend(_) => attr::BACKEND_IDENTIFIER,
            NbdAttr::Other(nla) => nla.kind(),
        }
    }
    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            NbdAttr::Index(v) => emit_u32(buffer, *v).expect("4-byte buffer"),
            NbdAttr::U64(_, v) => emit_u64(buffer, *v).expect("8-byte buffer"),
            NbdAttr::Sockets(fds) => Self::items(fds).as_slice().emit(buffer),
            NbdAttr::Backend(s) => {
                buffer[..s.len()].copy_from_slice(s.as_bytes());
                buffer[s.len()] = 0;
            }
            NbdAttr::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for NbdAttr {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        Ok(match buf.kind() {
            attr::INDEX => NbdAttr::Index(parse_u32(buf.value())?),
            _ => NbdAttr::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// A message of the nbd family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdMessage {
    /// `NBD_CMD_*`.
    pub cmd: u8,
    /// Its attributes.
    pub attrs: Vec<NbdAttr>,
}

impl GenlFamily for NbdMessage {
    fn family_name() -> &'static str {
        FAMILY
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        VERSION
    }
}

impl Emitable for NbdMessage {
    fn buffer_len(&self) -> usize {
        self.attrs.as_slice().buffer_len()
    }
    fn emit(&self, buffer: &mut [u8]) {
        self.attrs.as_slice().emit(buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for NbdMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        let attrs = NlasIterator::new(buf)
            .map(|nla| nla.and_then(|nla| NbdAttr::parse(&nla)))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(NbdMessage {
            cmd: header.cmd,
            attrs,
        })
    }
}

/// What a `NBD_CMD_CONNECT` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size (512 or 4096).
    pub block_size: u64,
    /// The export's transmission flags from the handshake.
    pub server_flags: u16,
    /// Connected sockets in the transmission phase.
    pub fds: Vec<u32>,
    /// Shown in `/sys/block/nbdN/backend`: the volume id.
    pub backend: String,
}

impl ConnectRequest {
    /// The message's attributes (no index: the kernel picks a free device).
    pub fn message(&self) -> NbdMessage {
        NbdMessage {
            cmd: cmd::CONNECT,
            attrs: vec![
                NbdAttr::U64(attr::SIZE_BYTES, self.size),
                NbdAttr::U64(attr::BLOCK_SIZE_BYTES, self.block_size),
                NbdAttr::U64(attr::SERVER_FLAGS, u64::from(self.server_flags)),
                NbdAttr::U64(attr::TIMEOUT, REQUEST_TIMEOUT_SECS),
                NbdAttr::U64(attr::CLIENT_FLAGS, CFLAG_DESTROY_ON_DISCONNECT),
                NbdAttr::Backend(self.backend.clone()),
                NbdAttr::Sockets(self.fds.clone()),
            ],
        }
    }
}

/// Serializes a generic netlink request of `family` with `seq`.
fn request_bytes<F>(payload: F, family: u16, seq: u32, flags: u16) -> Vec<u8>
where
    F: GenlFamily + Emitable + std::fmt::Debug,
{
    let mut genl = GenlMessage::from_payload(payload);
    genl.set_resolved_family_id(family);
    genl.finalize();
    let mut msg = NetlinkMessage::from(genl);
    msg.header.flags = flags;
    msg.header.sequence_number = seq;
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// How long a netlink request may wait for the kernel's answer.
const NETLINK_TIMEOUT: Duration = Duration::from_secs(30);

/// A generic netlink socket.
struct Genl {
    sock: Socket,
    seq: u32,
}

impl Genl {
    fn open() -> std::io::Result<Genl> {
        let mut sock = Socket::new(NETLINK_GENERIC)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        // A kernel that never answers must not hang a CSI call forever.
        let tv = libc::timeval {
            tv_sec: NETLINK_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt on a socket we own, with a valid timeval.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Genl { sock, seq: 0 })
    }

    /// Sends one request (with `NLM_F_ACK`) and collects the family
    /// messages answering it until the acknowledgement. A kernel error is
    /// returned as the `io::Error` it carries.
    fn call<F>(&mut self, payload: F, family: u16) -> std::io::Result<Vec<F>>
    where
        F: GenlFamily
            + Emitable
            + ParseableParametrized<[u8], GenlHeader>
            + std::fmt::Debug
            + Clone,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = request_bytes(payload, family, seq, NLM_F_REQUEST | NLM_F_ACK);
        self.sock.send(&bytes, 0)?;
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::with_capacity(64 * 1024);
            let n = self.sock.recv(&mut buf, 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<GenlMessage<F>>::deserialize(&buf[off..n])
                    .map_err(|e| std::io::Error::other(format!("bad netlink reply: {e}")))?;
                let len = msg.header.length as usize;
                if msg.header.sequence_number == seq {
                    match msg.payload {
                        NetlinkPayload::Error(e) => {
                            return match e.code {
                                None => Ok(out),
                                Some(_) => Err(e.to_io()),
                            }
                        }
                        NetlinkPayload::Done(_) => return Ok(out),
                        NetlinkPayload::InnerMessage(m) => out.push(m.payload),
                        _ => {}
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// The id of generic netlink family `name`, `None` when no such family
    /// is registered (its module is not loaded).
    fn family(&mut self, name: &str) -> std::io::Result<Option<u16>> {
        let req = GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(name.to_string())],
        };
        match self.call(req, netlink_packet_generic::constants::GENL_ID_CTRL) {
            Ok(replies) => Ok(replies.iter().flat_map(|r| &r.nlas).find_map(|a| match a {
                GenlCtrlAttrs::FamilyId(id) => Some(*id),
                _ => None,
            })),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// The id of generic netlink family `name` (`None`: not registered).
pub fn family_id(name: &str) -> std::io::Result<Option<u16>> {
    Genl::open()?.family(name)
}

/// The kernel's nbd driver over netlink.
pub struct Nbd {
    genl: Genl,
    family: u16,
}

impl Nbd {
    /// Opens the `nbd` family, loading the module first if it is not
    /// (`modprobe nbd nbds_max=0`: devices are created on demand).
    pub fn open() -> anyhow::Result<Nbd> {
        let mut genl = Genl::open().context("opening a generic netlink socket")?;
        let mut family = genl.family(FAMILY).context("resolving the nbd family")?;
        if family.is_none() && !Path::new("/sys/module/nbd").exists() {
            let _ = std::process::Command::new("modprobe")
                .args(["nbd", "nbds_max=0"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            family = genl.family(FAMILY).context("resolving the nbd family")?;
        }
        let family = family.ok_or_else(|| {
            anyhow!("the kernel has no nbd driver (generic netlink family \"nbd\" not registered; modprobe nbd)")
        })?;
        Ok(Nbd { genl, family })
    }

    /// Hands connected sockets to the kernel; returns the device index.
    pub fn connect(&mut self, req: &ConnectRequest) -> anyhow::Result<u32> {
        let replies = self
            .genl
            .call(req.message(), self.family)
            .context("NBD_CMD_CONNECT")?;
        replies
            .iter()
            .flat_map(|m| &m.attrs)
            .find_map(|a| match a {
                NbdAttr::Index(i) => Some(*i),
                _ => None,
            })
            .ok_or_else(|| anyhow!("NBD_CMD_CONNECT: the kernel named no device index"))
    }

    /// Disconnects `/dev/nbd<index>`.
    pub fn disconnect(&mut self, index: u32) -> anyhow::Result<()> {
        let msg = NbdMessage {
            cmd: cmd::DISCONNECT,
            attrs: vec![NbdAttr::Index(index)],
        };
        self.genl
            .call(msg, self.family)
            .with_context(|| format!("NBD_CMD_DISCONNECT /dev/nbd{index}"))?;
        Ok(())
    }

    /// Changes the size of the connected `/dev/nbd<index>`.
    pub fn resize(&mut self, index: u32, size: u64) -> anyhow::Result<()> {
        let msg = NbdMessage {
            cmd: cmd::RECONFIGURE,
            attrs: vec![NbdAttr::Index(index), NbdAttr::U64(attr::SIZE_BYTES, size)],
        };
        self.genl
            .call(msg, self.family)
            .with_context(|| format!("NBD_CMD_RECONFIGURE /dev/nbd{index} size {size}"))?;
        Ok(())
    }
}

/// Whether the kernel nbd driver can be used (the family resolves, after
/// loading the module if needed).
pub fn available() -> bool {
    Nbd::open().is_ok()
}

/// The device file of index `index`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// Whether `/dev/nbd<index>` is connected and serves `backend` (when the
/// kernel shows backends).
pub fn serves(index: u32, backend: &str) -> bool {
    let sys = PathBuf::from(format!("/sys/block/nbd{index}"));
    if !sys.join("pid").exists() {
        return false;
    }
    match std::fs::read_to_string(sys.join("backend")) {
        Ok(b) => b.trim() == backend,
        Err(_) => true,
    }
}

/// The connected nbd devices whose backend is `backend`.
pub fn devices_serving(backend: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("nbd"))
                .and_then(|i| i.parse::<u32>().ok())
        })
        .filter(|i| {
            std::fs::read_to_string(format!("/sys/block/nbd{i}/backend"))
                .is_ok_and(|b| b.trim() == backend)
        })
        .collect()
}

/// Waits until `/dev/nbd<index>` no longer serves `backend`.
pub fn wait_disconnected(index: u32, backend: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while serves(index, backend) {
        if std::time::Instant::now() > deadline {
            bail!("/dev/nbd{index} is still connected after {timeout:?} (still open?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// What the server said about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Minimum block size (1 when the server sent none).
    pub min_block: u32,
}

fn read_exact(s: &mut UnixStream, n: usize) -> anyhow::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Opens `connections` connections to the NBD server at `socket` and
/// negotiates export `name` on each (fixed newstyle, `NBD_OPT_GO`, simple
/// replies only), leaving them in the transmission phase, as the kernel
/// takes them.
pub fn handshake(
    socket: &Path,
    name: &str,
    connections: usize,
    timeout: Duration,
) -> anyhow::Result<(Vec<UnixStream>, Export)> {
    let mut out = Vec::new();
    let mut export = None;
    for _ in 0..connections.max(1) {
        let (s, e) = handshake_one(socket, name, timeout)?;
        if export.is_some_and(|x| x != e) {
            bail!(
                "NBD server at {}: connections disagree on the export",
                socket.display()
            );
        }
        export = Some(e);
        out.push(s);
    }
    Ok((out, export.expect("at least one connection")))
}

fn handshake_one(
    socket: &Path,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<(UnixStream, Export)> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let g = read_exact(&mut s, GREETING_LEN).context("NBD greeting")?;
    if g[..8] != NBDMAGIC.to_be_bytes() || g[8..16] != IHAVEOPT.to_be_bytes() {
        bail!("{}: not an NBD newstyle server", socket.display());
    }
    s.write_all(&(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES).to_be_bytes())?;
    let mut data = Vec::new();
    encode_info_request(&mut data, name, &[info::BLOCK_SIZE]);
    let mut msg = Vec::new();
    encode_option(&mut msg, opt::GO, &data);
    s.write_all(&msg)?;
    let mut size_flags = None;
    let mut min_block = 1;
    loop {
        let h = read_exact(&mut s, OPTION_REPLY_HEADER_LEN).context("NBD option reply")?;
        let h = decode_option_reply_header(&h).map_err(|e| anyhow!("NBD option reply: {e}"))?;
        if h.length > 64 * 1024 {
            bail!("NBD option reply of {} bytes", h.length);
        }
        let d = read_exact(&mut s, h.length as usize)?;
        match h.reply {
            rep::ACK => break,
            rep::INFO => match decode_info_reply(&d) {
                InfoReply::Export { size, flags } => size_flags = Some((size, flags)),
                InfoReply::BlockSize(b) => min_block = b.minimum,
                InfoReply::Other => {}
            },
            r if r & (1 << 31) != 0 => bail!(
                "NBD server refused export {name:?}: {}",
                String::from_utf8_lossy(&d)
            ),
            _ => {}
        }
    }
    let (size, flags) = size_flags.ok_or_else(|| anyhow!("NBD server sent no NBD_INFO_EXPORT"))?;
    if flags & tflag::HAS_FLAGS == 0 {
        bail!("NBD server sent transmission flags without NBD_FLAG_HAS_FLAGS");
    }
    s.set_read_timeout(None)?;
    s.set_write_timeout(None)?;
    Ok((
        s,
        Export {
            size,
            flags,
            min_block,
        },
    ))
}

/// Attaches export `name` of the NBD server at `socket` as a kernel nbd
/// device: `connections` sockets (1 unless the export allows multi-conn);
/// returns the device index and the export.
pub fn attach(socket: &Path, name: &str, connections: usize) -> anyhow::Result<(u32, Export)> {
    let mut nbd = Nbd::open()?;
    let timeout = Duration::from_secs(10);
    let (mut socks, export) = handshake(socket, name, 1, timeout)?;
    // More connections only where the export allows them (multi-conn).
    if export.flags & tflag::CAN_MULTI_CONN != 0 && connections > 1 {
        let (more, again) = handshake(socket, name, connections - 1, timeout)?;
        if again != export {
            bail!(
                "NBD server at {}: connections disagree on the export",
                socket.display()
            );
        }
        socks.extend(more);
    }
    let req = ConnectRequest {
        size: export.size,
        block_size: u64::from(export.min_block.clamp(512, 4096)),
        server_flags: export.flags,
        fds: socks.iter().map(|s| s.as_raw_fd() as u32).collect(),
        backend: name.to_string(),
    };
    let index = nbd.connect(&req)?;
    drop(socks); // the kernel holds its own references
    Ok((index, export))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_ne_bytes([b[i], b[i + 1]])
    }

    #[test]
    fn connect_message_layout_follows_nbd_netlink_h() {
        let req = ConnectRequest {
            size: 1 << 30,
            block_size: 512,
            server_flags: 0x012d,
            fds: vec![7, 9],
            backend: "tdm-x".into(),
        };
        let bytes = request_bytes(req.message(), 0x1f, 5, NLM_F_REQUEST | NLM_F_ACK);
        // nlmsghdr: len, type = family, flags, seq, pid
        assert_eq!(
            u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize,
            bytes.len()
        );
        assert_eq!(u16_at(&bytes, 4), 0x1f);
        assert_eq!(u16_at(&bytes, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 5);
        // genlmsghdr: cmd, version, reserved
        assert_eq!(bytes[16], cmd::CONNECT);
        assert_eq!(bytes[17], VERSION);
        // Attributes: walk them.
        let mut seen = Vec::new();
        let mut off = 20;
        while off < bytes.len() {
            let len = u16_at(&bytes, off) as usize;
            let kind = u16_at(&bytes, off + 2);
            let value = &bytes[off + 4..off + len];
            seen.push(kind & !NLA_F_NESTED);
            match kind & !NLA_F_NESTED {
                attr::SIZE_BYTES => assert_eq!(value, (1u64 << 30).to_ne_bytes()),
                attr::BLOCK_SIZE_BYTES => assert_eq!(value, 512u64.to_ne_bytes()),
                attr::SERVER_FLAGS => assert_eq!(value, 0x012du64.to_ne_bytes()),
                attr::TIMEOUT => assert_eq!(value, REQUEST_TIMEOUT_SECS.to_ne_bytes()),
                attr::CLIENT_FLAGS => assert_eq!(value, 1u64.to_ne_bytes()),
                attr::BACKEND_IDENTIFIER => assert_eq!(value, b"tdm-x\0"),
                attr::SOCKETS => {
                    assert_ne!(kind & NLA_F_NESTED, 0, "SOCKETS is nested");
                    // Two items, each { len 12, SOCK_ITEM|nested, { len 8, SOCK_FD, fd } }.
                    assert_eq!(value.len(), 2 * 12);
                    for (i, fd) in [7u32, 9].iter().enumerate() {
                        let item = &value[i * 12..];
                        assert_eq!(u16_at(item, 0), 12);
                        assert_eq!(u16_at(item, 2), attr::SOCK_ITEM | NLA_F_NESTED);
                        assert_eq!(u16_at(item, 4), 8);
                        assert_eq!(u16_at(item, 6), attr::SOCK_FD);
                        assert_eq!(item[8..12], fd.to_ne_bytes());
                    }
                }
                k => panic!("unexpected attribute {k}"),
            }
            off += (len + 3) & !3;
        }
        assert_eq!(off, bytes.len());
        seen.sort();
        assert_eq!(seen, [2, 3, 4, 5, 6, 7, 10]);
    }

    #[test]
    fn a_connect_reply_yields_the_device_index() {
        // What the kernel sends: genlmsghdr + NBD_ATTR_INDEX.
        let reply = NbdMessage {
            cmd: cmd::CONNECT,
            attrs: vec![NbdAttr::Index(3)],
        };
        let bytes = request_bytes(reply, 0x1f, 1, 0);
        let msg = NetlinkMessage::<GenlMessage<NbdMessage>>::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(m) = msg.payload else {
            panic!("not a family message")
        };
        assert_eq!(m.payload.attrs, [NbdAttr::Index(3)]);
    }

    #[test]
    fn the_real_kernel_resolves_nlctrl_and_no_made_up_family() {
        // nlctrl registers itself under its own name with the fixed id 0x10.
        assert_eq!(family_id("nlctrl").unwrap(), Some(0x10));
        assert_eq!(family_id("tandem-no-such").unwrap(), None);
    }
}
