//! The stream pump: one forwarded connection ⇄ one QUIC data stream, both directions at once.
//!
//! ```text
//!              outbound: read ─► ChunkEncoder (zstd/RAW, BLAKE3) ─► DATA frames … FIN ─►
//!   local socket                                                                      QUIC stream
//!              inbound:  ◄─ write ◄─ verify BLAKE3 ◄─ decompress (≤ raw_len) ◄─ decode ◄─
//! ```
//!
//! * A chunk is sent as soon as the socket read returns (WAL and query latency): nothing waits
//!   for a chunk to fill. Small chunks are compressed inline; large ones (bulk transfers) on the
//!   blocking pool, up to two per core at once, and sent strictly in sequence order.
//! * Inbound chunks are decompressed into at most `raw_len` bytes and verified before a single
//!   byte is written to the local socket. A bad chunk resets the stream in both directions and
//!   aborts the local connection; the rest of the QUIC connection is unaffected.
//! * Half-close travels as FIN (byte count and digest of the whole direction, checked by the
//!   receiver); the other direction carries on until its own FIN.
//! * The receiver acknowledges delivered chunks cumulatively (ACK). Nothing depends on ACKs yet;
//!   they are the hook for resuming streams over a new connection (DESIGN §2).

use std::collections::VecDeque;
use std::future::Future;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::frame::{
    self, Chunk, ChunkDecoder, ChunkEncoder, DirectionStats, Frame, FrameError, ResetCode,
    HEADER_LEN,
};
use crate::level::{level_name, LevelControl};

/// Largest read from the local socket, i.e. the largest chunk we produce. 128 KiB keeps zstd's
/// ratio within 1–2 % of 1 MiB chunks on our sample data while bounding per-stream memory.
pub const READ_CHUNK: usize = 128 * 1024;

/// Send an ACK after this many delivered chunks (and at the end of the direction).
const ACK_EVERY: u64 = 32;

/// QUIC application error codes used when stopping/resetting streams.
pub mod codes {
    /// The stream ended normally or the agent is shutting down.
    pub const DONE: u32 = 0;
    /// A chunk failed verification.
    pub const INTEGRITY: u32 = 1;
    /// The peer violated the framing protocol.
    pub const PROTOCOL: u32 = 2;
    /// The local side failed.
    pub const LOCAL: u32 = 3;
}

/// How a forwarded connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished with verified FINs.
    Ok,
    /// An inbound chunk (or the FIN) failed verification; nothing of it was delivered.
    IntegrityFailure(String),
    /// The peer broke the framing protocol.
    ProtocolViolation(String),
    /// The peer reset the stream (e.g. its upstream failed).
    PeerReset {
        /// Peer's reset code.
        code: ResetCode,
        /// Peer's message.
        message: String,
    },
    /// The local socket failed.
    LocalError(String),
    /// The QUIC stream or connection failed.
    TunnelError(String),
}

impl Outcome {
    /// Short label for the audit log.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::IntegrityFailure(_) => "integrity_failure",
            Self::ProtocolViolation(_) => "protocol_violation",
            Self::PeerReset { .. } => "peer_reset",
            Self::LocalError(_) => "local_error",
            Self::TunnelError(_) => "tunnel_error",
        }
    }
    /// Human detail, empty for `Ok`.
    pub fn detail(&self) -> String {
        match self {
            Self::Ok => String::new(),
            Self::IntegrityFailure(m)
            | Self::ProtocolViolation(m)
            | Self::LocalError(m)
            | Self::TunnelError(m) => m.clone(),
            Self::PeerReset { code, message } => format!("{code:?}: {message}"),
        }
    }
}

/// What a pump reports when the connection is over.
#[derive(Debug)]
pub struct StreamReport {
    /// How it ended.
    pub outcome: Outcome,
    /// Local → peer accounting.
    pub sent: DirectionStats,
    /// Peer → local accounting (delivered, verified bytes only).
    pub received: DirectionStats,
    /// When the pump started.
    pub started: Instant,
}

