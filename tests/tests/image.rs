//! Ambit's container image, as a user gets it: `cargo xtask image` builds it from the
//! repository's Dockerfile with podman and writes an OCI archive; here the archive is loaded
//! into a podman storage of this test's own and run with runc (as the machines' notes say:
//! runc, not crun; limits at or below the sandbox's hard limits; no network).
//!
//! The image is built from the binaries the test run already has (`$AMBIT_BIN` and
//! `ambit-cni` beside it: `cargo xtask image --binaries`), not compiled again: the Dockerfile's
//! `prebuilt` mode, the same root filesystem code as a release build's.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use ambit_tests::testbed::{ambit_bin, ambit_cni_bin, image_reference, output_with_timeout};
use anyhow::{Context as _, Result, bail, ensure};
use serde_json::Value;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace")
        .to_path_buf()
}

/// This test's directory (the archive, podman's storage, state and temporary files), removed
/// when it ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        // conmon's cleanup of a `run --rm` container may still write into the storage after
        // podman returned: remove what is left of the containers first (podman waits for them),
        // then the directory, again while something writes into it (bounded).
        let _ = podman(&self.0)
            .args(["rm", "--all", "--force"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        for _ in 0..40 {
            let _ = std::fs::remove_dir_all(&self.0);
            if !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        eprintln!("could not remove {}", self.0.display());
    }
}

/// podman with its storage (vfs), state and temporary files in `dir`: the machine's container
/// storage and configuration are neither read nor changed.
fn podman(dir: &Path) -> Command {
    let mut cmd = Command::new("podman");
    cmd.arg("--root")
        .arg(dir.join("storage"))
        .arg("--runroot")
        .arg(dir.join("run"))
        .arg("--tmpdir")
        .arg(dir.join("tmp"))
        .args(["--storage-driver", "vfs", "--events-backend", "none"])
        .args(["--cgroup-manager", "cgroupfs"]);
    cmd
}

/// `podman run` of the image, without network, with `flags` (before the image) and `args`
/// (after it: the entrypoint's arguments).
fn run(dir: &Path, image: &str, flags: &[&str], args: &[&str]) -> Result<Output> {
    let mut cmd = podman(dir);
    cmd.args(["run", "--rm", "--runtime", "runc", "--network", "none"])
        .args([
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=4096:4096",
        ])
        .args(flags)
        .arg(image)
        .args(args);
    output_with_timeout(&mut cmd, Duration::from_secs(120))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The finding of `check` in `ambit check --pre -o json` output.
fn finding<'a>(findings: &'a Value, check: &str) -> Result<&'a Value> {
    findings
        .as_array()
        .and_then(|all| all.iter().find(|f| f["check"] == check))
        .with_context(|| format!("no `{check}` finding in {findings}"))
}

