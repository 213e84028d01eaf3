//! TEMPORARY (compat branch): the interface the lead's `create_with` / `collect_files` land with, so the
//! compatibility APIs compile before the merge. Replaced by main's versions at the merge.

use std::path::PathBuf;
use std::sync::Arc;

use super::error::SessionError;
use super::files::{self, Collected};
use super::manager::SessionManager;
use super::model::{Owner, SessionInfo, SessionRequest};

/// What a session gets besides its request.
#[derive(Debug, Clone, Default)]
pub struct SessionExtras {
    /// The notebook's path under the notebooks folder.
    pub notebook: Option<String>,
    /// Host directories (service-owned) bind-mounted read-only at the container paths.
    pub mounts: Vec<(PathBuf, String)>,
}

impl SessionManager {
    pub async fn create_with(
        self: &Arc<Self>,
        owner: Owner,
        req: SessionRequest,
        _extras: SessionExtras,
    ) -> Result<SessionInfo, SessionError> {
        self.create(owner, req).await
    }

    pub async fn collect_files(
        &self,
        owner: &Owner,
        id: &str,
        since_epoch_s: f64,
        max_files: usize,
        max_bytes: u64,
    ) -> Result<(Vec<Collected>, u64), SessionError> {
        let container = self.get(owner, id)?.snapshot().container_id;
        Ok(files::collect(self.runtime().as_ref(), &container, max_files, max_bytes, since_epoch_s).await?)
    }
}
