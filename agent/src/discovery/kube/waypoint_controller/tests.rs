//! The waypoint controller against the fake API server, and `generate`.
use std::time::Duration;

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::Deployment,
    core::v1::{ConfigMap, Service, ServiceAccount},
    rbac::v1::ClusterRoleBinding,
};
use serde_json::{Value, json};

use super::*;
use crate::{
    discovery::kube::{convert::waypoint_for, gateway::GatewayResource},
    testing::fake_apiserver::FakeApiServer,
};

const WAIT: Duration = Duration::from_secs(20);

fn settings() -> WaypointSettings {
    WaypointSettings {
        image: "registry.example.com/ambit/ambit:1.2.3".into(),
        ca_address: "https://ambit-ca.ambit-system.svc:15012".into(),
        roots_pem: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n".into(),
        root_namespace: "ambit-system".into(),
    }
}

/// A Gateway as `ambit waypoint generate` prints it, with `edit` applied to its JSON.
fn gateway(namespace: &str, name: &str, edit: impl FnOnce(&mut Value)) -> GatewayResource {
    let mut value: Value = serde_yaml_ng::from_str(&generate(namespace, name)).unwrap();
    edit(&mut value);
    serde_json::from_value(value).unwrap()
}

fn start(server: &FakeApiServer) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    server.register_with_status::<GatewayResource>();
    server.register::<Deployment>();
    server.register::<ServiceAccount>();
    server.register::<ConfigMap>();
    server.register::<ClusterRoleBinding>();
    let controller = WaypointController::new(server.client(), settings())
        .retry_interval(Duration::from_millis(50));
    tokio::spawn(controller.run())
}

/// Waits until `f` holds for the Gateway's status conditions (as JSON).
async fn wait_status(server: &FakeApiServer, name: &str, f: impl Fn(&Value) -> bool) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(gateway) = server.get::<GatewayResource>("shop", name) {
                let status = serde_json::to_value(&gateway.status).unwrap();
                if f(&status) {
                    return status;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "timed out waiting for the status of {name}: {:?}",
            server.get::<GatewayResource>("shop", name)
        )
    })
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

