//! `ambit config workloads|services|policies|certificates|all`: what one agent holds, read from
//! its admin endpoint's `/config_dump` (docs/operations.md documents that shape), as a table, or
//! the same objects as JSON or YAML for scripts.
//!
//! Why through the admin endpoint and not from the configuration source: the question an
//! operator asks is what *this* agent believes (a rejected update, a source it cannot reach, a
//! pod it could not enrol); the source only says what it should believe.
use std::net::SocketAddr;

use anyhow::Context;
use clap::ValueEnum;
use serde_json::{Map, Value};

use super::{
    cluster::{self, KubeArgs},
    fetch::{self, Endpoint},
    table,
};

/// What to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum What {
    /// The workloads of the mesh (pods), with their identity and addresses.
    Workloads,
    /// The services, with their VIPs, ports, endpoints and waypoint.
    Services,
    /// PeerAuthentication and AuthorizationPolicy objects as the agent holds them.
    Policies,
    /// The certificates this agent holds for its pods' identities.
    Certificates,
    /// The whole config dump.
    All,
}

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// The objects as the admin endpoint serves them.
    Json,
    /// The same, as YAML.
    Yaml,
}

/// `ambit config`.
#[derive(clap::Args, Debug)]
pub struct ConfigArgs {
    /// What to show.
    #[arg(value_enum)]
    pub what: What,
    /// The agent's admin endpoint (on its node: `127.0.0.1:15000`).
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Read the agent of this node through the API server's pod port-forward (with the
    /// kubeconfig), instead of --admin.
    #[arg(long)]
    pub node: Option<String>,
    /// The cluster, for --node.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Only objects of this namespace (workloads, services, policies).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

/// Fetches the dump and prints it.
pub async fn run(args: ConfigArgs) -> anyhow::Result<()> {
    let endpoint = if args.node.is_some() || args.kube.named() {
        cluster::agent_endpoint(&args.kube, args.node.as_deref(), cluster::ADMIN_PORT).await?
    } else {
        Endpoint::Addr(args.admin)
    };
    let body = fetch::get_from(&endpoint, "/config_dump").await?;
    let dump: Value = serde_json::from_slice(&body)
        .with_context(|| format!("the config dump of {endpoint} is not JSON"))?;
    print!(
        "{}",
        render(&dump, args.what, args.output, args.namespace.as_deref())?
    );
    Ok(())
}

/// The policy lists of the dump (every key naming one, so kinds added later show up too).
const POLICY_KEYS: [&str; 2] = ["peerAuthentications", "authorizationPolicies"];

/// What `what` selects of `dump`, restricted to `namespace`, in `output`'s format.
pub fn render(
    dump: &Value,
    what: What,
    output: Output,
    namespace: Option<&str>,
) -> anyhow::Result<String> {
    let in_namespace = |item: &Value| match namespace {
        None => true,
        Some(ns) => namespace_of(item).as_deref() == Some(ns),
    };
    let list = |key: &str| -> Vec<Value> {
        dump[key]
            .as_array()
            .map(|items| items.iter().filter(|i| in_namespace(i)).cloned().collect())
            .unwrap_or_default()
    };
    let selected = match what {
        What::Workloads => Value::Array(list("workloads")),
        What::Services => Value::Array(list("services")),
        What::Certificates => dump["certificates"].clone(),
        What::Policies => Value::Object(
            POLICY_KEYS
                .iter()
                .map(|k| (k.to_string(), Value::Array(list(k))))
                .collect::<Map<_, _>>(),
        ),
        What::All => dump.clone(),
    };
    Ok(match output {
        Output::Json => format!("{selected:#}\n"),
        Output::Yaml => serde_yaml_ng::to_string(&selected).context("rendering YAML")?,
        Output::Table => match what {
            What::Workloads => workloads_table(&selected),
            What::Services => services_table(&selected),
            What::Policies => policies_table(&selected),
            What::Certificates => certificates_table(&selected),
            What::All => anyhow::bail!("`all` has no table; use -o json or -o yaml"),
        },
    })
}

/// A policy's namespace is its scope's; a workload's or service's, its own.
fn namespace_of(item: &Value) -> Option<String> {
    if let Some(ns) = item["namespace"].as_str() {
        return Some(ns.to_string());
    }
    let scope = &item["scope"];
    scope["namespace"]
        .as_str()
        .or_else(|| scope["workloads"]["namespace"].as_str())
        .map(str::to_string)
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

fn yes_no(v: &Value) -> String {
    if v.as_bool() == Some(true) {
        "yes"
    } else {
        "no"
    }
    .into()
}

fn rows(list: &Value, row: impl Fn(&Value) -> Vec<String>) -> Vec<Vec<String>> {
    list.as_array()
        .map(|items| items.iter().map(row).collect())
        .unwrap_or_default()
}

fn workloads_table(list: &Value) -> String {
    table::render(
        &[
            "NAMESPACE",
            "NAME",
            "NODE",
            "ADDRESSES",
            "IDENTITY",
            "ENROLLED",
            "READY",
        ],
        &rows(list, |w| {
            vec![
                text(&w["namespace"]),
                text(&w["name"]),
                text(&w["node"]),
                text(&w["ips"]),
                text(&w["identity"]),
                yes_no(&w["enrolled"]),
                yes_no(&w["ready"]),
            ]
        }),
    )
}

fn services_table(list: &Value) -> String {
    table::render(
        &[
            "NAMESPACE",
            "NAME",
            "VIPS",
            "PORTS",
            "ENDPOINTS",
            "WAYPOINT",
        ],
        &rows(list, |s| {
            let ports = s["ports"]
                .as_array()
                .map(|ports| {
                    ports
                        .iter()
                        .map(|p| match (p["port"].as_u64(), p["targetPort"].as_u64()) {
                            (Some(port), Some(target)) if port != target => {
                                format!("{port}->{target}")
                            }
                            (Some(port), _) => port.to_string(),
                            _ => "?".into(),
                        })
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let waypoint = match (
                s["waypoint"]["namespace"].as_str(),
                s["waypoint"]["name"].as_str(),
            ) {
                (Some(ns), Some(name)) => format!("{ns}/{name}"),
                _ => "-".into(),
            };
            vec![
                text(&s["namespace"]),
                text(&s["name"]),
                text(&s["vips"]),
                ports,
                text(&s["endpoints"]),
                waypoint,
            ]
        }),
    )
}

/// `mesh`, `namespace`, or `namespace: app=web,version=v1`.
fn scope_text(scope: &Value) -> String {
    if scope.as_str() == Some("mesh") {
        return "mesh-wide".into();
    }
    if let Some(ns) = scope["namespace"].as_str() {
        return format!("namespace {ns}");
    }
    let selector = &scope["workloads"];
    let labels = selector["labels"]
        .as_object()
        .map(|labels| {
            labels
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    match selector["namespace"].as_str() {
        Some(ns) => format!("{ns}: {labels}"),
        None => format!("every namespace: {labels}"),
    }
}

fn policies_table(policies: &Value) -> String {
    let mut all = Vec::new();
    for (key, kind) in POLICY_KEYS
        .iter()
        .zip(["PeerAuthentication", "AuthorizationPolicy"])
    {
        for p in policies[key].as_array().into_iter().flatten() {
            let effect = match kind {
                "PeerAuthentication" => p["mode"].as_str().unwrap_or("UNSET").to_string(),
                _ => {
                    let action = text(&p["action"]).to_uppercase();
                    if p["dryRun"].as_bool() == Some(true) {
                        format!("{action} (dry run)")
                    } else {
                        action
                    }
                }
            };
            let rules = p["rules"]
                .as_array()
                .map_or("-".to_string(), |r| r.len().to_string());
            all.push(vec![
                kind.to_string(),
                namespace_of(p).unwrap_or_else(|| "-".into()),
                text(&p["name"]),
                scope_text(&p["scope"]),
                effect,
                rules,
            ]);
        }
    }
    table::render(
        &[
            "KIND",
            "NAMESPACE",
            "NAME",
            "APPLIES TO",
            "MODE/ACTION",
            "RULES",
        ],
        &all,
    )
}

fn certificates_table(list: &Value) -> String {
    table::render(
        &["IDENTITY", "STATE", "NOT AFTER", "SERIAL", "LAST CA ERROR"],
        &rows(list, |c| {
            let state = if c["notAfter"].is_string() {
                "valid"
            } else {
                "pending"
            };
            vec![
                text(&c["id"]),
                state.into(),
                text(&c["notAfter"]),
                text(&c["serial"]),
                text(&c["lastError"]),
            ]
        }),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dump() -> Value {
        json!({
            "node": "n0",
            "workloads": [
                {"uid": "shop/web-0", "namespace": "shop", "name": "web-0", "node": "n0",
                 "ips": ["10.0.0.2", "fd00::2"], "identity": "spiffe://cluster.local/ns/shop/sa/web",
                 "enrolled": true, "ready": true},
                {"uid": "other/db-0", "namespace": "other", "name": "db-0", "node": "n1",
                 "ips": ["10.0.1.2"], "identity": "spiffe://cluster.local/ns/other/sa/db",
                 "enrolled": false, "ready": true}
            ],
            "services": [
                {"namespace": "shop", "name": "web", "vips": ["10.96.0.10"],
                 "ports": [{"port": 80, "targetPort": 8080}, {"port": 443, "targetPort": 443}],
                 "endpoints": ["shop/web-0"], "waypoint": {"namespace": "shop", "name": "wp"}}
            ],
            "peerAuthentications": [
                {"name": "default", "scope": "mesh", "mode": "STRICT"}
            ],
            "authorizationPolicies": [
                {"name": "allow-web", "scope": {"workloads": {"namespace": "shop",
                 "labels": {"app": "web"}}}, "action": "allow", "dryRun": false,
                 "rules": [{}, {}]}
            ],
            "certificates": [
                {"id": "spiffe://cluster.local/ns/shop/sa/web", "notAfter": "2026-12-07T00:00:00Z",
                 "serial": "ab12", "lastError": null}
            ]
        })
    }

    #[test]
    fn workloads_table_filters_by_namespace() {
        let out = render(&dump(), What::Workloads, Output::Table, Some("shop")).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(
            lines[0].starts_with("NAMESPACE  NAME   NODE  ADDRESSES"),
            "{out}"
        );
        assert!(lines[1].contains("10.0.0.2,fd00::2"), "{out}");
        assert!(
            lines[1].contains("spiffe://cluster.local/ns/shop/sa/web"),
            "{out}"
        );
        assert!(!out.contains("db-0"), "{out}");
    }

    #[test]
    fn services_show_ports_endpoints_and_waypoint() {
        let out = render(&dump(), What::Services, Output::Table, None).unwrap();
        let row = out.lines().nth(1).unwrap();
        for part in ["10.96.0.10", "80->8080,443", "shop/web-0", "shop/wp"] {
            assert!(row.contains(part), "{part} missing: {out}");
        }
    }

    #[test]
    fn policies_name_kind_scope_and_effect() {
        let out = render(&dump(), What::Policies, Output::Table, None).unwrap();
        assert!(
            out.lines().any(|l| l.starts_with("PeerAuthentication")
                && l.contains("mesh-wide")
                && l.contains("STRICT")),
            "{out}"
        );
        assert!(
            out.lines().any(|l| l.starts_with("AuthorizationPolicy")
                && l.contains("shop: app=web")
                && l.contains("ALLOW")
                && l.trim_end().ends_with('2')),
            "{out}"
        );
        // A namespace filter keeps the mesh-wide policy out (it has no namespace).
        let shop = render(&dump(), What::Policies, Output::Json, Some("shop")).unwrap();
        let v: Value = serde_json::from_str(&shop).unwrap();
        assert_eq!(v["peerAuthentications"], json!([]));
        assert_eq!(v["authorizationPolicies"][0]["name"], "allow-web");
    }

    #[test]
    fn json_and_yaml_carry_the_objects_and_all_has_no_table() {
        let yaml = render(&dump(), What::Certificates, Output::Yaml, None).unwrap();
        assert!(yaml.contains("serial: ab12"), "{yaml}");
        let table = render(&dump(), What::Certificates, Output::Table, None).unwrap();
        assert!(table.lines().nth(1).unwrap().contains("valid"), "{table}");
        let err = render(&dump(), What::All, Output::Table, None).unwrap_err();
        assert!(err.to_string().contains("-o json"), "{err}");
    }
}
