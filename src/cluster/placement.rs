//! Placement: which agent gets a new session, and rendezvous hashing for what must land where it landed
//! before (the session API's users, the `/jupyter` API's owners). Pure functions of a membership
//! [`Snapshot`]: no I/O, no clock.
//!
//! Candidates are the agents that are Up and ready, have the language's expected image (the operator's
//! `--expected-image`, else the hash most live agents report) and room for the session (sessions, memory,
//! CPUs). A candidate with a warm container of the language comes first; the others by load, the least
//! loaded first, ties in a random order. The caller tries the first and, if it refuses (429/503), the
//! second. Cluster-wide `max_sessions` and per-owner quotas are checked here from the agents' last
//! reports: soft limits, overshot by at most the creates in flight across replicas.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::error::RouteError;
pub use super::membership::Ask;
use super::membership::{Member, Snapshot};
use crate::node::NodeTag;

/// The cluster-wide rules.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Per language, the image content hash a node must have (`--expected-image lang=hash`).
    pub expected: BTreeMap<String, String>,
    /// Sessions in the whole cluster (soft).
    pub max_sessions: Option<u32>,
    /// Sessions per owner in the whole cluster (soft).
    pub max_per_owner: Option<u32>,
}

/// Why no agent can take a session.
#[derive(Debug, Clone, PartialEq)]
pub enum NoPlace {
    NoAgent,
    NotReady,
    NoImage(String),
    NoRoom,
    ClusterFull(u32),
    OwnerQuota(u32),
}

impl From<NoPlace> for RouteError {
    fn from(why: NoPlace) -> Self {
        match why {
            NoPlace::NoAgent => RouteError::NoNodeAvailable("no agent is known or answers".into()),
            NoPlace::NotReady => {
                RouteError::NoNodeAvailable("no agent is ready (each is starting or waiting for its lock)".into())
            }
            NoPlace::NoImage(lang) => RouteError::NoNodeAvailable(format!(
                "no ready agent has the current image of `{lang}` (see each agent's info for why)"
            )),
            NoPlace::NoRoom => RouteError::NoRoom("no node has room for this session now; retry later".into()),
            NoPlace::ClusterFull(max) => {
                RouteError::NoRoom(format!("the cluster holds its maximum of {max} sessions; end one first"))
            }
            NoPlace::OwnerQuota(max) => {
                RouteError::NoRoom(format!("this API key holds its maximum of {max} sessions; end one first"))
            }
        }
    }
}

/// The image hash a node must have for `language`: the operator's, else the one most Up agents report
/// (ties: the smallest hash, so every replica agrees), `None` when no agent has one.
pub fn expected_image(snapshot: &Snapshot, policy: &Policy, language: &str) -> Option<String> {
    if let Some(hash) = policy.expected.get(language) {
        return Some(hash.clone());
    }
    let mut votes: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, m) in snapshot.up() {
        if let Some(Some(hash)) = m.info.images.get(language) {
            *votes.entry(hash.as_str()).or_default() += 1;
        }
    }
    // Max by count; among equals the first (smallest) hash: iterate in reverse so `max_by_key` keeps it.
    votes.into_iter().rev().max_by_key(|(_, n)| *n).map(|(h, _)| h.to_owned())
}

fn has_room(m: &Member, ask: &Ask) -> bool {
    let (cap, used) = (m.info.capacity, m.info.usage);
    used.sessions < cap.max_sessions
        && used.memory_mb.saturating_add(ask.memory_mb) <= cap.memory_mb
        && used.cpus + ask.cpus <= cap.cpus + 1e-9
}

/// The fullest of a node's three resources, 0 to 1.
fn load(m: &Member) -> f64 {
    let (cap, used) = (m.info.capacity, m.info.usage);
    let frac = |u: f64, c: f64| if c > 0.0 { u / c } else { 1.0 };
    frac(used.sessions as f64, cap.max_sessions as f64)
        .max(frac(used.memory_mb as f64, cap.memory_mb as f64))
        .max(frac(used.cpus, cap.cpus))
}

/// A per-placement random order among equals: a hash of `seed` and the tag.
fn tie(seed: u64, tag: &NodeTag) -> u64 {
    let d = ring::digest::digest(&ring::digest::SHA256, format!("{seed}:{tag}").as_bytes());
    u64::from_be_bytes(d.as_ref()[..8].try_into().unwrap_or_default())
}