#[test]
fn generate_prints_an_istio_style_waypoint_gateway() {
    let yaml = generate("shop", "waypoint");
    let value: Value = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(
        value,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
            "spec": {
                "gatewayClassName": "ambit-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        })
    );
    // It is a valid Gateway the controller accepts.
    let gateway: GatewayResource = serde_yaml_ng::from_str(&yaml).unwrap();
    assert_eq!(check(&gateway), Ok(()));
}

#[test]
fn listeners_other_than_hbone_on_15008_are_rejected_by_field() {
    let cases = [
        (
            gateway("shop", "w", |g| {
                g["spec"]["listeners"][0]["protocol"] = json!("HTTP")
            }),
            "ListenersNotValid",
            "spec.listeners[0].protocol",
        ),
        (
            gateway("shop", "w", |g| {
                g["spec"]["listeners"][0]["port"] = json!(8080)
            }),
            "ListenersNotValid",
            "spec.listeners[0].port",
        ),
        (
            gateway("shop", "w", |g| {
                g["spec"]["listeners"][0]["hostname"] = json!("a.example.com")
            }),
            "ListenersNotValid",
            "spec.listeners[0]",
        ),
        (
            gateway("shop", "w", |g| g["spec"]["listeners"] = json!([])),
            "ListenersNotValid",
            "spec.listeners",
        ),
        (
            gateway("shop", "w", |g| {
                g["spec"]["addresses"] = json!([{"type": "IPAddress", "value": "10.0.0.1"}])
            }),
            "UnsupportedAddress",
            "spec.addresses",
        ),
    ];
    for (gateway, reason, field) in cases {
        let rejection = check(&gateway).unwrap_err();
        assert_eq!(rejection.reason, reason, "{rejection:?}");
        assert!(
            rejection.message.starts_with(&format!("{field}:")),
            "{rejection:?}"
        );
    }
}

#[test]
fn the_deployment_runs_a_waypoint_the_flags_parse_and_services_can_bind_to() {
    let gw = gateway("shop", "waypoint", |g| {
        g["metadata"]["uid"] = json!("0000-1111")
    });
    let objects = settings().objects(&gw);
    let pod = objects.deployment.spec.template.spec.as_ref().unwrap();
    let container = &pod.containers[0];
    // The container's arguments are valid `ambit waypoint` flags, in Kubernetes mode, with its
    // identity's name and namespace from the pod.
    #[derive(clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Command,
    }
    #[derive(clap::Subcommand)]
    enum Command {
        Waypoint(crate::waypoint::WaypointCommand),
    }
    // The pod's name comes from POD_NAME (below), as clap reads it; given here as the flag.
    let args = std::iter::once("ambit".to_string())
        .chain(container.args.clone().unwrap())
        .chain(["--name".to_string(), "waypoint-5d8f-x2".to_string()]);
    let Command::Waypoint(parsed) = Cli::try_parse_from(args).unwrap().command;
    let run = parsed.run.expect("runs a waypoint");
    assert!(run.kube && run.mesh_file.is_none());
    assert_eq!(run.ca_address, "https://ambit-ca.ambit-system.svc:15012");
    let env: Vec<(String, String)> = container
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| {
            let path = e.value_from.unwrap().field_ref.unwrap().field_path;
            (e.name, path)
        })
        .collect();
    assert!(env.contains(&("POD_NAME".into(), "metadata.name".into())));
    assert!(env.contains(&("POD_NAMESPACE".into(), "metadata.namespace".into())));
    // The files it reads are where its volumes are mounted.
    let mounts: Vec<&str> = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.as_str())
        .collect();
    for file in [&run.ca_roots, &run.ca_token_file] {
        assert!(
            mounts.iter().any(|m| file.starts_with(m)),
            "{file:?} not under {mounts:?}"
        );
    }
    // Not enrolled, and running as the Gateway's ServiceAccount.
    let labels = objects
        .deployment
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    assert_eq!(
        labels.get("ambit.dev/mode").map(String::as_str),
        Some("none")
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    // `--kube` reads the API in-cluster: the pod needs its account's API token mounted (the
    // ServiceAccount itself mounts none by default; the pod's setting wins).
    assert_eq!(pod.automount_service_account_token, Some(true));
    // The Service selects the pods, on 15008, under the Gateway's name: what a service's
    // `ambit.dev/use-waypoint: waypoint` label names.
    let service = objects.service.spec.as_ref().unwrap();
    let selector = service.selector.as_ref().unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    assert_eq!(service.ports.as_ref().unwrap()[0].port, 15008);
    let bound = waypoint_for(
        &ObjectMeta {
            name: Some("reviews".into()),
            namespace: Some("shop".into()),
            labels: Some([("ambit.dev/use-waypoint".to_string(), "waypoint".to_string())].into()),
            ..Default::default()
        },
        None,
    )
    .unwrap();
    assert_eq!(
        (bound.namespace.as_str(), bound.name.as_str()),
        (
            objects.service.metadata.namespace.as_deref().unwrap(),
            objects.service.metadata.name.as_deref().unwrap()
        )
    );
}

