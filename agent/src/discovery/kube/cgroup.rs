//! Finding a pod's cgroup from its UID, through the directories kubelet creates.
//!
//! kubelet puts every pod in a cgroup of its own, named after the pod's UID, below a QoS level:
//!
//! | driver | Guaranteed | Burstable / BestEffort |
//! |---|---|---|
//! | systemd | `kubepods.slice/kubepods-pod<UID>.slice` | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<UID>.slice` |
//! | cgroupfs | `kubepods/pod<UID>` | `kubepods/burstable/pod<UID>` |
//!
//! where the systemd driver writes the UID with `_` in place of `-` (a `-` in a slice name means
//! nesting). The containers live one level below: `cri-containerd-<id>.scope` (containerd) or
//! `crio-<id>.scope` (CRI-O) under the systemd driver, `<id>` or `crio-<id>` under cgroupfs.
//! [`NetnsRef::open`](crate::netns::NetnsRef::open) descends into them to find a process, so the
//! pod-level directory is what the agent records: it lives as long as the pod, while container
//! scopes come and go with restarts.
//!
//! A kubelet started with `--cgroup-root` nests all of this one level deeper (kind nodes use
//! `kubelet.slice/kubelet-kubepods.slice/...`); the well-known places are tried first and a
//! bounded search below the root finds the others.
use std::{
    collections::VecDeque,
    fs,
    path::{Path, PathBuf},
};

/// How deep below the cgroup root the fallback search looks for a pod directory. kubelet's own
/// layouts put it at depth 2 or 3; `--cgroup-root` adds one or two levels.
const SEARCH_DEPTH: usize = 5;

/// The QoS levels kubelet creates; Guaranteed pods sit directly under `kubepods` (no level).
const QOS_LEVELS: [&str; 2] = ["burstable", "besteffort"];

/// The pod-level cgroup directory of the pod with `uid`, below `cgroup_root` (the cgroup v2
/// directory that holds kubelet's `kubepods` hierarchy, normally the cgroup2 mount point).
///
/// Tries kubelet's systemd and cgroupfs layouts for each QoS class, then searches up to a few
/// levels below `cgroup_root` for a directory of either naming (for kubelets configured with
/// `--cgroup-root`). `None` when the pod has no cgroup on this machine (not started yet, or
/// not on this node).
pub fn pod_cgroup_dir(cgroup_root: &Path, uid: &str) -> Option<PathBuf> {
    // A UID is a UUID; anything else (a path separator above all) cannot name a pod cgroup.
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return None;
    }
    let names = PodCgroupNames::new(uid);
    names
        .well_known()
        .into_iter()
        .map(|relative| cgroup_root.join(relative))
        .find(|dir| dir.is_dir())
        .or_else(|| search(cgroup_root, &names))
}

/// The names a pod's cgroup directory can have.
struct PodCgroupNames {
    /// cgroupfs driver: `pod<uid>`.
    cgroupfs: String,
    /// systemd driver, without the QoS prefix: `-pod<uid with _>.slice`.
    systemd_suffix: String,
}

impl PodCgroupNames {
    fn new(uid: &str) -> Self {
        Self {
            cgroupfs: format!("pod{uid}"),
            systemd_suffix: format!("-pod{}.slice", uid.replace('-', "_")),
        }
    }

    /// kubelet's default places, relative to the cgroup root.
    fn well_known(&self) -> Vec<PathBuf> {
        let mut paths = vec![
            PathBuf::from(format!("kubepods.slice/kubepods{}", self.systemd_suffix)),
            PathBuf::from(format!("kubepods/{}", self.cgroupfs)),
        ];
        for qos in QOS_LEVELS {
            paths.push(PathBuf::from(format!(
                "kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}{}",
                self.systemd_suffix
            )));
            paths.push(PathBuf::from(format!("kubepods/{qos}/{}", self.cgroupfs)));
        }
        paths
    }

    fn matches(&self, name: &str) -> bool {
        name == self.cgroupfs || (name.ends_with(&self.systemd_suffix) && name.contains("kubepods"))
    }
}

