//! End-to-end tests: the real service, the real Docker engine, real kernel images, real ZeroMQ.
//! One binary, one module per area; `helpers` has `spawn_app()`.

mod helpers;

mod abuse;
mod agent;
mod api_surface;
mod auto_restart;
mod busy_adoption;
mod cluster_local;
mod cluster_routing;
mod compat_jupyter;
mod compat_session;
mod compose;
mod datasets;
mod docs_page;
mod egress;
mod execute;
mod files;
mod fuzz;
mod gateway;
mod gateway_jupyter;
mod gateway_ws;
mod hostile;
mod languages;
mod lifecycle;
mod limits;
mod mcp;
mod notebooks;
mod output_cap;
mod packages;
mod pool;
mod process;
/// The cluster tests' round-robin balancer, for the in-process cluster's "one address".
#[allow(dead_code)]
#[path = "../cluster/harness/proxy.rs"]
mod proxy;
mod python_client;
mod requests_end_early;
mod runsc;
mod runtime_tree;
mod sandbox;
mod session_outputs;
mod sessions;
mod signed_urls;
mod stdin;
