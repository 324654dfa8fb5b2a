//! `ambit uninstall cluster`: the last step of removing Ambit from a Kubernetes cluster.
//!
//! Deleting the agents leaves their eBPF programs pinned and the CNI plugin chained, on
//! purpose (enrolled pods fail closed). The uninstall DaemonSet (`ambit-uninstall`) removes both
//! on every node, once no agent is left there. This command, run by a Job beside it (the
//! chart's post-delete hook, or `kubectl apply -f deploy/manifests/uninstall/`), waits until
//! that DaemonSet has run on every node it schedules to (its pods become ready only after their
//! init containers, which do the removal, have succeeded), then deletes it, so that an
//! uninstall is one step and leaves nothing behind. It fails, naming the nodes not done, when
//! they are not all done within `--timeout`: the DaemonSet then stays, and so do those nodes'
//! pins, until it runs there.
//!
//! `ambit uninstall done` is that DaemonSet's container: it says the node is done and waits to
//! be stopped, keeping the pod Ready (the image has no shell to `sleep` with).
use std::{path::PathBuf, time::Duration};

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::Pod};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams},
};
use tracing::info;

use crate::{discovery, timefmt::parse_duration};

/// How often the DaemonSet's status is read.
const POLL: Duration = Duration::from_secs(2);

/// Flags of `ambit uninstall cluster`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterUninstallArgs {
    /// The namespace of the uninstall DaemonSet (Ambit's).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ambit-system")]
    pub namespace: String,
    /// The uninstall DaemonSet.
    #[arg(long, default_value = "ambit-uninstall")]
    pub daemonset: String,
    /// How long every node may take.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,
    /// The kubeconfig file to use instead of the in-cluster ServiceAccount.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

/// Runs `ambit uninstall cluster`.
pub async fn run(args: ClusterUninstallArgs) -> anyhow::Result<()> {
    let client = discovery::kube::client(args.kubeconfig.as_deref()).await?;
    finish(client, &args.namespace, &args.daemonset, args.timeout, POLL).await
}

/// Where a DaemonSet's rollout is, from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    /// Nodes it should run on.
    desired: i32,
    /// Of those, nodes where its current pod is ready (its init containers succeeded).
    ready: i32,
    /// Whether the status describes the current spec.
    observed: bool,
}

impl Progress {
    fn of(daemonset: &DaemonSet) -> Self {
        let status = daemonset.status.clone().unwrap_or_default();
        let generation = daemonset.metadata.generation.unwrap_or(0);
        let updated = status.updated_number_scheduled.unwrap_or(0);
        Self {
            desired: status.desired_number_scheduled,
            // A ready pod of an older spec does not count.
            ready: status.number_ready.min(updated),
            observed: status.observed_generation.is_some_and(|g| g >= generation),
        }
    }

    fn done(self) -> bool {
        self.observed && self.ready >= self.desired
    }
}

/// Waits (reading every `poll`, at most `timeout`) until the DaemonSet `namespace/name` has run
/// on every node it schedules to, then deletes it.
pub async fn finish(
    client: Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<()> {
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shown = None;
    let daemonset = loop {
        let daemonset = daemonsets
            .get_opt(name)
            .await
            .with_context(|| format!("reading DaemonSet {namespace}/{name}"))?
            .ok_or_else(|| {
                anyhow!(
                    "DaemonSet {namespace}/{name} not found: nothing removes Ambit from the \
                     nodes (apply it first: deploy/manifests/uninstall/)"
                )
            })?;
        let progress = Progress::of(&daemonset);
        if progress.done() {
            break daemonset;
        }
        if shown != Some(progress) {
            info!(
                daemonset = %format!("{namespace}/{name}"),
                done = progress.ready,
                nodes = progress.desired,
                "waiting for every node to be uninstalled"
            );
            shown = Some(progress);
        }
        if tokio::time::Instant::now() >= deadline {
            let pending = not_done(&client, namespace, &daemonset).await;
            bail!(
                "DaemonSet {namespace}/{name} has uninstalled {} of {} nodes after {}; not done: \
                 {pending}. Those nodes keep Ambit's pins and CNI configuration until it runs \
                 there (it stays; see its pods)",
                progress.ready,
                progress.desired,
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(poll).await;
    };
    let progress = Progress::of(&daemonset);
    match daemonsets.delete(name, &DeleteParams::background()).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(e) => {
            return Err(e).with_context(|| format!("deleting DaemonSet {namespace}/{name}"));
        }
    }
    info!(
        daemonset = %format!("{namespace}/{name}"),
        nodes = progress.desired,
        "Ambit removed from every node (pins and CNI configuration); the DaemonSet is deleted"
    );
    Ok(())
}

/// The DaemonSet's pods that are not ready, as `node (pod: phase)`, for the timeout's message.
async fn not_done(client: &Client, namespace: &str, daemonset: &DaemonSet) -> String {
    let selector = daemonset
        .spec
        .selector
        .match_labels
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let listed = match pods.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => list.items,
        Err(e) => return format!("(cannot list its pods: {e})"),
    };
    let ready = |pod: &Pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let pending: Vec<String> = listed
        .iter()
        .filter(|pod| !ready(pod))
        .map(|pod| {
            let node = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| "(not scheduled)".into());
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_else(|| "Unknown".into());
            format!(
                "{node} (pod {}: {phase})",
                pod.metadata.name.as_deref().unwrap_or("?")
            )
        })
        .collect();
    if pending.is_empty() {
        "nodes without a pod of it yet".into()
    } else {
        pending.join(", ")
    }
}

