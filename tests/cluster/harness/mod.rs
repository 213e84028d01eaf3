//! The multi-node test harness, driven through the Docker API only (no docker CLI):
//! - [`images`]: the node image (content-hashed, built once), the service image, moving images into nodes;
//! - [`cluster`]: `Cluster::start(run_id, n)`: nodes, network, Swarm, the clean-up guard;
//! - [`swarm`]: overlay, secrets, services, looking inside tasks;
//! - [`faults`]: kill, restart, pause, partition a node; kill a container inside one;
//! - [`proxy`]: the round-robin "one address" over the API replicas;
//! - [`stack`]: kernelbox deployed as `deploy/stack.yml` does, the scenario tests' starting point.
//!
//! A library for every cluster test: not each test uses each helper.
#![allow(dead_code)]

pub mod cluster;
pub mod faults;
pub mod images;
pub mod proxy;
pub mod stack;
pub mod swarm;

pub use cluster::Cluster;

/// A short id for one test run, put on everything it creates (`kernelbox.test=<run id>`).
pub fn run_id() -> String {
    format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}
