//! `ambit agent`: wires the configuration source, the kernel side, enrolment, proxy and admin.
use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use anyhow::Context as _;
use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::{error, info};

use crate::{
    admin::{self, AdminState},
    discovery::{self, ConfigStatus, kube::KubeSource},
    enrolment::{Enrolment, EnrolmentStatus},
    handover::{self, Role},
    identity::{
        BearerToken, CaClient, CaClientConfig, CertificateManager, ManagerConfig,
        client::DEFAULT_CA_TIMEOUT,
    },
    limits::{self, LimitSettings, Limits},
    proxy::{
        ProxyContext,
        admission::{self, OpenConnections},
    },
    redirect::{RedirectConfig, Redirector},
    state::MeshState,
    telemetry::{self, Metrics},
};
use crate::{
    discovery::metrics::ConfigMetrics, enrolment::metrics::EnrolmentMetrics,
    identity::metrics::CertificateMetrics, limits::metrics::LimitMetrics,
    proxy::metrics::ProxyMetrics, redirect::metrics::RedirectMetrics,
};

/// Flags of `ambit agent`.
#[derive(Clone, Debug, clap::Args)]
// Exactly one configuration source.
#[command(group(clap::ArgGroup::new("source").required(true).args(["mesh_file", "kube"])))]
pub struct AgentArgs {
    /// The node this agent serves: only workloads placed on it are enrolled.
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Standalone mode: the YAML mesh file to load and watch.
    #[arg(long, env = "AMBIT_MESH_FILE")]
    pub mesh_file: Option<PathBuf>,
    /// Kubernetes mode: watch pods, namespaces, services, EndpointSlices and Ambit's policies
    /// through the API server (in-cluster credentials, or `--kubeconfig`).
    #[arg(long, env = "AMBIT_KUBE")]
    pub kube: bool,
    /// Kubernetes mode: the kubeconfig file to use instead of the in-cluster ServiceAccount.
    // Not `requires = "kube"`: the flag's default (false) would satisfy it.
    #[arg(long, conflicts_with = "mesh_file")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the namespace Ambit is installed in, whose policies apply mesh-wide
    /// (Istio's root namespace).
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = discovery::kube::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Kubernetes mode: the SPIFFE trust domain of the mesh (the mesh file names its own).
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = crate::policy::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// cgroup v2 directory at which to attach the socket programs [default: the cgroup2 mount].
    #[arg(long, env = "AMBIT_CGROUP")]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory where links and maps are pinned (they outlive the agent: fail closed).
    #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf/ambit")]
    pub bpffs: PathBuf,
    /// The Unix socket the CNI plugin (`ambit-cni`) asks to enrol new pods on (root only). The
    /// sandboxes it announced are kept beside it (`cni-sandboxes.json`), for the next agent.
    #[arg(long, env = "AMBIT_CNI_SOCKET", default_value = ambit_cni::protocol::DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    /// Admin endpoint (config dump); keep it on loopback.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Readiness endpoint (`GET /healthz/ready`).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Prometheus metrics endpoint (`GET /metrics`), ztunnel's port.
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// The CA that signs this node's workload certificates, e.g. `https://ambit-ca:15012`.
    /// Without a CA the agent holds no identity and refuses traffic between enrolled pods
    /// (never sends it in the clear).
    #[arg(long, env = "AMBIT_CA_ADDRESS", requires_all = ["ca_roots", "ca_token_file"])]
    pub ca_address: Option<String>,
    /// The trust bundle (PEM roots): verifies the CA and every peer's certificate. Re-read on
    /// each fetch, so a second root can be added for a rotation without a restart.
    #[arg(long, env = "AMBIT_CA_ROOTS")]
    pub ca_roots: Option<PathBuf>,
    /// File holding this node's bootstrap token for the CA.
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    pub ca_token_file: Option<PathBuf>,
    /// The name the CA's certificate must carry [default: the host of --ca-address].
    #[arg(long, env = "AMBIT_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// Lifetime asked for workload certificates (renewed at half-life).
    #[arg(long, env = "AMBIT_CERT_TTL", default_value = "24h", value_parser = crate::timefmt::parse_duration)]
    pub cert_ttl: std::time::Duration,
    /// Most proxied connections the agent holds at once, all pods together [default: what the
    /// descriptor limit allows: (RLIMIT_NOFILE - reserve) / 2].
    #[arg(long, env = "AMBIT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most proxied connections one source address may hold at once: a pod's outbound ones, or
    /// a peer's inbound connections and tunnels [default: a quarter of --max-connections].
    #[arg(long, env = "AMBIT_MAX_CONNECTIONS_PER_SOURCE")]
    pub max_connections_per_source: Option<usize>,
    /// Memory, in MiB, the relay's read buffers may hold beyond their smallest size, all
    /// connections together; the connections of one source address may hold a quarter. Past
    /// it connections read with smaller buffers: slower, never refused [default: 64].
    #[arg(long, env = "AMBIT_MAX_RELAY_BUFFER_MIB")]
    pub max_relay_buffer_mib: Option<usize>,
    /// The HBONE connection pool of every pod (`--hbone-max-streams-per-connection`).
    #[command(flatten)]
    pub pool: crate::hbone::PoolArgs,
    /// Threads that run the agent's proxy, as ztunnel's `ZTUNNEL_WORKER_THREADS` [default: one
    /// per CPU the agent may use].
    #[arg(long, env = "AMBIT_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Carry connections between two pods of this node without HBONE: authorized as the
    /// inbound path would, then relayed by the agent without TLS, or spliced in the kernel with
    /// `--max-spliced-connections` (`false`: HBONE, as across nodes, and the splice program is
    /// not loaded). When a splice was asked for and the kernel cannot splice (the agent's
    /// start-up self-test), the agent warns and relays.
    #[arg(
        long,
        env = "AMBIT_SAME_NODE_FAST_PATH",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub same_node_fast_path: bool,
    /// Most same-node connections spliced in the kernel at once; one source pod may hold a
    /// quarter of them, and the rest of its connections are relayed by the agent. 0 (the
    /// default) relays every one and loads no splice: measured faster on every load but small
    /// requests on a saturated node, at the cost of the agent's CPU; and the splice does not
    /// bound the kernel memory a fast sender can queue (docs/security.md): trusted pods only.
    #[arg(long, env = "AMBIT_MAX_SPLICED_CONNECTIONS", default_value_t = 0, value_parser = max_spliced)]
    pub max_spliced_connections: usize,
    /// After a successor agent took over this node, how long this agent keeps serving the
    /// connections it holds once told to stop (SIGTERM) before it closes them; it exits as soon
    /// as the last one ends. Keep the pod's terminationGracePeriodSeconds above it. An agent
    /// stopped without a successor exits at once (its pods fail closed).
    #[arg(long, env = "AMBIT_TERMINATION_GRACE_PERIOD", default_value = "30s", value_parser = crate::timefmt::parse_duration)]
    pub termination_grace_period: std::time::Duration,
}

