//! Membership: which agents there are, where, and how they are. Every [`PROBE_INTERVAL`] a replica
//! resolves the agents' DNS name (or takes its static list), asks each address (and each known member's
//! address, so a DNS hiccup does not hide a node that answers) for its [`AgentInfo`] on
//! `GET /internal/v1/info`, and folds the answers into a new [`Snapshot`]: tag → member, each Up (its
//! last probe answered) or Unreachable (it did not). A member with no answer for `lost_after` that is also
//! gone from DNS is Lost: dropped from the members, its tag remembered (bounded) so its ids answer 410,
//! where a tag never seen answers 404.
//!
//! Conflicts: two different node ids claiming one tag → the later claim is refused (logged, excluded);
//! one node id at two addresses (Swarm starts the new agent task before it kills the old) → the ready one,
//! else the address already known.
//!
//! The fold ([`next`]) is a pure function of the old snapshot, one round's answers and the time, so tests
//! drive it with a fake clock; readers take an `Arc<Snapshot>` and never hold a lock across an `.await`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tokio_util::sync::CancellationToken;

use super::transport::AgentTransport;
use crate::node::{AgentInfo, INFO_PATH, NodeTag};

/// How often membership is refreshed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How long one probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// The largest info body read from an agent.
pub const INFO_LIMIT: usize = 64 * 1024;
/// How many lost tags are remembered (the oldest are forgotten first: their ids then answer 404).
pub const REMEMBERED_TAGS: usize = 4096;
/// The most addresses probed in one round (a DNS answer is attacker-shaped input too).
pub const MAX_ADDRESSES: usize = 256;
/// The most placements a replica remembers between two probes (a burst beyond it is counted by the
/// probes alone).
pub const MAX_PENDING_PLACEMENTS: usize = 1024;

/// Where the agents are.
#[derive(Debug, Clone)]
pub enum Discovery {
    /// A DNS name (`tasks.<agent service>`) and the agents' port.
    Dns { name: String, port: u16 },
    /// A fixed list (tests, or a deployment without DNS discovery).
    Static(Vec<SocketAddr>),
}

impl Discovery {
    /// The addresses now. An unresolvable name is an empty list (Swarm answers NXDOMAIN when a service
    /// has no task), logged.
    pub async fn resolve(&self) -> Vec<SocketAddr> {
        match self {
            Discovery::Static(addrs) => addrs.clone(),
            Discovery::Dns { name, port } => match tokio::net::lookup_host((name.as_str(), *port)).await {
                Ok(addrs) => {
                    let set: BTreeSet<SocketAddr> = addrs.take(MAX_ADDRESSES).collect();
                    set.into_iter().collect()
                }
                Err(e) => {
                    tracing::warn!(name, error = %e, "could not resolve the agents' name");
                    Vec::new()
                }
            },
        }
    }
}

/// Membership settings.
#[derive(Debug, Clone, Copy)]
pub struct MembershipConfig {
    /// No answer for this long and gone from DNS: Lost. Zero: never Lost (always Unreachable while away).
    pub lost_after: Duration,
    pub probe_timeout: Duration,
}

/// How a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Its last probe answered.
    Up,
    /// Its last probe did not answer (not yet Lost).
    Unreachable,
}

/// A known agent.
#[derive(Debug, Clone)]
pub struct Member {
    pub addr: SocketAddr,
    /// What it last reported.
    pub info: AgentInfo,
    /// When it last answered.
    pub last_ok: Instant,
    /// Whether its address was in the last DNS answer.
    pub in_dns: bool,
    pub state: NodeState,
}

impl Member {
    /// Up and ready (holds its state directory, adopted what it found): may take new sessions.
    pub fn is_ready(&self) -> bool {
        self.state == NodeState::Up && self.info.ready
    }
}

