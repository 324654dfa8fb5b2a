//! Commands for people operating a mesh, beside the components' own commands: they read what
//! the running components expose (the agents' admin endpoint) and print it for a terminal or a
//! script. They hold no state and change nothing.
//!
//! `ambit config` is `istioctl ztunnel-config`: what one agent holds; `ambit stat` is `linkerd
//! viz stat` for what it carried; `ambit check` is `linkerd check` for a node and its agent.

pub mod check;
pub mod config;
pub(crate) mod fetch;
pub mod stat;
mod table;
