//! Network by name for sessions that ask for it (issue 22): the egress proxy's rules. A session with an
//! allow-list still has no route but to the proxy; the proxy resolves names, and connects only where the
//! session's list and the operator's bounds allow. Built so far: the allow-list's grammar, the operator's
//! bounds and the match of a connection against them (`allow`), the addresses never reached once a name
//! is resolved (`addr`), and the server name read from a TLS ClientHello without terminating it (`sni`):
//! pure parts, below `session/`. The link between the service and the proxy, its opening line and its
//! events (`link`), used by both sides; the proxy role itself, `kernelbox egress-proxy` (`proxy`).

pub mod addr;
pub mod allow;
pub mod gate;
pub mod hub;
pub mod keeper;
pub mod link;
pub mod proxy;
pub mod session;
pub mod settings;
pub mod sni;