/// One view of the cluster.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub members: BTreeMap<NodeTag, Member>,
    /// Tags that were members and were lost, oldest first (at most [`REMEMBERED_TAGS`]).
    lost: VecDeque<NodeTag>,
    /// Claims refused in the last round: (address, tag, why).
    pub refused: Vec<(SocketAddr, NodeTag, String)>,
}

/// What a tag names now.
#[derive(Debug, Clone, Copy)]
pub enum Lookup<'a> {
    Up(&'a Member),
    Unreachable(&'a Member),
    Lost,
    Unknown,
}

impl Snapshot {
    pub fn lookup(&self, tag: NodeTag) -> Lookup<'_> {
        match self.members.get(&tag) {
            Some(m) if m.state == NodeState::Up => Lookup::Up(m),
            Some(m) => Lookup::Unreachable(m),
            None if self.lost.contains(&tag) => Lookup::Lost,
            None => Lookup::Unknown,
        }
    }

    /// The members that answered their last probe.
    pub fn up(&self) -> impl Iterator<Item = (&NodeTag, &Member)> {
        self.members.iter().filter(|(_, m)| m.state == NodeState::Up)
    }

    /// Whether any agent answers (what the replica's `/readyz` asks).
    pub fn any_up(&self) -> bool {
        self.up().next().is_some()
    }

    pub fn lost_count(&self) -> usize {
        self.lost.len()
    }
}

/// One round's answers: the addresses DNS gave, and each probed address's info or why not.
#[derive(Debug, Clone, Default)]
pub struct Round {
    pub resolved: Vec<SocketAddr>,
    pub probes: Vec<(SocketAddr, Result<AgentInfo, String>)>,
}

/// The snapshot after `round`, at `now`.
pub fn next(old: &Snapshot, round: Round, now: Instant, config: &MembershipConfig) -> Snapshot {
    let dns: BTreeSet<SocketAddr> = round.resolved.iter().copied().collect();
    let mut members = old.members.clone();
    let mut lost = old.lost.clone();
    let mut refused = Vec::new();
    // Group the successful answers by tag, in address order (deterministic).
    let mut claims: BTreeMap<NodeTag, Vec<(SocketAddr, AgentInfo)>> = BTreeMap::new();
    let mut answers: Vec<_> = round.probes.into_iter().filter_map(|(a, r)| r.ok().map(|i| (a, i))).collect();
    answers.sort_by_key(|(a, _)| *a);
    for (addr, info) in answers {
        claims.entry(info.node_tag).or_default().push((addr, info));
    }
    let mut answered = BTreeSet::new();
    for (tag, mut claims) in claims {
        // The node id this tag belongs to: the known member's, else the first claim's.
        let owner_id = members.get(&tag).map(|m| m.info.node_id.clone()).unwrap_or_else(|| claims[0].1.node_id.clone());
        claims.retain(|(addr, info)| {
            let same = info.node_id == owner_id;
            if !same {
                tracing::error!(%tag, %addr, node_id = %info.node_id, holder = %owner_id,
                    "refusing an agent: its node tag is already held by another node");
                refused.push((*addr, tag, format!("tag {tag} is held by node {owner_id}")));
            }
            same
        });
        let known_addr = members.get(&tag).map(|m| m.addr);
        // Ready first, then the address already known, then the lowest address.
        let Some((addr, info)) = claims.into_iter().min_by_key(|(addr, info)| (!info.ready, Some(*addr) != known_addr))
        else {
            continue;
        };
        if let Some(old) = members.get(&tag)
            && old.info.epoch != info.epoch
        {
            tracing::info!(%tag, %addr, "the agent restarted (new epoch)");
        }
        if known_addr.is_none() {
            tracing::info!(%tag, %addr, node_id = %info.node_id, "an agent joined");
        }
        lost.retain(|t| *t != tag);
        answered.insert(tag);
        members.insert(tag, Member { addr, info, last_ok: now, in_dns: dns.contains(&addr), state: NodeState::Up });
    }
    members.retain(|tag, member| {
        if answered.contains(tag) {
            return true;
        }
        member.in_dns = dns.contains(&member.addr);
        if member.state == NodeState::Up {
            tracing::warn!(%tag, addr = %member.addr, "an agent stopped answering");
        }
        member.state = NodeState::Unreachable;
        let silent = now.saturating_duration_since(member.last_ok);
        let is_lost = !config.lost_after.is_zero() && silent >= config.lost_after && !member.in_dns;
        if is_lost {
            tracing::warn!(%tag, addr = %member.addr, silent_s = silent.as_secs(), "an agent is lost: its sessions are gone");
            lost.push_back(*tag);
            while lost.len() > REMEMBERED_TAGS {
                lost.pop_front();
            }
        }
        !is_lost
    });
    Snapshot { members, lost, refused }
}

