//! `ambit-cni`: a chained CNI plugin that has the node agent enrol a pod before it runs.
//!
//! A container runtime calls the plugin after the network plugin that gives the pod its
//! addresses (`bridge`, Calico, Cilium...), with that plugin's result as `prevResult`, and before
//! it starts any of the pod's containers. On `ADD` the plugin asks the node agent, over a Unix
//! socket, to enrol the pod's network namespace; the agent answers once the pod is meshed (or
//! that it is not to be meshed). If the agent cannot enrol a pod that should be, or cannot be
//! reached, `ADD` fails and the runtime fails the sandbox (kubelet retries): a pod is never
//! started unmeshed when it should be meshed. Istio's CNI plugin plays the same part for
//! ambient mode.
//!
//! The plugin is small on purpose (serde only): it runs once per sandbox, on every node, from
//! the host's CNI bin directory. [`protocol`] is its contract with the agent; [`plugin`] is the
//! CNI side, written as a function of the environment and stdin so it is tested without a
//! runtime.

pub mod plugin;
pub mod protocol;
