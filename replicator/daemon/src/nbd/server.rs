//! The NBD server: listeners, handshake driver, and the transmission loop.
//!
//! Per connection, one task reads requests and starts each as its own task
//! (so many requests are in flight and complete out of order), and one task
//! writes replies, coalescing whatever is ready into one socket write.
//! Request validation and all encoding live in `tandem_core::nbd`; this file
//! only moves bytes and calls the volume.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use tandem_core::nbd::{
    self, decode_client_flags, decode_option_header, decode_request, encode_greeting,
    encode_read_chunk_header, encode_simple_reply, encode_structured_error, validate_request,
    Command, NbdError, Negotiation, OptionOutcome, Request, GREETING_LEN, OPTION_HEADER_LEN,
    REQUEST_LEN,
};
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter,
};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, error, info, warn, Instrument};

use crate::export::{Export, Exports};
use crate::storage::{IoBuf, IoError, IoResult, Op};

/// Bytes of request payload (and read buffers) one connection may have in
/// flight; further requests wait. Bounds memory per client.
const INFLIGHT_BYTES: u32 = 64 << 20;
/// Requests one connection may have in flight.
const INFLIGHT_REQUESTS: usize = 512;
/// Socket buffer sizes for the request reader and reply writer.
const SOCKET_BUF: usize = 256 << 10;
/// Time a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

mod tokio_util_shim {
    //! A minimal cancellation token (tokio's watch channel), so the daemon
    //! does not need tokio-util for one type.
    use tokio::sync::watch;

    /// Cancelled once; every clone observes it.
    #[derive(Clone, Debug)]
    pub struct CancelToken {
        rx: watch::Receiver<bool>,
        tx: std::sync::Arc<watch::Sender<bool>>,
    }

    impl Default for CancelToken {
        fn default() -> Self {
            let (tx, rx) = watch::channel(false);
            CancelToken {
                rx,
                tx: std::sync::Arc::new(tx),
            }
        }
    }

    impl CancelToken {
        /// Cancels every clone.
        pub fn cancel(&self) {
            let _ = self.tx.send(true);
        }
        /// Completes once cancelled.
        pub async fn cancelled(&self) {
            let mut rx = self.rx.clone();
            let _ = rx.wait_for(|c| *c).await;
        }
    }
}

pub use tokio_util_shim::CancelToken as Shutdown;