/// Asks the agent at `addr` for its info: `GET /internal/v1/info`, within `timeout`, its body bounded.
pub async fn probe(transport: &dyn AgentTransport, addr: SocketAddr, timeout: Duration) -> Result<AgentInfo, String> {
    let ask = async {
        let req = Request::get(INFO_PATH).body(Body::empty()).map_err(|e| e.to_string())?;
        let response = transport.send(addr, req).await.map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("info answered {}", response.status()));
        }
        let bytes = axum::body::to_bytes(response.into_body(), INFO_LIMIT)
            .await
            .map_err(|e| format!("info body unreadable or over {INFO_LIMIT} bytes: {e}"))?;
        serde_json::from_slice::<AgentInfo>(&bytes).map_err(|e| format!("info is not an agent's: {e}"))
    };
    tokio::time::timeout(timeout, ask).await.unwrap_or_else(|_| Err("no answer in time".into()))
}

/// The replica's membership: discovery, the link, the current snapshot.
pub struct Membership {
    config: MembershipConfig,
    discovery: Discovery,
    transport: Arc<dyn AgentTransport>,
    view: Mutex<View>,
}

/// The last probes' picture, and what this replica placed on top of it.
#[derive(Default)]
struct View {
    /// What the last round of probes said.
    probed: Arc<Snapshot>,
    /// `probed` with every placement below counted: what placement decides on.
    current: Arc<Snapshot>,
    /// Sessions this replica placed: counted from the moment one is chosen (so two creates at once see
    /// each other), forgotten when its create fails or is cancelled, or once a probe begun after the
    /// agent answered it reports the truth. Bounded.
    placed: VecDeque<Placed>,
    next_id: u64,
}

impl View {
    fn recount(&mut self) {
        let mut current = Snapshot::clone(&self.probed);
        for placed in &self.placed {
            placed.apply(&mut current);
        }
        self.current = Arc::new(current);
    }
}

/// What a new session needs (placement weighs it; the view counts it once placed).
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// `None`: no kernel yet (an MCP session), any ready agent will do.
    pub language: Option<&'a str>,
    pub memory_mb: u64,
    pub cpus: f64,
    pub owner: &'a str,
}

/// One session placed by this replica (see [`Membership::place`]).
#[derive(Debug, Clone)]
struct Placed {
    id: u64,
    /// When the agent said it made the session; `None` while the create is under way.
    confirmed: Option<Instant>,
    tag: NodeTag,
    language: Option<String>,
    memory_mb: u64,
    cpus: f64,
    owner: String,
}

impl Placed {
    fn apply(&self, snapshot: &mut Snapshot) {
        let Some(member) = snapshot.members.get_mut(&self.tag) else { return };
        let info = &mut member.info;
        info.usage.sessions = info.usage.sessions.saturating_add(1);
        info.usage.memory_mb = info.usage.memory_mb.saturating_add(self.memory_mb);
        info.usage.cpus += self.cpus;
        *info.owners.entry(self.owner.clone()).or_default() += 1;
        if let Some(warm) = self.language.as_deref().and_then(|l| info.warm.get_mut(l)) {
            *warm = warm.saturating_sub(1);
        }
    }
}

