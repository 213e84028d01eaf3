//! The `/jupyter` API, as its original clients call it: the kernel specs, one-shot executions in a fresh
//! kernel (`{output, error, timedout, files, stacktrace}`), files with a lifetime (`PUT /jupyter/files`,
//! `/jupyter/files/long-lifetime`, `GET /jupyter/files/<name>`) and the health checks; errors as
//! `{"detail": ...}`. An adapter over the session manager and the file store ([`crate::store`]).
//!
//! Each execution gets its own session, removed when the request ends however it ends (a guard closes it
//! when the handler's future is dropped, e.g. by a client that disconnects). The caller's stored files, when
//! it has any, are mounted read-only at [`MOUNT_POINT`] in it (without a mount the session can be a
//! pre-started kernel from the pool); what the code writes in its working directory and the images it
//! displays come back as stored files.
//!
//! The file URLs it returns are signed links (see `signed.rs`) that a browser opens without the key until
//! the file expires (or the configured maximum), `<base>/jupyter/files/signed/<expires>/<signature>/<name>`;
//! the stored name stays the URL's last part. `/jupyter/files/<name>` still serves the key's files.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};

use super::compat::{
    DetailBody, DetailError, IMAGE_TYPES, LaxJson, dedent, person_text, push_mime_text, traceback_text,
};
use super::state::{AppState, Caller};
use crate::kernel::Output;
use crate::session::{ExecStatus, ExecuteResult, Mount, Owner, SessionExtras, SessionManager, SessionRequest};
use crate::store::{MOUNT_POINT, StoredFile};

/// How long an uploaded file (and a file an execution returns) lives.
pub const SHORT_LIFETIME: Duration = Duration::from_secs(20 * 60);
/// How long a file uploaded to `/jupyter/files/long-lifetime` lives.
pub const LONG_LIFETIME: Duration = Duration::from_secs(2 * 24 * 3600);
/// At most this many files written by the code come back, and this many bytes of them.
const MAX_COLLECTED_FILES: usize = 32;
const MAX_COLLECTED_BYTES: u64 = 32 << 20;
/// At most this many displayed images come back.
const MAX_IMAGES: usize = 32;

/// One kernel spec, in the shape of Jupyter's `KernelSpecManager.get_all_specs()`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct KernelSpecEntry {
    pub name: String,
    pub resource_dir: String,
    pub spec: KernelSpec,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct KernelSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub display_name: String,
    pub language: String,
    pub interrupt_mode: String,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Value,
}

/// The kernels this server offers, keyed by the name `execution_environment` takes (languages whose image
/// is not built are left out).
#[utoipa::path(get, path = "/jupyter/list_kernel_specs", operation_id = "jupyter_list_kernel_specs", tag = "jupyter API",
    responses((status = 200, body = BTreeMap<String, KernelSpecEntry>)))]
