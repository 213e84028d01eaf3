//! Building the kernel images through the Docker API, parents first, skipping every image whose content
//! hash is unchanged; and making a Debian base image with debootstrap where none can be found or pulled.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::catalog::{
    Catalog, IMAGES, ImageDef, LABEL_BASE_ID, LABEL_CONTENT_HASH, SUPERVISOR, SUPERVISOR_ARG, image_def,
};
use super::context::{Context, HostSettings, Source};
use crate::runtime::{BuildRequest, ContainerRuntime, RuntimeError};

/// The image made by debootstrap when the base image can be neither found nor pulled.
pub const ROOTFS_IMAGE: &str = "kernelbox/debian-rootfs:bookworm";
const ROOTFS_SUITE: &str = "bookworm";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no base image: {0}")]
    NoBase(String),
    #[error("building `{image}` failed: {message}")]
    Build { image: String, message: String },
    #[error("unknown language or image `{0}`")]
    Unknown(String),
}

/// What happened to one image.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Built,
    UpToDate,
}

#[derive(Debug, Clone)]
pub struct BuildSummary {
    pub image: String,
    pub tag: String,
    pub outcome: Outcome,
    pub seconds: f64,
    pub size_bytes: i64,
}

/// One row of `kernelbox images list`.
#[derive(Debug, Clone)]
pub struct ImageStatus {
    pub image: String,
    pub tag: String,
    /// `up to date`, `stale` or `missing`.
    pub state: &'static str,
    pub size_bytes: i64,
    pub created: String,
}

pub struct ImageBuilder {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub catalog: Catalog,
    pub source: Source,
    pub settings: HostSettings,
    pub base_image: String,
}

/// Where progress goes: a person's terminal or the service's log.
pub type Out<'a> = &'a mut (dyn Write + Send);

impl ImageBuilder {
    fn tag(&self, image: &str) -> String {
        self.catalog.image_ref(image)
    }

