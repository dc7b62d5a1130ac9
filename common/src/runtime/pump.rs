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
//! * The receiver acknowledges chunks cumulatively (ACK): a chunk is acknowledged once it is
//!   verified and held by the receiver for delivery.
//! * **Resumable streams** ([`pump_resumable`]): the sender keeps every frame until it is
//!   acknowledged (at most [`RESUME_BUFFER`] bytes per stream; reading the local socket waits
//!   for ACKs beyond that). When the connection under the stream is lost, the pump holds the
//!   local connection and asks its agent for a replacement stream over a new connection
//!   ([`Reattach`], within a grace period). Both ends then send one ACK with the next chunk they
//!   expect (`+1` once the direction's FIN arrived) and resend what the other lacks, so each
//!   direction continues byte for byte: same sequence numbers, same direction digest in the
//!   FIN. Every await point is safe to abandon: a chunk is kept before it is written, and an
//!   inbound chunk is counted once verified and delivered from memory, however many writes it
//!   takes.
//!
//! ```text
//!   connection lost ─► park (local socket held, nothing read) ─► Reattach::reattach ─► new stream
//!     ─► ACK(next I expect) ⇄ ACK(next they expect) ─► resend unacknowledged ─► go on
//! ```

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::frame::{
    self, Chunk, ChunkDecoder, ChunkEncoder, DirectionStats, Frame, FrameError, PrefixHasher,
    ResetCode, HEADER_LEN,
};
use crate::level::{level_name, SharedLevel};

/// Largest read from the local socket, i.e. the largest chunk we produce. 128 KiB keeps zstd's
/// ratio within 1–2 % of 1 MiB chunks on our sample data while bounding per-stream memory.
pub const READ_CHUNK: usize = 128 * 1024;

/// Send an ACK after this many delivered chunks (and at the end of the direction).
const ACK_EVERY: u64 = 32;

/// Most bytes of sent, unacknowledged frames a resumable stream keeps per direction. The peer
/// acknowledges every [`ACK_EVERY`] chunks (at most 4 MiB of them), so this never limits the
/// rate below 16 MiB per round trip; it bounds what an outage can make a stream hold.
pub const RESUME_BUFFER: usize = 16 * 1024 * 1024;

/// Longest wait for the peer's ACK that opens a resumed stream.
const RESUME_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A replacement for a lost stream: its halves and the bytes already read after its header.
pub struct Streams {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
    pub buf: BytesMut,
}

/// A boxed future (the [`Reattach`] methods are called through `dyn`).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a resumable stream needs from its agent.
pub trait Reattach: Send {
    /// A new stream for this forwarded connection over a new connection, or why there is
    /// none (the grace period passed, the peer agent restarted, shutdown). Called each time
    /// the stream under the pump is lost.
    fn reattach(&mut self) -> BoxFuture<'_, Result<Streams, String>>;
    /// Told after each resumption (for the audit log).
    fn resumed(&mut self, r: &Resumption);
}

