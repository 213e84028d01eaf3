//! What the two compatibility APIs (`session_compat`, the session API at the root, and `jupyter_compat`,
//! the `/jupyter` API) share: their FastAPI-shaped errors `{"detail": ...}`, the extractors for the bodies
//! their clients send (forms, urlencoded or multipart as `curl -F` sends them; JSON whatever the content
//! type says), and the text a person would see of an execution.
//!
//! Pure translation: nothing here keeps state.

use axum::Json;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::kernel::Output;
use crate::session::{ExecuteResult, SessionError};
use crate::store::StoreError;
use crate::text::strip_ansi;

/// The largest form or JSON body these APIs read (an upload's base64 included).
pub const BODY_LIMIT: usize = 16 * 1024 * 1024;
/// The largest form these APIs read: their forms carry a user id (and keep multipart parsing cheap).
pub const FORM_LIMIT: usize = 64 * 1024;
/// Error bodies of the middleware longer than this are not rewritten.
const QUOTE_LIMIT: usize = 64 * 1024;

/// An error as FastAPI shapes it: `{"detail": "..."}`.
#[derive(Debug)]
pub struct DetailError {
    pub status: StatusCode,
    pub detail: String,
    /// A limit that was met: how long until the request would pass (sent as `Retry-After`).
    pub retry_after: Option<std::time::Duration>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DetailBody {
    /// What went wrong (for an error in the code: its traceback).
    pub detail: String,
}

impl DetailError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        DetailError { status, detail: detail.into(), retry_after: None }
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        DetailError::new(StatusCode::UNPROCESSABLE_ENTITY, detail)
    }
}

impl IntoResponse for DetailError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, detail = %self.detail, "request failed");
        }
        crate::error::with_retry_after(
            (self.status, Json(DetailBody { detail: self.detail })).into_response(),
            self.retry_after,
        )
    }
}

impl From<ApiError> for DetailError {
    fn from(e: ApiError) -> Self {
        DetailError { status: e.status, detail: e.message, retry_after: e.retry_after }
    }
}

impl From<SessionError> for DetailError {
    fn from(e: SessionError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<StoreError> for DetailError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
            StoreError::NotFound => StatusCode::NOT_FOUND,
            StoreError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            StoreError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            StoreError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        DetailError::new(status, e.to_string())
    }
}

/// `map_response` middleware for the compatibility routes: an error made elsewhere (the API key check, the
/// rate limit, the body limits, axum's own rejections) comes out as `{"detail": ...}` too, status and
/// headers kept.
pub async fn detail_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, QUOTE_LIMIT).await else {
        return DetailError::new(status, status.canonical_reason().unwrap_or("error").to_lowercase()).into_response();
    };
    let value: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
    if value.as_ref().is_some_and(|v| v.get("detail").is_some()) {
        return Response::from_parts(parts, axum::body::Body::from(bytes));
    }
    let detail = match value.as_ref().and_then(|v| v.pointer("/error/message")).and_then(|m| m.as_str()) {
        Some(message) => message.to_owned(),
        None => {
            let text = String::from_utf8_lossy(&bytes).trim().to_owned();
            if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text }
        }
    };
    let mut rewritten = DetailError::new(status, detail).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name, value.clone());
        }
    }
    rewritten
}

/// A JSON body, read whatever its `Content-Type` (FastAPI reads JSON bodies that way too).
pub struct LaxJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for LaxJson<T> {
    type Rejection = DetailError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req.into_body(), BODY_LIMIT).await?;
        serde_json::from_slice(&bytes)
            .map(LaxJson)
            .map_err(|e| DetailError::invalid(format!("the body is not the JSON this endpoint takes: {e}")))
    }
}

/// The fields of a form, sent `application/x-www-form-urlencoded` or `multipart/form-data` (as `curl -F`
/// does): what FastAPI's `Form(...)` takes. Only text fields are kept.
#[derive(Debug, Default, PartialEq)]
pub struct FormFields(pub Vec<(String, String)>);

impl FormFields {
    /// The field `name`, or a 422 saying it is missing.
    pub fn required(&self, name: &str) -> Result<&str, DetailError> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .ok_or_else(|| DetailError::invalid(format!("the form field `{name}` is required")))
    }

    /// Every value of the field `name` (it may repeat), each split at commas, trimmed, empty ones dropped.
    pub fn list(&self, name: &str) -> Option<Vec<String>> {
        let mut values = self.0.iter().filter(|(k, _)| k == name).peekable();
        values.peek()?;
        Some(
            values
                .flat_map(|(_, v)| v.split(','))
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }
}

