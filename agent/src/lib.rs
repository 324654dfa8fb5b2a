//! Ambit's node agent: socket-layer eBPF redirection into a node-level L4 proxy.
//!
//! Data flows one way: a configuration source ([`config`]) publishes a [`state::MeshState`];
//! the enrolment reconciler ([`inpod`]) turns it into per-pod listeners and eBPF map entries
//! ([`redirect`]); the [`proxy`] serves the connections the kernel steers to those listeners.
//!
//! [`backoff`], [`serdes`] and [`timefmt`] are small helpers every layer uses; they depend on
//! nothing else of the crate.
pub mod admin;
pub mod agent;
pub mod backoff;
pub mod ca;
pub mod cni;
pub mod config;
pub mod identity;
pub mod inpod;
pub mod limits;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod serdes;
pub mod state;
pub mod telemetry;
pub mod timefmt;
