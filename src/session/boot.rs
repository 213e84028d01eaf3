//! What a session's container is made of: its image, labels, limits, mounts and environment, assembled
//! from the operator's settings into the [`BootPlan`] each of its boots follows (a pooled kernel's
//! too). It starts nothing; `kernel_host` carries the plan out.
//!
//! Every container gets the sealed shape of ARCHITECTURE.md's invariants through `ContainerSpec` (no
//! network, read-only root, read-only binds only, uid 1000, size-limited tmpfs); what varies per session
//! is decided here, in one place.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::egress::gate;
use crate::images::runtime_tree::RuntimeTrees;
use crate::images::{self, Catalog};
use crate::kernel::WireLimits;
use crate::packages::{self, spec::Ecosystem};
use crate::runtime::{ContainerRuntime, ContainerSpec, Resources, labels};

use super::kernel_host::BootPlan;
use super::model::{OutputCaps, Owner, SessionId, SessionSettings};
use super::network::Networks;
use super::{outputs, policy};

/// Turns a session's settings into the plan of its boots.
pub struct BootPlanner {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub limits: Limits,
    pub catalog: Catalog,
    /// Labels every container with this instance (adoption and the orphan sweep look for it).
    pub instance: String,
    /// The shared wheel cache, mounted read-only in python sessions.
    pub wheels_dir: PathBuf,
    /// Where Deno looks for npm packages (it keys its cache by registry).
    pub npm_registry: Option<String>,
    /// Mounted read-only at `/mnt/data`, when set.
    pub datasets_dir: Option<PathBuf>,
    /// The caps of a session API user's output folder (its tmpfs's inodes follow the file cap).
    pub user_output: OutputCaps,
    /// Run directories live here (`rundir.rs`).
    pub runs_dir: PathBuf,
    /// Tracks the exit watchers each boot starts, so shutdown waits for them.
    pub tracker: TaskTracker,
    /// The images' runtime trees, mounted over their files.
    pub trees: Arc<RuntimeTrees>,
    /// Network by name (`network.rs`), when the operator offers it: every session gets its gate and the
    /// proxy variables (a session without a list has its connections refused, and reported).
    pub network: Option<Arc<Networks>>,
}

impl BootPlanner {
    /// The image reference of a known language.
    pub fn image_ref(&self, language: &str) -> String {
        let image = &self.catalog.language(language).expect("a known language").image;
        self.catalog.image_ref(image)
    }