/// One resumption of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resumption {
    /// From the loss to the resumed stream.
    pub gap_ms: u64,
    /// Why the stream was lost.
    pub cause: String,
    /// Frames (DATA and FIN) sent again, and their bytes on the wire.
    pub resent_frames: u64,
    pub resent_bytes: u64,
    /// The first chunk the peer still needed from us, and the first we needed from it.
    pub peer_expected: u64,
    pub we_expected: u64,
}

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
    /// The QUIC connection under the stream was lost (timed out, closed, reset): the only
    /// ending a resumable stream survives. Audited as `tunnel_error`.
    ConnectionLost(String),
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
            Self::TunnelError(_) | Self::ConnectionLost(_) => "tunnel_error",
        }
    }
    /// Human detail, empty for `Ok`.
    pub fn detail(&self) -> String {
        match self {
            Self::Ok => String::new(),
            Self::IntegrityFailure(m)
            | Self::ProtocolViolation(m)
            | Self::LocalError(m)
            | Self::TunnelError(m)
            | Self::ConnectionLost(m) => m.clone(),
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
    /// How many times the stream was resumed over a new connection.
    pub resumptions: u32,
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
    /// zstd level for outbound chunks (the highest the level control uses).
    pub compression_level: i32,
    /// The level control of large outbound chunks, shared by all of this agent's streams.
    pub level_control: SharedLevel,
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
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    inbound_buf: BytesMut,
    opts: &PumpOptions,
) -> StreamReport {
    pump_resumable(local, send, recv, inbound_buf, opts, None).await
}

/// [`pump`], resumable over a new connection through `reattach` (see the module doc).
pub async fn pump_resumable(
    local: LocalConn,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut inbound_buf: BytesMut,
    opts: &PumpOptions,
    mut reattach: Option<&mut dyn Reattach>,
) -> StreamReport {
    let started = Instant::now();
    let LocalConn {
        mut reader,
        mut writer,
        abort_handle,
    } = local;
    let mut sent = DirectionStats::default();
    let mut received = DirectionStats::default();
    let chans = Channels::new();
    let mut out = match Out::new(
        opts.compression_level,
        opts.level_control.clone(),
        reattach.is_some(),
    ) {
        Ok(o) => o,
        Err(e) => {
            let outcome = Outcome::LocalError(format!("zstd: {e}"));
            send_reset(&mut send, 0, ResetCode::UpstreamReset, &outcome.detail()).await;
            return StreamReport {
                outcome,
                sent,
                received,
                started,
                resumptions: 0,
            };
        }
    };
    let mut inn = In::default();
    let mut resumptions = 0;
    let outcome = loop {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let (out_end, in_res) = {
            let outbound = out.run(&mut reader, &mut send, &mut sent, &chans, cancel_rx);
            let inbound = inn.run(
                &mut recv,
                &mut writer,
                &mut received,
                &mut inbound_buf,
                &chans,
                opts,
            );
            run_both(outbound, inbound, cancel_tx).await
        };
        let outcome = match (in_res, out_end) {
            (Err(o), _) => o,
            (Ok(()), OutboundEnd::Failed(o)) => o,
            (Ok(()), _) => Outcome::Ok,
        };
        let (Outcome::ConnectionLost(cause), Some(r)) = (&outcome, reattach.as_deref_mut()) else {
            break outcome;
        };
        // The connection under the stream is gone: hold the local connection and wait for a
        // new stream, as long as the agent allows.
        let cause = cause.clone();
        let mut cur = Streams {
            send,
            recv,
            buf: inbound_buf,
        };
        let resumed =
            reattach_and_resume(r, &cause, &mut cur, &mut out, &inn, &sent, &received).await;
        Streams {
            send,
            recv,
            buf: inbound_buf,
        } = cur;
        match resumed {
            Ok(()) => resumptions += 1,
            Err(end) => break end,
        }
    };
    end_stream(&outcome, &mut send, &mut recv, sent.next_seq()).await;
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
        resumptions,
    }
}

/// After the connection under a stream was lost: new streams from `r` until one resumes
/// (`cur` is then the resumed stream), or the final outcome.
async fn reattach_and_resume(
    r: &mut dyn Reattach,
    cause: &str,
    cur: &mut Streams,
    out: &mut Out,
    inn: &In,
    sent: &DirectionStats,
    received: &DirectionStats,
) -> Result<(), Outcome> {
    let lost = Instant::now();
    loop {
        *cur = r
            .reattach()
            .await
            .map_err(|why| Outcome::TunnelError(format!("{cause}; not resumed: {why}")))?;
        match resume(
            &mut cur.send,
            &mut cur.recv,
            &mut cur.buf,
            out,
            inn,
            sent,
            received,
        )
        .await
        {
            Ok(mut done) => {
                done.gap_ms = lost.elapsed().as_millis() as u64;
                done.cause = cause.to_string();
                r.resumed(&done);
                return Ok(());
            }
            // Lost again before it could resume: wait for the next connection.
            Err(Outcome::ConnectionLost(_)) => continue,
            Err(other) => return Err(other),
        }
    }
}

