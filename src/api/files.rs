//! `/v1/sessions/{id}/files`: upload into, download from, list and delete in a session's working
//! directory. The transfer itself runs inside the session's container (see `session::files`); here a
//! request becomes a manager call and its answer a response. Uploads stream through (never held whole),
//! under the operator's upload limit.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, Request};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use serde::Deserialize;

use super::body;
use super::state::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::session::files::{Listing, Written};

/// How long the rest of a refused upload is read and thrown away, so that its client sees the refusal.
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ListQuery {
    /// A directory relative to the working directory; the working directory itself when absent.
    #[serde(default)]
    pub path: String,
}

/// List a directory of the session's working directory: name, size, kind (`file`, `directory`,
/// `symlink`, `other`) and modification time of each entry. Symlinks are listed, never followed.
#[utoipa::path(get, path = "/v1/sessions/{id}/files", operation_id = "list_files", tag = "files", params(ListQuery),
    responses((status = 200, body = Listing), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn list(
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Listing>, ApiError> {
    Ok(Json(caller.manager.files().list(&caller.owner, &id, &query.path).await?))
}

/// A signed link's part of a download URL (as `execute` returns it with `"images": "files"`): with both, no
/// API key is needed until `expires`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LinkQuery {
    /// When the link expires, seconds since 1970.
    pub expires: Option<i64>,
    /// The link's signature.
    pub signature: Option<String>,
}

/// Download a file of the session's working directory. Paths are relative to it; `..`, absolute paths,
/// control characters and symlinks that lead out of it are refused. Without the API key, a signed link
/// opens it (`expires` and `signature`, as `execute` returns them); an altered, another file's or an
/// expired link is a 403.
#[utoipa::path(get, path = "/v1/sessions/{id}/files/{path}", tag = "files", params(LinkQuery),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream"),
        (status = 403, description = "a symlink out of the working directory; or a link that was altered, is another file's, or expired", body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn download(caller: Caller, Path((id, path)): Path<(String, String)>) -> Result<Response, ApiError> {
    let download = caller.manager.files().download(&caller.owner, &id, &path).await?;
    let name = path.rsplit('/').next().unwrap_or("file");
    let mut response = Body::from_stream(download.body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(name)));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(download.size));
    // What a session wrote is the sandbox's content: a browser must never run it on our origin.
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Its URL may be a signed link: a page it links to must not learn it.
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Ok(v) = HeaderValue::from_str(&content_disposition(name)) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// Upload a file (the raw request body) into the session's working directory, creating the directories
/// on the way. The file appears whole or not at all. Larger than the upload limit: 413; the session's disk
/// full: 507; the key's upload budget spent (`--upload-limit-mb-per-minute`): 429 with `Retry-After`.
#[utoipa::path(put, path = "/v1/sessions/{id}/files/{path}", tag = "files",
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Written), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 507, body = ErrorBody)))]
pub async fn upload(
    caller: Caller,
    Path((id, path)): Path<(String, String)>,
    request: Request,
) -> Result<(StatusCode, Json<Written>), ApiError> {
    let max = caller.manager.limits().max_upload_bytes;
    let announced = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let mut body = request.into_body().into_data_stream();
    if announced.is_some_and(|n| n > max) {
        body::discard_rest(body, DRAIN_TIME);
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the file is larger than the upload limit of {max} bytes"),
        ));
    }
    let written = caller.manager.upload(&caller.owner, &id, &path, announced, body.by_ref()).await;
    if written.is_err() {
        // The client may still be sending: it should see the answer, not a reset.
        body::discard_rest(body, DRAIN_TIME);
    }
    Ok((StatusCode::CREATED, Json(written?)))
}

/// Delete a file, a symlink (not its target) or a directory with its contents.
#[utoipa::path(delete, path = "/v1/sessions/{id}/files/{path}", operation_id = "delete_file", tag = "files",
    responses((status = 204), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody)))]
pub async fn delete(caller: Caller, Path((id, path)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    caller.manager.files().delete(&caller.owner, &id, &path).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download the session's notebook: every execution so far as a code cell with its outputs (nbformat
/// 4.5), written by the service from its own record, never read back from the sandbox.
#[utoipa::path(get, path = "/v1/sessions/{id}/notebook", tag = "files",
    responses((status = 200, description = "the notebook", content_type = "application/x-ipynb+json"),
        (status = 404, body = ErrorBody)))]
pub async fn notebook(caller: Caller, Path(id): Path<String>) -> Result<Response, ApiError> {
    let bytes = caller.manager.notebook(&caller.owner, &id).await?;
    let mut response = Body::from(bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ipynb+json"));
    if let Ok(v) = HeaderValue::from_str(&content_disposition(&format!("{id}.ipynb"))) {
        headers.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// A content type from a file name's extension (the bytes are the sandbox's: they are not sniffed).
pub fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "py" | "js" | "ts" | "java" | "sh" | "md" | "r" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "tsv" => "text/tab-separated-values; charset=utf-8",
        "json" | "ipynb" => "application/json",
        "html" | "htm" => "text/html; charset=utf-8",
        "xml" => "application/xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "svg" => "image/svg+xml",
        "webp" => "image/webp",
        "pdf" => "application/pdf",
        "zip" => "application/zip",
        "gz" | "tgz" => "application/gzip",
        "parquet" => "application/vnd.apache.parquet",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
}

/// `attachment` with the name, ASCII-safe and RFC 5987-encoded for the rest.
fn content_disposition(name: &str) -> String {
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || ".-_".contains(c) { c } else { '_' }).collect();
    let encoded: String = name
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    format!("attachment; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_a_content_type_and_a_safe_disposition() {
        assert_eq!(content_type("plot.PNG"), "image/png");
        assert_eq!(content_type("data.csv"), "text/csv; charset=utf-8");
        assert_eq!(content_type("noext"), "application/octet-stream");
        assert_eq!(
            content_disposition("été \"x\".txt"),
            "attachment; filename=\"_t___x_.txt\"; filename*=UTF-8''%C3%A9t%C3%A9%20%22x%22.txt"
        );
    }
}
