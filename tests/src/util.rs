//! Small helpers the test bed is built from: entering a network namespace on a thread, running
//! commands, a minimal HTTP/1.1 GET client, cgroup v2 helpers and process liveness checks.

use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Network namespace helpers.
pub struct Netns;

impl Netns {
    /// Runs `f` on a fresh thread that first joins the network namespace at `path` (for example
    /// `/run/netns/ab-1a2b3c-n0`) with `setns(CLONE_NEWNET)`, and returns its result.
    ///
    /// Only that thread changes namespace, and it ends when `f` returns, so the caller's thread
    /// and every other thread stay where they were. Sockets created inside `f` belong to the
    /// namespace. `f` may borrow from the caller (the thread is scoped). A panic in `f` is
    /// returned as an error.
    pub fn enter_thread<T, F>(path: impl AsRef<Path>, f: F) -> Result<T>
    where
        F: FnOnce() -> T + Send,
        T: Send,
    {
        let path = path.as_ref();
        let ns = File::open(path).with_context(|| format!("open netns {}", path.display()))?;
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("netns".into())
                .spawn_scoped(s, move || -> Result<T> {
                    setns(&ns, CloneFlags::CLONE_NEWNET).context("setns(CLONE_NEWNET)")?;
                    drop(ns);
                    Ok(f())
                })
                .context("spawn netns thread")?;
            match handle.join() {
                Ok(r) => r.with_context(|| format!("in netns {}", path.display())),
                Err(p) => Err(anyhow!(
                    "closure panicked in netns {}: {}",
                    path.display(),
                    panic_message(&p)
                )),
            }
        })
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic>".into()
    }
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error that
/// carries the command line and its stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().into()).collect();
    let out = Command::new(program)
        .args(&args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            program,
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip` with the given whitespace-separated arguments (no argument may contain spaces).
pub fn ip(args: &str) -> Result<String> {
    run("ip", args.split_whitespace())
}

/// The cgroup v2 mount point: the `cgroup2` line of /proc/mounts (for example
/// `/sys/fs/cgroup/unified` in a hybrid layout, `/sys/fs/cgroup` in a unified one).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(mnt))
        })
        .next()
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/mounts"))
}

/// The cgroup v1 hierarchies' mount points (a hybrid layout has them beside the v2 one). A
/// container runtime on such a host makes a container's cgroups in each of them too.
pub fn cgroup_v1_mounts() -> Vec<PathBuf> {
    fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup").then(|| PathBuf::from(mnt))
        })
        .collect()
}

/// The bpffs mount used for pins.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Directory of network namespace files made by `ip netns add`.
pub const NETNS_DIR: &str = "/run/netns";

/// PIDs listed in a cgroup's `cgroup.procs` (empty if unreadable).
pub fn cgroup_procs(cgroup: &Path) -> Vec<i32> {
    fs::read_to_string(cgroup.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether a cgroup (or any descendant) still has live processes (`populated 1` in
/// `cgroup.events`).
pub fn cgroup_populated(cgroup: &Path) -> bool {
    fs::read_to_string(cgroup.join("cgroup.events"))
        .map(|s| s.lines().any(|l| l.trim() == "populated 1"))
        .unwrap_or(false)
}

/// Kills every process in the cgroup subtree (via `cgroup.kill`, falling back to SIGKILL to each
/// PID of each `cgroup.procs`) and waits up to `timeout` for it to become unpopulated.
pub fn cgroup_kill_all(cgroup: &Path, timeout: Duration) -> Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    if !cgroup_populated(cgroup) {
        return Ok(());
    }
    if fs::write(cgroup.join("cgroup.kill"), "1").is_err() {
        for dir in walk_dirs_bottom_up(cgroup) {
            for pid in cgroup_procs(&dir) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + timeout;
    while cgroup_populated(cgroup) {
        if Instant::now() > deadline {
            bail!(
                "cgroup {} still populated after kill: pids {:?}",
                cgroup.display(),
                cgroup_procs(cgroup)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// All directories below (and including) `root`, children before parents.
pub fn walk_dirs_bottom_up(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    fn rec(dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    rec(&e.path(), out);
                }
            }
        }
        out.push(dir.to_path_buf());
    }
    if root.is_dir() {
        rec(root, &mut out);
    }
    out
}

/// Removes a cgroup subtree bottom-up with `rmdir` (cgroup directories cannot be removed
/// recursively), retrying briefly on EBUSY while exiting processes leave.
pub fn cgroup_remove_tree(root: &Path) -> Result<()> {
    let mut errors = Vec::new();
    for dir in walk_dirs_bottom_up(root) {
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) if Instant::now() < deadline && e.raw_os_error() == Some(libc::EBUSY) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => {
                    errors.push(format!("rmdir {}: {e}", dir.display()));
                    break;
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!(errors.join("; "))
    }
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`), or None if
/// the process does not exist or is a zombie.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: split after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state).
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(22 - 3)?.parse().ok()
}

/// Whether process `pid` is alive (and, if `start_time` is given, is the same process that had
/// that start time, guarding against PID reuse).
pub fn process_alive(pid: i32, start_time: Option<u64>) -> bool {
    match (process_start_time(pid), start_time) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(a), Some(b)) => a == b,
    }
}

/// A `/proc/<pid>/status` field given in kB (e.g. `VmRSS`, `VmHWM`), or None if the process
/// or the field does not exist.
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sends `sig` to `pid` (errors ignored).
pub fn signal(pid: i32, sig: libc::c_int) {
    if let Ok(sig) = Signal::try_from(sig) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// `len` random bytes from /dev/urandom.
pub fn random_bytes(len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("read /dev/urandom")?;
    Ok(buf)
}

/// The last `lines` lines of a text file (empty string if it cannot be read).
pub fn tail_file(path: &Path, lines: usize) -> String {
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(_) => return String::new(),
    };
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

/// Writes `contents` to `path` atomically: a temp file in the same directory, then rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)
        .with_context(|| format!("rename {} -> {}", tmp.display(), path.display()))?;
    Ok(())
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header lines as (lower-cased name, value).
    pub headers: Vec<(String, String)>,
    /// The body (de-chunked if it was chunked).
    pub body: String,
}

/// A minimal HTTP/1.1 `GET` over a plain `TcpStream` with `Connection: close`, bounded by
/// `timeout`. Use it inside [`Netns::enter_thread`] to reach endpoints in a namespace.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<HttpResponse> {
    let deadline = Instant::now() + timeout;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))?;
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    s.set_write_timeout(Some(remaining()))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        s.set_read_timeout(Some(remaining()))?;
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read response from {addr}{path}")),
        }
        if Instant::now() > deadline {
            bail!("timeout reading {addr}{path}");
        }
    }
    parse_http_response(&raw)
}

fn parse_http_response(raw: &[u8]) -> Result<HttpResponse> {
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| {
            anyhow!(
                "incomplete HTTP response: {:?}",
                String::from_utf8_lossy(raw)
            )
        })?;
    let head = String::from_utf8_lossy(&raw[..head_end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let mut body = raw[head_end + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| anyhow!("bad chunked body"))?;
        let size_str = String::from_utf8_lossy(&data[..line_end]);
        let size_str = size_str.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16)
            .with_context(|| format!("bad chunk size {size_str:?}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse_http_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"));
        let r = parse_http_response(
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (503, "abcde"));
    }

    #[test]
    fn own_start_time_is_readable() {
        let pid = std::process::id() as i32;
        let st = process_start_time(pid);
        assert!(st.is_some());
        assert!(process_alive(pid, st));
        assert!(!process_alive(pid, st.map(|s| s + 1)));
    }
}
