//! The CNI side: commands, network configuration, results and errors as the CNI specification
//! (1.0, and the 0.3/0.4 versions runtimes still send) defines them.
//!
//! [`run`] is the whole plugin as a function of its invocation (the `CNI_*` environment), its
//! stdin (the network configuration) and the agent; `main` only wires the process to it.

use std::io::{BufReader, Write as _};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::protocol::{self, Outcome, Reply, Request, Sandbox};

/// The specification versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Error codes of the specification, and ours (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENVIRONMENT: u32 = 4;
    /// Failed to decode content.
    pub const DECODING_FAILURE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    /// Try again later: the runtime (kubelet) retries the sandbox.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Plugin not available (STATUS).
    pub const NOT_AVAILABLE: u32 = 50;
    /// The agent could not mesh a pod that must be meshed.
    pub const NOT_MESHED: u32 = 100;
}

/// A CNI error, printed as the specification's error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The error code ([`code`]).
    pub code: u32,
    /// A short message.
    pub msg: String,
    /// Details.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object of the specification.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// How the runtime invoked the plugin: the `CNI_*` environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invocation {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`.
    pub netns: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;`.
    pub args: String,
}

impl Invocation {
    /// Reads the invocation from `var` (the process environment in `main`).
    pub fn from_env(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| var(name).unwrap_or_default();
        Self {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }

    /// The value of `key` in `CNI_ARGS`.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .filter(|v| !v.is_empty())
    }
}

/// The network configuration on stdin: the specification's fields this plugin reads, and its
/// own. Unknown fields (`runtimeConfig`, `args`...) are allowed, as the specification requires.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// The specification version of the configuration (and of the result to print).
    pub cni_version: String,
    /// The previous plugin's result (required for ADD and CHECK: this plugin is chained).
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The agent's socket.
    #[serde(default = "default_socket")]
    pub agent_socket: PathBuf,
    /// How long to wait for the agent's answer.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Namespaces whose pods are never meshed and never wait for the agent (the agent's own,
    /// kube-system): they can start while the agent is down.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// The namespace of pods whose runtime passes no `K8S_POD_NAMESPACE` (podman).
    #[serde(default = "default_namespace")]
    pub default_namespace: String,
}

fn default_socket() -> PathBuf {
    PathBuf::from(protocol::DEFAULT_SOCKET)
}

fn default_timeout() -> u64 {
    30
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".into()]
}

fn default_namespace() -> String {
    "default".into()
}

/// How the plugin reaches the agent.
pub trait Agent {
    /// Sends `request` to the agent at `socket` and returns its reply.
    fn ask(&self, socket: &Path, timeout: Duration, request: &Request) -> Result<Reply, String>;
}

/// The agent at a Unix socket.
pub struct UnixAgent;

impl Agent for UnixAgent {
    fn ask(&self, socket: &Path, timeout: Duration, request: &Request) -> Result<Reply, String> {
        let stream = UnixStream::connect(socket).map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .map_err(|e| e.to_string())?;
        let mut writer = &stream;
        protocol::write_message(&mut writer, request).map_err(|e| format!("sending: {e}"))?;
        writer.flush().map_err(|e| e.to_string())?;
        protocol::read_message(&mut BufReader::new(&stream))
            .map_err(|e| format!("reading the reply: {e}"))
    }
}

/// The `VERSION` result.
pub fn version_result() -> Value {
    json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS})
}

/// Runs one invocation; `Ok(Some(result))` is printed on stdout, `Ok(None)` prints nothing.
pub fn run(inv: &Invocation, stdin: &[u8], agent: &impl Agent) -> Result<Option<Value>, CniError> {
    if inv.command == "VERSION" {
        return Ok(Some(version_result()));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODING_FAILURE,
            "cannot decode the network configuration",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("unsupported cniVersion {:?}", conf.cni_version),
            format!("ambit-cni supports {SUPPORTED_VERSIONS:?}"),
        ));
    }
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1));
    match inv.command.as_str() {
        "ADD" => {
            let prev = prev_result(&conf)?;
            let sandbox = sandbox(inv, &conf, ips(prev)?)?;
            if !conf.exclude_namespaces.contains(&sandbox.pod_namespace) {
                let reply = ask(agent, &conf, timeout, &Request::Add(sandbox.clone()))?;
                expect_meshed(&sandbox, reply)?;
            }
            // A chained plugin's result is the previous one, in the configuration's version.
            let mut result = prev.clone();
            result["cniVersion"] = json!(conf.cni_version);
            Ok(Some(result))
        }
        "DEL" => {
            // DEL must succeed even when there is nothing (left) to undo: without the agent,
            // the sandbox's namespace is going and nothing of it can be reached anyway.
            if let Ok(sandbox) = sandbox(inv, &conf, Vec::new())
                && !conf.exclude_namespaces.contains(&sandbox.pod_namespace)
            {
                let _ = agent.ask(&conf.agent_socket, timeout, &Request::Del(sandbox));
            }
            Ok(None)
        }
        "CHECK" => {
            let prev = prev_result(&conf)?;
            let sandbox = sandbox(inv, &conf, ips(prev)?)?;
            if !conf.exclude_namespaces.contains(&sandbox.pod_namespace) {
                let reply = ask(agent, &conf, timeout, &Request::Check(sandbox.clone()))?;
                expect_meshed(&sandbox, reply)?;
            }
            Ok(None)
        }
        "STATUS" => UnixStream::connect(&conf.agent_socket)
            .map(|_| None)
            .map_err(|e| {
                CniError::new(
                    code::NOT_AVAILABLE,
                    "the ambit agent is not reachable",
                    format!("{}: {e}", conf.agent_socket.display()),
                )
            }),
        "GC" => Ok(None),
        other => Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("unknown CNI_COMMAND {other:?}"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

fn prev_result(conf: &NetConf) -> Result<&Value, CniError> {
    conf.prev_result.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_NETWORK_CONFIG,
            "ambit-cni is a chained plugin: the network configuration has no prevResult",
            "list ambit-cni after the plugin that gives the pod its addresses in the conflist",
        )
    })
}

/// The pod's addresses in a previous result (`ips[].address`, CIDR notation).
fn ips(prev: &Value) -> Result<Vec<IpAddr>, CniError> {
    let Some(entries) = prev["ips"].as_array() else {
        return Ok(Vec::new());
    };
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            let text = entry["address"].as_str().unwrap_or_default();
            text.split('/')
                .next()
                .unwrap_or_default()
                .parse()
                .map_err(|e| {
                    CniError::new(
                        code::INVALID_NETWORK_CONFIG,
                        format!("prevResult.ips[{i}].address {text:?} is not an address"),
                        format!("{e}"),
                    )
                })
        })
        .collect()
}

fn sandbox(inv: &Invocation, conf: &NetConf, ips: Vec<IpAddr>) -> Result<Sandbox, CniError> {
    let pod_name = inv.arg("K8S_POD_NAME").ok_or_else(|| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_ARGS has no K8S_POD_NAME",
            format!("CNI_ARGS={:?}", inv.args),
        )
    })?;
    if inv.container_id.is_empty() {
        return Err(CniError::new(
            code::INVALID_ENVIRONMENT,
            "CNI_CONTAINERID is not set",
            "",
        ));
    }
    Ok(Sandbox {
        container_id: inv.container_id.clone(),
        netns: inv.netns.clone(),
        ifname: inv.ifname.clone(),
        pod_namespace: inv
            .arg("K8S_POD_NAMESPACE")
            .unwrap_or(&conf.default_namespace)
            .to_string(),
        pod_name: pod_name.to_string(),
        pod_uid: inv.arg("K8S_POD_UID").map(str::to_string),
        ips,
    })
}

fn ask(
    agent: &impl Agent,
    conf: &NetConf,
    timeout: Duration,
    request: &Request,
) -> Result<Reply, CniError> {
    agent
        .ask(&conf.agent_socket, timeout, request)
        .map_err(|e| {
            let msg = match request {
                Request::Check(_) => {
                    "the ambit agent is not reachable: the pod cannot be confirmed meshed"
                }
                _ => "the ambit agent is not reachable: the pod is not started unmeshed",
            };
            CniError::new(
                code::TRY_AGAIN_LATER,
                msg,
                format!("{}: {e}", conf.agent_socket.display()),
            )
        })
}

fn expect_meshed(sandbox: &Sandbox, reply: Reply) -> Result<(), CniError> {
    match reply.outcome {
        Outcome::Ok | Outcome::NotMeshed => Ok(()),
        Outcome::Failed => Err(CniError::new(
            code::NOT_MESHED,
            format!("ambit could not mesh pod {}", sandbox.pod()),
            reply.message,
        )),
        Outcome::Retry => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("ambit cannot decide about pod {} yet", sandbox.pod()),
            reply.message,
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Answers every request with `reply` (or fails to connect), recording the requests.
    struct Answering {
        reply: Result<Reply, String>,
        seen: Mutex<Vec<Request>>,
    }

    impl Answering {
        fn new(reply: Result<Reply, String>) -> Self {
            Self {
                reply,
                seen: Mutex::default(),
            }
        }
    }

    impl Agent for Answering {
        fn ask(&self, _: &Path, _: Duration, request: &Request) -> Result<Reply, String> {
            self.seen.lock().unwrap().push(request.clone());
            self.reply.clone()
        }
    }

    fn reply(outcome: Outcome) -> Result<Reply, String> {
        Ok(Reply {
            outcome,
            message: format!("{outcome:?}"),
        })
    }

    fn invocation(command: &str, args: &str) -> Invocation {
        Invocation {
            command: command.into(),
            container_id: "c0ffee".into(),
            netns: "/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            args: args.into(),
        }
    }

    const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=u-1";

    fn conf(prev: bool) -> Vec<u8> {
        let mut conf = json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "ambit-cni",
            "agentSocket": "/nonexistent/cni.sock",
            "runtimeConfig": {"portMappings": []},
        });
        if prev {
            conf["prevResult"] = json!({
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": "/run/netns/cni-1"}],
                "ips": [
                    {"address": "10.88.0.5/16", "gateway": "10.88.0.1", "interface": 0},
                    {"address": "fd00::5/64", "interface": 0},
                ],
            });
        }
        serde_json::to_vec(&conf).unwrap()
    }

    #[test]
    fn add_passes_the_previous_result_on_once_the_agent_has_meshed_the_pod() {
        let agent = Answering::new(reply(Outcome::Ok));
        let result = run(&invocation("ADD", K8S_ARGS), &conf(true), &agent)
            .unwrap()
            .unwrap();
        assert_eq!(result["ips"][0]["address"], "10.88.0.5/16");
        assert_eq!(result["cniVersion"], "1.0.0");
        let seen = agent.seen.lock().unwrap();
        let [Request::Add(sandbox)] = &seen[..] else {
            panic!("{seen:?}");
        };
        assert_eq!(sandbox.pod(), "shop/web-0");
        assert_eq!(sandbox.pod_uid.as_deref(), Some("u-1"));
        assert_eq!(sandbox.netns, "/run/netns/cni-1");
        assert_eq!(
            sandbox.ips,
            [
                "10.88.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn add_fails_the_sandbox_when_the_pod_cannot_be_meshed() {
        for (outcome, code) in [
            (Outcome::Failed, code::NOT_MESHED),
            (Outcome::Retry, code::TRY_AGAIN_LATER),
        ] {
            let err = run(
                &invocation("ADD", K8S_ARGS),
                &conf(true),
                &Answering::new(reply(outcome)),
            )
            .unwrap_err();
            assert_eq!(err.code, code, "{err:?}");
            assert!(err.msg.contains("shop/web-0"), "{err:?}");
        }
        let err = run(
            &invocation("ADD", K8S_ARGS),
            &conf(true),
            &Answering::new(Err("connection refused".into())),
        )
        .unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        assert!(err.details.contains("/nonexistent/cni.sock"), "{err:?}");
        // Not meshed: the previous result passes on.
        let result = run(
            &invocation("ADD", K8S_ARGS),
            &conf(true),
            &Answering::new(reply(Outcome::NotMeshed)),
        )
        .unwrap();
        assert!(result.is_some());
    }

    #[test]
    fn excluded_namespaces_never_wait_for_the_agent() {
        let agent = Answering::new(Err("down".into()));
        let args = "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1";
        assert!(run(&invocation("ADD", args), &conf(true), &agent).is_ok());
        assert!(agent.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn del_succeeds_without_the_agent_and_tells_it_when_it_is_there() {
        let down = Answering::new(Err("down".into()));
        let mut inv = invocation("DEL", K8S_ARGS);
        inv.netns.clear();
        assert_eq!(run(&inv, &conf(false), &down), Ok(None));
        let up = Answering::new(reply(Outcome::Ok));
        assert_eq!(run(&inv, &conf(false), &up), Ok(None));
        assert!(
            matches!(&up.seen.lock().unwrap()[..], [Request::Del(s)] if s.pod() == "shop/web-0")
        );
    }

    #[test]
    fn check_fails_unless_the_agent_confirms_the_pod_is_meshed_and_del_is_idempotent() {
        // The agent confirms: CHECK prints nothing and succeeds.
        let up = Answering::new(reply(Outcome::Ok));
        assert_eq!(
            run(&invocation("CHECK", K8S_ARGS), &conf(true), &up),
            Ok(None)
        );
        assert!(
            matches!(&up.seen.lock().unwrap()[..], [Request::Check(s)] if s.pod() == "shop/web-0" && s.ips.len() == 2)
        );
        // The agent is down: nothing can confirm the pod is meshed.
        let err = run(
            &invocation("CHECK", K8S_ARGS),
            &conf(true),
            &Answering::new(Err("connection refused".into())),
        )
        .unwrap_err();
        assert_eq!(err.code, code::TRY_AGAIN_LATER, "{err:?}");
        assert!(err.msg.contains("not reachable"), "{err:?}");
        assert!(err.details.contains("/nonexistent/cni.sock"), "{err:?}");
        // The agent says the pod is not meshed (closed, or its sandbox deleted), or does not know
        // it: CHECK fails with the same codes as ADD.
        for (outcome, code) in [
            (Outcome::Failed, code::NOT_MESHED),
            (Outcome::Retry, code::TRY_AGAIN_LATER),
        ] {
            let err = run(
                &invocation("CHECK", K8S_ARGS),
                &conf(true),
                &Answering::new(reply(outcome)),
            )
            .unwrap_err();
            assert_eq!(err.code, code, "{err:?}");
            assert!(err.msg.contains("shop/web-0"), "{err:?}");
            assert_eq!(err.details, format!("{outcome:?}"));
        }
        // Without prevResult there is nothing to check against.
        let err = run(&invocation("CHECK", K8S_ARGS), &conf(false), &up).unwrap_err();
        assert_eq!(err.code, code::INVALID_NETWORK_CONFIG, "{err:?}");
        // DEL twice, with or without the agent, succeeds each time and tells the agent each time
        // it is there (the agent forgets a sandbox it no longer has as a success).
        let up = Answering::new(reply(Outcome::Ok));
        let down = Answering::new(Err("down".into()));
        for agent in [&up, &down, &up, &down] {
            assert_eq!(
                run(&invocation("DEL", K8S_ARGS), &conf(false), agent),
                Ok(None)
            );
        }
        assert_eq!(up.seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn bad_invocations_name_what_is_wrong() {
        let agent = Answering::new(reply(Outcome::Ok));
        let err = run(&invocation("ADD", K8S_ARGS), &conf(false), &agent).unwrap_err();
        assert_eq!(err.code, code::INVALID_NETWORK_CONFIG);
        assert!(err.msg.contains("prevResult"), "{err:?}");
        let err = run(&invocation("ADD", "IgnoreUnknown=1"), &conf(true), &agent).unwrap_err();
        assert_eq!(err.code, code::INVALID_ENVIRONMENT);
        assert!(err.msg.contains("K8S_POD_NAME"), "{err:?}");
        let err = run(&invocation("ADD", K8S_ARGS), b"{not json", &agent).unwrap_err();
        assert_eq!(err.code, code::DECODING_FAILURE);
        let mut old = serde_json::from_slice::<Value>(&conf(true)).unwrap();
        old["cniVersion"] = json!("0.2.0");
        let err = run(
            &invocation("ADD", K8S_ARGS),
            &serde_json::to_vec(&old).unwrap(),
            &agent,
        )
        .unwrap_err();
        assert_eq!(err.code, code::INCOMPATIBLE_VERSION);
        let err = run(&invocation("FROB", K8S_ARGS), &conf(true), &agent).unwrap_err();
        assert!(err.msg.contains("FROB"), "{err:?}");
        let mut bad_ip = serde_json::from_slice::<Value>(&conf(true)).unwrap();
        bad_ip["prevResult"]["ips"][1]["address"] = json!("nonsense/64");
        let err = run(
            &invocation("ADD", K8S_ARGS),
            &serde_json::to_vec(&bad_ip).unwrap(),
            &agent,
        )
        .unwrap_err();
        assert!(err.msg.contains("prevResult.ips[1].address"), "{err:?}");
    }

    #[test]
    fn podman_passes_no_namespace_and_gets_the_default() {
        let agent = Answering::new(reply(Outcome::Ok));
        run(
            &invocation("ADD", "IgnoreUnknown=1;K8S_POD_NAME=ctr"),
            &conf(true),
            &agent,
        )
        .unwrap();
        assert!(
            matches!(&agent.seen.lock().unwrap()[..], [Request::Add(s)] if s.pod() == "default/ctr")
        );
    }

    #[test]
    fn version_lists_the_supported_versions() {
        let result = run(
            &invocation("VERSION", ""),
            b"",
            &Answering::new(reply(Outcome::Ok)),
        )
        .unwrap()
        .unwrap();
        assert_eq!(result["supportedVersions"].as_array().unwrap().len(), 5);
    }
}
