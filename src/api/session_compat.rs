//! The session API (paths at the root), as its original clients call it: `POST /start_session` (form
//! `user_id`), `/execute` (JSON `user_id`, `code`), `/install_package` (JSON `user_id`, `package_name`),
//! `/reset` and `/end_session` (form `user_id`); answers and errors (`{"detail": ...}`) in the original's
//! shapes. An adapter: one `python_scientific` session per user id and API key, found by its metadata
//! (`kernelbox.user_id`), which the session's container labels keep, so a restarted service that adopts
//! its sessions still finds them. The idle reaper applies as to any session. As in the original, the
//! user's code writes results to `/mnt/data/output/`: the session asks for the user's output folder, which
//! the service copies to `<datasets>/output/<user_id>/` (`session::outputs`).

use std::collections::BTreeMap;

use axum::Json;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

use super::compat::{DetailBody, DetailError, FormFields, LaxJson, person_text, traceback_text};
use super::state::Caller;
use crate::session::model::NetworkRequest;
use crate::session::{ExecStatus, SessionExtras, SessionInfo, SessionRequest, SessionStatus};

/// The metadata key that names a session's user.
pub const USER_KEY: &str = "kernelbox.user_id";
/// The metadata key that says which API made a session (`session`).
pub const API_KEY: &str = "kernelbox.api";
/// The language of the session API's sessions: the original ran every user's kernel in a data-science
/// Python (pandas, numpy, matplotlib, scipy, seaborn, scikit-learn, pyarrow, tabulate, openpyxl, xlrd),
/// which is what `python_scientific` has.
const LANGUAGE: &str = "python_scientific";

/// A checked user id: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.`. It becomes part of paths (the
/// notebook's, the output folder's), a label and a name, so nothing else gets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserId(String);

