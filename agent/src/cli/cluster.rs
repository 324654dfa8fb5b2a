//! Reaching the agents of a cluster through its API server, as `istioctl ztunnel-config` reaches
//! ztunnel: a kubeconfig (`--kubeconfig`, `--context`, else what kubectl would use), the agent
//! DaemonSet's pod on a node, and its admin or metrics port through the API server's pod
//! port-forward ([`super::fetch::Endpoint::Pod`]).
//!
//! Where Ambit runs (its namespace, the agent's and the CA's labels, their ports) is said once
//! here, as deploy/manifests and the Helm chart install it; the deploy test checks that they
//! agree.
use std::{collections::BTreeSet, path::PathBuf};

use anyhow::{Context as _, bail};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams};

use super::fetch::Endpoint;

/// Ambit's namespace, as deploy/manifests and the chart's default install it.
pub const NAMESPACE: &str = "ambit-system";
/// The label selector of the agent DaemonSet's pods.
pub const AGENT_SELECTOR: &str = "app.kubernetes.io/name=ambit-agent";
/// The agent DaemonSet.
pub const AGENT_DAEMONSET: &str = "ambit-agent";
/// The label selector of the CA Deployment's pods.
pub const CA_SELECTOR: &str = "app.kubernetes.io/name=ambit-ca";
/// The CA Deployment.
pub const CA_DEPLOYMENT: &str = "ambit-ca";
/// The agent's admin port (`/config_dump`), on loopback in its (the node's) network namespace.
pub const ADMIN_PORT: u16 = 15000;
/// The agent's metrics port.
pub const METRICS_PORT: u16 = 15020;
/// The CA's monitoring port (`/ready`, `/metrics`).
pub const CA_MONITORING_PORT: u16 = 15014;
/// The agent container's name in the agent pod; the CNI installer's.
pub const AGENT_CONTAINER: &str = "agent";
/// The container that installs and keeps the CNI plugin chained on the node.
pub const CNI_CONTAINER: &str = "install-cni";

/// How to reach the cluster.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct KubeArgs {
    /// The kubeconfig file [default: $KUBECONFIG, ~/.kube/config, or the in-cluster
    /// ServiceAccount]. Reads the cluster through the API server instead of a local address.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use [default: the current context]. Reads the cluster through
    /// the API server instead of a local address.
    #[arg(long)]
    pub context: Option<String>,
    /// The namespace Ambit is installed in.
    #[arg(long, default_value = NAMESPACE)]
    pub ambit_namespace: String,
}

impl KubeArgs {
    /// Whether a kubeconfig or context was named (the cluster, not a local address, is read).
    pub fn named(&self) -> bool {
        self.kubeconfig.is_some() || self.context.is_some()
    }

    /// A client of the API server the flags name.
    pub async fn client(&self) -> anyhow::Result<Client> {
        let options = kube::config::KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .with_context(|| format!("reading --kubeconfig {}", path.display()))?;
                kube::Config::from_custom_kubeconfig(file, &options)
                    .await
                    .with_context(|| format!("using --kubeconfig {}", path.display()))?
            }
            (None, Some(context)) => kube::Config::from_kubeconfig(&options)
                .await
                .with_context(|| format!("using the kubeconfig's context {context:?}"))?,
            (None, None) => kube::Config::infer().await.context(
                "no Kubernetes credentials: no kubeconfig ($KUBECONFIG, ~/.kube/config or \
                 --kubeconfig) and not in a pod",
            )?,
        };
        Client::try_from(config).context("building the Kubernetes client")
    }
}

/// The agent pods of the cluster (the DaemonSet's, in `namespace`).
pub async fn agent_pods(client: &Client, namespace: &str) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(AGENT_SELECTOR))
        .await
        .with_context(|| {
            format!("listing the agent pods ({AGENT_SELECTOR}) in namespace {namespace} (RBAC: list pods)")
        })?;
    Ok(list.items)
}

/// The node a pod is scheduled to, if it is.
pub fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Whether a pod is running and its `Ready` condition true.
pub fn is_ready(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return false;
    };
    status.phase.as_deref() == Some("Running")
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// The endpoint of `port` of the agent on `node`. Without `node`, an error listing the nodes
/// that run an agent.
pub async fn agent_endpoint(
    args: &KubeArgs,
    node: Option<&str>,
    port: u16,
) -> anyhow::Result<Endpoint> {
    let client = args.client().await?;
    let namespace = &args.ambit_namespace;
    let pods = agent_pods(&client, namespace).await?;
    let nodes: BTreeSet<&str> = pods.iter().filter_map(node_of).collect();
    let list = |nodes: &BTreeSet<&str>| {
        if nodes.is_empty() {
            format!(
                "none: no agent pod ({AGENT_SELECTOR}) in namespace {namespace} (is Ambit \
                 installed there? --ambit-namespace)"
            )
        } else {
            nodes.iter().copied().collect::<Vec<_>>().join(", ")
        }
    };
    let Some(node) = node else {
        bail!(
            "which node's agent? pass --node; nodes running an agent: {}",
            list(&nodes)
        );
    };
    // Of the node's agent pods (two during an upgrade), the ready one, else any.
    let mut on_node: Vec<&Pod> = pods.iter().filter(|p| node_of(p) == Some(node)).collect();
    on_node.sort_by_key(|p| !is_ready(p));
    let Some(pod) = on_node.first() else {
        bail!(
            "no agent pod on node {node}; nodes running an agent: {}",
            list(&nodes)
        );
    };
    Ok(Endpoint::Pod {
        client,
        namespace: namespace.clone(),
        pod: pod.metadata.name.clone().unwrap_or_default(),
        port,
    })
}
