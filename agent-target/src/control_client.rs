//! The target's side of the control stream: typed requests to the source agent, each with an
//! id, and the task that matches the source's responses to them.
//!
//! ```text
//!   ControlClient::request ─► Request{id} ══ control stream ══► source agent
//!   (pending[id] ◄─ read_responses) ◄─ Response{id} ◄═══════════
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use bytes::BytesMut;
use tokio::sync::oneshot;
use tracing::warn;

use pgferry_common::control::{self, ControlMessage, Request, Response, MAX_CONTROL_MESSAGE};
use pgferry_common::runtime::pump;

/// The tunnel to the source agent is down: no connection is up, or the one a request went
/// over ended before its answer. Unlike an answer or an error of the source agent, waiting for
/// the tunnel cures it (the agent copy waits out an outage of any length on it).
#[derive(Debug)]
pub struct TunnelDown(pub String);

impl std::fmt::Display for TunnelDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TunnelDown {}

impl TunnelDown {
    /// Whether `e` (or an error it wraps) is a [`TunnelDown`].
    pub fn is(e: &anyhow::Error) -> bool {
        e.chain().any(|c| c.is::<TunnelDown>())
    }
}

fn closed() -> anyhow::Error {
    TunnelDown("the tunnel closed before the source agent answered".into()).into()
}

/// The target's side of the control stream: send a request, await its response.
pub struct ControlClient {
    send: tokio::sync::Mutex<quinn::SendStream>,
    /// Requests waiting for their answer; `None` once the connection has ended, so that a
    /// request can never wait for an answer that cannot come.
    pending: Mutex<Option<HashMap<u64, oneshot::Sender<Response>>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient").finish_non_exhaustive()
    }
}

impl ControlClient {
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send: tokio::sync::Mutex::new(send),
            pending: Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends `request` and waits up to `timeout` for the source's answer.
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Response> {
        request.validate().map_err(|e| anyhow!(e))?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        match self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(pending) => pending.insert(id, tx),
            None => return Err(closed()),
        };
        let mut out = BytesMut::new();
        control::encode_message(&ControlMessage::Request { id, request }, &mut out)?;
        {
            let mut send = self.send.lock().await;
            send.write_all(&out)
                .await
                .map_err(|e| TunnelDown(format!("sending a request to the source agent: {e}")))?;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(closed()),
            Err(_) => {
                if let Some(pending) = self
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_mut()
                {
                    pending.remove(&id);
                }
                bail!(
                    "the source agent did not answer within {} s",
                    timeout.as_secs()
                )
            }
        }
    }

    fn deliver(&self, id: u64, response: Response) -> bool {
        let tx = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .and_then(|p| p.remove(&id));
        match tx {
            Some(tx) => {
                let _ = tx.send(response);
                true
            }
            None => false,
        }
    }

    /// The connection under the control stream has ended: every waiting request fails now
    /// (its sender is dropped) and later ones fail at once, instead of waiting out their
    /// timeout for an answer that cannot come.
    pub fn close(&self) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

/// Reads responses until the stream ends; pending requests then fail.
pub async fn read_responses(
    client: std::sync::Arc<ControlClient>,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
) {
    loop {
        let msg = match pump::read_until(
            &mut recv,
            &mut buf,
            MAX_CONTROL_MESSAGE + 4,
            control::decode_message,
        )
        .await
        {
            Ok(m) => m,
            Err(_) => break,
        };
        match msg {
            ControlMessage::Response { id, response } => {
                if !client.deliver(id, response) {
                    warn!("control stream: response to unknown request {id} ignored");
                }
            }
            other => {
                warn!("control stream: unexpected message from the source: {other:?}");
                break;
            }
        }
    }
    // Dropping the senders makes every waiting request fail with "tunnel closed".
    client.close();
}
