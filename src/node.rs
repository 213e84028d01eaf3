//! What a node is to a cluster: its [`NodeTag`] (the 8 hex digits every id it hands out ends with), the
//! [`AgentInfo`] its agent reports on `GET /internal/v1/info`, and the headers an API replica and an agent
//! speak. A leaf: it imports nothing of the crate, so the session layer (which mints ids) and the cluster
//! layer (which routes by them) share it without an arrow running back up.
//!
//! Single-node `kernelbox serve` has no tag: its ids keep their shapes (24 random hex digits for a
//! session; a gateway kernel id ends in `00000000`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The header an API replica puts the caller's owner digest in, on its mutually authenticated link to an
/// agent (which trusts it there and nowhere else). A client's own copy is removed before forwarding.
pub const OWNER_HEADER: &str = "x-kernelbox-owner";
/// The agent's internal endpoint: its [`AgentInfo`].
pub const INFO_PATH: &str = "/internal/v1/info";
/// The name the API role's client certificate carries (as a URI SAN `kernelbox:role:api`).
pub const API_ROLE_URI: &str = "kernelbox:role:api";
/// The name the agent role's server certificate carries besides its DNS name.
pub const AGENT_ROLE_URI: &str = "kernelbox:role:agent";

/// Eight lowercase hex digits naming a node, never `00000000` (the single-node gateway suffix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeTag([u8; 8]);

impl NodeTag {
    /// The tag of a Swarm node: the first 8 hex digits of SHA-256 over its node ID (stable for as long as
    /// the node stays in the Swarm; a node that leaves and joins again gets a new ID, hence a new tag).
    pub fn from_node_id(node_id: &str) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, format!("kernelbox-node:{node_id}").as_bytes());
        let mut hex = hex::encode(&digest.as_ref()[..4]).into_bytes();
        if hex.iter().all(|&b| b == b'0') {
            hex[7] = b'1';
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&hex);
        NodeTag(tag)
    }

    /// Exactly 8 lowercase hex digits, not all zero.
    pub fn parse(s: &str) -> Option<Self> {
        let bytes = s.as_bytes();
        if bytes.len() != 8 || !bytes.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
            return None;
        }
        if bytes.iter().all(|&b| b == b'0') {
            return None;
        }
        let mut tag = [0u8; 8];
        tag.copy_from_slice(bytes);
        Some(NodeTag(tag))
    }

    /// The tag an id ends with (its last 8 characters), if they are one.
    pub fn suffix_of(id: &str) -> Option<Self> {
        id.len().checked_sub(8).and_then(|start| id.get(start..)).and_then(Self::parse)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits")
    }
}

impl std::fmt::Display for NodeTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for NodeTag {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for NodeTag {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        NodeTag::parse(&s).ok_or_else(|| serde::de::Error::custom("a node tag is 8 lowercase hex digits, not all zero"))
    }
}

/// What an agent reports about itself and its node, probed by every API replica every 2 s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub node_tag: NodeTag,
    /// The Swarm node ID the tag is derived from.
    pub node_id: String,
    /// A fresh random id per agent process: a change means the agent restarted.
    pub epoch: String,
    /// The binary's version.
    pub version: String,
    /// False until the agent holds its state directory's lock and has adopted what it found.
    pub ready: bool,
    /// Why not ready (or why some languages are unavailable), for people reading `/readyz` or logs.
    pub reasons: Vec<String>,
    pub capacity: Capacity,
    pub usage: Usage,
    /// Sessions per owner digest (for the API's soft per-owner quotas).
    pub owners: BTreeMap<String, u32>,
    /// Warm containers ready to be claimed, per language.
    pub warm: BTreeMap<String, u32>,
    /// Per language: the content hash of the image this node has, `None` when it has none.
    pub images: BTreeMap<String, Option<String>>,
    /// Per language with a pool: creates the pool served and those that found it empty, since the
    /// agent started (an older agent reports none).
    #[serde(default)]
    pub pools: BTreeMap<String, PoolCounts>,
}

/// A node's pool of one language, counted since its agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolCounts {
    pub hits: u64,
    pub misses: u64,
}

/// A node's limits, as its agent enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Capacity {
    pub max_sessions: u32,
    /// The most memory all sessions may reserve together, MiB.
    pub memory_mb: u64,
    /// The most CPUs all sessions may reserve together.
    pub cpus: f64,
}

/// What a node's sessions reserve now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub sessions: u32,
    pub memory_mb: u64,
    pub cpus: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_is_eight_lowercase_hex_digits_not_all_zero() {
        assert!(NodeTag::parse("0123abcd").is_some());
        for bad in ["00000000", "0123ABCD", "0123abc", "0123abcde", "0123abcg", ""] {
            assert_eq!(NodeTag::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_swarm_node_id_always_gives_the_same_valid_tag() {
        let a = NodeTag::from_node_id("k2n9x7d0q3w1e5r8t6y4u2i0o");
        assert_eq!(a, NodeTag::from_node_id("k2n9x7d0q3w1e5r8t6y4u2i0o"));
        assert_ne!(a, NodeTag::from_node_id("another-node"));
        assert_eq!(NodeTag::parse(a.as_str()), Some(a));
    }

    #[test]
    fn the_tag_of_an_id_is_its_last_eight_characters() {
        let tag = NodeTag::parse("89abcdef").unwrap();
        assert_eq!(NodeTag::suffix_of("0123456789abcdef89abcdef"), Some(tag));
        assert_eq!(NodeTag::suffix_of("cdef"), None);
        assert_eq!(NodeTag::suffix_of("0123456700000000"), None);
        assert_eq!(NodeTag::suffix_of("ééééééééé"), None);
    }

    #[test]
    fn info_round_trips_through_json() {
        let info = AgentInfo {
            node_tag: NodeTag::parse("0000abcd").unwrap(),
            node_id: "n".into(),
            epoch: "e".into(),
            version: "0.1.0".into(),
            ready: true,
            reasons: vec![],
            capacity: Capacity { max_sessions: 10, memory_mb: 4096, cpus: 2.0 },
            usage: Usage::default(),
            owners: BTreeMap::new(),
            warm: BTreeMap::from([("python".into(), 1)]),
            images: BTreeMap::from([("python".into(), Some("abc".into())), ("java".into(), None)]),
            pools: BTreeMap::from([("python".into(), PoolCounts { hits: 3, misses: 1 })]),
        };
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<AgentInfo>(&json).unwrap(), info);
    }
}
