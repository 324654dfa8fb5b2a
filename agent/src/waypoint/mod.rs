//! `ambit waypoint`: the L7 proxy of the services bound to it (docs/waypoint.md).
//!
//! A waypoint is a mesh workload with its own identity (certificate from Ambit's CA, like any
//! workload's) that accepts HBONE on 15008 from node agents (or ztunnels: same wire), with
//! `:authority` = the service VIP and port the client dialled. Inside each tunnel it serves
//! HTTP/1.1 or HTTP/2, routes each request with the mesh's routes ([`route`]), and sends it over
//! HBONE to the chosen endpoint pod's 15008 with its own identity, where the endpoint's agent
//! authorizes the waypoint like any client. Built from the shared parts: [`crate::hbone`]
//! (server, pool), [`crate::identity`] (CA client, certificate manager), [`crate::limits`],
//! [`crate::telemetry`], and [`crate::discovery`] for the mesh file (hot reload, last good state
//! kept); nothing of the node agent's datapath.
//!
//! The waypoint's own pod is not enrolled (`enrolled: false`), as Istio's waypoints are not
//! captured: its tunnels to endpoints must leave as they are, not be steered into the node
//! proxy again.
use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{net::TcpStream, signal::unix::SignalKind, sync::watch};
use tracing::{error, info, warn};

use crate::{
    discovery::{self, ConfigStatus, metrics::ConfigMetrics},
    hbone::{Destinations, HboneServer, InboundSettings, Pool, PoolKey},
    identity::{
        BearerToken, CaClient, CaClientConfig, CertificateManager, ManagerConfig,
        client::DEFAULT_CA_TIMEOUT, metrics::CertificateMetrics,
    },
    limits::{self, LimitSettings, Limits},
    policy::l7::JwksSource,
    state::MeshState,
    telemetry::Metrics,
};

pub mod authz;
pub mod balance;
pub mod fault;
pub mod filters;
pub mod idle;
pub mod jwt;
pub mod metrics;
pub mod mirror;
pub mod observe;
pub mod outlier;
pub mod pool;
pub mod proxy;
pub mod ratelimit;
pub mod resilience;
pub mod retry;
pub mod route;
pub mod sniff;
pub mod tcp;
pub mod trace;
pub mod upgrade;

use self::{
    balance::Balancer,
    metrics::WaypointMetrics,
    proxy::{Waypoint, WaypointInbound},
    resilience::Resilience,
};

/// Ports a tunnel may not name: the proxies' own.
const RESERVED_PORTS: [u16; 6] = [15000, 15001, 15006, 15008, 15020, 15021];

/// The node the waypoint's Kubernetes source serves: none (no node is called this, so no pod is
/// taken for one of its own to enrol).
const NO_NODE: &str = "(waypoint: no node)";

/// How long the waypoint waits for its first certificate before giving up.
const FIRST_CERTIFICATE_TIMEOUT: Duration = Duration::from_secs(60);

/// `ambit waypoint`: run one, or a subcommand.
#[derive(Clone, Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct WaypointCommand {
    /// `generate`; without one, the waypoint runs.
    #[command(subcommand)]
    pub command: Option<WaypointSubcommand>,
    /// How the waypoint runs.
    #[command(flatten)]
    pub run: Option<WaypointArgs>,
    /// The HBONE connection pool to endpoints (`--hbone-max-streams-per-connection`, as the
    /// node agent's). Beside [`WaypointArgs`] rather than in it: clap leaves an `Option` of
    /// a struct that flattens another one always `None` (its argument group stays empty).
    #[command(flatten)]
    pub pool: crate::hbone::PoolArgs,
}

/// Subcommands of `ambit waypoint`.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum WaypointSubcommand {
    /// Print the Gateway API `Gateway` (class `ambit-waypoint`) that deploys a waypoint in
    /// Kubernetes, for `kubectl apply -f -` (as `istioctl waypoint generate`).
    Generate {
        /// The waypoint's namespace.
        #[arg(long, short = 'n')]
        namespace: String,
        /// The waypoint's name: its Gateway, Deployment, Service and ServiceAccount (bind
        /// services with `ambit.dev/use-waypoint: <name>`).
        #[arg(long, default_value = "waypoint")]
        name: String,
    },
}

/// Runs `ambit waypoint [generate]`.
pub async fn command(command: WaypointCommand) -> anyhow::Result<()> {
    let WaypointCommand { command, run, pool } = command;
    match (command, run) {
        (Some(WaypointSubcommand::Generate { namespace, name }), _) => {
            print!(
                "{}",
                discovery::kube::waypoint_controller::generate(&namespace, &name)
            );
            Ok(())
        }
        (None, Some(args)) => self::run(args, pool).await,
        (None, None) => anyhow::bail!("ambit waypoint: --mesh-file or --kube is required"),
    }
}

