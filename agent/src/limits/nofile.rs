//! The process's descriptor limit (RLIMIT_NOFILE) and how much of it is in use.
//!
//! Container runtimes and systemd commonly start processes with a soft limit of 1024 and a much
//! higher hard limit (containerd: 1048576). Every proxied connection holds two descriptors, so
//! the agent raises its soft limit to the hard one at start, as Envoy's and ztunnel's
//! deployments do; raising the hard limit needs CAP_SYS_RESOURCE, which the agent does not ask
//! for, so what the hard limit allows is what the agent budgets with (see [`super::LimitSettings::for_descriptors`]).
use std::io;

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// The descriptor limit before and after [`raise_nofile_limit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now in force.
    pub soft: u64,
    /// The hard limit (the most the soft limit can be raised to without privileges).
    pub hard: u64,
}

/// The soft and hard limits.
fn get() -> io::Result<(u64, u64)> {
    Ok(getrlimit(Resource::RLIMIT_NOFILE)?)
}

/// The limit in force.
pub fn nofile_limit() -> io::Result<NofileLimit> {
    let (soft, hard) = get()?;
    Ok(NofileLimit {
        before: soft,
        soft,
        hard,
    })
}

/// Raises the soft RLIMIT_NOFILE to the hard limit. An unlimited hard limit (RLIM_INFINITY)
/// cannot be a soft descriptor limit: the kernel's own ceiling (`fs.nr_open`) is used then.
pub fn raise_nofile_limit() -> io::Result<NofileLimit> {
    let (before, hard) = get()?;
    let mut target = hard;
    if target == RLIM_INFINITY {
        target = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20);
    }
    if target > before {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard)?;
    }
    let (soft, hard) = get()?;
    Ok(NofileLimit { before, soft, hard })
}

/// Descriptors the process holds now (the entries of `/proc/self/fd`, less the one reading it).
pub fn open_descriptors() -> io::Result<u64> {
    let entries = std::fs::read_dir("/proc/self/fd")?.count() as u64;
    Ok(entries.saturating_sub(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_reaches_the_hard_limit_and_counting_sees_new_descriptors() {
        let limit = raise_nofile_limit().unwrap();
        assert!(limit.soft >= limit.before);
        if limit.hard != RLIM_INFINITY {
            assert_eq!(limit.soft, limit.hard);
        }
        assert_eq!(nofile_limit().unwrap().soft, limit.soft);
        // Raising again changes nothing.
        assert_eq!(raise_nofile_limit().unwrap().soft, limit.soft);

        let before = open_descriptors().unwrap();
        let files: Vec<_> = (0..5)
            .map(|_| std::fs::File::open("/proc/self/stat").unwrap())
            .collect();
        // nextest runs each test in a process of its own: nobody else opens or closes files.
        assert_eq!(open_descriptors().unwrap(), before + 5);
        drop(files);
        assert_eq!(open_descriptors().unwrap(), before);
    }
}
