//! `ambit check` against a cluster (`--cluster`, `--kubeconfig` or `--context`): after install,
//! is Ambit healthy everywhere? With `--pre`: can this cluster and this user install it? One
//! [`Finding`] per requirement, printed as `ambit check` on a node prints them.
//!
//! After install: every node's agent pod ready (the nodes without one named), the CNI plugin
//! in place on every node (the agent pod's `install-cni` container, which chains the plugin
//! and keeps it chained, running; the agent's own dump says nothing of the plugin), the CA
//! Deployment available and its `/ready` answering, every agent's certificates valid (from
//! each agent's `/config_dump`, with the earliest expiry), the CRDs present and at this
//! release's version (the `ambit.dev/version` label the chart and the manifests carry), and
//! the policies accepted (the `Accepted` condition the CA's status writer sets). The agents'
//! and the CA's endpoints are read through the API server's pod port-forward.
//!
//! Before install: the API server's version within the supported range, and whether the user
//! may create every kind the chart creates (a SelfSubjectAccessReview per kind).
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        },
        core::v1::{Node, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Resource,
    api::{ListParams, PostParams},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{
    cluster::{self, is_ready, node_of},
    fetch::{self, Endpoint},
};
use crate::{
    discovery::kube::{
        crd,
        security::{
            ACCEPTED_CONDITION, AuthorizationPolicyResource, PeerAuthenticationResource,
            PolicyStatus, RequestAuthenticationResource,
        },
    },
    redirect::{Finding, Status},
};

/// The oldest Kubernetes minor version supported (the chart's `kubeVersion`, `>=1.30`).
pub const MIN_KUBERNETES: (u32, u32) = (1, 30);
/// The newest Kubernetes minor version Ambit is built against (k8s-openapi's `v1_37`).
pub const MAX_KUBERNETES: (u32, u32) = (1, 37);

/// The kinds the chart creates (with its uninstall hook), as (API group, resource, whether
/// namespaced): what the installing user must be allowed to create. (The optional GatewayClass
/// and PodMonitors are left out: they need CRDs of other projects.)
pub const INSTALLED_KINDS: [(&str, &str, bool); 13] = [
    ("", "namespaces", false),
    ("", "serviceaccounts", true),
    ("", "services", true),
    ("", "configmaps", true),
    ("apps", "daemonsets", true),
    ("apps", "deployments", true),
    ("batch", "jobs", true),
    ("policy", "poddisruptionbudgets", true),
    ("rbac.authorization.k8s.io", "clusterroles", false),
    ("rbac.authorization.k8s.io", "clusterrolebindings", false),
    ("rbac.authorization.k8s.io", "roles", true),
    ("rbac.authorization.k8s.io", "rolebindings", true),
    ("apiextensions.k8s.io", "customresourcedefinitions", false),
];

fn finding(check: &'static str, status: Status, detail: String, fix: Option<String>) -> Finding {
    Finding {
        check,
        status,
        detail,
        fix,
    }
}

/// Everything after install, in `namespace`.
pub async fn after_install(client: &Client, namespace: &str) -> Vec<Finding> {
    let mut findings = Vec::new();
    let pods = match cluster::agent_pods(client, namespace).await {
        Ok(pods) => pods,
        Err(err) => {
            findings.push(finding(
                "agents",
                Status::Fail,
                format!("{err:#}"),
                Some("check the kubeconfig, the namespace (--ambit-namespace) and RBAC".into()),
            ));
            Vec::new()
        }
    };
    findings.push(agents(client, namespace, &pods).await);
    findings.push(cni(&pods));
    findings.push(ca(client, namespace).await);
    findings.push(certificates(client, namespace, &pods).await);
    findings.push(crds(client).await);
    findings.push(policies(client).await);
    findings
}

/// A pod's name.
fn name(pod: &Pod) -> &str {
    pod.metadata.name.as_deref().unwrap_or("?")
}

/// Why a pod is not ready, from its containers' states.
fn why_not_ready(pod: &Pod) -> String {
    let status = pod.status.as_ref();
    let waiting: Vec<String> = status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| !c.ready)
        .map(|c| {
            let state = c.state.as_ref();
            let reason = state
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.clone())
                .or_else(|| {
                    state
                        .and_then(|s| s.terminated.as_ref())
                        .and_then(|t| t.reason.clone())
                })
                .unwrap_or_else(|| "not ready".into());
            format!("container {}: {reason}", c.name)
        })
        .collect();
    if waiting.is_empty() {
        format!(
            "phase {}",
            status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
        )
    } else {
        waiting.join(", ")
    }
}

