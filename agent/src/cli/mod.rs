//! Commands for people operating a mesh, beside the components' own commands: they read what
//! the running components expose (the agents' admin endpoint) and print it for a terminal or a
//! script. They hold no state and change nothing.
//!
//! `ambit config` is `istioctl ztunnel-config`: what one agent holds; `ambit stat` is `linkerd
//! viz stat` for what it carried.

pub mod config;
mod fetch;
pub mod stat;
mod table;
