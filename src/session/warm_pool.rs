//! The warm pool at work: the refill loop that keeps each language's ready kernels at their target (which
//! follows recent creates between the language's floor and ceiling, `pool_demand.rs`), the boots it
//! starts, the surplus it removes when a target falls back, and the pool's side of a claim (take a live
//! kernel, apply the caller's limits, write the claim). A create never waits for the pool: it takes a
//! ready kernel or starts cold. The bookkeeping itself (who is ready, booting, owned) is [`Pool`] in
//! `pool.rs`; the manager registers a claimed kernel's session and hands it to its task.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::PoolConfig;

use super::boot::BootPlanner;
use super::model::{Owner, SessionId, SessionRequest, SessionSettings};
use super::policy;
use super::pool::{Claim, Pool, PoolBounds, PoolStatus, Pooled};
use super::pool_demand::Demand;
use super::records::{self, StateDirs};

/// The owner label of a pooled container (its real owner, once claimed, is in the claims folder).
const POOL_OWNER: &str = "kernelbox:pool";

/// Kernels booted ahead of demand, and the loop that boots them.
pub struct WarmPool {
    pub pool: Pool,
    pub config: PoolConfig,
    pub planner: Arc<BootPlanner>,
    pub dirs: StateDirs,
    /// Tracks the refill loop and its boots.
    pub tracker: TaskTracker,
    /// Wakes the refill loop (after a claim or a boot).
    pub wake: Notify,
    /// Stops the refill loop and the boots under way.
    pub stop: CancellationToken,
    /// Recent creates, which the targets follow.
    pub demand: Mutex<Demand>,
    /// Each language's target as last computed.
    pub targets: Mutex<BTreeMap<String, usize>>,
}

impl WarmPool {
    /// Starts the refill loop (after adoption, so that start-up does not race it).
    pub fn start(self: &Arc<Self>) {
        if self.config.bounds.values().all(|b| b.ceiling == 0) {
            return;
        }
        let me = self.clone();
        self.tracker.spawn(async move { me.refill().await });
    }