#[tokio::test]
async fn a_waypoint_gateway_becomes_owned_objects_with_status() {
    let server = FakeApiServer::start().await.unwrap();
    let controller = start(&server);
    server.apply(&gateway("shop", "waypoint", |_| {}));
    // A Gateway of another class is not Ambit's.
    server.apply(&gateway("shop", "ingress", |g| {
        g["spec"]["gatewayClassName"] = json!("other")
    }));

    let status = wait_status(&server, "waypoint", |s| {
        condition(s, "Programmed")["status"] == "True"
    })
    .await;
    let accepted = condition(&status, "Accepted");
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&json!("True"), &json!("Accepted"))
    );
    assert_eq!(accepted["observedGeneration"], json!(1));
    assert_eq!(condition(&status, "Programmed")["reason"], "Programmed");
    assert_eq!(
        status["addresses"],
        json!([{"type": "Hostname", "value": "waypoint.shop.svc.cluster.local"}])
    );

    let gw = server.get::<GatewayResource>("shop", "waypoint").unwrap();
    let uid = gw.metadata.uid.clone().unwrap();
    let deployment = server
        .get::<Deployment>("shop", "waypoint")
        .expect("a Deployment");
    let service = server
        .get::<Service>("shop", "waypoint")
        .expect("a Service");
    let account = server
        .get::<ServiceAccount>("shop", "waypoint")
        .expect("a ServiceAccount");
    let roots = server
        .get::<ConfigMap>("shop", "waypoint-ca-roots")
        .expect("the trust bundle");
    for meta in [
        &deployment.metadata,
        &service.metadata,
        &account.metadata,
        &roots.metadata,
    ] {
        let owners = meta.owner_references.as_ref().unwrap();
        assert_eq!(owners.len(), 1);
        let owner = &owners[0];
        assert_eq!(
            (
                owner.api_version.as_str(),
                owner.kind.as_str(),
                owner.name.as_str(),
                owner.uid.as_str(),
                owner.controller
            ),
            (
                "gateway.networking.k8s.io/v1",
                "Gateway",
                "waypoint",
                uid.as_str(),
                Some(true)
            ),
            "{meta:?}"
        );
    }
    assert_eq!(
        roots.data.unwrap()["roots.pem"],
        settings().roots_pem,
        "the mesh's trust bundle"
    );
    let container = &deployment.spec.template.spec.unwrap().containers[0];
    assert_eq!(container.image.as_deref(), Some(settings().image.as_str()));
    assert!(server.get::<Deployment>("shop", "ingress").is_none());
    assert!(
        server
            .get::<GatewayResource>("shop", "ingress")
            .unwrap()
            .status
            .is_none()
    );

    // Its objects follow the Gateway: deleted behind its back and the Gateway edited, they
    // are applied again.
    server.delete::<Deployment>("shop", "waypoint").unwrap();
    server.modify::<GatewayResource>("shop", "waypoint", |g| {
        g.spec.listeners[0].name = "hbone".into();
    });
    tokio::time::timeout(WAIT, async {
        while server.get::<Deployment>("shop", "waypoint").is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the Deployment is applied again");
    wait_status(&server, "waypoint", |s| {
        condition(s, "Programmed")["observedGeneration"] == json!(2)
    })
    .await;

    // Its ServiceAccount may read what the Kubernetes source reads (a cluster-wide binding,
    // which the controller deletes with the Gateway).
    let binding = server
        .get::<ClusterRoleBinding>("", "ambit-waypoint:shop:waypoint")
        .expect("a ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "ambit-waypoint");
    let subject = &binding.subjects.unwrap()[0];
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", "waypoint", Some("shop"))
    );
    server
        .delete::<GatewayResource>("shop", "waypoint")
        .unwrap();
    tokio::time::timeout(WAIT, async {
        while server
            .get::<ClusterRoleBinding>("", "ambit-waypoint:shop:waypoint")
            .is_some()
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the binding is deleted with the Gateway");
    assert!(!controller.is_finished());
}

#[tokio::test]
async fn a_gateway_a_waypoint_cannot_serve_is_rejected_and_not_deployed() {
    let server = FakeApiServer::start().await.unwrap();
    let _controller = start(&server);
    server.apply(&gateway("shop", "waypoint", |g| {
        g["spec"]["listeners"][0]["protocol"] = json!("HTTP");
    }));
    let status = wait_status(&server, "waypoint", |s| {
        condition(s, "Accepted")["status"] == "False"
    })
    .await;
    let accepted = condition(&status, "Accepted");
    assert_eq!(accepted["reason"], "ListenersNotValid");
    assert!(
        accepted["message"]
            .as_str()
            .unwrap()
            .starts_with("spec.listeners[0].protocol: \"HTTP\""),
        "{accepted}"
    );
    assert_eq!(condition(&status, "Programmed")["status"], "False");
    assert!(server.get::<Deployment>("shop", "waypoint").is_none());

    // Fixed, it is deployed.
    server.modify::<GatewayResource>("shop", "waypoint", |g| {
        g.spec.listeners[0].protocol = "HBONE".into();
    });
    wait_status(&server, "waypoint", |s| {
        condition(s, "Programmed")["status"] == "True"
    })
    .await;
    assert!(server.get::<Deployment>("shop", "waypoint").is_some());
}

#[test]
fn the_shipped_gateway_class_is_the_controllers() {
    let plain: Value = serde_yaml_ng::from_str(include_str!(
        "../../../../../deploy/gateway/gatewayclass.yaml"
    ))
    .unwrap();
    assert_eq!(plain["kind"], "GatewayClass");
    assert_eq!(plain["apiVersion"], GATEWAY_API_VERSION);
    assert_eq!(plain["metadata"]["name"], WAYPOINT_CLASS);
    assert_eq!(plain["spec"]["controllerName"], CONTROLLER_NAME);
    let chart = include_str!("../../../../../deploy/helm/ambit/templates/gatewayclass.yaml");
    assert!(
        chart.contains(&format!("  name: {WAYPOINT_CLASS}\n")),
        "{chart}"
    );
    assert!(
        chart.contains(&format!("  controllerName: {CONTROLLER_NAME}\n")),
        "{chart}"
    );
}
