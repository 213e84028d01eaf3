//! What the two compatibility APIs (`session_compat`, the session API at the root, and `jupyter_compat`,
//! the `/jupyter` API) share: their FastAPI-shaped errors `{"detail": ...}`, the extractors for the bodies
//! their clients send (forms, urlencoded or multipart as `curl -F` sends them; JSON whatever the content
//! type says), and the text a person would see of an execution.
//!
//! Pure translation: nothing here keeps state.

use axum::Json;
use axum::body::{Bytes, to_bytes};
use axum::extract::{FromRequest, Request};
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
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DetailBody {
    /// What went wrong (for an error in the code: its traceback).
    pub detail: String,
}

impl DetailError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        DetailError { status, detail: detail.into() }
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
        (self.status, Json(DetailBody { detail: self.detail })).into_response()
    }
}

impl From<ApiError> for DetailError {
    fn from(e: ApiError) -> Self {
        DetailError { status: e.status, detail: e.message }
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
        let bytes = body_bytes(req, BODY_LIMIT).await?;
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
}

impl<S: Send + Sync> FromRequest<S> for FormFields {
    type Rejection = DetailError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let content_type =
            req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let bytes = body_bytes(req, FORM_LIMIT).await?;
        let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        match essence.as_str() {
            "multipart/form-data" => {
                let boundary = content_type
                    .split(';')
                    .filter_map(|p| p.trim().split_once('='))
                    .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
                    .map(|(_, v)| v.trim().trim_matches('"').to_owned())
                    .ok_or_else(|| DetailError::invalid("a multipart form without a boundary"))?;
                parse_multipart(&bytes, &boundary).map(FormFields).map_err(DetailError::invalid)
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

async fn body_bytes(req: Request, limit: usize) -> Result<Bytes, DetailError> {
    to_bytes(req.into_body(), limit).await.map_err(|_| {
        DetailError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {limit} bytes or could not be read"),
        )
    })
}

/// The text fields of a `multipart/form-data` body (RFC 7578). Parts with a `filename` are skipped.
pub fn parse_multipart(body: &[u8], boundary: &str) -> Result<Vec<(String, String)>, String> {
    if boundary.is_empty() || boundary.len() > 200 {
        return Err("a multipart boundary must be 1 to 200 characters".into());
    }
    let delimiter = format!("--{boundary}");
    let mut rest = body;
    let start = find(rest, delimiter.as_bytes()).ok_or("the multipart body has no boundary")?;
    rest = &rest[start + delimiter.len()..];
    let mut fields = Vec::new();
    let next_delimiter = format!("\r\n--{boundary}");
    loop {
        if rest.starts_with(b"--") {
            return Ok(fields);
        }
        rest = rest.strip_prefix(b"\r\n").ok_or("a multipart boundary line is malformed")?;
        let end = find(rest, next_delimiter.as_bytes()).ok_or("the multipart body ends without its last boundary")?;
        let part = &rest[..end];
        rest = &rest[end + next_delimiter.len()..];
        let head_end = find(part, b"\r\n\r\n").ok_or("a multipart part has no header")?;
        let head = std::str::from_utf8(&part[..head_end]).map_err(|_| "a multipart header is not UTF-8")?;
        let content = &part[head_end + 4..];
        let disposition = head
            .split("\r\n")
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-disposition"))
            .map(|(_, v)| v.to_owned())
            .ok_or("a multipart part has no Content-Disposition")?;
        let param = |key: &str| {
            disposition
                .split(';')
                .filter_map(|p| p.trim().split_once('='))
                .find_map(|(k, v)| k.trim().eq_ignore_ascii_case(key).then(|| v.trim().trim_matches('"').to_owned()))
        };
        let name = param("name").ok_or("a multipart part has no name")?;
        if param("filename").is_some() {
            continue;
        }
        let value = String::from_utf8(content.to_vec()).map_err(|_| format!("the form field `{name}` is not UTF-8"))?;
        fields.push((name, value));
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

    #[test]
    fn multipart_fields_as_curl_sends_them() {
        let body = b"--------------------------abc\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\nuser_test\r\n\
--------------------------abc\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.txt\"\r\nContent-Type: text/plain\r\n\r\nx\r\n\
--------------------------abc\r\nContent-Disposition: form-data; name=\"empty\"\r\n\r\n\r\n--------------------------abc--\r\n";
        let fields = parse_multipart(body, "------------------------abc").unwrap();
        assert_eq!(fields, vec![("user_id".into(), "user_test".into()), ("empty".into(), String::new())]);
        assert!(parse_multipart(b"--b\r\nno header", "b").is_err());
        assert!(parse_multipart(b"nothing", "b").is_err());
        assert_eq!(parse_multipart(b"--b--\r\n", "b").unwrap(), vec![]);
    }
}
