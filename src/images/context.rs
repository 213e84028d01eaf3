//! Build contexts: the files of one image folder (embedded in the binary or read from a directory), the
//! host's package settings passed in as build arguments, and the content hash that says whether an image
//! is up to date.
//!
//! Nothing host-specific is written into the repository: the Debian mirror, the Python index and an extra
//! CA bundle come from configuration or from the host's own settings, at build time.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use ring::digest;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded_images.rs"));
}

/// The file every context gets: an extra CA bundle to trust while building (empty when none).
pub const EXTRA_CA_FILE: &str = "extra-ca.pem";

/// The folder of `images/` whose files join the supervisor image's context (not an image itself).
pub const SHARED_DIR: &str = "shared";

/// Build arguments that only say where packages come from.
pub const TRANSPORT_ARGS: &[&str] = &["APT_MIRROR", "PIP_INDEX_URL"];

/// Where the image folders come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Built into the binary from the repository's `images/`.
    Embedded,
    /// A directory with one folder per image.
    Dir(PathBuf),
}

/// One image's build context.
#[derive(Debug, Clone, PartialEq)]
pub struct Context {
    /// Relative path → content, sorted.
    pub files: BTreeMap<String, Vec<u8>>,
}

impl Source {
    /// The context of `image`: its own folder, plus the folder [`SHARED_DIR`] when `shared` (an image's
    /// own file of the same name wins), plus [`EXTRA_CA_FILE`].
    pub fn context(&self, image: &str, shared: bool, extra_ca: &[u8]) -> std::io::Result<Context> {
        let mut files = BTreeMap::new();
        if shared {
            self.read_folder(SHARED_DIR, &mut files)?;
        }
        let mut own = BTreeMap::new();
        self.read_folder(image, &mut own)?;
        if own.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no build context for image `{image}`"),
            ));
        }
        files.extend(own);
        files.insert(EXTRA_CA_FILE.to_owned(), extra_ca.to_vec());
        Ok(Context { files })
    }

    fn read_folder(&self, folder: &str, files: &mut BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
        match self {
            Source::Embedded => {
                let prefix = format!("{folder}/");
                for (path, bytes) in embedded::FILES {
                    if let Some(rel) = path.strip_prefix(&prefix) {
                        files.insert(rel.to_owned(), bytes.to_vec());
                    }
                }
                Ok(())
            }
            Source::Dir(root) => read_dir_into(&root.join(folder), Path::new(""), files),
        }
    }
}

fn read_dir_into(dir: &Path, rel: &Path, files: &mut BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let rel_path = rel.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            read_dir_into(&entry.path(), &rel_path, files)?;
        } else {
            files.insert(rel_path.to_string_lossy().into_owned(), std::fs::read(entry.path())?);
        }
    }
    Ok(())
}

impl Context {
    /// A tar archive of the context, as the Docker build API takes it. Executables keep their mode.
    pub fn tar(&self) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, bytes) in &self.files {
            let mut header = tar::Header::new_gnu();
            header.set_size(bytes.len() as u64);
            let executable = bytes.starts_with(b"#!");
            header.set_mode(if executable { 0o755 } else { 0o644 });
            header.set_mtime(0);
            header.set_cksum();
            builder.append_data(&mut header, path, bytes.as_slice()).expect("writing a tar to memory");
        }
        builder.into_inner().expect("writing a tar to memory")
    }

    /// A digest of everything that decides the image: the files, the build arguments and the parent
    /// image's id. How packages are fetched (mirror, index, the extra CA) is left out: the same image
    /// built through another mirror or proxy is the same image, so a service in a container (which sees
    /// no host settings) finds the host-built images up to date.
    pub fn content_hash(&self, build_args: &HashMap<String, String>, parent_id: &str) -> String {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for (path, bytes) in self.files.iter().filter(|(p, _)| *p != EXTRA_CA_FILE) {
            ctx.update(path.as_bytes());
            ctx.update(&[0]);
            ctx.update(&(bytes.len() as u64).to_le_bytes());
            ctx.update(bytes);
        }
        let args: BTreeMap<_, _> = build_args.iter().filter(|(k, _)| !TRANSPORT_ARGS.contains(&k.as_str())).collect();
        for (k, v) in args {
            ctx.update(format!("arg:{k}={v}\0").as_bytes());
        }
        ctx.update(format!("parent:{parent_id}").as_bytes());
        format!("sha256:{}", hex::encode(ctx.finish().as_ref()))
    }
}