/// `--max-spliced-connections`: no more than the kernel maps hold.
fn max_spliced(value: &str) -> Result<usize, String> {
    let max = ambit_common::limits::MAX_SPLICED as usize;
    match value.parse::<usize>() {
        Ok(n) if n <= max => Ok(n),
        Ok(n) => Err(format!("{n} is more than the splice maps hold ({max})")),
        Err(err) => Err(format!("{value:?}: {err}")),
    }
}

/// Raises the descriptor limit and derives the connection limits from it and the flags.
fn connection_limits(args: &AgentArgs) -> anyhow::Result<Arc<Limits>> {
    let nofile = limits::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let settings = LimitSettings::for_descriptors(nofile.soft)
        .with_flags(args.max_connections, args.max_connections_per_source)?
        .with_relay_buffer_mib(args.max_relay_buffer_mib)?;
    info!(
        descriptors = nofile.soft,
        descriptors_at_start = nofile.before,
        max_connections = settings.max_connections,
        max_connections_per_source = settings.max_connections_per_source,
        max_relay_buffer_bytes = settings.max_relay_buffer_bytes,
        "connection limits"
    );
    // Below containerd's default: fine for a test bed, tight for a busy node.
    if nofile.soft < 65_536 {
        tracing::warn!(
            descriptors = nofile.soft,
            "RLIMIT_NOFILE (hard limit {}) allows only {} proxied connections; raise it for a busy \
             node (LimitNOFILE, the container runtime's ulimits)",
            nofile.hard,
            settings.max_connections
        );
    }
    Ok(Arc::new(Limits::new(settings)))
}

