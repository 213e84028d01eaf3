//! `POST /v1/sessions/{id}/execute`: run code, as JSON or as server-sent events while it runs.

use std::convert::Infallible;

use axum::Json;
use axum::extract::Path;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::Stream;
use serde::{Deserialize, Serialize};

use super::extract::ApiJson;
use super::state::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::kernel::{Event, Output};
use crate::session::manager::SavedImage;
use crate::session::{ExecuteResult, Pending, Streamed, Submission};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    pub code: String,
    /// Seconds before the kernel is interrupted (default: the session's).
    pub timeout_s: Option<u64>,
    /// How images (PNG, JPEG, SVG) come back: `inline` in the outputs (base64, as Jupyter sends them;
    /// the default), or `files`: saved in the session's working directory under `outputs/`, taken out of
    /// the outputs and listed in `files` with a download URL.
    #[serde(default)]
    pub images: ImageMode,
    /// Answers to the code's prompts (`input()`, `getpass()`, bash's `read`), in order: at most 1024,
    /// each at most 64 KiB. When they run out, a streamed execution emits an `input_request` event
    /// (answer it with `POST /v1/sessions/{id}/input`); a plain JSON call is refused instead: the
    /// kernel is interrupted and the result is an `InputRequired` error.
    #[serde(default)]
    pub stdin: Vec<String>,
}

/// The answer to the prompt a streamed execution waits on.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputAnswer {
    /// What the user typed (at most 64 KiB; no trailing newline needed).
    pub value: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageMode {
    #[default]
    Inline,
    Files,
}

/// An execution's result, and the images saved as files when asked for.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ExecuteResponse {
    #[serde(flatten)]
    pub result: ExecuteResult,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ImageFile>,
}

/// An image saved as a file.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImageFile {
    #[serde(flatten)]
    pub saved: SavedImage,
    /// Where to download it: a signed link that opens without the API key (in a browser, an `<img>`) until
    /// its `expires`, at most the session's end; with the key it opens as long as the file is there.
    pub url: String,
}

/// Saves the result's images as files when the caller asked for it.
async fn respond(caller: &Caller, id: &str, mut result: ExecuteResult, images: ImageMode) -> ExecuteResponse {
    if images == ImageMode::Inline {
        return ExecuteResponse { result, files: Vec::new() };
    }
    match caller.manager.files().save_images(&caller.owner, id, &mut result).await {
        Ok(saved) => {
            // A link lives no longer than the session can: its creation plus the longest lifetime.
            let created_at =
                caller.manager.get(&caller.owner, id).map_or_else(|_| chrono::Utc::now(), |s| s.created_at);
            let max_lifetime =
                chrono::Duration::from_std(caller.manager.limits().max_lifetime).unwrap_or(chrono::TimeDelta::MAX);
            let session_end = created_at.checked_add_signed(max_lifetime).map_or(i64::MAX, |t| t.timestamp());
            let now = chrono::Utc::now().timestamp();
            let signer = caller.links.as_deref();
            let files = saved
                .into_iter()
                .map(|saved| {
                    let url = super::signed::v1_file_url(signer, &caller.owner, id, &saved.path, session_end, now);
                    ImageFile { saved, url }
                })
                .collect();
            ExecuteResponse { result, files }
        }
        // The session may be gone by now (the execution killed it): the images stay inline then.
        Err(e) => {
            tracing::warn!(session_id = %id, error = %e, "could not save the images as files");
            ExecuteResponse { result, files: Vec::new() }
        }
    }
}

/// Run code in the session's kernel. With `Accept: text/event-stream` the outputs stream as events
/// (`output`, `update`, `clear`, `input_request`, then one `result`) while the code runs. An
/// `input_request` event (`{prompt, password}`) means the code waits for input: answer it with
/// `POST /v1/sessions/{id}/input`; unanswered, the execution ends at its timeout. A display that can be updated
/// carries `transient.display_id`, as in Jupyter; an `update` replaces every display with its id. An
/// `auto_restart` event (`AutoRestartNotice`: `{phase, reason, auto_restarts}`) says the session's kernel
/// died and is restarted automatically (`restarting`, then `restarted`) or stays `dead`, while the
/// execution is queued or runs (one that was running when the kernel died ends `killed`). A
/// `network_blocked` event (`{host, port, reason, count}`) says the code's connection was just refused by
/// the session's network rules (the result's `network.blocked` has them all): allow the host with
/// `PUT /v1/sessions/{id}/network` and retry.
#[utoipa::path(post, path = "/v1/sessions/{id}/execute", request_body = ExecuteRequest, tag = "execute",
    responses((status = 200, body = ExecuteResponse), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 429, body = ErrorBody)))]
