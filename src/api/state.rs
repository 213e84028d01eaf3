//! What every handler can reach: the session manager and the `/jupyter` API's file store, shared by the
//! router with each request.

use std::sync::Arc;

use crate::session::SessionManager;
use crate::store::FileStore;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<SessionManager>,
    /// The `/jupyter` API's files.
    pub store: Arc<FileStore>,
}