#[test]
fn the_image_archive_loads_and_runs_ambit_and_its_preflight() -> Result<()> {
    ensure!(
        Path::new("/usr/bin/podman").exists() && Path::new("/usr/sbin/runc").exists(),
        "podman and runc are needed (`cargo xtask setup`)"
    );
    let (ambit, cni) = (ambit_bin(), ambit_cni_bin());
    let bins = ambit.parent().context("$AMBIT_BIN has a directory")?;
    ensure!(
        ambit.is_file() && cni == bins.join("ambit-cni") && cni.is_file(),
        "the image is built from `ambit` and `ambit-cni` side by side ({} and {}): \
         `cargo build -p ambit -p ambit-cni --bins`",
        ambit.display(),
        cni.display()
    );
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "image-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
            % 1_000_000
    ));
    std::fs::create_dir_all(&dir)?;
    let _scratch = Scratch(dir.clone());
    let archive = dir.join("ambit.oci.tar");
    let image = image_reference()?;

    // `cargo xtask image`, as a user runs it (xtask is built already by `cargo xtask test`).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut xtask = Command::new(cargo);
    xtask
        .current_dir(workspace())
        .args(["run", "--quiet", "-p", "xtask", "--", "image", "--binaries"])
        .arg(bins)
        .arg("--out")
        .arg(&archive);
    let out = output_with_timeout(&mut xtask, Duration::from_secs(900))?;
    ensure!(
        out.status.success() && archive.is_file(),
        "cargo xtask image failed ({}): {}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    let out = output_with_timeout(
        podman(&dir).arg("load").arg("--input").arg(&archive),
        Duration::from_secs(300),
    )?;
    ensure!(
        out.status.success() && text(&out.stdout).contains(&image),
        "podman load of {} did not load {image} ({}): {}{}",
        archive.display(),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let inspect = output_with_timeout(
        podman(&dir).args(["image", "inspect", &image]),
        Duration::from_secs(60),
    )?;
    let config: Value = serde_json::from_slice(&inspect.stdout)
        .with_context(|| format!("podman image inspect: {}", text(&inspect.stderr)))?;
    let config = &config[0]["Config"];
    ensure!(
        config["Entrypoint"] == serde_json::json!(["/usr/local/bin/ambit"])
            && config["Labels"]["org.opencontainers.image.version"] == env!("CARGO_PKG_VERSION"),
        "the image's entrypoint is `ambit` and its version label the workspace's: {config}"
    );

    // The entrypoint is `ambit`: the arguments are its own.
    let out = run(&dir, &image, &[], &["--version"])?;
    ensure!(
        out.status.success()
            && text(&out.stdout).trim() == format!("ambit {}", env!("CARGO_PKG_VERSION")),
        "`ambit --version` in the image ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    // The preflight in an unprivileged container: it runs, prints its table, and fails on what
    // the container lacks. What it can tell for certain: the kernel is the host's; podman's
    // default capabilities lack BPF, NET_ADMIN and SYS_ADMIN; the image has no CNI
    // configuration; and a failure makes the exit status non-zero.
    let out = run(&dir, &image, &[], &["check", "--pre"])?;
    let table = text(&out.stdout);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let line = |check: &str| {
        table
            .lines()
            .find(|l| {
                l.split_once(']')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{check}: ")))
            })
            .unwrap_or("")
            .to_string()
    };
    ensure!(
        !out.status.success()
            && [
                "capabilities",
                "kernel version",
                "kernel BTF",
                "cgroup v2",
                "bpf filesystem",
                "CNI configuration"
            ]
            .iter()
            .all(|c| !line(c).is_empty())
            && line("capabilities").starts_with("[FAIL]")
            && line("kernel version").starts_with("[ok]")
            && line("kernel version").contains(release.trim())
            && line("CNI configuration").starts_with("[warn]")
            && line("CNI configuration").contains("/etc/cni/net.d")
            && table.contains("fix: "),
        "`ambit check --pre` in the image ({}):\n{table}{}",
        out.status,
        text(&out.stderr)
    );

    // With the DaemonSet's capabilities the same check finds them: it reads the container's
    // real privileges, not a fixed answer.
    let out = run(
        &dir,
        &image,
        &["--cap-add", "BPF,NET_ADMIN,SYS_ADMIN,SYS_PTRACE"],
        &["check", "--pre", "-o", "json"],
    )?;
    let findings: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`ambit check --pre -o json` printed no JSON ({}): {}{}",
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        )
    })?;
    ensure!(
        finding(&findings, "capabilities")?["status"] == "ok",
        "with BPF, NET_ADMIN and SYS_ADMIN granted: {findings}"
    );

    // The CNI plugin is in the image beside `ambit` (where `ambit cni install` takes it from),
    // and runs there.
    let out = run(
        &dir,
        &image,
        &[
            "--entrypoint",
            "/usr/local/bin/ambit-cni",
            "--env",
            "CNI_COMMAND=VERSION",
        ],
        &[],
    )?;
    let version: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    ensure!(
        out.status.success()
            && version["supportedVersions"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v == "1.0.0")),
        "ambit-cni VERSION in the image ({}): {}{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );

    // Only what the binaries need: no shell to run.
    let out = run(&dir, &image, &["--entrypoint", "/bin/sh"], &["-c", "true"])?;
    if out.status.success() {
        bail!("the image has a shell (/bin/sh ran): it should hold only Ambit's binaries");
    }
    Ok(())
}

