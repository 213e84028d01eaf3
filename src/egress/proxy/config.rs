//! The egress proxy's flags (`kernelbox egress-proxy`, every one with a `KERNELBOX_EGRESS_*` twin) and
//! their checked form. The link token is read from the environment only (`KERNELBOX_EGRESS_TOKEN`): a
//! flag would show in `ps`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::Args;
use ipnet::IpNet;

use crate::egress::addr;
use crate::egress::allow::{HostPattern, NetworkPolicy, normalize_host};

/// The environment variable the link token is read from.
pub const TOKEN_ENV: &str = "KERNELBOX_EGRESS_TOKEN";
/// The shortest token the proxy accepts.
pub const MIN_TOKEN_LEN: usize = 32;
/// The reserved top-level domain (RFC 2606) of the names `--test-names` may override: never a real name.
pub(super) const TEST_TLD: &str = ".test";

/// Serve as the egress proxy: the only process that reaches the outside for sessions (in its own
/// container; the service starts it).
#[derive(Clone, Args)]
pub struct ProxyArgs {
    /// Where the service connects (its link connections and the events stream).
    #[arg(long, env = "KERNELBOX_EGRESS_LISTEN", default_value = "0.0.0.0:3128")]
    pub listen: SocketAddr,
    /// Names no session may reach, whatever its list says (`example.com`, `*.example.com`; commas).
    #[arg(long, env = "KERNELBOX_EGRESS_FORBID", default_value = "")]
    pub forbid: String,
    /// The longest allow-list a session may have.
    #[arg(long, env = "KERNELBOX_EGRESS_MAX_ALLOW", default_value_t = 64)]
    pub max_allow: usize,
    /// Address ranges the proxy may connect to although they are private, loopback or link-local, and
    /// that sessions may name as addresses (`10.1.2.0/24`; commas). None by default.
    #[arg(long, env = "KERNELBOX_EGRESS_ALLOW_CIDR", default_value = "")]
    pub allow_cidr: String,
    /// For tests only: names under the reserved `.test` domain resolved to the given addresses
    /// (`allowed.test=127.0.0.1`; commas). The address checks still apply.
    #[arg(long, env = "KERNELBOX_EGRESS_TEST_NAMES", default_value = "", hide = true)]
    pub test_names: String,
    /// How long resolving a name and connecting to it may take, seconds.
    #[arg(long, env = "KERNELBOX_EGRESS_CONNECT_TIMEOUT_S", default_value_t = 10)]
    pub connect_timeout_s: u64,
    /// How long a client may take to send its request head, and then its TLS ClientHello, seconds.
    #[arg(long, env = "KERNELBOX_EGRESS_HEAD_TIMEOUT_S", default_value_t = 10)]
    pub head_timeout_s: u64,
    /// A connection with no byte either way for this long is closed, seconds.
    #[arg(long, env = "KERNELBOX_EGRESS_IDLE_TIMEOUT_S", default_value_t = 120)]
    pub idle_timeout_s: u64,
    /// Bytes one connection may move, both ways together.
    #[arg(long, env = "KERNELBOX_EGRESS_MAX_CONN_BYTES", default_value_t = 1 << 30)]
    pub max_conn_bytes: u64,
    /// Link connections open at once, all sessions together; beyond it new ones are closed at once.
    /// (Its own variable: the service's `KERNELBOX_EGRESS_MAX_CONNECTIONS` is per session.)
    #[arg(long, env = "KERNELBOX_EGRESS_PROXY_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// The link token, from `KERNELBOX_EGRESS_TOKEN` only (never a flag).
    #[arg(skip = std::env::var(TOKEN_ENV).ok())]
    pub token: Option<String>,
}

