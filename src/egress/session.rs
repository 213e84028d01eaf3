//! One session's network as the service sees it: its allow-list (replaced by `PUT …/network`, and then
//! the connections it no longer allows are closed), its live connections, the bytes it moved, and what
//! its code tried and was refused since the current execution began (`network.blocked` in the result,
//! and an event the moment it happens for a streaming client). Shared by the session's gates (one per
//! boot) and the events the proxy reports; no lock is held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::allow::{AllowList, NetworkPolicy};

/// The most distinct refusals an execution's report keeps (the rest are counted in `blocked_dropped`).
const MAX_REPORTED: usize = 100;
/// Refusals a streaming client may fall behind on before it misses some (it still gets them in the result).
const NOTICE_QUEUE: usize = 64;

/// A refusal as the client reads it: the host and port the code named, why, and how often (in a report).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Blocked {
    /// The host as the code named it (a name, or an address).
    pub host: String,
    pub port: u16,
    /// `not_allowed`, `forbidden`, `ip_literal`, `sni_mismatch`, `sni_missing`, `not_tls`, `host_mismatch`,
    /// `private_address`, `unresolved`, `unreachable`, `bad_request`, `connection_limit`, `byte_limit`,
    /// `proxy_down`.
    pub reason: String,
    pub count: u64,
}

/// What an execution's code did on the network: every refusal, and the bytes moved through the proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NetworkReport {
    pub blocked: Vec<Blocked>,
    /// Bytes moved both ways through allowed connections while it ran.
    pub allowed_bytes: u64,
    /// Distinct refusals beyond the report's 100.
    #[serde(skip_serializing_if = "is_zero")]
    pub blocked_dropped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A live connection: where it goes (once the proxy allowed it), and how to close it.
struct Live {
    target: Option<(String, u16)>,
    close: CancellationToken,
}

#[derive(Default)]
struct Tally {
    blocked: BTreeMap<(String, u16, String), u64>,
    dropped: u64,
}

/// One session's network.
pub struct SessionEgress {
    id: String,
    allow: Mutex<Arc<AllowList>>,
    live: Mutex<HashMap<u64, Live>>,
    /// Bytes moved in the session's life (the per-session cap).
    total_bytes: AtomicU64,
    /// Bytes moved since the report began.
    report_bytes: AtomicU64,
    tally: Mutex<Tally>,
    notices: broadcast::Sender<Blocked>,
}