/// Unmounts a test's mount point when it ends (lazily, so a busy one still goes).
struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        while nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_ok() {}
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The mounts at `path`, from /proc/self/mountinfo.
fn mounts_at(path: &Path) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.split_whitespace().nth(4) == path.to_str())
        .count()
}

/// The image has no shell, so what the manifests' containers did with one is done by `ambit`:
/// the agent's init container mounts a bpffs only where none is (`ambit mount-bpffs`), and the
/// uninstall DaemonSet's container says the node is done and waits to be stopped (`ambit
/// uninstall done`).
#[test]
fn mount_bpffs_and_uninstall_done_stand_in_for_the_shell() -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let ambit = ambit_bin();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "image-bpffs-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
            % 1_000_000
    ));
    std::fs::create_dir_all(&dir)?;
    let _unmount = Unmount(dir.clone());
    let fs_type =
        |p: &Path| -> Result<i64> { Ok(nix::sys::statfs::statfs(p)?.filesystem_type().0 as i64) };
    ensure!(
        fs_type(&dir)? != BPF_FS_MAGIC,
        "{} is on a bpffs already",
        dir.display()
    );

    let mount = |what: &str| -> Result<String> {
        let out = output_with_timeout(
            Command::new(&ambit)
                .arg("mount-bpffs")
                .arg("--path")
                .arg(&dir),
            Duration::from_secs(60),
        )?;
        ensure!(
            out.status.success(),
            "{what} `ambit mount-bpffs --path {}` ({}): {}{}",
            dir.display(),
            out.status,
            text(&out.stdout),
            text(&out.stderr)
        );
        Ok(text(&out.stdout))
    };
    let first = mount("the first")?;
    ensure!(
        fs_type(&dir)? == BPF_FS_MAGIC && mounts_at(&dir) == 1 && first.contains("mounted a bpf"),
        "after `ambit mount-bpffs` {} is not one bpffs mount: {first}",
        dir.display()
    );
    let second = mount("the second")?;
    ensure!(
        mounts_at(&dir) == 1 && second.contains("mounted already"),
        "a second `ambit mount-bpffs` mounted again ({} mounts): {second}",
        mounts_at(&dir)
    );
    let missing = dir.join("missing");
    let out = output_with_timeout(
        Command::new(&ambit)
            .arg("mount-bpffs")
            .arg("--path")
            .arg(&missing),
        Duration::from_secs(60),
    )?;
    ensure!(
        !out.status.success() && text(&out.stderr).contains(&missing.display().to_string()),
        "`ambit mount-bpffs` on a missing directory must fail naming it ({}): {}",
        out.status,
        text(&out.stderr)
    );

    // `ambit uninstall done`: says so, keeps running, and exits cleanly on SIGTERM.
    let mut done = Command::new(&ambit)
        .args(["uninstall", "done"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let pid = done.id() as i32;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(done.stdout.take().context("stdout")?),
        &mut line,
    )?;
    let running = done.try_wait()?.is_none();
    ambit_tests::util::signal(pid, libc::SIGTERM);
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(done.wait());
    });
    let status = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(status) => status?,
        Err(_) => {
            ambit_tests::util::signal(pid, libc::SIGKILL);
            let _ = waiter.join();
            bail!("`ambit uninstall done` did not stop on SIGTERM");
        }
    };
    let _ = waiter.join();
    ensure!(
        line.trim() == "ambit: uninstalled on this node" && running && status.success(),
        "`ambit uninstall done`: printed {line:?}, running after it: {running}, exit {status}"
    );
    Ok(())
}