impl fmt::Debug for ProxyArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyArgs")
            .field("listen", &self.listen)
            .field("forbid", &self.forbid)
            .field("max_allow", &self.max_allow)
            .field("allow_cidr", &self.allow_cidr)
            .field("test_names", &self.test_names)
            .field("connect_timeout_s", &self.connect_timeout_s)
            .field("head_timeout_s", &self.head_timeout_s)
            .field("idle_timeout_s", &self.idle_timeout_s)
            .field("max_conn_bytes", &self.max_conn_bytes)
            .field("max_connections", &self.max_connections)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The link token: the service's secret, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// Checks a token: at least [`MIN_TOKEN_LEN`] visible ASCII characters, no space (it is one word of
    /// the opening line).
    pub fn new(token: String) -> Result<Token, ConfigError> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(ConfigError::TokenTooShort);
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::TokenCharacters);
        }
        Ok(Token(token))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The proxy's checked settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Where to listen for the service's link connections.
    pub listen: SocketAddr,
    /// The secret every opening line must carry.
    pub token: Token,
    /// The operator's bounds: lists are checked against them, forbidden names never reached.
    pub policy: NetworkPolicy,
    /// The ranges the operator opens: reached although inside, nameable as addresses.
    pub opened: Vec<IpNet>,
    /// `.test` names and the addresses they resolve to (tests only; never a real name).
    pub test_names: BTreeMap<String, IpAddr>,
    /// Resolving a name, and then connecting, each within this.
    pub connect_timeout: Duration,
    /// The opening line, the request head, and the TLS ClientHello, each within this.
    pub head_timeout: Duration,
    /// No byte either way for this long closes a connection.
    pub idle_timeout: Duration,
    /// Bytes one connection may move, both ways together.
    pub max_conn_bytes: u64,
    /// Link connections open at once (all sessions, and the events stream).
    pub max_connections: usize,
}