/// Breadth-first search for the pod's directory, at most [`SEARCH_DEPTH`] levels down.
fn search(root: &Path, names: &PodCgroupNames) -> Option<PathBuf> {
    let mut queue = VecDeque::from([(root.to_path_buf(), 0usize)]);
    while let Some((dir, depth)) = queue.pop_front() {
        // Unreadable or vanished directories (a pod being torn down) are simply skipped.
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        let mut children: Vec<(PathBuf, String)> = entries
            .filter_map(Result::ok)
            .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|entry| Some((entry.path(), entry.file_name().into_string().ok()?)))
            .collect();
        // Name order, so that the result does not depend on directory order.
        children.sort();
        for (path, name) in children {
            if names.matches(&name) {
                return Some(path);
            }
            if depth + 1 < SEARCH_DEPTH && worth_descending(&name) {
                queue.push_back((path, depth + 1));
            }
        }
    }
    None
}

/// Whether a pod directory could be below `name`: leaf units (containers, services, mounts) and
/// other pods' directories cannot hold one, and skipping them keeps the search small on nodes
/// with many of them.
fn worth_descending(name: &str) -> bool {
    const LEAVES: [&str; 5] = [".scope", ".service", ".mount", ".socket", ".swap"];
    !LEAVES.iter().any(|suffix| name.ends_with(suffix))
        && !name.starts_with("pod")
        && !name.contains("-pod")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f3c9a1e-5b2d-4c8e-9a7f-1234567890ab";
    const UID_: &str = "0f3c9a1e_5b2d_4c8e_9a7f_1234567890ab";

    /// Creates `relative` (and the container scope `scope` inside it) below a new root.
    fn tree(relative: &str, scope: &str) -> (tempfile::TempDir, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join(relative);
        fs::create_dir_all(pod.join(scope)).unwrap();
        // Unrelated neighbours, as on a real node.
        fs::create_dir_all(root.path().join("system.slice/containerd.service")).unwrap();
        fs::create_dir_all(
            root.path()
                .join("kubepods/besteffort/pod11111111-2222-3333-4444-555555555555"),
        )
        .unwrap();
        (root, pod)
    }

    #[test]
    fn systemd_driver_layouts() {
        let cases = [
            (
                format!("kubepods.slice/kubepods-pod{UID_}.slice"),
                "cri-containerd-abc.scope",
            ),
            (
                format!(
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                ),
                "cri-containerd-abc.scope",
            ),
            (
                format!(
                    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                ),
                "crio-abc.scope",
            ),
        ];
        for (relative, scope) in cases {
            let (root, pod) = tree(&relative, scope);
            assert_eq!(pod_cgroup_dir(root.path(), UID), Some(pod), "{relative}");
        }
    }

    #[test]
    fn cgroupfs_driver_layouts() {
        for (relative, scope) in [
            (format!("kubepods/pod{UID}"), "0123abcd"),
            (format!("kubepods/burstable/pod{UID}"), "crio-0123abcd"),
            (format!("kubepods/besteffort/pod{UID}"), "0123abcd"),
        ] {
            let (root, pod) = tree(&relative, scope);
            assert_eq!(pod_cgroup_dir(root.path(), UID), Some(pod), "{relative}");
        }
    }

    #[test]
    fn custom_cgroup_root_is_searched() {
        // kubelet --cgroup-root=/kubelet with the systemd driver (kind's nodes)...
        let (root, pod) = tree(
            &format!(
                "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice"
            ),
            "cri-containerd-abc.scope",
        );
        assert_eq!(pod_cgroup_dir(root.path(), UID), Some(pod));
        // ...and with cgroupfs.
        let (root, pod) = tree(&format!("kubelet/kubepods/burstable/pod{UID}"), "abc");
        assert_eq!(pod_cgroup_dir(root.path(), UID), Some(pod));
    }

    #[test]
    fn absent_or_bogus_uid() {
        let (root, _) = tree(&format!("kubepods/pod{UID}"), "abc");
        assert_eq!(
            pod_cgroup_dir(root.path(), "99999999-9999-9999-9999-999999999999"),
            None
        );
        assert_eq!(pod_cgroup_dir(root.path(), ""), None);
        assert_eq!(pod_cgroup_dir(root.path(), "../kubepods"), None);
        assert_eq!(pod_cgroup_dir(Path::new("/nonexistent/cgroup"), UID), None);
    }

    #[test]
    fn too_deep_is_not_found() {
        let (root, _) = tree(&format!("a/b/c/d/e/f/pod{UID}"), "abc");
        assert_eq!(pod_cgroup_dir(root.path(), UID), None);
    }
}
