//! Commands for people operating a mesh, beside the components' own commands: they read what
//! the running components expose (the agents' admin endpoint) and print it for a terminal or a
//! script. They hold no state and change nothing, but for the last step of an uninstall.
//!
//! `ambit config` is `istioctl ztunnel-config`: what one agent holds; `ambit stat` is `linkerd
//! viz stat` for what it carried; `ambit check` is `linkerd check` for a node and its agent, or for a cluster
//! through its API server (`cluster`, `cluster_check`);
//! `ambit uninstall cluster` waits until every node is uninstalled and removes the DaemonSet
//! that did it.

pub mod check;
pub mod cluster;
pub mod cluster_check;
#[cfg(test)]
pub(crate) mod cluster_tests;
pub mod config;
pub mod fetch;
pub mod stat;
mod table;
pub mod uninstall;
