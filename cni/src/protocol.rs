//! The plugin's requests to the node agent and the agent's replies.
//!
//! One request per connection on the agent's Unix socket: the plugin writes one JSON object
//! and a newline, the agent answers with one JSON object and a newline, and closes. The socket
//! is the agent's (root only): whoever can write to it can ask the agent to enrol a namespace.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Where the agent listens unless configured otherwise (on the host; the DaemonSet mounts it).
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";

/// The largest request or reply accepted, in bytes (a request is a few hundred).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// A pod sandbox, as the runtime describes it to the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sandbox {
    /// `CNI_CONTAINERID`: the sandbox's id.
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace file (empty on some `DEL`s).
    pub netns: String,
    /// `CNI_IFNAME`: the interface the runtime set up.
    pub ifname: String,
    /// `K8S_POD_NAMESPACE` (or the plugin's `defaultNamespace`).
    pub pod_namespace: String,
    /// `K8S_POD_NAME`.
    pub pod_name: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Sandbox {
    /// `namespace/name`, as the agent names workloads.
    pub fn pod(&self) -> String {
        format!("{}/{}", self.pod_namespace, self.pod_name)
    }
}

/// What the plugin asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "UPPERCASE")]
pub enum Request {
    /// The sandbox was created: enrol it if its pod is to be meshed; answer once done.
    Add(Sandbox),
    /// The sandbox is going: forget it.
    Del(Sandbox),
    /// Is the sandbox as `ADD` left it (meshed if it should be)?
    Check(Sandbox),
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reply {
    /// What came of the request.
    pub outcome: Outcome,
    /// Why, for people (the plugin passes it on in its error).
    pub message: String,
}

/// The outcomes of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Outcome {
    /// The pod is meshed (`ADD`, `CHECK`), or forgotten (`DEL`).
    Ok,
    /// The pod is not to be meshed; nothing was done.
    NotMeshed,
    /// The pod should be meshed and is not: the sandbox must not run.
    Failed,
    /// The agent cannot decide yet (it does not know the pod): try again later.
    Retry,
}

/// Reads one newline-terminated JSON message of at most [`MAX_MESSAGE`] bytes.
pub fn read_message<T: for<'de> Deserialize<'de>>(
    reader: &mut impl std::io::BufRead,
) -> Result<T, String> {
    let mut line = Vec::new();
    let mut limited = std::io::Read::take(reader, MAX_MESSAGE as u64 + 1);
    std::io::BufRead::read_until(&mut limited, b'\n', &mut line).map_err(|e| e.to_string())?;
    if line.len() > MAX_MESSAGE {
        return Err(format!("message longer than {MAX_MESSAGE} bytes"));
    }
    if line.last() != Some(&b'\n') {
        return Err("connection closed before a complete message".into());
    }
    serde_json::from_slice(&line).map_err(|e| format!("malformed message: {e}"))
}

/// Writes `message` as one JSON line.
pub fn write_message<T: Serialize>(
    writer: &mut impl std::io::Write,
    message: &T,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message)?;
    line.push(b'\n');
    writer.write_all(&line)?;
    writer.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox() -> Sandbox {
        Sandbox {
            container_id: "abc".into(),
            netns: "/run/netns/cni-1".into(),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: "web-0".into(),
            pod_uid: None,
            ips: vec!["10.0.0.5".parse().unwrap()],
        }
    }

    #[test]
    fn requests_round_trip_as_one_line_each() {
        let mut buf = Vec::new();
        write_message(&mut buf, &Request::Add(sandbox())).unwrap();
        write_message(&mut buf, &Request::Del(sandbox())).unwrap();
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 2);
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"command":"ADD","containerId":"abc""#),
            "{text}"
        );
        let mut reader = std::io::BufReader::new(&buf[..]);
        assert_eq!(
            read_message::<Request>(&mut reader).unwrap(),
            Request::Add(sandbox())
        );
        assert_eq!(
            read_message::<Request>(&mut reader).unwrap(),
            Request::Del(sandbox())
        );
        assert!(
            read_message::<Request>(&mut reader).is_err(),
            "nothing left"
        );
    }

    #[test]
    fn oversized_truncated_and_malformed_messages_are_refused() {
        let long = vec![b' '; MAX_MESSAGE + 10];
        let err = read_message::<Request>(&mut std::io::BufReader::new(&long[..])).unwrap_err();
        assert!(err.contains("longer than"), "{err}");
        let err = read_message::<Request>(&mut &b"{\"command\":\"ADD\""[..]).unwrap_err();
        assert!(err.contains("before a complete message"), "{err}");
        let err = read_message::<Request>(&mut &b"{\"command\":\"RUN\"}\n"[..]).unwrap_err();
        assert!(err.contains("malformed"), "{err}");
    }
}