/// Why the proxy's flags are refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{TOKEN_ENV} is not set: the proxy serves only the service, which shares this secret with it")]
    TokenMissing,
    #[error("{TOKEN_ENV} is too short: at least {MIN_TOKEN_LEN} characters")]
    TokenTooShort,
    #[error("{TOKEN_ENV} may only hold visible ASCII characters, no spaces")]
    TokenCharacters,
    #[error("--forbid: `{entry}`: {why}")]
    Forbid { entry: String, why: &'static str },
    #[error("--allow-cidr: {0}")]
    AllowCidr(String),
    #[error("--test-names: `{entry}`: {why}")]
    TestName { entry: String, why: &'static str },
    #[error("--{flag} must be at least 1")]
    Zero { flag: &'static str },
}

impl ProxyArgs {
    /// Checks the flags and the token into the proxy's settings.
    pub fn validate(&self) -> Result<ProxyConfig, ConfigError> {
        let token = Token::new(self.token.clone().ok_or(ConfigError::TokenMissing)?)?;
        let forbidden = split(&self.forbid)
            .map(|f| HostPattern::parse(f).map_err(|why| ConfigError::Forbid { entry: f.to_owned(), why }))
            .collect::<Result<Vec<_>, _>>()?;
        let opened = addr::parse_cidrs(&self.allow_cidr).map_err(ConfigError::AllowCidr)?;
        let test_names = parse_test_names(&self.test_names)?;
        for (flag, value) in [
            ("max-allow", self.max_allow as u64),
            ("connect-timeout-s", self.connect_timeout_s),
            ("head-timeout-s", self.head_timeout_s),
            ("idle-timeout-s", self.idle_timeout_s),
            ("max-conn-bytes", self.max_conn_bytes),
            ("max-connections", self.max_connections as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { flag });
            }
        }
        Ok(ProxyConfig {
            listen: self.listen,
            token,
            policy: NetworkPolicy { enabled: true, max_entries: self.max_allow, forbidden },
            opened,
            test_names,
            connect_timeout: Duration::from_secs(self.connect_timeout_s),
            head_timeout: Duration::from_secs(self.head_timeout_s),
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            max_conn_bytes: self.max_conn_bytes,
            max_connections: self.max_connections,
        })
    }
}

/// The non-empty items of a comma list.
fn split(text: &str) -> impl Iterator<Item = &str> {
    text.split(',').map(str::trim).filter(|item| !item.is_empty())
}

/// `name=address,...`, names only under `.test`, which no real name can be.
pub fn parse_test_names(text: &str) -> Result<BTreeMap<String, IpAddr>, ConfigError> {
    let mut names = BTreeMap::new();
    for item in split(text) {
        let refuse = |why| ConfigError::TestName { entry: item.to_owned(), why };
        let (name, address) = item.split_once('=').ok_or_else(|| refuse("not `name=address`"))?;
        let name = normalize_host(name.trim()).ok_or_else(|| refuse("not a host name"))?;
        if !name.ends_with(TEST_TLD) {
            return Err(refuse("only names under the reserved .test domain may be overridden"));
        }
        let address = address.trim().parse().map_err(|_| refuse("not an address"))?;
        if names.insert(name, address).is_some() {
            return Err(refuse("the name is given twice"));
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        proxy: ProxyArgs,
    }

    fn parse(args: &[&str]) -> ProxyArgs {
        let mut args = Cli::try_parse_from(std::iter::once("kb").chain(args.iter().copied())).unwrap().proxy;
        args.token = Some("t".repeat(MIN_TOKEN_LEN));
        args
    }

    #[test]
    fn the_defaults_make_a_proxy_with_everything_closed() {
        let config = parse(&[]).validate().unwrap();
        assert_eq!(config.listen, "0.0.0.0:3128".parse().unwrap());
        assert!(config.policy.enabled && config.policy.forbidden.is_empty());
        assert_eq!(config.policy.max_entries, 64);
        assert!(config.opened.is_empty() && config.test_names.is_empty());
        assert_eq!((config.max_conn_bytes, config.max_connections), (1 << 30, 1024));
        assert_eq!(config.idle_timeout, Duration::from_secs(120));
        assert!(!format!("{config:?}").contains("tttt"), "the token is never printed");
    }

    #[test]
    fn the_operators_lists_are_checked() {
        let config = parse(&[
            "--forbid",
            "*.internal.example, metadata.google.internal",
            "--allow-cidr",
            "10.1.0.0/16",
            "--test-names",
            "allowed.test=127.0.0.1,Rebind.Test.=10.255.255.1",
        ])
        .validate()
        .unwrap();
        assert_eq!(config.policy.forbidden.len(), 2);
        assert_eq!(config.opened, vec!["10.1.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(config.test_names.get("rebind.test"), Some(&"10.255.255.1".parse().unwrap()));
        for (bad, says) in [
            (&["--forbid", "*"][..], "--forbid"),
            (&["--allow-cidr", "10.0.0.0/33"], "--allow-cidr"),
            (&["--test-names", "pypi.org=10.0.0.1"], ".test"),
            (&["--test-names", "allowed.test=nowhere"], "not an address"),
            (&["--test-names", "allowed.test"], "name=address"),
            (&["--test-names", "a.test=1.1.1.1,a.test=1.1.1.2"], "twice"),
            (&["--idle-timeout-s", "0"], "--idle-timeout-s"),
            (&["--max-connections", "0"], "--max-connections"),
        ] {
            let err = parse(bad).validate().unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_token_comes_from_the_environment_and_is_long() {
        let mut args = parse(&[]);
        args.token = None;
        assert_eq!(args.validate().unwrap_err(), ConfigError::TokenMissing);
        args.token = Some("short".into());
        assert_eq!(args.validate().unwrap_err(), ConfigError::TokenTooShort);
        args.token = Some(format!("{} x", "t".repeat(MIN_TOKEN_LEN)));
        assert_eq!(args.validate().unwrap_err(), ConfigError::TokenCharacters);
        assert!(Cli::try_parse_from(["kb", "--token", "x"]).is_err(), "no flag for it");
    }
}