impl UserId {
    pub fn parse(raw: &str) -> Result<UserId, DetailError> {
        if crate::session::outputs::valid_user_folder(raw) {
            Ok(UserId(raw.to_owned()))
        } else {
            Err(DetailError::invalid(
                "user_id must be 1 to 64 characters of letters, digits, `_`, `.` and `-`, not starting with `.`",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The user's live session (the oldest, should two starts have raced), if any.
fn find(caller: &Caller, user: &UserId) -> Option<SessionInfo> {
    caller
        .manager
        .list(&caller.owner)
        .into_iter()
        .filter(|s| {
            s.metadata.get(USER_KEY).map(String::as_str) == Some(user.as_str())
                && s.metadata.get(API_KEY).map(String::as_str) == Some("session")
        })
        .min_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)))
}

/// The live session of the user `raw_user` names: a 422 when it is not a user id, a 404 when the user has
/// no session.
fn require(caller: &Caller, raw_user: &str) -> Result<SessionInfo, DetailError> {
    let user = UserId::parse(raw_user)?;
    find(caller, &user).ok_or_else(|| {
        DetailError::new(
            StatusCode::NOT_FOUND,
            format!("no active session for user_id `{}`: POST /start_session first", user.as_str()),
        )
    })
}

/// The notebook's path under the notebooks folder: `<user>/notebook_<user>.ipynb`.
fn notebook(user: &UserId) -> String {
    format!("{0}/notebook_{0}.ipynb", user.as_str())
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct StartSessionResponse {
    /// `Session started successfully`.
    pub message: &'static str,
    /// Where the session's notebook is, as the deployment sees it.
    pub notebook_path: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MessageResponse {
    pub message: String,
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct UserForm {
    /// 1 to 64 letters, digits, `_`, `.` or `-`, not starting with `.`.
    pub user_id: String,
}

/// Start a Python session (`python_scientific`) for `user_id` (a form field), or keep the one it has: the
/// same session and container, state and files. What its code writes to `/mnt/data/output/` is copied to
/// the datasets folder's `output/<user_id>/` on the host after each execution and when the session ends.
#[utoipa::path(post, path = "/start_session", operation_id = "session_api_start_session", tag = "session API",
    request_body(content = UserForm, content_type = "multipart/form-data"),
    responses((status = 200, body = StartSessionResponse), (status = 422, body = DetailBody),
        (status = 429, body = DetailBody), (status = 503, body = DetailBody)))]
pub async fn start_session(caller: Caller, form: FormFields) -> Result<Json<StartSessionResponse>, DetailError> {
    let user = UserId::parse(form.required("user_id")?)?;
    // kernelbox's addition: the hosts the session may reach (`network_allow`, repeated or comma-separated).
    let network = form.list("network_allow").map(|allow| NetworkRequest { allow });
    let answer = || StartSessionResponse {
        message: "Session started successfully",
        notebook_path: format!(
            "{}/{}",
            caller.manager.storage().notebooks_public_path.trim_end_matches('/'),
            notebook(&user)
        ),
    };
    if let Some(existing) = find(&caller, &user) {
        if existing.status != SessionStatus::Dead {
            // The user's session goes on, with the list it asks for now.
            if let Some(network) = &network {
                caller.manager.set_network(&caller.owner, existing.id.as_str(), network)?;
            }
            return Ok(Json(answer()));
        }
        // A dead kernel (e.g. out of memory) is of no use: the user gets a fresh session.
        let _ = caller.manager.delete(&caller.owner, existing.id.as_str()).await;
    }
    let metadata = BTreeMap::from([(USER_KEY.to_owned(), user.0.clone()), (API_KEY.to_owned(), "session".to_owned())]);
    let request = SessionRequest { language: LANGUAGE.into(), metadata: Some(metadata), network, ..Default::default() };
    let extras = SessionExtras { notebook: Some(notebook(&user)), mounts: Vec::new(), output: Some(user.0.clone()) };
    let created = caller.manager.create_with(caller.owner.clone(), request, extras).await?;
    // Two starts at once for one user: the oldest session is the user's, the others go.
    if let Some(first) = find(&caller, &user)
        && first.id != created.id
    {
        let _ = caller.manager.delete(&caller.owner, created.id.as_str()).await;
    }
    Ok(Json(answer()))
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct ExecuteBody {
    /// 1 to 64 letters, digits, `_`, `.` or `-`, not starting with `.`.
    pub user_id: String,
    pub code: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ExecuteOutput {
    /// What a person would see: printed text, results and displays as text.
    pub output: String,
}

/// Run code in the user's session. An error in the code is a 400 whose `detail` is the traceback; a
/// timeout is a 408 (the kernel is interrupted, the session keeps its state); no session is a 404.
#[utoipa::path(post, path = "/execute", operation_id = "session_api_execute", tag = "session API", request_body = ExecuteBody,
    responses((status = 200, body = ExecuteOutput), (status = 400, body = DetailBody), (status = 404, body = DetailBody),
        (status = 408, body = DetailBody), (status = 422, body = DetailBody), (status = 429, body = DetailBody)))]
pub async fn execute(caller: Caller, LaxJson(body): LaxJson<ExecuteBody>) -> Result<Json<ExecuteOutput>, DetailError> {
    let session = require(&caller, &body.user_id)?;
    let result = caller.manager.execute(&caller.owner, session.id.as_str(), body.code, None).await?;
    match result.status {
        ExecStatus::Ok => Ok(Json(ExecuteOutput { output: person_text(&result, false) })),
        ExecStatus::Error => {
            Err(DetailError::new(StatusCode::BAD_REQUEST, traceback_text(&result).unwrap_or_default()))
        }
        ExecStatus::Timeout => {
            let state_note = if result.kernel_restarted {
                "the kernel ignored the interrupt and was restarted: its state is gone"
            } else {
                "the kernel was interrupted; the session keeps its state"
            };
            Err(DetailError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!("the execution timed out after {} s: {state_note}", session.limits.timeout_s),
            ))
        }
        ExecStatus::Killed => Err(DetailError::new(
            StatusCode::BAD_REQUEST,
            format!(
                "the kernel died ({}): its state is gone; POST /reset starts a fresh kernel",
                result.killed_reason.as_deref().unwrap_or("unknown reason")
            ),
        )),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct InstallBody {
    /// 1 to 64 letters, digits, `_`, `.` or `-`, not starting with `.`.
    pub user_id: String,
    pub package_name: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct InstallResponse {
    /// `Successfully installed and imported <name>`.
    pub message: String,
    /// The installer's log.
    pub output: String,
}

/// Install a package into the user's session and import it.
#[utoipa::path(post, path = "/install_package", operation_id = "session_api_install_package", tag = "session API", request_body = InstallBody,
    responses((status = 200, body = InstallResponse), (status = 400, body = DetailBody), (status = 404, body = DetailBody),
        (status = 422, body = DetailBody), (status = 501, body = DetailBody)))]
pub async fn install_package(
    caller: Caller,
    LaxJson(body): LaxJson<InstallBody>,
) -> Result<Json<InstallResponse>, DetailError> {
    let session = require(&caller, &body.user_id)?;
    let output = install_into_session(&caller, &session, &body.package_name).await?;
    Ok(Json(InstallResponse { message: format!("Successfully installed and imported {}", body.package_name), output }))
}

/// Installs `package` into the session (`SessionManager::install_packages`: the session has no network; a
/// fetcher downloads into the shared cache) and imports it; returns the installer's log. A package whose
/// import name is not its distribution name (`scikit-learn` is `sklearn`) is installed all the same; the
/// log then says the import did not work.
pub async fn install_into_session(
    caller: &Caller,
    session: &SessionInfo,
    package: &str,
) -> Result<String, DetailError> {
    let report = caller.manager.install_packages(&caller.owner, session.id.as_str(), &[package.to_owned()]).await?;
    if !report.ok {
        let why: Vec<String> = report.packages.iter().filter_map(|p| p.error.clone()).collect();
        return Err(DetailError::new(
            StatusCode::BAD_REQUEST,
            format!("could not install {package}: {}", why.join("; ")),
        ));
    }
    let mut log = report.log;
    let module = report.packages.first().map(|p| p.name.replace('-', "_")).unwrap_or_default();
    if !module.is_empty() && module.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
        let result =
            caller.manager.execute(&caller.owner, session.id.as_str(), format!("import {module}"), Some(60)).await?;
        if result.status != ExecStatus::Ok {
            let why = result.error.map(|e| format!("{}: {}", e.ename, e.evalue)).unwrap_or_default();
            log.push_str(&format!("\n(installed; `import {module}` did not work: {why})\n"));
        }
    }
    Ok(log)
}

/// Give the user's session a fresh kernel: variables and imports are gone; the session, its container
/// and its files stay.
#[utoipa::path(post, path = "/reset", operation_id = "session_api_reset", tag = "session API",
    request_body(content = UserForm, content_type = "multipart/form-data"),
    responses((status = 200, body = MessageResponse), (status = 404, body = DetailBody), (status = 422, body = DetailBody)))]
