//! The session state machine against the in-memory runtime and a fake kernel peer: no Docker, real
//! ZeroMQ over unix sockets, the real actor and manager.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::config::{Cli, Command};
use crate::images::Catalog;
use crate::kernel::{Event, InputRequest};
use crate::runtime::fake::FakeRuntime;

struct Harness {
    runtime: Arc<FakeRuntime>,
    manager: Arc<SessionManager>,
    _dir: tempfile::TempDir,
}

/// A manager's configuration as `kernelbox serve <flags>` makes it, on the fake image prefix (also the
/// agent's tests' base).
pub(crate) fn config(flags: &[&str], dir: &std::path::Path) -> ManagerConfig {
    let mut argv = vec!["kernelbox", "serve"];
    argv.extend_from_slice(flags);
    let Command::Serve(args) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
    ManagerConfig {
        limits: args.limits.validate().unwrap(),
        state_dir: dir.to_path_buf(),
        instance: "unit".into(),
        catalog: Catalog::new("fake/"),
        keep_sessions: false,
        packages: args.packages.validate(None).unwrap(),
        storage: Default::default(),
        pool: args.pool_config().unwrap(),
        node: None,
        fencing: None,
        egress: args.egress.validate().unwrap(),
    }
}

fn harness(flags: &[&str]) -> Harness {
    harness_keeping(flags, false)
}

fn harness_keeping(flags: &[&str], keep_sessions: bool) -> Harness {
    let dir = tempfile::Builder::new().prefix("kbu").tempdir_in("/tmp").unwrap();
    let runtime = Arc::new(FakeRuntime::new());
    for image in Catalog::new("fake/").language_images() {
        runtime.add_image(&format!("fake/{image}:latest"), HashMap::new());
    }
    let manager = SessionManager::new(runtime.clone(), ManagerConfig { keep_sessions, ..config(flags, dir.path()) });
    Harness { runtime, manager, _dir: dir }
}

fn owner() -> Owner {
    Owner("me".into())
}

fn python() -> SessionRequest {
    SessionRequest { language: "python".into(), ..Default::default() }
}

impl Harness {
    async fn start(&self) -> String {
        self.manager.create(owner(), python()).await.expect("session starts").id.to_string()
    }
    async fn run(&self, id: &str, code: &str) -> ExecuteResult {
        self.manager.execute(&owner(), id, code.into(), None).await.expect("execute")
    }
    fn container(&self, id: &str) -> String {
        self.manager.get(&owner(), id).unwrap().snapshot().container_id
    }
    fn run_dirs(&self) -> usize {
        std::fs::read_dir(self._dir.path().join("sessions")).map(|d| d.count()).unwrap_or(0)
    }
    /// Starts a create whose kernel takes `boot` to come up, without waiting for it.
    fn create_in_background(&self, boot: Duration) -> tokio::task::JoinHandle<Result<SessionInfo, SessionError>> {
        self.runtime.set_boot_delay(boot);
        let m = self.manager.clone();
        tokio::spawn(async move { m.create(owner(), python()).await })
    }
    /// Waits until no container and no session is left (the session tasks clean up after they are told).
    async fn settles_empty(&self) {
        for _ in 0..100 {
            if self.runtime.container_ids().is_empty() && self.manager.census().is_empty() && self.run_dirs() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "left behind: containers {:?}, sessions {:?}, run dirs {}",
            self.runtime.container_ids(),
            self.manager.census(),
            self.run_dirs()
        );
    }
}

#[tokio::test]
async fn a_session_boots_runs_code_and_keeps_counting() {
    let h = harness(&[]);
    let id = h.start().await;
    assert_eq!(h.manager.get(&owner(), &id).unwrap().info().status, SessionStatus::Idle);
    let r = h.run(&id, "print:hello").await;
    assert_eq!(r.status, ExecStatus::Ok);
    assert_eq!(r.stdout, "hello\n");
    let r = h.run(&id, "2").await;
    assert_eq!(r.execution_count, Some(2));
    let r = h.run(&id, "error").await;
    assert_eq!(r.status, ExecStatus::Error);
    assert_eq!(r.error.unwrap().ename, "ValueError");
    assert_eq!(h.manager.get(&owner(), &id).unwrap().info().executions, 3);
}

#[tokio::test]
async fn settings_above_the_maximums_are_refused() {
    let h = harness(&["--max-memory-mb", "1024"]);
    let big = SessionRequest { memory_mb: Some(2048), ..python() };
    assert!(matches!(h.manager.create(owner(), big).await, Err(SessionError::Invalid(_))));
    let unknown = SessionRequest { language: "cobol".into(), ..Default::default() };
    assert!(matches!(h.manager.create(owner(), unknown).await, Err(SessionError::UnknownLanguage(_))));
    assert!(h.runtime.container_ids().is_empty(), "nothing was started");
}

#[tokio::test]
async fn another_owner_cannot_see_a_session() {
    let h = harness(&[]);
    let id = h.start().await;
    let stranger = Owner("them".into());
    assert!(matches!(h.manager.get(&stranger, &id), Err(SessionError::NotFound(_))));
    assert!(h.manager.list(&stranger).is_empty());
    assert!(matches!(h.manager.delete(&stranger, &id).await, Err(SessionError::NotFound(_))));
}

