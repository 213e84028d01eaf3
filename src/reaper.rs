//! The idle reaper: a tokio-cron-scheduler job that calls [`SessionManager::reap_once`] at a fixed
//! interval, the file store's sweep of expired files ([`FileStore::sweep`]), and the runtime trees' upkeep. The
//! decisions live in `reap_once(now)` and `sweep(now)` so tests drive them directly; the manager keeps
//! runs from overlapping (the scheduler itself would start a new run while one is still going).

use std::sync::Arc;
use std::time::Duration;

use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};

use crate::session::SessionManager;
use crate::store::FileStore;

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

/// Adds the runtime trees' upkeep (`images/runtime_tree.rs`) to the scheduler: a rebuilt image gets its
/// new tree, old trees go.
pub async fn add_tree_upkeep(
    scheduler: &JobScheduler,
    manager: Arc<SessionManager>,
    every: Duration,
) -> Result<(), JobSchedulerError> {
    let job = Job::new_repeated_async(every, move |_id, _scheduler| {
        let manager = manager.clone();
        Box::pin(async move { manager.tend_runtime_trees().await })
    })?;
    scheduler.add(job).await?;
    Ok(())
}

/// Adds the file store's sweep (expired files removed) to the scheduler, at the same interval.
pub async fn add_store_sweep(
    scheduler: &JobScheduler,
    store: Arc<FileStore>,
    every: Duration,
) -> Result<(), JobSchedulerError> {
    let job = Job::new_repeated_async(every, move |_id, _scheduler| {
        let store = store.clone();
        Box::pin(async move {
            // Directory walks and unlinks: off the async workers.
            let report = tokio::task::spawn_blocking(move || {
                let report = store.sweep(chrono::Utc::now().timestamp());
                let (bytes, files) = store.usage();
                metrics::gauge!("kernelbox_file_store_bytes").set(bytes as f64);
                metrics::gauge!("kernelbox_file_store_files").set(files as f64);
                report
            })
            .await;
            if let Ok(report) = report
                && report.removed > 0
            {
                tracing::info!(removed = report.removed, bytes = report.bytes, "expired stored files removed");
            }
        })
    })?;
    scheduler.add(job).await?;
    Ok(())
}
