//! Low-level bed bookkeeping: run ids, owner files, the names a bed uses, tearing a bed down by
//! its id, and the stale-bed sweeper.
//!
//! Every resource of a bed carries its run id `<id>` (6 hex digits):
//! - network namespaces `/run/netns/ab-<id>-*`,
//! - the cgroup subtree `<cgroup2 mount>/ambit-<id>`,
//! - bpffs pin directories `/sys/fs/bpf/ambit-<id>-*`,
//! - the owner file `/run/ambit-testbed/<id>.owner` holding `<pid> <start time>` of the process
//!   that owns the bed. It is written before anything else is created and removed last.
//!
//! [`sweep_stale`] removes beds whose owner is dead (or whose owner file is missing), so a
//! SIGKILLed run is cleaned by the next one while concurrent live runs are left alone.

use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::util;

/// Directory of owner files.
pub const OWNER_DIR: &str = "/run/ambit-testbed";

/// Prefix of a bed's network namespace names: `ab-<id>-`.
pub fn netns_prefix(id: &str) -> String {
    format!("ab-{id}-")
}

/// Name of a bed's cgroup subtree under the cgroup2 mount: `ambit-<id>`.
pub fn cgroup_name(id: &str) -> String {
    format!("ambit-{id}")
}

/// Prefix of a bed's bpffs directories under /sys/fs/bpf: `ambit-<id>-`.
pub fn bpffs_prefix(id: &str) -> String {
    format!("ambit-{id}-")
}

/// The run directory of bed `id`: `<temp dir>/ambit-testbed-<id>` (mesh file, logs).
pub fn run_dir(id: &str) -> PathBuf {
    std::env::temp_dir().join(format!("ambit-testbed-{id}"))
}

/// The owner file of bed `id`.
pub fn owner_file(id: &str) -> PathBuf {
    Path::new(OWNER_DIR).join(format!("{id}.owner"))
}

/// The `ambit` binary: `$AMBIT_BIN`, else `$CARGO_TARGET_DIR/debug/ambit`, else
/// `<workspace>/target/debug/ambit`. It may not exist.
pub fn ambit_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AMBIT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return Path::new(&t).join("debug/ambit");
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/ambit")
}

/// The `ambit-cni` plugin binary: `$AMBIT_CNI_BIN`, else beside the `ambit` binary.
pub fn ambit_cni_bin() -> PathBuf {
    match std::env::var_os("AMBIT_CNI_BIN") {
        Some(p) => PathBuf::from(p),
        None => ambit_bin().with_file_name("ambit-cni"),
    }
}

/// Ambit's image as `cargo xtask image` names it: deploy/image.env's `AMBIT_IMAGE_REPOSITORY`,
/// tagged with the workspace version.
pub fn image_reference() -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/image.env");
    let env = fs::read_to_string(&path)?;
    let repository = env
        .lines()
        .find_map(|l| l.strip_prefix("AMBIT_IMAGE_REPOSITORY="))
        .with_context(|| format!("{} names no AMBIT_IMAGE_REPOSITORY", path.display()))?;
    Ok(format!("{repository}:{}", env!("CARGO_PKG_VERSION")))
}

fn is_run_id(s: &str) -> bool {
    s.len() == 6
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Reserves a fresh run id (random, mixed with the PID) by creating its owner file with
/// `O_EXCL`, recording the current process as owner.
pub fn reserve_id() -> Result<String> {
    fs::create_dir_all(OWNER_DIR).with_context(|| format!("create {OWNER_DIR}"))?;
    let pid = std::process::id();
    for _ in 0..100 {
        let r = util::random_bytes(4)?;
        let n = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) ^ pid.wrapping_mul(0x9E37_79B9);
        let id = format!("{:06x}", n & 0xff_ffff);
        let taken = fs::read_dir(util::NETNS_DIR)
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(&netns_prefix(&id))
                })
            })
            .unwrap_or(false);
        if taken {
            continue;
        }
        // Write the content first, then hard-link it into place: the owner file appears
        // atomically with its content (a sweeper never sees it empty), and link fails if the
        // id is taken.
        let tmp = Path::new(OWNER_DIR).join(format!(".{id}.{pid}.tmp"));
        {
            let mut f = fs::File::create(&tmp).context("create owner temp file")?;
            let st = util::process_start_time(pid as i32).unwrap_or(0);
            writeln!(f, "{pid} {st}")?;
        }
        let linked = fs::hard_link(&tmp, owner_file(&id));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(id),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).context("create owner file"),
        }
    }
    bail!("could not reserve a run id")
}