/// Every node that should run an agent runs a ready one.
async fn agents(client: &Client, namespace: &str, pods: &[Pod]) -> Finding {
    let check = "agents";
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match daemonsets.get_opt(cluster::AGENT_DAEMONSET).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return finding(
                check,
                Status::Fail,
                format!(
                    "DaemonSet {namespace}/{} not found",
                    cluster::AGENT_DAEMONSET
                ),
                Some(format!(
                    "install Ambit (helm install ambit deploy/helm/ambit -n {namespace}, or kubectl \
                     apply -f deploy/manifests/), or pass --ambit-namespace"
                )),
            );
        }
        Err(err) => {
            return finding(
                check,
                Status::Fail,
                format!(
                    "reading DaemonSet {namespace}/{}: {err} (RBAC: get daemonsets)",
                    cluster::AGENT_DAEMONSET
                ),
                None,
            );
        }
    }
    // The agent tolerates every taint: every node should run one.
    let nodes: BTreeSet<String> = match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect(),
        // Without the right to list nodes, the nodes the agents are on.
        Err(_) => pods
            .iter()
            .filter_map(node_of)
            .map(str::to_string)
            .collect(),
    };
    let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in pods {
        if let Some(node) = node_of(pod) {
            by_node.entry(node).or_default().push(pod);
        }
    }
    let mut missing = Vec::new();
    let mut ready = 0;
    for node in &nodes {
        match by_node.get(node.as_str()) {
            None => missing.push(format!("{node} (no agent pod)")),
            Some(pods) if pods.iter().any(|p| is_ready(p)) => ready += 1,
            Some(pods) => missing.push(format!(
                "{node} (pod {}: {})",
                name(pods[0]),
                why_not_ready(pods[0])
            )),
        }
    }
    if missing.is_empty() {
        finding(
            check,
            Status::Ok,
            format!("a ready agent on each of the {ready} nodes"),
            None,
        )
    } else {
        finding(
            check,
            Status::Fail,
            format!(
                "{ready} of {} nodes have a ready agent; not ready: {}",
                nodes.len(),
                missing.join("; ")
            ),
            Some(format!(
                "kubectl -n {namespace} describe pod <pod> and kubectl -n {namespace} logs <pod> \
                 -c {}; `ambit check --pre` on the node says what it lacks",
                cluster::AGENT_CONTAINER
            )),
        )
    }
}

/// The CNI installer runs beside every agent.
fn cni(pods: &[Pod]) -> Finding {
    let check = "CNI plugin";
    let mut missing = Vec::new();
    for pod in pods {
        let installer = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .find(|c| c.name == cluster::CNI_CONTAINER);
        if !installer.is_some_and(|c| c.ready) {
            missing.push(format!(
                "{} (pod {})",
                node_of(pod).unwrap_or("?"),
                name(pod)
            ));
        }
    }
    if pods.is_empty() {
        finding(
            check,
            Status::Fail,
            "no agent pod, so no CNI installer".into(),
            None,
        )
    } else if missing.is_empty() {
        finding(
            check,
            Status::Ok,
            format!(
                "{} chained and watched on every node",
                cluster::CNI_CONTAINER
            ),
            None,
        )
    } else {
        finding(
            check,
            Status::Fail,
            format!(
                "the {} container is not running on: {}; new meshed pods there wait for it",
                cluster::CNI_CONTAINER,
                missing.join(", ")
            ),
            Some(format!(
                "kubectl logs <pod> -c {} (is the node's CNI configuration directory \
                 /etc/cni/net.d populated by the network plugin?)",
                cluster::CNI_CONTAINER
            )),
        )
    }
}