/// Where the server listens.
#[derive(Debug, Clone)]
pub enum Listen {
    /// A unix socket path (a stale socket file is replaced).
    Unix(PathBuf),
    /// A TCP address.
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// Binds a unix listener, replacing a stale socket file but never a live one.
pub fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    use anyhow::Context;
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            anyhow::bail!(
                "{}: another process is already listening on this socket",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("{}: removing stale socket", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: creating", dir.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("{}: binding unix socket", path.display()))
}

/// Accepts connections on a unix listener until `shutdown`.
pub async fn serve_unix(listener: UnixListener, exports: Arc<Exports>, shutdown: Shutdown) {
    let mut n = 0u64;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    n += 1;
                    let (r, w) = stream.into_split();
                    spawn_connection(r, w, exports.clone(), format!("unix#{n}"), shutdown.clone());
                }
                Err(e) => {
                    warn!(error = %e, "accept on unix socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Accepts connections on a TCP listener until `shutdown`.
pub async fn serve_tcp(listener: TcpListener, exports: Arc<Exports>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let (r, w) = stream.into_split();
                    spawn_connection(r, w, exports.clone(), addr.to_string(), shutdown.clone());
                }
                Err(e) => {
                    warn!(error = %e, "accept on tcp socket failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn spawn_connection<R, W>(r: R, w: W, exports: Arc<Exports>, peer: String, shutdown: Shutdown)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!("nbd", %peer);
    tokio::spawn(
        async move {
            tokio::select! {
                res = serve_connection(r, w, exports) => match res {
                    Ok(()) => debug!("connection closed"),
                    // libnbd-based clients (fio, nbdinfo) often just close.
                    Err(ConnError::ClosedWithoutDisc) => debug!("connection closed without NBD_CMD_DISC"),
                    Err(e) => info!("connection closed: {e:#}"),
                },
                _ = shutdown.cancelled() => debug!("connection closed by shutdown"),
            }
        }
        .instrument(span),
    );
}

/// Why a connection ended abnormally (logged by the caller).
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error or the client went away.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake was malformed.
    #[error("handshake: {0}")]
    Handshake(#[from] nbd::HandshakeError),
    /// A request header was malformed; the stream is out of step.
    #[error("request: {0}")]
    Request(#[from] nbd::RequestDecodeError),
    /// Negotiation ended without transmission.
    #[error("negotiation: {0}")]
    Negotiation(String),
    /// The client hung up mid-stream (no NBD_CMD_DISC, or a truncated payload).
    #[error("client closed the connection without NBD_CMD_DISC")]
    ClosedWithoutDisc,
    /// The client hung up in the middle of a request header or payload.
    #[error("truncated {0}: the client closed the connection mid-request")]
    Truncated(&'static str),
}

fn truncated(what: &'static str, e: std::io::Error) -> ConnError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        ConnError::Truncated(what)
    } else {
        ConnError::Io(e)
    }
}

/// Serves one client: handshake, then transmission until disconnect.
pub async fn serve_connection<R, W>(r: R, w: W, exports: Arc<Exports>) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut reader = BufReader::with_capacity(SOCKET_BUF, r);
    let mut writer = BufWriter::with_capacity(SOCKET_BUF, w);
    let mut out = Vec::with_capacity(GREETING_LEN);
    encode_greeting(&mut out);
    writer.write_all(&out).await?;
    writer.flush().await?;

    let negotiated = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        negotiate(&mut reader, &mut writer, &exports),
    )
    .await
    .map_err(|_| {
        ConnError::Negotiation(format!(
            "handshake not finished within {HANDSHAKE_TIMEOUT:?}"
        ))
    })??;
    let Some((export, negotiation)) = negotiated else {
        return Ok(()); // NBD_OPT_ABORT
    };
    debug!(export = %export.name, structured = negotiation.structured_replies(), "transmission");
    export.stats.connections.fetch_add(1, Relaxed);
    let res = transmit(
        reader,
        writer,
        export.clone(),
        negotiation.structured_replies(),
    )
    .await;
    export.stats.connections.fetch_sub(1, Relaxed);
    res
}

/// Option haggling; `None` when the client aborted.
async fn negotiate<R, W>(
    reader: &mut BufReader<R>,
    writer: &mut BufWriter<W>,
    exports: &Exports,
) -> Result<Option<(Arc<Export>, Negotiation)>, ConnError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::new();
    let mut flags = [0u8; 4];
    reader.read_exact(&mut flags).await?;
    let client = decode_client_flags(&flags)?;
    let mut negotiation = Negotiation::new(client);
    loop {
        let mut header = [0u8; OPTION_HEADER_LEN];
        reader.read_exact(&mut header).await?;
        let h = decode_option_header(&header)?;
        let mut data = vec![0u8; h.length as usize];
        reader.read_exact(&mut data).await?;
        out.clear();
        let outcome = negotiation.handle_option(h.option, &data, exports, &mut out);
        writer.write_all(&out).await?;
        writer.flush().await?;
        match outcome {
            OptionOutcome::Continue => {}
            OptionOutcome::Abort => return Ok(None),
            OptionOutcome::Close(why) => return Err(ConnError::Negotiation(why)),
            OptionOutcome::Transmit(info) => match exports.get(&info.name) {
                Some(e) => return Ok(Some((e.clone(), negotiation))),
                None => return Err(ConnError::Negotiation("export vanished".into())),
            },
        }
    }
}

/// A completed request, ready to be sent.
struct Reply {
    cookie: u64,
    offset: u64,
    result: Result<Option<IoBuf>, (NbdError, String)>,
    is_read: bool,
    /// Admission permits, released when the reply has been written.
    permits: Permits,
}

/// The request and byte permits a request holds until its reply is written.
#[derive(Default)]
struct Permits {
    _requests: Option<tokio::sync::OwnedSemaphorePermit>,
    _bytes: Option<tokio::sync::OwnedSemaphorePermit>,
}

async fn transmit<R, W>(
    mut reader: BufReader<R>,
    writer: BufWriter<W>,
    export: Arc<Export>,
    structured: bool,
) -> Result<(), ConnError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let writer_task = tokio::spawn(write_replies(writer, rx, structured));
    let bytes = Arc::new(Semaphore::new(INFLIGHT_BYTES as usize));
    let requests = Arc::new(Semaphore::new(INFLIGHT_REQUESTS));
    let limits = export.limits();
    let mut header = [0u8; REQUEST_LEN];
    let result = loop {
        // A clean EOF between requests is a client that simply hung up; an
        // EOF inside a header is a truncated request.
        match reader.fill_buf().await {
            Ok([]) => break Err(ConnError::ClosedWithoutDisc),
            Ok(_) => {}
            Err(e) => break Err(e.into()),
        }
        if let Err(e) = reader.read_exact(&mut header).await {
            break Err(truncated("request header", e));
        }
        let req = match decode_request(&header) {
            Ok(r) => r,
            Err(e) => break Err(e.into()),
        };
        let decoded = std::time::Instant::now();
        // Admission: bound requests and bytes in flight for this connection.
        // Permits travel with the reply and are released only once it is
        // written, so a client that stops reading replies stalls itself
        // instead of growing the daemon's memory.
        let Ok(req_permit) = requests.clone().acquire_owned().await else {
            break Ok(());
        };
        if let Err(err) = validate_request(&req, &limits) {
            export.stats.invalid.fetch_add(1, Relaxed);
            export.io.invalid();
            debug!(?req, %err, "invalid request");
            // Consume the payload so the stream stays in step.
            let payload = u64::from(req.payload_len());
            if payload > 0 {
                let copied =
                    tokio::io::copy(&mut (&mut reader).take(payload), &mut tokio::io::sink()).await;
                match copied {
                    Ok(n) if n == payload => {}
                    Ok(_) => break Err(ConnError::Truncated("write payload")),
                    Err(e) => break Err(e.into()),
                }
            }
            let _ = tx.send(Reply {
                cookie: req.cookie,
                offset: req.offset,
                result: Err((err, describe_invalid(&req, err))),
                is_read: req.command == Command::Read,
                permits: Permits {
                    _requests: Some(req_permit),
                    _bytes: None,
                },
            });
            continue;
        }
        if req.command == Command::Disc {
            debug!("client sent NBD_CMD_DISC");
            break Ok(());
        }
        let cost = match req.command {
            Command::Read | Command::Write => req.length.div_ceil(4096).max(1) * 4096,
            _ => 4096,
        };
        let Ok(byte_permit) = bytes.clone().acquire_many_owned(cost).await else {
            break Ok(());
        };
        let payload = if req.command == Command::Write {
            let mut buf = IoBuf::pooled(req.length as usize);
            if let Err(e) = reader.read_exact(&mut buf).await {
                break Err(truncated("write payload", e));
            }
            Some(buf)
        } else {
            None
        };
        let export = export.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reply = execute(&export, req, payload).await;
            export.io.record(
                req.command,
                req.length,
                reply.result.is_ok(),
                decoded.elapsed(),
            );
            reply.permits = Permits {
                _requests: Some(req_permit),
                _bytes: Some(byte_permit),
            };
            let _ = tx.send(reply);
        });
    };
    drop(tx);
    // In-flight requests finish and their replies are sent before closing.
    match writer_task.await {
        // After NBD_CMD_DISC the client may close before the last replies
        // (it owes us nothing more); that is not an error.
        Ok(Err(e))
            if result.is_ok()
                && !matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ) =>
        {
            return Err(e.into())
        }
        _ => {}
    }
    result
}

