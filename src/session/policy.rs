//! The operator's rules as pure functions: what a session may ask for ([`settle`]), whether one more fits
//! ([`admit`]), when the reaper removes one ([`reap_reason`]), and whether a kernel that died is restarted
//! automatically ([`RestartHistory::after_death`]). No I/O, no clock (callers pass `now`): table tests
//! below.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::config::Limits;
use crate::images::Catalog;

use super::error::SessionError;
use super::model::{SessionExtras, SessionRequest, SessionSettings, SessionStatus};

/// Checks a request against the limits and fills in defaults. Asking for more than the operator allows
/// is refused, never silently lowered.
pub fn settle(catalog: &Catalog, l: &Limits, req: SessionRequest) -> Result<SessionSettings, SessionError> {
    if catalog.language(&req.language).is_none() {
        return Err(SessionError::UnknownLanguage(req.language));
    }
    let memory_mb = req.memory_mb.unwrap_or(l.default_memory_mb);
    if !(64..=l.max_memory_mb).contains(&memory_mb) {
        return Err(SessionError::Invalid(format!("memory_mb must be between 64 and {}", l.max_memory_mb)));
    }
    let cpus = req.cpus.unwrap_or(l.default_cpus);
    if !(cpus >= 0.01 && cpus <= l.max_cpus) {
        return Err(SessionError::Invalid(format!("cpus must be between 0.01 and {}", l.max_cpus)));
    }
    let timeout_s = req.timeout_s.unwrap_or(l.default_timeout.as_secs());
    check_timeout("timeout_s", timeout_s, l.max_timeout)?;
    let idle_timeout_s = req.idle_timeout_s.unwrap_or(l.default_idle_timeout.as_secs());
    check_timeout("idle_timeout_s", idle_timeout_s, l.max_idle_timeout)?;
    let env = req.env.unwrap_or_default();
    check_env(&env)?;
    let metadata = req.metadata.unwrap_or_default();
    if metadata.len() > 64 || metadata.iter().any(|(k, v)| k.len() > 256 || v.len() > 4096) {
        return Err(SessionError::Invalid(
            "metadata: at most 64 entries, keys up to 256 and values up to 4096 bytes".into(),
        ));
    }
    let runtime = l.runtimes.for_session(&req.language, req.runtime.as_deref())?;
    Ok(SessionSettings {
        runtime,
        language: req.language,
        memory_mb,
        cpus,
        timeout_s,
        idle_timeout_s,
        env,
        metadata,
        notebook: None,
        mounts: Vec::new(),
        output: None,
        auto_restart: req.auto_restart.unwrap_or(true),
        // Checked by the manager against the operator's bounds (`network.rs`), which it alone holds.
        network: None,
    })
}

/// Checks an adapter's extras: a notebook path inside the notebooks folder, mounts of absolute host
/// folders at absolute container paths under `/mnt` that shadow nothing of the start contract (nor the
/// datasets folder), an output folder's user that is one plain name.
pub fn check_extras(extras: &SessionExtras) -> Result<(), SessionError> {
    if let Some(user) = &extras.output
        && !super::outputs::valid_user_folder(user)
    {
        return Err(SessionError::Invalid(format!("output folder {user:?}: 1 to 64 of [A-Za-z0-9_.-], not hidden")));
    }
    if let Some(nb) = &extras.notebook {
        let tidy = crate::session::files::FilePath::parse(nb)
            .map_err(|e| SessionError::Invalid(format!("notebook path: {e}")))?;
        if tidy.is_root() || tidy.as_str() != nb || !nb.ends_with(".ipynb") {
            return Err(SessionError::Invalid(format!("notebook path {nb:?}: a relative path ending in .ipynb")));
        }
    }
    for m in &extras.mounts {
        let plain = |s: &str| !s.contains([':', ',', '\0']) && !s.split('/').any(|p| p == "..");
        let host = m.host.to_string_lossy();
        let ok = m.host.is_absolute()
            && plain(&host)
            && m.container.starts_with("/mnt/")
            && m.container.len() > 5
            && plain(&m.container)
            && m.container != DATASETS_MOUNT
            && !m.container.starts_with(&format!("{DATASETS_MOUNT}/"))
            && m.container != crate::packages::WHEELS_MOUNT
            && !m.container.starts_with(&format!("{}/", crate::packages::WHEELS_MOUNT));
        if !ok {
            return Err(SessionError::Invalid(format!("mount {host} → {}: not allowed", m.container)));
        }
    }
    Ok(())
}

