//! `ambit ca`: the mesh's certificate authority.
//!
//! It holds a root key and signs workload certificates (X.509, ECDSA P-256, one URI SAN: the
//! workload's SPIFFE ID) for node agents, over the gRPC API of Istio's CA
//! (`istio.v1.auth.IstioCertificateService/CreateCertificate`, see
//! [`crate::identity::ca_api`]), so that either
//! side can use the other's CA.
//!
//! - [`root`]: creating, importing and loading the root (`ambit ca init`), or an intermediate
//!   under an organisation's root (Istio's plug-in `cacerts`); trust bundles.
//! - [`sign`]: turning a CSR into a certificate chain for an identity.
//! - [`server`]: the TLS gRPC service (`ambit ca serve`) and how it authenticates node agents in
//!   standalone mode: a per-node bearer token, and the mesh file's placement of workloads.
//! - [`kube`]: Kubernetes mode (`ambit ca serve --kube`): ServiceAccount tokens checked by
//!   TokenReview (agents' for their node's pods, placement read from the cluster's pods; any
//!   other account's for its own identity, as a waypoint asks).
//! - [`metrics`]: certificates signed and refused, TokenReview latency, the chain's expiry,
//!   served with the readiness probe on the monitoring port (`--monitoring-addr`, 15014).
//! - [`guard`]: the bounds on what one client may cost the CA: caches of token reviews
//!   (accepted and refused), rate limits on TokenReviews per client address and overall, and
//!   refusal log lines limited per client address.
//!
//! # Files of a CA directory
//!
//! `ambit ca init` writes:
//!
//! | file | content |
//! |---|---|
//! | `root-key.pem` | the root's private key (PKCS#8 PEM), mode 0600 |
//! | `root-cert.pem` | the root certificate, last in every chain the CA returns |
//! | `roots.pem` | the trust bundle to hand to agents: a plain concatenation of PEM root certificates |
//! | `ca.yaml` | `trustDomain: <domain>`: the only trust domain this CA signs for |
//!
//! Or the directory holds Istio's plug-in certificates (the `cacerts` Secret): `ca-cert.pem`,
//! `ca-key.pem`, `cert-chain.pem`, `root-cert.pem` (see [`root`]), the trust domain then being
//! `--trust-domain`'s.
//!
//! # Rotating the root without downtime
//!
//! A trust bundle may hold several roots, and peers accept a leaf issued by any of them:
//!
//! 1. `ambit ca init --dir NEW --trust-domain TD --also-trust OLD/roots.pem` creates the new
//!    root; `NEW/roots.pem` trusts both.
//! 2. Give every agent `NEW/roots.pem` as its bundle. Agents re-read the bundle file at each
//!    certificate fetch and each new connection to the CA, so certificates renewed from now on
//!    trust both roots, and within one lifetime (24 h by default) all do.
//! 3. Serve from `NEW` (`ambit ca serve --dir NEW`). Leaves of the old and the new root both
//!    verify everywhere, so connections keep working while certificates roll over.
//! 4. Once every certificate of the old root has expired, drop the old root from the bundle.
#[cfg(test)]
mod grpc_tests;
pub mod guard;
pub mod kube;
#[cfg(test)]
mod kube_tests;
pub mod metrics;
pub mod root;
pub mod server;
pub mod sign;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;

use crate::timefmt::{self, parse_duration};

pub use self::{
    guard::ReviewLimits,
    kube::{KubeAuthError, KubeAuthOptions, ServiceAccountRef},
    root::{InitOptions, RootCa, RootError},
    server::{AuthMode, CaServer, ServeOptions},
    sign::SignError,
};

/// Who a request authenticated as: what its credential proves, and so which identities it may
/// get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// A node (an agent's credential): identities of the pods placed on it.
    Node(String),
    /// A workload's own ServiceAccount token (Kubernetes mode): its own identity, while the pod
    /// the token is bound to runs as it.
    Workload {
        /// The ServiceAccount.
        account: ServiceAccountRef,
        /// The bound pod's name (in the account's namespace).
        name: String,
        /// The bound pod's UID.
        uid: String,
    },
}

