//! The API's error type and its JSON shape: `{"error": {"code", "message"}}`. A client's mistake is a 4xx;
//! a 5xx means a broken dependency (503, Docker down) or a bug (500), and is logged with its cause.

use std::time::Duration;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::egress::allow::ListRefused;
use crate::packages::PackageError;
use crate::runtime::RuntimeError;
use crate::session::SessionError;
use crate::session::costs::Limit;
use crate::session::files::FileError;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// A limit that was met: how long until the request would pass (sent as `Retry-After`).
    pub retry_after: Option<Duration>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// A stable, machine-readable code (`not_found`, `invalid_request`, `queue_full`, ...).
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after: None }
    }

    /// The same error, telling the client to retry after `wait`.
    pub fn retry_after(mut self, wait: Duration) -> Self {
        self.retry_after = Some(wait);
        self
    }
}

/// `response` with `Retry-After: <wait in whole seconds, at least 1>`.
pub fn with_retry_after(mut response: Response, wait: Option<Duration>) -> Response {
    if let Some(wait) = wait {
        let secs = crate::rate::retry_after_secs(wait);
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, message = %self.message, "request failed");
        }
        let body = ErrorBody { error: ErrorDetail { code: self.code.into(), message: self.message } };
        with_retry_after((self.status, Json(body)).into_response(), self.retry_after)
    }
}

fn file_status(e: &FileError) -> (StatusCode, &'static str) {
    match e {
        FileError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_path"),
        FileError::NotFound(_) => (StatusCode::NOT_FOUND, "file_not_found"),
        FileError::Outside(_) => (StatusCode::FORBIDDEN, "outside_working_directory"),
        FileError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
        FileError::Conflict(_) => (StatusCode::CONFLICT, "wrong_kind"),
        FileError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "too_large"),
        FileError::NoSpace(_) => (StatusCode::INSUFFICIENT_STORAGE, "disk_full"),
        FileError::Busy(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_transfers"),
        FileError::NotRunning(_) => (StatusCode::CONFLICT, "session_not_running"),
        FileError::Stalled => (StatusCode::REQUEST_TIMEOUT, "transfer_stalled"),
        FileError::Tool(_) => (StatusCode::BAD_GATEWAY, "file_tool_failed"),
        FileError::Runtime(RuntimeError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "docker_unavailable"),
        FileError::Runtime(_) => (StatusCode::BAD_GATEWAY, "docker_error"),
    }
}

fn package_status(e: &PackageError) -> (StatusCode, &'static str) {
    match e {
        PackageError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_package_spec"),
        PackageError::Unsupported(_) => (StatusCode::BAD_REQUEST, "not_supported"),
        PackageError::Busy => (StatusCode::CONFLICT, "install_running"),
        PackageError::TooManyFetches => (StatusCode::TOO_MANY_REQUESTS, "too_many_downloads"),
        PackageError::TimedOut(_) => (StatusCode::GATEWAY_TIMEOUT, "install_timeout"),
        PackageError::NotRunning => (StatusCode::CONFLICT, "session_not_running"),
        PackageError::Fetcher(_) => (StatusCode::BAD_GATEWAY, "fetcher_failed"),
        PackageError::Runtime(RuntimeError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "docker_unavailable"),
        PackageError::Runtime(RuntimeError::NotFound(_)) => (StatusCode::CONFLICT, "session_not_running"),
        PackageError::Runtime(RuntimeError::Api { status: 409, .. }) => (StatusCode::CONFLICT, "session_not_running"),
        PackageError::Runtime(_) => (StatusCode::BAD_GATEWAY, "docker_error"),
        PackageError::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        use SessionError as E;
        let message = e.to_string();
        let (status, code) = match &e {
            E::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            E::Lost(_) => (StatusCode::GONE, "session_lost"),
            E::UnknownLanguage(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_language"),
            E::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            E::RuntimeRefused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "runtime_not_allowed"),
            E::Network(refused) => match refused {
                ListRefused::Off => (StatusCode::FORBIDDEN, "network_off"),
                ListRefused::Forbidden { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "network_forbidden"),
                ListRefused::Invalid { .. } | ListRefused::TooMany { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid_network")
                }
            },
            E::ImageMissing(_) => (StatusCode::SERVICE_UNAVAILABLE, "image_missing"),
            E::TooMany(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_sessions"),
            E::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, "queue_full"),
            E::RateLimited(limited) => (
                StatusCode::TOO_MANY_REQUESTS,
                match limited.limit {
                    Limit::Creates => "create_rate_limited",
                    Limit::Installs => "install_rate_limited",
                    Limit::UploadBytes => "upload_rate_limited",
                },
            ),
            E::Closing => (StatusCode::CONFLICT, "session_closing"),
            E::NoInputWaiting => (StatusCode::CONFLICT, "no_input_waiting"),
            E::KernelStart(_) => (StatusCode::SERVICE_UNAVAILABLE, "kernel_start_failed"),
            E::Runtime(RuntimeError::Unavailable(_)) => (StatusCode::SERVICE_UNAVAILABLE, "docker_unavailable"),
            E::Runtime(_) => (StatusCode::BAD_GATEWAY, "docker_error"),
            E::Kernel(_) => (StatusCode::BAD_GATEWAY, "kernel_error"),
            E::File(f) => file_status(f),
            E::Package(p) => package_status(p),
            E::Io(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        let retry_after = match &e {
            E::RateLimited(limited) => Some(limited.retry_after),
            _ => None,
        };
        ApiError { status, code, message, retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::compat::DetailError;
    use crate::rate::RateLimit;
    use crate::session::costs::Limited;

    async fn parts(r: Response) -> (StatusCode, String, serde_json::Value) {
        let retry_after =
            r.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, retry_after, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_limit_met_is_a_429_with_retry_after_naming_the_limit_in_both_shapes() {
        let limited = || {
            SessionError::from(Limited {
                limit: Limit::Installs,
                rate: RateLimit { per_minute: 120, burst: 60 },
                retry_after: Duration::from_millis(2500),
            })
        };
        let (status, retry_after, v) = parts(ApiError::from(limited()).into_response()).await;
        assert_eq!((status, retry_after.as_str()), (StatusCode::TOO_MANY_REQUESTS, "3"));
        assert_eq!(v["error"]["code"], "install_rate_limited");
        assert!(v["error"]["message"].as_str().unwrap().starts_with("too many package installs for this API key"));
        let (status, retry_after, v) = parts(DetailError::from(limited()).into_response()).await;
        assert_eq!((status, retry_after.as_str()), (StatusCode::TOO_MANY_REQUESTS, "3"));
        assert!(v["detail"].as_str().unwrap().starts_with("too many package installs"), "{v}");
        let (_, retry_after, _) = parts(ApiError::from(SessionError::QueueFull(8)).into_response()).await;
        assert_eq!(retry_after, "", "only a limit with a refill says when to retry");
    }

    #[tokio::test]
    async fn a_session_lost_to_fencing_is_gone_in_both_shapes() {
        let lost = || SessionError::Lost("0123456789abcdef0123abcd".into());
        let (status, _, v) = parts(ApiError::from(lost()).into_response()).await;
        assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::GONE, Some("session_lost")));
        let (status, _, v) = parts(DetailError::from(lost()).into_response()).await;
        assert_eq!(status, StatusCode::GONE);
        assert!(v["detail"].as_str().unwrap().contains("was lost"), "{v}");
    }
}
