//! A small NBD client: one request at a time, fixed newstyle, `NBD_OPT_GO`,
//! structured replies. Used by `tandemd demo` and by tests; production
//! clients are QEMU, the kernel and libnbd.

use std::path::Path;

use anyhow::{bail, Context, Result};
use tandem_core::nbd::{
    self, chunk, cmdflag, decode_info_reply, decode_option_reply_header, decode_reply_header,
    encode_info_request, encode_option, info, opt, rep, reply_header_len, BlockSizes, Command,
    InfoReply, ReplyHeader, Request, CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES,
    GREETING_LEN, OPTION_REPLY_HEADER_LEN,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::UnixStream;

/// What the server told us about the export.
#[derive(Debug, Clone)]
pub struct Negotiated {
    /// Export size.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block sizes, if the server sent them.
    pub block_sizes: Option<BlockSizes>,
    /// Whether structured replies are in use.
    pub structured: bool,
}

/// A connected client in transmission.
pub struct Client {
    s: BufStream<UnixStream>,
    /// Negotiated parameters.
    pub export: Negotiated,
    cookie: u64,
    base: u64,
}

impl Client {
    /// Connects to a unix socket and selects `export` with `NBD_OPT_GO`.
    pub async fn connect_unix(path: &Path, export: &str) -> Result<Client> {
        let stream = UnixStream::connect(path)
            .await
            .with_context(|| format!("connecting to {}", path.display()))?;
        let mut s = BufStream::new(stream);
        let mut greeting = [0u8; GREETING_LEN];
        s.read_exact(&mut greeting).await?;
        if greeting[..8] != nbd::NBDMAGIC.to_be_bytes()
            || greeting[8..16] != nbd::IHAVEOPT.to_be_bytes()
        {
            bail!("not an NBD newstyle server");
        }
        s.write_u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)
            .await?;
        let mut msg = Vec::new();
        encode_option(&mut msg, opt::STRUCTURED_REPLY, &[]);
        s.write_all(&msg).await?;
        s.flush().await?;
        let (reply, _) = read_option_reply(&mut s).await?;
        let structured = reply == rep::ACK;
        let mut data = Vec::new();
        encode_info_request(&mut data, export, &[info::BLOCK_SIZE]);
        msg.clear();
        encode_option(&mut msg, opt::GO, &data);
        s.write_all(&msg).await?;
        s.flush().await?;
        let mut size_flags = None;
        let mut block_sizes = None;
        loop {
            let (reply, data) = read_option_reply(&mut s).await?;
            match reply {
                rep::ACK => break,
                rep::INFO => match decode_info_reply(&data) {
                    InfoReply::Export { size, flags } => size_flags = Some((size, flags)),
                    InfoReply::BlockSize(b) => block_sizes = Some(b),
                    InfoReply::Other => {}
                },
                r if r & (1 << 31) != 0 => {
                    bail!(
                        "server refused export {export:?}: {}",
                        String::from_utf8_lossy(&data)
                    )
                }
                _ => {}
            }
        }
        let Some((size, flags)) = size_flags else {
            bail!("server sent no NBD_INFO_EXPORT");
        };
        Ok(Client {
            s,
            export: Negotiated {
                size,
                flags,
                block_sizes,
                structured,
            },
            cookie: 0,
            base: 0,
        })
    }

    async fn request(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64> {
        self.cookie += 1;
        let req = Request {
            flags,
            command,
            cookie: self.cookie,
            offset,
            length,
        };
        let mut h = Vec::with_capacity(nbd::REQUEST_LEN);
        req.encode(&mut h);
        self.s.write_all(&h).await?;
        self.s.write_all(payload).await?;
        self.s.flush().await?;
        Ok(self.cookie)
    }

    /// Reads one reply; for reads, copies data into `into`. Returns the NBD error code (0 = ok).
    async fn reply(&mut self, cookie: u64, mut into: Option<&mut [u8]>) -> Result<u32> {
        loop {
            let mut magic = [0u8; 4];
            self.s.read_exact(&mut magic).await?;
            let len = reply_header_len(u32::from_be_bytes(magic))?;
            let mut h = vec![0u8; len];
            h[..4].copy_from_slice(&magic);
            self.s.read_exact(&mut h[4..]).await?;
            match decode_reply_header(&h)? {
                ReplyHeader::Simple { cookie: c, error } => {
                    if c != cookie {
                        bail!("reply for cookie {c}, expected {cookie}");
                    }
                    if error == 0 {
                        if let Some(buf) = into.as_deref_mut() {
                            self.s.read_exact(buf).await?;
                        }
                    }
                    return Ok(error);
                }
                ReplyHeader::Structured {
                    flags,
                    kind,
                    cookie: c,
                    length,
                } => {
                    if c != cookie {
                        bail!("chunk for cookie {c}, expected {cookie}");
                    }
                    let mut error = 0;
                    match kind {
                        chunk::OFFSET_DATA => {
                            let off = self.s.read_u64().await?;
                            let n =
                                length.checked_sub(8).context("short OFFSET_DATA chunk")? as usize;
                            let buf = into.as_deref_mut().context("data chunk for a non-read")?;
                            // Single-request client: the data lands at its offset relative to the
                            // request start, which the caller tracks through `base`.
                            let start = off
                                .checked_sub(self.base)
                                .context("data chunk before the request")?
                                as usize;
                            let dst = buf
                                .get_mut(start..start + n)
                                .context("data chunk outside the request")?;
                            self.s.read_exact(dst).await?;
                        }
                        chunk::NONE => {}
                        k if k & (1 << 15) != 0 => {
                            error = self.s.read_u32().await?;
                            let mut rest = vec![0u8; length.saturating_sub(4) as usize];
                            self.s.read_exact(&mut rest).await?;
                        }
                        _ => {
                            let mut rest = vec![0u8; length as usize];
                            self.s.read_exact(&mut rest).await?;
                        }
                    }
                    if flags & chunk::FLAG_DONE != 0 || error != 0 {
                        if error != 0 && flags & chunk::FLAG_DONE == 0 {
                            continue;
                        }
                        return Ok(error);
                    }
                }
            }
        }
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let c = self
            .request(Command::Read, 0, offset, buf.len() as u32, &[])
            .await?;
        self.base = offset;
        check(self.reply(c, Some(buf)).await?, "read", offset)
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        let flags = if fua { cmdflag::FUA } else { 0 };
        let c = self
            .request(Command::Write, flags, offset, data.len() as u32, data)
            .await?;
        check(self.reply(c, None).await?, "write", offset)
    }

    /// Flushes.
    pub async fn flush(&mut self) -> Result<()> {
        let c = self.request(Command::Flush, 0, 0, 0, &[]).await?;
        check(self.reply(c, None).await?, "flush", 0)
    }

    /// Trims a range.
    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<()> {
        let c = self.request(Command::Trim, 0, offset, len, &[]).await?;
        check(self.reply(c, None).await?, "trim", offset)
    }

    /// Sends a raw request and returns the NBD error code of its reply (0 = ok);
    /// for probing error handling.
    pub async fn raw(
        &mut self,
        command: Command,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u32> {
        let c = self
            .request(command, flags, offset, length, payload)
            .await?;
        let mut sink = vec![
            0u8;
            if command == Command::Read {
                length as usize
            } else {
                0
            }
        ];
        self.base = offset;
        self.reply(c, (command == Command::Read).then_some(&mut sink[..]))
            .await
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub async fn disconnect(mut self) -> Result<()> {
        self.request(Command::Disc, 0, 0, 0, &[]).await?;
        self.s.shutdown().await?;
        Ok(())
    }
}

fn check(code: u32, what: &str, offset: u64) -> Result<()> {
    if code != 0 {
        bail!("{what} at {offset} failed with NBD error {code}");
    }
    Ok(())
}

async fn read_option_reply(s: &mut BufStream<UnixStream>) -> Result<(u32, Vec<u8>)> {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).await?;
    let h = decode_option_reply_header(&h)?;
    if h.length > 1 << 20 {
        bail!("option reply of {} bytes is implausible", h.length);
    }
    let mut data = vec![0u8; h.length as usize];
    s.read_exact(&mut data).await?;
    Ok((h.reply, data))
}
