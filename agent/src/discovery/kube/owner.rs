//! Which workload a pod belongs to: the name of its controller, as Istio derives it
//! (`GetDeployMetaFromPod` in istio/istio `pkg/kube/util.go`, which istiod hands to ztunnel as
//! the workload's `workload_name`), so that metrics name a Deployment's pods by the Deployment
//! and dashboards draw one node per workload, not one per pod.
//!
//! Only the pod itself is read, never its owners: a Deployment's pods are owned by a
//! ReplicaSet named `<deployment>-<pod-template-hash>`, and the pod carries that hash as a
//! label, so the Deployment's name is the ReplicaSet's minus the hash; a CronJob's Job is named
//! `<cronjob>-<scheduled time in minutes>`. No extra watch, no extra API call, no RBAC.
//!
//! The rule, in Istio's order, for a pod whose name was generated (`generateName` set) and
//! that has a controller (the owner reference with `controller: true`):
//! - a ReplicaSet whose name ends with the pod's `pod-template-hash` label: the name without
//!   `-<hash>` (a Deployment); the same with `rollouts-pod-template-hash` (an Argo Rollout);
//! - a ReplicationController with a `deploymentconfig` label: that label (OpenShift);
//! - a Job named `<name>-<8 to 10 digits>`: `<name>` (a CronJob);
//! - any other controller (StatefulSet, DaemonSet, Job, a bare ReplicaSet...): its name.
//!
//! Otherwise (a pod created by name, or without a controller) the pod is its own workload and
//! this returns `None`. Istio's `service.istio.io/workload-name` label overrides either way;
//! [`crate::state::Workload::workload_name`] applies it, for every source.
use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The label a Deployment's ReplicaSet puts on its pods, and at the end of its own name.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// Argo Rollouts' equivalent of [`POD_TEMPLATE_HASH`].
const ROLLOUTS_POD_TEMPLATE_HASH: &str = "rollouts-pod-template-hash";
/// The label OpenShift's DeploymentConfig puts on the pods of its ReplicationControllers.
const DEPLOYMENT_CONFIG: &str = "deploymentconfig";

/// The name of the controller `pod` (its metadata) belongs to, or `None` if it is a workload of
/// its own. See the module documentation for the rule.
pub fn controller_name(pod: &ObjectMeta) -> Option<String> {
    if pod.generate_name.as_deref().is_none_or(str::is_empty) {
        return None;
    }
    let owner = pod
        .owner_references
        .as_deref()?
        .iter()
        .find(|owner| owner.controller == Some(true))?;
    let empty = BTreeMap::new();
    let labels = pod.labels.as_ref().unwrap_or(&empty);
    let label = |key: &str| {
        labels
            .get(key)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    };
    let name = owner.name.as_str();
    let derived = match owner.kind.as_str() {
        "ReplicaSet" => [POD_TEMPLATE_HASH, ROLLOUTS_POD_TEMPLATE_HASH]
            .into_iter()
            .find_map(|key| {
                let hash = label(key)?;
                // Istio's test is "ends with the hash", then it trims "-<hash>" (which may not
                // be there, leaving the name whole).
                name.ends_with(hash)
                    .then(|| name.strip_suffix(&format!("-{hash}")).unwrap_or(name))
            }),
        "ReplicationController" => label(DEPLOYMENT_CONFIG),
        "Job" => cronjob_of(name),
        _ => None,
    };
    Some(derived.unwrap_or(name).to_string())
}