/// The certificate manager, when a CA is configured.
fn certificate_manager(args: &AgentArgs) -> anyhow::Result<Option<Arc<CertificateManager>>> {
    let Some(address) = args.ca_address.clone() else {
        tracing::warn!(
            "no --ca-address: no workload identities, traffic between enrolled pods will be refused"
        );
        return Ok(None);
    };
    let roots_file = args
        .ca_roots
        .clone()
        .context("--ca-roots is required with --ca-address")?;
    let token_file = args
        .ca_token_file
        .as_deref()
        .context("--ca-token-file is required with --ca-address")?;
    let client = CaClient::new(CaClientConfig {
        address,
        server_name: args.ca_server_name.clone(),
        roots_file,
        token: BearerToken::from_file(token_file)
            .with_context(|| format!("reading --ca-token-file {}", token_file.display()))?,
        timeout: DEFAULT_CA_TIMEOUT,
    })
    .context("configuring the CA client")?;
    Ok(Some(Arc::new(CertificateManager::new(
        client,
        ManagerConfig {
            ttl: args.cert_ttl,
            ..Default::default()
        },
    ))))
}

/// Writes a Warning Event regarding each pod this agent closes (its enrolment failed with its
/// namespace present), once per closing: kubectl describe shows why the pod has no traffic.
/// Likewise for each pod whose capture exclusions were refused (a bad annotation value) or
/// could not be applied, once per reason: it has none, all its traffic is captured.
async fn report_closed_pods(
    client: kube::Client,
    node: String,
    mut status: watch::Receiver<EnrolmentStatus>,
) {
    use crate::discovery::kube::events::{self, EventReport};
    let mut reported = std::collections::BTreeSet::new();
    let mut reported_refused = std::collections::BTreeMap::new();
    loop {
        let (closed, failed, refused) = {
            let status = status.borrow_and_update();
            (
                status.closed.clone(),
                status.failed.clone(),
                status.exclusions_refused.clone(),
            )
        };
        for uid in closed.difference(&reported) {
            let Some((namespace, name)) = uid.split_once('/') else {
                continue;
            };
            let why = failed.get(uid).cloned().unwrap_or_default();
            let report = EventReport {
                regarding: events::regarding_pod(namespace, name),
                action: "Enrol",
                reason: "MeshEnrolmentFailed",
                note: format!(
                    "ambit agent on {node}: the pod is closed (inbound dropped, outbound refused) \
                     until its enrolment succeeds: {why}"
                ),
                warning: true,
                controller: "ambit.dev/agent",
                instance: &node,
            };
            events::emit(&client, report).await;
        }
        reported = closed;
        for (uid, why) in &refused {
            if reported_refused.get(uid) == Some(why) {
                continue;
            }
            let Some((namespace, name)) = uid.split_once('/') else {
                continue;
            };
            let report = EventReport {
                regarding: events::regarding_pod(namespace, name),
                action: "Enrol",
                reason: "CaptureExclusionsRefused",
                note: format!(
                    "ambit agent on {node}: pod {uid}: no capture exclusions applied, all its \
                     traffic is captured: {why}"
                ),
                warning: true,
                controller: "ambit.dev/agent",
                instance: &node,
            };
            events::emit(&client, report).await;
        }
        reported_refused = refused;
        if status.changed().await.is_err() {
            return;
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let limits = connection_limits(&args)?;
    let cgroup = match args.cgroup.clone() {
        Some(cgroup) => cgroup,
        None => crate::redirect::cgroup2_mount()?,
    };
    let redirector = Arc::new(Redirector::load(RedirectConfig {
        cgroup: cgroup.clone(),
        bpffs: args.bpffs.clone(),
        max_spliced: args.max_spliced_connections,
        fast_path: args.same_node_fast_path,
    })?);
    // Where loading had to parse the kernel's BTF (redirect::object), give those pages back
    // now rather than over seconds.
    crate::allocator::return_freed_memory();
    tokio::spawn(crate::redirect::keep_node_addresses(redirector.clone()));
    // Each subsystem's metrics, in one registry.
    let metrics = Arc::new(Metrics::new());
    metrics.register_at_scrape(Arc::new(RedirectMetrics::new(Some(redirector.clone()))?))?;
    metrics.register_at_scrape(Arc::new(LimitMetrics::new(Some(limits.clone()))?))?;
    let proxy_metrics = Arc::new(ProxyMetrics::new(&metrics)?);

    let (state_tx, state_rx) = watch::channel(Arc::new(MeshState::empty()));
    let (config_tx, mut config_rx) = watch::channel(ConfigStatus::default());
    // Kubernetes mode: the client also writes the Events about pods this agent had to close.
    let mut kube_client = None;
    let mut source = match &args.mesh_file {
        Some(mesh_file) => tokio::spawn(discovery::watch_mesh_file(
            mesh_file.clone(),
            state_tx,
            config_tx,
        )),
        None => {
            let client = discovery::kube::client(args.kubeconfig.as_deref()).await?;
            kube_client = Some(client.clone());
            let kube = KubeSource::new(client, args.node.clone(), cgroup.clone())
                .trust_domain(args.trust_domain.clone())
                .root_namespace(args.root_namespace.clone());
            tokio::spawn(kube.run(state_tx, config_tx))
        }
    };
    discovery::first_load(&mut source, &mut config_rx).await?;

    let config_metrics = Arc::new(ConfigMetrics::new(config_rx.clone())?);
    metrics.register_at_scrape(config_metrics.clone())?;
    tokio::spawn(config_metrics.count_rejections());

    let certs = certificate_manager(&args)?;
    metrics.register_at_scrape(Arc::new(CertificateMetrics::new(certs.clone())?))?;
    let proxy = Arc::new(ProxyContext {
        redirector: redirector.clone(),
        state: state_rx.clone(),
        metrics: proxy_metrics,
        certs: certs.clone(),
        limits: limits.clone(),
        connections: Arc::new(OpenConnections::new()),
        pool: args.pool.config(),
        local_pods: Arc::default(),
        // A kernel that cannot splice leaves same-node connections to the agent's relay.
        fast_path: args.same_node_fast_path,
    });
    // Every new state, from either source, is applied to the inbound connections already open.
    tokio::spawn(admission::reevaluate_on_change(
        proxy.connections.clone(),
        state_rx.clone(),
    ));
    let (enrolment_tx, enrolment_rx) = watch::channel(EnrolmentStatus::default());
    metrics.register_at_scrape(Arc::new(EnrolmentMetrics::new(enrolment_rx.clone())?))?;
    if let Some(client) = kube_client {
        tokio::spawn(report_closed_pods(
            client,
            args.node.clone(),
            enrolment_rx.clone(),
        ));
    }
    // A running agent of this node (an upgrade's predecessor) freezes its enrolment before
    // this one reads the sandboxes it saved and enrols the pods, and keeps serving meanwhile.
    let handover_socket = handover::socket_path(&args.cni_socket);
    let predecessor = match handover::find_predecessor(&handover_socket).await {
        Ok(Some(predecessor)) => {
            info!("taking over from the running agent of this node");
            Some(predecessor)
        }
        Ok(None) => {
            // No agent of this node is running: hops in the pinned map are a dead one's.
            let stale = redirector.forget_agent_hops();
            if stale > 0 {
                info!(
                    stale,
                    "dropped the in-flight hops of an agent that stopped without cleaning up"
                );
            }
            None
        }
        Err(err) => {
            tracing::warn!(
                err = format!("{err:#}"),
                "the running agent of this node did not freeze for a handover; starting without one"
            );
            None
        }
    };
    let (role_tx, role_rx) = watch::channel(if predecessor.is_some() {
        Role::TakingOver
    } else {
        Role::Active
    });
    let sandbox_file = args.cni_socket.with_file_name("cni-sandboxes.json");
    let mut enrolment = Enrolment::new(args.node.clone(), redirector.clone(), proxy, enrolment_tx)
        .with_sandbox_file(sandbox_file);
    if predecessor.is_some() {
        enrolment = enrolment.after_predecessor();
    }
    let (cni_tx, cni_rx) = tokio::sync::mpsc::channel(64);
    let mut cni_server = tokio::spawn(crate::cni::serve(
        args.cni_socket.clone(),
        cni_tx,
        state_rx.clone(),
        crate::cni::CniMetrics::new(&metrics)?,
    ));
    let (control_tx, control_rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(enrolment.run(state_rx.clone(), cni_rx, control_rx));

    let liveness = Arc::new(admin::Liveness::default());
    tokio::spawn(admin::heartbeat(liveness.clone(), redirector.clone()));
    let admin_state = Arc::new(AdminState {
        node: args.node.clone(),
        state: state_rx,
        config: config_rx,
        enrolment: enrolment_rx,
        redirector: redirector.clone(),
        logging: telemetry::log_control(),
        certs,
        limits: limits.clone(),
        liveness,
        role: role_rx.clone(),
    });
    // Once every pod is enrolled with this agent's listeners and it holds their certificates,
    // the predecessor closes its own; from then on this agent is the one a successor asks.
    let mut handover_task = tokio::spawn(take_over(
        predecessor,
        admin_state.clone(),
        handover_socket,
        control_tx,
        role_tx,
    ));
    let mut metrics_server = tokio::spawn(admin::serve_metrics(
        admin::bind_shared(args.metrics_addr).await?,
        metrics,
        limits.clone(),
    ));
    let mut admin = tokio::spawn(admin::serve(args.admin_addr, admin_state.clone(), true));
    let mut readiness = tokio::spawn(admin::serve(args.readiness_addr, admin_state, false));
    info!(node = %args.node, allocator = %crate::allocator::summary(), "agent started");

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut role = role_rx;
    let retired = tokio::select! {
        _ = term.recv() => { info!("SIGTERM"); false }
        _ = tokio::signal::ctrl_c() => { info!("SIGINT"); false }
        result = source => { error!(?result, "configuration source ended"); false }
        result = &mut admin => anyhow::bail!("admin endpoint failed: {:?}", result),
        result = &mut readiness => anyhow::bail!("readiness endpoint failed: {:?}", result),
        result = &mut metrics_server => anyhow::bail!("metrics endpoint failed: {:?}", result),
        result = &mut cni_server => anyhow::bail!("CNI socket failed: {:?}", result),
        Ok(_) = role.wait_for(|r| *r == Role::Retired) => true,
        Ok(Err(err)) = &mut handover_task => return Err(err),
    };
    if !retired {
        info!(
            bpffs = %args.bpffs.display(),
            "agent stopping; redirection stays pinned, so enrolled pods fail closed until an agent returns (`ambit uninstall` removes it)"
        );
        return Ok(());
    }
    // The successor answers on the node's ports and the CNI socket from now on.
    for task in [&admin, &readiness, &metrics_server, &cni_server] {
        task.abort();
    }
    info!(
        "retired: a successor agent serves this node; serving the connections still open until SIGTERM, then for at most --termination-grace-period"
    );
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
    handover::drain(&limits, args.termination_grace_period).await;
    info!("retired agent exiting; its successor holds the pins");
    Ok(())
}

/// Takes over from `predecessor` (if any) once this agent's first enrolment is done, then
/// serves the handover socket for the next agent.
async fn take_over(
    predecessor: Option<handover::Predecessor>,
    agent: Arc<AdminState>,
    socket: PathBuf,
    control: tokio::sync::mpsc::Sender<crate::enrolment::Control>,
    role: watch::Sender<Role>,
) -> anyhow::Result<()> {
    if let Some(predecessor) = predecessor {
        // Every pod enrolled and every certificate in hand; a CA that stays unreachable keeps
        // the predecessor serving until its own wait runs out (handover::TAKEOVER_TIMEOUT).
        while agent.can_serve().is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        // A predecessor that gave up waiting has resumed and re-registered its own listeners:
        // this agent exits, to be restarted for a handover afresh.
        predecessor
            .take_over()
            .await
            .context("the previous agent did not confirm the takeover (it resumed)")?;
        info!("took over: the previous agent closed its listeners and drains");
        role.send_replace(Role::Active);
    }
    if let Err(err) = handover::serve(socket, control, role).await {
        error!(
            err = format!("{err:#}"),
            "no handover socket: a successor agent will not be able to take over without cutting connections"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::{
        limits::{LimitSettings, Path, Phase},
        proxy::metrics::{ConnectionLabels, ProxyMetrics},
        redirect::RedirectStats,
        relay::Transferred,
        telemetry::{
            istio::{Reporter, ResponseFlags},
            metrics::exposition::promtool_check,
        },
    };

    /// Every metric the agent serves, each subsystem's registered in one registry as `run` does
    /// and populated, passes Prometheus' own parser and linter (names, help, types, no
    /// duplicate family between subsystems).
    #[test]
    fn every_metric_of_the_agent_passes_promtool() {
        let metrics = Metrics::new();
        let datapath = Arc::new(RedirectMetrics::new(None).unwrap());
        datapath.record(
            RedirectStats::default(),
            &[("ORIG_DST_TUPLE", 1)],
            Default::default(),
        );
        metrics.register_at_scrape(datapath).unwrap();
        let limits = Arc::new(Limits::new(LimitSettings::for_descriptors(1024)));
        limits.timed_out(Path::Hbone, Phase::TlsHandshake);
        metrics
            .register_at_scrape(Arc::new(LimitMetrics::new(Some(limits)).unwrap()))
            .unwrap();
        let (_config, config_rx) = watch::channel(ConfigStatus::default());
        metrics
            .register_at_scrape(Arc::new(ConfigMetrics::new(config_rx).unwrap()))
            .unwrap();
        let certs = Arc::new(CertificateMetrics::new(None).unwrap());
        certs.record(
            0,
            &[(
                "spiffe://cluster.local/ns/shop/sa/web".to_string(),
                SystemTime::now() + Duration::from_secs(60),
            )],
        );
        metrics.register_at_scrape(certs).unwrap();
        let (_enrolment, enrolment_rx) = watch::channel(EnrolmentStatus::default());
        metrics
            .register_at_scrape(Arc::new(EnrolmentMetrics::new(enrolment_rx).unwrap()))
            .unwrap();
        crate::cni::CniMetrics::new(&metrics).unwrap();
        let proxy = ProxyMetrics::new(&metrics).unwrap();
        proxy
            .connection_opened(&ConnectionLabels::new(Reporter::Source))
            .finish(
                Transferred {
                    sent: 1,
                    received: 2,
                },
                ResponseFlags::None,
            );
        proxy.connection_denied("policy");
        proxy.fast_path("splice");
        proxy.splice_declined("pod_share");
        promtool_check(&metrics.encode());
    }

    /// The splice bound is one the kernel maps can honour; a larger one is refused with the
    /// flag, the value and the bound named.
    #[test]
    fn the_splice_bound_cannot_exceed_the_maps() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            agent: AgentArgs,
        }
        let parse = |max: &str| {
            <Cli as clap::Parser>::try_parse_from([
                "ambit",
                "--node",
                "n0",
                "--mesh-file",
                "mesh.yaml",
                "--max-spliced-connections",
                max,
            ])
        };
        let bound = ambit_common::limits::MAX_SPLICED;
        assert_eq!(
            parse(&bound.to_string())
                .unwrap()
                .agent
                .max_spliced_connections,
            bound as usize
        );
        assert_eq!(parse("0").unwrap().agent.max_spliced_connections, 0);
        let err = parse(&(bound + 1).to_string()).err().unwrap().to_string();
        assert!(
            err.contains("--max-spliced-connections")
                && err.contains(&(bound + 1).to_string())
                && err.contains(&format!("({bound})")),
            "{err}"
        );
    }

    /// `--hbone-max-streams-per-connection` is one setting of both HBONE pools: the agent's
    /// (every pod's) and the waypoint's (to endpoints); ztunnel's 100 by default, 0 refused.
    #[test]
    fn the_pool_flag_sets_the_agents_and_the_waypoints_pools() {
        #[derive(clap::Parser)]
        struct Agent {
            #[command(flatten)]
            agent: AgentArgs,
        }
        #[derive(clap::Parser)]
        struct Waypoint {
            #[command(flatten)]
            waypoint: crate::waypoint::WaypointCommand,
        }
        let agent = |extra: &[&str]| {
            let base = ["ambit", "--node", "n0", "--mesh-file", "mesh.yaml"];
            <Agent as clap::Parser>::try_parse_from(base.iter().chain(extra))
                .map(|cli| cli.agent.pool.config().max_streams_per_connection)
        };
        let waypoint = |extra: &[&str]| {
            let base = [
                "ambit",
                "--mesh-file",
                "mesh.yaml",
                "--name",
                "wp",
                "--ca-address",
                "https://ca:15012",
                "--ca-roots",
                "roots.pem",
                "--ca-token-file",
                "token",
            ];
            <Waypoint as clap::Parser>::try_parse_from(base.iter().chain(extra)).map(|cli| {
                assert!(cli.waypoint.run.is_some(), "the waypoint's flags were lost");
                cli.waypoint.pool.config().max_streams_per_connection
            })
        };
        let default = crate::hbone::PoolConfig::default().max_streams_per_connection;
        assert_eq!(default, 100);
        let flag = ["--hbone-max-streams-per-connection", "7"];
        assert_eq!(agent(&[]).unwrap(), default);
        assert_eq!(agent(&flag).unwrap(), 7);
        assert_eq!(waypoint(&[]).unwrap(), default);
        assert_eq!(waypoint(&flag).unwrap(), 7);
        let zero = ["--hbone-max-streams-per-connection", "0"];
        for err in [agent(&zero).unwrap_err(), waypoint(&zero).unwrap_err()] {
            let err = err.to_string();
            assert!(
                err.contains("--hbone-max-streams-per-connection") && err.contains('0'),
                "{err}"
            );
        }
    }
}
