//! Files in and out of a running session, as the API asks for them: each call finds the session, keeps it
//! in use (never reaped mid-transfer) and holds one of its [`MAX_TRANSFERS`] slots while the file tool
//! (`files.rs`) runs through Docker's exec API. Also the images of an execution saved as files.

use std::sync::Arc;

use chrono::Utc;
use futures::StreamExt;

use crate::runtime::ContainerRuntime;

use super::error::SessionError;
use super::files::{self, Download, FileError, FilePath, Listing, Written};
use super::handle::{InUse, MAX_TRANSFERS, Session};
use super::model::{ExecuteResult, Owner};
use super::registry::Registry;

/// An image of an execution saved as a file in the session's working directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct SavedImage {
    /// The output (index in `outputs`) it was taken from.
    pub output_index: usize,
    pub mime: String,
    /// Relative to the working directory.
    pub path: String,
    pub size: u64,
}

/// One transfer under way: the session's container, kept in use, one of its slots held.
pub struct Transfer {
    pub session: Arc<Session>,
    pub container: String,
    _in_use: InUse,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// File transfers of the sessions in the registry.
pub struct Transfers {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub registry: Arc<Registry>,
    /// The operator's upload limit.
    pub max_upload_bytes: u64,
}

impl Transfers {
    /// Starts a transfer on session `id` of `owner`.
    pub fn begin(&self, owner: &Owner, id: &str) -> Result<Transfer, SessionError> {
        let (session, in_use) = self.registry.get_in_use(owner, id)?;
        let permit = session.transfers.clone().try_acquire_owned().map_err(|_| FileError::Busy(MAX_TRANSFERS))?;
        session.update(|s| s.last_used = Utc::now());
        let container = session.snapshot().container_id;
        Ok(Transfer { session, container, _in_use: in_use, _permit: permit })
    }

    /// Lists a directory of the session's working directory.
    pub async fn list(&self, owner: &Owner, id: &str, path: &str) -> Result<Listing, SessionError> {
        let path = FilePath::parse(path)?;
        let t = self.begin(owner, id)?;
        Ok(files::list(self.runtime.as_ref(), &t.container, &path).await?)
    }

    /// Starts a download; the session stays in use until the body is consumed or dropped.
    pub async fn download(&self, owner: &Owner, id: &str, path: &str) -> Result<Download, SessionError> {
        let path = FilePath::parse(path)?;
        let t = self.begin(owner, id)?;
        let mut download = files::download(self.runtime.as_ref(), &t.container, &path).await?;
        download.body = download
            .body
            .map(move |chunk| {
                let _held = &t;
                chunk
            })
            .boxed();
        Ok(download)
    }

    /// Writes a file into the session's working directory (at most the operator's upload limit).
    pub async fn upload<S, E>(&self, owner: &Owner, id: &str, path: &str, body: S) -> Result<Written, SessionError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let path = FilePath::parse(path)?;
        let t = self.begin(owner, id)?;
        Ok(files::upload(self.runtime.as_ref(), &t.container, &path, self.max_upload_bytes, body).await?)
    }

    /// Removes a file or a directory (with its contents) from the session's working directory.
    pub async fn delete(&self, owner: &Owner, id: &str, path: &str) -> Result<(), SessionError> {
        let path = FilePath::parse(path)?;
        let t = self.begin(owner, id)?;
        Ok(files::delete(self.runtime.as_ref(), &t.container, &path).await?)
    }

    /// The regular files under the working directory modified at or after `since` (seconds since the
    /// epoch), hidden ones excepted, within `max_files` and `max_bytes` (held in memory), and how many
    /// were skipped over those limits.
    pub async fn collect(
        &self,
        owner: &Owner,
        id: &str,
        since: f64,
        max_files: usize,
        max_bytes: u64,
    ) -> Result<(Vec<files::Collected>, u64), SessionError> {
        let t = self.begin(owner, id)?;
        Ok(files::collect(self.runtime.as_ref(), &t.container, max_files, max_bytes, since).await?)
    }

    /// Saves the images among an execution's outputs as files in the session's working directory
    /// (`outputs/exec-<n>-<output>.<ext>`), removing them from the outputs. Returns what was saved.
    pub async fn save_images(
        &self,
        owner: &Owner,
        id: &str,
        result: &mut ExecuteResult,
    ) -> Result<Vec<SavedImage>, SessionError> {
        let stamp = match result.execution_count {
            Some(n) => n.to_string(),
            None => Utc::now().format("%Y%m%dT%H%M%S%3f").to_string(),
        };
        let images = files::take_images(&mut result.outputs, &format!("outputs/exec-{stamp}"));
        let mut saved = Vec::with_capacity(images.len());
        for image in images {
            let size = image.content.len() as u64;
            let body = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(image.content) });
            self.upload(owner, id, image.path.as_str(), body).await?;
            saved.push(SavedImage {
                output_index: image.output_index,
                mime: image.mime,
                path: image.path.as_str().to_owned(),
                size,
            });
        }
        Ok(saved)
    }
}
