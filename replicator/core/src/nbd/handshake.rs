//! Fixed-newstyle handshake: greeting, client flags, option haggling.
//!
//! [`Negotiation::handle_option`] is the whole server side of option haggling
//! as a pure function: the daemon reads one option (header + data) from the
//! socket, hands it here together with a view of its exports, writes the bytes
//! this appends to `out`, and acts on the returned [`OptionOutcome`].

use bytes::{Buf, BufMut};

use super::{IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC};

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server may omit the 124 zero bytes after EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Longest option payload the server accepts. Export names are at most 4096
/// bytes; anything much longer is not a legitimate client.
pub const MAX_OPTION_LEN: u32 = 16 * 1024;

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Select an export the old way; no error reply is possible.
    pub const EXPORT_NAME: u32 = 1;
    /// End negotiation without entering transmission.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (not supported on NBD; Tandem's NBD is local).
    pub const STARTTLS: u32 = 5;
    /// Describe an export without selecting it.
    pub const INFO: u32 = 6;
    /// Describe and select an export, then enter transmission.
    pub const GO: u32 = 7;
    /// Enable structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts (not supported).
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts (not supported).
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended headers (not supported).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Option done.
    pub const ACK: u32 = 1;
    /// One export, in reply to LIST.
    pub const SERVER: u32 = 2;
    /// One piece of export information, in reply to INFO/GO.
    pub const INFO: u32 = 3;
    const ERR: u32 = 1 << 31;
    /// Option unknown or not supported.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Refused by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Malformed option.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
}

/// Information types (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags (`NBD_FLAG_*`), advertised per export.
pub mod tflag {
    /// Always set: the other flags are meaningful.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections see one consistent export; FLUSH on any covers all.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Block size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Requests must be aligned to, and a multiple of, this many bytes.
    pub minimum: u32,
    /// Requests of at least this size and alignment perform best.
    pub preferred: u32,
    /// Largest READ or WRITE payload accepted.
    pub maximum: u32,
}

/// One `NBD_REP_INFO` reply as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InfoReply {
    /// `NBD_INFO_EXPORT`: size and transmission flags.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags (see [`tflag`]).
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize(BlockSizes),
    /// Another information type, or one of the wrong length.
    Other,
}

/// Decodes the data of an `NBD_REP_INFO` option reply (client side).
pub fn decode_info_reply(data: &[u8]) -> InfoReply {
    let u32_at = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    match (
        data.get(..2).map(|k| u16::from_be_bytes([k[0], k[1]])),
        data.len(),
    ) {
        (Some(info::EXPORT), 12) => InfoReply::Export {
            size: u64::from_be_bytes(data[2..10].try_into().expect("8 bytes")),
            flags: u16::from_be_bytes([data[10], data[11]]),
        },
        (Some(info::BLOCK_SIZE), 14) => InfoReply::BlockSize(BlockSizes {
            minimum: u32_at(2),
            preferred: u32_at(6),
            maximum: u32_at(10),
        }),
        _ => InfoReply::Other,
    }
}

/// What the server tells a client about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name the export is selected by.
    pub name: String,
    /// Free-form description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (see [`tflag`]).
    pub flags: u16,
    /// Block size constraints.
    pub block_sizes: BlockSizes,
}