/// The CA Deployment is available and its readiness endpoint answers.
async fn ca(client: &Client, namespace: &str) -> Finding {
    let check = "CA";
    let deployment = cluster::CA_DEPLOYMENT;
    let fix = Some(format!(
        "kubectl -n {namespace} describe deployment {deployment}; kubectl -n {namespace} logs \
         deployment/{deployment}"
    ));
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let available = match deployments.get_opt(deployment).await {
        Ok(Some(d)) => d
            .status
            .and_then(|s| s.conditions)
            .into_iter()
            .flatten()
            .any(|c| {
                c.type_.as_deref() == Some("Available") && c.status.as_deref() == Some("True")
            }),
        Ok(None) => {
            return finding(
                check,
                Status::Fail,
                format!("Deployment {namespace}/{deployment} not found"),
                fix,
            );
        }
        Err(err) => {
            return finding(
                check,
                Status::Fail,
                format!("reading Deployment {namespace}/{deployment}: {err}"),
                fix,
            );
        }
    };
    if !available {
        return finding(
            check,
            Status::Fail,
            format!("Deployment {namespace}/{deployment} is not available"),
            fix,
        );
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = match pods
        .list(&ListParams::default().labels(cluster::CA_SELECTOR))
        .await
    {
        Ok(list) => list.items.into_iter().find(is_ready),
        Err(err) => {
            return finding(
                check,
                Status::Fail,
                format!("listing the CA pods ({}): {err}", cluster::CA_SELECTOR),
                fix,
            );
        }
    };
    let Some(pod) = pod else {
        return finding(
            check,
            Status::Fail,
            format!("no ready CA pod ({}) in {namespace}", cluster::CA_SELECTOR),
            fix,
        );
    };
    let endpoint = Endpoint::Pod {
        client: client.clone(),
        namespace: namespace.to_string(),
        pod: name(&pod).to_string(),
        port: cluster::CA_MONITORING_PORT,
    };
    match fetch::get_from(&endpoint, "/ready").await {
        Ok(_) => finding(
            check,
            Status::Ok,
            format!("Deployment {namespace}/{deployment} available, /ready answers"),
            None,
        ),
        Err(err) => finding(check, Status::Fail, format!("{err:#}"), fix),
    }
}

/// The certificates every ready agent holds, from its config dump.
async fn certificates(client: &Client, namespace: &str, pods: &[Pod]) -> Finding {
    let mut dumps = Vec::new();
    let mut unreachable = Vec::new();
    for pod in pods.iter().filter(|p| is_ready(p)) {
        let node = node_of(pod).unwrap_or("?").to_string();
        let endpoint = Endpoint::Pod {
            client: client.clone(),
            namespace: namespace.to_string(),
            pod: name(pod).to_string(),
            port: cluster::ADMIN_PORT,
        };
        let dump = fetch::get_from(&endpoint, "/config_dump")
            .await
            .and_then(|body| Ok(serde_json::from_slice::<Value>(&body)?));
        match dump {
            Ok(dump) => dumps.push((node, dump)),
            Err(err) => unreachable.push(format!("{node}: {err:#}")),
        }
    }
    certificates_of(&dumps, &unreachable, jiff::Timestamp::now())
}

/// The certificates finding of the agents' dumps (node, dump) at `now`.
fn certificates_of(
    dumps: &[(String, Value)],
    unreachable: &[String],
    now: jiff::Timestamp,
) -> Finding {
    let check = "certificates";
    let mut total = 0;
    let mut pending = Vec::new();
    let mut expired = Vec::new();
    let mut failing = Vec::new();
    let mut earliest: Option<(jiff::Timestamp, String)> = None;
    for (node, dump) in dumps {
        for cert in dump["certificates"].as_array().into_iter().flatten() {
            let id = cert["id"].as_str().unwrap_or("?");
            let Some(not_after) = cert["notAfter"]
                .as_str()
                .and_then(|t| t.parse::<jiff::Timestamp>().ok())
            else {
                pending.push(format!("{id} on {node}"));
                continue;
            };
            total += 1;
            if not_after <= now {
                expired.push(format!("{id} on {node}"));
            }
            if let Some(error) = cert["lastError"].as_str() {
                failing.push(format!("{id} on {node}: {error}"));
            }
            if earliest.as_ref().is_none_or(|(t, _)| not_after < *t) {
                earliest = Some((not_after, format!("{id} on {node}")));
            }
        }
    }
    let fix = Some(
        "is the CA reachable from the nodes? `ambit config certificates --node <node>` shows \
         each certificate's lastError"
            .to_string(),
    );
    if !unreachable.is_empty() {
        return finding(
            check,
            Status::Fail,
            format!(
                "cannot read the agents' certificates: {}",
                unreachable.join("; ")
            ),
            Some("RBAC: create pods/portforward in Ambit's namespace".into()),
        );
    }
    if !pending.is_empty() || !expired.is_empty() {
        let mut problems = Vec::new();
        if !pending.is_empty() {
            problems.push(format!("no certificate yet for {}", pending.join(", ")));
        }
        if !expired.is_empty() {
            problems.push(format!("expired: {}", expired.join(", ")));
        }
        return finding(check, Status::Fail, problems.join("; "), fix);
    }
    let first = earliest
        .map(|(t, what)| format!(", the first expires {t} ({what}; renewed at half-life)"))
        .unwrap_or_default();
    if failing.is_empty() {
        finding(
            check,
            Status::Ok,
            format!("{total} valid on {} nodes{first}", dumps.len()),
            None,
        )
    } else {
        finding(
            check,
            Status::Warn,
            format!(
                "{total} valid{first}; renewal failing: {}",
                failing.join("; ")
            ),
            fix,
        )
    }
}

/// Every CRD Ambit installs is there, at this release's version.
async fn crds(client: &Client) -> Finding {
    let check = "CRDs";
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let installed = match api.list(&ListParams::default()).await {
        Ok(list) => list.items,
        Err(err) => {
            return finding(
                check,
                Status::Fail,
                format!(
                    "listing CustomResourceDefinitions: {err} (RBAC: list customresourcedefinitions)"
                ),
                None,
            );
        }
    };
    crds_of(&installed)
}

fn crds_of(installed: &[CustomResourceDefinition]) -> Finding {
    let check = "CRDs";
    let version = env!("CARGO_PKG_VERSION");
    let mut missing = Vec::new();
    let mut other = Vec::new();
    let expected: Vec<String> = crd::definitions()
        .into_iter()
        .filter_map(|d| d.crd.metadata.name)
        .collect();
    for name in &expected {
        match installed
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
        {
            None => missing.push(name.clone()),
            Some(c) => {
                let label = c
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(crd::VERSION_LABEL));
                if label.map(String::as_str) != Some(version) {
                    other.push(format!(
                        "{name} at {}",
                        label.map_or("no version", String::as_str)
                    ));
                }
            }
        }
    }
    let fix = Some(
        "install this release's CRDs: helm upgrade (crds.enabled=true), or kubectl apply -f \
         deploy/crds/"
            .to_string(),
    );
    if !missing.is_empty() {
        finding(
            check,
            Status::Fail,
            format!("missing: {}", missing.join(", ")),
            fix,
        )
    } else if !other.is_empty() {
        finding(
            check,
            Status::Warn,
            format!(
                "not at version {version} ({}): {}",
                crd::VERSION_LABEL,
                other.join(", ")
            ),
            fix,
        )
    } else {
        finding(
            check,
            Status::Ok,
            format!("{} present, at version {version}", expected.len()),
            None,
        )
    }
}

