//! The interactive docs: Swagger UI (vendored in the binary: no network at build or run time) at `/docs`
//! and `/docs/`, over the OpenAPI document at `/openapi.json`. No key, no rate limit.
//!
//! `/docs` answers the page itself, as FastAPI does, rather than a redirect to `/docs/`: `curl`, link
//! checkers and health probes that do not follow redirects see a 200. The page loads its assets by relative
//! URLs (`./swagger-ui.css`), which from `/docs` would point at `/swagger-ui.css`; so that copy of the page
//! starts with `<base href="docs/">`, itself relative, so the page still works behind a proxy that serves
//! the API under a path prefix.

use std::sync::Arc;

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa_swagger_ui::Config;

use super::openapi::ApiDoc;

/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/openapi.json";
/// What the page at `/docs` (no slash) gets, so that its relative asset URLs resolve under `/docs/`.
const BASE: &str = "<base href=\"docs/\">";

/// The docs' routes.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let config = Arc::new(Config::new([OPENAPI_PATH]));
    let document = ApiDoc::openapi().to_json().expect("the OpenAPI document serializes");
    let page = config.clone();
    let assets = config.clone();
    Router::new()
        .route(OPENAPI_PATH, get(move || std::future::ready(json(document.clone()))))
        .route("/docs", get(move || std::future::ready(index(&page))))
        .route("/docs/", get(move || std::future::ready(asset("", &config))))
        .route("/docs/{*rest}", get(move |Path(rest): Path<String>| std::future::ready(asset(&rest, &assets))))
}

fn json(document: String) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// The page as `/docs/` serves it, with [`BASE`] first in its head.
fn index(config: &Arc<Config<'static>>) -> Response {
    let Ok(Some(file)) = utoipa_swagger_ui::serve("index.html", config.clone()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let html = String::from_utf8_lossy(&file.bytes).replacen("<head>", &format!("<head>\n    {BASE}"), 1);
    ([(header::CONTENT_TYPE, "text/html")], html).into_response()
}

/// A file of Swagger UI (`""`: the page), as the crate's own axum integration serves it.
fn asset(path: &str, config: &Arc<Config<'static>>) -> Response {
    match utoipa_swagger_ui::serve(path, config.clone()) {
        Ok(Some(file)) => {
            let mut response = file.bytes.into_owned().into_response();
            let headers = response.headers_mut();
            if let Ok(content_type) = HeaderValue::from_str(&file.content_type) {
                headers.insert(header::CONTENT_TYPE, content_type);
            }
            if file.gzpipped {
                headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            }
            response
        }
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(e) => {
            tracing::error!(error = %e, path, "Swagger UI could not serve a file");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;

    async fn get(path: &str) -> (StatusCode, String, String) {
        let request = axum::http::Request::builder().uri(path).body(Body::empty()).unwrap();
        let response = routes::<()>().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type =
            response.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 16 << 20).await.unwrap();
        (status, content_type, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn the_page_is_served_with_and_without_the_slash_and_its_assets_resolve_from_both() {
        let (status, content_type, slash) = get("/docs/").await;
        assert_eq!((status, content_type.as_str()), (StatusCode::OK, "text/html"));
        assert!(slash.contains("./swagger-ui-bundle.js") && !slash.contains("<base"), "{slash}");
        let (status, content_type, bare) = get("/docs").await;
        assert_eq!((status, content_type.as_str()), (StatusCode::OK, "text/html"), "a page, not a redirect");
        assert!(bare.contains("<head>\n    <base href=\"docs/\">"), "{bare}");
        assert_eq!(bare.replacen(&format!("\n    {BASE}"), "", 1), slash, "the same page otherwise");

        let (status, _, init) = get("/docs/swagger-initializer.js").await;
        assert_eq!(status, StatusCode::OK);
        assert!(init.contains("\"url\": \"/openapi.json\""), "{init}");
        let (status, content_type, _) = get("/docs/swagger-ui.css").await;
        assert_eq!((status, content_type.as_str()), (StatusCode::OK, "text/css"));
        assert_eq!(get("/docs/nothing.js").await.0, StatusCode::NOT_FOUND);
        let (status, content_type, document) = get(OPENAPI_PATH).await;
        assert_eq!((status, content_type.as_str()), (StatusCode::OK, "application/json"));
        assert!(document.contains("\"/v1/sessions\""));
    }
}
