//! API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>`, compared in constant time. The owner of
//! a session is a digest of the key that made it. The request limit (off by default) is applied here,
//! once the key is known to be valid.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ring::digest;
use subtle::ConstantTimeEq;

use super::rate_limit::{RateLimiter, client_key};
use crate::error::ApiError;
use crate::node::OWNER_HEADER;
use crate::session::Owner;

/// The configured keys, kept as SHA-256 digests so that comparison also hides their lengths; or, on a
/// cluster's agent, no keys at all: the owner is the digest an authenticated API replica passes in
/// [`OWNER_HEADER`] (trusted because the agent's router is served only over mutual TLS).
#[derive(Clone, Default)]
pub struct Keys {
    digests: Vec<[u8; 32]>,
    /// An agent's mode: the owner is [`OWNER_HEADER`], required on every keyed route.
    trust_owner_header: bool,
}

/// The longest owner digest an API replica may pass.
const MAX_OWNER: usize = 64;

impl Keys {
    pub fn new(keys: &[String]) -> Self {
        Keys {
            digests: keys.iter().filter(|k| !k.trim().is_empty()).map(|k| sha256(k.trim())).collect(),
            trust_owner_header: false,
        }
    }

    /// An agent's: no API keys; the owner is the [`OWNER_HEADER`] an API replica sets after its own key
    /// check.
    pub fn trusting_owner_header() -> Self {
        Keys { digests: Vec::new(), trust_owner_header: true }
    }

    /// Whether this is an agent's: the owner comes from [`OWNER_HEADER`].
    pub fn trusts_owner_header(&self) -> bool {
        self.trust_owner_header
    }

    /// Whether requests speak for no key at all (everyone is `anonymous`).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty() && !self.trust_owner_header
    }

    /// Whether the request names its owner the way this server reads it (a key, or on an agent the owner
    /// header), valid or not: such a request is never taken for a signed link's.
    pub fn presented(&self, headers: &HeaderMap) -> bool {
        match self.trust_owner_header {
            true => headers.contains_key(OWNER_HEADER),
            false => presents_key(headers),
        }
    }

    /// The owner the request speaks for, or why not.
    pub fn owner(&self, headers: &HeaderMap) -> Result<Owner, ApiError> {
        if self.trust_owner_header {
            return owner_from_header(headers);
        }
        if self.digests.is_empty() {
            return Ok(Owner("anonymous".into()));
        }
        let presented = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            // `token <key>` is how Jupyter servers and their gateway client send it; the gateway client with an
            // empty `auth_scheme` sends the bare key.
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
                    .or_else(|| v.strip_prefix("token "))
                    .or_else(|| (!v.is_empty() && !v.contains(' ')).then_some(v))
            })
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "an API key is required: `Authorization: Bearer <key>` or `X-API-Key: <key>`",
                )
            })?;
        let d = sha256(presented);
        // Check every key, so timing does not tell which one matched.
        let matched = self.digests.iter().fold(0u8, |acc, k| acc | k.ct_eq(&d).unwrap_u8());
        if matched == 1 {
            Ok(owner_of(&d))
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "the API key is not valid"))
        }
    }

    /// Every owner a request can act for: one per key (`anonymous` without keys; on an agent, none known
    /// in advance). A signed link is checked against each.
    pub fn owners(&self) -> Vec<Owner> {
        if self.trust_owner_header {
            return Vec::new();
        }
        match self.digests.is_empty() {
            true => vec![Owner("anonymous".into())],
            false => self.digests.iter().map(owner_of).collect(),
        }
    }
}

/// The owner an API replica named in [`OWNER_HEADER`]: 1 to 64 ASCII letters and digits (a key's digest,
/// or `anonymous`), else a 400 that says so; a missing one is a 401.
fn owner_from_header(headers: &HeaderMap) -> Result<Owner, ApiError> {
    let mut values = headers.get_all(OWNER_HEADER).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        let missing = !headers.contains_key(OWNER_HEADER);
        return Err(match missing {
            true => ApiError::new(
                StatusCode::UNAUTHORIZED,
                "owner_required",
                format!(
                    "this is a cluster agent: every request names its owner in `{OWNER_HEADER}` (set by an API replica)"
                ),
            ),
            false => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_owner",
                format!("`{OWNER_HEADER}` is given more than once"),
            ),
        });
    };
    let owner = value.as_bytes();
    if owner.is_empty() || owner.len() > MAX_OWNER || !owner.iter().all(u8::is_ascii_alphanumeric) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_owner",
            format!("`{OWNER_HEADER}` must be 1 to {MAX_OWNER} ASCII letters and digits (an owner digest)"),
        ));
    }
    Ok(Owner(String::from_utf8_lossy(owner).into_owned()))
}

/// Whether the request carries an API key (valid or not) in one of the headers [`Keys::owner`] reads.
pub fn presents_key(headers: &HeaderMap) -> bool {
    headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key")
}

/// The owner of a key: the first 8 bytes of its digest, in hex.
fn owner_of(digest: &[u8; 32]) -> Owner {
    Owner(hex::encode(&digest[..8]))
}

