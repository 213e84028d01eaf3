//! Signed file links over HTTP: the URLs handlers return for files, signed with [`crate::links`], and the
//! middleware in front of the two download routes that admits a request by its link instead of a key.
//!
//! Two shapes, one signature (over the owner, the expiry and the *resource path*):
//! - `/v1`: `/v1/sessions/{id}/files/{path}?expires=<epoch s>&signature=<sig>`, S3's presigned form; the
//!   resource is the URL's path.
//! - `/jupyter`: `<base>/jupyter/files/signed/<expires>/<sig>/<name>`; the resource is
//!   `/jupyter/files/<name>`. In the path rather than a query, because that API's clients take the URL's
//!   last part as the stored name that code reads at `/mnt/files/<name>`: a query would end up in it.
//!
//! A request that carries an API key (`Authorization` or `X-API-Key`) is the key's, as before: its link
//! is not looked at. One without is the link's: a valid one acts for the owner it was made for on that GET
//! only (the route's handler does the rest, so another owner's or a deleted session's file is still a 404);
//! an altered, another file's or an expired link is a 403. Links spend their client address's rate-limit
//! bucket, never their owner's. Signatures stay out of the log: request paths are logged, queries are not,
//! and a `/jupyter` link's path is logged with its signature left out ([`loggable_path`]).

use std::sync::Arc;

use axum::extract::{OriginalUri, Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::{self, Access};
use crate::error::ApiError;
use crate::links::UrlSigner;
use crate::session::Owner;

/// Where the `/jupyter` API's signed links live: `<PREFIX><expires>/<signature>/<name>`.
pub const JUPYTER_PREFIX: &str = "/jupyter/files/signed/";

/// How a route's links carry their expiry and signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkForm {
    /// `?expires=&signature=` on the resource's own URL (`/v1`).
    Query,
    /// `/jupyter/files/signed/<expires>/<signature>/<name>`.
    JupyterPath,
}

/// What the middleware in front of a download route needs.
#[derive(Clone)]
pub struct SignedAccess {
    /// The key check, for requests with a key (and links' rate limit).
    pub access: Access,
    /// `None`: this server signs no links, and accepts none.
    pub signer: Option<Arc<UrlSigner>>,
    /// Every owner the server knows: the candidates a link is checked against.
    pub owners: Candidates,
    pub form: LinkForm,
}

/// The owners a link may have been made for.
#[derive(Clone)]
pub enum Candidates {
    /// One per API key (or `anonymous`): a single node's.
    Fixed(Arc<[Owner]>),
    /// Those with something on this node now (sessions, stored files): a cluster agent's, which has no
    /// keys; a link is only ever made for such an owner, by this node.
    Known(Arc<dyn Fn() -> Vec<Owner> + Send + Sync>),
}

impl Candidates {
    fn owners(&self) -> Arc<[Owner]> {
        match self {
            Candidates::Fixed(owners) => owners.clone(),
            Candidates::Known(known) => known().into(),
        }
    }
}

/// A link as presented: what it says it grants.
#[derive(Debug, PartialEq)]
struct Presented {
    resource: String,
    expires: i64,
    signature: String,
}

/// Middleware: a request with a key goes through the key check; one with a link, through the link's.
pub async fn key_or_link(State(signed): State<SignedAccess>, mut req: Request, next: Next) -> Response {
    let uri = req.extensions().get::<OriginalUri>().map_or_else(|| req.uri().clone(), |o| o.0.clone());
    let reads = req.method() == Method::GET || req.method() == Method::HEAD;
    let presented = match signed.access.keys.presented(req.headers()) || !reads {
        true => None,
        false => presented(signed.form, &uri),
    };
    let presented = match presented {
        None => return auth::require_key(State(signed.access), req, next).await,
        Some(Err(why)) => return forbidden("invalid_link", why),
        Some(Ok(p)) => p,
    };
    let Some(signer) = &signed.signer else {
        return forbidden("invalid_link", "this server does not accept signed links: send the API key".into());
    };
    let owners = signed.owners.owners();
    let Some(owner) = signer.owner_of(&owners, &presented.resource, presented.expires, &presented.signature) else {
        return forbidden(
            "invalid_signature",
            "the link's signature is not valid: it was altered, belongs to another file, or its API key was removed"
                .into(),
        );
    };
    if chrono::Utc::now().timestamp() >= presented.expires {
        let at = chrono::DateTime::from_timestamp(presented.expires, 0).map(|t| t.to_rfc3339()).unwrap_or_default();
        return forbidden(
            "link_expired",
            format!("the link expired ({at}); ask for the file again with the API key for a new one"),
        );
    }
    if let Some(refused) = signed.access.spend_by_address(&req) {
        return refused;
    }
    req.extensions_mut().insert(owner.clone());
    next.run(req).await
}

