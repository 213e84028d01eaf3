//! The images a simulated cluster needs, made on the host engine and moved into the nodes without a
//! registry: the node image (kernelbox's base image + Debian's `docker.io` and `iptables`, built once and
//! found again by its content hash), the service image (the binary cargo built for these tests), and the
//! transfer itself (one export from the host, streamed into every node's import at once, never held whole).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bollard::Docker;
use bollard::query_parameters::{BuildImageOptionsBuilder, ImportImageOptionsBuilder};
use bytes::Bytes;
use futures::StreamExt;
use kernelbox::images::Catalog;
use kernelbox::images::builder::ImageBuilder;
use kernelbox::images::catalog::LABEL_CONTENT_HASH;
use kernelbox::images::context::{self, HostSettings, Source};
use kernelbox::runtime::docker::DockerRuntime;
use kernelbox::runtime::{BuildRequest, ContainerRuntime};
use tokio::sync::{OnceCell, mpsc};

/// The node image's name; a rebuild replaces it (its content hash label says which build it is).
pub const NODE_IMAGE: &str = "kernelbox/test-node:latest";
/// The service image's name; a rebuild replaces it (and removes the image it replaces).
pub const SERVICE_IMAGE: &str = "kernelbox/test-service:latest";
/// The kernel images' prefix (the one the other end-to-end tests use).
pub const KERNEL_PREFIX: &str = "kernelbox/kernel-";

/// How long each image step took, for the report.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub kernel_images: Duration,
    pub node_image: Duration,
    pub node_image_built: bool,
    pub service_image: Duration,
    pub service_image_built: bool,
}

/// The host engine through the project's own runtime (the image builder's way in).
pub async fn host_runtime() -> Arc<DockerRuntime> {
    let runtime = DockerRuntime::connect().expect("cannot reach the Docker engine: the cluster tests need Docker");
    runtime.ping().await.expect("cannot reach the Docker engine: the cluster tests need Docker");
    Arc::new(runtime)
}

/// The host engine through bollard, for what the product's runtime does not offer (export, networks).
pub async fn host_docker() -> anyhow::Result<Docker> {
    Ok(Docker::connect_with_defaults()?.negotiate_version().await?)
}

fn host_settings() -> HostSettings {
    HostSettings {
        apt_mirror: std::env::var("KERNELBOX_APT_MIRROR").ok().or_else(context::detect_apt_mirror),
        pip_index_url: std::env::var("KERNELBOX_PIP_INDEX_URL").ok().or_else(context::detect_pip_index),
        extra_ca: context::detect_extra_ca(std::env::var_os("KERNELBOX_EXTRA_CA_BUNDLE").as_deref().map(Path::new))
            .expect("reading the extra CA bundle"),
    }
}

/// The kernel image builder, as the other end-to-end tests make it.
pub fn kernel_builder(runtime: Arc<DockerRuntime>) -> ImageBuilder {
    ImageBuilder {
        runtime,
        catalog: Catalog::new(KERNEL_PREFIX),
        source: Source::Embedded,
        settings: host_settings(),
        base_image: std::env::var("KERNELBOX_BASE_IMAGE").unwrap_or_else(|_| "debian:bookworm-slim".into()),
    }
}

/// The kernel image of `language` (`kernelbox/kernel-python:latest`, ...).
pub fn kernel_image(language: &str) -> String {
    Catalog::new(KERNEL_PREFIX).image_ref(language)
}

/// Everything the cluster tests need on the host, made once per test process: the python kernel image
/// (and its parents), the node image and the service image.
pub async fn ensure() -> &'static (String, Timings) {
    static READY: OnceCell<(String, Timings)> = OnceCell::const_new();
    READY
        .get_or_init(|| async {
            let runtime = host_runtime().await;
            let mut timings = Timings::default();
            let started = Instant::now();
            kernel_builder(runtime.clone())
                .build(&["python".to_owned()], false, &mut std::io::stderr())
                .await
                .expect("building the python kernel image");
            timings.kernel_images = started.elapsed();
            let started = Instant::now();
            timings.node_image_built = ensure_node_image(&runtime).await.expect("building the node image");
            timings.node_image = started.elapsed();
            let started = Instant::now();
            let (service, built) = ensure_service_image().await.expect("building the service image");
            timings.service_image = started.elapsed();
            timings.service_image_built = built;
            (service, timings)
        })
        .await
}

