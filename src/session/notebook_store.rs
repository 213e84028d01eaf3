//! Where sessions' notebooks live: the folder the service writes them in (never mounted into a
//! session), which file is whose, and reading one back whole. The format itself is `notebook.rs`.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::images::Catalog;

use super::error::SessionError;
use super::handle::Session;
use super::notebook::{KernelSpec, Notebook, NotebookHandle};

/// The notebooks folder and the kernelspecs written into its notebooks.
pub struct NotebookStore {
    /// Written only by the service; `<state>/notebooks` unless the operator names another.
    pub dir: PathBuf,
    /// Each language's kernelspec, for a new notebook's metadata.
    pub catalog: Catalog,
}

impl NotebookStore {
    /// Where a session's notebook is, and whether it outlives the session (an adapter named it).
    pub fn place(&self, session: &Session) -> (PathBuf, bool) {
        match &session.settings.notebook {
            Some(rel) => (self.dir.join(rel), true),
            None => (self.dir.join("sessions").join(format!("{}.ipynb", session.id)), false),
        }
    }

    /// The session's notebook, opened (or created). A notebook that cannot be written is logged, not
    /// fatal: the session runs without one.
    pub fn open(&self, session: &Session) -> Option<NotebookHandle> {
        let (path, keep) = self.place(session);
        let language = self.catalog.language(&session.settings.language)?;
        let spec = KernelSpec {
            name: language.name.clone(),
            display_name: language.display_name(),
            language: language.programming_language().to_owned(),
        };
        match Notebook::open(&path, &spec) {
            Ok(notebook) => Some(NotebookHandle { notebook, keep }),
            Err(e) => {
                tracing::error!(session_id = %session.id, path = %path.display(), error = %e, "cannot write the session's notebook");
                None
            }
        }
    }

    /// The session's notebook as it is now (read whole between appends, `O_NOFOLLOW`).
    pub async fn read(&self, session: &Session) -> Result<Vec<u8>, SessionError> {
        let path = self.place(session).0;
        let lock = session.notebook_lock.clone();
        let read = tokio::task::spawn_blocking(move || {
            let _reading = lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut file =
                std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path)?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes)?;
            Ok::<_, std::io::Error>(bytes)
        })
        .await
        .map_err(|e| SessionError::Io(std::io::Error::other(e)))?;
        read.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SessionError::NotFound(format!("{} (its notebook)", session.id)),
            _ => SessionError::Io(e),
        })
    }
}
