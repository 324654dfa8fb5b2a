//! Calling the `ambit-cni` plugin exactly as a container runtime does (CNI specification 1.0):
//! the `CNI_*` environment, the network configuration with the previous plugin's result on
//! stdin, the result or the error object on stdout.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Node, Pod, testbed};

/// What the plugin printed and how it exited.
#[derive(Debug)]
pub struct CniOutput {
    /// Exit status 0.
    pub success: bool,
    /// stdout, parsed (null when empty).
    pub stdout: Value,
    /// stderr, for messages.
    pub stderr: String,
}

impl CniOutput {
    /// The error object's code, if the plugin failed with one.
    pub fn error_code(&self) -> Option<u64> {
        (!self.success)
            .then(|| self.stdout["code"].as_u64())
            .flatten()
    }

    /// Whether the plugin failed with the specification's error object: `code`, CNI version
    /// 1.0.0, a `msg` containing `msg_has` and, unless `details_has` is empty, `details`
    /// containing it.
    pub fn failed_with(&self, code: u64, msg_has: &str, details_has: &str) -> bool {
        let has = |field: &str, part: &str| {
            self.stdout[field]
                .as_str()
                .is_some_and(|text| text.contains(part))
        };
        self.error_code() == Some(code)
            && self.stdout["cniVersion"] == "1.0.0"
            && has("msg", msg_has)
            && (details_has.is_empty() || has("details", details_has))
    }
}

/// The sandbox a runtime creates for `pod` (its namespace file, its addresses as the `bridge`
/// plugin would report them), under `container_id`.
pub struct Sandbox<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// The sandbox id (`CNI_CONTAINERID`).
    pub container_id: String,
}

impl<'a> Sandbox<'a> {
    /// A sandbox of `pod` with a fresh id.
    pub fn of(pod: &'a Pod, container_id: &str) -> Self {
        Self {
            pod,
            container_id: container_id.to_string(),
        }
    }

    /// The network configuration the runtime pipes to the plugin, pointed at `node`'s agent.
    pub fn config(&self, node: &Node) -> Value {
        let netns = self.pod.netns_path().display().to_string();
        json!({
            "cniVersion": "1.0.0",
            "name": "ambit-test",
            "type": "ambit-cni",
            "agentSocket": node.cni_socket(),
            "timeoutSeconds": 30,
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": netns}],
                "ips": [
                    {"address": format!("{}/32", self.pod.ip4()), "interface": 0},
                    {"address": format!("{}/128", self.pod.ip6()), "interface": 0},
                ],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        })
    }

    /// Runs `ambit-cni` with `command` (ADD, DEL, CHECK...), as the runtime does.
    pub fn call(&self, node: &Node, command: &str) -> Result<CniOutput> {
        let plugin = testbed::ambit_cni_bin();
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
            self.pod.namespace(),
            self.pod.name(),
            self.container_id,
            self.pod.uid()
        );
        let netns = if command == "DEL" {
            // Runtimes may call DEL after the namespace is gone; the plugin must cope.
            String::new()
        } else {
            self.pod.netns_path().display().to_string()
        };
        let mut child = Command::new(&plugin)
            .env_clear()
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &self.container_id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", args)
            .env(
                "CNI_PATH",
                plugin.parent().context("plugin directory")?.as_os_str(),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", plugin.display()))?;
        let config = serde_json::to_vec(&self.config(node))?;
        child
            .stdin
            .take()
            .context("plugin stdin")?
            .write_all(&config)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                bail!("{} {command} did not finish within 60 s", plugin.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(CniOutput {
            success: out.status.success(),
            stdout: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)
                    .with_context(|| format!("plugin stdout is not JSON: {text}"))?
            },
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }
}
