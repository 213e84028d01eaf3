//! `/v1/sessions/{id}/packages`: install packages into a session (see `src/packages/`).

use axum::Json;
use axum::extract::Path;
use serde::Deserialize;

use super::extract::ApiJson;
use super::state::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::packages::InstallReport;

/// What to install.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstallRequest {
    /// Python: PEP 508 names with optional extras and version specifiers (`requests`, `pandas==2.2.*`);
    /// JavaScript/TypeScript: npm names with an optional version (`chalk@5`). No URLs, paths or options.
    #[schema(example = json!(["requests", "orjson>=3"]))]
    pub packages: Vec<String>,
}

/// Install packages into the session. The session itself has no network: wheels are fetched by a
/// short-lived fetcher container into a shared cache (unless the cache has them already) and installed
/// from it. After it, the packages import in the running kernel without a restart. 200 carries the
/// outcome per package (`ok: false` when the install failed; the session then keeps what it had). Installs
/// per API key are limited (`--install-limit-per-minute`): past it, 429 with `Retry-After`.
#[utoipa::path(post, path = "/v1/sessions/{id}/packages", request_body = InstallRequest, tag = "sessions",
    responses((status = 200, body = InstallReport), (status = 400, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn install(
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<InstallRequest>,
) -> Result<Json<InstallReport>, ApiError> {
    Ok(Json(caller.manager.install_packages(&caller.owner, &id, &req.packages).await?))
}