/// The host's package settings for image builds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSettings {
    pub apt_mirror: Option<String>,
    pub pip_index_url: Option<String>,
    pub extra_ca: Vec<u8>,
}

/// The Debian mirror of the host's apt sources: the first `deb` source of a release suite with `main`.
pub fn detect_apt_mirror() -> Option<String> {
    let mut texts = Vec::new();
    if let Ok(t) = std::fs::read_to_string("/etc/apt/sources.list") {
        texts.push((false, t));
    }
    if let Ok(entries) = std::fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            let deb822 = p.extension().is_some_and(|e| e == "sources");
            let list = p.extension().is_some_and(|e| e == "list");
            if (deb822 || list)
                && let Ok(t) = std::fs::read_to_string(&p)
            {
                texts.push((deb822, t));
            }
        }
    }
    texts.iter().find_map(|(deb822, t)| if *deb822 { mirror_from_deb822(t) } else { mirror_from_list(t) })
}

fn is_debian_release_suite(suite: &str) -> bool {
    ["bookworm", "trixie", "bullseye", "stable"].contains(&suite)
}

fn mirror_from_list(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().filter(|w| !w.starts_with('[')).collect();
        match words.as_slice() {
            ["deb", uri, suite, components @ ..] if is_debian_release_suite(suite) && components.contains(&"main") => {
                Some(uri.to_string())
            }
            _ => None,
        }
    })
}

fn mirror_from_deb822(text: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| stanza.lines().find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()));
        let types = field("Types:")?;
        let suites = field("Suites:")?;
        let components = field("Components:")?;
        let enabled = field("Enabled:").is_none_or(|v| v != "no");
        (enabled
            && types.split_whitespace().any(|t| t == "deb")
            && suites.split_whitespace().any(is_debian_release_suite)
            && components.split_whitespace().any(|c| c == "main"))
        .then(|| field("URIs:"))
        .flatten()
        .and_then(|uris| uris.split_whitespace().next().map(str::to_owned))
    })
}

/// The host's pip index, from `PIP_INDEX_URL` or pip's configuration files.
pub fn detect_pip_index() -> Option<String> {
    if let Ok(v) = std::env::var("PIP_INDEX_URL")
        && !v.trim().is_empty()
    {
        return Some(v);
    }
    let home = std::env::var("HOME").unwrap_or_default();
    let files = ["/etc/pip.conf".to_owned(), format!("{home}/.config/pip/pip.conf"), format!("{home}/.pip/pip.conf")];
    files.iter().rev().find_map(|f| std::fs::read_to_string(f).ok().and_then(|t| ini_value(&t, "global", "index-url")))
}

fn ini_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.trim().to_owned();
        } else if current == section
            && let Some((k, v)) = line.split_once('=')
            && k.trim() == key
        {
            return Some(v.trim().to_owned());
        }
    }
    None
}

