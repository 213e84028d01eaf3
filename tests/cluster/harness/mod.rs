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

/// One cluster at a time: three docker-in-docker nodes are most of what two cores can run, and the fault
/// scenarios watch how fast a replica notices a dead node, which a second cluster starting beside them
/// would slow down for reasons of its own. Held for a whole test (an async mutex: no poisoning, and it
/// works across the tests' own runtimes).
pub async fn one_cluster_at_a_time() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

/// A short id for one test run, put on everything it creates (`kernelbox.test=<run id>`).
pub fn run_id() -> String {
    format!("c{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}