/// Overwrites the owner file of bed `id` (tests use this to simulate a dead owner).
pub fn write_owner(id: &str, pid: i32, start_time: Option<u64>) -> Result<()> {
    fs::create_dir_all(OWNER_DIR)?;
    let text = match start_time {
        Some(st) => format!("{pid} {st}\n"),
        None => format!("{pid}\n"),
    };
    util::write_atomic(&owner_file(id), text.as_bytes())
}

/// Whether the owner recorded for bed `id` is alive. A missing or unreadable owner file counts
/// as dead.
pub fn owner_alive(id: &str) -> bool {
    let Ok(text) = fs::read_to_string(owner_file(id)) else {
        return false;
    };
    let mut f = text.split_whitespace();
    let Some(pid) = f.next().and_then(|p| p.parse::<i32>().ok()) else {
        return false;
    };
    let st = f
        .next()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s != 0);
    util::process_alive(pid, st)
}

/// What of bed `id` currently exists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BedResources {
    /// Names of its network namespaces (in /run/netns).
    pub netns: Vec<String>,
    /// Its cgroup subtree, if present.
    pub cgroup: Option<PathBuf>,
    /// Its subtrees in cgroup v1 hierarchies (made by a container runtime it ran).
    pub v1_cgroups: Vec<PathBuf>,
    /// Its bpffs directories.
    pub bpffs: Vec<PathBuf>,
    /// Its owner file, if present.
    pub owner_file: Option<PathBuf>,
}

impl BedResources {
    /// True if nothing of the bed remains.
    pub fn is_empty(&self) -> bool {
        self.netns.is_empty()
            && self.cgroup.is_none()
            && self.v1_cgroups.is_empty()
            && self.bpffs.is_empty()
            && self.owner_file.is_none()
    }
}

fn entries_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Lists what exists of bed `id`.
pub fn bed_resources(id: &str) -> Result<BedResources> {
    let cg = util::cgroup2_mount()?.join(cgroup_name(id));
    let owner = owner_file(id);
    Ok(BedResources {
        netns: entries_with_prefix(Path::new(util::NETNS_DIR), &netns_prefix(id)),
        cgroup: cg.exists().then_some(cg),
        v1_cgroups: util::cgroup_v1_mounts()
            .into_iter()
            .map(|m| m.join(cgroup_name(id)))
            .filter(|d| d.exists())
            .collect(),
        bpffs: entries_with_prefix(Path::new(util::BPFFS), &bpffs_prefix(id))
            .into_iter()
            .map(|n| Path::new(util::BPFFS).join(n))
            .collect(),
        owner_file: owner.exists().then_some(owner),
    })
}

/// Ids of every bed with any resource or owner file on this machine.
pub fn list_bed_ids() -> Result<BTreeSet<String>> {
    let mut ids = BTreeSet::new();
    for n in entries_with_prefix(Path::new(OWNER_DIR), "") {
        if let Some(id) = n.strip_suffix(".owner").filter(|i| is_run_id(i)) {
            ids.insert(id.to_string());
        }
    }
    for n in entries_with_prefix(Path::new(util::NETNS_DIR), "ab-") {
        if let Some(id) = n
            .get(3..9)
            .filter(|i| is_run_id(i) && n[9..].starts_with('-'))
        {
            ids.insert(id.to_string());
        }
    }
    for n in entries_with_prefix(&util::cgroup2_mount()?, "ambit-") {
        if let Some(id) = n.strip_prefix("ambit-").filter(|i| is_run_id(i)) {
            ids.insert(id.to_string());
        }
    }
    for n in entries_with_prefix(Path::new(util::BPFFS), "ambit-") {
        if let Some(id) = n
            .get(6..12)
            .filter(|i| is_run_id(i) && n[12..].starts_with('-'))
        {
            ids.insert(id.to_string());
        }
    }
    Ok(ids)
}

