//! Typed requests over the control stream, after Hello.
//!
//! ```text
//!   target: ControlClient::request ─► Request{id} ══ control stream ══► source: responder
//!           (pending[id] ◄─ reader) ◄─ Response{id} ◄═══════════════════  └─ runtime::pg on its
//!                                                                            own PostgreSQL link
//! ```
//!
//! The source answers one request at a time, each with fixed statements (no SQL crosses the
//! wire) on its own PostgreSQL connection (`[source] conninfo`), and records each request and
//! its result (never the password or any SQL) in its audit log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::BytesMut;
use tokio::sync::oneshot;
use tracing::{info, warn};

use super::config::SourcePg;
use super::pg;
use super::pump;
use crate::control::{self, ControlMessage, Request, Response, MAX_CONTROL_MESSAGE};

/// The target's side of the control stream: send a request, await its response.
pub struct ControlClient {
    send: tokio::sync::Mutex<quinn::SendStream>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Response>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient").finish_non_exhaustive()
    }
}

impl ControlClient {
    pub(crate) fn new(send: quinn::SendStream) -> Self {
        Self {
            send: tokio::sync::Mutex::new(send),
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }

    /// Sends `request` and waits up to `timeout` for the source's answer.
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Response> {
        request.validate().map_err(|e| anyhow!(e))?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tx);
        let mut out = BytesMut::new();
        control::encode_message(&ControlMessage::Request { id, request }, &mut out)?;
        {
            let mut send = self.send.lock().await;
            send.write_all(&out)
                .await
                .context("sending a request to the source agent")?;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => bail!("the tunnel closed before the source agent answered"),
            Err(_) => {
                self.pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                bail!(
                    "the source agent did not answer within {} s",
                    timeout.as_secs()
                )
            }
        }
    }

    fn deliver(&self, id: u64, response: Response) -> bool {
        match self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        {
            Some(tx) => {
                let _ = tx.send(response);
                true
            }
            None => false,
        }
    }
}

/// Target: reads responses until the stream ends; pending requests then fail.
pub(crate) async fn read_responses(
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
    client
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clear();
}

/// Source: answers requests one at a time until the stream ends.
pub(crate) async fn serve_requests(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
    source_pg: Option<SourcePg>,
    audit: impl Fn(&str, serde_json::Value),
) {
    let mut client: Option<tokio_postgres::Client> = None;
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
            Err(_) => return,
        };
        let ControlMessage::Request { id, request } = msg else {
            warn!("control stream: unexpected message from the target: {msg:?}");
            return;
        };
        let op = serde_json::to_value(&request)
            .ok()
            .and_then(|v| v.get("op").cloned())
            .unwrap_or_default();
        let response = match &source_pg {
            None => Response::Error {
                message: "the source agent has no PostgreSQL control connection: set [source] conninfo (and password_file) or --pg-conninfo".into(),
            },
            Some(cfg) => match ensure_client(&mut client, cfg).await {
                Ok(c) => {
                    let more = || -> pg::ConnectFuture {
                        let cfg = cfg.clone();
                        Box::pin(async move { connect(&cfg).await })
                    };
                    pg::handle_request(c, Some(&more), &request).await
                }
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
        };
        reply_and_audit(&audit, id, &op, &response);
        let mut out = BytesMut::new();
        let response = match control::encode_message(
            &ControlMessage::Response {
                id,
                response: response.clone(),
            },
            &mut out,
        ) {
            Ok(()) => out,
            Err(e) => {
                let mut out = BytesMut::new();
                let _ = control::encode_message(
                    &ControlMessage::Response {
                        id,
                        response: Response::Error {
                            message: format!("answer too large: {e}"),
                        },
                    },
                    &mut out,
                );
                out
            }
        };
        if send.write_all(&response).await.is_err() {
            return;
        }
    }
}

fn reply_and_audit(
    audit: &impl Fn(&str, serde_json::Value),
    id: u64,
    op: &serde_json::Value,
    response: &Response,
) {
    let result = serde_json::to_value(response)
        .ok()
        .and_then(|v| v.get("result").cloned())
        .unwrap_or_default();
    let mut details = serde_json::json!({"id": id, "op": op, "result": result});
    if let Response::Error { message } = response {
        details["message"] = message.clone().into();
    }
    info!(
        "control request {id} {}: {}",
        op.as_str().unwrap_or("?"),
        result.as_str().unwrap_or("?")
    );
    audit("control_request", details);
}

/// The cached connection, (re)connecting when there is none or it has closed.
async fn ensure_client<'a>(
    slot: &'a mut Option<tokio_postgres::Client>,
    cfg: &SourcePg,
) -> Result<&'a tokio_postgres::Client> {
    if slot.as_ref().is_none_or(|c| c.is_closed()) {
        *slot = Some(connect(cfg).await?);
    }
    Ok(slot.as_ref().expect("set above"))
}

/// Whether the last control connection that worked came from [`crate::fence::CONTROL_ADDR`]
/// (the source is fenced): the next one tries that route first.
static FROM_CONTROL_ADDR: AtomicBool = AtomicBool::new(false);

/// Opens a control connection: the ordinary route of `[source] conninfo`, or — when PostgreSQL
/// refuses it in `pg_hba.conf` (SQLSTATE 28000), as a fenced source does — from pgferry's own
/// loopback address, which the fenced file admits for this role (a source agent restarted
/// while the source is fenced can still unfence it).
async fn connect(cfg: &SourcePg) -> Result<tokio_postgres::Client> {
    let mut pgc: tokio_postgres::Config = cfg
        .conninfo
        .parse()
        .context("[source] conninfo is not a valid connection string")?;
    if let Some(path) = &cfg.password_file {
        pgc.password(super::config::read_password_file(path)?);
    }
    pgc.connect_timeout(Duration::from_secs(10));
    let refused_by_hba = |e: &tokio_postgres::Error| {
        e.code() == Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    };
    if FROM_CONTROL_ADDR.load(Ordering::SeqCst) {
        match super::fence::connect_from_control_addr(&pgc).await {
            Ok(c) => return Ok(c),
            // Unfenced since: the ordinary route again.
            Err(_) => FROM_CONTROL_ADDR.store(false, Ordering::SeqCst),
        }
    }
    match pgc.connect(tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    warn!("source PostgreSQL control connection: {e}");
                }
            });
            Ok(client)
        }
        Err(e) if refused_by_hba(&e) => {
            match super::fence::connect_from_control_addr(&pgc).await {
                Ok(c) => {
                    FROM_CONTROL_ADDR.store(true, Ordering::SeqCst);
                    info!(
                        "control connection from {} (pg_hba.conf refuses the ordinary route: the source is fenced)",
                        crate::fence::CONTROL_ADDR
                    );
                    Ok(c)
                }
                Err(e2) => Err(anyhow::Error::new(e).context(format!(
                    "connecting to the source PostgreSQL for control requests (also tried from {}: {e2:#})",
                    crate::fence::CONTROL_ADDR
                ))),
            }
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context("connecting to the source PostgreSQL for control requests"))
        }
    }
}