/// Test-only fault injection: corrupts the first inbound chunk (after decompression, before
/// verification) whose raw bytes contain `marker`. Only reachable through the library API with
/// the `test-hooks` feature; no flag, file or environment variable of the agents sets it.
#[cfg(feature = "test-hooks")]
#[derive(Debug)]
pub struct FaultInjection {
    /// Bytes that select the chunk to corrupt.
    pub corrupt_marker: Vec<u8>,
    fired: std::sync::atomic::AtomicBool,
}

#[cfg(feature = "test-hooks")]
impl FaultInjection {
    /// Corrupts the first chunk containing `marker`, once per agent.
    pub fn corrupt_chunk_containing(marker: &[u8]) -> Self {
        Self {
            corrupt_marker: marker.to_vec(),
            fired: Default::default(),
        }
    }
    /// Whether the fault has fired.
    pub fn fired(&self) -> bool {
        self.fired.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn apply(&self, raw: Bytes) -> Bytes {
        use std::sync::atomic::Ordering;
        let hit = !self.corrupt_marker.is_empty()
            && raw
                .windows(self.corrupt_marker.len())
                .any(|w| w == &self.corrupt_marker[..]);
        if hit && !self.fired.swap(true, Ordering::SeqCst) {
            let mut m = BytesMut::from(&raw[..]);
            let mid = m.len() / 2;
            m[mid] ^= 0x01;
            return m.freeze();
        }
        raw
    }
}

/// Per-stream settings.
#[derive(Debug, Clone)]
pub struct PumpOptions {
    /// zstd level for outbound chunks.
    pub compression_level: i32,
    /// Test-only fault hook.
    #[cfg(feature = "test-hooks")]
    pub fault: Option<std::sync::Arc<FaultInjection>>,
}

/// Local socket halves plus a way to abort the connection (TCP RST) on failure.
pub struct LocalConn {
    /// Read half.
    pub reader: Box<dyn AsyncRead + Send + Unpin>,
    /// Write half.
    pub writer: Box<dyn AsyncWrite + Send + Unpin>,
    /// A duplicate of the TCP socket used to set `SO_LINGER 0` so that dropping sends RST.
    pub abort_handle: Option<socket2::Socket>,
}

impl LocalConn {
    /// Wraps a TCP connection.
    pub fn tcp(s: tokio::net::TcpStream) -> Self {
        let _ = s.set_nodelay(true);
        let abort_handle = {
            use std::os::fd::AsFd;
            s.as_fd()
                .try_clone_to_owned()
                .ok()
                .map(socket2::Socket::from)
        };
        let (r, w) = s.into_split();
        Self {
            reader: Box::new(r),
            writer: Box::new(w),
            abort_handle,
        }
    }
    /// Wraps a unix-socket connection.
    pub fn unix(s: tokio::net::UnixStream) -> Self {
        let (r, w) = s.into_split();
        Self {
            reader: Box::new(r),
            writer: Box::new(w),
            abort_handle: None,
        }
    }
    /// Closes the connection abruptly (TCP RST), so the client sees a failure, not a clean end.
    pub fn abort(self) {
        if let Some(s) = &self.abort_handle {
            let _ = s.set_linger(Some(std::time::Duration::ZERO));
        }
        drop(self);
    }
}

enum OutboundEnd {
    /// EOF forwarded as FIN.
    Finished,
    /// Stopped because the inbound side asked (it already has the outcome).
    Cancelled,
    Failed(Outcome),
}

/// Runs both directions until the connection is over. `inbound_buf` holds bytes already read
/// from `recv` after the stream header.
pub async fn pump(
    local: LocalConn,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    inbound_buf: BytesMut,
    opts: &PumpOptions,
) -> StreamReport {
    let started = Instant::now();
    let LocalConn {
        mut reader,
        mut writer,
        abort_handle,
    } = local;
    let mut sent = DirectionStats::default();
    let mut received = DirectionStats::default();
    let (ack_tx, ack_rx) = watch::channel(0u64);
    let (cancel_tx, cancel_rx) = watch::channel(false);

    let (out_end, in_res) = {
        let outbound = outbound(
            &mut reader,
            &mut send,
            &mut sent,
            ack_rx,
            cancel_rx,
            opts.compression_level,
        );
        let inbound = inbound(
            &mut recv,
            &mut writer,
            &mut received,
            inbound_buf,
            ack_tx,
            opts,
        );
        run_both(outbound, inbound, cancel_tx).await
    };

    let outcome = match (in_res, out_end) {
        (Err(o), _) => o,
        (Ok(()), OutboundEnd::Failed(o)) => o,
        (Ok(()), _) => Outcome::Ok,
    };
    match &outcome {
        Outcome::Ok => {
            let _ = send.finish();
            // Wait until the peer has everything we sent (or gave up) so a FIN is never cut off
            // by the connection closing right after.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), send.stopped()).await;
        }
        Outcome::IntegrityFailure(m) | Outcome::ProtocolViolation(m) => {
            let code = if matches!(outcome, Outcome::IntegrityFailure(_)) {
                ResetCode::IntegrityFailure
            } else {
                ResetCode::ProtocolViolation
            };
            send_reset(&mut send, sent.next_seq(), code, m).await;
            let c = if code == ResetCode::IntegrityFailure {
                codes::INTEGRITY
            } else {
                codes::PROTOCOL
            };
            let _ = recv.stop(c.into());
        }
        Outcome::LocalError(m) => {
            send_reset(&mut send, sent.next_seq(), ResetCode::UpstreamReset, m).await;
            let _ = recv.stop(codes::LOCAL.into());
        }
        Outcome::PeerReset { .. } | Outcome::TunnelError(_) => {
            let _ = send.reset(codes::DONE.into());
            let _ = recv.stop(codes::DONE.into());
        }
    }
    let local = LocalConn {
        reader,
        writer,
        abort_handle,
    };
    if outcome == Outcome::Ok {
        drop(local);
    } else {
        local.abort();
    }
    StreamReport {
        outcome,
        sent,
        received,
        started,
    }
}

/// Sends a RESET frame (best effort) and finishes the stream.
pub async fn send_reset(send: &mut quinn::SendStream, seq: u64, code: ResetCode, message: &str) {
    let mut buf = BytesMut::new();
    Frame::Reset {
        seq,
        code,
        message: message.chars().take(frame::MAX_RESET_MESSAGE / 4).collect(),
    }
    .encode(&mut buf);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), send.write_all(&buf)).await;
    let _ = send.finish();
}

