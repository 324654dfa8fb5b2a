//! `ambit check --pre` (can this node run the agent?) and `ambit check` (is the agent on this
//! node healthy?), or with `--cluster` the same questions of a cluster ([`super::cluster_check`]): one line per requirement, ok / warn / FAIL with the fix, as `linkerd check`
//! prints; the exit status is non-zero when anything failed.
//!
//! The node requirements are the agent's own preflight ([`crate::redirect::node_findings`]), so
//! `check --pre` and the agent's start-up can never disagree about what a node needs.
use std::{net::SocketAddr, path::PathBuf};

use anyhow::bail;
use clap::ValueEnum;
use serde_json::Value;

use super::{cluster::KubeArgs, cluster_check, fetch};
use crate::redirect::{Finding, RedirectConfig, Status, node_findings};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per check.
    #[default]
    Table,
    /// The findings as a JSON array.
    Json,
}

/// `ambit check`.
#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Check that this node can run the agent (privileges, kernel, BTF, cgroup v2, bpffs, CNI
    /// configuration, and whether its kernel splices same-node connections) instead of
    /// checking a running agent.
    #[arg(long)]
    pub pre: bool,
    /// With --pre: the cgroup v2 directory the agent will attach to [default: the cgroup2
    /// mount].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// With --pre: the agent's bpffs directory.
    #[arg(long, default_value = "/sys/fs/bpf/ambit")]
    pub bpffs: PathBuf,
    /// With --pre: the node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The running agent's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// The running agent's readiness endpoint.
    #[arg(long, default_value = "127.0.0.1:15021")]
    pub readiness: SocketAddr,
    /// Check the cluster through its API server (with the kubeconfig) instead of this node:
    /// after install, every node's agent, the CNI plugin, the CA, certificates, CRDs and
    /// policies; with --pre, the Kubernetes version and the RBAC to install. Implied by
    /// --kubeconfig and --context.
    #[arg(long)]
    pub cluster: bool,
    /// The cluster, for --cluster.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Runs the checks, prints them, and fails when one failed.
pub async fn run(args: CheckArgs) -> anyhow::Result<()> {
    let findings = if args.cluster || args.kube.named() {
        let client = args.kube.client().await?;
        let namespace = &args.kube.ambit_namespace;
        if args.pre {
            cluster_check::pre_install(&client, namespace).await
        } else {
            cluster_check::after_install(&client, namespace).await
        }
    } else if args.pre {
        pre_install(&args)
    } else {
        agent(&args).await
    };
    match args.output {
        Output::Table => print!("{}", render(&findings)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
    }
    let failed = findings.iter().filter(|f| f.status == Status::Fail).count();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

fn pre_install(args: &CheckArgs) -> Vec<Finding> {
    let cgroup = match &args.cgroup {
        Some(cgroup) => cgroup.clone(),
        None => crate::redirect::cgroup2_mount().unwrap_or_else(|_| "/sys/fs/cgroup".into()),
    };
    let mut findings = node_findings(&RedirectConfig {
        cgroup,
        bpffs: args.bpffs.clone(),
        max_spliced: ambit_common::limits::MAX_SPLICED as usize,
        fast_path: true,
    });
    findings.push(cni_configuration(&args.cni_conf_dir));
    // Loading programs needs what the findings above checked.
    if findings.iter().all(|f| f.status != Status::Fail) {
        findings.push(crate::redirect::splice_finding(&args.bpffs));
    }
    findings
}

/// The node's network plugin must be configured for `ambit-cni` to chain after it.
fn cni_configuration(dir: &std::path::Path) -> Finding {
    let configs: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.ends_with(".conflist") || name.ends_with(".conf"))
                .collect()
        })
        .unwrap_or_default();
    let check = "CNI configuration";
    if configs.is_empty() {
        Finding {
            check,
            status: Status::Warn,
            detail: format!("no network configuration in {}", dir.display()),
            fix: Some(
                "install the cluster's network plugin first (ambit-cni chains after it), or pass \
                 --cni-conf-dir"
                    .into(),
            ),
        }
    } else {
        Finding {
            check,
            status: Status::Ok,
            detail: format!("{} in {}", configs.join(", "), dir.display()),
            fix: None,
        }
    }
}

async fn agent(args: &CheckArgs) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.push(match fetch::get(args.readiness, "/healthz/ready").await {
        Ok(body) => finding("agent ready", Status::Ok, text(&body), None),
        Err(err) => finding(
            "agent ready",
            Status::Fail,
            format!("{err:#}"),
            Some("see the agent's log; `ambit config all -o json` shows its state"),
        ),
    });
    let dump = match fetch::get(args.admin, "/config_dump").await {
        Ok(body) => serde_json::from_slice::<Value>(&body).map_err(anyhow::Error::from),
        Err(err) => Err(err),
    };
    let dump = match dump {
        Ok(dump) => dump,
        Err(err) => {
            findings.push(finding(
                "agent state",
                Status::Fail,
                format!("{err:#}"),
                Some("is the agent running with its admin endpoint at --admin?"),
            ));
            return findings;
        }
    };
    findings.extend(dump_findings(&dump));
    findings
}

fn text(body: &[u8]) -> String {
    String::from_utf8_lossy(body).trim().to_string()
}