pub async fn list_kernel_specs(State(state): State<AppState>) -> Json<BTreeMap<String, KernelSpecEntry>> {
    use crate::images::catalog::{LABEL_DISPLAY_NAME, LABEL_LANGUAGE, LABEL_LANGUAGE_VERSION};
    let catalog = state.manager.catalog();
    let mut specs = BTreeMap::new();
    for lang in &catalog.languages {
        let image_ref = catalog.image_ref(&lang.image);
        let Ok(Some(image)) = state.manager.runtime().image(&image_ref).await else { continue };
        let label = |k: &str| image.labels.get(k).cloned();
        // `typescript` runs in the javascript image, whose labels speak of JavaScript.
        let (language, display_name) = if lang.name == "typescript" {
            ("typescript".to_owned(), "TypeScript".to_owned())
        } else {
            (label(LABEL_LANGUAGE).unwrap_or_else(|| lang.name.clone()), label(LABEL_DISPLAY_NAME).unwrap_or_default())
        };
        let metadata =
            serde_json::json!({"kernelbox": {"image": image_ref, "language_version": label(LABEL_LANGUAGE_VERSION)}});
        let spec = KernelSpec {
            argv: Vec::new(),
            env: BTreeMap::new(),
            display_name: if display_name.is_empty() { lang.name.clone() } else { display_name },
            language,
            interrupt_mode: "message".into(),
            metadata,
        };
        specs.insert(lang.name.clone(), KernelSpecEntry { name: lang.name.clone(), resource_dir: String::new(), spec });
    }
    Json(specs)
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct JupyterExecuteRequest {
    pub code: String,
    /// A kernel name from `/jupyter/list_kernel_specs` (default `python`).
    #[serde(default = "default_environment")]
    pub execution_environment: String,
    /// Seconds before the execution is interrupted (default: the server's).
    pub timeout: Option<f64>,
    /// Packages to install before the code runs (python kernels: PyPI; javascript: npm).
    pub packages: Option<Vec<String>>,
    /// Accepted for compatibility; files are kept per API key.
    pub user: Option<String>,
    /// Logged with the request.
    pub request_id: Option<String>,
    #[schema(value_type = Object)]
    pub request_date: Option<serde_json::Value>,
}

fn default_environment() -> String {
    "python".into()
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct FileLink {
    /// The file's path in the working directory, or `image_<n>.<ext>` for a displayed image.
    pub filename: String,
    pub url: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct JupyterExecuteResponse {
    /// What a person would see: printed text, results and displays as text.
    pub output: String,
    /// `<ename>: <evalue>` for an error in the code, or why the execution did not run or finish.
    pub error: Option<String>,
    pub timedout: bool,
    /// Files the code wrote in its working directory and images it displayed; `null` when none.
    pub files: Option<Vec<FileLink>>,
    /// The error's traceback, without terminal colours.
    pub stacktrace: Option<String>,
}

/// Closes the request's session when dropped: at the end of the request, or when the client leaves and
/// the handler's future is dropped. Closing is synchronous; the session's task removes the container.
struct CloseSession {
    manager: Arc<SessionManager>,
    owner: Owner,
    id: String,
}

impl Drop for CloseSession {
    fn drop(&mut self) {
        if let Ok(session) = self.manager.get(&self.owner, &self.id) {
            session.close("session_deleted", false);
        }
    }
}

/// Run code in a fresh kernel that is removed afterwards. The caller's stored files are readable at
/// `/mnt/files`; files the code writes in its working directory and images it displays come back in
/// `files`. Code indented as a whole is dedented first.
#[utoipa::path(post, path = "/jupyter/execute", operation_id = "jupyter_execute", tag = "jupyter API", request_body = JupyterExecuteRequest,
    responses((status = 200, body = JupyterExecuteResponse), (status = 422, body = DetailBody),
        (status = 429, body = DetailBody), (status = 503, body = DetailBody)))]
pub async fn execute(
    caller: Caller,
    headers: HeaderMap,
    LaxJson(req): LaxJson<JupyterExecuteRequest>,
) -> Result<Json<JupyterExecuteResponse>, DetailError> {
    if let Some(request_id) = &req.request_id {
        tracing::info!(request_id = %request_id.chars().take(128).collect::<String>(), "jupyter execute");
    }
    let timeout_s = req.timeout.filter(|t| t.is_finite() && *t > 0.0).map(|t| t.ceil().max(1.0) as u64);
    // The caller's stored files, read-only; without any, no mount, so a pre-started kernel can serve.
    let mounts = match caller.store.has_files(&caller.owner) {
        true => {
            let host = caller.store.owner_dir(&caller.owner).map_err(crate::store::StoreError::from)?;
            vec![Mount { host, container: MOUNT_POINT.to_owned() }]
        }
        false => Vec::new(),
    };
    let metadata = BTreeMap::from([("kernelbox.api".to_owned(), "jupyter".to_owned())]);
    // One execution, then the session ends: a kernel that dies answers `killed`, nothing restarts it.
    let request = SessionRequest {
        language: req.execution_environment.clone(),
        metadata: Some(metadata),
        auto_restart: Some(false),
        ..Default::default()
    };
    let extras = SessionExtras { notebook: None, mounts, output: None };
    let info = caller.manager.create_with(caller.owner.clone(), request, extras).await?;
    let _close = CloseSession { manager: caller.manager.clone(), owner: caller.owner.clone(), id: info.id.to_string() };

    let packages = req.packages.unwrap_or_default();
    if !packages.is_empty()
        && let Err(why) = install_packages(&caller, info.id.as_str(), &req.execution_environment, &packages).await
    {
        return Ok(Json(JupyterExecuteResponse {
            output: String::new(),
            error: Some(why),
            timedout: false,
            files: None,
            stacktrace: None,
        }));
    }

    // Files written from here on are the code's (a second's slack for coarse file system clocks).
    let since = now_epoch() as f64 - 1.0;
    let result = caller.manager.execute(&caller.owner, info.id.as_str(), dedent(&req.code), timeout_s).await?;
    let base = base_url(&headers);
    let mut files = images(&caller, &result, &base).await;
    match caller
        .manager
        .files()
        .collect(&caller.owner, info.id.as_str(), since, MAX_COLLECTED_FILES, MAX_COLLECTED_BYTES)
        .await
    {
        Ok((collected, skipped)) => {
            if skipped > 0 {
                tracing::info!(skipped, "jupyter execute: files over the limits were not returned");
            }
            for file in collected {
                let base_name = file.path.rsplit('/').next().unwrap_or("file");
                let (stem, ext) = base_name.rsplit_once('.').unwrap_or((base_name, ""));
                match store(&caller, stem, ext, file.content.to_vec(), &base).await {
                    Ok(url) => files.push(FileLink { filename: file.path.clone(), url }),
                    Err(e) => {
                        tracing::warn!(error = %e.detail, path = %file.path, "could not keep a file the code wrote")
                    }
                }
            }
        }
        // The code may have killed its kernel and container: its output still comes back.
        Err(e) => tracing::info!(error = %e, "jupyter execute: could not collect the files the code wrote"),
    }
    Ok(Json(response(&result, timeout_s, files)))
}

/// Installs `packages` into the session before the code runs (`SessionManager::install_packages`: the
/// session has no network; a fetcher downloads into the shared cache); `Err` is the message for `error`.
pub async fn install_packages(
    caller: &Caller,
    session: &str,
    _language: &str,
    packages: &[String],
) -> Result<(), String> {
    let failed = |why: String| format!("could not install {}: {why}", packages.join(", "));
    match caller.manager.install_packages(&caller.owner, session, packages).await {
        Ok(report) if report.ok => Ok(()),
        Ok(report) => {
            let why: Vec<String> =
                report.packages.iter().filter_map(|p| p.error.as_ref().map(|e| format!("{}: {e}", p.spec))).collect();
            Err(failed(why.join("; ")))
        }
        Err(e) => Err(failed(e.to_string())),
    }
}

fn response(result: &ExecuteResult, timeout_s: Option<u64>, files: Vec<FileLink>) -> JupyterExecuteResponse {
    let error = match result.status {
        ExecStatus::Ok => None,
        ExecStatus::Error => result.error.as_ref().map(|e| format!("{}: {}", e.ename, e.evalue)),
        ExecStatus::Timeout => Some(match timeout_s {
            Some(t) => format!("the execution timed out after {t} s"),
            None => "the execution timed out".to_owned(),
        }),
        ExecStatus::Killed => {
            Some(format!("the kernel died ({})", result.killed_reason.as_deref().unwrap_or("unknown reason")))
        }
    };
    JupyterExecuteResponse {
        output: person_text(result, true),
        error,
        timedout: result.status == ExecStatus::Timeout,
        files: (!files.is_empty()).then_some(files),
        stacktrace: traceback_text(result),
    }
}

/// The images the code displayed, stored as files.
async fn images(caller: &Caller, result: &ExecuteResult, base: &str) -> Vec<FileLink> {
    let mut links = Vec::new();
    for output in &result.outputs {
        let (Output::DisplayData { data, .. } | Output::ExecuteResult { data, .. }) = output else { continue };
        let Some((mime, ext)) = IMAGE_TYPES.iter().find(|(mime, _)| data.contains_key(*mime)) else { continue };
        if links.len() >= MAX_IMAGES {
            break;
        }
        let value = &data[*mime];
        let bytes = if *mime == "image/svg+xml" {
            let mut text = String::new();
            push_mime_text(&mut text, value);
            text.into_bytes()
        } else {
            let encoded: String = value.as_str().unwrap_or_default().chars().filter(|c| !c.is_whitespace()).collect();
            match base64::engine::general_purpose::STANDARD.decode(encoded) {
                Ok(b) => b,
                Err(e) => {
                    tracing::info!(error = %e, mime, "an image output that is not base64");
                    continue;
                }
            }
        };
        let n = links.len() + 1;
        match store(caller, &format!("image_{n}"), ext, bytes, base).await {
            Ok(url) => links.push(FileLink { filename: format!("image_{n}.{ext}"), url }),
            Err(e) => tracing::warn!(error = %e.detail, "could not keep a displayed image"),
        }
    }
    links
}

/// Stores a file for [`SHORT_LIFETIME`] and returns its URL.
async fn store(caller: &Caller, stem: &str, ext: &str, content: Vec<u8>, base: &str) -> Result<String, DetailError> {
    let stored = keep(caller, stem, ext, content, SHORT_LIFETIME).await?;
    Ok(file_url(caller, base, &stored))
}

/// The store's blocking writes (and their fsync) run off the async workers.
async fn keep(
    caller: &Caller,
    stem: &str,
    ext: &str,
    content: Vec<u8>,
    lifetime: Duration,
) -> Result<StoredFile, DetailError> {
    let (store, owner, stem, ext) = (caller.store.clone(), caller.owner.clone(), stem.to_owned(), ext.to_owned());
    let put = move || store.put(&owner, &stem, &ext, &content, lifetime, now_epoch());
    match tokio::task::spawn_blocking(put).await {
        Ok(stored) => Ok(stored?),
        Err(e) => Err(DetailError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("file store: {e}"))),
    }
}

