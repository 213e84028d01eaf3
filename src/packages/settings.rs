//! The operator's package settings, and the fixed places packages live in a session and its image. A leaf
//! of `packages/`: every other part of it reads these, and this imports none of them.

use std::time::Duration;

/// Where the wheel cache is mounted, read-only, in every python session.
pub const WHEELS_MOUNT: &str = "/mnt/wheels";
/// The session's packages directory: a tmpfs of the session, first on the kernel's `PYTHONPATH`.
pub const PACKAGES_DIR: &str = "/opt/kernelbox/packages";
/// The python images' interpreter (the venv the kernel runs in).
pub const PYTHON: &str = "/opt/kernelbox/venv/bin/python";
/// The javascript kernel's `DENO_DIR` (its descriptor's env): npm packages are unpacked into its `npm`.
pub const SESSION_DENO_DIR: &str = "/tmp/kernelbox/deno";
/// Distinct downloads under way at once (identical ones share one).
pub const MAX_FETCHES: usize = 8;

/// The operator's package settings (flags in `config.rs`).
#[derive(Debug, Clone)]
pub struct PackageConfig {
    /// The wheel cache's size cap; least recently used wheels are evicted beyond it.
    pub cache_max_bytes: u64,
    /// The most one fetch may download (the fetcher's tmpfs, and what the service reads back).
    pub max_download_bytes: u64,
    /// The time limit of one install, fetch included.
    pub timeout: Duration,
    /// The Docker network fetchers use (the only containers with one).
    pub network: String,
    /// The Python package index (none: pip's default).
    pub index_url: Option<String>,
    /// The npm registry Deno uses (none: its default).
    pub npm_registry: Option<String>,
    /// An HTTP(S) proxy for fetchers.
    pub proxy: Option<String>,
    pub no_proxy: Option<String>,
}

impl Default for PackageConfig {
    fn default() -> Self {
        PackageConfig {
            cache_max_bytes: 2 << 30,
            max_download_bytes: 512 << 20,
            timeout: Duration::from_secs(300),
            network: "bridge".into(),
            index_url: None,
            npm_registry: None,
            proxy: None,
            no_proxy: None,
        }
    }
}