impl<S: Send + Sync> FromRequest<S> for FormFields {
    type Rejection = DetailError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let content_type = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        // Whatever the type, a body over the limit is a 413 before anything is parsed.
        let (parts, body) = req.into_parts();
        let bytes = body_bytes(body, FORM_LIMIT).await?;
        match essence.as_str() {
            "multipart/form-data" => {
                multipart_fields(Request::from_parts(parts, Body::from(bytes)), state).await.map(FormFields)
            }
            "application/x-www-form-urlencoded" | "" => serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
                .map(FormFields)
                .map_err(|e| DetailError::invalid(format!("an unreadable form: {e}"))),
            other => Err(DetailError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("`{other}` is not a form: send multipart/form-data or application/x-www-form-urlencoded"),
            )),
        }
    }
}

async fn body_bytes(body: Body, limit: usize) -> Result<Bytes, DetailError> {
    to_bytes(body, limit).await.map_err(|_| {
        DetailError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes or could not be read"),
        )
    })
}

/// The text fields of a `multipart/form-data` body (RFC 7578), read by axum's [`Multipart`]; parts with a
/// `filename` are skipped. `req`'s body is already read whole, within [`FORM_LIMIT`].
async fn multipart_fields<S: Send + Sync>(req: Request, state: &S) -> Result<Vec<(String, String)>, DetailError> {
    let unreadable =
        |e: MultipartError| DetailError::invalid(format!("an unreadable multipart form: {}", e.body_text()));
    let mut form = Multipart::from_request(req, state)
        .await
        .map_err(|_| DetailError::invalid("a multipart form without a boundary"))?;
    let mut fields = Vec::new();
    while let Some(field) = form.next_field().await.map_err(unreadable)? {
        let name = field.name().ok_or_else(|| DetailError::invalid("a multipart part has no name"))?.to_owned();
        if field.file_name().is_some() {
            continue;
        }
        let value = field.bytes().await.map_err(unreadable)?;
        let value = String::from_utf8(value.into())
            .map_err(|_| DetailError::invalid(format!("the form field `{name}` is not UTF-8")))?;
        fields.push((name, value));
    }
    Ok(fields)
}

/// What a person would see of an execution, in order: stream text, and the `text/plain` of results and
/// displays (one line each). With `images_as_files`, a display that carries an image (returned as a file)
/// adds no text (its `text/plain` is only a stand-in such as `<Figure size 640x480 with 1 Axes>`). Errors
/// are left to the caller (their traceback is [`traceback_text`]).
pub fn person_text(result: &ExecuteResult, images_as_files: bool) -> String {
    let mut text = String::new();
    for output in &result.outputs {
        match output {
            Output::Stream { text: t, .. } => text.push_str(t),
            Output::ExecuteResult { data, .. } | Output::DisplayData { data, .. } => {
                if images_as_files && IMAGE_TYPES.iter().any(|(mime, _)| data.contains_key(*mime)) {
                    continue;
                }
                if let Some(plain) = data.get("text/plain") {
                    push_mime_text(&mut text, plain);
                    if !text.ends_with('\n') {
                        text.push('\n');
                    }
                }
            }
            Output::Error { .. } => {}
        }
    }
    strip_ansi(&text)
}

/// The image types that come back as files, with their extensions.
pub const IMAGE_TYPES: [(&str, &str); 3] = [("image/png", "png"), ("image/jpeg", "jpg"), ("image/svg+xml", "svg")];

/// nbformat allows a MIME bundle's text as a string or a list of lines.
pub fn push_mime_text(text: &mut String, value: &serde_json::Value) {
    match value {
        serde_json::Value::String(s) => text.push_str(s),
        serde_json::Value::Array(lines) => lines.iter().filter_map(|l| l.as_str()).for_each(|l| text.push_str(l)),
        _ => {}
    }
}

/// An execution's error as a person reads it: the traceback without terminal colours (or `ename: evalue`
/// when the kernel sent no traceback).
pub fn traceback_text(result: &ExecuteResult) -> Option<String> {
    let error = result.error.as_ref()?;
    let text = if error.traceback.is_empty() {
        format!("{}: {}", error.ename, error.evalue)
    } else {
        error.traceback.join("\n")
    };
    Some(strip_ansi(&text))
}