/// The file's URL: a signed link when the server signs them.
fn file_url(caller: &Caller, base: &str, stored: &StoredFile) -> String {
    let signer = caller.links.as_deref();
    super::signed::jupyter_file_url(signer, &caller.owner, base, &stored.name, stored.expires_at, now_epoch())
}

/// `scheme://host` as the client reached us (`X-Forwarded-Proto` from a proxy in front, else http).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b)))
        .unwrap_or("localhost");
    let scheme = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

fn now_epoch() -> i64 {
    chrono::Utc::now().timestamp()
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct UploadRequest {
    /// The file's name without its extension (made safe and unique by the server).
    pub filename: String,
    pub extension: String,
    /// The file's bytes, base64.
    pub content: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UploadResponse {
    pub url: String,
}

/// What both uploads answer.
type Uploaded = Result<Json<UploadResponse>, DetailError>;

/// What both uploads answer, for the OpenAPI document.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum UploadAnswers {
    /// Stored: the file's URL.
    #[response(status = 200)]
    Stored(UploadResponse),
    /// Larger than the upload limit.
    #[response(status = 413)]
    TooLarge(DetailBody),
    /// Not a valid upload (name, extension, base64).
    #[response(status = 422)]
    Invalid(DetailBody),
    /// The store is full.
    #[response(status = 507)]
    Full(DetailBody),
}

/// Store a file for 20 minutes. Later `/jupyter/execute` code of the same API key reads it at
/// `/mnt/files/<name>` (the last part of the URL); no other key can.
#[utoipa::path(put, path = "/jupyter/files", operation_id = "jupyter_upload_file", tag = "jupyter API", request_body = UploadRequest,
    responses(UploadAnswers))]