pub async fn execute(
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ExecuteRequest>,
) -> Result<Response, ApiError> {
    let wants_stream =
        headers.get("accept").and_then(|v| v.to_str().ok()).is_some_and(|v| v.contains("text/event-stream"));
    let submission = Submission {
        code: req.code,
        timeout_s: req.timeout_s,
        stream: wants_stream,
        ask_for_input: wants_stream,
        stdin: req.stdin,
    };
    let pending = caller.manager.submit_with(&caller.owner, &id, submission)?;
    if !wants_stream {
        let result = pending.wait().await?;
        return Ok(Json(respond(&caller, &id, result, req.images).await).into_response());
    }
    let finish = Finish { caller, id, images: req.images };
    Ok(Sse::new(events(pending, finish)).keep_alive(KeepAlive::default()).into_response())
}

/// Answer the prompt a streamed execution waits on (its `input_request` event). 409 when no execution
/// of the session waits for input.
#[utoipa::path(post, path = "/v1/sessions/{id}/input", request_body = InputAnswer, tag = "execute",
    responses((status = 204, description = "the kernel has the answer"), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn input(
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<InputAnswer>,
) -> Result<axum::http::StatusCode, ApiError> {
    caller.manager.answer_input(&caller.owner, &id, req.value)?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// What the stream's last event needs.
struct Finish {
    caller: Caller,
    id: String,
    images: ImageMode,
}

/// The SSE stream: outputs as they come, then always one `result` event (also when the session was
/// deleted, reaped or restarted under the execution: its status says why). Holds `pending`, so the
/// session counts as in use while a client listens; a client that disconnects drops it, which
/// interrupts the execution.
fn events(pending: Pending, finish: Finish) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let finish = std::sync::Arc::new(finish);
    futures::stream::unfold(Some(pending), move |pending| {
        let finish = finish.clone();
        async move {
            let mut pending = pending?;
            let sse = match pending.next_streamed().await {
                Some(Streamed::AutoRestart(notice)) => {
                    (SseEvent::default().event("auto_restart").json_data(&notice), Some(pending))
                }
                Some(Streamed::NetworkBlocked(blocked)) => {
                    (SseEvent::default().event("network_blocked").json_data(&blocked), Some(pending))
                }
                Some(Streamed::Event(Event::Output { output, display_id })) => {
                    let sse = SseEvent::default().event("output").json_data(Shown::new(&output, display_id.as_deref()));
                    (sse, Some(pending))
                }
                Some(Streamed::Event(Event::Updated { output, display_id })) => (
                    SseEvent::default().event("update").json_data(Shown::new(&output, Some(&display_id))),
                    Some(pending),
                ),
                Some(Streamed::Event(Event::Cleared)) => {
                    (Ok(SseEvent::default().event("clear").data("{}")), Some(pending))
                }
                Some(Streamed::Event(Event::InputRequested(asked))) => {
                    (SseEvent::default().event("input_request").json_data(&asked), Some(pending))
                }
                None => {
                    let result = pending.finish().await;
                    let response = respond(&finish.caller, &finish.id, result, finish.images).await;
                    (SseEvent::default().event("result").json_data(&response), None)
                }
            };
            let (sse, next) = sse;
            let sse = sse.unwrap_or_else(|e| SseEvent::default().event("error").data(e.to_string()));
            Some((Ok(sse), next))
        }
    })
}

/// An output as SSE data: its nbformat shape, and Jupyter's `transient.display_id` for a display that
/// `update` events may replace.
#[derive(Serialize)]
struct Shown<'a> {
    #[serde(flatten)]
    output: &'a Output,
    #[serde(skip_serializing_if = "Option::is_none")]
    transient: Option<Transient<'a>>,
}

#[derive(Serialize)]
struct Transient<'a> {
    display_id: &'a str,
}

impl<'a> Shown<'a> {
    fn new(output: &'a Output, display_id: Option<&'a str>) -> Self {
        Shown { output, transient: display_id.map(|display_id| Transient { display_id }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_display_that_can_be_updated_carries_its_id_as_jupyter_does() {
        let output = Output::DisplayData {
            data: json!({"text/plain": "1"}).as_object().unwrap().clone(),
            metadata: Default::default(),
        };
        let shown = serde_json::to_value(Shown::new(&output, Some("p"))).unwrap();
        let expected = json!({"output_type": "display_data", "data": {"text/plain": "1"}, "metadata": {}, "transient": {"display_id": "p"}});
        assert_eq!(shown, expected);
        let plain = serde_json::to_value(Shown::new(&output, None)).unwrap();
        assert_eq!(plain, serde_json::to_value(&output).unwrap());
    }
}
