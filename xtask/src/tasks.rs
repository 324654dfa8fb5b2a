//! `build`, `test`, `demo`, `bench` and `crds`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{command, exec, run};
use crate::setup::{self, Scope};
use crate::workspace_root;

/// The no_std eBPF crate: built only by aya-build for `bpfel-unknown-none`. It cannot be
/// compiled for the host (no_std + panic_handler: "unwinding panics are not supported without
/// std"), so host-target cargo runs exclude it and clippy checks it for the BPF target.
const EBPF_PACKAGE: &str = "ambit-ebpf";

/// Packages whose binaries the tests and the demo run.
const BIN_PACKAGES: [&str; 6] = ["-p", "ambit", "-p", "ambit-cni", "-p", "ambit-tests"];

fn cargo(root: &Path) -> Command {
    let mut cmd = command("cargo");
    cmd.current_dir(root);
    cmd
}

/// The target directory (`$CARGO_TARGET_DIR`, relative to the workspace root, or `target`).
pub(crate) fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

fn banner(step: usize, total: usize, title: &str) {
    println!("\n==> [{step}/{total}] {title}");
}

pub fn build(release: bool) -> Result<()> {
    setup::ensure(Scope::Toolchain)?;
    let root = workspace_root();
    let profile = if release { "release" } else { "debug" };
    println!("==> build ({profile}): agent and test-bed binaries");
    let mut cmd = cargo(&root);
    cmd.arg("build").args(BIN_PACKAGES).arg("--bins");
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    println!(
        "==> binaries in {}",
        target_dir(&root).join(profile).display()
    );
    Ok(())
}

pub fn test(nextest_args: &[String]) -> Result<()> {
    setup::ensure(Scope::Full)?;
    let root = workspace_root();
    let debug = target_dir(&root).join("debug");

    let mut fmt = cargo(&root);
    fmt.args(["fmt", "--all", "--", "--check"]);

    let mut clippy = cargo(&root);
    clippy
        .args([
            "clippy",
            "--workspace",
            "--exclude",
            EBPF_PACKAGE,
            "--all-targets",
        ])
        .args(["--", "-D", "warnings"]);

    let mut clippy_ebpf = cargo(&root);
    clippy_ebpf
        .args(["+nightly", "clippy", "-p", EBPF_PACKAGE])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--", "-D", "warnings"]);

    // Broken intra-doc links fail the run; the private items are documented too, since most
    // of the agent is crate-private. After clippy, this costs about the time of rustdoc alone.
    let mut doc = cargo(&root);
    doc.args(["doc", "--workspace", "--exclude", EBPF_PACKAGE])
        .args(["--no-deps", "--document-private-items"])
        .env("RUSTDOCFLAGS", "-D warnings");

    let mut build = cargo(&root);
    build.arg("build").args(BIN_PACKAGES).arg("--bins");

    let steps: [(&str, &mut Command); 5] = [
        ("format check", &mut fmt),
        ("clippy (host crates)", &mut clippy),
        ("clippy (eBPF crate, bpfel-unknown-none)", &mut clippy_ebpf),
        ("docs (rustdoc -D warnings)", &mut doc),
        ("build binaries", &mut build),
    ];
    let total = steps.len() + 1;
    for (i, (title, cmd)) in steps.into_iter().enumerate() {
        banner(i + 1, total, title);
        run(cmd).with_context(|| format!("step {}/{total} ({title}) failed", i + 1))?;
    }

    let mut nextest = cargo(&root);
    nextest
        .args(["nextest", "run", "--workspace", "--exclude", EBPF_PACKAGE])
        .arg("--no-fail-fast")
        .args(nextest_args)
        .env("AMBIT_BIN", debug.join("ambit"))
        .env("AMBIT_CNI_BIN", debug.join("ambit-cni"))
        .env("AMBIT_TESTPOD_BIN", debug.join("testpod"));
    banner(total, total, "tests (cargo nextest)");
    // From here on nextest owns the terminal: its summary is the last line, its status ours.
    Err(exec(&mut nextest))
}