impl Membership {
    pub fn new(config: MembershipConfig, discovery: Discovery, transport: Arc<dyn AgentTransport>) -> Self {
        Membership { config, discovery, transport, view: Mutex::default() }
    }

    /// The current view (cheap: an `Arc`).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.lock().current.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the view (tests that need a state only time makes, such as Lost).
    #[cfg(test)]
    pub(crate) fn set(&self, snapshot: Snapshot) {
        let mut view = self.lock();
        view.probed = Arc::new(snapshot);
        view.recount();
    }

    /// Chooses where a new session goes and counts it there at once, in one step: `choose` (placement,
    /// a pure function) sees every session this replica is placing or has placed since the last probes,
    /// so a burst of creates, even at the same instant, spreads by their count (without it every create
    /// between two probes sees the same loads and lands wherever the tie-break sends it). The count
    /// lasts as long as the returned [`Reservation`] and, once [`Reservation::confirm`]ed, until a probe
    /// begun after the agent's answer reports the truth; dropping the reservation unconfirmed (the create
    /// failed, or its caller left) takes it back. A probe begun before the confirmation may already count
    /// the session too: then it is counted twice until the next probe, never missed.
    pub fn place<E>(
        &self,
        ask: &Ask<'_>,
        choose: impl FnOnce(&Snapshot) -> Result<Vec<(NodeTag, SocketAddr)>, E>,
    ) -> Result<(Vec<(NodeTag, SocketAddr)>, Reservation<'_>), E> {
        let mut view = self.lock();
        let candidates = choose(&view.current)?;
        let id = view.next_id;
        view.next_id += 1;
        if let Some((tag, _)) = candidates.first() {
            if view.placed.len() == MAX_PENDING_PLACEMENTS {
                view.placed.pop_front();
            }
            view.placed.push_back(Placed {
                id,
                confirmed: None,
                tag: *tag,
                language: ask.language.map(str::to_owned),
                memory_mb: ask.memory_mb,
                cpus: ask.cpus,
                owner: ask.owner.to_owned(),
            });
            view.recount();
        }
        Ok((candidates, Reservation { membership: self, id, settled: false }))
    }

    pub fn transport(&self) -> Arc<dyn AgentTransport> {
        self.transport.clone()
    }

    /// One round: resolve, probe every address in parallel, fold (at `now`).
    pub async fn refresh(&self, now: Instant) {
        let began = Instant::now();
        let resolved = self.discovery.resolve().await;
        let old = self.lock().probed.clone();
        let mut addrs: BTreeSet<SocketAddr> = resolved.iter().copied().collect();
        addrs.extend(old.members.values().map(|m| m.addr));
        let probes = futures::future::join_all(addrs.into_iter().take(MAX_ADDRESSES).map(|addr| {
            let transport = self.transport.clone();
            let timeout = self.config.probe_timeout;
            async move { (addr, probe(transport.as_ref(), addr, timeout).await) }
        }))
        .await;
        for (addr, result) in &probes {
            if let Err(why) = result {
                tracing::debug!(%addr, why, "probe failed");
            }
        }
        let probed = next(&old, Round { resolved, probes }, now, &self.config);
        let mut view = self.lock();
        view.probed = Arc::new(probed);
        // A placement the agent confirmed before this round began is in its report now.
        view.placed.retain(|p| p.confirmed.is_none_or(|at| at >= began));
        view.recount();
    }

    /// Refreshes every [`PROBE_INTERVAL`] until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.refresh(Instant::now()).await,
            }
        }
    }
}

/// A session being placed on a node, counted in the replica's view (see [`Membership::place`]).
pub struct Reservation<'a> {
    membership: &'a Membership,
    id: u64,
    settled: bool,
}

