//! Processes of real tools (tcpdump, prometheus, a CA, ...) run by the end-to-end tests,
//! placed in a cgroup of the bed and a network namespace, stopped by PID (the bed's teardown
//! also kills whatever is left in its cgroups).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::Cluster;
use crate::process::place_in;
use crate::util;

/// A process this test started (tcpdump, prometheus, a CA), placed in a cgroup of the bed and
/// a network namespace; stopped by PID, SIGKILLed on drop if still running.
pub struct Tool {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Tool {
    /// Spawns `cmd` in the bed cgroup `<bed>/<cgroup>` (created) and the network namespace
    /// file `netns`. stderr (and stdout unless the caller set it) go to `log`.
    pub fn spawn(
        cluster: &Cluster,
        name: &str,
        cgroup: &str,
        netns: &Path,
        mut cmd: Command,
        log: PathBuf,
        stdout_set: bool,
    ) -> Result<Tool> {
        let cgroup = cluster.cgroup_root().join(cgroup);
        fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
        let file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        if !stdout_set {
            cmd.stdout(file.try_clone()?);
        }
        cmd.stdin(Stdio::null()).stderr(file);
        place_in(&mut cmd, &cgroup, netns)?;
        let child = cmd.spawn().with_context(|| format!("spawn {name}"))?;
        Ok(Tool {
            name: name.into(),
            child,
            status: None,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, once it exited (reaped here).
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Its whole log.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        util::tail_file(&self.log, 20)
    }

    /// Sends `sig` by PID (only while the process is ours, i.e. not reaped), waits up to
    /// `grace`, then SIGKILLs. Returns the exit status.
    pub fn stop(&mut self, sig: libc::c_int, grace: Duration) -> Result<ExitStatus> {
        if self.try_status().is_none() {
            util::signal(self.pid() as i32, sig);
        }
        let deadline = Instant::now() + grace;
        while self.try_status().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.try_status().is_none() {
            eprintln!("[tool] {} ignored signal {sig}; killing", self.name);
            util::signal(self.pid() as i32, libc::SIGKILL);
            self.status = Some(self.child.wait()?);
        }
        self.status
            .ok_or_else(|| anyhow!("{} has no exit status", self.name))
    }
}

impl Drop for Tool {
    fn drop(&mut self) {
        if self.try_status().is_none() {
            util::signal(self.pid() as i32, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}