fn describe_invalid(req: &Request, err: NbdError) -> String {
    format!(
        "{:?} offset {} length {} flags {:#x}: {}",
        req.command,
        req.offset,
        req.length,
        req.flags,
        err.message()
    )
}

fn storage_error(export: &Export, req: &Request, e: &IoError) -> (NbdError, String) {
    export.stats.io_errors.fetch_add(1, Relaxed);
    error!(export = %export.name, command = ?req.command, offset = req.offset, length = req.length, error = %e, "storage error");
    let code = match e.source.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => NbdError::NoSpc,
        Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES) => NbdError::Perm,
        Some(libc::ENOMEM) => NbdError::NoMem,
        _ => NbdError::Io,
    };
    (code, e.to_string())
}

/// Runs a writing command through the replication driver.
async fn execute_replicated(
    export: &Export,
    replicator: &crate::replication::Replicator,
    req: Request,
    payload: Option<IoBuf>,
) -> Reply {
    use tandem_core::repl::Op as ROp;
    let len = u64::from(req.length);
    let (op, kind) = match req.command {
        Command::Write => {
            let Some(buf) = payload else {
                return reply_for(export, &req, Ok(None));
            };
            // Back to the pool once the local write and every peer's copy are done.
            let data = bytes::Bytes::from_owner(crate::storage::PooledBytes::new(buf));
            (
                ROp::Write {
                    offset: req.offset,
                    data,
                    fua: req.fua(),
                },
                Op::Write,
            )
        }
        Command::Flush => (ROp::Flush, Op::Flush),
        Command::Trim => (
            ROp::Trim {
                offset: req.offset,
                len,
                fua: req.fua(),
            },
            Op::Trim,
        ),
        Command::WriteZeroes => (
            ROp::WriteZeroes {
                offset: req.offset,
                len,
                no_hole: req.flags & nbd::cmdflag::NO_HOLE != 0,
                fua: req.fua(),
            },
            Op::WriteZeroes,
        ),
        _ => return reply_for(export, &req, Ok(None)),
    };
    let result = replicator.submit(op).await.map_err(|errno| {
        IoError::new(
            kind,
            req.offset,
            len,
            std::io::Error::from_raw_os_error(errno),
        )
    });
    if result.is_ok() {
        let stats = &export.stats;
        match req.command {
            Command::Write => {
                stats.writes.fetch_add(1, Relaxed);
                stats.write_bytes.fetch_add(len, Relaxed);
            }
            Command::Flush => {
                stats.flushes.fetch_add(1, Relaxed);
            }
            _ => {
                stats.discards.fetch_add(1, Relaxed);
            }
        }
    }
    reply_for(export, &req, result.map(|()| None))
}

