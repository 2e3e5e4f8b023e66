//! Transmission phase: requests, validation against an export, replies.

use bytes::{Buf, BufMut};

use super::{NbdError, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC};

/// Length of a compact request header.
pub const REQUEST_LEN: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmdflag {
    /// Force unit access: durable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must allocate, not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES only if fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the request carries a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types and flags.
pub mod chunk {
    /// Flag: last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
    /// Empty chunk (used to end a reply).
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A hole (zeroes) at an offset.
    pub const OFFSET_HOLE: u16 = 2;
    /// Error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// A transmission command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read,
    /// Write the `length`-byte payload at `offset`.
    Write,
    /// Disconnect after in-flight requests complete.
    Disc,
    /// Make every completed write durable.
    Flush,
    /// Discard a range (reads afterwards may return anything; Tandem returns zeroes).
    Trim,
    /// Prefetch (not supported).
    Cache,
    /// Write zeroes to a range without a payload.
    WriteZeroes,
    /// Block status (not supported).
    BlockStatus,
    /// Resize (not supported).
    Resize,
    /// Anything else.
    Unknown(u16),
}

impl Command {
    /// Wire value.
    pub fn code(self) -> u16 {
        match self {
            Command::Read => 0,
            Command::Write => 1,
            Command::Disc => 2,
            Command::Flush => 3,
            Command::Trim => 4,
            Command::Cache => 5,
            Command::WriteZeroes => 6,
            Command::BlockStatus => 7,
            Command::Resize => 8,
            Command::Unknown(c) => c,
        }
    }

    /// From the wire value.
    pub fn from_code(code: u16) -> Self {
        match code {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            8 => Command::Resize,
            c => Command::Unknown(c),
        }
    }
}

/// One decoded request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags (see [`cmdflag`]).
    pub flags: u16,
    /// The command.
    pub command: Command,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes.
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire. Only WRITE has a
    /// payload in compact (non-extended) requests, whatever its validity; the
    /// server must consume it to stay in step with the client.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }

    /// Whether FUA was requested.
    pub fn fua(&self) -> bool {
        self.flags & cmdflag::FUA != 0
    }

    /// Encodes the request header (client side).
    pub fn encode(&self, out: &mut impl BufMut) {
        out.put_u32(REQUEST_MAGIC);
        out.put_u16(self.flags);
        out.put_u16(self.command.code());
        out.put_u64(self.cookie);
        out.put_u64(self.offset);
        out.put_u32(self.length);
    }
}

/// A request header that cannot be decoded: the stream is out of step and the
/// connection must be closed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RequestDecodeError {
    /// Fewer than [`REQUEST_LEN`] bytes.
    #[error("truncated request: {0} of {REQUEST_LEN} bytes")]
    Truncated(usize),
    /// Wrong magic.
    #[error("request magic {0:#010x} is not {REQUEST_MAGIC:#010x}")]
    Magic(u32),
}

/// Decodes a request header from the first [`REQUEST_LEN`] bytes.
pub fn decode_request(bytes: &[u8]) -> Result<Request, RequestDecodeError> {
    if bytes.len() < REQUEST_LEN {
        return Err(RequestDecodeError::Truncated(bytes.len()));
    }
    let mut b = &bytes[..REQUEST_LEN];
    let magic = b.get_u32();
    if magic != REQUEST_MAGIC {
        return Err(RequestDecodeError::Magic(magic));
    }
    Ok(Request {
        flags: b.get_u16(),
        command: Command::from_code(b.get_u16()),
        cookie: b.get_u64(),
        offset: b.get_u64(),
        length: b.get_u32(),
    })
}

/// What the server enforces for one export, from what it advertised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Export size in bytes.
    pub size: u64,
    /// Advertised minimum block size: offsets and lengths must be multiples.
    pub min_block: u32,
    /// Advertised maximum READ/WRITE payload.
    pub max_payload: u32,
    /// The export refuses writes.
    pub read_only: bool,
}