/// Where the operator's datasets folder appears in every session.
pub const DATASETS_MOUNT: &str = "/mnt/data";

/// A per-request timeout in seconds, between 1 and `max`.
pub fn check_timeout(name: &str, seconds: u64, max: Duration) -> Result<Duration, SessionError> {
    if (1..=max.as_secs()).contains(&seconds) {
        Ok(Duration::from_secs(seconds))
    } else {
        Err(SessionError::Invalid(format!("{name} must be between 1 and {}", max.as_secs())))
    }
}

/// Environment variables a session may set: names of letters, digits and `_`, bounded sizes, no NUL.
/// Names the service itself sets for the kernel are refused.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), SessionError> {
    if env.len() > 64 {
        return Err(SessionError::Invalid("env: at most 64 variables".into()));
    }
    for (k, v) in env {
        let valid_name = !k.is_empty()
            && k.len() <= 128
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(SessionError::Invalid(format!("env: `{k}` is not a valid variable name")));
        }
        if reserved_env(k) {
            return Err(SessionError::Invalid(format!(
                "env: `{k}` is reserved: it changes how the kernel itself starts (kernelbox sets it)"
            )));
        }
        if v.len() > 32 * 1024 || v.contains('\0') {
            return Err(SessionError::Invalid(format!("env: the value of `{k}` is too long or contains NUL")));
        }
    }
    Ok(())
}

/// Variables that decide how the kernel's runtime starts: a session may not set them, so a bad value is a
/// clear 422 instead of a kernel that fails to boot.
fn reserved_env(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "PATH",
        "HOME",
        "IPYTHONDIR",
        "MPLCONFIGDIR",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "CLASSPATH",
        "BASH_ENV",
        "ENV",
        "SHELL",
        "TMPDIR",
    ];
    const PREFIXES: &[&str] = &["KERNELBOX_", "LD_", "PYTHON", "JUPYTER_", "DENO_", "NODE_"];
    EXACT.contains(&name) || PREFIXES.iter().any(|p| name.starts_with(p))
}

/// What the sessions on this server hold now, as admission weighs it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Held {
    pub sessions: usize,
    /// Of them, the asking key's.
    pub owned: usize,
    pub memory_mb: u64,
    pub cpus: f64,
}

/// Whether one more session, given `memory_mb` and `cpus`, fits beside what is `held`.
pub fn admit(held: Held, memory_mb: u64, cpus: f64, l: &Limits) -> Result<(), SessionError> {
    if held.sessions >= l.max_sessions {
        return Err(SessionError::TooMany(format!(
            "the server runs its maximum of {} sessions; end one first",
            l.max_sessions
        )));
    }
    if held.owned >= l.max_sessions_per_owner {
        return Err(SessionError::TooMany(format!(
            "this API key has its maximum of {} sessions; end one first",
            l.max_sessions_per_owner
        )));
    }
    if held.memory_mb.saturating_add(memory_mb) > l.max_total_memory_mb {
        return Err(SessionError::TooMany(format!(
            "the server's sessions hold {} of its {} MiB of memory; {memory_mb} more do not fit now",
            held.memory_mb, l.max_total_memory_mb
        )));
    }
    if held.cpus + cpus > l.max_total_cpus + 1e-9 {
        return Err(SessionError::TooMany(format!(
            "the server's sessions hold {} of its {} CPUs; {cpus} more do not fit now",
            held.cpus, l.max_total_cpus
        )));
    }
    Ok(())
}