impl Reservation<'_> {
    fn update(&self, change: impl FnOnce(&mut VecDeque<Placed>)) {
        let mut view = self.membership.lock();
        change(&mut view.placed);
        view.recount();
    }

    /// The create goes to `tag` instead (the first choice refused it).
    pub fn moved_to(&self, tag: NodeTag) {
        let id = self.id;
        self.update(|placed| placed.iter_mut().filter(|p| p.id == id).for_each(|p| p.tag = tag));
    }

    /// The agent made the session: it stays counted until the probes report it.
    pub fn confirm(mut self) {
        self.settled = true;
        let (id, now) = (self.id, Instant::now());
        self.update(|placed| placed.iter_mut().filter(|p| p.id == id).for_each(|p| p.confirmed = Some(now)));
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.settled {
            let id = self.id;
            self.update(|placed| placed.retain(|p| p.id != id));
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::node::{Capacity, Usage};

    pub fn info(tag: &str, node_id: &str, ready: bool) -> AgentInfo {
        AgentInfo {
            node_tag: NodeTag::parse(tag).unwrap(),
            node_id: node_id.into(),
            epoch: "e1".into(),
            version: "0".into(),
            ready,
            reasons: vec![],
            capacity: Capacity { max_sessions: 10, memory_mb: 8192, cpus: 4.0 },
            usage: Usage::default(),
            owners: BTreeMap::new(),
            warm: BTreeMap::new(),
            images: BTreeMap::new(),
            pools: BTreeMap::new(),
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7443))
    }

    fn tag(s: &str) -> NodeTag {
        NodeTag::parse(s).unwrap()
    }

    const CONFIG: MembershipConfig =
        MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_millis(1500) };

    /// A round where `dns` resolved and `ok` answered (every other address in dns failed).
    fn round(dns: &[u8], ok: &[(u8, AgentInfo)]) -> Round {
        let mut probes: Vec<_> = ok.iter().map(|(n, i)| (addr(*n), Ok(i.clone()))).collect();
        for n in dns {
            if !ok.iter().any(|(m, _)| m == n) {
                probes.push((addr(*n), Err("refused".into())));
            }
        }
        Round { resolved: dns.iter().map(|n| addr(*n)).collect(), probes }
    }

    fn state(s: &Snapshot, t: &str) -> &'static str {
        match s.lookup(tag(t)) {
            Lookup::Up(_) => "up",
            Lookup::Unreachable(_) => "unreachable",
            Lookup::Lost => "lost",
            Lookup::Unknown => "unknown",
        }
    }

    #[test]
    fn an_agent_that_stops_answering_is_unreachable_then_lost_once_gone_from_dns_long_enough() {
        let t0 = Instant::now();
        let s = next(&Snapshot::default(), round(&[1], &[(1, info("0000000a", "n1", true))]), t0, &CONFIG);
        assert_eq!(state(&s, "0000000a"), "up");
        assert_eq!(state(&s, "0000000b"), "unknown");
        // Stops answering, still in DNS: unreachable however long.
        let s = next(&s, round(&[1], &[]), t0 + Duration::from_secs(2), &CONFIG);
        assert_eq!(state(&s, "0000000a"), "unreachable");
        let s = next(&s, round(&[1], &[]), t0 + Duration::from_secs(120), &CONFIG);
        assert_eq!(state(&s, "0000000a"), "unreachable", "still in DNS: not lost");
        // Gone from DNS, but not yet lost_after without an answer.
        let s2 = next(&Snapshot::default(), round(&[1], &[(1, info("0000000a", "n1", true))]), t0, &CONFIG);
        let s2 = next(&s2, round(&[], &[]), t0 + Duration::from_secs(59), &CONFIG);
        assert_eq!(state(&s2, "0000000a"), "unreachable");
        let s2 = next(&s2, round(&[], &[]), t0 + Duration::from_secs(60), &CONFIG);
        assert_eq!(state(&s2, "0000000a"), "lost");
        assert!(s2.members.is_empty());
        // Gone from DNS after a long silence: lost at once.
        let s = next(&s, round(&[], &[]), t0 + Duration::from_secs(122), &CONFIG);
        assert_eq!(state(&s, "0000000a"), "lost");
    }

    #[test]
    fn lost_after_zero_never_loses_a_node_and_a_lost_tag_that_returns_is_up_again() {
        let never = MembershipConfig { lost_after: Duration::ZERO, ..CONFIG };
        let t0 = Instant::now();
        let s = next(&Snapshot::default(), round(&[1], &[(1, info("0000000a", "n1", true))]), t0, &never);
        let s = next(&s, round(&[], &[]), t0 + Duration::from_secs(86_400), &never);
        assert_eq!(state(&s, "0000000a"), "unreachable");

        let s = next(&Snapshot::default(), round(&[1], &[(1, info("0000000a", "n1", true))]), t0, &CONFIG);
        let s = next(&s, round(&[], &[]), t0 + Duration::from_secs(61), &CONFIG);
        assert_eq!(state(&s, "0000000a"), "lost");
        let s = next(&s, round(&[2], &[(2, info("0000000a", "n1", true))]), t0 + Duration::from_secs(70), &CONFIG);
        assert_eq!(state(&s, "0000000a"), "up", "its agent fences its own old sessions (410 there)");
        assert_eq!(s.members[&tag("0000000a")].addr, addr(2));
        assert_eq!(s.lost_count(), 0);
    }

    #[test]
    fn a_second_node_claiming_a_known_tag_is_refused() {
        let t0 = Instant::now();
        let s = next(&Snapshot::default(), round(&[1], &[(1, info("0000000a", "n1", true))]), t0, &CONFIG);
        let s = next(
            &s,
            round(&[1, 2], &[(1, info("0000000a", "n1", true)), (2, info("0000000a", "intruder", true))]),
            t0 + Duration::from_secs(2),
            &CONFIG,
        );
        assert_eq!(s.members[&tag("0000000a")].addr, addr(1));
        assert_eq!(s.members[&tag("0000000a")].info.node_id, "n1");
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.refused[0].0, addr(2));
        // Even when the holder is away, the claim stays refused until the holder is lost.
        let s =
            next(&s, round(&[1, 2], &[(2, info("0000000a", "intruder", true))]), t0 + Duration::from_secs(4), &CONFIG);
        assert_eq!(state(&s, "0000000a"), "unreachable");
        assert_eq!(s.members[&tag("0000000a")].info.node_id, "n1");
    }

    #[test]
    fn one_node_at_two_addresses_is_served_by_the_ready_agent() {
        let t0 = Instant::now();
        let s = next(&Snapshot::default(), round(&[1], &[(1, info("0000000a", "n1", true))]), t0, &CONFIG);
        // Swarm starts a new task before it kills the old: the new one waits for the lock (not ready).
        let s = next(
            &s,
            round(&[1, 2], &[(1, info("0000000a", "n1", true)), (2, info("0000000a", "n1", false))]),
            t0 + Duration::from_secs(2),
            &CONFIG,
        );
        assert_eq!(s.members[&tag("0000000a")].addr, addr(1));
        assert!(s.refused.is_empty(), "the same node is no conflict");
        // The old one dies; the new one takes the lock.
        let s = next(&s, round(&[2], &[(2, info("0000000a", "n1", true))]), t0 + Duration::from_secs(4), &CONFIG);
        assert_eq!(s.members[&tag("0000000a")].addr, addr(2));
        assert!(s.members[&tag("0000000a")].is_ready());
    }

    #[test]
    fn lost_tags_are_remembered_but_bounded() {
        let mut s = Snapshot::default();
        let t0 = Instant::now();
        for i in 0..(REMEMBERED_TAGS + 2) {
            s.lost.push_back(tag(&format!("{:08x}", i + 1)));
            while s.lost.len() > REMEMBERED_TAGS {
                s.lost.pop_front();
            }
        }
        let s = next(&s, round(&[], &[]), t0, &CONFIG);
        assert_eq!(s.lost_count(), REMEMBERED_TAGS);
        assert_eq!(state(&s, "00000001"), "unknown", "the oldest is forgotten");
        assert_eq!(state(&s, &format!("{:08x}", REMEMBERED_TAGS + 2)), "lost");
    }

    /// A transport whose agents answer from a table (`None`: refused), counting nothing else.
    pub struct FakeAgents(pub Mutex<BTreeMap<SocketAddr, Option<(StatusCode, String)>>>);

    #[async_trait::async_trait]
    impl AgentTransport for FakeAgents {
        async fn send(
            &self,
            addr: SocketAddr,
            _req: Request<Body>,
        ) -> Result<axum::http::Response<Body>, super::super::transport::TransportError> {
            let answer = self.0.lock().unwrap().get(&addr).cloned().flatten();
            match answer {
                Some((status, body)) => {
                    Ok(axum::http::Response::builder().status(status).body(Body::from(body)).unwrap())
                }
                None => Err(super::super::transport::TransportError::Connect { addr, why: "refused".into() }),
            }
        }
    }

    #[tokio::test]
    async fn a_probe_reads_a_bounded_info_and_anything_else_is_a_failed_probe() {
        let good = serde_json::to_string(&info("0000000a", "n1", true)).unwrap();
        let agents = FakeAgents(Mutex::new(BTreeMap::from([
            (addr(1), Some((StatusCode::OK, good))),
            (addr(2), Some((StatusCode::OK, "x".repeat(INFO_LIMIT + 1)))),
            (addr(3), Some((StatusCode::SERVICE_UNAVAILABLE, String::new()))),
            (addr(4), Some((StatusCode::OK, "{\"node_tag\":\"00000000\"}".into()))),
            (addr(5), None),
        ])));
        let t = Duration::from_secs(1);
        assert_eq!(probe(&agents, addr(1), t).await.unwrap().node_id, "n1");
        for n in 2..=5 {
            assert!(probe(&agents, addr(n), t).await.is_err(), "{n}");
        }
        let membership = Membership::new(CONFIG, Discovery::Static((1..=5).map(addr).collect()), Arc::new(agents));
        membership.refresh(Instant::now()).await;
        let s = membership.snapshot();
        assert_eq!(s.members.len(), 1);
        assert!(s.any_up());
    }

    #[tokio::test]
    async fn a_placement_counts_from_its_choice_until_a_probe_after_its_confirmation_reports_it() {
        let report = |sessions: u32| {
            let mut i = info("0000000a", "n1", true);
            i.usage.sessions = sessions;
            Some((StatusCode::OK, serde_json::to_string(&i).unwrap()))
        };
        let agents = Arc::new(FakeAgents(Mutex::new(BTreeMap::from([(addr(1), report(0))]))));
        let membership = Membership::new(CONFIG, Discovery::Static(vec![addr(1)]), agents.clone());
        membership.refresh(Instant::now()).await;
        let sessions = |m: &Membership| m.snapshot().members.values().map(|m| m.info.usage.sessions).sum::<u32>();
        let ask = Ask { language: Some("python"), memory_mb: 512, cpus: 0.5, owner: "o" };
        let choose = |s: &Snapshot| Ok::<_, ()>(s.members.iter().map(|(t, m)| (*t, m.addr)).collect());

        let (_, first) = membership.place(&ask, choose).unwrap();
        assert_eq!(sessions(&membership), 1, "counted from the moment it is chosen");
        first.confirm();
        // The agent made it; the next probe (begun after the confirmation) reports it: counted once.
        agents.0.lock().unwrap().insert(addr(1), report(1));
        membership.refresh(Instant::now()).await;
        assert_eq!(sessions(&membership), 1);

        // A create under way survives a probe that cannot know it yet; given back when it fails.
        let (_, second) = membership.place(&ask, choose).unwrap();
        membership.refresh(Instant::now()).await;
        assert_eq!(sessions(&membership), 2, "the probe does not wipe out a create under way");
        drop(second);
        assert_eq!(sessions(&membership), 1, "a failed or abandoned create is given back");
    }
}
