//! The last word on error responses: any 4xx or 5xx that is not already JSON (axum's extractor rejections,
//! e.g. a path that is not valid UTF-8; the docs' 404s; anything a future layer adds) is rewritten into
//! `{"error": {"code", "message"}}` with the same status and headers, so a client never has to parse
//! plain text. (Errors hyper answers itself before a request exists, such as an over-long URI or a header
//! timeout, never reach this layer: those are a bare status line or a closed connection.)

use axum::body::to_bytes;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// Bodies of error responses longer than this are not quoted.
const QUOTE_LIMIT: usize = 4096;

/// `map_response` middleware.
pub async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) || is_json(&response) {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = to_bytes(body, QUOTE_LIMIT).await.ok().map(|b| String::from_utf8_lossy(&b).trim().to_owned());
    let message = match text {
        Some(t) if !t.is_empty() => t,
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let mut rewritten = ApiError::new(status, code(status), message).into_response();
    for (name, value) in &parts.headers {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rewritten.headers_mut().append(name, value.clone());
        }
    }
    rewritten
}

fn is_json(response: &Response) -> bool {
    response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json") || v.starts_with("application/problem+json"))
}

fn code(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "invalid_request",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_client_error() => "client_error",
        _ => "internal",
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;

    use super::*;

    async fn body_json(r: Response) -> serde_json::Value {
        serde_json::from_slice(&to_bytes(r.into_body(), usize::MAX).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn plain_text_errors_become_json_with_their_status_and_headers() {
        let plain = (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/plain"), (header::RETRY_AFTER, "3")],
            "Invalid URL: bad utf-8",
        )
            .into_response();
        let r = json_errors(plain).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(r.headers()[header::RETRY_AFTER], "3");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let v = body_json(r).await;
        assert_eq!(v["error"]["code"], "bad_request");
        assert_eq!(v["error"]["message"], "Invalid URL: bad utf-8");
    }

    #[tokio::test]
    async fn an_empty_error_gets_its_reason_and_json_or_success_is_untouched() {
        let v = body_json(json_errors(StatusCode::NOT_FOUND.into_response()).await).await;
        assert_eq!(v["error"]["code"], "not_found");
        assert_eq!(v["error"]["message"], "not found");
        let ok = json_errors((StatusCode::OK, "fine").into_response()).await;
        assert_eq!(to_bytes(ok.into_body(), 100).await.unwrap(), "fine");
        let already = ApiError::new(StatusCode::CONFLICT, "session_closing", "x").into_response();
        assert_eq!(body_json(json_errors(already).await).await["error"]["code"], "session_closing");
    }

    #[tokio::test]
    async fn a_long_error_body_is_not_quoted() {
        let long = (StatusCode::BAD_GATEWAY, Body::from("x".repeat(QUOTE_LIMIT + 1))).into_response();
        let v = body_json(json_errors(long).await).await;
        assert_eq!(v["error"]["message"], "bad gateway");
    }
}
