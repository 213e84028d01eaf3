//! The `kernelbox` command: `serve`, `images build`, `images list`, `cluster certs`, `egress-proxy`. Thin: parse,
//! set up logging, call the library.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches};
use kernelbox::config::{Cli, ClusterCommand, Command, ImageArgs, ImagesCommand, LogFormat, StateFolder};
use kernelbox::egress::proxy::ProxyArgs;
use kernelbox::images::Catalog;
use kernelbox::images::builder::{ImageBuilder, human_size, print_summary};
use kernelbox::images::context::{self, HostSettings, Source};
use kernelbox::runtime::ContainerRuntime;
use kernelbox::runtime::docker::DockerRuntime;
use kernelbox::session::{ManagerConfig, OutputCaps, Storage};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // `egress-proxy` joins config's commands here: its flags live with the proxy (egress/proxy/config.rs).
    let proxy = ProxyArgs::augment_args(clap::Command::new("egress-proxy"));
    let matches = Cli::command().subcommand(proxy).get_matches();
    if let Some(("egress-proxy", args)) = matches.subcommand() {
        kernelbox::telemetry::init(args.get_one::<LogFormat>("log_format").copied().unwrap_or(LogFormat::Json));
        return egress_proxy(ProxyArgs::from_arg_matches(args)?).await;
    }
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Serve(args) => {
            kernelbox::telemetry::init(cli.log_format);
            serve(*args).await
        }
        Command::Api(args) => {
            kernelbox::telemetry::init(cli.log_format);
            api(*args).await
        }
        Command::Agent(args) => {
            kernelbox::telemetry::init(cli.log_format);
            agent(*args).await
        }
        Command::Health { addr } => health(addr).await,
        Command::Images { command, images } => {
            kernelbox::telemetry::init(LogFormat::Pretty);
            let builder = image_builder(&images).await?;
            match command {
                ImagesCommand::Build { languages, no_cache } => {
                    let mut err = std::io::stderr();
                    let summaries = builder.build(&languages, no_cache, &mut err).await?;
                    print_summary(&summaries, &mut std::io::stdout());
                }
                ImagesCommand::List => {
                    let mut out = std::io::stdout();
                    writeln!(out, "{:<18} {:<40} {:<11} {:>9}  BUILT", "IMAGE", "TAG", "STATE", "SIZE")?;
                    for row in builder.status().await? {
                        writeln!(
                            out,
                            "{:<18} {:<40} {:<11} {:>9}  {}",
                            row.image,
                            row.tag,
                            row.state,
                            human_size(row.size_bytes),
                            row.created
                        )?;
                    }
                }
            }
            Ok(())
        }
        Command::Cluster { command: ClusterCommand::Certs { out, agent_name, days } } => {
            let certs = kernelbox::cluster::certs::ClusterCerts::generate(&agent_name, days)?;
            for path in certs.write(&out)? {
                println!("{}", path.display());
            }
            eprintln!(
                "Give agents ca.pem, agent.pem and agent-key.pem, API replicas ca.pem, api.pem and api-key.pem \
                 (as secrets); keep ca-key.pem offline, for the next certificates."
            );
            Ok(())
        }
    }
}

/// `kernelbox api`: a replica that routes every request to the agents.
async fn api(args: kernelbox::config::ApiArgs) -> anyhow::Result<()> {
    use kernelbox::cluster::api_role::{ApiRole, ApiRoleSettings};
    use kernelbox::cluster::membership::{Discovery, MembershipConfig, PROBE_TIMEOUT};
    use kernelbox::cluster::placement::Policy;
    use kernelbox::config::AgentSource;
    args.check_exposure()?;
    args.check_limits()?;
    let discovery = match args.agent_source()? {
        AgentSource::Dns { name, port } => Discovery::Dns { name, port },
        AgentSource::Static(addrs) => Discovery::Static(addrs),
    };
    let settings = ApiRoleSettings {
        api_keys: args.api_keys.clone(),
        http: args.http.validate()?,
        discovery,
        membership: MembershipConfig { lost_after: args.lost_after(), probe_timeout: PROBE_TIMEOUT },
        policy: Policy {
            expected: args.expected_images()?,
            max_sessions: args.max_sessions,
            max_per_owner: Some(args.max_sessions_per_owner),
        },
        default_memory_mb: args.default_memory_mb,
        default_cpus: args.default_cpus,
    };
    let transport = cluster_link(&args)?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let replica = ApiRole::build(listener, settings, transport).await;
    let addr = replica.local_addr()?;
    tracing::info!(%addr, "kernelbox api replica is serving");
    eprintln!("kernelbox api replica is serving on http://{addr}");
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        trigger.cancel();
    });
    replica.run_until_stopped(shutdown).await;
    Ok(())
}