async fn run_both(
    outbound: impl Future<Output = OutboundEnd>,
    inbound: impl Future<Output = Result<(), Outcome>>,
    cancel_tx: watch::Sender<bool>,
) -> (OutboundEnd, Result<(), Outcome>) {
    tokio::pin!(outbound);
    tokio::pin!(inbound);
    let mut out_end: Option<OutboundEnd> = None;
    let mut in_res: Option<Result<(), Outcome>> = None;
    loop {
        tokio::select! {
            r = &mut outbound, if out_end.is_none() => {
                let failed = matches!(r, OutboundEnd::Failed(_));
                out_end = Some(r);
                if failed {
                    // Our side is broken: no point delivering more of the peer's data.
                    return (out_end.unwrap(), in_res.unwrap_or(Ok(())));
                }
            }
            r = &mut inbound, if in_res.is_none() => {
                let failed = r.is_err();
                in_res = Some(r);
                if failed {
                    let _ = cancel_tx.send(true);
                    return (out_end.unwrap_or(OutboundEnd::Cancelled), in_res.unwrap());
                }
            }
        }
        if let (Some(o), Some(i)) = (&out_end, &in_res) {
            let _ = (o, i);
            return (out_end.unwrap(), in_res.unwrap());
        }
    }
}

/// One direction out: reads the local socket, sends each read as DATA frames in sequence order
/// (compressed inline or on the blocking pool, see [`ChunkQueue`]), acknowledges what the
/// inbound side delivered, and sends FIN at EOF.
async fn outbound(
    reader: &mut (dyn AsyncRead + Send + Unpin),
    send: &mut quinn::SendStream,
    stats: &mut DirectionStats,
    mut ack_rx: watch::Receiver<u64>,
    mut cancel_rx: watch::Receiver<bool>,
    level: i32,
) -> OutboundEnd {
    let mut queue = match ChunkQueue::new(level, stats.next_seq()) {
        Ok(q) => q,
        Err(e) => return OutboundEnd::Failed(Outcome::LocalError(format!("zstd: {e}"))),
    };
    let mut adapt = LevelControl::new(level);
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = BytesMut::with_capacity(64);
    let mut last_acked = 0u64;
    let mut acks_open = true;
    let mut eof = false;
    loop {
        // Send every frame that is ready, in sequence order.
        while let Some((raw, chunk)) = queue.pop_ready() {
            if let Err(end) = send_chunk(send, stats, &raw, chunk).await {
                return end;
            }
            if let Some(c) = adapt.sent(raw.len(), Instant::now()) {
                let (from, to) = (level_name(c.from), level_name(c.to));
                tracing::debug!(
                    "compression level {from} → {to} ({:.1} MB/s at {from})",
                    c.rate / 1e6
                );
            }
        }
        if eof && queue.is_empty() {
            return send_fin(send, stats, &mut out).await;
        }
        let can_read = !eof && queue.has_room();
        let waiting = !queue.is_empty();
        if buf.capacity() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            biased;
            _ = cancel_rx.changed() => return OutboundEnd::Cancelled,
            done = queue.front_job(), if waiting => {
                if let Err(e) = queue.front_done(done) {
                    return OutboundEnd::Failed(Outcome::LocalError(format!("compression task: {e}")))
                }
            }
            r = reader.read_buf(&mut buf), if can_read => match r {
                Ok(0) => eof = true,
                Ok(_) => queue.push(buf.split().freeze(), &adapt),
                Err(e) => {
                    return OutboundEnd::Failed(Outcome::LocalError(format!("reading local socket: {e}")))
                }
            },
            changed = ack_rx.changed(), if acks_open => {
                if changed.is_err() {
                    acks_open = false;
                    continue;
                }
                let next = *ack_rx.borrow_and_update();
                if next >= last_acked + ACK_EVERY {
                    last_acked = next;
                    out.clear();
                    Frame::Ack { next_seq: next }.encode(&mut out);
                    if let Err(e) = send.write_all(&out).await {
                        return OutboundEnd::Failed(Outcome::TunnelError(format!("sending: {e}")));
                    }
                }
            }
        }
    }
}