/// The server's view of its exports during negotiation.
pub trait ExportCatalog {
    /// Looks up an export by name; the empty name selects the default export.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Names and descriptions of all exports, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}

/// Errors that end a handshake: the connection is closed (and logged).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client flags lack fixed newstyle or carry unknown bits.
    #[error("client flags {0:#x} unsupported (fixed newstyle required, no other bits known)")]
    ClientFlags(u32),
    /// An option header did not start with `IHAVEOPT`.
    #[error("option magic {0:#x} is not IHAVEOPT")]
    OptionMagic(u64),
    /// An option announced more data than the server accepts.
    #[error("option {option} announces {length} bytes, more than the {MAX_OPTION_LEN}-byte limit")]
    OptionTooLong {
        /// Option code.
        option: u32,
        /// Announced length.
        length: u32,
    },
    /// Fewer bytes than the structure needs.
    #[error("truncated: need {need} bytes, got {got}")]
    Truncated {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
}

/// Writes the 18-byte newstyle greeting.
pub fn encode_greeting(out: &mut impl BufMut) {
    out.put_u64(NBDMAGIC);
    out.put_u64(IHAVEOPT);
    out.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

/// Client flags sent after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientFlags {
    /// The client omits/expects no zero padding after EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Decodes the 4-byte client flags. Only fixed newstyle clients are served.
pub fn decode_client_flags(bytes: &[u8]) -> Result<ClientFlags, HandshakeError> {
    let mut b = take(bytes, 4)?;
    let flags = b.get_u32();
    let known = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES;
    if flags & CLIENT_FLAG_FIXED_NEWSTYLE == 0 || flags & !known != 0 {
        return Err(HandshakeError::ClientFlags(flags));
    }
    Ok(ClientFlags {
        no_zeroes: flags & CLIENT_FLAG_NO_ZEROES != 0,
    })
}

/// Header of one option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (see [`opt`]).
    pub option: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Decodes a 16-byte option header, refusing oversized options.
pub fn decode_option_header(bytes: &[u8]) -> Result<OptionHeader, HandshakeError> {
    let mut b = take(bytes, OPTION_HEADER_LEN)?;
    let magic = b.get_u64();
    if magic != IHAVEOPT {
        return Err(HandshakeError::OptionMagic(magic));
    }
    let option = b.get_u32();
    let length = b.get_u32();
    if length > MAX_OPTION_LEN {
        return Err(HandshakeError::OptionTooLong { option, length });
    }
    Ok(OptionHeader { option, length })
}

/// Encodes an option request (client side; used by Tandem's own client and tests).
pub fn encode_option(out: &mut impl BufMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Encodes one option reply.
pub fn encode_option_reply(out: &mut impl BufMut, option: u32, reply: u32, data: &[u8]) {
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

/// Decoded header of an option reply (client side).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// Option being answered.
    pub option: u32,
    /// Reply type (see [`rep`]).
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Decodes a 20-byte option reply header (client side).
pub fn decode_option_reply_header(bytes: &[u8]) -> Result<OptionReplyHeader, HandshakeError> {
    let mut b = take(bytes, OPTION_REPLY_HEADER_LEN)?;
    let magic = b.get_u64();
    if magic != OPTION_REPLY_MAGIC {
        return Err(HandshakeError::OptionMagic(magic));
    }
    Ok(OptionReplyHeader {
        option: b.get_u32(),
        reply: b.get_u32(),
        length: b.get_u32(),
    })
}

/// Encodes the data of an `NBD_OPT_INFO`/`NBD_OPT_GO` request (client side).
pub fn encode_info_request(out: &mut impl BufMut, name: &str, requests: &[u16]) {
    out.put_u32(name.len() as u32);
    out.put_slice(name.as_bytes());
    out.put_u16(requests.len() as u16);
    for r in requests {
        out.put_u16(*r);
    }
}

/// What the daemon must do after an option was handled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionOutcome {
    /// Send the replies and read the next option.
    Continue,
    /// Send the replies, then close: the client aborted.
    Abort,
    /// Send the replies (if any), then enter transmission on this export.
    Transmit(ExportInfo),
    /// Close without entering transmission (EXPORT_NAME for an unknown
    /// export, which has no error reply). The string says why, for the log.
    Close(String),
}

/// Server-side negotiation state for one connection.
#[derive(Debug, Clone)]
pub struct Negotiation {
    client: ClientFlags,
    structured: bool,
}

impl Negotiation {
    /// Starts negotiation with the client's flags.
    pub fn new(client: ClientFlags) -> Self {
        Negotiation {
            client,
            structured: false,
        }
    }

    /// Whether structured replies were negotiated.
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Handles one option; appends the replies to `out`.
    pub fn handle_option(
        &mut self,
        option: u32,
        data: &[u8],
        exports: &impl ExportCatalog,
        out: &mut impl BufMut,
    ) -> OptionOutcome {
        match option {
            opt::EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(data) else {
                    return OptionOutcome::Close("EXPORT_NAME with a non-UTF-8 name".into());
                };
                let Some(export) = exports.lookup(name) else {
                    return OptionOutcome::Close(format!(
                        "EXPORT_NAME for unknown export {name:?}"
                    ));
                };
                out.put_u64(export.size);
                out.put_u16(export.flags);
                if !self.client.no_zeroes {
                    out.put_bytes(0, 124);
                }
                OptionOutcome::Transmit(export)
            }
            opt::ABORT => {
                encode_option_reply(out, option, rep::ACK, &[]);
                OptionOutcome::Abort
            }
            opt::LIST => {
                if !data.is_empty() {
                    return invalid(out, option, "LIST takes no data");
                }
                for (name, description) in exports.list() {
                    let mut d = Vec::with_capacity(4 + name.len() + description.len());
                    d.put_u32(name.len() as u32);
                    d.put_slice(name.as_bytes());
                    d.put_slice(description.as_bytes());
                    encode_option_reply(out, option, rep::SERVER, &d);
                }
                encode_option_reply(out, option, rep::ACK, &[]);
                OptionOutcome::Continue
            }
            opt::INFO | opt::GO => {
                let (name, requests) = match parse_info_request(data) {
                    Ok(v) => v,
                    Err(why) => return invalid(out, option, why),
                };
                let Some(export) = exports.lookup(name) else {
                    let msg = format!("no export named {name:?}");
                    encode_option_reply(out, option, rep::ERR_UNKNOWN, msg.as_bytes());
                    return OptionOutcome::Continue;
                };
                let mut d = Vec::with_capacity(16);
                d.put_u16(info::EXPORT);
                d.put_u64(export.size);
                d.put_u16(export.flags);
                encode_option_reply(out, option, rep::INFO, &d);
                // Block sizes are always sent: clients that did not ask still
                // benefit, and the spec allows unrequested information.
                d.clear();
                d.put_u16(info::BLOCK_SIZE);
                d.put_u32(export.block_sizes.minimum);
                d.put_u32(export.block_sizes.preferred);
                d.put_u32(export.block_sizes.maximum);
                encode_option_reply(out, option, rep::INFO, &d);
                if requests.contains(&info::NAME) {
                    d.clear();
                    d.put_u16(info::NAME);
                    d.put_slice(export.name.as_bytes());
                    encode_option_reply(out, option, rep::INFO, &d);
                }
                if requests.contains(&info::DESCRIPTION) && !export.description.is_empty() {
                    d.clear();
                    d.put_u16(info::DESCRIPTION);
                    d.put_slice(export.description.as_bytes());
                    encode_option_reply(out, option, rep::INFO, &d);
                }
                encode_option_reply(out, option, rep::ACK, &[]);
                if option == opt::GO {
                    OptionOutcome::Transmit(export)
                } else {
                    OptionOutcome::Continue
                }
            }
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return invalid(out, option, "STRUCTURED_REPLY takes no data");
                }
                if self.structured {
                    return invalid(out, option, "structured replies already negotiated");
                }
                self.structured = true;
                encode_option_reply(out, option, rep::ACK, &[]);
                OptionOutcome::Continue
            }
            _ => {
                let msg = format!("option {option} not supported");
                encode_option_reply(out, option, rep::ERR_UNSUP, msg.as_bytes());
                OptionOutcome::Continue
            }
        }
    }
}