/// A read through the replication driver: the local disk is detached, or
/// the local read failed with `local_error` (which detaches it); the
/// replica reads through an UpToDate peer (docs/replication.md, R23).
async fn read_replicated(
    export: &Export,
    replicator: &crate::replication::Replicator,
    req: Request,
    local_error: Option<i32>,
) -> Reply {
    let len = u64::from(req.length);
    let result = match replicator.read(req.offset, len, local_error).await {
        Ok(data) => {
            export.stats.reads.fetch_add(1, Relaxed);
            export.stats.read_bytes.fetch_add(len, Relaxed);
            Ok(Some(IoBuf::from_slice(&data)))
        }
        Err(errno) => Err(IoError::new(
            Op::Read,
            req.offset,
            len,
            std::io::Error::from_raw_os_error(errno),
        )),
    };
    reply_for(export, &req, result)
}

async fn execute(export: &Export, req: Request, payload: Option<IoBuf>) -> Reply {
    if let Some(r) = &export.replicator {
        if req.command != Command::Read {
            return execute_replicated(export, r, req, payload).await;
        }
        if r.is_detached() {
            return read_replicated(export, r, req, None).await;
        }
    }
    let vol = &export.volume;
    let stats = &export.stats;
    let len = u64::from(req.length);
    let result = match req.command {
        Command::Read => {
            let (buf, res) = vol
                .read(req.offset, IoBuf::pooled(req.length as usize))
                .await;
            if let Err(e) = &res {
                buf.recycle();
                if let Some(r) = &export.replicator {
                    let errno = e.source.raw_os_error().unwrap_or(libc::EIO);
                    return read_replicated(export, r, req, Some(errno)).await;
                }
                return reply_for(export, &req, res.map(|()| None));
            }
            res.map(|()| {
                stats.reads.fetch_add(1, Relaxed);
                stats.read_bytes.fetch_add(len, Relaxed);
                Some(buf)
            })
        }
        Command::Write => match payload {
            Some(buf) => {
                let (buf, res) = vol.write(req.offset, buf, req.fua()).await;
                buf.recycle();
                res.map(|()| {
                    stats.writes.fetch_add(1, Relaxed);
                    stats.write_bytes.fetch_add(len, Relaxed);
                    None
                })
            }
            None => Ok(None), // unreachable: the reader always attaches the payload
        },
        Command::Flush => vol.flush().await.map(|()| {
            stats.flushes.fetch_add(1, Relaxed);
            None
        }),
        Command::Trim => vol.trim(req.offset, len, req.fua()).await.map(|()| {
            stats.discards.fetch_add(1, Relaxed);
            None
        }),
        Command::WriteZeroes => {
            let may_punch = req.flags & nbd::cmdflag::NO_HOLE == 0;
            vol.write_zeroes(req.offset, len, may_punch, req.fua())
                .await
                .map(|()| {
                    stats.discards.fetch_add(1, Relaxed);
                    None
                })
        }
        // Validation refuses everything else before execution.
        _ => Ok(None),
    };
    reply_for(export, &req, result)
}