impl std::fmt::Display for Principal {
    /// `node N` or `pod NS/NAME (service account NS/SA)`, as logs and messages name the caller.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Node(node) => write!(f, "node {node}"),
            Self::Workload { account, name, .. } => write!(
                f,
                "pod {}/{name} (service account {account})",
                account.namespace
            ),
        }
    }
}

/// The default and, unless `--max-ttl` says otherwise, the longest workload certificate lifetime.
pub const DEFAULT_MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Flags of `ambit ca`.
#[derive(Debug, clap::Args)]
pub struct CaArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CaCommand,
}

/// The subcommands of `ambit ca`.
#[derive(Debug, clap::Subcommand)]
pub enum CaCommand {
    /// Create a root CA in a directory, or import a given root key and certificate.
    Init(InitArgs),
    /// Serve the signing API over TLS to the node agents.
    Serve(Box<ServeArgs>),
}

/// Flags of `ambit ca init`.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// The CA directory to create files in (created if missing; existing CA files are never
    /// overwritten).
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub dir: PathBuf,
    /// The trust domain of the identities this CA signs.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Import this root key (PKCS#8 PEM) instead of generating one; needs --root-cert.
    #[arg(long, requires = "root_cert")]
    pub root_key: Option<PathBuf>,
    /// Import this root certificate (PEM) instead of generating one; needs --root-key.
    #[arg(long, requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    /// Lifetime of a generated root, e.g. `3650d`.
    #[arg(long, default_value = "3650d", value_parser = parse_duration)]
    pub root_ttl: Duration,
    /// Also trust the roots of this PEM file (e.g. the previous CA's `roots.pem`) in the new
    /// `roots.pem`, for a root rotation. May be repeated.
    #[arg(long)]
    pub also_trust: Vec<PathBuf>,
}

/// Flags of `ambit ca serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The CA directory written by `ambit ca init`.
    #[arg(long, env = "AMBIT_CA_DIR")]
    pub dir: PathBuf,
    /// Address to serve the gRPC API on.
    #[arg(long, env = "AMBIT_CA_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,
    /// Standalone mode: the mesh file (watched); a node may only get identities of workloads
    /// placed on it.
    #[arg(
        long,
        env = "AMBIT_MESH_FILE",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub mesh_file: Option<PathBuf>,
    /// Standalone mode: YAML file of per-node bootstrap tokens, `nodes: {<node>: <token>}`
    /// (re-read on change).
    #[arg(
        long,
        env = "AMBIT_CA_TOKENS",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub tokens: Option<PathBuf>,
    /// Kubernetes mode: agents authenticate with their projected ServiceAccount token (checked
    /// by TokenReview) and get identities of the pods scheduled on their node (read from the
    /// API server), instead of --tokens and --mesh-file.
    #[arg(long, env = "AMBIT_CA_KUBE")]
    pub kube: bool,
    /// Kubernetes mode: the kubeconfig file to use instead of the in-cluster ServiceAccount
    /// [default: in-cluster, else $KUBECONFIG or ~/.kube/config].
    // Not `requires = "kube"`: a flag's default value (false) satisfies it. Standalone mode
    // requires the two files this conflicts with.
    #[arg(long, conflicts_with_all = ["mesh_file", "tokens"])]
    pub kubeconfig: Option<PathBuf>,
    /// Kubernetes mode: the audience agents' tokens must be issued for (the DaemonSet's
    /// projected token's `audience`).
    #[arg(long, env = "AMBIT_CA_TOKEN_AUDIENCE", default_value = self::kube::DEFAULT_TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// Kubernetes mode: the agents' ServiceAccount, `<namespace>/<name>`: its tokens get the
    /// identities of their node's pods; any other account's token only its own identity.
    #[arg(
        long,
        env = "AMBIT_CA_AGENT_SERVICE_ACCOUNT",
        default_value = self::kube::DEFAULT_AGENT_SERVICE_ACCOUNT
    )]
    pub agent_service_account: ServiceAccountRef,
    /// Kubernetes mode: the namespace Ambit is installed in, whose policies apply mesh-wide;
    /// the CA reports on the policies as the agents read them.
    #[arg(long, env = "AMBIT_ROOT_NAMESPACE", default_value = crate::discovery::kube::DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Kubernetes mode: the image of the waypoints' pods (the one holding `ambit`), which the
    /// waypoint controller deploys for each Gateway of class `ambit-waypoint`.
    #[arg(long, env = "AMBIT_WAYPOINT_IMAGE", default_value = "ambit:latest")]
    pub waypoint_image: String,
    /// Kubernetes mode: the address waypoints dial for their certificate (default:
    /// `https://ambit-ca.<root namespace>.svc:15012`).
    #[arg(long, env = "AMBIT_WAYPOINT_CA_ADDRESS")]
    pub waypoint_ca_address: Option<String>,
    /// Longest certificate lifetime granted, and the lifetime when a request names none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub max_ttl: Duration,
    /// The trust domain signed for. A directory of Istio's plug-in certificates names none: this
    /// flag does [default there: cluster.local]; with `ambit ca init`'s files it must be the
    /// one of their `ca.yaml`.
    #[arg(long, env = "AMBIT_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// Where to serve `GET /ready` (200 once a request could be signed: kubelet's readiness
    /// probe) and `GET /metrics` (Prometheus), in plain HTTP: istiod's monitoring port.
    #[arg(
        long,
        env = "AMBIT_CA_MONITORING_ADDR",
        default_value = "0.0.0.0:15014"
    )]
    pub monitoring_addr: SocketAddr,
    /// DNS names and IP addresses of the CA's own TLS certificate: the names agents dial.
    /// May be repeated [default: ambit-ca, localhost, 127.0.0.1 and the --listen address].
    #[arg(long)]
    pub server_name: Vec<String>,
}

