//! Ambit: the node agent (`ambit agent`), the CA (`ambit ca`) and the parts both proxies share.
//!
//! Data flows one way: a mesh source ([`discovery`]) publishes a [`state::MeshState`]; the
//! enrolment reconciler ([`enrolment`]) turns it into per-pod listeners and eBPF map entries
//! ([`redirect`]); the node [`proxy`] serves the connections the kernel steers to those
//! listeners, carrying mesh traffic in [`hbone`] tunnels.
//!
//! Modules sit in layers and use only the layers below their own (docs/architecture.md draws
//! them; `tests/layering.rs` enforces them). At the bottom, [`backoff`], [`serdes`],
//! [`timefmt`], [`telemetry`], [`netns`] and [`relay`] depend on nothing else of the crate; the
//! shared parts ([`identity`], [`limits`], [`policy`], [`state`], [`hbone`]) depend on nothing
//! of the node agent's.
//!
//! Test support (test CAs, the fake Kubernetes API server, HBONE test servers) is the module
//! `testing`, compiled only for tests: this crate's (`cfg(test)`) and other crates' through the
//! `testing` feature, which only dev-dependencies enable (docs/testing.md).
pub mod admin;
pub mod allocator;
pub mod app;
pub mod backoff;
pub mod ca;
pub mod cli;
pub mod cni;
pub mod discovery;
pub mod enrolment;
pub mod handover;
pub mod hbone;
pub mod identity;
pub mod limits;
pub mod netns;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod relay;
pub mod serdes;
pub mod state;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod timefmt;
pub mod waypoint;
