//! What an install did, as the client reads it: [`InstallReport`] and each package's [`PackageResult`].
//! A [`Draft`] gathers what an install learns as it goes (cached or fetched, the log) and is the one
//! place a report is made, for an install that worked and for one that failed (then the report says,
//! per package, what was missing, in words a client can act on). Pure: it runs nothing.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::install;
use super::spec::{self, Spec};

/// What of the install log is returned.
const MAX_LOG: usize = 64 << 10;

/// One requested package's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct PackageResult {
    /// The spec as installed (canonical form).
    pub spec: String,
    /// The normalised name.
    pub name: String,
    /// The version the session now has, when installed.
    pub version: Option<String>,
    pub error: Option<String>,
}

/// What an install did.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct InstallReport {
    /// Every package is installed.
    pub ok: bool,
    pub language: String,
    pub packages: Vec<PackageResult>,
    /// The cache satisfied the request: nothing was downloaded and no fetcher started.
    pub cached: bool,
    /// Wheels (or npm packages) this install had fetched.
    pub downloaded: Vec<String>,
    /// Wheels installed into the session.
    pub installed: Vec<String>,
    /// pip's (or Deno's) output, its last 64 KiB.
    pub log: String,
    pub duration_ms: u64,
}

/// An install under way: what its report will say besides the packages.
#[derive(Debug)]
pub struct Draft<'a> {
    language: &'a str,
    /// When the install began, for the report's duration.
    started: Instant,
    /// Nothing was fetched (so far): the cache had it all.
    pub cached: bool,
    /// What this install had fetched.
    pub downloaded: Vec<String>,
    /// pip's (or Deno's) output and the steps' markers, whole: the report keeps its end.
    pub log: String,
}

impl<'a> Draft<'a> {
    pub fn new(language: &'a str, started: Instant) -> Self {
        Draft { language, started, cached: true, downloaded: Vec::new(), log: String::new() }
    }

    /// The report: ok when no package has an error.
    pub fn report(self, packages: Vec<PackageResult>, installed: Vec<String>) -> InstallReport {
        InstallReport {
            ok: packages.iter().all(|p| p.error.is_none()),
            language: self.language.to_owned(),
            packages,
            cached: self.cached,
            downloaded: self.downloaded,
            installed,
            log: tail(&self.log),
            duration_ms: self.started.elapsed().as_millis() as u64,
        }
    }

    /// A report where every package failed; the reason names a package where pip's output does.
    pub fn failed(self, specs: &[Spec], output: &str) -> InstallReport {
        let missing = install::missing_requirements(output);
        let last_error = output
            .lines()
            .rev()
            .map(|l| crate::text::strip_ansi(l).trim().to_owned())
            .find(|l| l.starts_with("ERROR") || l.starts_with("error") || l.starts_with('('))
            .unwrap_or_else(|| output.lines().last().unwrap_or("the install failed").trim().to_owned());
        let packages = specs
            .iter()
            .map(|s| {
                let own = missing.iter().find(|m| spec::normalize_python_name(requirement_name(m)) == s.name);
                let error = match own {
                    Some(req) => format!(
                        "no binary wheel of {req} for this session's Python and platform, or no such package or \
                         version (kernelbox installs wheels only and never builds from source)"
                    ),
                    None if !missing.is_empty() => format!(
                        "not installed (a request installs all or nothing): no binary wheel for this session's \
                         Python and platform of {}",
                        missing.join(", ")
                    ),
                    None => format!("not installed: {last_error}"),
                };
                PackageResult { spec: s.text.clone(), name: s.name.clone(), version: None, error: Some(error) }
            })
            .collect();
        let mut report = self.report(packages, Vec::new());
        // Failed even when there is no package to carry an error.
        report.ok = false;
        report
    }
}

/// The name at the start of a requirement (`numpy>=2` → `numpy`).
fn requirement_name(req: &str) -> &str {
    let end = req.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))).unwrap_or(req.len());
    &req[..end]
}

/// The end of a log, at most [`MAX_LOG`] bytes, cut at a character boundary.
fn tail(log: &str) -> String {
    if log.len() <= MAX_LOG {
        return log.to_owned();
    }
    let mut cut = log.len() - MAX_LOG;
    while !log.is_char_boundary(cut) {
        cut += 1;
    }
    format!("[... {cut} bytes cut ...]\n{}", &log[cut..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packages::spec::Ecosystem;

    #[test]
    fn requirement_names_and_log_tails() {
        assert_eq!(requirement_name("numpy>=2"), "numpy");
        assert_eq!(requirement_name("zope.interface"), "zope.interface");
        let long = "é".repeat(MAX_LOG);
        let t = tail(&long);
        assert!(t.len() < MAX_LOG + 64 && t.starts_with("[... "));
    }

    #[test]
    fn a_failure_names_the_package_without_a_wheel() {
        let specs = spec::parse_all(Ecosystem::Python, &["six".into(), "nosuchpkg==1.0".into()]).unwrap();
        let out = "ERROR: No matching distribution found for nosuchpkg==1.0\n";
        let mut draft = Draft::new("python", Instant::now());
        draft.cached = false;
        draft.log = out.into();
        let r = draft.failed(&specs, out);
        assert!(!r.ok);
        assert!(r.packages[1].error.as_ref().unwrap().contains("no binary wheel of nosuchpkg==1.0"));
        assert!(r.packages[0].error.as_ref().unwrap().contains("all or nothing"), "{:?}", r.packages[0]);
    }
}