fn reply_for(export: &Export, req: &Request, result: IoResult<Option<IoBuf>>) -> Reply {
    Reply {
        cookie: req.cookie,
        offset: req.offset,
        result: result.map_err(|e| storage_error(export, req, &e)),
        is_read: req.command == Command::Read,
        permits: Permits::default(),
    }
}

async fn write_replies<W>(
    mut w: BufWriter<W>,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    structured: bool,
) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut head = Vec::with_capacity(64);
    while let Some(mut reply) = rx.recv().await {
        loop {
            head.clear();
            match reply.result {
                Ok(data) => {
                    if reply.is_read && structured {
                        let n = data.as_ref().map_or(0, |d| d.len()) as u32;
                        encode_read_chunk_header(&mut head, reply.cookie, reply.offset, n, true);
                    } else {
                        encode_simple_reply(&mut head, reply.cookie, None);
                    }
                    w.write_all(&head).await?;
                    if let Some(d) = data {
                        w.write_all(&d).await?;
                        d.recycle();
                    }
                }
                Err((err, msg)) => {
                    if reply.is_read && structured {
                        encode_structured_error(&mut head, reply.cookie, err, &msg);
                    } else {
                        encode_simple_reply(&mut head, reply.cookie, Some(err));
                    }
                    w.write_all(&head).await?;
                }
            }
            // Coalesce every reply that is already waiting into one write.
            match rx.try_recv() {
                Ok(next) => reply = next,
                Err(_) => {
                    // Let the tasks that are ready run first: at a high
                    // queue depth completions arrive in bursts (one peer
                    // datagram acknowledges several writes), and their
                    // replies then go out in one send instead of one each.
                    tokio::task::yield_now().await;
                    match rx.try_recv() {
                        Ok(next) => reply = next,
                        Err(_) => break,
                    }
                }
            }
        }
        w.flush().await?;
    }
    w.flush().await?;
    w.shutdown().await
}