/// The node image's build context: `tests/cluster/node-image/` plus the host's extra CA.
fn node_context(settings: &HostSettings) -> anyhow::Result<context::Context> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cluster");
    Ok(Source::Dir(root).context("node-image", false, &settings.extra_ca)?)
}

/// Builds [`NODE_IMAGE`] FROM the kernel base image unless an image with the same content hash is there.
/// Returns whether it built.
pub async fn ensure_node_image(runtime: &Arc<DockerRuntime>) -> anyhow::Result<bool> {
    let base = Catalog::new(KERNEL_PREFIX).image_ref("base");
    let parent = runtime.image(&base).await?.ok_or_else(|| anyhow!("the base image {base} is missing"))?;
    let settings = host_settings();
    let context = node_context(&settings)?;
    let args = HashMap::from([
        ("BASE_IMAGE".to_owned(), base.clone()),
        ("APT_MIRROR".to_owned(), settings.apt_mirror.clone().unwrap_or_default()),
    ]);
    let hash = context.content_hash(&args, &parent.id);
    if let Some(existing) = runtime.image(NODE_IMAGE).await?
        && existing.labels.get(LABEL_CONTENT_HASH) == Some(&hash)
    {
        return Ok(false);
    }
    eprintln!("[cluster] building {NODE_IMAGE} from {base}");
    let labels =
        HashMap::from([(LABEL_CONTENT_HASH.to_owned(), hash), ("kernelbox.test.image".to_owned(), "node".into())]);
    let request =
        BuildRequest { tag: NODE_IMAGE.into(), context_tar: context.tar(), build_args: args, labels, no_cache: false };
    let mut progress = |line: &str| {
        if line.starts_with("Step ") {
            eprintln!("[cluster] {line}");
        }
    };
    let previous = runtime.image(NODE_IMAGE).await?.map(|i| i.id);
    runtime.build_image(request, &mut progress).await?;
    remove_replaced(&host_docker().await?, previous, NODE_IMAGE).await;
    Ok(true)
}

/// Removes the image a rebuild replaced (now untagged), so rebuilds do not pile up on the host. An image
/// still in use stays.
async fn remove_replaced(docker: &Docker, previous: Option<String>, tag: &str) {
    let now = docker.inspect_image(tag).await.ok().and_then(|i| i.id);
    if let Some(id) = previous.filter(|p| Some(p) != now.as_ref()) {
        let _ = docker.remove_image(&id, None::<bollard::query_parameters::RemoveImageOptions>, None).await;
    }
}

/// The Debian image the service image is built on: the one the kernel images were built on.
async fn debian_base(docker: &Docker) -> anyhow::Result<String> {
    for candidate in [
        std::env::var("KERNELBOX_BASE_IMAGE").unwrap_or_else(|_| "debian:bookworm-slim".into()),
        kernelbox::images::builder::ROOTFS_IMAGE.to_owned(),
    ] {
        if docker.inspect_image(&candidate).await.is_ok() {
            return Ok(candidate);
        }
    }
    bail!("no Debian base image on this host (the kernel image build makes one)")
}