/// Ends both halves of the stream as `outcome` says: FIN done and waited for, or RESET with
/// the reason.
async fn end_stream(
    outcome: &Outcome,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    next_seq: u64,
) {
    match outcome {
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
            send_reset(send, next_seq, code, m).await;
            let c = if code == ResetCode::IntegrityFailure {
                codes::INTEGRITY
            } else {
                codes::PROTOCOL
            };
            let _ = recv.stop(c.into());
        }
        Outcome::LocalError(m) => {
            send_reset(send, next_seq, ResetCode::UpstreamReset, m).await;
            let _ = recv.stop(codes::LOCAL.into());
        }
        Outcome::PeerReset { .. } | Outcome::TunnelError(_) | Outcome::ConnectionLost(_) => {
            let _ = send.reset(codes::DONE.into());
            let _ = recv.stop(codes::DONE.into());
        }
    }
}

/// The channels between the two directions of one pump, for its whole life (every attempt).
struct Channels {
    /// Inbound → outbound: the next chunk we expect (ACKs to send).
    ack_tx: watch::Sender<u64>,
    /// Inbound → outbound: the next chunk the peer expects (its ACKs).
    peer_ack_tx: watch::Sender<u64>,
    /// Inbound → outbound: the peer's FIN arrived (the outbound's ACKs are no longer needed).
    in_done_tx: watch::Sender<bool>,
}

impl Channels {
    fn new() -> Self {
        Self {
            ack_tx: watch::channel(0).0,
            peer_ack_tx: watch::channel(0).0,
            in_done_tx: watch::channel(false).0,
        }
    }
}

impl Resumption {
    /// The `stream_resumed` audit record of this resumption.
    pub fn record(
        &self,
        session_id: u64,
        service: &str,
        peer_fingerprint: Option<String>,
    ) -> crate::audit::event::StreamResumed {
        crate::audit::event::StreamResumed {
            session_id: format!("{session_id:016x}"),
            service: service.to_string(),
            gap_ms: self.gap_ms,
            cause: self.cause.clone(),
            resent_frames: self.resent_frames,
            resent_bytes: self.resent_bytes,
            peer_expected: self.peer_expected,
            we_expected: self.we_expected,
            peer_fingerprint,
        }
    }
}