/// Every policy is accepted as written.
async fn policies(client: &Client) -> Finding {
    let mut all = Vec::new();
    let mut errors = Vec::new();
    async fn read<K>(
        client: &Client,
        all: &mut Vec<(String, String, Option<PolicyStatus>, Option<i64>)>,
        errors: &mut Vec<String>,
        status: impl Fn(&K) -> Option<PolicyStatus>,
    ) where
        K: Resource<DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
    {
        match Api::<K>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => all.extend(list.items.iter().map(|p| {
                let meta = p.meta();
                (
                    K::kind(&()).into_owned(),
                    format!(
                        "{}/{}",
                        meta.namespace.as_deref().unwrap_or(""),
                        meta.name.as_deref().unwrap_or("")
                    ),
                    status(p),
                    meta.generation,
                )
            })),
            Err(err) => errors.push(format!("listing {}: {err}", K::plural(&()))),
        }
    }
    read::<AuthorizationPolicyResource>(client, &mut all, &mut errors, |p| p.status.clone()).await;
    read::<PeerAuthenticationResource>(client, &mut all, &mut errors, |p| p.status.clone()).await;
    read::<RequestAuthenticationResource>(client, &mut all, &mut errors, |p| p.status.clone())
        .await;
    policies_of(&all, &errors)
}