/// The mutually authenticated link to the agents (`--cluster-ca/--cluster-cert/--cluster-key`,
/// `--agent-server-name`): `cluster::link`, adapted to `AgentTransport` where the TLS piece is merged.
fn cluster_link(
    args: &kernelbox::config::ApiArgs,
) -> anyhow::Result<Arc<dyn kernelbox::cluster::transport::AgentTransport>> {
    let (Some(ca), Some(cert), Some(key)) = (&args.cluster_ca, &args.cluster_cert, &args.cluster_key) else {
        anyhow::bail!(
            "the api role needs --cluster-ca, --cluster-cert and --cluster-key (see `kernelbox cluster certs`)"
        );
    };
    let files = kernelbox::cluster::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
    let tls = kernelbox::cluster::api_client_config(&files)?;
    let link = kernelbox::cluster::AgentLink::new(tls, &args.agent_server_name)
        .with_context(|| format!("--agent-server-name {:?}", args.agent_server_name))?;
    Ok(Arc::new(link))
}

/// A dependency-free HTTP probe, so the service image needs no curl.
async fn health(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let probe = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), probe).await.context("no answer within 5 s")??;
    let head = String::from_utf8_lossy(&response);
    anyhow::ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "unhealthy: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(())
}

async fn image_builder(args: &ImageArgs) -> anyhow::Result<ImageBuilder> {
    let runtime = DockerRuntime::connect()?;
    runtime.ping().await.context("is Docker running, and may this user use it?")?;
    let settings = HostSettings {
        apt_mirror: args.apt_mirror.clone().or_else(context::detect_apt_mirror),
        pip_index_url: args.pip_index_url.clone().or_else(context::detect_pip_index),
        extra_ca: context::detect_extra_ca(args.extra_ca_bundle.as_deref()).context("reading the extra CA bundle")?,
    };
    Ok(ImageBuilder {
        runtime: Arc::new(runtime),
        catalog: Catalog::new(&args.image_prefix),
        source: args.images_dir.clone().map(Source::Dir).unwrap_or(Source::Embedded),
        settings,
        base_image: args.base_image.clone(),
    })
}

/// Checks the flags `serve` and `agent` share, builds missing images, and makes the library's settings.
async fn prepare(args: &kernelbox::config::ServeArgs) -> anyhow::Result<(kernelbox::Settings, ImageBuilder)> {
    let limits = args.limits.validate()?;
    let packages = args.packages.validate(args.images.pip_index_url.clone().or_else(context::detect_pip_index))?;
    let http = args.http.validate()?;
    let files = args.files.validate()?;
    let links = args.links.validate()?;
    let pool = args.pool_config()?;
    if let Some(StateFolder::At(dir)) = &args.datasets_dir {
        // Docker would create a missing bind source as an empty root-owned folder: say so instead.
        anyhow::ensure!(
            dir.is_absolute() && dir.is_dir(),
            "--datasets-dir {}: not an existing absolute folder",
            dir.display()
        );
    }
    anyhow::ensure!(
        args.user_output_max_mb >= 1 && args.user_output_max_files >= 1,
        "--user-output-max-mb and --user-output-max-files must be at least 1"
    );
    if args.instance.is_empty() || !args.instance.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        anyhow::bail!("--instance may only contain letters, digits, '-' and '_'");
    }
    let builder = image_builder(&args.images).await?;
    if !args.no_build {
        eprintln!("Checking kernel images (a first build takes several minutes)...");
        let mut err = std::io::stderr();
        let summaries = builder.build(&[], false, &mut err).await.context("building the kernel images")?;
        print_summary(&summaries, &mut err);
    }
    let settings = kernelbox::Settings {
        manager: ManagerConfig {
            limits,
            state_dir: args.state_dir.clone(),
            instance: args.instance.clone(),
            catalog: Catalog::new(&args.images.image_prefix),
            keep_sessions: args.keep_sessions,
            packages,
            storage: Storage {
                notebooks_dir: args.notebooks_dir.clone(),
                notebooks_public_path: args.notebooks_public_path.clone(),
                datasets: args.datasets_dir.clone().unwrap_or_default(),
                runtimes: args.runtimes_dir.clone().unwrap_or_default(),
                user_output: OutputCaps {
                    max_bytes: args.user_output_max_mb.saturating_mul(1 << 20),
                    max_files: args.user_output_max_files,
                },
            },
            pool,
            node: None,
            fencing: None,
            egress: args.egress.validate()?,
        },
        api_keys: args.api_keys.clone(),
        http,
        files,
        links,
        shutdown_grace: Duration::from_secs(10),
    };
    Ok((settings, builder))
}

