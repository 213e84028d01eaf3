//! The egress proxy's container, kept running by the service: `kernelbox egress-proxy` (the same binary,
//! in an image of the base image plus that binary, built when missing or stale) in a container sealed
//! like a session's (read-only root, no capabilities, `no-new-privileges`, memory and pids limits, no
//! mount at all, no Docker socket) but for its network, the only one any of ours has but the package
//! fetchers'. It gets a fresh secret per start, which the service alone knows. When it dies the hub is
//! told at once (every session's connections are refused until it is back: fail closed), and it is
//! started again, sooner the longer it had lived. The service's stop removes it (labelled
//! `kernelbox.egress`; one left by an earlier run is removed before a new one starts).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ring::digest;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::time::Instant;

use super::hub::{EgressHub, ProxyAddr};
use crate::images::Catalog;
use crate::runtime::{BuildRequest, ContainerRuntime, ContainerSpec, RuntimeError, labels};

/// The mark of the proxy's container: the instance it serves.
pub const LABEL: &str = "kernelbox.egress";
/// The proxy's port inside its container.
const PORT: u16 = 3128;
/// Where the binary is in the proxy's image.
const BINARY: &str = "/usr/local/bin/kernelbox";
/// The image's label with the digest of the binary it holds.
const LABEL_BINARY: &str = "kernelbox.image.content_hash";

/// What the keeper needs.
pub struct Keeper {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub hub: Arc<EgressHub>,
    pub catalog: Catalog,
    pub instance: String,
    /// The kernelbox binary the proxy runs (the service's own, unless a test names another).
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
enum KeepError {
    #[error("{0}")]
    Runtime(#[from] RuntimeError),
    #[error("reading the kernelbox binary {path}: {source}")]
    Binary { path: String, source: std::io::Error },
    #[error("the proxy has no address on network {0}")]
    NoAddress(String),
    #[error("the proxy did not start listening: {0}")]
    NotListening(String),
}

impl Keeper {
    /// The proxy's network: the operator's, or one of its own.
    fn network(&self) -> String {
        match self.hub.config.network.as_str() {
            "" => format!("kernelbox-egress-{}", self.instance),
            named => named.to_owned(),
        }
    }

    /// Runs the proxy until the hub stops, then removes it (and its own network).
    pub async fn run(self) {
        self.keep().await;
        if self.hub.config.network.is_empty()
            && let Err(e) = self.runtime.remove_network(&self.network()).await
        {
            tracing::warn!(network = %self.network(), error = %e, "could not remove the egress proxy's network");
        }
    }