#[tokio::test]
async fn a_timeout_interrupts_and_the_session_goes_on() {
    let h = harness(&[]);
    let id = h.start().await;
    let r = h.manager.execute(&owner(), &id, "sleep:30".into(), Some(1)).await.unwrap();
    assert_eq!(r.status, ExecStatus::Timeout);
    assert!(!r.kernel_restarted);
    assert_eq!(h.run(&id, "print:after").await.stdout, "after\n");
}

#[tokio::test]
async fn a_kernel_that_ignores_the_interrupt_is_restarted() {
    let h = harness(&["--interrupt-grace-s", "1"]);
    let id = h.start().await;
    let container = h.container(&id);
    let r = h.manager.execute(&owner(), &id, "hang".into(), Some(1)).await.unwrap();
    assert_eq!(r.status, ExecStatus::Timeout);
    assert!(r.kernel_restarted);
    assert_eq!(h.runtime.signals(&container), vec!["SIGHUP"], "restarted in place");
    assert_eq!(h.run(&id, "1").await.execution_count, Some(1), "a fresh kernel counts from one");
}

#[tokio::test]
async fn executions_queue_in_order_and_a_full_queue_is_refused() {
    let h = harness(&["--queue-depth", "1"]);
    let id = h.start().await;
    let m = h.manager.clone();
    let first = m.submit(&owner(), &id, "sleep:0.5".into(), None, false).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await; // the actor has taken the first
    let second = m.submit(&owner(), &id, "second".into(), None, false).unwrap();
    assert!(matches!(m.submit(&owner(), &id, "third".into(), None, false), Err(SessionError::QueueFull(1))));
    assert_eq!(first.wait().await.unwrap().execution_count, Some(1));
    assert_eq!(second.wait().await.unwrap().execution_count, Some(2));
}

