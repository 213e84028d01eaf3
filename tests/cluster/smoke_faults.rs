//! The harness's other faults, on a cluster without images (fast): a frozen node (pause) and a cut-off
//! node (network disconnect) go Down at the manager and come back Ready; a container killed inside a
//! node through its own engine is gone. Timings are printed, not asserted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::ensure;
use bollard::models::{ContainerCreateBody, NodeState};
use bollard::query_parameters::CreateContainerOptionsBuilder;

use crate::harness::cluster::LABEL_RUN;
use crate::harness::images::{self, copy_image};
use crate::harness::{Cluster, run_id};

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_or_cut_off_node_goes_down_and_comes_back_and_a_container_in_a_node_can_be_killed()
-> anyhow::Result<()> {
    let _serial = crate::harness::one_cluster_at_a_time().await;
    let run = run_id();
    let cluster = Cluster::start(&run, 3).await?;
    let mut report = Vec::<(&str, Duration)>::new();
    let node3 = ["node3".to_owned()];
    let node2 = ["node2".to_owned()];

    let started = Instant::now();
    cluster.pause_node("node3").await?;
    cluster.wait_state(&node3, NodeState::DOWN, Duration::from_secs(60)).await?;
    report.push(("node3 paused → Down", started.elapsed()));
    let started = Instant::now();
    cluster.unpause_node("node3").await?;
    cluster.wait_ready(&node3, Duration::from_secs(60)).await?;
    report.push(("node3 unpaused → Ready", started.elapsed()));

    let started = Instant::now();
    cluster.disconnect_node("node2").await?;
    cluster.wait_state(&node2, NodeState::DOWN, Duration::from_secs(60)).await?;
    report.push(("node2 cut off → Down", started.elapsed()));
    let started = Instant::now();
    cluster.connect_node("node2").await?;
    cluster.wait_ready(&node2, Duration::from_secs(60)).await?;
    report.push(("node2 reconnected → Ready", started.elapsed()));

    // A process crash inside a node, through that node's own engine (the service image: the smallest
    // the tests move in).
    let (service_image, _) = images::ensure().await;
    copy_image(&cluster.host, service_image, std::slice::from_ref(&cluster.node("node2").docker)).await?;
    let engine = &cluster.node("node2").docker;
    let labels = HashMap::from([(LABEL_RUN.to_owned(), run.clone())]);
    let body = ContainerCreateBody {
        image: Some(service_image.clone()),
        entrypoint: Some(vec!["sleep".into(), "300".into()]),
        labels: Some(labels),
        ..Default::default()
    };
    let name = format!("kbtest-{run}-victim");
    engine.create_container(Some(CreateContainerOptionsBuilder::default().name(&name).build()), body).await?;
    engine.start_container(&name, None::<bollard::query_parameters::StartContainerOptions>).await?;
    let label = format!("{LABEL_RUN}={run}");
    ensure!(cluster.containers_in("node2", &[&label]).await?.len() == 1, "the victim runs in node2");
    cluster.kill_in_node("node2", &name).await?;
    let state = engine.inspect_container(&name, None).await?.state.unwrap_or_default();
    ensure!(state.running == Some(false), "killed inside node2: {state:?}");
    ensure!(cluster.containers_in("node2", &[&label]).await?.is_empty(), "no running victim left");

    let host = cluster.host.clone();
    cluster.cleanup().await?;
    ensure!(crate::harness::cluster::leftovers(&host, &run).await?.is_empty(), "the run left something");
    eprintln!("\n[cluster] fault timings of run {run}:");
    for (what, took) in &report {
        eprintln!("[cluster]   {what:<40} {:>6.1} s", took.as_secs_f64());
    }
    Ok(())
}