    /// The plan of a session's boots (or, `pooled`, of a kernel for the warm pool).
    pub fn plan(
        &self,
        id: &SessionId,
        owner: &Owner,
        s: &SessionSettings,
        created_at: DateTime<Utc>,
        pooled: bool,
    ) -> BootPlan {
        let l = &self.limits;
        let mut labels = HashMap::from([
            (labels::SESSION.to_owned(), id.to_string()),
            (labels::INSTANCE.to_owned(), self.instance.clone()),
            (labels::OWNER.to_owned(), owner.0.clone()),
            (labels::LANGUAGE.to_owned(), s.language.clone()),
            (labels::CREATED.to_owned(), created_at.to_rfc3339()),
            (labels::CONFIG.to_owned(), serde_json::to_string(s).expect("settings serialize")),
            (labels::OCI_RUNTIME.to_owned(), s.runtime.clone()),
        ]);
        if pooled {
            labels.insert(labels::POOL.to_owned(), s.language.clone());
        }
        let size = self.tmpfs_mb(s.memory_mb);
        let tmpfs = |extra: &str| format!("rw,nosuid,nodev,size={size}m{extra}");
        let mut env: Vec<String> = s.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // The kernel-side output cap (python images): beyond it the kernel drops output before it is
        // buffered in the kernel's own memory.
        env.push(format!("KERNELBOX_OUTPUT_LIMIT_BYTES={}", l.output_limit_bytes));
        let mut tmpfs_mounts = HashMap::from([
            ("/tmp".to_owned(), tmpfs("")),
            (images::HOME.to_owned(), tmpfs(",uid=1000,gid=1000,mode=0700")),
        ]);
        if self.datasets_dir.is_some() {
            tmpfs_mounts.insert(outputs::OUTPUT_MOUNT.to_owned(), self.output_tmpfs(s, size));
        }
        let mut binds = Vec::new();
        if Ecosystem::of(&s.language) == Some(Ecosystem::Python) {
            // Installed packages (src/packages/): the shared wheel cache read-only, and a directory of the
            // session's own on the kernel's PYTHONPATH from its start, so what is installed imports without
            // a restart (importlib caches a finder per existing path entry).
            binds.push(format!("{}:{}:ro", self.wheels_dir.display(), packages::WHEELS_MOUNT));
            // `exec`: compiled wheels are shared objects, mapped executable. (Docker's tmpfs default is
            // noexec; this lets the session run binaries it writes there, nothing its Python could not do.)
            tmpfs_mounts.insert(packages::PACKAGES_DIR.to_owned(), tmpfs(",exec,uid=1000,gid=1000,mode=0755"));
            let theirs = env.iter().position(|e| e.starts_with("PYTHONPATH=")).map(|i| env.remove(i));
            let path = match theirs.as_deref().and_then(|e| e.strip_prefix("PYTHONPATH=")) {
                Some(p) if !p.is_empty() => format!("PYTHONPATH={}:{p}", packages::PACKAGES_DIR),
                _ => format!("PYTHONPATH={}", packages::PACKAGES_DIR),
            };
            env.push(path);
        }
        if Ecosystem::of(&s.language) == Some(Ecosystem::Npm)
            && let Some(registry) = &self.npm_registry
        {
            // Deno keys its npm cache by registry: the kernel looks where the fetcher put the packages.
            env.push(format!("NPM_CONFIG_REGISTRY={registry}"));
        }
        let egress = self.network.as_ref().map(|n| (n.attach(id, s), n.hub.clone()));
        if egress.is_some() {
            // The proxy variables, but for those the client set itself.
            let ours = gate::environment(crate::kernel::connection::CONTAINER_DIR);
            env.extend(ours.into_iter().filter(|v| v.split_once('=').is_some_and(|(k, _)| !s.env.contains_key(k))));
        }
        let resources = self.resources(s);
        let spec = ContainerSpec {
            name: String::new(),
            image: self.image_ref(&s.language),
            cmd: vec![images::START_KERNEL.to_owned(), crate::kernel::connection::container_connection_file()],
            env,
            labels,
            memory_bytes: resources.memory_bytes,
            nano_cpus: resources.nano_cpus,
            pids_limit: resources.pids_limit,
            tmpfs: tmpfs_mounts,
            binds: [self.binds(s), binds].concat(),
            user: "1000:1000".into(),
            working_dir: images::HOME.into(),
            egress_network: None,
            oci_runtime: s.runtime.clone(),
        };
        BootPlan {
            runtime: self.runtime.clone(),
            spec,
            runs_dir: self.runs_dir.clone(),
            session_id: id.to_string(),
            start_timeout: l.start_timeout,
            wire: WireLimits::for_output_cap(l.output_limit_bytes),
            tracker: self.tracker.clone(),
            trees: self.trees.clone(),
            egress,
        }
    }

    /// `/mnt/data/output`, over the read-only datasets folder (whose `output/` holds the users' folders on
    /// the host). A session API user's session writes there (an eighth of its memory at most, and inodes
    /// for twice the folder's file cap, so its copy out walks a bounded tree); every other session gets it
    /// empty and read-only, so no session reads another's results.
    fn output_tmpfs(&self, s: &SessionSettings, size_mb: u64) -> String {
        match s.output {
            Some(_) => {
                let size = (size_mb / 2).max(4);
                let inodes = self.user_output.max_files.saturating_mul(2).saturating_add(16);
                format!("rw,nosuid,nodev,noexec,size={size}m,nr_inodes={inodes},uid=1000,gid=1000,mode=0755")
            }
            None => "ro,nosuid,nodev,noexec,size=4k,nr_inodes=16,mode=0555".to_owned(),
        }
    }

    /// The read-only mounts of a session: the datasets folder, then the adapter's.
    fn binds(&self, s: &SessionSettings) -> Vec<String> {
        let datasets = self.datasets_dir.iter().map(|d| (d.clone(), policy::DATASETS_MOUNT.to_owned()));
        let mounts = s.mounts.iter().map(|m| (m.host.clone(), m.container.clone()));
        datasets.chain(mounts).map(|(host, container)| format!("{}:{container}:ro", host.display())).collect()
    }

    /// The memory, CPU and pids limits of a session's container.
    pub fn resources(&self, s: &SessionSettings) -> Resources {
        Resources {
            memory_bytes: (s.memory_mb * 1024 * 1024) as i64,
            nano_cpus: (s.cpus * 1e9) as i64,
            pids_limit: self.limits.pids_limit,
        }
    }

