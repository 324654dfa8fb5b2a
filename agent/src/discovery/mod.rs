//! Configuration sources: where the [`MeshState`](crate::state::MeshState) comes from.
//!
//! A source publishes each new state on a `tokio::sync::watch` channel and reports how it is
//! doing on another ([`ConfigStatus`]). A source that receives a bad configuration keeps the last
//! good state published and reports the error instead: the mesh never falls back to "nothing".
pub mod file;
pub mod kube;
pub mod metrics;

use anyhow::Context as _;
use serde::Serialize;
use tokio::{sync::watch, task::JoinHandle};

pub use self::file::{ConfigError, load_mesh_file, parse_mesh, watch_mesh_file};

/// Waits until the source running as `source` has published its first state (a status with a
/// generation). A process must not start on a configuration it cannot read: if the source ends
/// first, its error is returned. From Kubernetes this may take a while; the source logs why
/// (API server unreachable...).
pub async fn first_load(
    source: &mut JoinHandle<anyhow::Result<()>>,
    status: &mut watch::Receiver<ConfigStatus>,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            result = &mut *source => {
                return Err(match result {
                    Ok(Ok(())) => anyhow::anyhow!("configuration source ended before loading"),
                    Ok(Err(err)) => err,
                    Err(err) => err.into(),
                });
            }
            changed = status.changed() => {
                changed.context("configuration source ended")?;
                if status.borrow().generation > 0 {
                    return Ok(());
                }
            }
        }
    }
}

/// The health of a configuration source, for the admin endpoint and readiness.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigStatus {
    /// How many states the source has published; 0 until the first one.
    pub generation: u64,
    /// Why the source's latest input was rejected, while the last good state stays in force.
    pub last_error: Option<String>,
    /// Which source this is, e.g. `file:/etc/ambit/mesh.yaml`.
    pub source: String,
    /// Since when (RFC 3339) the source cannot reach where its configuration comes from (the
    /// Kubernetes API server); the last state stays in force meanwhile. Not a rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<String>,
}