fn sha256(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest::digest(&digest::SHA256, s.as_bytes()).as_ref());
    out
}

/// Who may call the API, and how often.
#[derive(Clone)]
pub struct Access {
    pub keys: Keys,
    /// The request limit; `None`: off (the default).
    pub limiter: Option<Arc<RateLimiter>>,
}

/// Middleware: puts the request's [`Owner`] into its extensions, or answers 401; then spends a token of
/// the caller's bucket (the key's, or the client address's without keys) when the request limit is on,
/// or answers 429.
pub async fn require_key(State(access): State<Access>, mut req: Request, next: Next) -> Response {
    let owner = match access.keys.owner(req.headers()) {
        Ok(owner) => owner,
        Err(e) => return e.into_response(),
    };
    let refused = match access.keys.is_empty() {
        true => access.spend_by_address(&req),
        false => access.spend(&format!("key:{}", owner.0), "API key"),
    };
    if let Some(refused) = refused {
        return refused;
    }
    req.extensions_mut().insert(owner);
    next.run(req).await
}

impl Access {
    /// Spends a token of `bucket`; when there is none, the 429 to answer (`who` names the bucket in it).
    fn spend(&self, bucket: &str, who: &str) -> Option<Response> {
        let limiter = self.limiter.as_ref()?;
        limiter.check(bucket, who, Instant::now()).err().map(IntoResponse::into_response)
    }

    /// Spends a token of the bucket of the request's client address (IPv6: its /64); when there is none,
    /// the 429 to answer.
    pub fn spend_by_address(&self, req: &Request) -> Option<Response> {
        let bucket = match req.extensions().get::<ConnectInfo<SocketAddr>>() {
            Some(ConnectInfo(addr)) => client_key(addr.ip()),
            None => "ip:unknown".to_owned(),
        };
        self.spend(&bucket, "client address")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, value.parse().unwrap());
        h
    }

    #[test]
    fn without_keys_everyone_is_anonymous() {
        assert_eq!(Keys::new(&[]).owner(&HeaderMap::new()).unwrap(), Owner("anonymous".into()));
    }

    #[test]
    fn either_header_carries_the_key_and_each_key_is_its_own_owner() {
        let keys = Keys::new(&["alpha".into(), "beta".into()]);
        let a = keys.owner(&headers("authorization", "Bearer alpha")).unwrap();
        let a2 = keys.owner(&headers("x-api-key", "alpha")).unwrap();
        let b = keys.owner(&headers("x-api-key", "beta")).unwrap();
        assert_eq!(keys.owner(&headers("authorization", "token alpha")).unwrap(), a, "as Jupyter sends it");
        assert_eq!(keys.owner(&headers("authorization", "alpha")).unwrap(), a, "the gateway client without a scheme");
        assert_eq!(a, a2);
        assert_ne!(a, b);
        assert!(!a.0.contains("alpha"));
        assert_eq!(keys.owners(), [a, b], "the candidates for a signed link");
        assert_eq!(Keys::new(&[]).owners(), [Owner("anonymous".into())]);
    }

    #[test]
    fn an_agent_trusts_the_owner_header_and_nothing_else() {
        let keys = Keys::trusting_owner_header();
        assert_eq!(keys.owner(&headers(OWNER_HEADER, "a")).unwrap(), Owner("a".into()));
        assert_eq!(keys.owner(&headers(OWNER_HEADER, "0123456789abcdef")).unwrap(), Owner("0123456789abcdef".into()));
        assert_eq!(keys.owner(&HeaderMap::new()).unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            keys.owner(&headers("authorization", "Bearer alpha")).unwrap_err().status,
            StatusCode::UNAUTHORIZED,
            "an API key means nothing to an agent"
        );
        for bad in ["", "../x", "a b", "é", &"a".repeat(65)] {
            let mut h = HeaderMap::new();
            h.insert(OWNER_HEADER, axum::http::HeaderValue::from_bytes(bad.as_bytes()).unwrap());
            assert_eq!(keys.owner(&h).unwrap_err().status, StatusCode::BAD_REQUEST, "{bad:?}");
        }
        let mut two = headers(OWNER_HEADER, "a");
        two.append(OWNER_HEADER, "b".parse().unwrap());
        assert_eq!(keys.owner(&two).unwrap_err().status, StatusCode::BAD_REQUEST);
        assert!(!keys.is_empty() && keys.owners().is_empty());
        assert!(keys.presented(&headers(OWNER_HEADER, "a")));
        assert!(!keys.presented(&headers("x-api-key", "alpha")), "a key is not how an agent's caller is named");
    }

    #[test]
    fn a_missing_or_wrong_key_is_refused() {
        let keys = Keys::new(&["alpha".into()]);
        assert_eq!(keys.owner(&HeaderMap::new()).unwrap_err().status, StatusCode::UNAUTHORIZED);
        assert_eq!(keys.owner(&headers("x-api-key", "alph")).unwrap_err().status, StatusCode::UNAUTHORIZED);
    }
}
