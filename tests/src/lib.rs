//! Ambit's cluster-in-a-box test bed.
//!
//! [`Cluster::start`] builds, on one machine and without touching the root network namespace:
//!
//! - a fabric network namespace `ab-<id>-fab` holding a bridge `a<id>br`;
//! - per node `i`: a namespace `ab-<id>-n<i>` with a veth `a<id>n<i>` on the bridge
//!   (`10.99.0.<i+1>/24`, `fd00:99::<i+1>/64`), IPv4 and IPv6 forwarding on, routes to the other
//!   nodes' pod subnets `10.10.<k>.0/24` / `fd00:10:<k>::/64` via their fabric addresses, and a
//!   cgroup `<cgroup2 mount>/ambit-<id>/n<i>` with a child `agent` for the agent;
//! - per pod `j` of node `i` (named `p<i>-<j>`): a namespace `ab-<id>-n<i>p<j>` whose `eth0`
//!   (veth to the node, node side `a<id>n<i>p<j>` with `10.10.<i>.1/32` and `fd00:10:<i>::1/128`)
//!   has `10.10.<i>.<j+2>/32` and `fd00:10:<i>::<j+2>/128`, the gateway on-link and a default
//!   route via it; and a cgroup `<...>/n<i>/p<j>`;
//! - a run directory (temp dir `ambit-testbed-<id>`) with the mesh file `mesh/mesh.yaml` (in a
//!   directory of its own, which the agents watch), the agents' logs and the pods' stderr files.
//!
//! `<id>` is a fresh 6-hex-digit run id, so concurrent runs never collide. Agents are started
//! explicitly ([`Cluster::start_agents`], [`Node::start_agent`]). Dropping the [`Cluster`]
//! (also while unwinding from a panic) kills its processes, uninstalls the agents' pins, deletes
//! the namespaces and cgroups; [`testbed::sweep_stale`] (run by every `Cluster::start`) cleans
//! up after runs that were killed.
//!
//! ```no_run
//! use std::time::Duration;
//! use ambit_tests::{Cluster, ClusterSpec};
//!
//! # fn main() -> anyhow::Result<()> {
//! let cluster = Cluster::start(ClusterSpec { nodes: 2, pods_per_node: 2 })?;
//! let bin = ambit_tests::testpod_bin()?;
//! let server = cluster.pod(1, 0);
//! let mut srv = server.spawn(&bin, ["serve", "--port", "8080"])?;
//! srv.read_json(Duration::from_secs(5))?; // {"event":"listening",...}
//! let addr = server.addr4(8080).to_string();
//! let mut cli = cluster.pod(0, 0).spawn(&bin, ["client", "--connect", addr.as_str()])?;
//! let (status, lines) = cli.wait_json(Duration::from_secs(10))?;
//! ambit_tests::ensure_or_dump!(cluster, status.success(), "client failed: {lines:?}");
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod cni;
pub mod mesh;
pub mod otlp;
pub mod process;
pub mod prometheus;
pub mod testbed;
pub mod traffic;
pub mod util;
pub mod waypoint;

pub use cluster::{
    ADMIN_PORT, Cluster, ClusterSpec, HBONE_PORT, METRICS_PORT, Node, Pod, READINESS_PORT,
};
pub use mesh::MeshFile;
pub use process::PodProcess;
pub use util::{HttpResponse, Netns};

#[doc(hidden)]
pub use anyhow;

use std::path::PathBuf;

/// Locates the `testpod` binary: `$AMBIT_TESTPOD_BIN`, else `testpod` in the directory above
/// the running test executable (`target/<profile>/deps/..`) or beside it. Integration tests of
/// this package should prefer [`testpod_path!`], which uses Cargo's `CARGO_BIN_EXE_testpod`.
pub fn testpod_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("AMBIT_TESTPOD_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    for cand in [dir.join("../testpod"), dir.join("testpod")] {
        if cand.exists() {
            return Ok(cand);
        }
    }
    anyhow::bail!(
        "testpod binary not found near {}; set AMBIT_TESTPOD_BIN",
        exe.display()
    )
}

/// The `testpod` binary for an integration test of this package: `$AMBIT_TESTPOD_BIN` if set,
/// else Cargo's `env!("CARGO_BIN_EXE_testpod")` (expanded in the calling test crate).
#[macro_export]
macro_rules! testpod_path {
    () => {
        ::std::env::var_os("AMBIT_TESTPOD_BIN")
            .map(::std::path::PathBuf::from)
            .unwrap_or_else(|| ::std::path::PathBuf::from(env!("CARGO_BIN_EXE_testpod")))
    };
}