/// Runs a command with a time limit, killing it (by PID) if it overruns.
pub fn output_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = child.id() as i32;
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = waiter.join();
            Ok(r?)
        }
        Err(_) => {
            // Not reaped yet (the waiter thread is still blocked in wait), so the PID is ours.
            util::signal(pid, libc::SIGKILL);
            let _ = waiter.join();
            bail!("{cmd:?} timed out after {timeout:?}")
        }
    }
}

/// Removes one bpffs pin directory: `ambit uninstall --bpffs DIR` if the binary exists (it
/// detaches the links and frees the maps), then removes whatever remains.
pub fn remove_bpffs_dir(dir: &Path, ambit: Option<&Path>) -> Result<()> {
    let mut errors = Vec::new();
    if let Some(bin) = ambit.filter(|b| b.exists()) {
        match output_with_timeout(
            Command::new(bin).arg("uninstall").arg("--bpffs").arg(dir),
            Duration::from_secs(30),
        ) {
            Ok(o) if o.status.success() => {}
            Ok(o) => errors.push(format!(
                "`{} uninstall --bpffs {}` failed ({}): {}",
                bin.display(),
                dir.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("ambit uninstall: {e:#}")),
        }
    }
    if dir.exists() {
        // Unpinning (unlink on bpffs) drops the pins' references; a link with no other holder
        // detaches, a map with no other holder is freed.
        if let Err(e) = fs::remove_dir_all(dir) {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!(errors.join("; "))
    }
}

/// Tears down everything of bed `id`, best effort: kills every process in its cgroup subtree,
/// uninstalls/removes its bpffs dirs, deletes its network namespaces (which removes the veths
/// and the bridge), removes its cgroups bottom-up and finally its owner file. Returns the
/// failures (empty on full success).
pub fn destroy_bed(id: &str, ambit: Option<&Path>) -> Vec<String> {
    let mut errors = Vec::new();
    let res = match bed_resources(id) {
        Ok(r) => r,
        Err(e) => return vec![format!("list resources of bed {id}: {e:#}")],
    };
    if let Some(cg) = &res.cgroup
        && let Err(e) = util::cgroup_kill_all(cg, Duration::from_secs(5))
    {
        errors.push(format!("{e:#}"));
    }
    for dir in &res.bpffs {
        if let Err(e) = remove_bpffs_dir(dir, ambit) {
            errors.push(format!("{e:#}"));
        }
    }
    for ns in &res.netns {
        if let Err(e) = util::run("ip", ["netns", "del", ns.as_str()])
            && Path::new(util::NETNS_DIR).join(ns).exists()
        {
            errors.push(format!("{e:#}"));
        }
    }
    for cg in res.cgroup.iter().chain(&res.v1_cgroups) {
        if let Err(e) = util::cgroup_remove_tree(cg) {
            errors.push(format!("{e:#}"));
        }
    }
    if let Err(e) = fs::remove_file(owner_file(id))
        && e.kind() != std::io::ErrorKind::NotFound
    {
        errors.push(format!("remove owner file: {e}"));
    }
    errors
}

/// Holds an exclusive `flock` on the sweep lock file while alive, serializing sweeps across
/// processes.
struct SweepLock(#[allow(dead_code)] Flock<fs::File>);

impl SweepLock {
    fn acquire() -> Result<Self> {
        fs::create_dir_all(OWNER_DIR)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(Path::new(OWNER_DIR).join(".sweep.lock"))?;
        let lock = Flock::lock(f, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .context("flock sweep lock")?;
        Ok(Self(lock))
    }
}

/// Removes every bed whose owner process is no longer alive (or whose owner file is gone while
/// resources remain), including its run directory. Beds of live owners, including other
/// concurrent runs, are untouched; run directories kept after a panic belong to beds that were
/// already torn down and are left alone. Returns the ids swept; failures are logged to stderr.
pub fn sweep_stale() -> Result<Vec<String>> {
    static IN_PROCESS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = IN_PROCESS.lock().unwrap_or_else(|p| p.into_inner());
    let _lock = SweepLock::acquire()?;
    let ambit = ambit_bin();
    let mut swept = Vec::new();
    for id in list_bed_ids()? {
        if owner_alive(&id) {
            continue;
        }
        let mut errors = destroy_bed(&id, Some(&ambit));
        let dir = run_dir(&id);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("remove {}: {e}", dir.display()));
        }
        for e in &errors {
            eprintln!("[testbed sweep {id}] {e}");
        }
        swept.push(id);
    }
    Ok(swept)
}
