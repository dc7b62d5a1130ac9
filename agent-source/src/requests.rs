//! The source's side of the control stream: typed requests from the target, answered one at
//! a time with fixed statements (no SQL crosses the wire) on the agent's own PostgreSQL
//! connection (`[source] conninfo`). Each request and its result (never the password or any
//! SQL) go to the audit log.
//!
//! ```text
//!   target: ControlClient::request ─► Request{id} ══ control stream ══► serve_requests
//!                                   ◄─ Response{id} ◄═══════════════════  └─ crate::pg on its
//!                                                                            own PostgreSQL link
//! ```

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::BytesMut;
use tracing::{info, warn};

use crate::config::SourcePg;
use pgferry_common::audit::event::{self, AuditEvent, ControlRequestAnswered};
use pgferry_common::control::{self, ControlMessage, Response, MAX_CONTROL_MESSAGE};
use pgferry_common::runtime::digest::ConnectFuture;
use pgferry_common::runtime::pump;

/// Source: answers requests one at a time until the stream ends.
pub async fn serve_requests(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    mut buf: BytesMut,
    source_pg: Option<SourcePg>,
    backup: crate::backup::SharedBackup,
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
                Ok(c) => match (&request, request.validate()) {
                    (_, Err(message)) => Response::Error { message },
                    (control::Request::BackupStart { label }, _) => {
                        crate::backup::start(&backup, c, connect(cfg), label)
                            .await
                            .map(|plan| Response::BackupStarted { plan })
                            .unwrap_or_else(|e| Response::Error {
                                message: format!("{e:#}"),
                            })
                    }
                    (control::Request::BackupStop { id }, _) => {
                        match crate::backup::stop(&backup, *id).await {
                            Ok(((label, tablespace_map, end_lsn), record)) => {
                                if let Some(r) = record {
                                    audit(event::BaseCopyServed::NAME, event::details(&r));
                                }
                                Response::BackupStopped {
                                    label,
                                    tablespace_map,
                                    end_lsn,
                                }
                            }
                            Err(e) => Response::Error {
                                message: format!("{e:#}"),
                            },
                        }
                    }
                    (control::Request::FileDigests { id, paths, lengths }, _) => {
                        crate::backup::digests(&backup, *id, paths, lengths)
                            .await
                            .map(|digests| Response::FileDigests { digests })
                            .unwrap_or_else(|e| Response::Error {
                                message: format!("{e:#}"),
                            })
                    }
                    (control::Request::RangeDigests { id, path }, _) => {
                        crate::backup::range_digests(&backup, *id, path)
                            .await
                            .map(|(size, range, blake3)| Response::RangeDigests {
                                size,
                                range,
                                blake3,
                            })
                            .unwrap_or_else(|e| Response::Error {
                                message: format!("{e:#}"),
                            })
                    }
                    _ => {
                        let more = || -> ConnectFuture {
                            let cfg = cfg.clone();
                            Box::pin(async move { connect(&cfg).await })
                        };
                        crate::pg::handle_request(c, Some(&more), &request).await
                    }
                },
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
    let record = ControlRequestAnswered {
        id,
        op: op.as_str().unwrap_or("?").to_string(),
        result: result.as_str().unwrap_or("?").to_string(),
        message: match response {
            Response::Error { message } => Some(message.clone()),
            _ => None,
        },
    };
    info!("control request {id} {}: {}", record.op, record.result);
    audit(ControlRequestAnswered::NAME, event::details(&record));
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

/// Whether the last control connection that worked came from [`pgferry_common::fence::CONTROL_ADDR`]
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
        pgc.password(pgferry_common::runtime::config::read_password_file(path)?);
    }
    pgc.connect_timeout(Duration::from_secs(10));
    let refused_by_hba = |e: &tokio_postgres::Error| {
        e.code() == Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    };
    if FROM_CONTROL_ADDR.load(Ordering::SeqCst) {
        match crate::fence::connect_from_control_addr(&pgc).await {
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
            match crate::fence::connect_from_control_addr(&pgc).await {
                Ok(c) => {
                    FROM_CONTROL_ADDR.store(true, Ordering::SeqCst);
                    info!(
                        "control connection from {} (pg_hba.conf refuses the ordinary route: the source is fenced)",
                        pgferry_common::fence::CONTROL_ADDR
                    );
                    Ok(c)
                }
                Err(e2) => Err(anyhow::Error::new(e).context(format!(
                    "connecting to the source PostgreSQL for control requests (also tried from {}: {e2:#})",
                    pgferry_common::fence::CONTROL_ADDR
                ))),
            }
        }
        Err(e) => {
            Err(anyhow::Error::new(e)
                .context("connecting to the source PostgreSQL for control requests"))
        }
    }
}
