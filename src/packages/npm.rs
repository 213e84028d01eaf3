//! npm packages in a javascript session: an archive of a fetcher's Deno `npm` cache folder, unpacked by
//! `tar` inside the session (Docker's exec API, uid 1000) into the kernel's `DENO_DIR`. The service
//! streams the archive from its own cache into the exec's stdin and never unpacks it itself.

use std::collections::HashMap;
use std::io::Read;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::runtime::tool::keep_tail;
use crate::runtime::{ContainerRuntime, ExecOutput, ExecRequest, RuntimeError};

use super::exec;
use super::settings::SESSION_DENO_DIR;
use super::spec::Spec;

/// The most archive entries looked at for versions.
const MAX_ENTRIES: usize = 200_000;

/// The versions of `specs` in an archive: entries `npm/<registry>/<name>/<version>/package.json`
/// (`<name>` is two components for a scoped package). The highest by string order when several.
pub fn versions(file: std::fs::File, specs: &[Spec]) -> HashMap<String, String> {
    let mut found: HashMap<String, String> = HashMap::new();
    let mut archive = tar::Archive::new(std::io::BufReader::new(file).take(u64::MAX));
    let Ok(entries) = archive.entries() else { return found };
    for entry in entries.take(MAX_ENTRIES).flatten() {
        let Ok(path) = entry.path() else { continue };
        let parts: Vec<String> = path.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        if parts.len() < 5 || parts[0] != "npm" || parts.last().map(String::as_str) != Some("package.json") {
            continue;
        }
        for spec in specs {
            let name: Vec<&str> = spec.name.split('/').collect();
            let rest = &parts[2..parts.len() - 1];
            if rest.len() == name.len() + 1 && rest[..name.len()].iter().zip(&name).all(|(a, b)| a == b) {
                let version = rest[name.len()].clone();
                let slot = found.entry(spec.name.clone()).or_default();
                if version > *slot {
                    *slot = version;
                }
            }
        }
    }
    found
}

/// Unpacks `archive` into the session's `DENO_DIR`. Returns whether `tar` succeeded, and its output.
pub async fn unpack(
    runtime: &dyn ContainerRuntime,
    container: &str,
    archive: std::fs::File,
    limit: Duration,
) -> Result<(bool, String), RuntimeError> {
    let mkdir = exec::time_limited(Duration::from_secs(30), &["mkdir", "-p", SESSION_DENO_DIR]);
    let made = exec::run(runtime, container, mkdir, Vec::new(), 4096).await?;
    if !made.ok() {
        return Ok((false, format!("could not make {SESSION_DENO_DIR}: {}", made.stderr_text())));
    }
    let cmd = exec::time_limited(
        limit,
        &["tar", "-x", "-C", SESSION_DENO_DIR, "--no-same-owner", "--no-same-permissions", "-f", "-"],
    );
    let request = ExecRequest { cmd, user: "1000:1000".into(), working_dir: "/tmp".into(), env: Vec::new() };
    let mut process = runtime.exec(container, &request).await?;
    let mut file = tokio::fs::File::from_std(archive);
    let mut output = Vec::new();
    let feed = async {
        let copied = tokio::io::copy(&mut file, &mut process.stdin).await;
        let _ = process.stdin.shutdown().await;
        copied
    };
    let drain = async {
        use futures::StreamExt;
        while let Some(item) = process.output.next().await {
            match item {
                Ok(ExecOutput::Stdout(b)) | Ok(ExecOutput::Stderr(b)) => keep_tail(&mut output, &b, 16 << 10),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    let (fed, drained) = tokio::join!(feed, drain);
    drained?;
    let mut log = String::from_utf8_lossy(&output).into_owned();
    if let Err(e) = fed {
        log.push_str(&format!("(the archive could not be sent: {e})\n"));
    }
    let code = exec::exit_code(runtime, &process.id).await?;
    Ok((code == Some(0), log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::spec::parse_npm;

    #[test]
    fn versions_are_read_from_the_archives_package_folders() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("a.tar");
        let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
        for p in [
            "npm/registry.example/left-pad/1.3.0/package.json",
            "npm/registry.example/left-pad/registry.json",
            "npm/registry.example/@std/fmt/1.0.2/package.json",
            "npm/registry.example/other/9.9.9/package.json",
        ] {
            let mut h = tar::Header::new_gnu();
            h.set_size(2);
            h.set_cksum();
            builder.append_data(&mut h, p, &b"{}"[..]).unwrap();
        }
        builder.finish().unwrap();
        let specs = [parse_npm("left-pad@1.3").unwrap(), parse_npm("@std/fmt").unwrap(), parse_npm("absent").unwrap()];
        let v = versions(std::fs::File::open(&path).unwrap(), &specs);
        assert_eq!(v.get("left-pad").map(String::as_str), Some("1.3.0"));
        assert_eq!(v.get("@std/fmt").map(String::as_str), Some("1.0.2"));
        assert!(!v.contains_key("absent"));
    }
}