/// Checks a request against the export before any I/O. `Ok` means the daemon
/// may execute it; `Err` is the error to reply with (after consuming the
/// payload, see [`Request::payload_len`]).
///
/// The rules (documented in `docs/nbd.md`):
/// * unknown or unsupported commands, and flags a command does not take: `EINVAL`
///   (FUA is taken by every command, and ignored where it means nothing);
/// * writes, trims and write-zeroes to a read-only export: `EPERM`;
/// * zero-length data commands, or offset/length not multiples of the
///   minimum block size: `EINVAL`;
/// * READ or WRITE longer than the advertised maximum: `EOVERFLOW`;
/// * a range past the end: `EINVAL` for READ, `ENOSPC` for the writing commands.
pub fn validate_request(req: &Request, limits: &ExportLimits) -> Result<(), NbdError> {
    use cmdflag::*;
    // FUA is accepted (and, where meaningless, ignored) on every command, as
    // the protocol requires once SEND_FUA is advertised.
    let allowed = match req.command {
        Command::Read | Command::Write | Command::Trim | Command::Flush | Command::Disc => FUA,
        Command::WriteZeroes => FUA | NO_HOLE,
        Command::Cache | Command::BlockStatus | Command::Resize | Command::Unknown(_) => {
            return Err(NbdError::Inval)
        }
    };
    if req.flags & !allowed != 0 {
        return Err(NbdError::Inval);
    }
    let writes = matches!(
        req.command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if !writes && req.command != Command::Read {
        return Ok(()); // FLUSH and DISC carry no range.
    }
    if writes && limits.read_only {
        return Err(NbdError::Perm);
    }
    let len = u64::from(req.length);
    let min = u64::from(limits.min_block.max(1));
    if len == 0 || req.offset % min != 0 || len % min != 0 {
        return Err(NbdError::Inval);
    }
    if matches!(req.command, Command::Read | Command::Write) && req.length > limits.max_payload {
        return Err(NbdError::Overflow);
    }
    let in_range = req
        .offset
        .checked_add(len)
        .is_some_and(|end| end <= limits.size);
    if !in_range {
        return Err(if req.command == Command::Read {
            NbdError::Inval
        } else {
            NbdError::NoSpc
        });
    }
    Ok(())
}

/// Encodes a simple reply header (data for a successful simple READ follows).
pub fn encode_simple_reply(out: &mut impl BufMut, cookie: u64, error: Option<NbdError>) {
    out.put_u32(SIMPLE_REPLY_MAGIC);
    out.put_u32(error.map_or(0, NbdError::code));
    out.put_u64(cookie);
}

/// Encodes the header of a structured `OFFSET_DATA` chunk carrying `data_len`
/// bytes read at `offset`; the data follows. `done` marks the last chunk.
pub fn encode_read_chunk_header(
    out: &mut impl BufMut,
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(if done { chunk::FLAG_DONE } else { 0 });
    out.put_u16(chunk::OFFSET_DATA);
    out.put_u64(cookie);
    out.put_u32(data_len + 8);
    out.put_u64(offset);
}

/// Encodes a final structured `ERROR` chunk with a message.
pub fn encode_structured_error(out: &mut impl BufMut, cookie: u64, error: NbdError, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    out.put_u32(STRUCTURED_REPLY_MAGIC);
    out.put_u16(chunk::FLAG_DONE);
    out.put_u16(chunk::ERROR);
    out.put_u64(cookie);
    out.put_u32(6 + msg.len() as u32);
    out.put_u32(error.code());
    out.put_u16(msg.len() as u16);
    out.put_slice(msg);
}

/// A decoded reply header (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Simple reply; for a successful READ the data follows.
    Simple {
        /// Cookie of the request.
        cookie: u64,
        /// Error code, 0 on success.
        error: u32,
    },
    /// Structured chunk; `length` payload bytes follow.
    Structured {
        /// Chunk flags.
        flags: u16,
        /// Chunk type.
        kind: u16,
        /// Cookie of the request.
        cookie: u64,
        /// Payload length.
        length: u32,
    },
}

/// Error decoding a reply (client side).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad reply magic {0:#010x}")]
pub struct ReplyMagicError(pub u32);

/// Decodes a reply header given its first 4 bytes (magic) and enough
/// following bytes: 12 more for a simple reply, 16 more for a structured one.
pub fn reply_header_len(magic: u32) -> Result<usize, ReplyMagicError> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(SIMPLE_REPLY_LEN),
        STRUCTURED_REPLY_MAGIC => Ok(STRUCTURED_HEADER_LEN),
        m => Err(ReplyMagicError(m)),
    }
}