/// Runs `ambit uninstall done`: prints that this node is uninstalled, then waits for SIGTERM
/// or SIGINT.
pub async fn done() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    println!("ambit: uninstalled on this node");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::api::apps::v1::{DaemonSetSpec, DaemonSetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use serde_json::json;

    use super::*;
    use crate::testing::fake_apiserver::FakeApiServer;

    const POLL: Duration = Duration::from_millis(20);

    fn daemonset(desired: i32, ready: i32, observed: i64) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("ambit-uninstall".into()),
                namespace: Some("ambit-system".into()),
                ..ObjectMeta::default()
            },
            spec: DaemonSetSpec {
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".to_string(),
                        "ambit-uninstall".to_string(),
                    )])),
                    ..LabelSelector::default()
                },
                ..DaemonSetSpec::default()
            },
            status: Some(DaemonSetStatus {
                desired_number_scheduled: desired,
                number_ready: ready,
                updated_number_scheduled: Some(desired),
                observed_generation: Some(observed),
                ..DaemonSetStatus::default()
            }),
        }
    }

    fn pod(name: &str, node: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ambit-system",
                         "labels": {"app.kubernetes.io/name": "ambit-uninstall"}},
            "spec": {"nodeName": node, "containers": [{"name": "done", "image": "ambit"}]},
            "status": {"phase": if ready { "Running" } else { "Pending" },
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}
        }))
        .unwrap()
    }

    #[test]
    fn done_means_every_node_ready_for_the_current_spec() {
        assert!(Progress::of(&daemonset(3, 3, 1)).done());
        assert!(!Progress::of(&daemonset(3, 2, 1)).done());
        // A status of an older generation, or none yet, says nothing of this spec.
        let mut stale = daemonset(3, 3, 1);
        stale.metadata.generation = Some(2);
        assert!(!Progress::of(&stale).done());
        assert!(!Progress::of(&DaemonSet::default()).done());
        // Ready pods of an older spec do not count.
        let mut old = daemonset(3, 3, 1);
        old.status.as_mut().unwrap().updated_number_scheduled = Some(1);
        assert!(!Progress::of(&old).done());
        // No node to run on: nothing to wait for.
        assert!(Progress::of(&daemonset(0, 0, 1)).done());
    }

    #[tokio::test]
    async fn waits_for_every_node_then_deletes_the_daemonset() {
        let api = FakeApiServer::start().await.unwrap();
        api.register::<DaemonSet>();
        api.apply(&daemonset(2, 1, 1));
        let finish = tokio::spawn(finish(
            api.client(),
            "ambit-system",
            "ambit-uninstall",
            Duration::from_secs(60),
            POLL,
        ));
        tokio::time::sleep(POLL * 10).await;
        assert!(!finish.is_finished(), "done with one node of two");
        assert!(
            api.get::<DaemonSet>("ambit-system", "ambit-uninstall")
                .is_some()
        );
        // The second node's pod has run its init containers.
        api.apply(&daemonset(2, 2, 1));
        tokio::time::timeout(Duration::from_secs(30), finish)
            .await
            .expect("finished once every node is done")
            .unwrap()
            .unwrap();
        assert!(
            api.get::<DaemonSet>("ambit-system", "ambit-uninstall")
                .is_none(),
            "the DaemonSet removes itself"
        );
    }

    #[tokio::test]
    async fn a_node_never_done_fails_naming_it_and_keeps_the_daemonset() {
        let api = FakeApiServer::start().await.unwrap();
        api.register::<DaemonSet>();
        api.apply(&daemonset(2, 1, 1));
        api.apply(&pod("ambit-uninstall-a", "node-a", true));
        api.apply(&pod("ambit-uninstall-b", "node-b", false));
        let err = finish(
            api.client(),
            "ambit-system",
            "ambit-uninstall",
            POLL * 5,
            POLL,
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("uninstalled 1 of 2 nodes")
                && err.contains("node-b (pod ambit-uninstall-b: Pending)")
                && !err.contains("node-a"),
            "{err}"
        );
        assert!(
            api.get::<DaemonSet>("ambit-system", "ambit-uninstall")
                .is_some()
        );

        let err = finish(api.client(), "ambit-system", "other", POLL, POLL)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("DaemonSet ambit-system/other not found"),
            "{err}"
        );
    }
}
