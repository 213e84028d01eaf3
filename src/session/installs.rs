//! Packages installed into sessions: the specs checked before anything runs, the install through
//! `crate::packages` (the wheel cache and the fetchers), and the record of what a session installed, kept
//! in memory and in `<state>/installed/` so that a session given a new container (a restart after its
//! death, or after adoption by the next run of the service) gets its packages again.

use std::path::PathBuf;
use std::sync::Arc;

use crate::packages::spec::{self, Ecosystem, Spec};
use crate::packages::{InstallReport, PackageError, Packages};

use super::actor::Refit;
use super::boot::BootPlanner;
use super::error::SessionError;
use super::handle::Session;
use super::records;

/// Installs packages into sessions and remembers what each installed.
pub struct Installs {
    pub packages: Arc<Packages>,
    pub planner: Arc<BootPlanner>,
    /// `<state>/installed`: one record per session.
    pub installed_dir: PathBuf,
}

impl Installs {
    /// Checks the requested specs for the session's language (every one, before anything runs).
    pub fn check(&self, session: &Session, requested: &[String]) -> Result<Vec<Spec>, SessionError> {
        let language = &session.settings.language;
        let ecosystem = Ecosystem::of(language).ok_or_else(|| PackageError::Unsupported(language.clone()))?;
        Ok(spec::parse_all(ecosystem, requested).map_err(PackageError::Invalid)?)
    }

    /// Installs checked specs into the session's running `container` (one install per session at a time).
    /// A failed install is a report with `ok: false`, and the session keeps what it had; a successful one
    /// is recorded.
    pub async fn install(
        &self,
        session: &Session,
        container: &str,
        specs: &[Spec],
    ) -> Result<InstallReport, SessionError> {
        let language = &session.settings.language;
        let _one = session.installing.clone().try_acquire_owned().map_err(|_| PackageError::Busy)?;
        let report = self.packages.install(container, language, &self.planner.image_ref(language), specs).await?;
        if report.ok {
            let recorded = {
                let mut recorded = session.packages.lock().unwrap();
                for s in specs {
                    if !recorded.contains(&s.text) {
                        recorded.push(s.text.clone());
                    }
                }
                recorded.clone()
            };
            // On disk too: a session adopted by the next run of the service installs them again when a
            // restart gives it a new container.
            if let Err(e) = records::replace(&self.installed_dir, &session.id, &recorded) {
                tracing::error!(session_id = %session.id, error = %e, "could not record the installed packages");
            }
        }
        Ok(report)
    }

    /// After a restart that gave the session a new container, installs its recorded packages again (from
    /// the cache; fetched again if evicted meanwhile). Failures are logged: the restart itself succeeded.
    pub async fn reinstall(&self, session: &Session) {
        let recorded: Vec<String> = session.packages.lock().unwrap().clone();
        if recorded.is_empty() {
            return;
        }
        let Ok(specs) = self.check(session, &recorded) else { return };
        let language = &session.settings.language;
        let container = session.snapshot().container_id;
        let Ok(_one) = session.installing.clone().try_acquire_owned() else { return };
        match self.packages.install(&container, language, &self.planner.image_ref(language), &specs).await {
            Ok(r) if r.ok => tracing::info!(session_id = %session.id, cached = r.cached, "packages installed again"),
            Ok(r) => tracing::warn!(session_id = %session.id, log = %r.log, "packages could not be installed again"),
            Err(e) => tracing::warn!(session_id = %session.id, error = %e, "packages could not be installed again"),
        }
    }

    /// What an adopted session had installed, read back from its record.
    pub fn restore(&self, session: &Session) {
        if let Some(specs) = records::read::<Vec<String>>(&self.installed_dir, session.id.as_str()) {
            *session.packages.lock().unwrap() = specs;
        }
    }
}

impl Refit for Installs {
    fn refit<'a>(&'a self, session: &'a Session) -> futures::future::BoxFuture<'a, ()> {
        Box::pin(self.reinstall(session))
    }
}