    /// The size of each of a session's two tmpfs mounts (`/tmp` and the working directory). Their pages
    /// count against the session's memory limit, so both together get at most half of it: a full disk is
    /// then ENOSPC for the code that writes, never an out-of-memory kill of the kernel.
    pub fn tmpfs_mb(&self, memory_mb: u64) -> u64 {
        self.limits.tmpfs_mb.min(memory_mb / 4).max(8)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::runtime::fake::FakeRuntime;
    use crate::session::model::SessionRequest;

    fn planner(datasets: Option<&str>) -> BootPlanner {
        let cli = crate::config::Cli::try_parse_from(["kernelbox", "serve"]).unwrap();
        let crate::config::Command::Serve(args) = cli.command else { unreachable!() };
        BootPlanner {
            runtime: Arc::new(FakeRuntime::new()),
            limits: args.limits.validate().unwrap(),
            catalog: Catalog::new("x/"),
            instance: "test".into(),
            wheels_dir: "/state/wheels".into(),
            npm_registry: None,
            datasets_dir: datasets.map(PathBuf::from),
            user_output: OutputCaps { max_bytes: 256 << 20, max_files: 1000 },
            runs_dir: "/state/sessions".into(),
            tracker: TaskTracker::new(),
            trees: RuntimeTrees::new(Arc::new(FakeRuntime::new()), None, "test", &[]),
            network: None,
        }
    }

    fn plan(p: &BootPlanner, output: Option<&str>) -> crate::runtime::ContainerSpec {
        let request = SessionRequest { language: "python_scientific".into(), ..Default::default() };
        let mut settings = policy::settle(&p.catalog, &p.limits, request).unwrap();
        settings.output = output.map(str::to_owned);
        p.plan(&SessionId::new(), &Owner("o".into()), &settings, Utc::now(), false).spec
    }

    #[test]
    fn the_output_folder_is_writable_only_for_its_user_and_the_datasets_stay_read_only() {
        let p = planner(Some("/state/datasets"));
        let theirs = plan(&p, None);
        assert!(theirs.binds.contains(&"/state/datasets:/mnt/data:ro".to_owned()), "{:?}", theirs.binds);
        assert!(theirs.tmpfs["/mnt/data/output"].starts_with("ro,"), "empty and read-only elsewhere");
        let users = plan(&p, Some("user_test"));
        assert!(users.binds.contains(&"/state/datasets:/mnt/data:ro".to_owned()));
        // 512 MB by default: /tmp and the home get 128 MB each, the output folder half that.
        assert_eq!(
            users.tmpfs["/mnt/data/output"],
            "rw,nosuid,nodev,noexec,size=64m,nr_inodes=2016,uid=1000,gid=1000,mode=0755"
        );
        assert!(users.tmpfs["/tmp"].contains("size=128m"));
        let none = plan(&planner(None), Some("user_test"));
        assert!(!none.tmpfs.contains_key("/mnt/data/output") && !none.binds.iter().any(|b| b.contains("/mnt/data")));
    }

    #[test]
    fn a_session_runs_under_its_runtime_and_its_container_says_which() {
        let p = planner(None);
        let spec = plan(&p, None);
        assert_eq!((spec.oci_runtime.as_str(), spec.labels[labels::OCI_RUNTIME].as_str()), ("runc", "runc"));
        let mut settings = policy::settle(
            &p.catalog,
            &p.limits,
            SessionRequest { language: "bash".into(), runtime: Some("runc".into()), ..Default::default() },
        )
        .unwrap();
        settings.runtime = "runsc".into();
        let spec = p.plan(&SessionId::new(), &Owner("o".into()), &settings, Utc::now(), false).spec;
        assert_eq!((spec.oci_runtime.as_str(), spec.labels[labels::OCI_RUNTIME].as_str()), ("runsc", "runsc"));
        let config: SessionSettings = serde_json::from_str(&spec.labels[labels::CONFIG]).unwrap();
        assert_eq!(config.runtime, "runsc", "an adopted session keeps its runtime");
        let old: SessionSettings = serde_json::from_str(
            r#"{"language":"bash","memory_mb":512,"cpus":1.0,"timeout_s":60,"idle_timeout_s":60,"env":{},"metadata":{}}"#,
        )
        .unwrap();
        assert_eq!(old.runtime, "runc", "a session made before runtimes existed ran under runc");
    }
}