/// Sends one encoded chunk as a DATA frame and counts it in `stats`. Header and payload go to
/// quinn as two buffers: the payload is not copied again.
async fn send_chunk(
    send: &mut quinn::SendStream,
    stats: &mut DirectionStats,
    raw: &Bytes,
    chunk: Chunk,
) -> Result<(), OutboundEnd> {
    let mut header = BytesMut::with_capacity(HEADER_LEN);
    Frame::encode_data_header(&chunk, &mut header);
    stats.record(raw, HEADER_LEN + chunk.payload.len());
    if let Err(e) = send
        .write_all_chunks(&mut [header.freeze(), chunk.payload])
        .await
    {
        return Err(OutboundEnd::Failed(Outcome::TunnelError(format!(
            "sending: {e}"
        ))));
    }
    Ok(())
}

/// Ends the direction: a FIN frame with the byte count and digest of everything sent, then the
/// stream's own finish.
async fn send_fin(
    send: &mut quinn::SendStream,
    stats: &DirectionStats,
    out: &mut BytesMut,
) -> OutboundEnd {
    out.clear();
    Frame::Fin {
        seq: stats.next_seq(),
        total_bytes: stats.raw_bytes,
        digest: stats.digest(),
    }
    .encode(out);
    if let Err(e) = send.write_all(out).await {
        return OutboundEnd::Failed(Outcome::TunnelError(format!("sending FIN: {e}")));
    }
    let _ = send.finish();
    OutboundEnd::Finished
}

/// Chunks smaller than this are compressed inline; larger ones on the blocking pool, several
/// at a time, so one stream can use every core (DESIGN §6).
const PARALLEL_MIN: usize = 16 * 1024;