fn finding(check: &'static str, status: Status, detail: String, fix: Option<&str>) -> Finding {
    Finding {
        check,
        status,
        detail,
        fix: fix.map(str::to_string),
    }
}

/// What the config dump says: the configuration in force, enrolment, certificates.
fn dump_findings(dump: &Value) -> Vec<Finding> {
    let mut findings = Vec::new();
    let config = &dump["config"];
    findings.push(match config["lastError"].as_str() {
        None => finding(
            "configuration",
            Status::Ok,
            format!(
                "generation {} from {}",
                config["generation"],
                config["source"].as_str().unwrap_or("?")
            ),
            None,
        ),
        Some(error) => finding(
            "configuration",
            Status::Warn,
            format!("the last update was rejected, the previous one is in force: {error}"),
            Some("fix the field the error names"),
        ),
    });
    let closed = dump["closed"].as_array().map_or(0, Vec::len);
    // Pod to the reason it is not enrolled.
    let failures = dump["enrolmentFailures"]
        .as_object()
        .map(|f| f.keys().cloned().collect::<Vec<_>>())
        .unwrap_or_default();
    let enrolled = dump["enrolled"].as_array().map_or(0, Vec::len);
    findings.push(if failures.is_empty() {
        finding(
            "enrolment",
            Status::Ok,
            format!("{enrolled} pods enrolled"),
            None,
        )
    } else {
        finding(
            "enrolment",
            if closed > 0 {
                Status::Fail
            } else {
                Status::Warn
            },
            format!(
                "{enrolled} pods enrolled; not enrolled: {} ({closed} closed: no traffic in or \
                 out until enrolment completes)",
                failures.join(", ")
            ),
            Some("`ambit config all -o json` shows enrolmentFailures and why"),
        )
    });
    let certificates = dump["certificates"].as_array().cloned().unwrap_or_default();
    let pending: Vec<&str> = certificates
        .iter()
        .filter(|c| !c["notAfter"].is_string())
        .filter_map(|c| c["id"].as_str())
        .collect();
    let soonest = certificates
        .iter()
        .filter_map(|c| c["notAfter"].as_str())
        .min();
    let errors: Vec<String> = certificates
        .iter()
        .filter_map(|c| {
            Some(format!(
                "{}: {}",
                c["id"].as_str()?,
                c["lastError"].as_str()?
            ))
        })
        .collect();
    findings.push(if !pending.is_empty() {
        finding(
            "certificates",
            Status::Fail,
            format!("no certificate yet for {}", pending.join(", ")),
            Some("is the CA reachable from the node? see lastError in `ambit config certificates`"),
        )
    } else if !errors.is_empty() {
        finding(
            "certificates",
            Status::Warn,
            format!(
                "{} valid, renewal failing: {}",
                certificates.len(),
                errors.join("; ")
            ),
            Some("is the CA reachable from the node?"),
        )
    } else {
        finding(
            "certificates",
            Status::Ok,
            format!(
                "{} valid{}",
                certificates.len(),
                soonest
                    .map(|t| format!(", the first expires {t} (renewed at half-life)"))
                    .unwrap_or_default()
            ),
            None,
        )
    });
    findings
}

pub(crate) fn render(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let mark = match f.status {
            Status::Ok => "[ok]  ",
            Status::Warn => "[warn]",
            Status::Fail => "[FAIL]",
        };
        out.push_str(&format!("{mark} {}: {}\n", f.check, f.detail));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("       fix: {fix}\n"));
        }
    }
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    out.push_str(&format!(
        "\n{} ok, {} warnings, {} failed\n",
        count(Status::Ok),
        count(Status::Warn),
        count(Status::Fail)
    ));
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_rejected_update_warns_and_a_missing_certificate_fails() {
        let dump = json!({
            "config": {"generation": 3, "source": "file:/m.yaml", "lastError": "field x"},
            "enrolled": ["a/b"],
            "enrolmentFailures": {},
            "closed": [],
            "certificates": [
                {"id": "spiffe://td/ns/a/sa/b", "notAfter": "2026-12-07T00:00:00Z", "lastError": null},
                {"id": "spiffe://td/ns/a/sa/c", "notAfter": null, "lastError": "CA down"}
            ]
        });
        let findings = dump_findings(&dump);
        let status = |check: &str| findings.iter().find(|f| f.check == check).unwrap().status;
        assert_eq!(status("configuration"), Status::Warn);
        assert_eq!(status("enrolment"), Status::Ok);
        assert_eq!(status("certificates"), Status::Fail);
        let out = render(&findings);
        assert!(out.contains("[FAIL] certificates: no certificate yet for spiffe://td/ns/a/sa/c"));
        assert!(out.contains("fix: fix the field the error names"), "{out}");
        assert!(out.ends_with("1 ok, 1 warnings, 1 failed\n"), "{out}");
    }

    #[test]
    fn a_missing_cni_configuration_warns_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let f = cni_configuration(dir.path());
        assert_eq!(f.status, Status::Warn);
        std::fs::write(dir.path().join("10-bridge.conflist"), "{}").unwrap();
        let f = cni_configuration(dir.path());
        assert_eq!(f.status, Status::Ok);
        assert!(f.detail.contains("10-bridge.conflist"));
    }
}