fn policies_of(
    all: &[(String, String, Option<PolicyStatus>, Option<i64>)],
    errors: &[String],
) -> Finding {
    let check = "policies";
    if !errors.is_empty() {
        return finding(
            check,
            Status::Fail,
            errors.join("; "),
            Some("are the CRDs installed? (see the CRDs line)".into()),
        );
    }
    let mut rejected = Vec::new();
    let mut pending = 0;
    for (kind, name, status, generation) in all {
        let accepted = status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == ACCEPTED_CONDITION));
        match accepted {
            Some(c) if c.status == "False" => {
                rejected.push(format!("{kind} {name}: {}: {}", c.reason, c.message));
            }
            Some(c) if c.status == "True" && c.observed_generation >= *generation => {}
            _ => pending += 1,
        }
    }
    let pending_note = if pending > 0 {
        format!(" ({pending} not evaluated yet by the CA's status writer)")
    } else {
        String::new()
    };
    if rejected.is_empty() {
        finding(
            check,
            Status::Ok,
            format!("{} accepted{pending_note}", all.len() - pending),
            None,
        )
    } else {
        finding(
            check,
            Status::Fail,
            format!("not accepted: {}{pending_note}", rejected.join("; ")),
            Some("fix the field the message names (docs/crds.md, \"Status\")".into()),
        )
    }
}

/// Before install: the Kubernetes version and the RBAC to install into `namespace`.
pub async fn pre_install(client: &Client, namespace: &str) -> Vec<Finding> {
    vec![
        kubernetes_version(client).await,
        rbac(client, namespace).await,
    ]
}

async fn kubernetes_version(client: &Client) -> Finding {
    let check = "Kubernetes version";
    match client.apiserver_version().await {
        Ok(info) => version_of(&info.major, &info.minor, &info.git_version),
        Err(err) => finding(
            check,
            Status::Fail,
            format!("GET /version: {err}"),
            Some("check the kubeconfig (--kubeconfig, --context)".into()),
        ),
    }
}

fn version_of(major: &str, minor: &str, git_version: &str) -> Finding {
    let check = "Kubernetes version";
    // Some providers write the minor as "30+".
    let number = |s: &str| s.trim_end_matches('+').parse::<u32>().ok();
    let (min, max) = (MIN_KUBERNETES, MAX_KUBERNETES);
    let range = format!("{}.{} to {}.{}", min.0, min.1, max.0, max.1);
    match (number(major), number(minor)) {
        (Some(major), Some(minor)) if (major, minor) < min => finding(
            check,
            Status::Fail,
            format!("{git_version} is older than {}.{}", min.0, min.1),
            Some(format!("upgrade the cluster: Ambit supports {range}")),
        ),
        (Some(major), Some(minor)) if (major, minor) > max => finding(
            check,
            Status::Warn,
            format!(
                "{git_version} is newer than the newest tested, {}.{}",
                max.0, max.1
            ),
            Some(format!(
                "Ambit is tested on {range}; check the release notes"
            )),
        ),
        (Some(_), Some(_)) => finding(
            check,
            Status::Ok,
            format!("{git_version} (supported: {range})"),
            None,
        ),
        _ => finding(
            check,
            Status::Warn,
            format!("cannot read the version {major:?}.{minor:?} ({git_version})"),
            None,
        ),
    }
}