pub async fn upload(caller: Caller, headers: HeaderMap, LaxJson(req): LaxJson<UploadRequest>) -> Uploaded {
    put(&caller, &headers, req, SHORT_LIFETIME).await
}

/// Store a file for 2 days.
#[utoipa::path(put, path = "/jupyter/files/long-lifetime", operation_id = "jupyter_upload_file_long_lifetime", tag = "jupyter API", request_body = UploadRequest,
    responses(UploadAnswers))]
pub async fn upload_long(caller: Caller, headers: HeaderMap, LaxJson(req): LaxJson<UploadRequest>) -> Uploaded {
    put(&caller, &headers, req, LONG_LIFETIME).await
}

async fn put(
    caller: &Caller,
    headers: &HeaderMap,
    req: UploadRequest,
    lifetime: Duration,
) -> Result<Json<UploadResponse>, DetailError> {
    let encoded: String = req.content.chars().filter(|c| !c.is_whitespace()).collect();
    let content = base64::engine::general_purpose::STANDARD
        .decode(&encoded)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(&encoded))
        .map_err(|e| DetailError::invalid(format!("content is not base64: {e}")))?;
    caller.manager.charge_upload(&caller.owner, content.len() as u64)?;
    let stored = keep(caller, &req.filename, &req.extension, content, lifetime).await?;
    Ok(Json(UploadResponse { url: file_url(caller, &base_url(headers), &stored) }))
}

/// A stored file of the caller's (another API key's files are not found).
#[utoipa::path(get, path = "/jupyter/files/{name}", operation_id = "jupyter_download_file", tag = "jupyter API",
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream"),
        (status = 404, body = DetailBody)))]
pub async fn download(caller: Caller, Path(name): Path<String>) -> Result<Response, DetailError> {
    serve_file(&caller, &name)
}

