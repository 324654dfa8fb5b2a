//! Checks that name what is missing before any program is loaded.
use std::path::Path;

use anyhow::{Context as _, bail};

use super::{RedirectConfig, object::KERNEL_BTF};

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

/// The oldest kernel Ambit's programs load on: `bpf_get_netns_cookie` in `sock_ops` (5.15),
/// `sk_lookup` (5.9), BTF-typed socket storage. (The same-node splice needs more, 6.4: it is
/// not gated on a version but on the agent's start-up self-test, and off without it.)
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// How one requirement stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Met.
    Ok,
    /// Met in a way that may bite later, or not checkable here.
    Warn,
    /// Not met: the agent will not start.
    Fail,
}

/// One requirement of the node, checked: what, how it stands, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The requirement, e.g. `kernel BTF`.
    pub check: &'static str,
    /// How it stands.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do, when not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn warn(check: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            check,
            status: Status::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl Finding {
    /// A requirement met (for checks outside this module).
    pub fn ok_with(check: &'static str, detail: impl Into<String>) -> Self {
        Self::ok(check, detail)
    }

    /// A requirement not met that the agent works around (for checks outside this module).
    pub fn warn_with(
        check: &'static str,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::warn(check, detail, fix)
    }
}

/// `major.minor` of a kernel release string such as `6.1.0-18-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Every requirement of the node the agent runs on, in the order they matter: privileges, the
/// kernel, BTF, cgroup v2 at `config.cgroup`, a bpf filesystem under `config.bpffs`.
pub fn node_findings(config: &RedirectConfig) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.push(match effective_caps() {
        Err(err) => Finding::fail(
            "capabilities",
            format!("{err:#}"),
            "run where /proc/self/status is readable",
        ),
        Ok(caps) => {
            let mut missing: Vec<&str> = REQUIRED_CAPS
                .iter()
                .filter(|(bit, _)| caps & (1 << bit) == 0)
                .map(|(_, name)| *name)
                .collect();
            if caps & (1 << CAP_BPF) == 0 && caps & (1 << 21) == 0 {
                missing.push("CAP_BPF");
            }
            if missing.is_empty() {
                Finding::ok("capabilities", "held: NET_ADMIN, SYS_ADMIN and BPF")
            } else {
                Finding::fail(
                    "capabilities",
                    format!(
                        "insufficient privileges: ambit agent needs {} (run as root or grant \
                         the capabilities)",
                        missing.join(", ")
                    ),
                    "run as root, or grant BPF, NET_ADMIN, SYS_ADMIN (and SYS_PTRACE for pods \
                     of other users) as the DaemonSet does",
                )
            }
        }
    });
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    findings.push(match kernel_version(&release) {
        Some(version) if version >= MIN_KERNEL => {
            Finding::ok("kernel version", format!("Linux {release}"))
        }
        Some(_) => Finding::fail(
            "kernel version",
            format!(
                "Linux {release} is older than {}.{}",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
            format!(
                "run nodes on Linux {}.{} or later",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
        None => Finding::warn(
            "kernel version",
            format!("cannot read the kernel release ({release:?})"),
            format!(
                "make sure the kernel is {}.{} or later",
                MIN_KERNEL.0, MIN_KERNEL.1
            ),
        ),
    });
    findings.push(if Path::new(KERNEL_BTF).exists() {
        Finding::ok("kernel BTF", format!("{KERNEL_BTF} present"))
    } else {
        Finding::fail(
            "kernel BTF",
            format!(
                "the kernel has no BTF ({KERNEL_BTF} is missing); Ambit needs a kernel built \
                 with CONFIG_DEBUG_INFO_BTF=y"
            ),
            "use a distribution kernel with CONFIG_DEBUG_INFO_BTF=y (Debian, Ubuntu, RHEL, \
             Bottlerocket and COS kernels have it)",
        )
    });
    // Where cgroup v2 is, or why there is none ("no cgroup v2 hierarchy is mounted ...").
    let mounted = || match cgroup2_mount() {
        Ok(p) => format!("cgroup v2 is mounted at {}", p.display()),
        Err(e) => e.to_string(),
    };
    findings.push(match statfs_type(&config.cgroup) {
        Ok(CGROUP2_SUPER_MAGIC) => Finding::ok(
            "cgroup v2",
            format!("{} is a cgroup v2 directory", config.cgroup.display()),
        ),
        Ok(_) => Finding::fail(
            "cgroup v2",
            format!(
                "--cgroup {} is not a cgroup v2 directory ({})",
                config.cgroup.display(),
                mounted()
            ),
            "point --cgroup (the chart's cgroup hostPath) at the cgroup2 mount, e.g. \
             /sys/fs/cgroup/unified on a hybrid host",
        ),
        Err(err) => Finding::fail(
            "cgroup v2",
            format!("--cgroup {}: {err}", config.cgroup.display()),
            format!("point --cgroup at the cgroup2 mount ({})", mounted()),
        ),
    });
    let bpffs_parent = config
        .bpffs
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    findings.push(match statfs_type(bpffs_parent) {
        Ok(BPF_FS_MAGIC) => Finding::ok(
            "bpf filesystem",
            format!("{} is on a bpf filesystem", config.bpffs.display()),
        ),
        Ok(_) => Finding::fail(
            "bpf filesystem",
            format!(
                "--bpffs {} is not on a bpf filesystem; mount one first: mount -t bpf bpf \
                 /sys/fs/bpf",
                config.bpffs.display()
            ),
            "mount -t bpf bpf /sys/fs/bpf (the chart's mountBpffs does it)",
        ),
        Err(err) => Finding::fail(
            "bpf filesystem",
            format!("--bpffs {}: {err}", config.bpffs.display()),
            "mount -t bpf bpf /sys/fs/bpf",
        ),
    });
    findings
}

/// Mounts a bpf filesystem at `path` unless one is mounted there already: `ambit mount-bpffs`,
/// the agent DaemonSet's init container on hosts that have none (systemd hosts do). It is a
/// subcommand because the image has no shell and no `mount`.
pub fn mount_bpffs(path: &Path) -> anyhow::Result<()> {
    match statfs_type(path) {
        Ok(BPF_FS_MAGIC) => {
            println!("{}: a bpf filesystem is mounted already", path.display());
            return Ok(());
        }
        Ok(_) => {}
        Err(err) => bail!(
            "{}: {err} (it must be an existing directory)",
            path.display()
        ),
    }
    nix::mount::mount(
        Some("bpf"),
        path,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| {
        format!(
            "mounting a bpf filesystem at {} (needs CAP_SYS_ADMIN; privileged in a pod)",
            path.display()
        )
    })?;
    println!("{}: mounted a bpf filesystem", path.display());
    Ok(())
}

/// Fails with a message naming the first missing requirement: privileges, kernel, BTF, cgroup
/// v2, bpffs.
pub fn preflight(config: &RedirectConfig) -> anyhow::Result<()> {
    match node_findings(config)
        .into_iter()
        .find(|f| f.status == Status::Fail)
    {
        Some(failed) => bail!("{}", failed.detail),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_parse_to_major_and_minor() {
        assert_eq!(kernel_version("6.1.0-18-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.10.209"), Some((5, 10)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.4.0-150-generic").unwrap() < MIN_KERNEL);
        assert!(kernel_version("5.10.209").unwrap() < MIN_KERNEL);
        assert!(kernel_version("6.1.0-18-amd64").unwrap() >= MIN_KERNEL);
    }
}