/// Chunks being compressed or waiting to be sent, per stream: two per core bounds memory at
/// about 2 × cores × 128 KiB per stream and keeps every core busy.
fn max_chunks_in_flight() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get() * 2)
}

/// One outbound chunk, in sequence order.
enum Encoded {
    Ready(Bytes, Chunk),
    Spawned(tokio::task::JoinHandle<(Bytes, Chunk)>),
}

/// The outbound chunks read but not yet sent, in sequence order: small ones encoded inline,
/// large ones on the blocking pool, at most [`max_chunks_in_flight`] at once.
struct ChunkQueue {
    pending: VecDeque<Encoded>,
    max_in_flight: usize,
    /// The stream's own encoder, for the chunks encoded inline.
    encoder: ChunkEncoder,
    next_seq: u64,
}

impl ChunkQueue {
    /// An empty queue whose first chunk gets `next_seq`; fails on an invalid zstd `level`.
    fn new(level: i32, next_seq: u64) -> std::io::Result<Self> {
        let encoder = ChunkEncoder::new(level)?;
        let max_in_flight = max_chunks_in_flight();
        Ok(Self {
            pending: VecDeque::with_capacity(max_in_flight),
            max_in_flight,
            encoder,
            next_seq,
        })
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether another read may be queued without exceeding the chunks in flight.
    fn has_room(&self) -> bool {
        self.pending.len() < self.max_in_flight
    }

    /// Queues one read from the local socket, cut into chunks of at most [`READ_CHUNK`]
    /// (`read_buf` may return more if the buffer grew), each with the next sequence number.
    fn push(&mut self, data: Bytes, adapt: &LevelControl) {
        let mut at = 0;
        while at < data.len() {
            let raw = data.slice(at..data.len().min(at + READ_CHUNK));
            at += raw.len();
            let seq = self.next_seq;
            self.next_seq += 1;
            if raw.len() < PARALLEL_MIN || self.max_in_flight == 1 {
                // Small chunks (queries, WAL trickle): inline, no hand-off latency.
                let chunk = self.encoder.encode_bytes(seq, &raw);
                self.pending.push_back(Encoded::Ready(raw, chunk));
            } else {
                let level = adapt.level();
                self.pending
                    .push_back(Encoded::Spawned(tokio::task::spawn_blocking(move || {
                        let chunk = match level {
                            Some(level) => {
                                with_thread_encoder(level, |enc| enc.encode_bytes(seq, &raw))
                            }
                            None => frame::raw_chunk(seq, raw.clone()),
                        };
                        (raw, chunk)
                    })));
            }
        }
    }

    /// The front chunk, if it is encoded: the next one to send.
    fn pop_ready(&mut self) -> Option<(Bytes, Chunk)> {
        if !matches!(self.pending.front(), Some(Encoded::Ready(..))) {
            return None;
        }
        let Some(Encoded::Ready(raw, chunk)) = self.pending.pop_front() else {
            unreachable!()
        };
        Some((raw, chunk))
    }

    /// Completes when the front job (spawned) finishes; pending forever otherwise.
    async fn front_job(&mut self) -> Result<(Bytes, Chunk), tokio::task::JoinError> {
        match self.pending.front_mut() {
            Some(Encoded::Spawned(h)) => h.await,
            _ => std::future::pending().await,
        }
    }

    /// Puts the result of [`Self::front_job`] in its job's place.
    fn front_done(
        &mut self,
        done: Result<(Bytes, Chunk), tokio::task::JoinError>,
    ) -> Result<(), tokio::task::JoinError> {
        let Some(Encoded::Spawned(_)) = self.pending.pop_front() else {
            unreachable!()
        };
        let (raw, chunk) = done?;
        self.pending.push_front(Encoded::Ready(raw, chunk));
        Ok(())
    }
}

/// Runs `f` with this blocking-pool thread's zstd encoder for `level` (made once per thread).
fn with_thread_encoder<R>(level: i32, f: impl FnOnce(&mut ChunkEncoder) -> R) -> R {
    thread_local! {
        static ENCODER: std::cell::RefCell<Option<(i32, ChunkEncoder)>> = const { std::cell::RefCell::new(None) };
    }
    ENCODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if !matches!(&*slot, Some((l, _)) if *l == level) {
            // The level was validated when the stream's own encoder was made.
            *slot = Some((level, ChunkEncoder::new(level).expect("valid zstd level")));
        }
        let (_, enc) = slot.as_mut().expect("set above");
        f(enc)
    })
}