/// Builds the service image from the repository's Dockerfile (stage `prebuilt`) and the binary cargo
/// built for these tests, tagged with the hash of both and of the base image. Returns the image and
/// whether it built.
pub async fn ensure_service_image() -> anyhow::Result<(String, bool)> {
    let docker = host_docker().await?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read(root.join("Dockerfile"))?;
    let binary_path = Path::new(env!("CARGO_BIN_EXE_kernelbox"));
    let base = debian_base(&docker).await?;
    let base_id = docker.inspect_image(&base).await?.id.unwrap_or_default();
    let binary = service_binary(binary_path)?;
    let files =
        std::collections::BTreeMap::from([("Dockerfile".to_owned(), dockerfile), ("kernelbox".to_owned(), binary)]);
    let context = context::Context { files };
    let args = HashMap::from([
        ("BASE_IMAGE".to_owned(), base.clone()),
        ("KERNELBOX_BINARY".to_owned(), "kernelbox".to_owned()),
    ]);
    // `+exec`: the binary goes in with mode 0755 (see `service_context_tar`), which the hash must say.
    let hash = context.content_hash(&args, &format!("{base_id}+exec"));
    let tag = SERVICE_IMAGE.to_owned();
    let previous = docker.inspect_image(&tag).await.ok();
    if previous.as_ref().and_then(|i| i.config.as_ref()?.labels.as_ref()?.get(LABEL_CONTENT_HASH)) == Some(&hash) {
        return Ok((tag, false));
    }
    eprintln!("[cluster] building {tag} from {base}");
    let labels =
        HashMap::from([(LABEL_CONTENT_HASH.to_owned(), hash), ("kernelbox.test.image".to_owned(), "service".into())]);
    let options = BuildImageOptionsBuilder::default()
        .t(&tag)
        .target("prebuilt")
        .rm(true)
        .forcerm(true)
        .buildargs(&args)
        .labels(&labels)
        .build();
    let tar = service_context_tar(&context)?;
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(tar.into())));
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(message) = info.error_detail.and_then(|d| d.message) {
                    bail!("building the service image: {message}");
                }
                if let Some(line) = info.stream.filter(|l| l.starts_with("Step ")) {
                    eprint!("[cluster] {line}");
                }
            }
            // bollard can end a build stream with a spurious decoding error: the image's presence decides.
            Err(e) => eprintln!("[cluster] service image build stream: {e}"),
        }
    }
    docker.inspect_image(&tag).await.with_context(|| format!("the build produced no image {tag}"))?;
    remove_replaced(&docker, previous.and_then(|i| i.id), &tag).await;
    Ok((tag, true))
}

/// The service image's build context as a tar: the binary executable (the image builder's own tar marks
/// only scripts executable), everything else 0644.
fn service_context_tar(context: &context::Context) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, bytes) in &context.files {
        let mut header = tar::Header::new_gnu();
        header.set_size(bytes.len() as u64);
        header.set_mode(if path == "kernelbox" { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_cksum();
        builder.append_data(&mut header, path, bytes.as_slice())?;
    }
    builder.into_inner()
}

/// The binary for the service image: without its debug information when binutils' `strip` is there
/// (a debug build is ~280 MB, ~30 MB stripped, and every node imports it), else as it is.
fn service_binary(path: &Path) -> anyhow::Result<Vec<u8>> {
    let stripped = std::env::temp_dir().join(format!("kernelbox-stripped-{}", uuid::Uuid::new_v4().simple()));
    let ran = std::process::Command::new("strip").arg("-o").arg(&stripped).arg(path).output();
    let bytes = match ran {
        Ok(out) if out.status.success() => std::fs::read(&stripped),
        _ => std::fs::read(path),
    };
    let _ = std::fs::remove_file(&stripped);
    bytes.with_context(|| format!("reading {}", path.display()))
}

/// Copies `image` from the host engine into every engine of `targets` at once: one export, its chunks
/// handed to each node's import through a bounded queue (the slowest node sets the pace; nothing is held
/// whole). Skips nodes that already have an image with the same id.
pub async fn copy_image(host: &Docker, image: &str, targets: &[Docker]) -> anyhow::Result<()> {
    let id = host.inspect_image(image).await.with_context(|| format!("{image} is not on the host"))?.id;
    let mut senders = Vec::new();
    let mut imports = Vec::new();
    for node in targets {
        if node.inspect_image(image).await.is_ok_and(|i| i.id == id) {
            continue;
        }
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(8);
        senders.push(tx);
        let node = node.clone();
        imports.push(tokio::spawn(async move {
            let body = tokio_stream_from(rx);
            let mut stream =
                node.import_image_stream(ImportImageOptionsBuilder::default().quiet(true).build(), body, None);
            while let Some(item) = stream.next().await {
                item?;
            }
            anyhow::Ok(())
        }));
    }
    if senders.is_empty() {
        return Ok(());
    }
    let mut export = host.export_image(image);
    while let Some(chunk) = export.next().await {
        let chunk = chunk.with_context(|| format!("exporting {image}"))?;
        for tx in &senders {
            // A node whose import failed has dropped its end: its task reports why below.
            let _ = tx.send(Ok(chunk.clone())).await;
        }
    }
    drop(senders);
    for import in imports {
        import.await?.with_context(|| format!("importing {image} into a node"))?;
    }
    for node in targets {
        let got = node.inspect_image(image).await.with_context(|| format!("{image} is missing after the import"))?;
        if got.id != id {
            bail!("{image} has another id in a node after the import");
        }
    }
    Ok(())
}

fn tokio_stream_from(
    mut rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