/// The candidates for `ask`, best first; or why there is none. `seed` orders ties (random per call in
/// the product).
pub fn place(
    snapshot: &Snapshot,
    ask: &Ask,
    policy: &Policy,
    seed: u64,
) -> Result<Vec<(NodeTag, SocketAddr)>, NoPlace> {
    let total: u32 = snapshot.members.values().map(|m| m.info.usage.sessions).sum();
    if let Some(max) = policy.max_sessions
        && total >= max
    {
        return Err(NoPlace::ClusterFull(max));
    }
    let owned: u32 = snapshot.members.values().filter_map(|m| m.info.owners.get(ask.owner)).sum();
    if let Some(max) = policy.max_per_owner
        && owned >= max
    {
        return Err(NoPlace::OwnerQuota(max));
    }
    let up: Vec<_> = snapshot.up().collect();
    if up.is_empty() {
        return Err(NoPlace::NoAgent);
    }
    let ready: Vec<_> = up.into_iter().filter(|(_, m)| m.is_ready()).collect();
    if ready.is_empty() {
        return Err(NoPlace::NotReady);
    }
    let imaged: Vec<_> = match ask.language {
        None => ready,
        Some(lang) => {
            let expected = expected_image(snapshot, policy, lang);
            ready
                .into_iter()
                .filter(|(_, m)| {
                    expected.is_some() && m.info.images.get(lang).and_then(|h| h.as_ref()) == expected.as_ref()
                })
                .collect()
        }
    };
    if imaged.is_empty() {
        return Err(NoPlace::NoImage(ask.language.unwrap_or_default().to_owned()));
    }
    let mut roomy: Vec<_> = imaged.into_iter().filter(|(_, m)| has_room(m, ask)).collect();
    if roomy.is_empty() {
        return Err(NoPlace::NoRoom);
    }
    let warm = |m: &Member| ask.language.and_then(|l| m.info.warm.get(l)).is_some_and(|n| *n > 0);
    roomy.sort_by(|(ta, a), (tb, b)| {
        warm(b).cmp(&warm(a)).then(load(a).total_cmp(&load(b))).then(tie(seed, ta).cmp(&tie(seed, tb)))
    });
    Ok(roomy.into_iter().map(|(t, m)| (*t, m.addr)).collect())
}

/// Rendezvous (highest random weight) hashing: `tags` ordered by their weight for `key`, highest first.
/// Removing a tag moves only the keys it held; adding one takes about 1/n of the keys.
pub fn rendezvous(key: &str, tags: impl IntoIterator<Item = NodeTag>) -> Vec<NodeTag> {
    let weight = |tag: &NodeTag| {
        let d = ring::digest::digest(&ring::digest::SHA256, format!("{key}\n{tag}").as_bytes());
        u64::from_be_bytes(d.as_ref()[..8].try_into().unwrap_or_default())
    };
    let mut tags: Vec<(u64, NodeTag)> = tags.into_iter().map(|t| (weight(&t), t)).collect();
    tags.sort_by(|a, b| b.cmp(a));
    tags.into_iter().map(|(_, t)| t).collect()
}

/// The rendezvous key of a session API user: the owner and the user id, which cannot contain `\n`.
pub fn user_key(owner: &str, user_id: &str) -> String {
    format!("user\n{owner}\n{user_id}")
}