    async fn keep(&self) {
        let stop = self.hub.stop.clone();
        let mut backoff = Duration::from_millis(500);
        let mut hash = None;
        self.remove_left_over().await;
        while !stop.is_cancelled() {
            let began = Instant::now();
            match self.start(&mut hash).await {
                Ok((id, addr)) => {
                    tracing::info!(container = %id, address = %addr.addr, "the egress proxy is up");
                    self.hub.set_proxy(Some(addr));
                    let ended = tokio::select! {
                        _ = stop.cancelled() => None,
                        exit = self.runtime.wait_exit(&id) => Some(exit),
                    };
                    self.hub.set_proxy(None);
                    let _ = self.runtime.remove(&id).await;
                    match ended {
                        None => return,
                        Some(exit) => {
                            metrics::counter!("kernelbox_egress_proxy_restarts_total").increment(1);
                            tracing::error!(
                                ?exit,
                                "the egress proxy stopped; sessions' connections are refused until it is back"
                            )
                        }
                    }
                    if began.elapsed() > Duration::from_secs(60) {
                        backoff = Duration::from_millis(500);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not start the egress proxy; sessions have no network until it starts")
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// A proxy an earlier run of this instance left.
    async fn remove_left_over(&self) {
        match self.runtime.list(LABEL, Some(&self.instance)).await {
            Ok(left) => {
                for c in left {
                    let _ = self.runtime.remove(&c.id).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not list egress proxies left by an earlier run"),
        }
    }

    /// Starts one proxy and waits until it listens.
    async fn start(&self, hash: &mut Option<String>) -> Result<(String, ProxyAddr), KeepError> {
        let image = self.image(hash).await?;
        if self.hub.config.network.is_empty() {
            let labels = HashMap::from([
                (labels::INSTANCE.to_owned(), self.instance.clone()),
                (LABEL.to_owned(), self.instance.clone()),
            ]);
            self.runtime.ensure_network(&self.network(), labels).await?;
        }
        let token = secret();
        let spec = self.spec(&image, &token);
        let id = self.runtime.create_and_start(&spec).await?;
        let ready = async {
            let ip = (self.runtime.container_address(&id, &self.network()).await?)
                .ok_or_else(|| KeepError::NoAddress(self.network()))?;
            let addr = SocketAddr::new(ip, PORT);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match tokio::net::TcpStream::connect(addr).await {
                    Ok(_) => return Ok(ProxyAddr { addr, token: token.into() }),
                    Err(e) if Instant::now() >= deadline => return Err(KeepError::NotListening(e.to_string())),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        };
        match ready.await {
            Ok(addr) => Ok((id, addr)),
            Err(e) => {
                let _ = self.runtime.remove(&id).await;
                Err(e)
            }
        }
    }

    fn spec(&self, image: &str, token: &str) -> ContainerSpec {
        let c = &self.hub.config;
        let join = |items: Vec<String>| items.join(",");
        let mut cmd = vec![
            BINARY.to_owned(),
            "egress-proxy".into(),
            format!("--listen=0.0.0.0:{PORT}"),
            format!("--max-allow={}", c.policy.max_entries),
            format!("--idle-timeout-s={}", c.idle_timeout.as_secs()),
            format!("--max-conn-bytes={}", c.max_connection_bytes),
            // Every session's connections at most, with room.
            format!("--max-connections={}", 4096),
        ];
        if !c.policy.forbidden.is_empty() {
            cmd.push(format!("--forbid={}", join(c.policy.forbidden.iter().map(|f| f.to_string()).collect())));
        }
        if !c.allow_cidrs.is_empty() {
            cmd.push(format!("--allow-cidr={}", join(c.allow_cidrs.iter().map(|n| n.to_string()).collect())));
        }
        if !c.test_names.is_empty() {
            cmd.push(format!("--test-names={}", join(c.test_names.iter().map(|(n, a)| format!("{n}={a}")).collect())));
        }
        ContainerSpec {
            name: format!("kernelbox-egress-{}", self.instance),
            image: image.to_owned(),
            cmd,
            env: vec![format!("KERNELBOX_EGRESS_TOKEN={token}"), "RUST_LOG=info".into()],
            labels: HashMap::from([
                (labels::INSTANCE.to_owned(), self.instance.clone()),
                (LABEL.to_owned(), self.instance.clone()),
            ]),
            memory_bytes: (c.proxy_memory_mb as i64) << 20,
            nano_cpus: 1_000_000_000,
            // Tokio's workers and the resolver's blocking threads (bounded by the proxy), with room.
            pids_limit: 256,
            tmpfs: HashMap::new(),
            binds: Vec::new(),
            user: "65534:65534".into(),
            working_dir: "/".into(),
            egress_network: Some(self.network()),
            oci_runtime: String::new(),
        }
    }

    /// The proxy's image: the base image plus the binary, built when missing or holding another binary.
    /// The binary's digest is taken once per run of the service (`hash`); the binary is read again only
    /// for a build. Both off the async threads.
    async fn image(&self, hash: &mut Option<String>) -> Result<String, KeepError> {
        let hash = match hash {
            Some(hash) => hash.clone(),
            None => {
                let binary = self.read_binary().await?;
                let digest = tokio::task::spawn_blocking(move || digest::digest(&digest::SHA256, &binary))
                    .await
                    .expect("hashing does not panic");
                hash.insert(format!("sha256:{}", hex::encode(digest.as_ref()))).clone()
            }
        };
        let tag = self.catalog.image_ref("egress");
        let base = self.catalog.image_ref("base");
        let parent = self.runtime.image(&base).await?.ok_or_else(|| RuntimeError::NotFound(base.clone()))?;
        let wanted = format!("{hash}+{}", parent.id);
        if let Some(existing) = self.runtime.image(&tag).await?
            && existing.labels.get(LABEL_BINARY) == Some(&wanted)
        {
            return Ok(tag);
        }
        tracing::info!(image = %tag, "building the egress proxy's image");
        let binary = self.read_binary().await?;
        let context_tar = tokio::task::spawn_blocking(move || context(&binary)).await.expect("a tar in memory");
        let request = BuildRequest {
            tag: tag.clone(),
            context_tar,
            build_args: HashMap::from([("BASE".to_owned(), base)]),
            labels: HashMap::from([(LABEL_BINARY.to_owned(), wanted)]),
            no_cache: false,
        };
        let mut progress = |line: &str| tracing::debug!(line, "egress proxy image");
        self.runtime.build_image(request, &mut progress).await?;
        Ok(tag)
    }
}

impl Keeper {
    async fn read_binary(&self) -> Result<Vec<u8>, KeepError> {
        let path = self.binary.clone();
        tokio::fs::read(&path).await.map_err(|source| KeepError::Binary { path: path.display().to_string(), source })
    }
}

/// The build context: a Dockerfile and the binary.
fn context(binary: &[u8]) -> Vec<u8> {
    let dockerfile = format!("ARG BASE\nFROM ${{BASE}}\nCOPY kernelbox {BINARY}\nUSER 65534:65534\n");
    let mut tar = tar::Builder::new(Vec::new());
    for (path, bytes, mode) in [("Dockerfile", dockerfile.as_bytes(), 0o644), ("kernelbox", binary, 0o755)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(mode);
        header.set_mtime(0);
        header.set_cksum();
        tar.append_data(&mut header, path, bytes).expect("writing a tar to memory");
    }
    tar.into_inner().expect("writing a tar to memory")
}

/// A fresh 256-bit secret, hex.
fn secret() -> String {
    let mut bytes = [0u8; 32];
    SystemRandom::new().fill(&mut bytes).expect("the system's random source");
    hex::encode(bytes)
}
