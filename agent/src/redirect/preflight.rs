//! Checks that name what is missing before any program is loaded.
use std::path::Path;

use anyhow::{Context as _, bail};

use super::RedirectConfig;

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Capabilities the agent uses: loading programs (BPF, or SYS_ADMIN before 5.8), entering pod
/// namespaces (SYS_ADMIN), marks and listeners in them (NET_ADMIN).
const REQUIRED_CAPS: [(u32, &str); 2] = [(12, "CAP_NET_ADMIN"), (21, "CAP_SYS_ADMIN")];
const CAP_BPF: u32 = 39;

fn statfs_type(path: &Path) -> std::io::Result<i64> {
    let stat = nix::sys::statfs::statfs(path)?;
    Ok(stat.filesystem_type().0 as i64)
}

/// The mount point of the cgroup v2 hierarchy, from /proc/mounts.
pub fn cgroup2_mount() -> anyhow::Result<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    mounts
        .lines()
        .find_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, mount_point, fs_type) = (fields.next()?, fields.next()?, fields.next()?);
            (fs_type == "cgroup2").then(|| mount_point.into())
        })
        .context("no cgroup v2 hierarchy is mounted (no cgroup2 line in /proc/mounts); Ambit needs cgroup v2")
}

fn effective_caps() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff in /proc/self/status")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

/// Fails with a message naming the first missing requirement: privileges, BTF, cgroup v2, bpffs.
pub fn preflight(config: &RedirectConfig) -> anyhow::Result<()> {
    let caps = effective_caps()?;
    let mut missing: Vec<&str> = REQUIRED_CAPS
        .iter()
        .filter(|(bit, _)| caps & (1 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if caps & (1 << CAP_BPF) == 0 && caps & (1 << 21) == 0 {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        bail!(
            "insufficient privileges: ambit agent needs {} (run as root or grant the capabilities)",
            missing.join(", ")
        );
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "the kernel has no BTF (/sys/kernel/btf/vmlinux is missing); Ambit needs a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    match statfs_type(&config.cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => {}
        Ok(_) => bail!(
            "--cgroup {} is not a cgroup v2 directory (cgroup v2 is mounted at {})",
            config.cgroup.display(),
            cgroup2_mount()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|e| e.to_string())
        ),
        Err(err) => bail!("--cgroup {}: {err}", config.cgroup.display()),
    }
    let bpffs_parent = config
        .bpffs
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    match statfs_type(bpffs_parent) {
        Ok(BPF_FS_MAGIC) => {}
        Ok(_) => bail!(
            "--bpffs {} is not on a bpf filesystem; mount one first: mount -t bpf bpf /sys/fs/bpf",
            config.bpffs.display()
        ),
        Err(err) => bail!("--bpffs {}: {err}", config.bpffs.display()),
    }
    Ok(())
}