fn invalid(out: &mut impl BufMut, option: u32, why: &str) -> OptionOutcome {
    encode_option_reply(out, option, rep::ERR_INVALID, why.as_bytes());
    OptionOutcome::Continue
}

/// Parses the data of INFO/GO: name length, name, number of requests, requests.
pub fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), &'static str> {
    let mut b = data;
    if b.remaining() < 4 {
        return Err("INFO/GO data shorter than its name length");
    }
    let name_len = b.get_u32() as usize;
    if b.remaining() < name_len {
        return Err("INFO/GO name length exceeds the option data");
    }
    let name = std::str::from_utf8(&b[..name_len]).map_err(|_| "export name is not UTF-8")?;
    b.advance(name_len);
    if b.remaining() < 2 {
        return Err("INFO/GO data lacks the request count");
    }
    let n = b.get_u16() as usize;
    if b.remaining() != n * 2 {
        return Err("INFO/GO request count does not match the option length");
    }
    let requests = (0..n).map(|_| b.get_u16()).collect();
    Ok((name, requests))
}

fn take(bytes: &[u8], need: usize) -> Result<&[u8], HandshakeError> {
    if bytes.len() < need {
        return Err(HandshakeError::Truncated {
            need,
            got: bytes.len(),
        });
    }
    Ok(&bytes[..need])
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl ExportCatalog for One {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name.is_empty() || name == "vol").then(|| ExportInfo {
                name: "vol".into(),
                description: "test".into(),
                size: 1 << 20,
                flags: tflag::HAS_FLAGS | tflag::SEND_FLUSH,
                block_sizes: BlockSizes {
                    minimum: 512,
                    preferred: 4096,
                    maximum: 1 << 25,
                },
            })
        }
        fn list(&self) -> Vec<(String, String)> {
            vec![("vol".into(), "test".into())]
        }
    }

    fn replies(mut out: &[u8]) -> Vec<(u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            let h = decode_option_reply_header(out).unwrap();
            out.advance(OPTION_REPLY_HEADER_LEN);
            v.push((h.reply, out[..h.length as usize].to_vec()));
            out.advance(h.length as usize);
        }
        v
    }

    #[test]
    fn go_known_export_sends_info_then_ack() {
        let mut n = Negotiation::new(ClientFlags { no_zeroes: true });
        let mut data = Vec::new();
        encode_info_request(&mut data, "vol", &[info::NAME]);
        let mut out = Vec::new();
        let o = n.handle_option(opt::GO, &data, &One, &mut out);
        assert!(matches!(o, OptionOutcome::Transmit(ref e) if e.name == "vol"));
        let r = replies(&out);
        let types: Vec<u32> = r.iter().map(|x| x.0).collect();
        assert_eq!(types, vec![rep::INFO, rep::INFO, rep::INFO, rep::ACK]);
        assert_eq!(&r[1].1[..2], &info::BLOCK_SIZE.to_be_bytes());
        // What a client decodes from them.
        let decoded: Vec<InfoReply> = r[..3].iter().map(|x| decode_info_reply(&x.1)).collect();
        assert!(decoded.contains(&InfoReply::Export {
            size: 1 << 20,
            flags: tflag::HAS_FLAGS | tflag::SEND_FLUSH,
        }));
        assert!(decoded.contains(&InfoReply::BlockSize(BlockSizes {
            minimum: 512,
            preferred: 4096,
            maximum: 1 << 25,
        })));
        assert!(decoded.contains(&InfoReply::Other)); // NBD_INFO_NAME
                                                      // Truncated or unknown data is not misread.
        assert_eq!(decode_info_reply(&r[0].1[..5]), InfoReply::Other);
        assert_eq!(decode_info_reply(&[]), InfoReply::Other);
    }

    #[test]
    fn go_unknown_export_is_err_unknown_and_continues() {
        let mut n = Negotiation::new(ClientFlags::default());
        let mut data = Vec::new();
        encode_info_request(&mut data, "nope", &[]);
        let mut out = Vec::new();
        assert_eq!(
            n.handle_option(opt::GO, &data, &One, &mut out),
            OptionOutcome::Continue
        );
        assert_eq!(replies(&out)[0].0, rep::ERR_UNKNOWN);
    }

    #[test]
    fn malformed_info_is_err_invalid() {
        let mut n = Negotiation::new(ClientFlags::default());
        for data in [&[][..], &[0, 0, 0, 9, b'v'][..], &[0, 0, 0, 0, 0, 2, 0][..]] {
            let mut out = Vec::new();
            assert_eq!(
                n.handle_option(opt::INFO, data, &One, &mut out),
                OptionOutcome::Continue
            );
            assert_eq!(replies(&out)[0].0, rep::ERR_INVALID);
        }
    }

    #[test]
    fn export_name_pads_unless_no_zeroes() {
        for (nz, len) in [(false, 8 + 2 + 124), (true, 10)] {
            let mut n = Negotiation::new(ClientFlags { no_zeroes: nz });
            let mut out = Vec::new();
            assert!(matches!(
                n.handle_option(opt::EXPORT_NAME, b"vol", &One, &mut out),
                OptionOutcome::Transmit(_)
            ));
            assert_eq!(out.len(), len);
        }
        let mut n = Negotiation::new(ClientFlags::default());
        assert!(matches!(
            n.handle_option(opt::EXPORT_NAME, b"x", &One, &mut Vec::new()),
            OptionOutcome::Close(_)
        ));
    }

    #[test]
    fn client_flags_require_fixed_newstyle() {
        assert!(decode_client_flags(&[0, 0, 0, 0]).is_err());
        assert!(decode_client_flags(&[0, 0, 0, 4 | 1]).is_err());
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 3]).unwrap(),
            ClientFlags { no_zeroes: true }
        );
        assert!(decode_client_flags(&[0, 0]).is_err());
    }

    #[test]
    fn unknown_option_and_duplicate_structured() {
        let mut n = Negotiation::new(ClientFlags::default());
        let mut out = Vec::new();
        n.handle_option(opt::SET_META_CONTEXT, b"xx", &One, &mut out);
        assert_eq!(replies(&out)[0].0, rep::ERR_UNSUP);
        out.clear();
        n.handle_option(opt::STRUCTURED_REPLY, &[], &One, &mut out);
        assert_eq!(replies(&out)[0].0, rep::ACK);
        assert!(n.structured_replies());
        out.clear();
        n.handle_option(opt::STRUCTURED_REPLY, &[], &One, &mut out);
        assert_eq!(replies(&out)[0].0, rep::ERR_INVALID);
    }
}
