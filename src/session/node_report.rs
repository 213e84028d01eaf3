//! What a cluster's agent says of its node on `GET /internal/v1/info` ([`AgentInfo`]): who it is, whether
//! it is ready, its limits, what its sessions reserve, its warm kernels, and the content hash of each
//! language's image. API replicas probe every agent every 2 s, so the image part (one engine call per
//! image) is cached for [`IMAGE_CACHE`]; the rest is read from memory on each call.
//!
//! Must not touch: sessions themselves (it only reads the manager's views) or HTTP.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::images::catalog::LABEL_CONTENT_HASH;
use crate::node::{AgentInfo, Capacity, NodeTag, PoolCounts};

use super::manager::SessionManager;
use super::pool::PoolStatus;

/// How long image hashes are reused before the engine is asked again.
pub const IMAGE_CACHE: Duration = Duration::from_secs(5);

/// Per language, its image's content hash (`None`: none), and why any is missing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageReport {
    pub hashes: BTreeMap<String, Option<String>>,
    pub reasons: Vec<String>,
}

/// An agent's identity and readiness, and the cache of its image report.
pub struct NodeReporter {
    pub tag: NodeTag,
    /// The Swarm node ID the tag comes from (or the one given with `--node-id`).
    pub node_id: String,
    /// Random per process: a change tells a replica the agent restarted.
    pub epoch: String,
    /// Set once the agent holds its state directory's lock and has adopted what it found.
    ready: AtomicBool,
    /// Why the agent is not ready yet (shown while `ready` is false).
    waiting: Mutex<String>,
    /// The last image report and when it was made. Never held across an `.await`.
    images: Mutex<Option<(Instant, ImageReport)>>,
}

impl NodeReporter {
    pub fn new(tag: NodeTag, node_id: String) -> Self {
        NodeReporter {
            tag,
            node_id,
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            ready: AtomicBool::new(false),
            waiting: Mutex::new("starting".into()),
            images: Mutex::new(None),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Not ready yet, and why (e.g. waiting for the state directory's lock).
    pub fn waiting(&self, why: impl Into<String>) {
        *self.waiting.lock().unwrap() = why.into();
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The report before the manager exists: not ready, and why.
    pub fn not_ready_info(&self) -> AgentInfo {
        AgentInfo {
            node_tag: self.tag,
            node_id: self.node_id.clone(),
            epoch: self.epoch.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: false,
            reasons: vec![self.waiting.lock().unwrap().clone()],
            capacity: Capacity { max_sessions: 0, memory_mb: 0, cpus: 0.0 },
            usage: Default::default(),
            owners: BTreeMap::new(),
            warm: BTreeMap::new(),
            images: BTreeMap::new(),
            pools: BTreeMap::new(),
        }
    }

    /// The whole report, with the manager's views.
    pub async fn info(&self, manager: &SessionManager) -> AgentInfo {
        let limits = manager.limits();
        // What the agent enforces at create (`policy::admit`), so placement never sends what must be refused.
        let capacity = Capacity {
            max_sessions: u32::try_from(limits.max_sessions).unwrap_or(u32::MAX),
            memory_mb: limits.max_total_memory_mb,
            cpus: limits.max_total_cpus,
        };
        let (usage, owners) = manager.reserved();
        let pools: Vec<(String, PoolStatus)> =
            manager.catalog().languages.iter().map(|l| (l.name.clone(), manager.pool_status(&l.name))).collect();
        let warm = pools
            .iter()
            .map(|(name, pool)| (name.clone(), u32::try_from(pool.ready).unwrap_or(u32::MAX)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let pools = pools
            .into_iter()
            .filter(|(_, pool)| pool.ceiling > 0 || pool.hits > 0 || pool.misses > 0)
            .map(|(name, pool)| (name, PoolCounts { hits: pool.hits, misses: pool.misses }))
            .collect();
        let images = self.images(manager).await;
        let mut reasons = images.reasons.clone();
        if !self.is_ready() {
            reasons.insert(0, self.waiting.lock().unwrap().clone());
        }
        AgentInfo {
            node_tag: self.tag,
            node_id: self.node_id.clone(),
            epoch: self.epoch.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: self.is_ready(),
            reasons,
            capacity,
            usage,
            owners,
            warm,
            images: images.hashes,
            pools,
        }
    }

    /// The image report, from the cache when it is fresh.
    async fn images(&self, manager: &SessionManager) -> ImageReport {
        if let Some((at, report)) = self.images.lock().unwrap().as_ref()
            && at.elapsed() < IMAGE_CACHE
        {
            return report.clone();
        }
        let report = image_report(manager).await;
        *self.images.lock().unwrap() = Some((Instant::now(), report.clone()));
        report
    }
}

/// Asks the engine for each language's image and reads its content hash label.
async fn image_report(manager: &SessionManager) -> ImageReport {
    let catalog = manager.catalog();
    let mut report = ImageReport::default();
    for language in &catalog.languages {
        let reference = catalog.image_ref(&language.image);
        let hash = match manager.runtime().image(&reference).await {
            Ok(Some(image)) => {
                let hash = image.labels.get(LABEL_CONTENT_HASH).cloned();
                if hash.is_none() {
                    report.reasons.push(format!("{}: image {reference} has no content hash label", language.name));
                }
                hash
            }
            Ok(None) => {
                report.reasons.push(format!("{}: image {reference} is not built on this node", language.name));
                None
            }
            Err(e) => {
                report.reasons.push(format!("{}: could not inspect image {reference}: {e}", language.name));
                None
            }
        };
        report.hashes.insert(language.name.clone(), hash);
    }
    report
}
