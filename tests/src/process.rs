//! Processes placed in a bed's cgroup and network namespace.
//!
//! Placement happens in a `pre_exec` hook of the forked child, with both files opened by the
//! parent beforehand: first `write("0")` to the cgroup's `cgroup.procs` (moves the calling
//! process), then `setns(CLONE_NEWNET)`. The cgroup move comes first because entering via `ip
//! netns exec` would remount /sys and hide the cgroup tree.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::util;

/// Arranges for `cmd`, once spawned, to move itself into `cgroup` and then into the network
/// namespace file `netns` before it executes its program.
pub fn place_in(cmd: &mut Command, cgroup: &Path, netns: &Path) -> Result<()> {
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))
        .with_context(|| format!("open {}/cgroup.procs", cgroup.display()))?;
    let ns = File::open(netns).with_context(|| format!("open netns {}", netns.display()))?;
    // SAFETY: between fork and exec the hook only makes two system calls (write, setns),
    // both async-signal-safe, through nix's thin wrappers, which neither allocate nor lock; the
    // closure owns both fds, which are close-on-exec, so the program never sees them.
    unsafe {
        cmd.pre_exec(move || {
            if nix::unistd::write(&procs, b"0")? != 1 {
                return Err(std::io::Error::other("short write to cgroup.procs"));
            }
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            Ok(())
        });
    }
    Ok(())
}

/// A process running inside a pod (its cgroup and network namespace).
///
/// stdin and stdout are pipes (stdout is drained by a background thread into a line queue, so
/// the process never blocks on a full pipe); stderr goes to a file in the run's directory.
/// Dropping it kills the process (SIGKILL by PID, if it has not been reaped yet) and reaps it.
#[derive(Debug)]
pub struct PodProcess {
    child: Child,
    label: String,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    stderr_path: PathBuf,
    status: Option<ExitStatus>,
}

impl PodProcess {
    /// Spawns `program` placed in `cgroup` and `netns`, with extra environment `envs`.
    pub(crate) fn spawn<I, S>(
        label: String,
        cgroup: &Path,
        netns: &Path,
        stderr_path: PathBuf,
        program: &OsStr,
        args: I,
        envs: &[(String, String)],
    ) -> Result<Self>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for (k, v) in envs {
            cmd.env(k, v);
        }
        place_in(&mut cmd, cgroup, netns)?;
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawn {} in {label}", program.to_string_lossy()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("stdout-{label}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    match line {
                        Ok(l) => {
                            if tx.send(l).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            })
            .context("spawn stdout reader")?;
        Ok(Self {
            child,
            label,
            stdin,
            lines: rx,
            stderr_path,
            status: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Path of the file receiving the process's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The stderr output so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn context(&self) -> String {
        format!(
            "process {} (pid {}); stderr tail:\n{}",
            self.label,
            self.child.id(),
            util::tail_file(&self.stderr_path, 20)
        )
    }

    /// The next stdout line, waiting at most `timeout`. Errors on timeout or when stdout has
    /// closed (the error carries the stderr tail).
    pub fn read_line(&mut self, timeout: Duration) -> Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => Ok(l),
            Err(RecvTimeoutError::Timeout) => {
                bail!("no stdout line within {timeout:?} from {}", self.context())
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("stdout closed (process exited?) from {}", self.context())
            }
        }
    }

    /// The next stdout line parsed as JSON.
    pub fn read_json(&mut self, timeout: Duration) -> Result<serde_json::Value> {
        let line = self.read_line(timeout)?;
        serde_json::from_str(&line).with_context(|| format!("stdout line is not JSON: {line:?}"))
    }

    /// Reads JSON lines until one satisfies `pred` (returned), all within `timeout`.
    pub fn read_json_until(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.read_json(left)?;
            if pred(&v) {
                return Ok(v);
            }
        }
    }

    /// Writes `line` plus a newline to the process's stdin.
    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin of {} already closed", self.label))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .with_context(|| format!("write to stdin of {}", self.label))
    }

    /// Closes stdin (the process sees EOF).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits at most `timeout` for the process to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_status()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                bail!("{} did not exit within {timeout:?}", self.context());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits at most `timeout` for the process to exit and for its stdout to close; returns
    /// the exit status and every stdout line not read yet.
    pub fn wait_output(&mut self, timeout: Duration) -> Result<(ExitStatus, Vec<String>)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => out.push(l),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => bail!(
                    "{} did not finish within {timeout:?}; stdout so far: {out:?}",
                    self.context()
                ),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let status = self.wait_timeout(left.max(Duration::from_millis(100)))?;
        Ok((status, out))
    }

    /// Like [`wait_output`](Self::wait_output), parsing every line as JSON.
    pub fn wait_json(&mut self, timeout: Duration) -> Result<(ExitStatus, Vec<serde_json::Value>)> {
        let (status, lines) = self.wait_output(timeout)?;
        let values = lines
            .iter()
            .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
            .collect::<Result<Vec<_>>>()?;
        Ok((status, values))
    }

    /// Sends a signal (e.g. `libc::SIGTERM`) if the process has not been reaped yet.
    pub fn signal(&mut self, sig: libc::c_int) -> Result<()> {
        if self.try_status()?.is_none() {
            util::signal(self.child.id() as i32, sig);
        }
        Ok(())
    }

    /// Kills the process (SIGKILL) and reaps it; returns its exit status.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        self.signal(libc::SIGKILL)?;
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }

    /// Whether the process exited successfully (false while it runs or after a signal).
    pub fn succeeded(&mut self) -> bool {
        matches!(self.try_status(), Ok(Some(s)) if s.success())
    }

    /// Human-readable description of how the process ended, if it has.
    pub fn describe_status(&mut self) -> String {
        match self.try_status() {
            Ok(Some(s)) => match (s.code(), s.signal()) {
                (Some(c), _) => format!("exited with {c}"),
                (_, Some(sig)) => format!("killed by signal {sig}"),
                _ => format!("{s}"),
            },
            Ok(None) => "running".into(),
            Err(e) => format!("unknown: {e}"),
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.stdin = None;
        if let Err(e) = self.kill() {
            eprintln!("[testbed] could not kill {}: {e}", self.label);
        }
    }
}

/// A process a test started (tcpdump, prometheus, a CA), placed in a cgroup of the bed and
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
        cluster: &crate::Cluster,
        name: &str,
        cgroup: &str,
        netns: &Path,
        mut cmd: Command,
        log: PathBuf,
        stdout_set: bool,
    ) -> Result<Tool> {
        let cgroup = cluster.cgroup_root().join(cgroup);
        std::fs::create_dir_all(&cgroup).with_context(|| format!("mkdir {}", cgroup.display()))?;
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

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    /// Its whole log.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last 20 lines of its log.
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