/// The extra CA bundle: the configured file, else the one pip or OpenSSL are told to use.
pub fn detect_extra_ca(configured: Option<&Path>) -> std::io::Result<Vec<u8>> {
    if let Some(path) = configured {
        return std::fs::read(path);
    }
    for var in ["PIP_CERT", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"] {
        if let Ok(path) = std::env::var(var)
            && let Ok(bytes) = std::fs::read(&path)
        {
            return Ok(bytes);
        }
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mirror_is_read_from_deb822_sources() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(mirror_from_deb822(text).as_deref(), Some("http://mirror.example/debian"));
        assert_eq!(mirror_from_deb822("Types: deb\nURIs: http://x\nSuites: nodistro\nComponents: main\n"), None);
    }

    #[test]
    fn the_mirror_is_read_from_a_sources_list() {
        let text = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main contrib\n";
        assert_eq!(mirror_from_list(text).as_deref(), Some("http://m.example/debian"));
    }

    #[test]
    fn the_pip_index_is_read_from_the_global_section() {
        let text = "[install]\nindex-url = http://wrong\n[global]\ncert = /x\nindex-url = http://right/simple\n";
        assert_eq!(ini_value(text, "global", "index-url").as_deref(), Some("http://right/simple"));
    }

    #[test]
    fn the_content_hash_changes_with_files_args_and_parent() {
        let ctx = Context { files: BTreeMap::from([("Dockerfile".to_owned(), b"FROM x".to_vec())]) };
        let args = HashMap::from([("A".to_owned(), "1".to_owned())]);
        let h = ctx.content_hash(&args, "sha256:p");
        assert_eq!(h, ctx.content_hash(&args, "sha256:p"), "stable");
        assert_ne!(h, ctx.content_hash(&args, "sha256:q"), "parent");
        assert_ne!(h, ctx.content_hash(&HashMap::new(), "sha256:p"), "args");
        let mirror =
            HashMap::from([("A".to_owned(), "1".to_owned()), ("APT_MIRROR".to_owned(), "http://m".to_owned())]);
        assert_eq!(h, ctx.content_hash(&mirror, "sha256:p"), "where packages come from is not content");
        let mut with_ca = ctx.clone();
        with_ca.files.insert(EXTRA_CA_FILE.into(), b"-----BEGIN CERTIFICATE-----".to_vec());
        assert_eq!(h, with_ca.content_hash(&args, "sha256:p"), "nor is the proxy's CA");
        let other = Context { files: BTreeMap::from([("Dockerfile".to_owned(), b"FROM y".to_vec())]) };
        assert_ne!(h, other.content_hash(&args, "sha256:p"), "files");
    }

    #[test]
    fn start_kernel_is_the_last_layer_of_every_language_image_and_nowhere_else() {
        use crate::images::catalog::{Catalog, IMAGES, SUPERVISOR, SUPERVISOR_ARG};
        let languages = Catalog::new("kb/").language_images();
        for def in IMAGES {
            let ctx = Source::Embedded.context(def.name, def.shared, b"").unwrap();
            let dockerfile = String::from_utf8(ctx.files["Dockerfile"].clone()).unwrap();
            let steps: Vec<&str> =
                dockerfile.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
            assert_eq!(def.shared, def.name == SUPERVISOR, "{}: only the supervisor gets images/shared/", def.name);
            assert_eq!(
                def.supervised,
                languages.iter().any(|l| l == def.name),
                "{}: the start contract is copied iff a language image",
                def.name
            );
            assert!(!ctx.files.contains_key("start-kernel"), "{}: start-kernel is built, not copied", def.name);
            if def.name == SUPERVISOR {
                assert!(ctx.files.contains_key("start-kernel/main.rs") && ctx.files.contains_key("files"));
                assert_eq!(steps.last(), Some(&"COPY --from=build /kernelbox/ /kernelbox/"));
                continue;
            }
            if !def.supervised {
                let copies = steps.iter().any(|l| l.starts_with("COPY") && l.contains("kernelbox/ /opt"));
                assert!(!copies && !dockerfile.contains("start-kernel /opt"), "{} copies no start-kernel", def.name);
                continue;
            }
            // Global ARGs, then the supervisor stage, then the image's own FROM.
            let from = steps.iter().position(|l| l.starts_with("FROM")).unwrap();
            assert!(steps[..from].iter().any(|l| l.starts_with(&format!("ARG {SUPERVISOR_ARG}="))), "{}", def.name);
            assert_eq!(steps[from], format!("FROM ${{{SUPERVISOR_ARG}}} AS supervisor"), "{}", def.name);
            assert_eq!(steps.last(), Some(&"COPY --from=supervisor /kernelbox/ /opt/kernelbox/"), "{}", def.name);
            assert!(!ctx.files.contains_key("files"), "{}: the file tool comes from the supervisor", def.name);
            let parent = def.parent.and_then(crate::images::catalog::image_def).unwrap();
            assert!(
                !parent.supervised,
                "{} is not built on another language image (whose start-kernel it would carry)",
                def.name
            );
        }
        // The file tool keeps its mode through the supervisor's context.
        let ctx = Source::Embedded.context(SUPERVISOR, true, b"").unwrap();
        let tar_bytes = ctx.tar();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mode = archive
            .entries()
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.path().unwrap().to_str() == Some("files"))
            .map(|e| e.header().mode().unwrap());
        assert_eq!(mode, Some(0o755), "the file tool is executable in the context");
    }

    #[test]
    fn a_context_tar_holds_every_file() {
        let ctx = Context {
            files: BTreeMap::from([
                ("Dockerfile".to_owned(), b"FROM x".to_vec()),
                ("start".to_owned(), b"#!/bin/sh".to_vec()),
            ]),
        };
        let tar_bytes = ctx.tar();
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let entries: Vec<(String, u32)> = archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().display().to_string(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(entries, vec![("Dockerfile".to_owned(), 0o644), ("start".to_owned(), 0o755)]);
    }
}