    /// The images to build for `wanted` (languages or image names; all when empty), with their ancestors,
    /// in build order.
    pub fn plan(&self, wanted: &[String]) -> Result<Vec<&'static ImageDef>, ImageError> {
        let mut needed: Vec<&str> = Vec::new();
        let roots: Vec<String> = if wanted.is_empty() {
            self.catalog.language_images()
        } else {
            wanted
                .iter()
                .map(|w| match self.catalog.language(w) {
                    Some(l) => Ok(l.image.clone()),
                    None if image_def(w).is_some() => Ok(w.clone()),
                    None => Err(ImageError::Unknown(w.clone())),
                })
                .collect::<Result<_, _>>()?
        };
        let mut roots = roots;
        if roots.iter().any(|r| image_def(r).is_some_and(|d| d.supervised)) {
            roots.push(SUPERVISOR.to_owned());
        }
        for root in &roots {
            let mut cur = image_def(root);
            while let Some(def) = cur {
                if !needed.contains(&def.name) {
                    needed.push(def.name);
                }
                cur = def.parent.and_then(image_def);
            }
        }
        Ok(IMAGES.iter().filter(|d| needed.contains(&d.name)).collect())
    }

    fn build_args(&self, def: &ImageDef, parent_ref: &str) -> HashMap<String, String> {
        let mut args = HashMap::from([(def.parent_arg.to_owned(), parent_ref.to_owned())]);
        if def.supervised {
            args.insert(SUPERVISOR_ARG.into(), self.tag(SUPERVISOR));
        }
        args.insert("PIP_INDEX_URL".into(), self.settings.pip_index_url.clone().unwrap_or_default());
        if def.parent.is_none() {
            args.insert("APT_MIRROR".into(), self.settings.apt_mirror.clone().unwrap_or_default());
        }
        args
    }

    /// What the content hash says `def` is built on: its parent's id, and for a language image also the
    /// supervisor image's id (so a new start-kernel rebuilds every language image's last layer). `None`
    /// when one of them is missing.
    async fn built_on(&self, def: &ImageDef, parent_id: &str) -> Result<Option<String>, ImageError> {
        if !def.supervised {
            return Ok(Some(parent_id.to_owned()));
        }
        let supervisor = self.runtime.image(&self.tag(SUPERVISOR)).await?;
        Ok(supervisor.map(|s| format!("{parent_id}+{}", s.id)))
    }

    /// The build context, build arguments and content hash `def` has when built on `parent_ref`.
    fn expected(
        &self,
        def: &ImageDef,
        parent_ref: &str,
        parent_id: &str,
    ) -> Result<(Context, HashMap<String, String>, String), ImageError> {
        let args = self.build_args(def, parent_ref);
        let context = self.source.context(def.name, def.shared, &self.settings.extra_ca)?;
        let hash = context.content_hash(&args, parent_id);
        Ok((context, args, hash))
    }

    /// Builds what `wanted` needs; images whose content hash is unchanged are skipped unless `no_cache`.
    pub async fn build(
        &self,
        wanted: &[String],
        no_cache: bool,
        out: Out<'_>,
    ) -> Result<Vec<BuildSummary>, ImageError> {
        let plan = self.plan(wanted)?;
        let mut summaries = Vec::new();
        for def in plan {
            let started = Instant::now();
            let parent_ref = match def.parent {
                None => self.resolve_base(out).await?,
                Some(parent) => self.tag(parent),
            };
            let parent = self.runtime.image(&parent_ref).await?.ok_or_else(|| ImageError::Build {
                image: def.name.into(),
                message: format!("its parent image {parent_ref} is missing"),
            })?;
            let built_on = self.built_on(def, &parent.id).await?.ok_or_else(|| ImageError::Build {
                image: def.name.into(),
                message: format!("the image {} is missing", self.tag(SUPERVISOR)),
            })?;
            let (context, args, hash) = self.expected(def, &parent_ref, &built_on)?;
            let tag = self.tag(def.name);
            let existing = self.runtime.image(&tag).await?;
            let current = existing.as_ref().and_then(|i| i.labels.get(LABEL_CONTENT_HASH)) == Some(&hash);
            if current && !no_cache {
                let size = existing.map(|i| i.size_bytes).unwrap_or(0);
                let _ = writeln!(out, "[{}] up to date ({tag})", def.name);
                summaries.push(summary(def, tag, Outcome::UpToDate, started, size));
                continue;
            }
            let _ = writeln!(out, "[{}] building {tag} from {parent_ref}", def.name);
            self.build_one(def, &tag, context, args, &hash, &parent.id, no_cache, out).await?;
            let size = self.runtime.image(&tag).await?.map(|i| i.size_bytes).unwrap_or(0);
            let _ =
                writeln!(out, "[{}] built in {:.0} s, {}", def.name, started.elapsed().as_secs_f64(), human_size(size));
            summaries.push(summary(def, tag, Outcome::Built, started, size));
        }
        Ok(summaries)
    }

    #[allow(clippy::too_many_arguments)]
    async fn build_one(
        &self,
        def: &ImageDef,
        tag: &str,
        context: Context,
        build_args: HashMap<String, String>,
        hash: &str,
        parent_id: &str,
        no_cache: bool,
        out: Out<'_>,
    ) -> Result<(), ImageError> {
        let labels = HashMap::from([
            (LABEL_CONTENT_HASH.to_owned(), hash.to_owned()),
            (LABEL_BASE_ID.to_owned(), parent_id.to_owned()),
        ]);
        let request = BuildRequest { tag: tag.to_owned(), context_tar: context.tar(), build_args, labels, no_cache };
        let name = def.name;
        let mut progress = |line: &str| {
            // One line per build step; the steps' own output is too much for a person to follow.
            if line.starts_with("Step ") {
                let _ = writeln!(out, "[{name}] {}", truncate(line, 110));
            }
        };
        self.runtime
            .build_image(request, &mut progress)
            .await
            .map_err(|e| ImageError::Build { image: name.into(), message: e.to_string() })
    }

    /// The configured base image if it is here or can be pulled; else the debootstrap image, made if
    /// needed.
    async fn resolve_base(&self, out: Out<'_>) -> Result<String, ImageError> {
        if self.runtime.image(&self.base_image).await?.is_some() {
            return Ok(self.base_image.clone());
        }
        let _ = writeln!(out, "[base] {} is not here; trying to pull it", self.base_image);
        let mut pulled = |_: &str| {};
        match self.runtime.pull_image(&self.base_image, &mut pulled).await {
            Ok(()) if self.runtime.image(&self.base_image).await?.is_some() => {
                return Ok(self.base_image.clone());
            }
            Ok(()) => {}
            Err(e) => {
                let _ = writeln!(out, "[base] pull failed ({e})");
            }
        }
        if self.runtime.image(ROOTFS_IMAGE).await?.is_some() {
            let _ = writeln!(out, "[base] using {ROOTFS_IMAGE}, made earlier with debootstrap");
            return Ok(ROOTFS_IMAGE.to_owned());
        }
        self.debootstrap(out).await?;
        Ok(ROOTFS_IMAGE.to_owned())
    }

    /// `debootstrap` a minimal Debian into a temporary directory and `docker import` it.
    async fn debootstrap(&self, out: Out<'_>) -> Result<(), ImageError> {
        let remedies = format!(
            "make {} available (docker load, or a registry), or run kernelbox as root on a host with debootstrap \
             (apt-get install debootstrap) and a Debian mirror (--apt-mirror)",
            self.base_image
        );
        let debootstrap = which("debootstrap")
            .ok_or_else(|| ImageError::NoBase(format!("debootstrap is not installed; {remedies}")))?;
        // SAFETY-free check: geteuid via /proc, to avoid a libc dependency for one call.
        let root = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.split_whitespace().nth(2) == Some("0")))
            .unwrap_or(false);
        if !root {
            return Err(ImageError::NoBase(format!("debootstrap needs root; {remedies}")));
        }
        let mirror =
            self.settings.apt_mirror.clone().ok_or_else(|| {
                ImageError::NoBase(format!("no Debian mirror is configured on this host; {remedies}"))
            })?;
        let dir = tempdir("kernelbox-rootfs")?;
        let _ = writeln!(out, "[base] debootstrap {ROOTFS_SUITE} from {mirror} (a few minutes)");
        let mut child = tokio::process::Command::new(debootstrap)
            .args(["--variant=minbase", "--include=python3,python3-venv,ca-certificates", ROOTFS_SUITE])
            .arg(&dir)
            .arg(&mirror)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let mut stderr = child.stderr.take().expect("piped");
        let errors = tokio::spawn(async move {
            let mut s = String::new();
            let _ = tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut s).await;
            s
        });
        let mut count = 0usize;
        while let Ok(Some(line)) = lines.next_line().await {
            count += 1;
            if line.starts_with("I: Retrieving Release")
                || line.starts_with("I: Base system installed")
                || count.is_multiple_of(40)
            {
                let _ = writeln!(out, "[base] {}", truncate(&line, 110));
            }
        }
        let status = child.wait().await?;
        let err_text = errors.await.unwrap_or_default();
        if !status.success() {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ImageError::NoBase(format!("debootstrap failed ({status}): {}", err_text.trim())));
        }
        // Downloaded packages and package lists are of no use in the image (~90 MB).
        for cache in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            if let Ok(entries) = std::fs::read_dir(dir.join(cache)) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_file()) {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        let _ = writeln!(out, "[base] importing the root filesystem as {ROOTFS_IMAGE}");
        let mut tar = tokio::process::Command::new("tar")
            .arg("-C")
            .arg(&dir)
            .args(["-c", "."])
            .stdout(std::process::Stdio::piped())
            .stdin(std::process::Stdio::null())
            .spawn()?;
        let stream = tokio_util::io::ReaderStream::new(tar.stdout.take().expect("piped")).boxed();
        let imported = self.runtime.import_image(stream, ROOTFS_IMAGE).await;
        let _ = tar.wait().await;
        let _ = std::fs::remove_dir_all(&dir);
        imported?;
        Ok(())
    }

    /// The state of every image, without building anything.
    pub async fn status(&self) -> Result<Vec<ImageStatus>, ImageError> {
        let mut rows = Vec::new();
        let base_ref = if self.runtime.image(&self.base_image).await?.is_some() {
            Some(self.base_image.clone())
        } else if self.runtime.image(ROOTFS_IMAGE).await?.is_some() {
            Some(ROOTFS_IMAGE.to_owned())
        } else {
            None
        };
        for def in IMAGES {
            let tag = self.tag(def.name);
            let parent_ref = match def.parent {
                None => base_ref.clone(),
                Some(p) => Some(self.tag(p)),
            };
            let parent = match &parent_ref {
                Some(r) => self.runtime.image(r).await?,
                None => None,
            };
            let existing = self.runtime.image(&tag).await?;
            let state = match (&existing, parent, parent_ref) {
                (None, _, _) => "missing",
                (Some(img), Some(parent), Some(parent_ref)) => match self.built_on(def, &parent.id).await? {
                    Some(built_on) => {
                        let (_, _, hash) = self.expected(def, &parent_ref, &built_on)?;
                        if img.labels.get(LABEL_CONTENT_HASH) == Some(&hash) { "up to date" } else { "stale" }
                    }
                    None => "stale",
                },
                _ => "stale",
            };
            rows.push(ImageStatus {
                image: def.name.into(),
                tag,
                state,
                size_bytes: existing.as_ref().map(|i| i.size_bytes).unwrap_or(0),
                created: existing.map(|i| i.created).unwrap_or_default(),
            });
        }
        Ok(rows)
    }
}

