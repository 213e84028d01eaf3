//! Which OCI runtime a session's container runs under (`runc`, gVisor's `runsc`, ...): the operator's
//! default per language (`--runtime python=runsc,*=runc`) and the runtimes a session may ask for by name
//! (`--session-runtimes runsc`). Pure: whether the Docker engine has them registered is checked by the
//! session layer (`session/oci.rs`) against what the engine lists.

use std::collections::{BTreeMap, BTreeSet};

use super::error::ConfigError;

/// The runtime every language uses unless the operator says otherwise: Docker's own.
pub const DEFAULT_RUNTIME: &str = "runc";

/// The operator's choice of runtimes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRuntimes {
    /// A language's default runtime, when it is not `fallback`.
    per_language: BTreeMap<String, String>,
    /// The default of every language not named (`*=...`, else `runc`).
    fallback: String,
    /// Runtimes a session may ask for beyond its language's default (which it may always name).
    selectable: BTreeSet<String>,
}

impl Default for OciRuntimes {
    fn default() -> Self {
        OciRuntimes { per_language: BTreeMap::new(), fallback: DEFAULT_RUNTIME.into(), selectable: BTreeSet::new() }
    }
}

/// Why a session's request for a runtime is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("runtime `{asked}` is not offered for {language}: the allowed runtimes are {}", allowed.join(", "))]
pub struct RuntimeRefused {
    pub asked: String,
    pub language: String,
    pub allowed: Vec<String>,
}

impl OciRuntimes {
    /// Parses `--runtime` (`python=runsc,*=runc`; empty: `runc` everywhere) and `--session-runtimes`
    /// (`runsc,runc`; empty: none beyond each language's default). `languages` are the ones that exist.
    pub fn parse(mapping: &str, selectable: &str, languages: &[&str]) -> Result<Self, ConfigError> {
        let mut choice = OciRuntimes::default();
        for part in mapping.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (language, runtime) = part
                .split_once('=')
                .ok_or_else(|| ConfigError(format!("--runtime: `{part}` is not LANGUAGE=RUNTIME")))?;
            let runtime = runtime_name(runtime.trim()).map_err(|e| ConfigError(format!("--runtime: {e}")))?;
            match language.trim() {
                "*" => choice.fallback = runtime,
                l if languages.contains(&l) => {
                    if choice.per_language.insert(l.to_owned(), runtime).is_some() {
                        return Err(ConfigError(format!("--runtime: {l} is named twice")));
                    }
                }
                l => {
                    return Err(ConfigError(format!(
                        "--runtime: no language `{l}` (the languages are {}, or * for all)",
                        languages.join(", ")
                    )));
                }
            }
        }
        for name in selectable.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            choice.selectable.insert(runtime_name(name).map_err(|e| ConfigError(format!("--session-runtimes: {e}")))?);
        }
        Ok(choice)
    }

    /// The runtime `language` runs under when a session does not ask.
    pub fn default_for(&self, language: &str) -> &str {
        self.per_language.get(language).unwrap_or(&self.fallback)
    }

    /// The runtimes a session of `language` may ask for: its default first, then the selectable ones.
    pub fn allowed_for(&self, language: &str) -> Vec<String> {
        let default = self.default_for(language);
        std::iter::once(default.to_owned()).chain(self.selectable.iter().filter(|r| *r != default).cloned()).collect()
    }

    /// The runtime a session of `language` runs under: the one it asked for, if it may, else its
    /// language's default.
    pub fn for_session(&self, language: &str, asked: Option<&str>) -> Result<String, RuntimeRefused> {
        match asked {
            None => Ok(self.default_for(language).to_owned()),
            Some(asked) if self.allowed_for(language).iter().any(|r| r == asked) => Ok(asked.to_owned()),
            Some(asked) => Err(RuntimeRefused {
                asked: asked.chars().take(64).collect(),
                language: language.to_owned(),
                allowed: self.allowed_for(language),
            }),
        }
    }

    /// Every runtime the operator named (each must be registered with the engine).
    pub fn named(&self) -> BTreeSet<&str> {
        std::iter::once(self.fallback.as_str())
            .chain(self.per_language.values().map(String::as_str))
            .chain(self.selectable.iter().map(String::as_str))
            .collect()
    }
}

/// A runtime's name as Docker registers it: letters, digits, `.`, `_` and `-`, at most 64.
fn runtime_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok { Ok(name.to_owned()) } else { Err(format!("`{name}` is not a runtime name")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LANGUAGES: &[&str] = &["python", "javascript", "bash"];

    #[test]
    fn every_language_runs_under_runc_unless_the_operator_says_otherwise() {
        let choice = OciRuntimes::parse("", "", LANGUAGES).unwrap();
        assert_eq!(choice.default_for("python"), "runc");
        assert_eq!(choice.for_session("python", None).unwrap(), "runc");
        assert_eq!(choice.for_session("python", Some("runc")).unwrap(), "runc", "naming the default is fine");
        let refused = choice.for_session("python", Some("runsc")).unwrap_err();
        assert_eq!(refused.allowed, vec!["runc"]);
        assert!(refused.to_string().contains("allowed runtimes are runc"), "{refused}");
    }

    #[test]
    fn languages_map_to_runtimes_and_sessions_may_ask_for_the_selectable_ones() {
        let choice = OciRuntimes::parse("python=runsc, *=runc", "runsc", LANGUAGES).unwrap();
        assert_eq!(choice.default_for("python"), "runsc");
        assert_eq!(choice.default_for("bash"), "runc");
        assert_eq!(choice.for_session("bash", Some("runsc")).unwrap(), "runsc");
        assert_eq!(choice.allowed_for("python"), vec!["runsc"]);
        assert!(choice.for_session("python", Some("runc")).is_err(), "python's default is not selectable away");
        assert_eq!(choice.named().into_iter().collect::<Vec<_>>(), vec!["runc", "runsc"]);
        let all = OciRuntimes::parse("*=runsc", "runc", LANGUAGES).unwrap();
        assert_eq!(all.default_for("javascript"), "runsc");
        assert_eq!(all.allowed_for("javascript"), vec!["runsc", "runc"]);
    }

    #[test]
    fn bad_flags_are_refused_with_what_is_wrong() {
        for (mapping, selectable, says) in [
            ("python", "", "not LANGUAGE=RUNTIME"),
            ("cobol=runsc", "", "no language `cobol`"),
            ("python=run sc", "", "not a runtime name"),
            ("python=runsc,python=runc", "", "named twice"),
            ("", "runsc,../x", "not a runtime name"),
        ] {
            let err = OciRuntimes::parse(mapping, selectable, LANGUAGES).unwrap_err().to_string();
            assert!(err.contains(says), "{mapping} / {selectable}: {err}");
        }
    }

    #[test]
    fn a_refusal_does_not_echo_a_long_name() {
        let long = "x".repeat(10_000);
        let refused = OciRuntimes::default().for_session("python", Some(&long)).unwrap_err();
        assert_eq!(refused.asked.len(), 64);
    }
}