async fn inbound(
    recv: &mut quinn::RecvStream,
    writer: &mut (dyn AsyncWrite + Send + Unpin),
    stats: &mut DirectionStats,
    mut buf: BytesMut,
    ack_tx: watch::Sender<u64>,
    opts: &PumpOptions,
) -> Result<(), Outcome> {
    let mut decoder = ChunkDecoder::new();
    loop {
        let frame = match frame::decode(&mut buf) {
            Ok(Some(f)) => f,
            Ok(None) => {
                match recv.read_chunk(READ_CHUNK * 2, true).await {
                    Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                    Ok(None) => {
                        return Err(Outcome::ProtocolViolation(
                            "peer ended the stream without FIN".into(),
                        ))
                    }
                    Err(e) => return Err(Outcome::TunnelError(format!("receiving: {e}"))),
                }
                continue;
            }
            Err(e) => return Err(classify(e)),
        };
        match frame {
            Frame::Data(chunk) => {
                stats.expect_seq(chunk.seq).map_err(classify)?;
                let raw = decoder.decompress(&chunk).map_err(classify)?;
                #[cfg(feature = "test-hooks")]
                let raw = match &opts.fault {
                    Some(f) => f.apply(raw),
                    None => raw,
                };
                #[cfg(not(feature = "test-hooks"))]
                let _ = opts;
                frame::verify(&chunk, &raw).map_err(classify)?;
                // Verified: only now may the bytes reach the local socket.
                writer
                    .write_all(&raw)
                    .await
                    .map_err(|e| Outcome::LocalError(format!("writing local socket: {e}")))?;
                stats.record(&raw, HEADER_LEN + chunk.payload.len());
                let _ = ack_tx.send(stats.next_seq());
            }
            Frame::Fin {
                seq,
                total_bytes,
                digest,
            } => {
                stats
                    .check_fin(seq, total_bytes, &digest)
                    .map_err(classify)?;
                let _ = writer.shutdown().await;
                return Ok(());
            }
            Frame::Reset { code, message, .. } => {
                return Err(Outcome::PeerReset { code, message });
            }
            Frame::Ack { .. } => {}
        }
    }
}

fn classify(e: FrameError) -> Outcome {
    if e.is_integrity() {
        Outcome::IntegrityFailure(e.to_string())
    } else {
        Outcome::ProtocolViolation(e.to_string())
    }
}

/// Reads from `recv` until `decode` yields a value, with leftover bytes kept in `buf`.
pub async fn read_until<T, E: std::fmt::Display>(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    limit: usize,
    mut decode: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
) -> anyhow::Result<T> {
    loop {
        match decode(buf) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => anyhow::bail!("{e}"),
        }
        if buf.len() > limit {
            anyhow::bail!("peer sent more than {limit} bytes without a complete message");
        }
        match recv.read_chunk(limit, true).await? {
            Some(c) => buf.extend_from_slice(&c.bytes),
            None => anyhow::bail!("stream closed before a complete message"),
        }
    }
}

/// Reads the one-byte [`crate::control::StreamKind`] tag that opens every stream.
pub async fn read_tag(recv: &mut quinn::RecvStream, buf: &mut BytesMut) -> anyhow::Result<u8> {
    read_until(recv, buf, 1, |b: &mut BytesMut| {
        Ok::<_, String>((!b.is_empty()).then(|| bytes::Buf::get_u8(b)))
    })
    .await
}

/// Convenience for callers holding `Bytes`.
pub fn to_buf(b: Bytes) -> BytesMut {
    BytesMut::from(&b[..])
}
