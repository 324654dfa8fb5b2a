//! Running child processes with readable logging and errors.

use std::ffi::{OsStr, OsString};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::LazyLock;

use anyhow::{Context as _, Result, bail};

/// `$CARGO_HOME/bin` (default `~/.cargo/bin`): where `cargo install` puts bpf-linker and nextest.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    Some(home.join("bin"))
}

/// This process's PATH with `~/.cargo/bin` in front, when it is not on it already.
static PATH_WITH_CARGO_BIN: LazyLock<Option<OsString>> = LazyLock::new(|| {
    let bin = cargo_bin_dir()?;
    let current = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&current).any(|p| p == bin) {
        return None;
    }
    let joined = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&current)))
        .expect("PATH entries never contain ':' here");
    Some(joined)
});

/// A command for `program` that finds, and whose children find, the tools `cargo install`
/// puts in `~/.cargo/bin` (std looks a program up in the PATH given to the child, if any).
/// Every child process of xtask is made here, so that the process's own environment is never
/// changed (`std::env::set_var` is unsafe once threads may exist).
pub fn command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    if let Some(path) = &*PATH_WITH_CARGO_BIN {
        cmd.env("PATH", path);
    }
    cmd
}

/// A command line as a user would type it, for logs and error messages (without the PATH
/// [`command`] sets, the same for every command).
pub fn display(cmd: &Command) -> String {
    let mut parts = Vec::new();
    for (key, value) in cmd.get_envs() {
        if key == "PATH" && value == PATH_WITH_CARGO_BIN.as_deref() {
            continue;
        }
        if let Some(value) = value {
            parts.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(value.to_string_lossy().as_ref())
            ));
        }
    }
    parts.push(quote(cmd.get_program().to_string_lossy().as_ref()));
    parts.extend(cmd.get_args().map(|a| quote(a.to_string_lossy().as_ref())));
    parts.join(" ")
}

fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
}

/// Runs a command with inherited stdio, echoing it first; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    println!("    $ {line}");
    flush();
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout when it exits 0, `None` when it cannot be
/// started or fails. For probes ("is X installed?").
pub fn probe<S: AsRef<OsStr>>(program: S, args: &[&str]) -> Option<String> {
    let output = command(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Runs a command quietly and returns its stdout; an error (with its stderr) otherwise.
pub fn capture(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Replaces this process with the command, so its output is the last thing printed and its
/// exit status (and signals such as Ctrl-C) pass through untouched. Returns only on failure.
pub fn exec(cmd: &mut Command) -> anyhow::Error {
    let line = display(cmd);
    println!("    $ {line}");
    flush();
    let err = cmd.exec();
    anyhow::Error::new(err).context(format!("could not start `{line}`"))
}
