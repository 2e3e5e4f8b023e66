//! The NBD protocol (fixed newstyle), as a pure codec.
//!
//! The daemon owns the sockets; this module only turns bytes into typed
//! values and back. Every decoder checks lengths and returns an error rather
//! than panicking, because every byte here comes from an untrusted client.
//!
//! Reference: the NBD protocol specification (`doc/proto.md` of the
//! NetworkBlockDevice project). Only the parts Tandem implements are encoded
//! here; see `docs/nbd.md` for the list and the error mapping.

mod handshake;
mod transmission;

pub use handshake::*;
pub use transmission::*;

/// First magic of the server greeting: `"NBDMAGIC"`.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second magic of the newstyle greeting and of every option request: `"IHAVEOPT"`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic that starts every (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic that starts a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic that starts a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Errors (errno values as the NBD protocol defines them) a server sends in
/// replies. The numbers are fixed by the protocol, not by the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdError {
    /// Operation not permitted (e.g. a write to a read-only export).
    Perm = 1,
    /// Input/output error from the storage.
    Io = 5,
    /// Out of memory.
    NoMem = 12,
    /// Invalid argument: misaligned, unknown command or flag, read past the end.
    Inval = 22,
    /// No space: a write, trim or write-zeroes past the end of the export.
    NoSpc = 28,
    /// Request length larger than the advertised maximum.
    Overflow = 75,
    /// Operation not supported.
    NotSup = 95,
    /// The server is shutting down.
    Shutdown = 108,
}

impl NbdError {
    /// The protocol value sent on the wire.
    pub fn code(self) -> u32 {
        self as u32
    }

    /// Short human-readable text, sent in structured error chunks.
    pub fn message(self) -> &'static str {
        match self {
            NbdError::Perm => "operation not permitted",
            NbdError::Io => "input/output error",
            NbdError::NoMem => "out of memory",
            NbdError::Inval => "invalid argument",
            NbdError::NoSpc => "request beyond the end of the export",
            NbdError::Overflow => "request larger than the maximum block size",
            NbdError::NotSup => "operation not supported",
            NbdError::Shutdown => "server shutting down",
        }
    }
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (NBD error {})", self.message(), self.code())
    }
}