/// Flags of `ambit waypoint`.
#[derive(Clone, Debug, clap::Args)]
// Exactly one configuration source.
#[command(group(clap::ArgGroup::new("source").required(true).args(["mesh_file", "kube"])))]
pub struct WaypointArgs {
    /// Standalone mode: the mesh file (services, their waypoint binding and the routes). Watched
    /// and hot-reloaded; a bad version is rejected and the last good one stays in force.
    #[arg(long, env = "AMBIT_MESH_FILE")]
    pub mesh_file: Option<PathBuf>,
    /// Kubernetes mode: pods, services and the routes (VirtualService, DestinationRule,
    /// HTTPRoute, GRPCRoute) from the API server (in-cluster credentials, or `--kubeconfig`),
    /// as the node agents read them. The waypoint's pod is deployed by the waypoint controller
    /// from a Gateway of class `ambit-waypoint`.
    #[arg(long, env = "AMBIT_KUBE")]
    pub kube: bool,
    /// Kubernetes mode: the kubeconfig file to use instead of the in-cluster ServiceAccount.
    #[arg(long, conflicts_with = "mesh_file")]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the namespace whose policies apply mesh-wide (as the agents').
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = discovery::kube::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Kubernetes mode: the SPIFFE trust domain of the mesh (the mesh file names its own).
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = crate::policy::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// This waypoint's workload name in the mesh file (its identity is that workload's).
    #[arg(long, env = "POD_NAME")]
    pub name: String,
    /// This waypoint's workload namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// Where to accept HBONE.
    #[arg(long, env = "AMBIT_HBONE_ADDR", default_value = "0.0.0.0:15008")]
    pub hbone_addr: SocketAddr,
    /// Prometheus metrics endpoint (`GET /metrics`).
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// The CA that signs the waypoint's certificate, e.g. `https://ambit-ca:15012`.
    #[arg(long, env = "AMBIT_CA_ADDRESS")]
    pub ca_address: String,
    /// The trust bundle (PEM roots): verifies the CA and every peer.
    #[arg(long, env = "AMBIT_CA_ROOTS")]
    pub ca_roots: PathBuf,
    /// File holding the waypoint's credential for the CA: standalone, the bootstrap token of
    /// its node; in Kubernetes, its projected ServiceAccount token (audience `ambit-ca`).
    #[arg(long, env = "AMBIT_CA_TOKEN_FILE")]
    pub ca_token_file: PathBuf,
    /// The name the CA's certificate must carry [default: the host of --ca-address].
    #[arg(long, env = "AMBIT_CA_SERVER_NAME")]
    pub ca_server_name: Option<String>,
    /// Lifetime asked for the certificate (renewed at half-life).
    #[arg(long, env = "AMBIT_CERT_TTL", default_value = "24h", value_parser = crate::timefmt::parse_duration)]
    pub cert_ttl: Duration,
    /// How long a tunnel's first bytes are waited for to tell HTTP from other protocols; a
    /// tunnel silent that long (a server-first protocol) is forwarded as opaque TCP.
    #[arg(long, env = "AMBIT_PROTOCOL_DETECTION_TIMEOUT", default_value = "5s", value_parser = crate::timefmt::parse_duration)]
    pub protocol_detection_timeout: Duration,
    /// How long an HTTP/1.1 client may take to send a request's headers, idle keep-alive time
    /// included, before its connection is closed.
    #[arg(long, env = "AMBIT_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = crate::timefmt::parse_duration)]
    pub header_read_timeout: Duration,
    /// How long a request's stream to an endpoint may see no byte in either direction (the
    /// upload, the wait for the answer, the download) before it is ended and its pooled
    /// connection freed: Envoy's `stream_idle_timeout`.
    #[arg(long, env = "AMBIT_STREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = crate::timefmt::parse_duration)]
    pub stream_idle_timeout: Duration,
    /// After SIGTERM, how long requests and tunnels in flight may take to finish before the
    /// waypoint exits and cuts what is left (docs/waypoint.md#replicas-and-draining). Keep it below the
    /// pod's `terminationGracePeriodSeconds` (30 s by default, in the generated Deployment too).
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "25s", value_parser = crate::timefmt::parse_duration)]
    pub drain_timeout: Duration,
    /// The OTLP/gRPC collector spans are exported to, e.g. `http://otel-collector:4317`
    /// (docs/tracing.md). Without it tracing is off (trace headers still pass unchanged).
    #[arg(long, env = "AMBIT_TRACING_OTLP_ENDPOINT", value_parser = trace::parse_endpoint)]
    pub tracing_otlp_endpoint: Option<http::Uri>,
    /// Percentage of new traces sampled, 0 to 100 (Istio's `sampling`); a request whose trace
    /// context carries a sampling decision keeps it.
    #[arg(long, env = "AMBIT_TRACING_SAMPLING", default_value = "1", value_parser = crate::telemetry::parse_percentage)]
    pub tracing_sampling: f64,
    /// Memory, in MiB, the read buffers of the waypoint's relays (WebSocket and other upgraded
    /// connections, opaque TCP) may hold beyond their smallest size, all clients together; the
    /// connections of one client address may hold a quarter. Past it they read with smaller
    /// buffers: slower, never refused (as the node agent's flag) [default: 64].
    #[arg(long, env = "AMBIT_MAX_RELAY_BUFFER_MIB")]
    pub max_relay_buffer_mib: Option<usize>,
}