/// The rendezvous key of a `/jupyter` API owner.
pub fn owner_key(owner: &str) -> String {
    format!("owner\n{owner}")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::cluster::membership::tests::info;
    use crate::cluster::membership::{MembershipConfig, Round, next};
    use crate::node::{AgentInfo, Usage};

    /// A snapshot of agents `(tag, info)`, all Up.
    fn cluster(agents: Vec<AgentInfo>) -> Snapshot {
        let probes = agents
            .into_iter()
            .enumerate()
            .map(|(i, info)| (SocketAddr::from(([10, 0, 0, i as u8 + 1], 7443)), Ok(info)))
            .collect::<Vec<_>>();
        let resolved = probes.iter().map(|(a, _)| *a).collect();
        let config = MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_secs(1) };
        next(&Snapshot::default(), Round { resolved, probes }, Instant::now(), &config)
    }

    fn agent(tag: &str, sessions: u32, python: Option<&str>) -> AgentInfo {
        let mut i = info(tag, &format!("node-{tag}"), true);
        i.usage = Usage { sessions, memory_mb: u64::from(sessions) * 512, cpus: f64::from(sessions) * 0.5 };
        i.images.insert("python".into(), python.map(str::to_owned));
        i
    }

    fn ask(owner: &str) -> Ask<'_> {
        Ask { language: Some("python"), memory_mb: 512, cpus: 0.5, owner }
    }

    fn first(s: &Snapshot, policy: &Policy, seed: u64) -> Result<String, NoPlace> {
        place(s, &ask("o"), policy, seed).map(|c| c[0].0.to_string())
    }

    #[test]
    fn sequential_creates_spread_over_equal_nodes() {
        let mut a = agent("0000000a", 0, Some("h1"));
        let mut b = agent("0000000b", 0, Some("h1"));
        let mut counts = BTreeMap::new();
        for seed in 0..8 {
            let s = cluster(vec![a.clone(), b.clone()]);
            let chosen = first(&s, &Policy::default(), seed).unwrap();
            *counts.entry(chosen.clone()).or_insert(0) += 1;
            // The agent reports its new session at the next probe.
            let target = if chosen == "0000000a" { &mut a } else { &mut b };
            target.usage.sessions += 1;
            target.usage.memory_mb += 512;
            target.usage.cpus += 0.5;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [4, 4], "{counts:?}");
    }

    #[test]
    fn a_burst_between_two_probes_spreads_when_the_replica_counts_what_it_placed() {
        use crate::cluster::membership::{Discovery, Membership, tests::FakeAgents};
        let mut a = agent("0000000a", 0, Some("h1"));
        let mut b = agent("0000000b", 0, Some("h1"));
        a.warm.insert("python".into(), 1);
        b.warm.insert("python".into(), 1);
        let config = MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_secs(1) };
        let membership = Membership::new(
            config,
            Discovery::Static(Vec::new()),
            std::sync::Arc::new(FakeAgents(std::sync::Mutex::new(BTreeMap::new()))),
        );
        membership.set(cluster(vec![a, b]));
        let mut counts = BTreeMap::<String, u32>::new();
        // No probe in between: only the replica's own count of what it placed moves the loads.
        let mut reserved = Vec::new();
        for seed in 0..8 {
            let (candidates, reservation) =
                membership.place(&ask("o"), |now| place(now, &ask("o"), &Policy::default(), seed)).unwrap();
            reserved.push(reservation);
            *counts.entry(candidates[0].0.to_string()).or_insert(0) += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [4, 4], "{counts:?}");
        let s = membership.snapshot();
        let a = &s.members.values().next().unwrap().info;
        assert_eq!((a.usage.sessions, a.owners["o"], a.warm["python"]), (4, 4, 0));
        // Confirmed creates stay counted; those that failed (dropped unconfirmed) are given back.
        for (i, reservation) in reserved.into_iter().enumerate() {
            if i % 2 == 0 {
                reservation.confirm();
            }
        }
        let s = membership.snapshot();
        let total: u32 = s.members.values().map(|m| m.info.usage.sessions).sum();
        assert_eq!(total, 4, "four confirmed, four given back");
    }

    #[test]
    fn ties_go_either_way_and_the_least_loaded_wins() {
        let s = cluster(vec![agent("0000000a", 1, Some("h")), agent("0000000b", 1, Some("h"))]);
        let winners: std::collections::BTreeSet<_> =
            (0..32).map(|seed| first(&s, &Policy::default(), seed).unwrap()).collect();
        assert_eq!(winners.len(), 2, "ties at random");
        let s = cluster(vec![agent("0000000a", 3, Some("h")), agent("0000000b", 1, Some("h"))]);
        for seed in 0..16 {
            assert_eq!(first(&s, &Policy::default(), seed).unwrap(), "0000000b");
        }
        let both = place(&s, &ask("o"), &Policy::default(), 0).unwrap();
        assert_eq!(both.len(), 2, "the second is the retry");
    }

    #[test]
    fn a_warm_container_beats_a_lighter_load() {
        let mut warm = agent("0000000a", 5, Some("h"));
        warm.warm.insert("python".into(), 1);
        let s = cluster(vec![warm, agent("0000000b", 0, Some("h"))]);
        assert_eq!(first(&s, &Policy::default(), 7).unwrap(), "0000000a");
        // Warm for another language does not count.
        let mut other = agent("0000000a", 5, Some("h"));
        other.warm.insert("java".into(), 3);
        let s = cluster(vec![other, agent("0000000b", 0, Some("h"))]);
        assert_eq!(first(&s, &Policy::default(), 7).unwrap(), "0000000b");
    }

    #[test]
    fn only_nodes_with_the_expected_image_are_candidates() {
        let s = cluster(vec![
            agent("0000000a", 0, Some("old")),
            agent("0000000b", 3, Some("new")),
            agent("0000000c", 3, Some("new")),
            agent("0000000d", 0, None),
        ]);
        // The majority's hash.
        for seed in 0..8 {
            let c = place(&s, &ask("o"), &Policy::default(), seed).unwrap();
            let tags: Vec<_> = c.iter().map(|(t, _)| t.to_string()).collect();
            assert!(tags.iter().all(|t| t == "0000000b" || t == "0000000c"), "{tags:?}");
        }
        // The operator's hash wins over the majority.
        let policy = Policy { expected: BTreeMap::from([("python".into(), "old".into())]), ..Default::default() };
        assert_eq!(first(&s, &policy, 0).unwrap(), "0000000a");
        let policy = Policy { expected: BTreeMap::from([("python".into(), "nobody".into())]), ..Default::default() };
        assert_eq!(first(&s, &policy, 0), Err(NoPlace::NoImage("python".into())));
        // A language no node has.
        let java = Ask { language: Some("java"), ..ask("o") };
        assert_eq!(place(&s, &java, &Policy::default(), 0), Err(NoPlace::NoImage("java".into())));
        // An MCP session needs no image.
        let mcp = Ask { language: None, ..ask("o") };
        assert_eq!(place(&s, &mcp, &Policy::default(), 0).unwrap().len(), 4);
    }

    #[test]
    fn a_tied_vote_on_the_image_is_decided_the_same_way_everywhere() {
        let s = cluster(vec![agent("0000000a", 0, Some("bbb")), agent("0000000b", 0, Some("aaa"))]);
        assert_eq!(expected_image(&s, &Policy::default(), "python").as_deref(), Some("aaa"));
    }

    #[test]
    fn room_counts_sessions_memory_and_cpus() {
        let mut full_sessions = agent("0000000a", 10, Some("h"));
        full_sessions.usage.memory_mb = 0;
        full_sessions.usage.cpus = 0.0;
        let mut full_memory = agent("0000000b", 0, Some("h"));
        full_memory.usage.memory_mb = 8000;
        let mut full_cpus = agent("0000000c", 0, Some("h"));
        full_cpus.usage.cpus = 3.75;
        let s = cluster(vec![full_sessions, full_memory, full_cpus]);
        assert_eq!(first(&s, &Policy::default(), 0), Err(NoPlace::NoRoom));
        let small = Ask { memory_mb: 128, cpus: 0.25, ..ask("o") };
        let c = place(&s, &small, &Policy::default(), 0).unwrap();
        let tags: Vec<_> = c.iter().map(|(t, _)| t.to_string()).collect();
        assert_eq!(tags, ["0000000c", "0000000b"], "fits now; the least loaded first");
        let e: RouteError = NoPlace::NoRoom.into();
        assert_eq!(crate::error::ApiError::from(e).status, axum::http::StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn no_agent_or_none_ready_is_a_503_saying_why() {
        assert_eq!(first(&Snapshot::default(), &Policy::default(), 0), Err(NoPlace::NoAgent));
        let mut starting = agent("0000000a", 0, Some("h"));
        starting.ready = false;
        assert_eq!(first(&cluster(vec![starting]), &Policy::default(), 0), Err(NoPlace::NotReady));
        let e = crate::error::ApiError::from(RouteError::from(NoPlace::NoImage("python".into())));
        assert_eq!((e.status.as_u16(), e.code), (503, "no_node_available"));
        assert!(e.message.contains("python"));
    }

    #[test]
    fn cluster_and_owner_quotas_count_every_nodes_report() {
        let mut a = agent("0000000a", 2, Some("h"));
        a.owners.insert("o".into(), 2);
        let mut b = agent("0000000b", 1, Some("h"));
        b.owners.insert("p".into(), 1);
        let s = cluster(vec![a, b]);
        let policy = Policy { max_sessions: Some(3), ..Default::default() };
        assert_eq!(first(&s, &policy, 0), Err(NoPlace::ClusterFull(3)));
        let policy = Policy { max_per_owner: Some(2), ..Default::default() };
        assert_eq!(first(&s, &policy, 0), Err(NoPlace::OwnerQuota(2)));
        assert!(place(&s, &ask("p"), &policy, 0).is_ok(), "another owner still has room");
    }

    #[test]
    fn rendezvous_is_stable_and_moves_only_the_keys_of_a_removed_node() {
        let tags: Vec<NodeTag> =
            ["0000000a", "0000000b", "0000000c"].iter().map(|t| NodeTag::parse(t).unwrap()).collect();
        let keys: Vec<String> = (0..300).map(|i| user_key("owner", &format!("user{i}"))).collect();
        let before: Vec<NodeTag> = keys.iter().map(|k| rendezvous(k, tags.clone())[0]).collect();
        // Same inputs, any order: same answer.
        let reversed: Vec<NodeTag> = tags.iter().rev().copied().collect();
        assert!(keys.iter().zip(&before).all(|(k, b)| rendezvous(k, reversed.clone())[0] == *b));
        // Each node gets a fair share.
        for t in &tags {
            let n = before.iter().filter(|b| *b == t).count();
            assert!((60..=140).contains(&n), "{t}: {n}");
        }
        // Removing b moves only b's keys, each to its second choice.
        let without_b: Vec<NodeTag> = vec![tags[0], tags[2]];
        for (k, b) in keys.iter().zip(&before) {
            let after = rendezvous(k, without_b.clone())[0];
            if *b != tags[1] {
                assert_eq!(after, *b);
            } else {
                assert_eq!(after, rendezvous(k, tags.clone())[1]);
            }
        }
        assert_ne!(user_key("a", "b"), owner_key("a"));
    }
}
