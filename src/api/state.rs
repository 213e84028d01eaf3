//! What every handler can reach: the session manager, the `/jupyter` API's file store and the signer of
//! file links, shared by the router with each request; and [`Caller`], the same for one request's owner.

use std::sync::Arc;

use axum::Extension;
use axum::extract::FromRequestParts;
use axum::extract::rejection::ExtensionRejection;
use axum::http::request::Parts;

use crate::links::UrlSigner;
use crate::session::{Owner, SessionManager};
use crate::store::FileStore;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<SessionManager>,
    /// The `/jupyter` API's files.
    pub store: Arc<FileStore>,
    /// Signs the file URLs handlers return; `None`: links are not signed.
    pub links: Option<Arc<UrlSigner>>,
}

/// The manager and the store, acting for the request's [`Owner`] (which the key check, `auth::require_key`,
/// put in the request): what a handler behind the key needs to call them for its caller.
pub struct Caller {
    pub manager: Arc<SessionManager>,
    /// The `/jupyter` API's files.
    pub store: Arc<FileStore>,
    /// Whose sessions and files these are: a digest of the request's API key.
    pub owner: Owner,
    /// Signs the file URLs handlers return; `None`: links are not signed.
    pub links: Option<Arc<UrlSigner>>,
}

impl FromRequestParts<AppState> for Caller {
    /// Only when a route lacks the key check (a bug): axum's own rejection, a 500.
    type Rejection = ExtensionRejection;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Extension(owner) = Extension::<Owner>::from_request_parts(parts, state).await?;
        Ok(Caller { manager: state.manager.clone(), store: state.store.clone(), owner, links: state.links.clone() })
    }
}