pub async fn reset(caller: Caller, form: FormFields) -> Result<Json<MessageResponse>, DetailError> {
    let session = require(&caller, form.required("user_id")?)?;
    caller.manager.restart(&caller.owner, session.id.as_str()).await?;
    Ok(Json(MessageResponse { message: "Kernel reset successful".into() }))
}

/// End the user's session: its container is removed.
#[utoipa::path(post, path = "/end_session", operation_id = "session_api_end_session", tag = "session API",
    request_body(content = UserForm, content_type = "multipart/form-data"),
    responses((status = 200, body = MessageResponse), (status = 404, body = DetailBody), (status = 422, body = DetailBody)))]
pub async fn end_session(caller: Caller, form: FormFields) -> Result<Json<MessageResponse>, DetailError> {
    let session = require(&caller, form.required("user_id")?)?;
    caller.manager.delete(&caller.owner, session.id.as_str()).await?;
    Ok(Json(MessageResponse { message: "Session ended successfully".into() }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_that_could_reach_a_path_or_label_badly_are_refused() {
        for ok in ["user_test", "a", "A.b-c_9", &"x".repeat(64)] {
            assert!(UserId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "..", "a/b", "../x", "a b", "é", "a\0b", "a\nb", &"x".repeat(65)] {
            let e = UserId::parse(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY, "{bad:?}");
        }
        assert_eq!(notebook(&UserId::parse("user_test").unwrap()), "user_test/notebook_user_test.ipynb");
    }
}
