//! `GET /api/kernels/{id}/channels`: the Jupyter kernel WebSocket of the gateway API. Jupyter messages go
//! through unchanged both ways, shell, IOPub, stdin and control multiplexed by `channel`, framed as
//! `kernel_ws_codec.rs` says (legacy JSON, or the `v1.kernel.websocket.jupyter.org` subprotocol when the
//! client offers it). The session's task signs what a client sends with the kernel's key and routes the
//! kernel's messages back (`session/peers.rs`); this module only moves frames.
//!
//! One task per connection. It never waits on the kernel: the session's task queues the kernel's messages
//! for it (bounded), and a client's messages wait for room in the session's inbox, so a client that sends
//! faster than the kernel takes is held back by TCP. A client that stops reading is closed when the
//! session lets it go (a reply or status it cannot queue) or after [`WRITE_TIMEOUT`]; a silent one after
//! two unanswered pings.

use std::time::Duration;

use axum::extract::ws::{
    CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;

use super::gateway;
use super::kernel_ws_codec::{self, Frame, Protocol, V1_PROTOCOL};
use super::state::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::session::PeerLink;

/// The largest message a client may send (a widget's buffers, a pasted cell).
pub const MAX_CLIENT_MESSAGE: usize = 16 << 20;
/// How long one frame may take to go out before the client counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the service pings; a client silent for two intervals is closed.
const PING_INTERVAL: Duration = Duration::from_secs(30);
/// Longest `session_id` accepted.
const MAX_SESSION_ID: usize = 256;

#[derive(Debug, Deserialize)]
pub struct ChannelsQuery {
    /// The client's own session id: a reconnect with the same id gets what arrived meanwhile.
    pub session_id: Option<String>,
}

/// `GET /api/kernels/{id}/channels`.
#[utoipa::path(get, path = "/api/kernels/{id}/channels", operation_id = "gateway_kernel_channels", tag = "jupyter gateway",
    params(("id" = String, Path, description = "the kernel id"),
           ("session_id" = Option<String>, Query, description = "the client's session id: a reconnect with the same id gets the messages that arrived meanwhile and replaces a connection still open under it")),
    description = "The kernel's WebSocket, as Jupyter servers serve it: Jupyter messages as JSON text frames with a `channel` \
(`shell`, `iopub`, `stdin`, `control`), binary frames for messages with buffers, or the `v1.kernel.websocket.jupyter.org` \
binary subprotocol when offered. Messages pass through unchanged both ways; the kernel's HMAC key never leaves the service. \
Every client sees IOPub; replies go to the client whose request they answer. At most 8 connections per kernel; a client \
message may be 16 MiB.",
    responses((status = 101, description = "switched to the WebSocket protocol"),
              (status = 400, description = "not a WebSocket request", body = ErrorBody),
              (status = 404, body = ErrorBody), (status = 429, description = "too many connections to this kernel", body = ErrorBody)))]
pub async fn channels(
    caller: Caller,
    Path(kernel): Path<String>,
    Query(query): Query<ChannelsQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let id = gateway::session(&kernel, caller.manager.node())?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "websocket_required", format!("this endpoint is a WebSocket: {e}"))
    })?;
    let session_key = match query.session_id {
        Some(key) if key.len() > MAX_SESSION_ID || key.chars().any(char::is_control) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_session_id",
                format!("`session_id` must be at most {MAX_SESSION_ID} bytes without control characters"),
            ));
        }
        Some(key) if !key.is_empty() => Some(key),
        _ => None,
    };
    let link = caller.manager.attach(&caller.owner, &id, session_key).await.map_err(|e| match e {
        crate::session::SessionError::NotFound(_) => gateway::not_found(&kernel),
        other => other.into(),
    })?;
    let upgrade =
        upgrade.protocols([V1_PROTOCOL]).max_message_size(MAX_CLIENT_MESSAGE).max_frame_size(MAX_CLIENT_MESSAGE);
    let protocol = if upgrade.selected_protocol().is_some() { Protocol::V1 } else { Protocol::Legacy };
    // A failed upgrade drops the link, which detaches it.
    Ok(upgrade.on_upgrade(move |socket| relay(socket, link, protocol)))
}

/// Moves frames until either side ends.
async fn relay(socket: WebSocket, mut link: PeerLink, protocol: Protocol) {
    metrics::gauge!("kernelbox_gateway_connections").increment(1.0);
    let (mut sink, mut stream) = socket.split();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut unanswered = 0u32;
    let close = loop {
        tokio::select! {
            out = link.outbox.recv() => match out {
                Some(msg) => {
                    let frame = match kernel_ws_codec::encode(protocol, &msg) {
                        Frame::Text(text) => WsMessage::Text(text.into()),
                        Frame::Binary(bytes) => WsMessage::Binary(bytes),
                    };
                    let sent = tokio::select! {
                        biased;
                        sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(frame)) => sent,
                        // Stuck on a client the session has let go (it fell behind): stop now.
                        _ = link.outbox.let_go() => break Some((1000, link.outbox.ended())),
                    };
                    match sent {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break None,
                        Err(_) => break Some((1008, "the client did not read its messages in time")),
                    }
                }
                None => break Some((1000, link.outbox.ended())),
            },
            frame = stream.next() => {
                unanswered = 0;
                let frame = match frame {
                    Some(Ok(WsMessage::Text(text))) => Frame::Text(text.as_str().to_owned()),
                    Some(Ok(WsMessage::Binary(bytes))) => Frame::Binary(bytes),
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => continue,
                    Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => break None,
                };
                match kernel_ws_codec::decode(frame) {
                    Ok((channel, msg)) => {
                        if link.send(channel, msg).await.is_err() {
                            break Some((1000, link.outbox.ended()));
                        }
                    }
                    // As Jupyter's server does: a message it cannot use is logged and ignored.
                    Err(e) => {
                        metrics::counter!("kernelbox_gateway_messages_refused_total").increment(1);
                        tracing::info!(error = %e, "ignored a Jupyter client's message");
                    }
                }
            }
            _ = ping.tick() => {
                unanswered += 1;
                if unanswered > 2 {
                    break Some((1001, "no answer to pings"));
                }
                if tokio::time::timeout(WRITE_TIMEOUT, sink.send(WsMessage::Ping(Default::default()))).await.is_err() {
                    break None;
                }
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame { code, reason: reason.into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(WsMessage::Close(Some(frame)))).await;
    }
    metrics::gauge!("kernelbox_gateway_connections").decrement(1.0);
}