/// What the reaper looks at for one session.
#[derive(Debug, Clone)]
pub struct ReapView {
    pub status: SessionStatus,
    pub status_since: DateTime<Utc>,
    pub last_used: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub idle_timeout: Duration,
    /// An execution or restart is queued or running.
    pub in_use: bool,
}

/// The reaper's deadlines.
#[derive(Debug, Clone, Copy)]
pub struct ReapRules {
    pub max_lifetime: Duration,
    /// How long a session may stay starting or restarting before it is deemed stuck (the boot's own
    /// deadline plus a margin: this is a safety net, the boot normally fails first).
    pub stuck_after: Duration,
}

/// Whether the reaper removes a session now, and why: stuck starting or restarting, idle past its idle
/// timeout, or older than the maximum lifetime. A session with `/v1` work queued or running (each piece
/// bounded by its own timeout) is never removed; a busy one (a Jupyter client's cell, which has no timeout)
/// is not idle, but the maximum lifetime still ends it.
pub fn reap_reason(now: DateTime<Utc>, v: &ReapView, rules: ReapRules) -> Option<&'static str> {
    let delta = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
    if matches!(v.status, SessionStatus::Starting | SessionStatus::Restarting) {
        return (now - v.status_since >= delta(rules.stuck_after)).then_some("stuck");
    }
    if v.in_use {
        return None;
    }
    if v.status != SessionStatus::Busy && now - v.last_used >= delta(v.idle_timeout) {
        Some("idle")
    } else if now - v.created_at >= delta(rules.max_lifetime) {
        Some("lifetime")
    } else {
        None
    }
}

/// The operator's bound on automatic restarts: at most `max` within any `window` (`max` 0: none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RestartBound {
    pub max: usize,
    pub window: Duration,
}

/// What becomes of a kernel that died on its own (it exited, crashed or was killed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AfterDeath {
    /// Restart it now, in a new container (the container died with it).
    Restart,
    /// The session asked for no automatic restarts (or the operator allows none): it stays dead.
    Off,
    /// It was restarted `max` times within the window already: it stays dead until a client restarts it.
    BoundReached,
}

/// When a session's recent automatic restarts happened: at most the bound's `max` are remembered, so a
/// kernel that dies in a loop costs no memory.
#[derive(Debug, Default)]
pub struct RestartHistory {
    recent: VecDeque<DateTime<Utc>>,
}