#[tokio::test]
async fn a_dead_container_is_noticed_and_restart_replaces_it() {
    let h = harness(&[]);
    let no_auto_restart = SessionRequest { auto_restart: Some(false), ..python() };
    let id = h.manager.create(owner(), no_auto_restart).await.unwrap().id.to_string();
    let container = h.container(&id);
    let running = {
        let m = h.manager.clone();
        let id = id.clone();
        tokio::spawn(async move { m.execute(&owner(), &id, "sleep:30".into(), None).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.runtime.kill(&container, true);
    let r = tokio::time::timeout(Duration::from_secs(5), running).await.expect("noticed at once").unwrap().unwrap();
    assert_eq!(r.status, ExecStatus::Killed);
    assert_eq!(r.killed_reason.as_deref(), Some("out_of_memory"));
    let info = h.manager.get(&owner(), &id).unwrap().info();
    assert_eq!(info.status, SessionStatus::Dead);
    assert_eq!(h.run(&id, "1").await.status, ExecStatus::Killed, "a dead kernel answers at once");

    let info = h.manager.restart(&owner(), &id).await.unwrap();
    assert_eq!(info.status, SessionStatus::Idle);
    assert_ne!(h.container(&id), container, "a new container");
    assert_eq!(h.run(&id, "1").await.status, ExecStatus::Ok);
}

/// Waits (bounded) until the session's view satisfies `what`.
async fn until(h: &Harness, id: &str, what: impl Fn(&SessionInfo) -> bool) -> SessionInfo {
    for _ in 0..200 {
        let info = h.manager.get(&owner(), id).unwrap().info();
        if what(&info) {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("never so: {:?}", h.manager.get(&owner(), id).unwrap().info());
}

#[tokio::test]
async fn a_kernel_that_answers_shutdown_but_does_not_exit_is_killed_and_restarted_and_clients_hear_of_it() {
    // The fake kernel answers `shutdown_request` and goes on running, as ipykernel 7 sometimes does.
    let h = harness(&[]);
    let id = h.start().await;
    let container = h.container(&id);
    let mut client = h.manager.attach(&owner(), &id, Some("c".into())).await.unwrap();
    let shutdown = crate::kernel::Message::request("shutdown_request", "c", serde_json::json!({"restart": false}));
    client.send(crate::kernel::Channel::Control, shutdown).await.unwrap();

    let mut seen = Vec::new();
    let back = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(msg) = client.outbox.recv().await {
            let state = serde_json::from_slice::<serde_json::Value>(&msg.content).unwrap_or_default();
            seen.push(format!("{}:{}", msg.msg_type, state["execution_state"].as_str().unwrap_or("")));
            if seen.iter().any(|s| s == "status:restarting") && seen.last().unwrap() == "status:idle" {
                return;
            }
        }
    })
    .await;
    assert!(back.is_ok(), "restarting, then idle again: {seen:?}");
    assert!(seen.contains(&"shutdown_reply:".to_owned()), "{seen:?}");
    let info = until(&h, &id, |i| i.status == SessionStatus::Idle).await;
    assert_eq!(info.auto_restarts, 1);
    assert!(info.last_auto_restart.unwrap().reason.contains("did not exit within 5 s"));
    assert_ne!(h.container(&id), container, "a new container");
    assert_eq!(h.run(&id, "print:back").await.stdout, "back\n");
}

#[tokio::test]
async fn a_kernel_that_dies_is_restarted_automatically_and_streams_hear_of_it() {
    let h = harness(&[]);
    let id = h.start().await;
    let container = h.container(&id);
    let m = h.manager.clone();
    let running = m.submit(&owner(), &id, "sleep:30".into(), None, true).unwrap();
    let mut queued = m.submit(&owner(), &id, "print:after".into(), None, true).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.runtime.kill(&container, false);

    let r = tokio::time::timeout(Duration::from_secs(5), running.finish()).await.expect("answered at once");
    assert_eq!((r.status, r.killed_reason.as_deref()), (ExecStatus::Killed, Some("exited with code 137")));
    assert!(r.kernel_restarted, "the result says the state is gone");
    // The queued execution's stream hears of the restart, then runs in the new kernel.
    let mut heard = Vec::new();
    while let Some(item) = queued.next_streamed().await {
        match item {
            Streamed::AutoRestart(notice) => heard.push((notice.phase, notice.reason, notice.auto_restarts)),
            Streamed::Event(_) => break,
            Streamed::NetworkBlocked(b) => panic!("no network here: {b:?}"),
        }
    }
    let died = "exited with code 137".to_owned();
    let expected = [(AutoRestartPhase::Restarting, died.clone(), 1), (AutoRestartPhase::Restarted, died.clone(), 1)];
    assert_eq!(heard, expected);
    let r = queued.finish().await;
    assert_eq!((r.status, r.stdout.as_str(), r.execution_count), (ExecStatus::Ok, "after\n", Some(1)));

    let info = h.manager.get(&owner(), &id).unwrap().info();
    assert_eq!((info.status, info.auto_restarts), (SessionStatus::Idle, 1));
    assert_eq!(info.last_auto_restart.map(|r| r.reason), Some(died));
    assert_ne!(h.container(&id), container, "a new container");
    assert_eq!(h.runtime.container_ids().len(), 1, "the dead one is gone");
}

#[tokio::test]
async fn past_the_bound_a_dying_kernel_stays_dead_until_a_client_restarts_it() {
    let h = harness(&["--auto-restart-limit", "2", "--auto-restart-window-s", "600"]);
    let id = h.start().await;
    for restarts in 1..=2 {
        h.runtime.kill(&h.container(&id), true);
        until(&h, &id, |i| i.auto_restarts == restarts && i.status == SessionStatus::Idle).await;
    }
    h.runtime.kill(&h.container(&id), true);
    let info = until(&h, &id, |i| i.status == SessionStatus::Dead).await;
    assert_eq!(info.auto_restarts, 2);
    let why = info.dead_reason.unwrap();
    assert!(why.starts_with("out_of_memory; not restarted automatically"), "{why}");
    assert_eq!(h.run(&id, "1").await.status, ExecStatus::Killed, "a dead kernel answers at once");
    assert!(h.runtime.container_ids().is_empty(), "nothing runs for a dead session");
    assert_eq!(h.manager.restart(&owner(), &id).await.unwrap().status, SessionStatus::Idle);
}

#[tokio::test]
async fn an_adopted_kernel_busy_with_a_cell_is_busy_until_it_ends_and_executions_wait() {
    let h = harness_keeping(&[], true);
    let id = h.start().await;
    let m = h.manager.clone();
    let cut_off = m.submit(&owner(), &id, "sleep:2".into(), None, false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.manager.shutdown().await;
    assert_eq!(cut_off.wait().await.unwrap().killed_reason.as_deref(), Some("service_shutdown"));

    let again = SessionManager::new(h.runtime.clone(), config(&[], h._dir.path()));
    assert_eq!(again.recover().await.unwrap(), (1, 0), "adopted, busy or not");
    assert_eq!(again.get(&owner(), &id).unwrap().info().status, SessionStatus::Busy);
    let r = again.execute(&owner(), &id, "print:next".into(), None).await.unwrap();
    assert_eq!((r.status, r.stdout.as_str()), (ExecStatus::Ok, "next\n"));
    assert_eq!(r.execution_count, Some(2), "it ran after the cell from before the adoption, in the same kernel");
    assert_eq!(again.get(&owner(), &id).unwrap().info().status, SessionStatus::Idle);
}

#[tokio::test]
async fn a_cell_from_before_the_adoption_is_interrupted_past_the_longest_execution_allowed() {
    let h = harness_keeping(&[], true);
    let id = h.start().await;
    let cut_off = h.manager.submit(&owner(), &id, "sleep:600".into(), None, false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.manager.shutdown().await;
    drop(cut_off);

    let flags = ["--max-timeout-s", "1", "--default-timeout-s", "1"];
    let again = SessionManager::new(h.runtime.clone(), config(&flags, h._dir.path()));
    again.recover().await.unwrap();
    assert_eq!(again.get(&owner(), &id).unwrap().info().status, SessionStatus::Busy);
    let started = std::time::Instant::now();
    let r = again.execute(&owner(), &id, "print:next".into(), None).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
    assert_eq!((r.stdout.as_str(), r.execution_count), ("next\n", Some(2)), "interrupted, not restarted");
}

#[tokio::test]
async fn delete_removes_the_container_and_the_directory() {
    let h = harness(&[]);
    let id = h.start().await;
    h.manager.delete(&owner(), &id).await.unwrap();
    assert!(h.runtime.container_ids().is_empty());
    assert_eq!(h.run_dirs(), 0, "the run directory is gone");
    assert!(matches!(h.manager.get(&owner(), &id), Err(SessionError::NotFound(_))));
}

#[tokio::test]
async fn reap_once_removes_idle_sessions_and_spares_busy_ones() {
    let h = harness(&[]);
    let idle = h.start().await;
    let busy = h.start().await;
    let pending = h.manager.submit(&owner(), &busy, "sleep:1".into(), None, false).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = h.manager.reap_once(chrono::Utc::now() + chrono::Duration::hours(2)).await;
    assert_eq!(report.removed, vec![(SessionId::parse(&idle).unwrap(), "idle")]);
    assert_eq!(pending.wait().await.unwrap().status, ExecStatus::Ok);
    assert_eq!(h.runtime.container_ids().len(), 1);
}

#[tokio::test]
async fn the_engine_being_down_is_an_unavailable_runtime() {
    let h = harness(&[]);
    h.runtime.set_down(true);
    let err = h.manager.create(owner(), python()).await.unwrap_err();
    assert!(matches!(err, SessionError::Runtime(crate::runtime::RuntimeError::Unavailable(_))), "{err:?}");
}

#[tokio::test]
async fn per_owner_and_total_maximums_hold() {
    let h = harness(&["--max-sessions-per-owner", "1", "--max-sessions", "2"]);
    h.start().await;
    assert!(matches!(h.manager.create(owner(), python()).await, Err(SessionError::TooMany(_))));
    h.manager.create(Owner("b".into()), python()).await.unwrap();
    assert!(matches!(h.manager.create(Owner("c".into()), python()).await, Err(SessionError::TooMany(_))));
}

#[tokio::test]
async fn a_new_manager_adopts_running_containers_and_removes_dead_ones() {
    let h = harness_keeping(&[], true);
    let live = h.start().await;
    let dead = h.start().await;
    let dead_container = h.container(&dead);
    // Stopped with --keep-sessions: the containers stay.
    h.manager.shutdown().await;
    assert_eq!(h.runtime.container_ids().len(), 2);
    h.runtime.kill(&dead_container, false);

    let again = SessionManager::new(h.runtime.clone(), config(&[], h._dir.path()));
    let (adopted, removed) = again.recover().await.unwrap();
    assert_eq!((adopted, removed), (1, 1));
    let r = again.execute(&owner(), &live, "print:back".into(), None).await.unwrap();
    assert_eq!(r.stdout, "back\n");
    assert!(matches!(again.get(&owner(), &dead), Err(SessionError::NotFound(_))));
    assert_eq!(h.runtime.container_ids().len(), 1);
}

#[tokio::test]
async fn a_create_whose_caller_leaves_mid_boot_leaves_nothing() {
    let h = harness(&[]);
    h.runtime.set_boot_delay(Duration::from_millis(500));
    for cut_after_ms in [0, 20, 200] {
        let m = h.manager.clone();
        let create = m.create(owner(), python());
        assert!(tokio::time::timeout(Duration::from_millis(cut_after_ms), create).await.is_err(), "still booting");
        h.settles_empty().await;
    }
    h.runtime.set_boot_delay(Duration::ZERO);
    h.start().await; // the quota slots came back
}

#[tokio::test]
async fn delete_during_boot_removes_the_container_promptly() {
    let h = harness(&[]);
    let create = h.create_in_background(Duration::from_secs(30));
    let id = loop {
        if let Some(info) = h.manager.list(&owner()).first() {
            break info.id.to_string();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let started = std::time::Instant::now();
    h.manager.delete(&owner(), &id).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(matches!(create.await.unwrap(), Err(SessionError::Closing)));
    h.settles_empty().await;
}

#[tokio::test]
async fn shutdown_during_boot_removes_the_container_and_refuses_new_sessions() {
    let h = harness(&[]);
    let create = h.create_in_background(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.manager.shutdown().await;
    assert!(create.await.unwrap().is_err());
    assert!(matches!(h.manager.create(owner(), python()).await, Err(SessionError::Closing)));
    h.settles_empty().await;
}

#[tokio::test]
async fn a_queued_execution_of_a_deleted_session_gets_a_result_that_says_why() {
    let h = harness(&[]);
    let id = h.start().await;
    let m = h.manager.clone();
    let running = m.submit(&owner(), &id, "sleep:30".into(), None, true).unwrap();
    let mut queued = m.submit(&owner(), &id, "print:never".into(), None, true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.manager.delete(&owner(), &id).await.unwrap();
    assert!(queued.next_event().await.is_none(), "no output: it never ran");
    let r = queued.finish().await;
    assert_eq!((r.status, r.killed_reason.as_deref()), (ExecStatus::Killed, Some("session_deleted")));
    let r = running.wait().await.unwrap();
    assert_eq!((r.status, r.killed_reason.as_deref()), (ExecStatus::Killed, Some("session_deleted")));
    h.settles_empty().await;
}

#[tokio::test]
async fn a_queued_execution_whose_caller_left_never_runs() {
    let h = harness(&[]);
    let id = h.start().await;
    let m = h.manager.clone();
    let first = m.submit(&owner(), &id, "sleep:0.3".into(), None, false).unwrap();
    drop(m.submit(&owner(), &id, "print:abandoned".into(), None, false).unwrap());
    let third = m.submit(&owner(), &id, "3".into(), None, false).unwrap();
    assert_eq!(first.wait().await.unwrap().execution_count, Some(1));
    assert_eq!(third.wait().await.unwrap().execution_count, Some(2), "the abandoned one did not run");
}

#[tokio::test]
async fn a_running_execution_whose_caller_left_is_interrupted_and_state_kept() {
    let h = harness(&[]);
    let id = h.start().await;
    let container = h.container(&id);
    let m = h.manager.clone();
    let abandoned = m.submit(&owner(), &id, "sleep:30".into(), None, false).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(abandoned);
    let started = std::time::Instant::now();
    let r = h.run(&id, "next").await;
    assert!(started.elapsed() < Duration::from_secs(5), "the next execution waited {:?}", started.elapsed());
    assert_eq!(r.execution_count, Some(2), "same kernel, state kept");
    assert!(h.runtime.signals(&container).is_empty(), "interrupted by message, not restarted");
}

#[tokio::test]
async fn restarts_whose_callers_left_never_run() {
    let h = harness(&[]);
    let id = h.start().await;
    let container = h.container(&id);
    h.runtime.set_boot_delay(Duration::from_millis(500));
    let m = h.manager.clone();
    let first = {
        let (m, id) = (m.clone(), id.clone());
        tokio::spawn(async move { m.restart(&owner(), &id).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Queued behind the slow first restart, then abandoned by their callers.
    for _ in 0..3 {
        let (m, id) = (m.clone(), id.clone());
        let restart = tokio::spawn(async move { m.restart(&owner(), &id).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        restart.abort();
    }
    first.await.unwrap().unwrap();
    h.runtime.set_boot_delay(Duration::ZERO);
    assert_eq!(h.run(&id, "x").await.execution_count, Some(1));
    assert_eq!(h.runtime.signals(&container), vec!["SIGHUP"], "only the restart whose caller waited ran");
}

#[tokio::test]
async fn the_reaper_never_takes_a_session_marked_in_use_and_a_reaped_one_cannot_be_used() {
    let h = harness(&[]);
    let a = h.start().await;
    let b = h.start().await;
    let later = chrono::Utc::now() + chrono::Duration::hours(2);
    // Marked first: the reaper passes it by.
    let pending = h.manager.submit(&owner(), &a, "sleep:0.2".into(), None, false).unwrap();
    let report = h.manager.reap_once(later).await;
    assert_eq!(report.removed, vec![(SessionId::parse(&b).unwrap(), "idle")]);
    assert_eq!(pending.wait().await.unwrap().status, ExecStatus::Ok);
    // Reaped first: the request finds nothing.
    let report = h.manager.reap_once(later).await;
    assert_eq!(report.removed.len(), 1);
    assert!(matches!(h.manager.submit(&owner(), &a, "1".into(), None, false), Err(SessionError::NotFound(_))));
    h.settles_empty().await;
}

#[tokio::test]
async fn a_session_stuck_starting_is_reaped() {
    let h = harness(&[]);
    let create = h.create_in_background(Duration::from_secs(600));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let report = h.manager.reap_once(chrono::Utc::now() + chrono::Duration::hours(1)).await;
    assert_eq!(report.removed.len(), 1);
    assert_eq!(report.removed[0].1, "stuck");
    assert!(create.await.unwrap().is_err());
    h.settles_empty().await;
}

#[tokio::test]
async fn the_reaper_removes_containers_no_session_owns() {
    let h = harness(&[]);
    let id = h.start().await;
    let spec = crate::runtime::ContainerSpec {
        labels: HashMap::from([
            (crate::runtime::labels::INSTANCE.to_owned(), "unit".to_owned()),
            (crate::runtime::labels::SESSION.to_owned(), SessionId::new().to_string()),
        ]),
        ..Default::default()
    };
    let orphan = crate::runtime::ContainerRuntime::create_and_start(&*h.runtime, &spec).await.unwrap();
    let report = h.manager.reap_once(chrono::Utc::now()).await;
    assert_eq!(report.orphans, 1);
    assert!(!h.runtime.container_ids().contains(&orphan));
    assert_eq!(h.run(&id, "print:alive").await.stdout, "alive\n", "the owned one is untouched");
}

fn with_stdin(code: &str, stream: bool, stdin: &[&str]) -> Submission {
    let stdin = stdin.iter().map(|s| s.to_string()).collect();
    Submission { code: code.into(), stream, ask_for_input: stream, stdin, ..Default::default() }
}

#[tokio::test]
async fn the_requests_stdin_answers_prompts_in_order() {
    let h = harness(&[]);
    let id = h.start().await;
    let r = h.manager.submit_with(&owner(), &id, with_stdin("input:name? ", false, &["Ada", "unused"])).unwrap();
    let r = r.wait().await.unwrap();
    assert_eq!((r.status, r.stdout.as_str()), (ExecStatus::Ok, "Ada\n"));
}

#[tokio::test]
async fn a_prompt_nobody_can_answer_is_refused_at_once_and_the_session_goes_on() {
    let h = harness(&[]);
    let id = h.start().await;
    let started = std::time::Instant::now();
    let r = h.run(&id, "input:name? ").await;
    assert!(started.elapsed() < Duration::from_secs(5), "refused in {:?}", started.elapsed());
    assert_eq!(r.status, ExecStatus::Error);
    let error = r.error.unwrap();
    assert_eq!(error.ename, "InputRequired");
    assert!(error.evalue.contains("name? ") && error.evalue.contains("stdin"), "{}", error.evalue);
    assert_eq!(h.run(&id, "print:after").await.stdout, "after\n");
}

#[tokio::test]
async fn a_streaming_caller_is_asked_and_its_answer_reaches_the_kernel() {
    let h = harness(&[]);
    let id = h.start().await;
    assert!(matches!(h.manager.answer_input(&owner(), &id, "early".into()), Err(SessionError::NoInputWaiting)));
    let mut pending = h.manager.submit_with(&owner(), &id, with_stdin("input:pw: ", true, &[])).unwrap();
    let asked = pending.next_event().await;
    assert_eq!(asked, Some(Event::InputRequested(InputRequest { prompt: "pw: ".into(), password: false })));
    let other = Owner("someone else".into());
    assert!(matches!(h.manager.answer_input(&other, &id, "x".into()), Err(SessionError::NotFound(_))));
    h.manager.answer_input(&owner(), &id, "secret".into()).unwrap();
    assert!(matches!(h.manager.answer_input(&owner(), &id, "twice".into()), Err(SessionError::NoInputWaiting)));
    let r = pending.finish().await;
    assert_eq!((r.status, r.stdout.as_str()), (ExecStatus::Ok, "secret\n"));
}

#[tokio::test]
async fn an_unanswered_prompt_ends_with_the_executions_timeout() {
    let h = harness(&[]);
    let id = h.start().await;
    let mut pending = h
        .manager
        .submit_with(&owner(), &id, Submission { timeout_s: Some(1), ..with_stdin("input:? ", true, &[]) })
        .unwrap();
    assert!(matches!(pending.next_event().await, Some(Event::InputRequested(_))));
    let r = pending.finish().await;
    assert_eq!(r.status, ExecStatus::Timeout);
    assert!(matches!(h.manager.answer_input(&owner(), &id, "late".into()), Err(SessionError::NoInputWaiting)));
    assert_eq!(h.run(&id, "print:after").await.stdout, "after\n");
}

#[tokio::test]
async fn answers_beyond_the_bounds_are_refused_before_anything_runs() {
    let h = harness(&[]);
    let id = h.start().await;
    let many = vec![String::new(); crate::kernel::stdin::MAX_STDIN_ANSWERS + 1];
    let too_many = Submission { code: "1".into(), stdin: many, ..Default::default() };
    assert!(matches!(h.manager.submit_with(&owner(), &id, too_many), Err(SessionError::Invalid(_))));
    let long = "x".repeat(crate::kernel::stdin::MAX_INPUT_VALUE_BYTES + 1);
    assert!(matches!(h.manager.answer_input(&owner(), &id, long), Err(SessionError::Invalid(_))));
}

impl Harness {
    /// Waits until the pool holds `ready` kernels of `language`.
    async fn pool_fills(&self, language: &str, ready: usize) {
        for _ in 0..200 {
            if self.manager.pool_status(language).ready == ready {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the pool did not fill: {:?}", self.manager.pool_status(language));
    }
}

#[tokio::test]
async fn a_session_starts_from_the_pool_and_the_pool_refills() {
    let h = harness(&["--pool", "python=2"]);
    h.manager.start_pool();
    h.pool_fills("python", 2).await;
    let pooled: Vec<String> = h.runtime.container_ids();
    assert_eq!(pooled.len(), 2);

    let id = h.start().await;
    assert!(pooled.contains(&h.container(&id)), "the session got a pooled container");
    let claim = h._dir.path().join("claims").join(format!("{id}.json"));
    assert!(claim.is_file(), "the claim is written for adoption");
    assert_eq!(h.run(&id, "print:hi").await.stdout, "hi\n");
    h.pool_fills("python", 2).await;
    assert_eq!(h.runtime.container_ids().len(), 3, "one claimed, two ready again");

    // The sweep leaves pooled kernels alone.
    let report = h.manager.reap_once(chrono::Utc::now()).await;
    assert_eq!(report.orphans, 0);
    assert_eq!(h.runtime.container_ids().len(), 3);

    h.manager.delete(&owner(), &id).await.unwrap();
    assert!(!claim.exists(), "the claim goes with the session");
    h.manager.shutdown().await;
    h.settles_empty().await;
}

#[tokio::test]
async fn limits_are_applied_to_a_claimed_kernel_and_what_cannot_be_applied_starts_cold() {
    let h = harness(&["--pool", "python=1"]);
    h.manager.start_pool();
    h.pool_fills("python", 1).await;
    let pooled = h.runtime.container_ids()[0].clone();

    // Other CPUs and memory with the same tmpfs size: claimed, limits updated on the running container.
    let req = SessionRequest { language: "python".into(), cpus: Some(0.5), memory_mb: Some(515), ..Default::default() };
    let id = h.manager.create(owner(), req).await.unwrap().id.to_string();
    assert_eq!(h.container(&id), pooled);
    let spec = h.runtime.spec_of(&pooled).unwrap();
    assert_eq!((spec.nano_cpus, spec.memory_bytes), (500_000_000, 515 << 20));

    // Environment variables, or a memory that changes the tmpfs size: a cold start.
    h.pool_fills("python", 1).await;
    let before = h.runtime.container_ids().len();
    let env = Some(std::collections::BTreeMap::from([("A".to_owned(), "1".to_owned())]));
    let with_env = SessionRequest { language: "python".into(), env, ..Default::default() };
    let cold = h.manager.create(owner(), with_env).await.unwrap().id.to_string();
    assert_eq!(h.runtime.container_ids().len(), before + 1, "a new container, the pool untouched");
    assert_eq!(h.manager.pool_status("python").ready, 1);
    let big = SessionRequest { language: "python".into(), memory_mb: Some(2048), ..Default::default() };
    h.manager.create(owner(), big).await.unwrap();
    assert_eq!(h.manager.pool_status("python").ready, 1);
    assert_ne!(h.container(&cold), pooled);
    h.manager.shutdown().await;
    h.settles_empty().await;
}

#[tokio::test]
async fn a_full_quota_does_not_spend_a_pooled_kernel() {
    let h = harness(&["--pool", "python=1", "--max-sessions-per-owner", "1"]);
    h.manager.start_pool();
    h.pool_fills("python", 1).await;
    h.start().await;
    h.pool_fills("python", 1).await;
    let err = h.manager.create(owner(), python()).await.unwrap_err();
    assert!(matches!(err, SessionError::TooMany(_)), "{err}");
    assert_eq!(h.manager.pool_status("python").ready, 1, "the pooled kernel is still there");
    h.manager.shutdown().await;
    h.settles_empty().await;
}

#[tokio::test]
async fn the_reaper_removes_a_fetcher_whose_fetch_is_over() {
    let h = harness(&[]);
    let id = h.start().await;
    let spec = crate::runtime::ContainerSpec {
        labels: HashMap::from([
            (crate::runtime::labels::INSTANCE.to_owned(), "unit".to_owned()),
            (crate::runtime::labels::FETCHER.to_owned(), "0123456789abcdef".to_owned()),
        ]),
        egress_network: Some("bridge".into()),
        ..Default::default()
    };
    let fetcher = crate::runtime::ContainerRuntime::create_and_start(&*h.runtime, &spec).await.unwrap();
    let report = h.manager.reap_once(chrono::Utc::now()).await;
    assert_eq!(report.orphans, 1);
    assert!(!h.runtime.container_ids().contains(&fetcher));
    assert_eq!(h.run(&id, "print:alive").await.stdout, "alive\n", "the session is untouched");
}

#[tokio::test]
async fn an_execution_whose_idle_status_is_lost_ends_after_a_quiet_spell_marked_truncated() {
    let h = harness(&[]);
    let id = h.start().await;
    let started = std::time::Instant::now();
    let r = h.manager.execute(&owner(), &id, "noidle:flooded".into(), Some(60)).await.unwrap();
    assert_eq!(r.status, ExecStatus::Ok, "{r:?}");
    assert_eq!(r.stdout, "flooded\n");
    assert!(r.truncated, "output may have been lost with the idle status: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "it did not wait for its 60 s timeout");
    let r = h.run(&id, "print:after").await;
    assert_eq!((r.status, r.stdout.as_str(), r.truncated), (ExecStatus::Ok, "after\n", false));
}

/// A cluster agent's manager: node tagged `0123abcd`, fencing after `lost_after`.
fn agent_config(dir: &std::path::Path, lost_after: Duration, keep_sessions: bool) -> ManagerConfig {
    ManagerConfig {
        node: crate::node::NodeTag::parse("0123abcd"),
        fencing: Some(super::FenceConfig { lost_after }),
        keep_sessions,
        ..config(&[], dir)
    }
}

fn agent_harness(lost_after: Duration, keep_sessions: bool) -> Harness {
    let h = harness(&[]);
    let manager = SessionManager::new(h.runtime.clone(), agent_config(h._dir.path(), lost_after, keep_sessions));
    Harness { manager, ..h }
}

/// The agent that starts next on `h`'s engine and state directory (lost_after 60 s), as after a restart.
fn next_agent(h: &Harness, keep_sessions: bool) -> Arc<SessionManager> {
    SessionManager::new(h.runtime.clone(), agent_config(h._dir.path(), Duration::from_secs(60), keep_sessions))
}

/// `h`'s agent stopped with one session kept for adoption, its last contact with the API tier two minutes
/// old (past lost_after). Returns the session's id.
async fn stopped_after_a_long_gap(h: &Harness) -> String {
    let id = h.start().await;
    super::fence::write_last_contact(h._dir.path(), chrono::Utc::now() - chrono::Duration::seconds(120)).unwrap();
    h.manager.shutdown().await;
    id
}

#[tokio::test]
async fn on_an_agent_every_session_id_ends_with_the_node_tag() {
    let h = agent_harness(Duration::from_secs(60), false);
    let id = h.start().await;
    assert!(id.ends_with("0123abcd") && SessionId::parse(&id).is_some(), "{id}");
    assert_ne!(h.start().await, id);
    let single = harness(&[]).start().await;
    assert_eq!(SessionId::parse(&single).map(|s| s.to_string()), Some(single), "single node: 24 hex as ever");
}

#[tokio::test]
async fn contact_after_a_long_gap_fences_every_session_and_its_id_stays_lost() {
    let h = agent_harness(Duration::from_secs(60), false);
    let t0 = chrono::Utc::now();
    h.manager.contact(t0);
    let id = h.start().await;
    h.manager.contact(t0 + chrono::Duration::seconds(30));
    assert!(h.manager.get(&owner(), &id).is_ok(), "a gap within lost_after changes nothing");

    h.manager.contact(t0 + chrono::Duration::seconds(120));
    assert!(matches!(h.manager.get(&owner(), &id), Err(SessionError::Lost(_))));
    assert!(matches!(h.manager.submit(&owner(), &id, "1".into(), None, false), Err(SessionError::Lost(_))));
    assert!(matches!(h.manager.get(&Owner("b".into()), &id), Err(SessionError::NotFound(_))), "not another owner's");
    h.manager.delete(&owner(), &id).await.expect("deleting a lost session succeeds");
    h.settles_empty().await;
    assert!(h.manager.list(&owner()).is_empty());

    // A new session on the same node works; the old id stays lost after a restart too.
    let fresh = h.start().await;
    assert!(h.manager.get(&owner(), &fresh).is_ok());
    let again = next_agent(&h, false);
    assert!(matches!(again.get(&owner(), &id), Err(SessionError::Lost(_))), "tombstones are persisted");
}

#[tokio::test]
async fn an_agent_that_starts_after_a_long_gap_removes_what_it_adopted() {
    let h = agent_harness(Duration::from_secs(60), true);
    let id = stopped_after_a_long_gap(&h).await;
    assert_eq!(h.runtime.container_ids().len(), 1, "kept for adoption");

    let again = next_agent(&h, false);
    assert_eq!(again.recover().await.unwrap(), (1, 0));
    assert_eq!(again.fence_stale().await, 1);
    assert!(matches!(again.get(&owner(), &id), Err(SessionError::Lost(_))));
    assert!(h.runtime.container_ids().is_empty(), "its container is gone");
}

#[tokio::test]
async fn a_session_whose_container_died_with_its_node_through_a_long_gap_stays_lost() {
    let h = agent_harness(Duration::from_secs(60), true);
    let id = stopped_after_a_long_gap(&h).await;
    // The node went down with its containers: at the next start the session's container is not running.
    let container = h.runtime.container_ids().pop().expect("kept for adoption");
    h.runtime.kill(&container, false);

    let again = next_agent(&h, false);
    assert_eq!(again.recover().await.unwrap(), (0, 1), "removed, not adopted");
    again.fence_stale().await;
    assert!(matches!(again.get(&owner(), &id), Err(SessionError::Lost(_))), "lost, not not-found");
    let third = next_agent(&h, false);
    assert!(matches!(third.get(&owner(), &id), Err(SessionError::Lost(_))), "its tombstone is persisted");
}

#[tokio::test]
async fn an_agent_that_starts_within_lost_after_adopts_and_a_fenced_container_is_never_adopted() {
    let h = agent_harness(Duration::from_secs(60), true);
    let kept = h.start().await;
    h.manager.persist_contact();
    h.manager.shutdown().await;
    let again = next_agent(&h, true);
    assert_eq!(again.recover().await.unwrap(), (1, 0));
    assert_eq!(again.fence_stale().await, 0, "a fresh stamp fences nothing");
    assert!(again.get(&owner(), &kept).is_ok());

    // Fenced, but its container could not be removed (still there at the next start): never adopted.
    again.shutdown().await;
    assert_eq!(h.runtime.container_ids().len(), 1);
    let mut tombstones = super::fence::Tombstones::default();
    tombstones.bury(SessionId::parse(&kept).unwrap(), owner(), chrono::Utc::now());
    tombstones.save(h._dir.path()).unwrap();
    let third = next_agent(&h, false);
    assert_eq!(third.recover().await.unwrap(), (0, 1), "removed, not adopted");
    assert!(matches!(third.get(&owner(), &kept), Err(SessionError::Lost(_))));
    assert!(h.runtime.container_ids().is_empty());
}

#[tokio::test]
async fn without_fencing_no_gap_removes_anything() {
    let h = harness(&[]);
    let id = h.start().await;
    h.manager.contact(chrono::Utc::now() + chrono::Duration::days(2));
    assert!(h.manager.get(&owner(), &id).is_ok());
}
