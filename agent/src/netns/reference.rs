//! How the agent finds a workload's network namespace.
use std::{
    fs::{self, File},
    io,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// A reference to a workload's network namespace, resolved only when the agent needs it (a pid
/// or a cgroup's members change over the workload's life; the namespace does not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NetnsRef {
    /// A namespace file: a bind mount (`/run/netns/NAME`) or `/proc/<pid>/ns/net`.
    Path(PathBuf),
    /// A process living in the namespace.
    Pid(u32),
    /// A cgroup v2 directory whose processes live in the namespace.
    Cgroup(PathBuf),
    /// The pod's sandbox namespace, made by the container runtime and named to the agent by
    /// the CNI plugin (`ambit-cni`) when it is created, before any container starts.
    Cni,
}

impl NetnsRef {
    /// Opens the network-namespace file. Errors name the path (or cgroup) that failed.
    pub fn open(&self) -> io::Result<File> {
        match self {
            Self::Path(path) => open_named(path),
            Self::Pid(pid) => open_named(&proc_netns(*pid)),
            Self::Cgroup(dir) => open_cgroup(dir),
            Self::Cni => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "the namespace is named by the CNI plugin when the pod's sandbox is created, \
                 and none was",
            )),
        }
    }
}

impl std::fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Path(path) => write!(f, "path {}", path.display()),
            Self::Pid(pid) => write!(f, "pid {pid}"),
            Self::Cgroup(dir) => write!(f, "cgroup {}", dir.display()),
            Self::Cni => write!(f, "cni"),
        }
    }
}

fn proc_netns(pid: u32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// `File::open`, with the path in the error (io errors carry none).
fn open_named(path: &Path) -> io::Result<File> {
    File::open(path).map_err(|e| with_path(e, path))
}

fn with_path(error: io::Error, path: &Path) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {error}", path.display()))
}

/// Opens the namespace of the first live process of the cgroup `dir`.
///
/// Under cgroup v2 a process lives only in a leaf cgroup, so a pod-level cgroup usually lists no
/// process itself: its containers' child cgroups do. When `dir` has none, its descendants are
/// searched (depth first, in name order), which makes a pod's cgroup work as well as a
/// container's. All processes of a pod share its network namespace, so any one will do.
fn open_cgroup(dir: &Path) -> io::Result<File> {
    match first_netns_below(dir)? {
        Some(file) => Ok(file),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "cgroup {} has no process outside the agent's own network namespace",
                dir.display()
            ),
        )),
    }
}

/// Whether `file` is the agent's own network namespace (same device and inode).
fn is_own_netns(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (file.metadata(), fs::metadata("/proc/self/ns/net")) {
        (Ok(theirs), Ok(ours)) => theirs.dev() == ours.dev() && theirs.ino() == ours.ino(),
        _ => false,
    }
}

fn first_netns_below(dir: &Path) -> io::Result<Option<File>> {
    let procs_path = dir.join("cgroup.procs");
    let procs = fs::read_to_string(&procs_path).map_err(|e| with_path(e, &procs_path))?;
    for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
        match File::open(proc_netns(pid)) {
            // A runtime's helper in the pod's cgroup (CRI-O's conmon) lives in the host's
            // namespace: enrolling that would capture the node's own traffic.
            Ok(file) if is_own_netns(&file) => continue,
            Ok(file) => return Ok(Some(file)),
            // The process exited since the cgroup was read: try the next one.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(with_path(e, &proc_netns(pid))),
        }
    }
    let mut children: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(|e| with_path(e, dir))?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .collect();
    children.sort();
    for child in children {
        match first_netns_below(&child) {
            Ok(Some(file)) => return Ok(Some(file)),
            Ok(None) => {}
            // A child cgroup removed while we walk (a container exiting) is not an error.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}