/// Runs `ambit ca <command>`; `serve` returns on SIGTERM or SIGINT.
pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    match args.command {
        CaCommand::Init(args) => {
            let options = InitOptions {
                trust_domain: args.trust_domain,
                existing: args.root_key.zip(args.root_cert),
                root_ttl: args.root_ttl,
                also_trust: args.also_trust,
            };
            let dir = args.dir;
            let ca = tokio::task::spawn_blocking(move || {
                root::init_with(&dir, &options).map(|ca| (ca, dir))
            })
            .await
            .context("CA init task failed")?;
            let (ca, dir) = ca?;
            tracing::info!(
                dir = %dir.display(),
                trust_domain = ca.trust_domain(),
                not_after = %timefmt::rfc3339(ca.not_after()),
                "root CA ready"
            );
            Ok(())
        }
        CaCommand::Serve(args) => {
            let mut server_names = args.server_name;
            if server_names.is_empty() {
                server_names = vec!["ambit-ca".into(), "localhost".into(), "127.0.0.1".into()];
                if !args.listen.ip().is_unspecified() && !args.listen.ip().is_loopback() {
                    server_names.push(args.listen.ip().to_string());
                }
            }
            let client = if args.kube {
                Some(crate::discovery::kube::client(args.kubeconfig.as_deref()).await?)
            } else {
                None
            };
            let auth = match &client {
                Some(client) => AuthMode::Kube(Box::new(KubeAuthOptions {
                    audience: args.token_audience,
                    agent_service_account: args.agent_service_account,
                    ..KubeAuthOptions::new(client.clone())
                })),
                // clap requires both without --kube.
                None => AuthMode::Files {
                    mesh_file: args
                        .mesh_file
                        .context("--mesh-file is required without --kube")?,
                    tokens_file: args.tokens.context("--tokens is required without --kube")?,
                },
            };
            let options = ServeOptions {
                dir: args.dir,
                listen: args.listen,
                auth,
                max_ttl: args.max_ttl,
                server_names,
                trust_domain: args.trust_domain,
                monitoring: Some(args.monitoring_addr),
            };
            let server = CaServer::start(options).await?;
            if let Some(client) = client {
                // The CA is the cluster's one central component: it reports on Ambit's
                // policies (every agent enforces them the same way on its own).
                let status = crate::discovery::kube::run_policy_status(
                    client.clone(),
                    args.root_namespace.clone(),
                );
                tokio::spawn(async move {
                    if let Err(error) = status.await {
                        tracing::error!(error = %format!("{error:#}"), "policy status writer stopped");
                    }
                });
                // And it deploys the waypoints (Gateways of class ambit-waypoint), with its
                // trust bundle.
                let waypoints =
                    crate::discovery::kube::waypoint_controller::WaypointController::new(
                        client,
                        crate::discovery::kube::waypoint_controller::WaypointSettings {
                            image: args.waypoint_image.clone(),
                            ca_address: args.waypoint_ca_address.clone().unwrap_or_else(|| {
                                format!("https://ambit-ca.{}.svc:15012", args.root_namespace)
                            }),
                            roots_pem: server.trust_bundle_pem().to_string(),
                            root_namespace: args.root_namespace.clone(),
                        },
                    );
                tokio::spawn(async move {
                    if let Err(error) = waypoints.run().await {
                        tracing::error!(error = %format!("{error:#}"), "waypoint controller stopped");
                    }
                });
            }
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .context("cannot handle SIGTERM")?;
            server
                .run_until(async move {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = tokio::signal::ctrl_c() => {}
                    }
                    tracing::info!("stopping the CA");
                })
                .await
        }
    }
}