impl SessionEgress {
    pub fn new(id: &str, allow: AllowList) -> SessionEgress {
        SessionEgress {
            id: id.to_owned(),
            allow: Mutex::new(Arc::new(allow)),
            live: Mutex::default(),
            total_bytes: AtomicU64::new(0),
            report_bytes: AtomicU64::new(0),
            tally: Mutex::default(),
            notices: broadcast::channel(NOTICE_QUEUE).0,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The list the next connection follows.
    pub fn allow_list(&self) -> Arc<AllowList> {
        self.allow.lock().unwrap().clone()
    }

    /// Replaces the list; open connections to a target the new list does not allow are closed, and so,
    /// when the new list drops any entry, are those whose target the proxy has not reported yet (they
    /// carried the old list to it). Returns how many were closed.
    pub fn set_allow_list(&self, allow: AllowList, policy: &NetworkPolicy) -> usize {
        let old = std::mem::replace(&mut *self.allow.lock().unwrap(), Arc::new(allow.clone()));
        let dropped_any = old.entries().iter().any(|e| !allow.entries().contains(e));
        let live = self.live.lock().unwrap();
        let mut closed = 0;
        for conn in live.values() {
            let refused = match &conn.target {
                Some((host, port)) => !allow.allows(host, *port, policy),
                None => dropped_any,
            };
            if refused && !conn.close.is_cancelled() {
                conn.close.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Closes every connection (the session ends, or the proxy went away).
    pub fn close_all(&self) {
        for conn in self.live.lock().unwrap().values() {
            conn.close.cancel();
        }
    }

    /// How many connections are open.
    pub fn open_connections(&self) -> usize {
        self.live.lock().unwrap().len()
    }

    /// Registers a new connection unless `max` are open; its token closes it.
    pub(super) fn open(&self, conn: u64, max: usize) -> Option<CancellationToken> {
        let mut live = self.live.lock().unwrap();
        if live.len() >= max {
            return None;
        }
        let close = CancellationToken::new();
        live.insert(conn, Live { target: None, close: close.clone() });
        Some(close)
    }

    pub(super) fn closed(&self, conn: u64) {
        self.live.lock().unwrap().remove(&conn);
    }

    /// The proxy let `conn` through to `host:port`: a later list that drops it closes it, and so does the
    /// list now, if it changed since the connection carried it to the proxy.
    pub(super) fn allowed(&self, conn: u64, host: &str, port: u16, policy: &NetworkPolicy) {
        let allowed_now = self.allow_list().allows(host, port, policy);
        if let Some(live) = self.live.lock().unwrap().get_mut(&conn) {
            live.target = Some((host.to_owned(), port));
            if !allowed_now {
                live.close.cancel();
            }
        }
    }

    /// Counts bytes moved; false once the session's total passed `max`.
    pub(super) fn moved(&self, bytes: u64, max: u64) -> bool {
        self.report_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.total_bytes.fetch_add(bytes, Ordering::Relaxed).saturating_add(bytes) <= max
    }

    pub(super) fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// A refusal: into the report, and to a streaming client at once.
    pub fn refused(&self, host: &str, port: u16, reason: &str) {
        let host: String = host.chars().take(255).collect();
        {
            let mut tally = self.tally.lock().unwrap();
            let key = (host.clone(), port, reason.to_owned());
            if let Some(count) = tally.blocked.get_mut(&key) {
                *count += 1;
            } else if tally.blocked.len() < MAX_REPORTED {
                tally.blocked.insert(key, 1);
            } else {
                tally.dropped += 1;
            }
        }
        let _ = self.notices.send(Blocked { host, port, reason: reason.to_owned(), count: 1 });
    }

    /// Starts a new report (an execution begins).
    pub fn begin_report(&self) {
        *self.tally.lock().unwrap() = Tally::default();
        self.report_bytes.store(0, Ordering::Relaxed);
    }

    /// What happened since [`SessionEgress::begin_report`].
    pub fn report(&self) -> NetworkReport {
        let tally = self.tally.lock().unwrap();
        NetworkReport {
            blocked: (tally.blocked.iter())
                .map(|((host, port, reason), count)| Blocked {
                    host: host.clone(),
                    port: *port,
                    reason: reason.clone(),
                    count: *count,
                })
                .collect(),
            allowed_bytes: self.report_bytes.load(Ordering::Relaxed),
            blocked_dropped: tally.dropped,
        }
    }

    /// Refusals as they happen.
    pub fn notices(&self) -> broadcast::Receiver<Blocked> {
        self.notices.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> NetworkPolicy {
        NetworkPolicy { enabled: true, max_entries: 10, forbidden: Vec::new() }
    }

    fn list(entries: &[&str]) -> AllowList {
        AllowList::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>(), &policy()).unwrap()
    }

    #[test]
    fn a_new_list_closes_the_connections_it_no_longer_allows() {
        let s = SessionEgress::new("s", list(&["a.example", "b.example"]));
        let a = s.open(1, 10).unwrap();
        let b = s.open(2, 10).unwrap();
        let pending = s.open(3, 10).unwrap();
        s.allowed(1, "a.example", 443, &policy());
        s.allowed(2, "b.example", 443, &policy());
        assert_eq!(s.set_allow_list(list(&["b.example"]), &policy()), 2);
        assert!(a.is_cancelled() && !b.is_cancelled(), "the dropped host's connection closes");
        assert!(pending.is_cancelled(), "a connection that carried the old list to the proxy closes too");
        assert_eq!(s.allow_list().entries(), vec!["b.example".to_owned()]);
        // A list that only grows leaves pending connections alone; one the proxy reports later for a host
        // no longer allowed is closed then.
        let later = s.open(4, 10).unwrap();
        assert_eq!(s.set_allow_list(list(&["b.example", "c.example"]), &policy()), 0);
        assert!(!later.is_cancelled());
        s.allowed(4, "a.example", 443, &policy());
        assert!(later.is_cancelled());
    }

    #[test]
    fn connections_are_bounded_per_session() {
        let s = SessionEgress::new("s", AllowList::default());
        assert!(s.open(1, 2).is_some() && s.open(2, 2).is_some());
        assert!(s.open(3, 2).is_none());
        s.closed(1);
        assert!(s.open(3, 2).is_some());
    }

    #[test]
    fn a_report_counts_each_refusal_once_per_kind_and_starts_afresh() {
        let s = SessionEgress::new("s", AllowList::default());
        let mut notices = s.notices();
        s.refused("x.example", 443, "not_allowed");
        s.refused("x.example", 443, "not_allowed");
        s.refused("10.0.0.1", 80, "ip_literal");
        assert!(s.moved(100, 1000));
        let report = s.report();
        assert_eq!(report.allowed_bytes, 100);
        assert_eq!(report.blocked.len(), 2);
        let x = report.blocked.iter().find(|b| b.host == "x.example").unwrap();
        assert_eq!((x.count, x.reason.as_str()), (2, "not_allowed"));
        assert_eq!(notices.try_recv().unwrap().host, "x.example");
        s.begin_report();
        assert_eq!(s.report(), NetworkReport::default());
        assert_eq!(s.total_bytes(), 100, "the session's total is not reset by a report");
        assert!(!s.moved(901, 1000), "past the session's cap");
    }

    #[test]
    fn a_report_is_bounded() {
        let s = SessionEgress::new("s", AllowList::default());
        for i in 0..150 {
            s.refused(&format!("h{i}.example"), 443, "not_allowed");
        }
        let report = s.report();
        assert_eq!((report.blocked.len(), report.blocked_dropped), (100, 50));
    }
}