/// The CronJob of a Job named `<cronjob>-<8 to 10 digits>` (Istio's `(.+)-\d{8,10}$`).
fn cronjob_of(job: &str) -> Option<&str> {
    let (cronjob, suffix) = job.rsplit_once('-')?;
    let timestamp = (8..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_digit());
    (timestamp && !cronjob.is_empty()).then_some(cronjob)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;

    fn pod(
        name: &str,
        generate_name: Option<&str>,
        owner: Option<(&str, &str, Option<bool>)>,
        labels: &[(&str, &str)],
    ) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            generate_name: generate_name.map(Into::into),
            owner_references: owner.map(|(kind, name, controller)| {
                vec![OwnerReference {
                    kind: kind.into(),
                    name: name.into(),
                    controller,
                    ..OwnerReference::default()
                }]
            }),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        }
    }

    fn controller(
        generate_name: Option<&str>,
        owner: (&str, &str),
        labels: &[(&str, &str)],
    ) -> Option<String> {
        controller_name(&pod(
            "pod-x",
            generate_name,
            Some((owner.0, owner.1, Some(true))),
            labels,
        ))
    }

    #[test]
    fn a_deployment_is_its_replica_set_without_the_template_hash() {
        let hash = [("pod-template-hash", "5d9f7c8b4")];
        assert_eq!(
            controller(
                Some("reviews-v1-5d9f7c8b4-"),
                ("ReplicaSet", "reviews-v1-5d9f7c8b4"),
                &hash
            )
            .as_deref(),
            Some("reviews-v1")
        );
        // Argo Rollouts' label works the same way.
        assert_eq!(
            controller(
                Some("canary-7f6d-"),
                ("ReplicaSet", "canary-7f6d"),
                &[("rollouts-pod-template-hash", "7f6d")]
            )
            .as_deref(),
            Some("canary")
        );
        // A ReplicaSet of its own (no hash label, or a hash that is not its suffix) is the
        // workload.
        assert_eq!(
            controller(Some("rs-"), ("ReplicaSet", "frontend"), &[]).as_deref(),
            Some("frontend")
        );
        assert_eq!(
            controller(
                Some("rs-"),
                ("ReplicaSet", "frontend"),
                &[("pod-template-hash", "abc")]
            )
            .as_deref(),
            Some("frontend")
        );
        // An empty hash label proves nothing.
        assert_eq!(
            controller(
                Some("rs-"),
                ("ReplicaSet", "web-1"),
                &[("pod-template-hash", "")]
            )
            .as_deref(),
            Some("web-1")
        );
    }

    #[test]
    fn stateful_sets_daemon_sets_and_jobs_are_named_by_themselves() {
        for kind in ["StatefulSet", "DaemonSet", "Job", "SomeOperatorKind"] {
            assert_eq!(
                controller(Some("db-"), (kind, "db"), &[]).as_deref(),
                Some("db"),
                "{kind}"
            );
        }
    }

    #[test]
    fn a_cron_job_is_its_job_without_the_schedule_suffix() {
        assert_eq!(
            controller(Some("x-"), ("Job", "backup-29034720"), &[]).as_deref(),
            Some("backup")
        );
        assert_eq!(
            controller(Some("x-"), ("Job", "nightly-report-1234567890"), &[]).as_deref(),
            Some("nightly-report")
        );
        // 7 or 11 digits, letters, or nothing before the dash: a plain Job.
        for job in [
            "backup-1234567",
            "backup-12345678901",
            "backup-2903472a",
            "-29034720",
        ] {
            assert_eq!(
                controller(Some("x-"), ("Job", job), &[]).as_deref(),
                Some(job),
                "{job}"
            );
        }
    }

    #[test]
    fn an_open_shift_deployment_config_is_named_by_its_label() {
        assert_eq!(
            controller(
                Some("x-"),
                ("ReplicationController", "app-3"),
                &[("deploymentconfig", "app")]
            )
            .as_deref(),
            Some("app")
        );
        assert_eq!(
            controller(Some("x-"), ("ReplicationController", "app-3"), &[]).as_deref(),
            Some("app-3")
        );
    }

    #[test]
    fn a_pod_of_its_own_has_no_controller() {
        // Created by name: even an owner does not make it a controller's pod (Istio's rule).
        assert_eq!(
            controller_name(&pod(
                "web-0",
                None,
                Some(("StatefulSet", "web", Some(true))),
                &[]
            )),
            None
        );
        assert_eq!(
            controller_name(&pod(
                "web-0",
                Some(""),
                Some(("StatefulSet", "web", Some(true))),
                &[]
            )),
            None
        );
        // Generated, but owned without being controlled, or not owned at all.
        for owner in [
            Some(("ReplicaSet", "web-5d9f", None)),
            Some(("ReplicaSet", "web-5d9f", Some(false))),
            None,
        ] {
            assert_eq!(
                controller_name(&pod(
                    "web-5d9f-x1",
                    Some("web-5d9f-"),
                    owner,
                    &[("pod-template-hash", "5d9f")]
                )),
                None,
                "{owner:?}"
            );
        }
    }

    #[test]
    fn the_controller_reference_is_the_one_that_counts() {
        let mut meta = pod(
            "x",
            Some("x-"),
            Some(("ConfigMap", "not-a-controller", None)),
            &[],
        );
        meta.owner_references
            .as_mut()
            .unwrap()
            .push(OwnerReference {
                kind: "DaemonSet".into(),
                name: "node-exporter".into(),
                controller: Some(true),
                ..OwnerReference::default()
            });
        assert_eq!(controller_name(&meta).as_deref(), Some("node-exporter"));
    }
}