/// Drains on `signal` (through `draining`, which the server's [`InboundSettings::drain`] and
/// the HTTP connections in tunnels watch): the HTTP connections finish their requests and
/// close, the HBONE connections are sent a GOAWAY, and new tunnels are still served (a node agent that has
/// not yet seen this replica go sends them here), until no connection is left or `timeout`.
async fn drain<H: crate::hbone::InboundHandler>(
    server: &HboneServer<H>,
    draining: &watch::Sender<bool>,
    signal: &str,
    timeout: Duration,
) {
    info!(
        signal,
        ?timeout,
        connections = server.live_connections(),
        "draining: requests in flight finish, clients are moved to other replicas"
    );
    draining.send_replace(true);
    match tokio::time::timeout(timeout, server.connections_closed()).await {
        Ok(()) => info!("drained: no connection left"),
        Err(_) => warn!(
            connections = server.live_connections(),
            "drain timeout: cutting the connections left"
        ),
    }
}

/// Runs the waypoint, its HBONE pool set by `pool`, until SIGTERM or SIGINT, then drains.
pub async fn run(args: WaypointArgs, pool: crate::hbone::PoolArgs) -> anyhow::Result<()> {
    let nofile = limits::raise_nofile_limit().context("raising RLIMIT_NOFILE")?;
    let limits = Arc::new(Limits::new(
        LimitSettings::for_descriptors(nofile.soft)
            .with_relay_buffer_mib(args.max_relay_buffer_mib)?,
    ));
    let metrics = Arc::new(Metrics::new());
    // Its connection slots, handshakes and relay buffers, as the agent exports its own.
    metrics.register_at_scrape(Arc::new(limits::metrics::LimitMetrics::new(Some(
        limits.clone(),
    ))?))?;

    let (state_tx, mut state_rx) = watch::channel(Arc::new(MeshState::empty()));
    let (config_tx, mut config_rx) = watch::channel(ConfigStatus::default());
    let mut source = match &args.mesh_file {
        Some(mesh_file) => tokio::spawn(discovery::watch_mesh_file(
            mesh_file.clone(),
            state_tx,
            config_tx,
        )),
        None => {
            let client = discovery::kube::client(args.kubeconfig.as_deref()).await?;
            // No node of its own to enrol: it reads the mesh as an agent of no node does.
            let kube = discovery::kube::KubeSource::new(client, NO_NODE, "/nonexistent")
                .trust_domain(args.trust_domain.clone())
                .root_namespace(args.root_namespace.clone());
            tokio::spawn(kube.run(state_tx, config_tx))
        }
    };
    let config_name = match &args.mesh_file {
        Some(mesh_file) => format!("the mesh file {}", mesh_file.display()),
        None => "the Kubernetes API".to_string(),
    };
    discovery::first_load(&mut source, &mut config_rx).await?;
    let config_metrics = Arc::new(ConfigMetrics::new(config_rx.clone())?);
    metrics.register_at_scrape(config_metrics.clone())?;
    tokio::spawn(config_metrics.count_rejections());

    let (identity, me) = {
        let state = state_rx.borrow_and_update();
        let me = state
            .workloads()
            .iter()
            .find(|w| w.namespace == args.namespace && w.name == args.name)
            .with_context(|| {
                format!(
                    "{config_name} has no workload {}/{} (the waypoint's own)",
                    args.namespace, args.name
                )
            })?;
        if me.enrolled {
            tracing::warn!(
                workload = %me.uid(),
                "the waypoint's workload is enrolled: its node agent would capture its tunnels \
                 to endpoints; set enrolled: false"
            );
        }
        (state.identity_of(me), me.clone())
    };

    let client = CaClient::new(CaClientConfig {
        address: args.ca_address.clone(),
        server_name: args.ca_server_name.clone(),
        roots_file: args.ca_roots.clone(),
        token: BearerToken::from_file(&args.ca_token_file)
            .with_context(|| format!("reading --ca-token-file {}", args.ca_token_file.display()))?,
        timeout: DEFAULT_CA_TIMEOUT,
    })
    .context("configuring the CA client")?;
    let certs = Arc::new(CertificateManager::new(
        client,
        ManagerConfig {
            ttl: args.cert_ttl,
            ..Default::default()
        },
    ));
    certs.set_wanted(BTreeSet::from([identity.clone()]));
    metrics.register_at_scrape(Arc::new(CertificateMetrics::new(Some(certs.clone()))?))?;
    certs
        .wait_for(&identity, FIRST_CERTIFICATE_TIMEOUT)
        .await
        .with_context(|| format!("getting the waypoint's certificate ({identity})"))?;

    let tracing = trace::Tracing::start(
        args.tracing_otlp_endpoint.as_ref(),
        args.tracing_sampling,
        &me,
        &metrics,
    )?;
    // The waypoint's pod is not enrolled: its sockets leave as they are, from its own address.
    let dialer = |key: &PoolKey| TcpStream::connect(key.destination());
    let waypoint = Arc::new(Waypoint {
        state: state_rx.clone(),
        certs: certs.clone(),
        identity: identity.clone(),
        workload: (args.namespace.clone(), args.name.clone()),
        pool: Pool::new(dialer, pool.config()),
        connections: pool::HttpPool::new(&metrics)?,
        metrics: Arc::new(WaypointMetrics::new(&metrics)?),
        balancer: Balancer::default(),
        authz: authz::Authz::default(),
        resilience: Arc::new(Resilience::new(&metrics)?),
        rate_limits: ratelimit::RateLimits::default(),
        protocol_detection_timeout: args.protocol_detection_timeout,
        header_read_timeout: args.header_read_timeout,
        stream_idle_timeout: args.stream_idle_timeout,
        tracing,
        draining: watch::Sender::new(false),
        limits: limits.clone(),
    });
    let workload = waypoint.workload.clone();
    tokio::spawn(
        waypoint
            .authz
            .jwks
            .clone()
            .refresh(state_rx.clone(), move |state: &MeshState| {
                jwks_uris_of(state, &workload.0, &workload.1)
            }),
    );
    let stopping = waypoint.clone();
    let mut settings = InboundSettings::with_destinations(Destinations::DecidedByHandler);
    settings.reserved_ports = RESERVED_PORTS.to_vec();
    // One signal drains both layers: the HBONE connections (GOAWAY) and the HTTP in tunnels.
    settings.drain = Some(waypoint.draining.subscribe());
    let server = HboneServer::new(WaypointInbound::new(waypoint), settings, limits.clone());
    let listener = crate::admin::bind(args.hbone_addr).await?;
    let serving = server.clone();
    let hbone = tokio::spawn(async move { serving.serve(listener).await });
    let metrics_server = tokio::spawn(crate::admin::serve_metrics_on(
        args.metrics_addr,
        metrics,
        limits,
    ));
    info!(%identity, hbone = %args.hbone_addr, metrics = %args.metrics_addr, "waypoint started");

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    // The signal that asks for a drain; `None` when the waypoint stops for another reason.
    let signalled = tokio::select! {
        _ = term.recv() => Some("SIGTERM"),
        _ = tokio::signal::ctrl_c() => Some("SIGINT"),
        result = source => {
            error!(?result, "configuration source ended");
            None
        }
        result = hbone => anyhow::bail!("HBONE listener failed: {:?}", result),
        result = metrics_server => anyhow::bail!("metrics endpoint failed: {:?}", result),
    };
    if let Some(signal) = signalled {
        drain(&server, &stopping.draining, signal, args.drain_timeout).await;
    }
    info!("waypoint stopping");
    // The spans still queued leave (bounded by trace::SHUTDOWN_TIMEOUT).
    tokio::task::spawn_blocking(move || stopping.tracing.shutdown()).await?;
    Ok(())
}

/// The `jwksUri`s that apply at the waypoint `namespace/name`: those of the
/// RequestAuthentications attached to the services bound to it (`proxy::serves`), where its
/// tokens are checked ([`jwt::Jwks::refresh`]). Another waypoint's policies cost this one no
/// fetch.
pub(crate) fn jwks_uris_of(state: &MeshState, namespace: &str, name: &str) -> Vec<String> {
    let policies = state.policies().waypoint();
    if policies.authentications().is_empty() {
        return Vec::new();
    }
    let mut uris: Vec<String> = state
        .services()
        .iter()
        .flat_map(|service| {
            let rules = policies.jwt_rules(&authz::attachment(service));
            // The (cheap) policy match first: the binding check scans the workloads.
            if !rules.is_empty() && !proxy::serves(state, service, namespace, name) {
                return Vec::new();
            }
            rules
        })
        .filter_map(|rule| match &rule.keys {
            JwksSource::Uri(uri) => Some(uri.clone()),
            JwksSource::Inline(_) => None,
        })
        .collect();
    uris.sort();
    uris.dedup();
    uris
}
