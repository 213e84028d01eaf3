//! Request bodies arrive whole, under the size limit and within a deadline, before a handler sees them:
//! a body announced too large is a 413 before a byte of it is kept, one that grows too large is a 413,
//! and one dribbled in too slowly (a slow-loris client) is a 408, all in the JSON error shape. Every API
//! body is a small JSON document, so reading it whole first costs nothing.
//!
//! After a 413 the rest of the body is read and thrown away (up to [`DRAIN_LIMIT`], within the deadline):
//! a client still sending when the answer comes would otherwise have its connection reset and lose the
//! 413 (the lingering close of other servers).

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;

use crate::error::ApiError;

/// How much of a too-large body is read and discarded so that its client sees the 413.
const DRAIN_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// From the end of the headers to the end of the body.
    pub deadline: Duration,
}

enum Failure {
    TooLarge,
    Unreadable(axum::Error),
}

/// Middleware: replaces the streamed body with the whole body, or answers 413/408/400.
pub async fn read_whole(State(limits): State<BodyLimits>, req: Request, next: Next) -> Response {
    let deadline = Instant::now() + limits.deadline;
    let (parts, mut body) = req.into_parts();
    let announced = parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let read = if announced.is_some_and(|n| n > limits.max_bytes as u64) {
        Ok(Err(Failure::TooLarge))
    } else {
        tokio::time::timeout_at(deadline, read_up_to(&mut body, limits.max_bytes)).await
    };
    match read {
        Ok(Ok(bytes)) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Ok(Err(Failure::TooLarge)) => {
            tokio::spawn(drain(body, deadline));
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {} MiB", limits.max_bytes / (1024 * 1024)),
            )
            .into_response()
        }
        // The client went away or sent a malformed chunked body; it may not be listening.
        Ok(Err(Failure::Unreadable(e))) => closing(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("could not read the request body: {e}"),
        )),
        Err(_) => closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {} s", limits.deadline.as_secs()),
        )),
    }
}

async fn read_up_to(body: &mut Body, max_bytes: usize) -> Result<Bytes, Failure> {
    let mut whole = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(Failure::Unreadable)?.into_data() else { continue };
        if whole.len() + data.len() > max_bytes {
            return Err(Failure::TooLarge);
        }
        whole.extend_from_slice(&data);
    }
    Ok(Bytes::from(whole))
}

/// Reads and discards what is left of a refused body; ends at the deadline, at [`DRAIN_LIMIT`], or when
/// the connection does (so it needs no tracking: a stopping server closes its connections).
async fn drain(mut body: Body, deadline: Instant) {
    let _ = tokio::time::timeout_at(deadline, async {
        let mut drained = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            drained += frame.data_ref().map_or(0, Bytes::len);
            if drained > DRAIN_LIMIT {
                break;
            }
        }
    })
    .await;
}

/// Reads and discards what is left of a streamed body that was refused mid-way (an upload over its
/// limit), so that its client sees the answer; in the background, within `limit` and [`DRAIN_LIMIT`].
pub fn discard_rest<S, E>(mut stream: S, limit: Duration)
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + Unpin + 'static,
{
    use futures::StreamExt;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(limit, async {
            let mut drained = 0usize;
            while let Some(Ok(chunk)) = stream.next().await {
                drained += chunk.len();
                if drained > DRAIN_LIMIT {
                    break;
                }
            }
        })
        .await;
    });
}

/// The rest of the body is not read, so the connection cannot carry another request.
fn closing(error: ApiError) -> Response {
    let mut response = error.into_response();
    response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}