/// Python's `textwrap.dedent`: removes the whitespace prefix common to every line that is not blank
/// (tabs and spaces are not equal), and empties lines that hold only whitespace. Code pasted from inside
/// an indented string then runs as meant. Applied to every language: only a margin common to all lines
/// goes, so relative indentation (Python's blocks, a heredoc's body) is kept, and for JavaScript, Java and
/// bash, where indentation means nothing, it changes nothing but how the code looks; code with a line at
/// the left margin is left alone, as Python would leave it.
pub fn dedent(code: &str) -> String {
    fn indent(line: &str) -> &str {
        &line[..line.len() - line.trim_start_matches([' ', '\t']).len()]
    }
    let mut margin: Option<&str> = None;
    for line in code.split('\n') {
        if line.trim().is_empty() {
            continue;
        }
        let this = indent(line);
        margin = Some(match margin {
            None => this,
            Some(m) => {
                let common = m.bytes().zip(this.bytes()).take_while(|(a, b)| a == b).count();
                &m[..common]
            }
        });
    }
    let margin = margin.unwrap_or("");
    code.split('\n')
        .map(|line| if line.trim().is_empty() { "" } else { line.strip_prefix(margin).unwrap_or(line) })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedent_is_pythons() {
        assert_eq!(
            dedent("\n    import numpy as np\n    if x:\n        y()\n    "),
            "\nimport numpy as np\nif x:\n    y()\n"
        );
        assert_eq!(dedent("print(1)\n  print(2)"), "print(1)\n  print(2)");
        assert_eq!(dedent("\tA\n\t\tB\n"), "A\n\tB\n");
        assert_eq!(dedent("  a\n\tb"), "  a\n\tb");
        assert_eq!(dedent("    a\n\n  \n    b"), "a\n\n\nb");
        assert_eq!(dedent(""), "");
    }

    async fn body_json(r: Response) -> serde_json::Value {
        serde_json::from_slice(&to_bytes(r.into_body(), usize::MAX).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn every_error_comes_out_in_the_detail_shape_with_its_status_and_headers() {
        let ours = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "an API key is required").into_response();
        let r = detail_errors(ours).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(body_json(r).await, serde_json::json!({"detail": "an API key is required"}));
        let plain = (StatusCode::TOO_MANY_REQUESTS, [(header::RETRY_AFTER, "3")], "slow down").into_response();
        let r = detail_errors(plain).await;
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(body_json(r).await, serde_json::json!({"detail": "slow down"}));
        let empty = detail_errors(StatusCode::METHOD_NOT_ALLOWED.into_response()).await;
        assert_eq!(body_json(empty).await, serde_json::json!({"detail": "method not allowed"}));
        let already = detail_errors(DetailError::new(StatusCode::NOT_FOUND, "x").into_response()).await;
        assert_eq!(body_json(already).await, serde_json::json!({"detail": "x"}));
        let ok = detail_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(to_bytes(ok.into_body(), 100).await.unwrap(), "fine");
    }

    /// What the extractor makes of a body sent with `content_type`.
    async fn form(content_type: &str, body: impl Into<Body>) -> Result<FormFields, DetailError> {
        let req = Request::builder().header(header::CONTENT_TYPE, content_type).body(body.into()).unwrap();
        FormFields::from_request(req, &()).await
    }

    fn fields(pairs: &[(&str, &str)]) -> FormFields {
        FormFields(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[tokio::test]
    async fn multipart_fields_as_curl_sends_them() {
        let curl = "multipart/form-data; boundary=------------------------abc";
        let body = "--------------------------abc\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\nuser_test\r\n\
--------------------------abc\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nx\r\n\
--------------------------abc\r\nContent-Disposition: form-data; name=\"empty\"\r\n\r\n\r\n--------------------------abc--\r\n";
        assert_eq!(form(curl, body).await.unwrap(), fields(&[("user_id", "user_test"), ("empty", "")]));
        let unprocessable =
            |r: Result<FormFields, DetailError>| r.is_err_and(|e| e.status == StatusCode::UNPROCESSABLE_ENTITY);
        assert!(unprocessable(form("multipart/form-data; boundary=b", "--b\r\nno header").await));
        assert!(unprocessable(form("multipart/form-data; boundary=b", "nothing").await));
        assert_eq!(form("multipart/form-data; boundary=b", "--b--\r\n").await.unwrap(), fields(&[]));
    }

    #[tokio::test]
    async fn forms_are_refused_in_the_detail_shape() {
        let status = |r: Result<FormFields, DetailError>| r.map_err(|e| (e.status, e.detail)).unwrap_err();
        let (code, detail) = status(form("multipart/form-data", "--b--\r\n").await);
        assert_eq!((code, detail.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "a multipart form without a boundary"));
        let not_utf8 = b"--b\r\nContent-Disposition: form-data; name=\"u\"\r\n\r\n\xff\r\n--b--\r\n".to_vec();
        let (code, detail) = status(form("multipart/form-data; boundary=b", not_utf8).await);
        assert_eq!((code, detail.as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "the form field `u` is not UTF-8"));
        let big = format!("user_id={}", "x".repeat(FORM_LIMIT));
        let (code, detail) = status(form("application/x-www-form-urlencoded", big).await);
        assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE, "{detail}");
        assert_eq!(detail, format!("the request body is larger than {FORM_LIMIT} bytes or could not be read"));
        let (code, _) = status(form("application/json", "{}").await);
        assert_eq!(code, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            form("application/x-www-form-urlencoded", "user_id=u&x=").await.unwrap(),
            fields(&[("user_id", "u"), ("x", "")])
        );
    }
}