/// Decodes a full reply header (see [`reply_header_len`] for its length).
pub fn decode_reply_header(mut b: &[u8]) -> Result<ReplyHeader, ReplyMagicError> {
    if b.len() < 4 {
        return Err(ReplyMagicError(0));
    }
    let magic = b.get_u32();
    let need = reply_header_len(magic)? - 4;
    if b.len() < need {
        return Err(ReplyMagicError(magic));
    }
    Ok(if magic == SIMPLE_REPLY_MAGIC {
        let error = b.get_u32();
        ReplyHeader::Simple {
            cookie: b.get_u64(),
            error,
        }
    } else {
        ReplyHeader::Structured {
            flags: b.get_u16(),
            kind: b.get_u16(),
            cookie: b.get_u64(),
            length: b.get_u32(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMITS: ExportLimits = ExportLimits {
        size: 1 << 20,
        min_block: 512,
        max_payload: 1 << 16,
        read_only: false,
    };

    fn req(command: Command, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn validation_rules() {
        use Command::*;
        let ok = |r| validate_request(&r, &LIMITS);
        assert_eq!(ok(req(Read, 0, 0, 4096)), Ok(()));
        assert_eq!(ok(req(Write, cmdflag::FUA, 512, 512)), Ok(()));
        assert_eq!(ok(req(Read, 0, 1, 512)), Err(NbdError::Inval));
        assert_eq!(ok(req(Write, 0, 0, 100)), Err(NbdError::Inval));
        assert_eq!(ok(req(Read, 0, 0, 0)), Err(NbdError::Inval));
        assert_eq!(ok(req(Read, 0, 1 << 20, 512)), Err(NbdError::Inval));
        assert_eq!(ok(req(Write, 0, 1 << 20, 512)), Err(NbdError::NoSpc));
        assert_eq!(ok(req(Trim, 0, u64::MAX - 511, 512)), Err(NbdError::NoSpc));
        assert_eq!(ok(req(Write, 0, 0, 1 << 17)), Err(NbdError::Overflow));
        assert_eq!(ok(req(WriteZeroes, 0, 0, 1 << 20)), Ok(()));
        assert_eq!(ok(req(WriteZeroes, cmdflag::NO_HOLE, 0, 512)), Ok(()));
        assert_eq!(
            ok(req(Write, cmdflag::NO_HOLE, 0, 512)),
            Err(NbdError::Inval)
        );
        assert_eq!(ok(req(Unknown(77), 0, 0, 0)), Err(NbdError::Inval));
        assert_eq!(ok(req(Cache, 0, 0, 512)), Err(NbdError::Inval));
        assert_eq!(ok(req(Flush, 0, 0, 0)), Ok(()));
        assert_eq!(ok(req(Flush, cmdflag::FUA, 0, 0)), Ok(()));
        assert_eq!(ok(req(Read, cmdflag::FUA, 0, 512)), Ok(()));
        assert_eq!(ok(req(Read, cmdflag::DF, 0, 512)), Err(NbdError::Inval));
        let ro = ExportLimits {
            read_only: true,
            ..LIMITS
        };
        assert_eq!(
            validate_request(&req(Write, 0, 0, 512), &ro),
            Err(NbdError::Perm)
        );
    }

    #[test]
    fn bad_magic_and_truncation() {
        assert_eq!(
            decode_request(&[0; 10]),
            Err(RequestDecodeError::Truncated(10))
        );
        assert_eq!(decode_request(&[0; 28]), Err(RequestDecodeError::Magic(0)));
    }

    proptest! {
        #[test]
        fn request_round_trip(flags: u16, code: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, command: Command::from_code(code), cookie, offset, length };
            let mut b = Vec::new();
            r.encode(&mut b);
            prop_assert_eq!(b.len(), REQUEST_LEN);
            prop_assert_eq!(decode_request(&b), Ok(r));
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(r) = decode_request(&bytes) {
                let _ = validate_request(&r, &LIMITS);
            }
        }

        #[test]
        fn validated_ranges_are_inside_the_export(code in 0u16..10, flags in 0u16..4, offset: u64, length: u32) {
            let r = req(Command::from_code(code), flags, offset % (2 << 20), length % (1 << 18));
            if validate_request(&r, &LIMITS).is_ok() && matches!(r.command, Command::Read | Command::Write | Command::Trim | Command::WriteZeroes) {
                prop_assert!(r.offset + u64::from(r.length) <= LIMITS.size);
                prop_assert_eq!(r.offset % 512, 0);
                prop_assert!(r.length > 0);
            }
        }

        #[test]
        fn reply_round_trip(cookie: u64, err in proptest::option::of(prop_oneof![Just(NbdError::Io), Just(NbdError::Inval)]), offset: u64, len in 0u32..1 << 20) {
            let mut b = Vec::new();
            encode_simple_reply(&mut b, cookie, err);
            prop_assert_eq!(decode_reply_header(&b), Ok(ReplyHeader::Simple { cookie, error: err.map_or(0, NbdError::code) }));
            b.clear();
            encode_read_chunk_header(&mut b, cookie, offset, len, true);
            prop_assert_eq!(decode_reply_header(&b), Ok(ReplyHeader::Structured { flags: chunk::FLAG_DONE, kind: chunk::OFFSET_DATA, cookie, length: len + 8 }));
        }
    }
}