fn forbidden(code: &'static str, message: String) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, code, message).into_response()
}

/// The link in `uri`: `None` when it has none (a `/v1` URL without `signature`), `Err` when it is
/// malformed.
fn presented(form: LinkForm, uri: &Uri) -> Option<Result<Presented, String>> {
    match form {
        LinkForm::Query => {
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(uri.query().unwrap_or("")).ok()?;
            let one = |name: &str| {
                let mut values = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v.clone());
                match (values.next(), values.next()) {
                    (Some(v), None) => Ok(Some(v)),
                    (None, _) => Ok(None),
                    (Some(_), Some(_)) => Err(format!("`{name}` is given more than once")),
                }
            };
            let (signature, expires) = match (one("signature"), one("expires")) {
                (Ok(None), Ok(None)) => return None,
                (Ok(s), Ok(e)) => (s, e),
                (Err(why), _) | (_, Err(why)) => return Some(Err(why)),
            };
            let (Some(signature), Some(expires)) = (signature, expires) else {
                return Some(Err("a signed link has both `expires` and `signature`".into()));
            };
            Some(expiry(&expires).map(|expires| Presented { resource: uri.path().to_owned(), expires, signature }))
        }
        LinkForm::JupyterPath => {
            let rest = uri.path().strip_prefix(JUPYTER_PREFIX)?;
            let mut parts = rest.splitn(3, '/');
            let (Some(expires), Some(signature), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
                return Some(Err("not a signed link: /jupyter/files/signed/<expires>/<signature>/<name>".into()));
            };
            Some(expiry(expires).map(|expires| Presented {
                resource: jupyter_resource(name),
                expires,
                signature: signature.to_owned(),
            }))
        }
    }
}

/// An expiry as links write it: seconds since the epoch, digits only.
fn expiry(text: &str) -> Result<i64, String> {
    let ok = !text.is_empty() && text.len() <= 12 && text.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| text.parse().ok()).flatten().ok_or_else(|| "`expires` is not a time (seconds since 1970)".into())
}

/// `path` as the request log shows it: a `/jupyter` link's signature left out, so that the log grants no
/// file.
pub fn loggable_path(path: &str) -> std::borrow::Cow<'_, str> {
    let Some(rest) = path.strip_prefix(JUPYTER_PREFIX) else { return path.into() };
    match rest.splitn(3, '/').collect::<Vec<_>>()[..] {
        [expires, _, name] => format!("{JUPYTER_PREFIX}{expires}/-/{name}").into(),
        _ => path.into(),
    }
}

fn jupyter_resource(name: &str) -> String {
    format!("/jupyter/files/{name}")
}

/// The URL of file `path` of `/v1` session `session`: signed for `owner` until `not_after` at the latest
/// (the session's end), or bare when links are off.
pub fn v1_file_url(
    signer: Option<&UrlSigner>,
    owner: &Owner,
    session: &str,
    path: &str,
    not_after: i64,
    now: i64,
) -> String {
    let resource = format!("/v1/sessions/{session}/files/{}", encode_path(path));
    match signer {
        Some(signer) => {
            let expires = signer.expiry(now, not_after);
            format!("{resource}?expires={expires}&signature={}", signer.sign(owner, &resource, expires))
        }
        None => resource,
    }
}