impl RestartHistory {
    /// Decides for a kernel that died at `now`, in a session whose setting is `enabled`; a restart it
    /// allows is remembered.
    pub fn after_death(&mut self, now: DateTime<Utc>, enabled: bool, bound: RestartBound) -> AfterDeath {
        if !enabled || bound.max == 0 {
            return AfterDeath::Off;
        }
        let window = chrono::Duration::from_std(bound.window).unwrap_or(chrono::TimeDelta::MAX);
        while self.recent.front().is_some_and(|&t| now - t >= window) {
            self.recent.pop_front();
        }
        if self.recent.len() >= bound.max {
            return AfterDeath::BoundReached;
        }
        self.recent.push_back(now);
        AfterDeath::Restart
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn automatic_restarts_are_bounded_within_a_sliding_window() {
        use AfterDeath::*;
        let bound = RestartBound { max: 3, window: Duration::from_secs(600) };
        let t0 = Utc::now();
        let at = |minutes: i64| t0 + chrono::Duration::minutes(minutes);
        let mut h = RestartHistory::default();
        // (minutes after the first death) → decision: three within ten minutes, then dead until the
        // oldest leaves the window.
        let table: &[(i64, AfterDeath)] = &[
            (0, Restart),
            (1, Restart),
            (2, Restart),
            (3, BoundReached),
            (9, BoundReached),
            (10, Restart),
            (11, Restart),
            (11, BoundReached),
            (30, Restart),
        ];
        for &(minutes, want) in table {
            assert_eq!(h.after_death(at(minutes), true, bound), want, "a death at minute {minutes}");
        }
        assert!(h.recent.len() <= bound.max, "the history stays within the bound");
    }

    #[test]
    fn no_automatic_restart_when_the_session_or_the_operator_says_none() {
        let bound = RestartBound { max: 3, window: Duration::from_secs(600) };
        let mut h = RestartHistory::default();
        assert_eq!(h.after_death(Utc::now(), false, bound), AfterDeath::Off);
        let none = RestartBound { max: 0, ..bound };
        assert_eq!(h.after_death(Utc::now(), true, none), AfterDeath::Off);
        assert!(h.recent.is_empty(), "a death that is not restarted is not counted");
        assert_eq!(h.after_death(Utc::now(), true, bound), AfterDeath::Restart);
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const RULES: ReapRules =
        ReapRules { max_lifetime: Duration::from_secs(86400), stuck_after: Duration::from_secs(120) };

    fn view(status: SessionStatus, minutes_since_use: i64, hours_old: i64, in_use: bool) -> (DateTime<Utc>, ReapView) {
        let now = Utc::now();
        let v = ReapView {
            status,
            status_since: now - chrono::Duration::minutes(minutes_since_use),
            last_used: now - chrono::Duration::minutes(minutes_since_use),
            created_at: now - chrono::Duration::hours(hours_old),
            idle_timeout: HOUR,
            in_use,
        };
        (now, v)
    }

    #[test]
    fn reap_reasons_by_state_age_and_use() {
        use SessionStatus::*;
        // (status, minutes since last use / status change, hours since creation, in use) → reason
        let table: &[(SessionStatus, i64, i64, bool, Option<&str>)] = &[
            (Idle, 61, 2, false, Some("idle")),
            (Idle, 59, 2, false, None),
            (Dead, 120, 2, false, Some("idle")),
            (Idle, 0, 25, false, Some("lifetime")),
            (Idle, 600, 25, true, None),
            (Busy, 600, 2, false, None),
            (Busy, 600, 25, false, Some("lifetime")),
            (Starting, 1, 0, false, None),
            (Starting, 3, 0, false, Some("stuck")),
            (Restarting, 3, 5, true, Some("stuck")),
            (Restarting, 1, 5, true, None),
        ];
        for &(status, minutes, hours, in_use, want) in table {
            let (now, v) = view(status, minutes, hours, in_use);
            assert_eq!(reap_reason(now, &v, RULES), want, "{status:?} {minutes} min, {hours} h, in use {in_use}");
        }
    }

    fn limits() -> Limits {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from([
            "kernelbox",
            "serve",
            "--max-sessions",
            "3",
            "--max-sessions-per-owner",
            "2",
        ]);
        let crate::config::Command::Serve(args) = cli.unwrap().command else { unreachable!() };
        args.limits.validate().unwrap()
    }

    #[test]
    fn admission_counts_the_server_and_the_key() {
        let l = limits();
        let held = |sessions, owned| Held { sessions, owned, memory_mb: 0, cpus: 0.0 };
        assert!(admit(held(0, 0), 512, 1.0, &l).is_ok());
        assert!(admit(held(2, 1), 512, 1.0, &l).is_ok());
        assert!(matches!(admit(held(3, 0), 512, 1.0, &l), Err(SessionError::TooMany(m)) if m.contains("server")));
        assert!(matches!(admit(held(2, 2), 512, 1.0, &l), Err(SessionError::TooMany(m)) if m.contains("API key")));
    }

    #[test]
    fn admission_weighs_the_memory_and_cpus_all_sessions_hold() {
        use clap::Parser;
        let cli = crate::config::Cli::try_parse_from([
            "kernelbox",
            "serve",
            "--max-total-memory-mb",
            "4096",
            "--max-total-cpus",
            "3",
        ]);
        let crate::config::Command::Serve(args) = cli.unwrap().command else { unreachable!() };
        let l = args.limits.validate().unwrap();
        let held = Held { sessions: 3, owned: 0, memory_mb: 3072, cpus: 2.0 };
        assert!(admit(held, 1024, 1.0, &l).is_ok(), "exactly full fits");
        assert!(matches!(admit(held, 1025, 0.5, &l), Err(SessionError::TooMany(m)) if m.contains("MiB")));
        assert!(matches!(admit(held, 512, 1.5, &l), Err(SessionError::TooMany(m)) if m.contains("CPUs")));
        // Unset, the totals are what --max-sessions sessions of the largest size would hold.
        let l = limits();
        assert_eq!((l.max_total_memory_mb, l.max_total_cpus), (3 * l.max_memory_mb, 3.0 * l.max_cpus));
    }

    #[test]
    fn requests_beyond_the_limits_are_refused_not_lowered() {
        let l = limits();
        let catalog = Catalog::new("x/");
        let req = |f: fn(&mut SessionRequest)| {
            let mut r = SessionRequest { language: "python".into(), ..Default::default() };
            f(&mut r);
            settle(&catalog, &l, r)
        };
        assert!(req(|_| {}).is_ok());
        assert!(matches!(req(|r| r.language = "cobol".into()), Err(SessionError::UnknownLanguage(_))));
        assert!(req(|r| r.memory_mb = Some(1 << 40)).is_err());
        assert!(req(|r| r.memory_mb = Some(10)).is_err());
        assert!(req(|r| r.cpus = Some(f64::NAN)).is_err());
        assert!(req(|r| r.timeout_s = Some(0)).is_err());
        assert!(req(|r| r.idle_timeout_s = Some(u64::MAX)).is_err());
        assert!(req(|r| r.env = Some(BTreeMap::from([("1X".into(), "v".into())]))).is_err());
        assert!(req(|r| r.env = Some(BTreeMap::from([("A=B".into(), "v".into())]))).is_err());
        assert!(req(|r| r.env = Some(BTreeMap::from([("X".into(), "a\0b".into())]))).is_err());
        assert!(req(|r| r.env = Some(BTreeMap::from([("KERNELBOX_OUTPUT_LIMIT_BYTES".into(), "9".into())]))).is_err());
        for reserved in ["PYTHONHOME", "LD_PRELOAD", "JAVA_TOOL_OPTIONS", "PATH", "DENO_DIR"] {
            let env = Some(BTreeMap::from([(reserved.to_owned(), "/nope".to_owned())]));
            let r = SessionRequest { language: "python".into(), env, ..Default::default() };
            assert!(settle(&catalog, &l, r).is_err(), "{reserved}");
        }
        assert!(req(|r| r.env = Some(BTreeMap::from([("GOOD_NAME".into(), "ok".into())]))).is_ok());
        assert_eq!(req(|_| {}).unwrap().runtime, "runc", "the language's default runtime");
        assert!(matches!(req(|r| r.runtime = Some("runsc".into())), Err(SessionError::RuntimeRefused(_))));
        assert!(req(|r| r.runtime = Some("runc".into())).is_ok(), "naming the default is fine");
    }

    #[test]
    fn extras_shadow_nothing_and_name_one_output_folder() {
        let mount = |container: &str| SessionExtras {
            mounts: vec![super::super::model::Mount { host: "/srv/files/k".into(), container: container.into() }],
            ..Default::default()
        };
        assert!(check_extras(&mount("/mnt/files")).is_ok());
        for shadowing in
            ["/mnt/data", "/mnt/data/output", "/mnt/data/x", "/mnt/wheels", "/mnt/wheels/x", "/kernel", "/mnt/"]
        {
            assert!(check_extras(&mount(shadowing)).is_err(), "{shadowing}");
        }
        let output = |user: &str| SessionExtras { output: Some(user.into()), ..Default::default() };
        assert!(check_extras(&output("user_test")).is_ok());
        for bad in ["", "..", ".x", "a/b", "../x", "a\nb"] {
            assert!(check_extras(&output(bad)).is_err(), "{bad:?}");
        }
    }
}