/// A stored file by its signed link, as `/jupyter/execute` and the uploads return it: no key needed until
/// `expires` (seconds since the epoch). An altered, another file's or an expired link is a 403; with a key,
/// the key decides, as on `/jupyter/files/{name}`.
#[utoipa::path(get, path = "/jupyter/files/signed/{expires}/{signature}/{name}", operation_id = "jupyter_download_signed_file",
    tag = "jupyter API", params(("expires" = i64, Path), ("signature" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "the file's bytes", content_type = "application/octet-stream"),
        (status = 403, description = "the link was altered, is another file's, or expired", body = DetailBody),
        (status = 404, description = "no such file (or it expired)", body = DetailBody)))]
pub async fn download_signed(
    caller: Caller,
    Path(link): Path<(String, String, String)>,
) -> Result<Response, DetailError> {
    serve_file(&caller, &link.2)
}

fn serve_file(caller: &Caller, name: &str) -> Result<Response, DetailError> {
    let (file, size) = caller.store.open_file(&caller.owner, name, now_epoch())?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file)));
    let mut response = body.into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(super::files::content_type(name)));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    // Uploaded or made by untrusted code: a browser must never run it on our origin.
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    // Its URL may be a signed link: a page it links to must not learn it.
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    Ok(response)
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct HealthStatus {
    pub status: &'static str,
}

/// The service is up (the original's health check; no API key needed).
#[utoipa::path(get, path = "/jupyter/health", operation_id = "jupyter_health", tag = "jupyter API", responses((status = 200, body = HealthStatus)))]
pub async fn health() -> Json<HealthStatus> {
    Json(HealthStatus { status: "ok" })
}

/// The same as `/jupyter/health`, at the root.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "jupyter API", responses((status = 200, body = HealthStatus)))]
pub async fn health_root() -> Json<HealthStatus> {
    Json(HealthStatus { status: "ok" })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ErrorInfo;
    use serde_json::json;

    fn result(status: ExecStatus, outputs: Vec<Output>) -> ExecuteResult {
        ExecuteResult {
            status,
            execution_count: Some(1),
            outputs,
            stdout: String::new(),
            stderr: String::new(),
            streams_abridged: false,
            error: None,
            duration_ms: 1,
            truncated: false,
            killed_reason: None,
            kernel_restarted: false,
            stream_events_dropped: 0,
            network: None,
        }
    }

    #[test]
    fn an_error_in_the_code_fills_error_and_stacktrace_and_keeps_the_output() {
        let mut r = result(
            ExecStatus::Error,
            vec![
                Output::Stream { name: "stdout".into(), text: "before\n".into() },
                Output::Error {
                    ename: "NameError".into(),
                    evalue: "name 'x' is not defined".into(),
                    traceback: vec!["\u{1b}[0;31mNameError\u{1b}[0m".into(), "x".into()],
                },
            ],
        );
        r.error = Some(ErrorInfo {
            ename: "NameError".into(),
            evalue: "name 'x' is not defined".into(),
            traceback: vec!["\u{1b}[0;31mNameError\u{1b}[0m".into(), "x".into()],
        });
        let v = serde_json::to_value(response(&r, None, vec![])).unwrap();
        assert_eq!(
            v,
            json!({"output": "before\n", "error": "NameError: name 'x' is not defined", "timedout": false,
                "files": null, "stacktrace": "NameError\nx"})
        );
    }

    #[test]
    fn a_figure_is_a_file_not_text_and_a_timeout_says_so() {
        let figure = Output::DisplayData {
            data: json!({"image/png": "iVBORw0KGgo=", "text/plain": "<Figure size 640x480 with 1 Axes>"})
                .as_object()
                .unwrap()
                .clone(),
            metadata: Default::default(),
        };
        let shown = Output::ExecuteResult {
            execution_count: Some(1),
            data: json!({"text/plain": "42"}).as_object().unwrap().clone(),
            metadata: Default::default(),
        };
        let r = result(ExecStatus::Timeout, vec![figure, shown]);
        let link = FileLink { filename: "image_1.png".into(), url: "http://h/jupyter/files/x".into() };
        let v = serde_json::to_value(response(&r, Some(3), vec![link])).unwrap();
        assert_eq!(v["output"], "42\n");
        assert_eq!(v["timedout"], true);
        assert_eq!(v["error"], "the execution timed out after 3 s");
        assert_eq!(v["files"], json!([{"filename": "image_1.png", "url": "http://h/jupyter/files/x"}]));
    }

    #[test]
    fn the_base_url_is_how_the_client_reached_us() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(base_url(&h), "http://127.0.0.1:8080");
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        assert_eq!(base_url(&h), "https://127.0.0.1:8080");
        h.insert(header::HOST, "evil/\"<x>".parse().unwrap());
        assert_eq!(base_url(&h), "https://localhost");
    }
}