/// `n` random bytes from the system's CSPRNG (through rustls' ring provider, which the crate
/// already links: no extra dependency for serial numbers).
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .expect("the system random number generator failed");
    bytes
}

/// A random certificate serial number: 16 bytes, positive (RFC 5280 allows up to 20 octets and
/// asks for at least 64 random bits).
pub(crate) fn random_serial() -> rcgen::SerialNumber {
    let mut serial = random_bytes::<16>();
    serial[0] &= 0x7f;
    // A leading zero octet would be stripped by DER encoding; keep the length stable.
    serial[0] |= 0x01;
    rcgen::SerialNumber::from_slice(&serial)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory as _, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        ca: CaArgs,
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "ca",
            "serve",
            "--dir",
            "d",
            "--mesh-file",
            "m",
            "--tokens",
            "t",
            "--max-ttl",
            "1h",
        ])
        .unwrap();
        let CaCommand::Serve(serve) = cli.ca.command else {
            panic!("not serve")
        };
        assert_eq!(serve.max_ttl, Duration::from_secs(3600));
        assert_eq!(serve.listen, "0.0.0.0:15012".parse().unwrap());
        assert!(!serve.kube);
        // Importing needs both files.
        assert!(Cli::try_parse_from(["ca", "init", "--dir", "d", "--root-key", "k"]).is_err());

        // Kubernetes mode needs neither file, and takes neither.
        let cli = Cli::try_parse_from(["ca", "serve", "--dir", "d", "--kube"]).unwrap();
        let CaCommand::Serve(serve) = cli.ca.command else {
            panic!("not serve")
        };
        assert!(serve.kube && serve.kubeconfig.is_none());
        assert_eq!(serve.token_audience, "ambit-ca");
        assert_eq!(
            serve.agent_service_account.username(),
            "system:serviceaccount:ambit-system:ambit-agent"
        );
        let cli = Cli::try_parse_from([
            "ca",
            "serve",
            "--dir",
            "d",
            "--kube",
            "--kubeconfig",
            "k",
            "--token-audience",
            "mesh-ca",
            "--agent-service-account",
            "mesh/agent",
        ])
        .unwrap();
        let CaCommand::Serve(serve) = cli.ca.command else {
            panic!("not serve")
        };
        assert_eq!(serve.token_audience, "mesh-ca");
        assert_eq!(serve.agent_service_account.to_string(), "mesh/agent");
        for bad in [
            &["--kube", "--tokens", "t"][..],
            &["--kube", "--mesh-file", "m"],
            // Standalone mode needs both files; --kubeconfig only makes sense with --kube.
            &["--tokens", "t"],
            &["--mesh-file", "m", "--tokens", "t", "--kubeconfig", "k"],
            &["--kube", "--agent-service-account", "ambit-agent"],
        ] {
            let args = ["ca", "serve", "--dir", "d"].iter().chain(bad);
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?} accepted");
        }
    }

    #[tokio::test]
    async fn init_command_creates_the_ca_directory() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let cli = Cli::try_parse_from([
            "ca",
            "init",
            "--dir",
            ca_dir.to_str().unwrap(),
            "--trust-domain",
            "example.org",
        ])
        .unwrap();
        run(cli.ca).await.unwrap();
        let ca = RootCa::load(&ca_dir).unwrap();
        assert_eq!(ca.trust_domain(), "example.org");
    }
}