    /// Keeps each language's pool at its target: recomputes the targets, replaces dead kernels, removes
    /// what a fallen target no longer wants, starts boots (at most `max_boots` at once), and sleeps until
    /// a claim or a finished boot wakes it (or 5 s pass).
    async fn refill(self: Arc<Self>) {
        loop {
            for dead in self.pool.take_dead() {
                self.remove(dead).await;
            }
            let targets = self.retarget(Instant::now());
            for (language, &target) in &targets {
                if self.request(language).is_none() {
                    continue;
                }
                for surplus in self.pool.take_surplus(language, target) {
                    tracing::debug!(%language, target, "removing a pooled kernel past the pool's target");
                    self.remove(surplus).await;
                }
                while let Some(id) = self.pool.begin_boot(language, target, self.config.max_boots) {
                    let me = self.clone();
                    let language = language.clone();
                    self.tracker.spawn(async move { me.boot(language, id).await });
                }
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Each language's target at `now` (`pool_demand.rs`), kept for [`WarmPool::status`].
    fn retarget(&self, now: Instant) -> BTreeMap<String, usize> {
        let cost = self.planner.limits.default_memory_mb;
        let targets = self.demand.lock().unwrap().targets(
            &self.config.bounds,
            |_| cost,
            self.config.memory_mb,
            self.config.quiet,
            now,
        );
        *self.targets.lock().unwrap() = targets.clone();
        targets
    }

    /// The request a pool's kernels are booted for: the pool is a language (under its default runtime) or
    /// `language@runtime`. `None` for a pool of no language this service offers.
    fn request(&self, pool: &str) -> Option<SessionRequest> {
        let (language, runtime) = PoolConfig::split_pool(pool);
        self.planner.catalog.language(language)?;
        Some(SessionRequest {
            language: language.to_owned(),
            runtime: runtime.map(str::to_owned),
            ..Default::default()
        })
    }

    /// The pool a session's kernel would come from: its language, or `language@runtime` when it runs under
    /// another runtime than its language's default.
    pub fn pool_of(&self, settings: &SessionSettings) -> String {
        match self.planner.limits.runtimes.default_for(&settings.language) == settings.runtime {
            true => settings.language.clone(),
            false => format!("{}@{}", settings.language, settings.runtime),
        }
    }

    /// Boots one kernel for the pool `language` (a language, or `language@runtime`) with the language's
    /// default settings.
    async fn boot(&self, language: String, id: SessionId) {
        let started = std::time::Instant::now();
        let request = self.request(&language).expect("a pool of a known language");
        let booted = match policy::settle(&self.planner.catalog, &self.planner.limits, request) {
            Ok(settings) => {
                let created_at = Utc::now();
                let plan = self.planner.plan(&id, &Owner(POOL_OWNER.into()), &settings, created_at, true);
                match plan.boot(&self.stop).await {
                    Ok(host) => Some(Pooled { id: id.clone(), settings, created_at, host }),
                    Err(e) => {
                        tracing::warn!(%language, error = %e, "a pooled kernel did not boot; retrying later");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::error!(%language, error = %e, "the pool's default settings are invalid");
                None
            }
        };
        if booted.is_some() {
            metrics::histogram!("kernelbox_pool_boot_seconds", "language" => language.clone())
                .record(started.elapsed().as_secs_f64());
        }
        if let Some(unwanted) = self.pool.end_boot(&language, &id, booted) {
            self.remove(unwanted).await;
        }
        self.gauge(&language);
        self.wake.notify_one();
    }

    /// Removes a pooled kernel's container; its id is no longer the pool's.
    pub async fn remove(&self, pooled: Pooled) {
        if let Err(e) = self.planner.runtime.remove(&pooled.host.container_id).await {
            tracing::warn!(container = %pooled.host.container_id, error = %e, "could not remove a pooled kernel");
        }
        self.pool.release(pooled.id.as_str());
        if let Some(networks) = &self.planner.network {
            networks.forget(pooled.id.as_str(), false);
        }
        // Dropping the host removes its run directory.
    }

    fn gauge(&self, language: &str) {
        let status = self.status(language);
        metrics::gauge!("kernelbox_pool_ready", "language" => language.to_owned()).set(status.ready as f64);
    }

    /// The pool's numbers for `language`.
    pub fn status(&self, language: &str) -> PoolStatus {
        let bounds = self.config.bounds.get(language).copied().unwrap_or(PoolBounds::fixed(0));
        let target = self.targets.lock().unwrap().get(language).copied().unwrap_or(bounds.floor);
        self.pool.status(language, target, bounds)
    }

    /// Whether a request can be served by a pooled kernel: one booted with the language's defaults can
    /// take other memory and CPU limits (Docker updates them), but not environment variables, mounts, an
    /// output folder or another tmpfs size (all fixed at create time). `pool` is its [`WarmPool::pool_of`].
    pub fn poolable(&self, pool: &str, settings: &SessionSettings) -> bool {
        let p = &self.planner;
        self.config.bounds.get(pool).is_some_and(|b| b.ceiling > 0)
            && settings.env.is_empty()
            && settings.mounts.is_empty()
            && settings.output.is_none()
            && p.tmpfs_mb(settings.memory_mb) == p.tmpfs_mb(p.limits.default_memory_mb)
    }

    /// The pool's side of a claim: takes a live kernel of `pool` ([`WarmPool::pool_of`]), applies the caller's limits to
    /// its running container and writes the claim for `owner`. `None`: none ready (or it could not be
    /// prepared), start cold. The kernel's id stays the pool's until [`WarmPool::release`].
    pub async fn claim(&self, pool: &str, owner: &Owner, settings: &SessionSettings) -> Option<Pooled> {
        // Every create the pool could serve counts towards its target, served or not.
        self.demand.lock().unwrap().record_create(pool, Instant::now());
        let (found, dead) = self.pool.take(pool);
        for d in dead {
            self.remove(d).await;
        }
        self.wake.notify_one();
        let Some(pooled) = found else {
            self.pool.count(pool, false);
            metrics::counter!("kernelbox_pool_misses_total", "language" => pool.to_owned()).increment(1);
            return None;
        };
        self.gauge(pool);
        let container = pooled.host.container_id.clone();
        if pooled.settings.memory_mb != settings.memory_mb || pooled.settings.cpus != settings.cpus {
            let limits = self.planner.resources(settings);
            if let Err(e) = self.planner.runtime.update_limits(&container, limits).await {
                tracing::warn!(container = %container, error = %e, "could not apply limits to a pooled kernel; starting cold");
                self.remove(pooled).await;
                return None;
            }
        }
        let claim = Claim { owner: owner.clone(), settings: settings.clone(), created_at: Utc::now() };
        if let Err(e) = records::write_new(&self.dirs.claims, &pooled.id, &claim) {
            tracing::error!(error = %e, "could not write a claim; starting cold");
            self.remove(pooled).await;
            return None;
        }
        Some(Pooled { created_at: claim.created_at, ..pooled })
    }

    /// A claimed kernel whose session could not be registered: its claim and container go.
    pub async fn unclaim(&self, pooled: Pooled) {
        records::remove(&self.dirs.claims, pooled.id.as_str());
        self.remove(pooled).await;
    }

    /// The id is the registry's now (or gone): the pool lets it go.
    pub fn release(&self, id: &SessionId) {
        self.pool.release(id.as_str());
    }

    /// A create of `language` was served by a pooled kernel.
    pub fn hit(&self, language: &str) {
        self.pool.count(language, true);
        metrics::counter!("kernelbox_pool_hits_total", "language" => language.to_owned()).increment(1);
    }

    /// Whether `id` is a pooled kernel's, booting or ready.
    pub fn knows(&self, id: &str) -> bool {
        self.pool.knows(id)
    }

    /// Stops the refill loop and removes every ready kernel; boots under way remove what they made.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        let pooled = self.pool.close();
        futures::future::join_all(pooled.into_iter().map(|p| self.remove(p))).await;
    }
}