fn summary(def: &ImageDef, tag: String, outcome: Outcome, started: Instant, size_bytes: i64) -> BuildSummary {
    BuildSummary { image: def.name.into(), tag, outcome, seconds: started.elapsed().as_secs_f64(), size_bytes }
}

/// Prints the table at the end of a build.
pub fn print_summary(summaries: &[BuildSummary], out: Out<'_>) {
    let _ = writeln!(out, "\n{:<18} {:<40} {:<10} {:>9} {:>8}", "IMAGE", "TAG", "RESULT", "SIZE", "TIME");
    for s in summaries {
        let result = match s.outcome {
            Outcome::Built => "built",
            Outcome::UpToDate => "cached",
        };
        let _ = writeln!(
            out,
            "{:<18} {:<40} {:<10} {:>9} {:>7.1}s",
            s.image,
            s.tag,
            result,
            human_size(s.size_bytes),
            s.seconds
        );
    }
}

pub fn human_size(bytes: i64) -> String {
    let b = bytes as f64;
    if b >= 1e9 { format!("{:.2} GB", b / 1e9) } else { format!("{:.0} MB", b / 1e6) }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max { s.to_owned() } else { format!("{}…", s.chars().take(max).collect::<String>()) }
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn tempdir(prefix: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::fake::FakeRuntime;

    fn builder() -> ImageBuilder {
        ImageBuilder {
            runtime: Arc::new(FakeRuntime::new()),
            catalog: Catalog::new("kb/k-"),
            source: Source::Embedded,
            settings: HostSettings::default(),
            base_image: "debian:bookworm-slim".into(),
        }
    }

    #[test]
    fn a_language_brings_its_ancestors_in_build_order() {
        let names: Vec<&str> = builder().plan(&["python_scientific".into()]).unwrap().iter().map(|d| d.name).collect();
        assert_eq!(names, ["base", "supervisor", "python_core", "python_scientific"]);
        let ts: Vec<&str> = builder().plan(&["typescript".into()]).unwrap().iter().map(|d| d.name).collect();
        assert_eq!(ts, ["base", "supervisor", "javascript"]);
        let sup: Vec<&str> = builder().plan(&["supervisor".into()]).unwrap().iter().map(|d| d.name).collect();
        assert_eq!(sup, ["base", "supervisor"]);
        assert_eq!(builder().plan(&[]).unwrap().len(), 8);
        assert!(matches!(builder().plan(&["cobol".into()]), Err(ImageError::Unknown(_))));
    }
}
