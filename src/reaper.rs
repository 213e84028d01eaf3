//! The idle reaper: a tokio-cron-scheduler job that calls [`SessionManager::reap_once`] at a fixed
//! interval. The decisions live in `reap_once(now)` so tests drive them directly; the manager keeps runs
//! from overlapping (the scheduler itself would start a new run while one is still going).

use std::sync::Arc;
use std::time::Duration;

use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::session::SessionManager;

/// Starts the reaper; shut it down with [`JobScheduler::shutdown`].
pub async fn start(manager: Arc<SessionManager>, every: Duration) -> Result<JobScheduler, JobSchedulerError> {
    let scheduler = JobScheduler::new().await?;
    let job = Job::new_repeated_async(every, move |_id, _scheduler| {
        let manager = manager.clone();
        Box::pin(async move {
            let report = manager.reap_once(chrono::Utc::now()).await;
            if !report.removed.is_empty() {
                tracing::info!(removed = report.removed.len(), "reaper pass");
            }
        })
    })?;
    scheduler.add(job).await?;
    scheduler.start().await?;
    Ok(scheduler)
}