pub fn demo() -> Result<()> {
    run_release_binary("demo", "demo", |cmd| cmd)
}

/// Bench flags that leave part of the benchmark out. docs/benchmarks.md is the record of a whole
/// run (every path and the memory soak, which issue 8 asks to keep reported there), so a run with
/// any of these writes its report to `<target dir>/bench/benchmarks.md` instead and cannot erase
/// the rest.
const PARTIAL_BENCH_FLAGS: &[&str] = &[
    "--no-soak",
    "--soak-only",
    "--no-waypoint",
    "--no-passthrough",
    "--waypoint-only",
];

/// The report a bench run with `bench_args` writes: none of ours when the caller chose one with
/// `--out`, the partial report for a run that leaves something out, else docs/benchmarks.md.
fn bench_report(root: &Path, bench_args: &[String]) -> Option<PathBuf> {
    if bench_args
        .iter()
        .any(|a| a == "--out" || a.starts_with("--out="))
    {
        return None;
    }
    let partial = bench_args
        .iter()
        .any(|a| PARTIAL_BENCH_FLAGS.contains(&a.as_str()));
    Some(if partial {
        target_dir(root).join("bench/benchmarks.md")
    } else {
        root.join("docs/benchmarks.md")
    })
}

pub fn bench(bench_args: &[String]) -> Result<()> {
    let root = workspace_root();
    let report = bench_report(&root, bench_args);
    run_release_binary(
        "bench",
        "benchmark (a few minutes; writes docs/benchmarks.md, or target/bench/ for a partial run)",
        |cmd| {
            // The report names the command that produced it, extra arguments included.
            let mut command = String::from("cargo xtask bench");
            if !bench_args.is_empty() {
                command.push_str(" --");
                for a in bench_args {
                    if a.contains([' ', '(', ')', ';', '\'']) {
                        command.push_str(&format!(" '{a}'"));
                    } else {
                        command.push_str(&format!(" {a}"));
                    }
                }
            }
            if let Some(report) = &report {
                cmd.arg("--out").arg(report);
            }
            cmd.args(["--command", &command]).args(bench_args)
        },
    )
}

/// The CRD YAML, generated from the Rust types by the agent crate's `crds` example (xtask
/// cannot link the agent: building it needs the eBPF toolchain that `setup` installs).
pub fn crds() -> Result<()> {
    setup::ensure(Scope::Toolchain)?;
    let root = workspace_root();
    println!("==> CRDs from the Rust types (ambit::discovery::kube::crd)");
    run(cargo(&root)
        .args(["run", "--quiet", "-p", "ambit", "--example", "crds", "--"])
        .arg(&root))
    .context("generating the CRDs failed")
}

/// Setup, a release build of the binaries, then the test-bed program `name` with the release
/// agent and testpod (its exit status becomes ours).
fn run_release_binary(
    name: &str,
    what: &str,
    configure: impl FnOnce(&mut Command) -> &mut Command,
) -> Result<()> {
    setup::ensure(Scope::Full)?;
    let root = workspace_root();
    let release = target_dir(&root).join("release");
    println!("==> [1/2] release build");
    run(cargo(&root)
        .args(["build", "--release"])
        .args(BIN_PACKAGES)
        .arg("--bins"))
    .context("release build failed")?;
    let program = release.join(name);
    if !program.is_file() {
        bail!(
            "{} was not built: the `ambit-tests` package has no `{name}` binary",
            program.display()
        );
    }
    println!("\n==> [2/2] {what}");
    let mut cmd = command(&program);
    cmd.current_dir(&root)
        .env("AMBIT_BIN", release.join("ambit"))
        .env("AMBIT_CNI_BIN", release.join("ambit-cni"))
        .env("AMBIT_TESTPOD_BIN", release.join("testpod"));
    Err(exec(configure(&mut cmd)))
}