/// The URL of `owner`'s stored file `name` (`base` is `scheme://host`): a signed link that lives no longer
/// than the file (`expires_at`), or the bare URL when links are off.
pub fn jupyter_file_url(
    signer: Option<&UrlSigner>,
    owner: &Owner,
    base: &str,
    name: &str,
    expires_at: i64,
    now: i64,
) -> String {
    let resource = jupyter_resource(name);
    match signer {
        Some(signer) => {
            let expires = signer.expiry(now, expires_at);
            format!("{base}{JUPYTER_PREFIX}{expires}/{}/{name}", signer.sign(owner, &resource, expires))
        }
        None => format!("{base}{resource}"),
    }
}

/// A relative path with every byte but unreserved ones and `/` percent-encoded, as a client sends it (and
/// so as it is signed).
fn encode_path(path: &str) -> String {
    path.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn signer() -> Arc<UrlSigner> {
        Arc::new(UrlSigner::new(b"0123456789abcdef0123456789abcdef", Duration::from_secs(3600)))
    }

    fn owner() -> Owner {
        Owner("a1b2c3d4e5f60718".into())
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn v1_links_sign_their_encoded_path_and_live_at_most_the_session() {
        let s = signer();
        let url = v1_file_url(Some(&s), &owner(), "0123456789abcdef01234567", "outputs/a b.png", NOW + 60, NOW);
        let resource = "/v1/sessions/0123456789abcdef01234567/files/outputs/a%20b.png";
        let p = presented(LinkForm::Query, &uri(&url)).unwrap().unwrap();
        assert_eq!(p.resource, resource);
        assert_eq!(p.expires, NOW + 60, "the session ends first");
        assert!(bool::from(s.check(&owner(), resource, NOW + 60, &p.signature)));
        let long = v1_file_url(Some(&s), &owner(), "0123456789abcdef01234567", "x.png", NOW + 86400, NOW);
        assert!(long.contains(&format!("expires={}&", NOW + 3600)), "{long}");
        assert_eq!(v1_file_url(None, &owner(), "s", "x.png", NOW, NOW), "/v1/sessions/s/files/x.png");
    }

    #[test]
    fn jupyter_links_keep_the_stored_name_last_and_sign_the_plain_resource() {
        let s = signer();
        let name = "data-0123456789ab-1800001200.csv";
        let url = jupyter_file_url(Some(&s), &owner(), "http://h:1", name, NOW + 1200, NOW);
        assert!(url.starts_with("http://h:1/jupyter/files/signed/1800001200/"), "{url}");
        assert_eq!(url.rsplit('/').next(), Some(name), "code reads it at /mnt/files/<the URL's last part>");
        let p = presented(LinkForm::JupyterPath, &uri(url.strip_prefix("http://h:1").unwrap())).unwrap().unwrap();
        assert_eq!(p.resource, format!("/jupyter/files/{name}"));
        assert!(bool::from(s.check(&owner(), &p.resource, p.expires, &p.signature)));
        assert_eq!(
            jupyter_file_url(None, &owner(), "http://h", name, NOW, NOW),
            format!("http://h/jupyter/files/{name}")
        );
    }

    #[test]
    fn the_log_never_shows_a_signature() {
        let s = signer();
        let url = jupyter_file_url(Some(&s), &owner(), "", "a-0123456789ab-1800001200.png", NOW + 60, NOW);
        let p = presented(LinkForm::JupyterPath, &uri(&url)).unwrap().unwrap();
        let logged = loggable_path(&url);
        assert!(!logged.contains(&p.signature), "{logged}");
        assert_eq!(logged, format!("/jupyter/files/signed/{}/-/a-0123456789ab-1800001200.png", NOW + 60));
        assert_eq!(loggable_path("/v1/sessions/s/files/x.png"), "/v1/sessions/s/files/x.png");
    }

    #[test]
    fn malformed_links_are_errors_and_plain_urls_have_none() {
        assert_eq!(presented(LinkForm::Query, &uri("/v1/sessions/s/files/x")), None);
        assert_eq!(presented(LinkForm::Query, &uri("/v1/sessions/s/files/x?other=1")), None);
        for bad in [
            "/v1/sessions/s/files/x?signature=abc",
            "/v1/sessions/s/files/x?expires=1",
            "/v1/sessions/s/files/x?expires=soon&signature=abc",
            "/v1/sessions/s/files/x?expires=-1&signature=abc",
            "/v1/sessions/s/files/x?expires=1&expires=2&signature=abc",
            "/v1/sessions/s/files/x?expires=9999999999999&signature=abc",
        ] {
            assert!(matches!(presented(LinkForm::Query, &uri(bad)), Some(Err(_))), "{bad}");
        }
        assert!(matches!(presented(LinkForm::JupyterPath, &uri("/jupyter/files/signed/x/y/z")), Some(Err(_))));
        assert!(matches!(presented(LinkForm::JupyterPath, &uri("/jupyter/files/signed/1/y")), Some(Err(_))));
    }

    /// The middleware in front of a route that answers with the owner it was given.
    fn app(signer: Option<Arc<UrlSigner>>, keys: &[String]) -> Router {
        let keys = auth::Keys::new(keys);
        let owners: Arc<[Owner]> = keys.owners().into();
        let access = Access { keys, limiter: None };
        let signed = SignedAccess { access, signer, owners: Candidates::Fixed(owners), form: LinkForm::Query };
        let whose = |axum::Extension(owner): axum::Extension<Owner>| async move { owner.0 };
        Router::new()
            .route("/v1/sessions/{id}/files/{*path}", get(whose).put(whose))
            .layer(axum::middleware::from_fn_with_state(signed, key_or_link))
    }

    async fn call(app: &Router, method: Method, url: &str, key: Option<&str>) -> (StatusCode, String) {
        let mut request = axum::http::Request::builder().method(method).uri(url);
        if let Some(key) = key {
            request = request.header("x-api-key", key);
        }
        let response = app.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_link_opens_its_file_for_its_owner_and_nothing_else() {
        let keys = ["alpha".to_owned(), "beta".to_owned()];
        let alpha = auth::Keys::new(&keys).owners()[0].clone();
        let s = signer();
        let now = chrono::Utc::now().timestamp();
        let app = app(Some(s.clone()), &keys);
        let url = v1_file_url(Some(&s), &alpha, "0123456789abcdef01234567", "outputs/p.png", now + 600, now);
        assert_eq!(call(&app, Method::GET, &url, None).await, (StatusCode::OK, alpha.0.clone()));
        assert_eq!(call(&app, Method::HEAD, &url, None).await.0, StatusCode::OK);
        // The key still decides when one is sent, link or not; a wrong key is a 401 as before.
        assert_eq!(call(&app, Method::GET, &url, Some("beta")).await.0, StatusCode::OK);
        assert_eq!(call(&app, Method::GET, &url, Some("gamma")).await.0, StatusCode::UNAUTHORIZED);
        assert_eq!(call(&app, Method::GET, url.split('?').next().unwrap(), None).await.0, StatusCode::UNAUTHORIZED);
        // Another method, another path, another expiry, another signature: refused.
        assert_eq!(call(&app, Method::PUT, &url, None).await.0, StatusCode::UNAUTHORIZED);
        let other_path = url.replace("p.png", "q.png");
        let (status, body) = call(&app, Method::GET, &other_path, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("invalid_signature"), "{body}");
        let later = url.replace(&format!("expires={}", now + 600), &format!("expires={}", now + 601));
        assert_eq!(call(&app, Method::GET, &later, None).await.0, StatusCode::FORBIDDEN);
        let mut sig = url.clone();
        let last = sig.pop().unwrap();
        sig.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(call(&app, Method::GET, &sig, None).await.0, StatusCode::FORBIDDEN);
        // Expired: a valid signature says so.
        let old = v1_file_url(Some(&s), &alpha, "0123456789abcdef01234567", "outputs/p.png", now - 1, now - 10);
        let (status, body) = call(&app, Method::GET, &old, None).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert!(body.contains("link_expired"), "{body}");
        // A server without links accepts none; without the key that signed it, the link is dead.
        assert_eq!(call(&self::app(None, &keys), Method::GET, &url, None).await.0, StatusCode::FORBIDDEN);
        let without_alpha = self::app(Some(s), &keys[1..]);
        assert_eq!(call(&without_alpha, Method::GET, &url, None).await.0, StatusCode::FORBIDDEN);
    }
}