/// Opens a resumed stream: our ACK (the next chunk we expect, `+1` once the peer's FIN arrived),
/// the peer's, then the frames it lacks sent again.
async fn resume(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    out: &mut Out,
    inn: &In,
    sent: &DirectionStats,
    received: &DirectionStats,
) -> Result<Resumption, Outcome> {
    let lost = |e: String| Outcome::ConnectionLost(e);
    let we_expected = received.next_seq() + u64::from(inn.done);
    let mut ack = BytesMut::new();
    Frame::Ack {
        next_seq: we_expected,
    }
    .encode(&mut ack);
    send.write_all(&ack)
        .await
        .map_err(|e| lost(format!("resuming: {e}")))?;
    let first = tokio::time::timeout(
        RESUME_HANDSHAKE_TIMEOUT,
        read_until(
            recv,
            buf,
            HEADER_LEN + frame::MAX_WIRE_LEN as usize,
            frame::decode,
        ),
    )
    .await
    .map_err(|_| lost("resuming: no ACK from the peer within 30 s".into()))?
    .map_err(|e| lost(format!("resuming: {e:#}")))?;
    let peer_expected = match first {
        Frame::Ack { next_seq } => next_seq,
        Frame::Reset { code, message, .. } => return Err(Outcome::PeerReset { code, message }),
        other => {
            return Err(Outcome::ProtocolViolation(format!(
                "a resumed stream must open with ACK, not {other:?}"
            )))
        }
    };
    let (resent_frames, resent_bytes) = out
        .resend_from(send, peer_expected, sent.next_seq())
        .await?;
    out.last_acked = we_expected;
    out.acks_stopped = false;
    Ok(Resumption {
        gap_ms: 0,
        cause: String::new(),
        resent_frames,
        resent_bytes,
        peer_expected,
        we_expected,
    })
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

/// The outbound direction's state, kept across the attempts of a resumable stream.
struct Out {
    queue: ChunkQueue,
    adapt: SharedLevel,
    buf: BytesMut,
    scratch: BytesMut,
    /// The last ACK value we sent.
    last_acked: u64,
    eof: bool,
    fin_sent: bool,
    /// Resumable: frames kept until acknowledged.
    keep: bool,
    /// The peer stopped reading after our FIN (its pump ended): no more ACKs on this stream.
    acks_stopped: bool,
    /// Sent, unacknowledged frames: sequence number (a FIN has the number after the last
    /// chunk), header, payload.
    unacked: VecDeque<(u64, Bytes, Bytes)>,
    unacked_bytes: usize,
}

impl Out {
    fn new(level: i32, adapt: SharedLevel, keep: bool) -> std::io::Result<Self> {
        Ok(Self {
            queue: ChunkQueue::new(level, 0)?,
            adapt,
            buf: BytesMut::with_capacity(READ_CHUNK),
            scratch: BytesMut::with_capacity(64),
            last_acked: 0,
            eof: false,
            fin_sent: false,
            keep,
            acks_stopped: false,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
        })
    }

    /// Drops the frames the peer has acknowledged (`next` is the first it still needs).
    fn trim(&mut self, next: u64) {
        while let Some((seq, h, p)) = self.unacked.front() {
            if *seq >= next {
                break;
            }
            self.unacked_bytes -= h.len() + p.len();
            self.unacked.pop_front();
        }
    }

    /// Keeps a frame (resumable streams) before it is written, so that abandoning the write
    /// loses nothing.
    fn keep_frame(&mut self, seq: u64, header: &Bytes, payload: &Bytes) {
        if self.keep {
            self.unacked_bytes += header.len() + payload.len();
            self.unacked
                .push_back((seq, header.clone(), payload.clone()));
        }
    }

    /// After a reconnect, the peer needs everything from chunk `next` on (a FIN counts as the
    /// chunk after the last): drops what it has, checks that the rest is all here.
    fn resume_at(&mut self, next: u64, sent_next: u64) -> Result<(), Outcome> {
        let end = sent_next + u64::from(self.fin_sent);
        if next > end {
            return Err(Outcome::ProtocolViolation(format!(
                "cannot resume: the peer acknowledges chunk {next}, only {end} were sent"
            )));
        }
        self.trim(next);
        let oldest = self.unacked.front().map_or(end, |f| f.0);
        if oldest != next {
            return Err(Outcome::ProtocolViolation(format!(
                "cannot resume: the peer needs chunk {next}, the oldest kept is {oldest}"
            )));
        }
        Ok(())
    }

    /// After a reconnect: the peer needs everything from chunk `next` on; sends it again.
    async fn resend_from(
        &mut self,
        send: &mut quinn::SendStream,
        next: u64,
        sent_next: u64,
    ) -> Result<(u64, u64), Outcome> {
        self.resume_at(next, sent_next)?;
        let (mut frames, mut bytes) = (0, 0);
        for (_, h, p) in &self.unacked {
            let r = if p.is_empty() {
                send.write_all(h).await
            } else {
                send.write_all_chunks(&mut [h.clone(), p.clone()])
                    .await
                    .map(drop)
            };
            r.map_err(|e| write_failed("resending", e))?;
            frames += 1;
            bytes += (h.len() + p.len()) as u64;
        }
        Ok((frames, bytes))
    }

    /// One attempt of the outbound direction: reads the local socket, sends each read as DATA
    /// frames in sequence order (compressed inline or on the blocking pool, see
    /// [`ChunkQueue`]), acknowledges what the inbound side received, and sends FIN at EOF. A
    /// resumable stream then keeps acknowledging until the peer's FIN arrived.
    async fn run(
        &mut self,
        reader: &mut (dyn AsyncRead + Send + Unpin),
        send: &mut quinn::SendStream,
        stats: &mut DirectionStats,
        chans: &Channels,
        mut cancel_rx: watch::Receiver<bool>,
    ) -> OutboundEnd {
        let mut ack_rx = chans.ack_tx.subscribe();
        let mut peer_ack_rx = chans.peer_ack_tx.subscribe();
        let mut in_done_rx = chans.in_done_tx.subscribe();
        loop {
            let peer_next = *peer_ack_rx.borrow_and_update();
            self.trim(peer_next);
            if self.fin_sent {
                if !self.keep || *in_done_rx.borrow() {
                    return OutboundEnd::Finished;
                }
            } else {
                // Send every frame that is ready, in sequence order.
                while let Some((raw, chunk)) = self.queue.pop_ready() {
                    if let Err(end) = self.send_chunk(send, stats, chunk).await {
                        return end;
                    }
                    if let Some(c) = self.adapt.sent(raw.len(), Instant::now()) {
                        let (from, to) = (level_name(c.from), level_name(c.to));
                        tracing::debug!(
                            "compression level {from} → {to} ({:.1} MB/s at {from})",
                            c.rate / 1e6
                        );
                    }
                }
                if self.eof && self.queue.is_empty() {
                    if let Err(end) = self.send_fin(send, stats).await {
                        return end;
                    }
                    continue;
                }
            }
            let room = !self.keep || self.unacked_bytes < RESUME_BUFFER;
            let can_read = !self.fin_sent && !self.eof && self.queue.has_room() && room;
            let waiting = !self.fin_sent && !self.queue.is_empty();
            if self.buf.capacity() < READ_CHUNK {
                self.buf.reserve(READ_CHUNK);
            }
            tokio::select! {
                biased;
                _ = cancel_rx.changed() => return OutboundEnd::Cancelled,
                done = self.queue.front_job(), if waiting => {
                    if let Err(e) = self.queue.front_done(done) {
                        return OutboundEnd::Failed(Outcome::LocalError(format!("compression task: {e}")))
                    }
                }
                r = reader.read_buf(&mut self.buf), if can_read => match r {
                    Ok(0) => self.eof = true,
                    Ok(_) => self.queue.push(self.buf.split().freeze(), &self.adapt),
                    Err(e) => {
                        return OutboundEnd::Failed(Outcome::LocalError(format!("reading local socket: {e}")))
                    }
                },
                _ = ack_rx.changed() => {
                    let next = *ack_rx.borrow_and_update();
                    // Once the peer's FIN is here nothing is left to acknowledge (a resumed
                    // stream opens with its own ACK).
                    if *in_done_rx.borrow() || self.acks_stopped {
                        continue;
                    }
                    if next >= self.last_acked + ACK_EVERY {
                        self.last_acked = next;
                        self.scratch.clear();
                        Frame::Ack { next_seq: next }.encode(&mut self.scratch);
                        if let Err(e) = send.write_all(&self.scratch).await {
                            let failed = write_failed("sending", e);
                            if self.fin_sent && !matches!(failed, Outcome::ConnectionLost(_)) {
                                // The peer has all of ours and its pump ended (it stopped
                                // reading): its FIN is on the way; no more ACKs.
                                self.acks_stopped = true;
                                continue;
                            }
                            return OutboundEnd::Failed(failed);
                        }
                    }
                }
                _ = peer_ack_rx.changed(), if self.keep => {}
                _ = in_done_rx.changed(), if self.keep && self.fin_sent => {}
            }
        }
    }

    /// Sends one encoded chunk as a DATA frame and counts it in `stats`. Header and payload go
    /// to quinn as two buffers: the payload is not copied again.
    async fn send_chunk(
        &mut self,
        send: &mut quinn::SendStream,
        stats: &mut DirectionStats,
        chunk: Chunk,
    ) -> Result<(), OutboundEnd> {
        let mut header = BytesMut::with_capacity(HEADER_LEN);
        Frame::encode_data_header(&chunk, &mut header);
        let header = header.freeze();
        self.keep_frame(chunk.seq, &header, &chunk.payload);
        stats.record_sent(&chunk, HEADER_LEN + chunk.payload.len());
        if let Err(e) = send.write_all_chunks(&mut [header, chunk.payload]).await {
            return Err(OutboundEnd::Failed(write_failed("sending", e)));
        }
        Ok(())
    }

    /// Ends the direction: a FIN frame with the byte count and digest of everything sent.
    async fn send_fin(
        &mut self,
        send: &mut quinn::SendStream,
        stats: &DirectionStats,
    ) -> Result<(), OutboundEnd> {
        let mut fin = BytesMut::new();
        Frame::Fin {
            seq: stats.next_seq(),
            total_bytes: stats.raw_bytes,
            digest: stats.digest(),
        }
        .encode(&mut fin);
        let fin = fin.freeze();
        self.keep_frame(stats.next_seq(), &fin, &Bytes::new());
        self.fin_sent = true;
        if let Err(e) = send.write_all(&fin).await {
            return Err(OutboundEnd::Failed(write_failed("sending FIN", e)));
        }
        if !self.keep {
            let _ = send.finish();
        }
        Ok(())
    }
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
    /// Gives each chunk its digest, in sequence order, as it is queued: the one BLAKE3 pass
    /// over the direction's bytes on this side.
    sealer: PrefixHasher,
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
            sealer: PrefixHasher::new(),
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
    fn push(&mut self, data: Bytes, adapt: &SharedLevel) {
        let mut at = 0;
        while at < data.len() {
            let raw = data.slice(at..data.len().min(at + READ_CHUNK));
            at += raw.len();
            let seq = self.next_seq;
            self.next_seq += 1;
            let digest = self.sealer.seal(&raw);
            if raw.len() < PARALLEL_MIN || self.max_in_flight == 1 {
                // Small chunks (queries, WAL trickle): inline, no hand-off latency.
                let chunk = self.encoder.encode_bytes(seq, &raw, digest);
                self.pending.push_back(Encoded::Ready(raw, chunk));
            } else if let Some(level) = adapt.level() {
                self.pending
                    .push_back(Encoded::Spawned(tokio::task::spawn_blocking(move || {
                        let chunk =
                            with_thread_encoder(level, |enc| enc.encode_bytes(seq, &raw, digest));
                        (raw, chunk)
                    })));
            } else {
                // RAW: nothing left to compute (the digest is above), so no hand-off to the
                // blocking pool and back (two thread wake-ups per chunk).
                let chunk = frame::raw_chunk(seq, raw.clone(), digest);
                self.pending.push_back(Encoded::Ready(raw, chunk));
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

/// The inbound direction's state, kept across the attempts of a resumable stream.
#[derive(Default)]
struct In {
    decoder: ChunkDecoder,
    /// A verified chunk (counted as received) not yet fully written to the local socket, and
    /// how much of it was.
    pending: Option<(Bytes, usize)>,
    /// The peer's FIN arrived and was checked.
    done: bool,
}

impl In {
    /// One attempt of the inbound direction: decodes, checks and delivers frames until the
    /// peer's FIN.
    async fn run(
        &mut self,
        recv: &mut quinn::RecvStream,
        writer: &mut (dyn AsyncWrite + Send + Unpin),
        stats: &mut DirectionStats,
        buf: &mut BytesMut,
        chans: &Channels,
        opts: &PumpOptions,
    ) -> Result<(), Outcome> {
        loop {
            // Finish delivering the chunk in hand first (a write can be abandoned midway).
            while let Some((raw, written)) = &mut self.pending {
                if *written == raw.len() {
                    self.pending = None;
                    let _ = chans.ack_tx.send(stats.next_seq());
                    break;
                }
                let n = writer
                    .write(&raw[*written..])
                    .await
                    .map_err(|e| Outcome::LocalError(format!("writing local socket: {e}")))?;
                if n == 0 {
                    return Err(Outcome::LocalError("writing local socket: closed".into()));
                }
                *written += n;
            }
            if self.done {
                return Ok(());
            }
            let frame = match frame::decode(buf) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    match recv.read_chunk(READ_CHUNK * 2, true).await {
                        Ok(Some(c)) => buf.extend_from_slice(&c.bytes),
                        Ok(None) => {
                            return Err(Outcome::ProtocolViolation(
                                "peer ended the stream without FIN".into(),
                            ))
                        }
                        Err(e) => {
                            let lost = matches!(e, quinn::ReadError::ConnectionLost(_));
                            let m = format!("receiving: {e}");
                            return Err(if lost {
                                Outcome::ConnectionLost(m)
                            } else {
                                Outcome::TunnelError(m)
                            });
                        }
                    }
                    continue;
                }
                Err(e) => return Err(classify(e)),
            };
            match frame {
                Frame::Data(chunk) => {
                    stats.expect_seq(chunk.seq).map_err(classify)?;
                    let raw = self.decoder.decompress(&chunk).map_err(classify)?;
                    #[cfg(feature = "test-hooks")]
                    let raw = match &opts.fault {
                        Some(f) => f.apply(raw),
                        None => raw,
                    };
                    #[cfg(not(feature = "test-hooks"))]
                    let _ = opts;
                    // The chunk's digest against the running hash of this direction.
                    stats
                        .accept(&chunk, &raw, HEADER_LEN + chunk.payload.len())
                        .map_err(classify)?;
                    // Verified: only now may the bytes reach the local socket.
                    self.pending = Some((raw, 0));
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
                    self.done = true;
                    let _ = chans.in_done_tx.send(true);
                    let _ = chans.ack_tx.send(stats.next_seq() + 1);
                    return Ok(());
                }
                Frame::Reset { code, message, .. } => {
                    return Err(Outcome::PeerReset { code, message });
                }
                Frame::Ack { next_seq } => {
                    chans.peer_ack_tx.send_if_modified(|v| {
                        let newer = next_seq > *v;
                        if newer {
                            *v = next_seq;
                        }
                        newer
                    });
                }
            }
        }
    }
}

/// A failed write: the connection lost (resumable) or the stream ended by the peer (not).
fn write_failed(what: &str, e: quinn::WriteError) -> Outcome {
    let m = format!("{what}: {e}");
    match e {
        quinn::WriteError::ConnectionLost(_) => Outcome::ConnectionLost(m),
        _ => Outcome::TunnelError(m),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn out_with(seqs: std::ops::Range<u64>, fin: bool) -> Out {
        let mut o = Out::new(3, SharedLevel::new(3), true).unwrap();
        for seq in seqs.clone() {
            o.keep_frame(seq, &Bytes::from_static(b"h"), &Bytes::from(vec![0; 10]));
        }
        if fin {
            o.keep_frame(seqs.end, &Bytes::from_static(b"fin"), &Bytes::new());
            o.fin_sent = true;
        }
        o
    }

    #[test]
    fn resuming_keeps_exactly_what_the_peer_lacks() {
        // Chunks 5..10 kept (0..5 acknowledged), no FIN: the peer may need any of 5..=10.
        let mut o = out_with(5..10, false);
        assert_eq!(o.unacked_bytes, 5 * 11);
        o.resume_at(7, 10).unwrap();
        assert_eq!(o.unacked.iter().map(|f| f.0).collect::<Vec<_>>(), [7, 8, 9]);
        assert_eq!(o.unacked_bytes, 3 * 11);
        // Everything arrived: nothing to send again.
        o.resume_at(10, 10).unwrap();
        assert!(o.unacked.is_empty() && o.unacked_bytes == 0);
    }

    #[test]
    fn resuming_refuses_a_peer_that_claims_too_much_or_too_little() {
        let mut o = out_with(5..10, false);
        // Beyond what was sent.
        let e = o.resume_at(11, 10).unwrap_err();
        assert!(matches!(e, Outcome::ProtocolViolation(m) if m.contains("only 10")));
        // Behind what we still keep (acknowledged before, so dropped).
        let e = o.resume_at(3, 10).unwrap_err();
        assert!(matches!(e, Outcome::ProtocolViolation(m) if m.contains("oldest kept is 5")));
    }

    #[test]
    fn a_fin_is_kept_until_the_peer_says_it_arrived() {
        let mut o = out_with(0..3, true);
        // The peer has the 3 chunks but not the FIN (seq 3): only the FIN goes again.
        o.resume_at(3, 3).unwrap();
        assert_eq!(o.unacked.len(), 1);
        assert_eq!(&o.unacked[0].1[..], b"fin");
        // It has the FIN too (3 + 1).
        o.resume_at(4, 3).unwrap();
        assert!(o.unacked.is_empty());
        assert!(o.resume_at(5, 3).is_err());
    }

    #[test]
    fn streams_that_cannot_resume_keep_nothing() {
        let mut o = Out::new(3, SharedLevel::new(3), false).unwrap();
        o.keep_frame(0, &Bytes::from_static(b"h"), &Bytes::from_static(b"p"));
        assert!(o.unacked.is_empty() && o.unacked_bytes == 0);
    }
}