/// Whether the user may create every kind the chart creates.
async fn rbac(client: &Client, namespace: &str) -> Finding {
    let check = "RBAC to install";
    let api: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for (group, resource, namespaced) in INSTALLED_KINDS {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.to_string()),
                    resource: Some(resource.to_string()),
                    verb: Some("create".into()),
                    namespace: namespaced.then(|| namespace.to_string()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let what = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        match api.create(&PostParams::default(), &review).await {
            Ok(answer) if answer.status.as_ref().is_some_and(|s| s.allowed) => {}
            Ok(answer) => denied.push(format!(
                "create {what}{}{}",
                if namespaced {
                    format!(" in {namespace}")
                } else {
                    String::new()
                },
                answer
                    .status
                    .and_then(|s| s.reason)
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )),
            Err(err) => {
                return finding(
                    check,
                    Status::Fail,
                    format!("SelfSubjectAccessReview for create {what}: {err}"),
                    None,
                );
            }
        }
    }
    if denied.is_empty() {
        finding(
            check,
            Status::Ok,
            format!(
                "may create the {} kinds the chart creates",
                INSTALLED_KINDS.len()
            ),
            None,
        )
    } else {
        finding(
            check,
            Status::Fail,
            format!("denied: {}", denied.join(", ")),
            Some("install as a cluster administrator, or grant these verbs".into()),
        )
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn cert(id: &str, not_after: Option<&str>, error: Option<&str>) -> Value {
        json!({"id": id, "notAfter": not_after, "lastError": error})
    }

    #[test]
    fn certificates_fail_when_missing_or_expired_and_warn_when_renewal_fails() {
        let now: jiff::Timestamp = "2026-12-07T00:00:00Z".parse().unwrap();
        let dumps =
            |certs: Vec<Value>| vec![("node-a".to_string(), json!({"certificates": certs}))];
        let ok = certificates_of(
            &dumps(vec![
                cert("spiffe://td/ns/a/sa/x", Some("2026-12-08T00:00:00Z"), None),
                cert("spiffe://td/ns/a/sa/y", Some("2026-12-07T12:00:00Z"), None),
            ]),
            &[],
            now,
        );
        assert_eq!(ok.status, Status::Ok);
        assert_eq!(
            ok.detail,
            "2 valid on 1 nodes, the first expires 2026-12-07T12:00:00Z (spiffe://td/ns/a/sa/y \
             on node-a; renewed at half-life)"
        );
        let expired = certificates_of(
            &dumps(vec![
                cert(
                    "spiffe://td/ns/a/sa/x",
                    Some("2026-12-06T23:59:59Z"),
                    Some("CA down"),
                ),
                cert("spiffe://td/ns/a/sa/y", None, Some("CA down")),
            ]),
            &[],
            now,
        );
        assert_eq!(expired.status, Status::Fail);
        assert_eq!(
            expired.detail,
            "no certificate yet for spiffe://td/ns/a/sa/y on node-a; expired: \
             spiffe://td/ns/a/sa/x on node-a"
        );
        let failing = certificates_of(
            &dumps(vec![cert(
                "spiffe://td/ns/a/sa/x",
                Some("2026-12-08T00:00:00Z"),
                Some("CA down"),
            )]),
            &[],
            now,
        );
        assert_eq!(failing.status, Status::Warn);
        assert!(
            failing
                .detail
                .ends_with("renewal failing: spiffe://td/ns/a/sa/x on node-a: CA down")
        );
    }

    #[test]
    fn the_kubernetes_version_is_checked_against_the_supported_range() {
        assert_eq!(version_of("1", "29", "v1.29.4").status, Status::Fail);
        assert_eq!(version_of("1", "30+", "v1.30.1-eks").status, Status::Ok);
        assert_eq!(version_of("1", "38", "v1.38.0").status, Status::Warn);
        assert_eq!(version_of("", "", "weird").status, Status::Warn);
    }
}