/// `kernelbox egress-proxy`: serves until Ctrl-C or SIGTERM.
async fn egress_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let config = args.validate()?;
    let stop = stop_on_signal();
    tokio::select! {
        ran = kernelbox::egress::proxy::run(config) => ran,
        () = stop.cancelled() => Ok(()),
    }
}

/// A token cancelled by Ctrl-C or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        trigger.cancel();
    });
    shutdown
}

async fn serve(args: kernelbox::config::ServeArgs) -> anyhow::Result<()> {
    args.check_exposure()?;
    let (settings, builder) = prepare(&args).await?;
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    if args.api_keys.iter().all(|k| k.trim().is_empty()) {
        if addr.ip().is_loopback() {
            tracing::warn!("no API keys configured: listening on loopback only, and every caller is the same owner");
        } else {
            tracing::warn!("no API keys configured and --insecure-no-auth set: anyone who reaches {addr} can run code");
        }
    }
    tracing::info!(%addr, docs = %format!("http://{addr}/docs"), "kernelbox is serving");
    eprintln!("kernelbox is serving on http://{addr} (interactive docs: http://{addr}/docs)");
    kernelbox::run(listener, settings, builder.runtime.clone(), stop_on_signal()).await?;
    Ok(())
}

/// `kernelbox agent`: the node's service, for API replicas over mutual TLS; `--listen` serves health only.
async fn agent(args: kernelbox::config::AgentArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.serve.api_keys.iter().all(|k| k.trim().is_empty()),
        "an agent takes no API keys: API replicas check them and name the owner"
    );
    let (Some(ca), Some(cert), Some(key)) = (&args.cluster_ca, &args.cluster_cert, &args.cluster_key) else {
        anyhow::bail!("an agent needs --cluster-ca, --cluster-cert and --cluster-key (see `kernelbox cluster certs`)");
    };
    let files = kernelbox::cluster::TlsFiles { ca: ca.clone(), cert: cert.clone(), key: key.clone() };
    let tls = kernelbox::cluster::agent_server_config(&files)?;
    let (settings, builder) = prepare(&args.serve).await?;
    let header_read_timeout = settings.http.header_read_timeout;
    let cluster = tokio::net::TcpListener::bind(args.cluster_listen)
        .await
        .with_context(|| format!("binding {}", args.cluster_listen))?;
    let health = tokio::net::TcpListener::bind(args.serve.listen)
        .await
        .with_context(|| format!("binding {}", args.serve.listen))?;
    let agent_settings =
        kernelbox::agent::AgentSettings { node_id: args.node_id.clone(), lost_after: args.lost_after() };
    let app =
        kernelbox::agent::AgentApplication::new(health, settings, agent_settings, builder.runtime.clone()).await?;
    tracing::info!(node_tag = %app.node_tag(), cluster = %args.cluster_listen, "kernelbox agent starting");
    // The cluster router is served over mutual TLS only, never plain: it trusts the owner header.
    let shutdown = stop_on_signal();
    let serving =
        kernelbox::cluster::serve_mtls(cluster, app.cluster_router(), tls, shutdown.clone(), header_read_timeout);
    app.run_until_stopped(shutdown, tokio::spawn(serving)).await?;
    Ok(())
}
