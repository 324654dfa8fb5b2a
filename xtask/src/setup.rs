//! `cargo xtask setup`: every step checks first and acts only when something is missing, so
//! running it again is cheap and changes nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

use crate::cmd::{self, capture, command, probe, run};

/// The bpf-linker release that builds against the nightly's LLVM (see docs of the toolchain).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests, the demo and the benchmarks call.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",       // ip netns / link / addr / route: the cluster-in-a-box test bed
    "bpftool",        // inspecting loaded programs, maps and pins
    "curl",           // HTTP clients in the demo and tests
    "tcpdump",        // looking at the wire (plaintext vs. mTLS) in the demo
    "wrk",            // HTTP load for the benchmarks
    "nghttp2-client", // h2 clients (nghttp, h2load: HTTP load in `cargo xtask bench`)
    "nginx-light",    // the HTTP server of `cargo xtask bench` (started by the bench, in a pod)
    "iperf3",         // bulk throughput in `cargo xtask bench`
    "prometheus",     // scraping the agent's metrics; promtool checks the dashboard's PromQL
    "python3-venv",   // the venv of the deploy test's validators (target/tmp/deploy-tools)
    // podman: a real container runtime calling the CNI plugin (tests/tests/cni.rs); it also
    // builds and runs the image (`cargo xtask image`, tests/tests/image.rs).
    "podman",
    "containernetworking-plugins", // bridge, host-local: the network plugins ambit-cni follows
    "runc",                        // podman's runtime here (crun refuses the hybrid cgroup layout)
    "ca-certificates",             // the CA bundle `cargo xtask image` puts in the image
    "binutils",                    // strip: the image's binaries without their debug info
];

const BPFFS: &str = "/sys/fs/bpf";
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";
const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// What compiling needs: the nightly with rust-src and bpf-linker.
    Toolchain,
    /// Everything: also the test tools, Debian packages, mounts and kernel checks.
    Full,
}

pub fn ensure(scope: Scope) -> Result<()> {
    println!(
        "==> setup ({})",
        match scope {
            Scope::Toolchain => "toolchain",
            Scope::Full => "full",
        }
    );
    let nightly = nightly_toolchain()?;
    nightly_rust_src()?;
    if scope == Scope::Full {
        stable_components()?;
    }
    bpf_linker(&nightly)?;
    if scope == Scope::Toolchain {
        println!("==> setup done\n");
        return Ok(());
    }
    cargo_nextest()?;
    debian_packages()?;
    bpffs()?;
    cgroup2()?;
    running_as_root()?;
    kernel_btf()?;
    kernel_version()?;
    println!("==> setup done\n");
    Ok(())
}

fn ok(what: &str, detail: impl AsRef<str>) {
    println!("  [ok]    {what}: {}", detail.as_ref());
}

fn act(what: &str, detail: impl AsRef<str>) {
    println!("  [setup] {what}: {}", detail.as_ref());
}

/// Facts about the `nightly` toolchain that bpf-linker is built against.
struct Nightly {
    /// `$(rustc +nightly --print sysroot)/lib`, which holds the toolchain's libLLVM.
    lib_dir: PathBuf,
    /// Major version of that LLVM, from `rustc +nightly -vV`.
    llvm_major: String,
}

fn nightly_toolchain() -> Result<Nightly> {
    const WHAT: &str = "nightly toolchain";
    let list = capture(command("rustup").args(["toolchain", "list"])).context(
        "rustup is needed to manage the stable and nightly toolchains; install it from https://rustup.rs",
    )?;
    // `+nightly` means `nightly-<host>`; dated nightlies (`nightly-2026-...`) do not count.
    let present = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == "nightly"
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        });
    if !present {
        bail!(
            "{WHAT}: no `nightly` toolchain is installed (`rustup toolchain list` shows none). \
             The eBPF programs are built with it (`-Z build-std=core` for bpfel-unknown-none). \
             It cannot be downloaded on these machines: install the image's nightly (the one \
             bpf-linker is built against) and do not run `rustup update nightly`"
        );
    }
    let vv = capture(command("rustc").args(["+nightly", "-vV"]))
        .with_context(|| format!("{WHAT}: installed but `rustc +nightly -vV` does not run"))?;
    let release = field(&vv, "release").unwrap_or("?").to_string();
    let llvm = field(&vv, "LLVM version").with_context(|| {
        format!("{WHAT}: `rustc +nightly -vV` reports no `LLVM version:` line:\n{vv}")
    })?;
    let llvm_major = llvm.split('.').next().unwrap_or(llvm).to_string();
    let sysroot = capture(command("rustc").args(["+nightly", "--print", "sysroot"]))
        .with_context(|| format!("{WHAT}: `rustc +nightly --print sysroot` failed"))?;
    ok(WHAT, format!("rustc {release}, LLVM {llvm}"));
    Ok(Nightly {
        lib_dir: Path::new(sysroot.trim()).join("lib"),
        llvm_major,
    })
}

/// The value of `key: value` in `rustc -vV` output.
fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

fn installed_components(toolchain: Option<&str>) -> Result<Vec<String>> {
    let mut cmd = command("rustup");
    cmd.args(["component", "list", "--installed"]);
    if let Some(toolchain) = toolchain {
        cmd.args(["--toolchain", toolchain]);
    }
    Ok(capture(&mut cmd)?.lines().map(str::to_string).collect())
}

fn nightly_rust_src() -> Result<()> {
    const WHAT: &str = "rust-src for nightly";
    let components = installed_components(Some("nightly"))?;
    if components
        .iter()
        .any(|c| c == "rust-src" || c.starts_with("rust-src-"))
    {
        ok(WHAT, "installed");
        return Ok(());
    }
    act(WHAT, "missing (needed for -Z build-std=core), adding it");
    run(command("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .with_context(|| {
            format!(
                "{WHAT}: could not add the component; check access to static.rust-lang.org, \
                 then retry `rustup component add rust-src --toolchain nightly`"
            )
        })
}

/// clippy and rustfmt of the default (stable) toolchain, for `cargo xtask test`.
fn stable_components() -> Result<()> {
    const WHAT: &str = "clippy and rustfmt (default toolchain)";
    let components = installed_components(None)?;
    let missing: Vec<&str> = ["clippy", "rustfmt"]
        .into_iter()
        .filter(|name| {
            !components
                .iter()
                .any(|c| c == name || c.starts_with(&format!("{name}-")))
        })
        .collect();
    if missing.is_empty() {
        ok(WHAT, "installed");
        return Ok(());
    }
    act(WHAT, format!("missing {}, adding", missing.join(", ")));
    run(command("rustup").args(["component", "add"]).args(&missing)).with_context(|| {
        format!(
            "{WHAT}: could not add {}; check access to static.rust-lang.org, then retry \
             `rustup component add {}`",
            missing.join(", "),
            missing.join(" ")
        )
    })
}

/// `Ok(version line)` when a working bpf-linker of the wanted version is on PATH, else why not.
fn bpf_linker_status() -> std::result::Result<String, String> {
    let Ok(output) = command("bpf-linker").arg("--version").output() else {
        return Err("not on PATH".into());
    };
    let stdout = String::from_utf8_lossy(&output.stdout).trim().to_string();
    if !output.status.success() {
        return Err(format!(
            "on PATH but does not run ({}; {}), e.g. built against another toolchain's LLVM",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    if stdout.split_whitespace().any(|w| w == BPF_LINKER_VERSION) {
        Ok(stdout)
    } else {
        Err(format!("wrong version ({stdout})"))
    }
}

fn bpf_linker(nightly: &Nightly) -> Result<()> {
    let what = format!("bpf-linker {BPF_LINKER_VERSION}");
    let why = match bpf_linker_status() {
        Ok(version) => {
            ok(&what, version);
            return Ok(());
        }
        Err(why) => why,
    };
    // No system LLVM matches the nightly's, but the nightly ships its own libLLVM: link
    // bpf-linker against it, and record its directory as rpath so it loads at run time.
    let lib_dir = &nightly.lib_dir;
    let llvm_lib = llvm_dylib_name(lib_dir, &nightly.llvm_major)
        .with_context(|| format!("{what}: cannot build it against the nightly's LLVM"))?;
    act(
        &what,
        format!(
            "{why}; building it against the nightly's own LLVM {} (lib{llvm_lib}.so), ~1 min",
            nightly.llvm_major
        ),
    );
    let lib = lib_dir.display();
    run(command("cargo")
        .args(["+nightly", "install", "bpf-linker"])
        .args(["--version", BPF_LINKER_VERSION, "--locked", "--force"])
        .arg("--no-default-features")
        .arg("--features")
        .arg(format!("llvm-{},no-llvm-linking", nightly.llvm_major))
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "RUSTFLAGS",
            format!("-L {lib} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{lib}"),
        ))
    .with_context(|| {
        format!(
            "{what}: `cargo install` failed. It needs crates.io access and the nightly's \
             libLLVM in {lib}; if the feature `llvm-{}` is unknown, bpf-linker \
             {BPF_LINKER_VERSION} does not support this nightly's LLVM",
            nightly.llvm_major
        )
    })?;
    match bpf_linker_status() {
        Ok(version) => {
            ok(&what, format!("installed: {version}"));
            Ok(())
        }
        Err(why) => bail!(
            "{what}: installed, but still not usable: {why}. Is {} on PATH?",
            cmd::cargo_bin_dir()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "~/.cargo/bin".into())
        ),
    }
}

/// The `-l dylib=` name of the toolchain's libLLVM, e.g. `LLVM-22-rust-1.97.0-nightly`.
fn llvm_dylib_name(lib_dir: &Path, major: &str) -> Result<String> {
    let mut names: Vec<String> = fs::read_dir(lib_dir)
        .with_context(|| format!("cannot list {}", lib_dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| Some(f.strip_prefix("lib")?.strip_suffix(".so")?.to_string()))
        .filter(|n| n.starts_with("LLVM"))
        .collect();
    names.sort();
    let wanted = format!("LLVM-{major}-");
    names
        .iter()
        .find(|n| n.starts_with(&wanted))
        .or(names.first())
        .cloned()
        .with_context(|| {
            format!(
                "no libLLVM*.so in {} (the nightly toolchain should ship one; is it complete?)",
                lib_dir.display()
            )
        })
}

fn cargo_nextest() -> Result<()> {
    const WHAT: &str = "cargo-nextest";
    if let Some(version) = probe("cargo", &["nextest", "--version"]) {
        ok(WHAT, version.lines().next().unwrap_or("").trim());
        return Ok(());
    }
    act(WHAT, "not on PATH, installing it");
    run(command("cargo").args(["install", "cargo-nextest", "--locked"])).with_context(|| {
        format!(
            "{WHAT}: `cargo install cargo-nextest --locked` failed; it needs crates.io access. \
             If the newest release needs a newer Rust, pick an older one with `--version`"
        )
    })
}

fn package_installed(name: &str) -> bool {
    probe("dpkg-query", &["-W", "-f=${Status}", name])
        .is_some_and(|status| status.trim() == "install ok installed")
}

fn debian_packages() -> Result<()> {
    const WHAT: &str = "Debian packages";
    if probe("dpkg-query", &["--version"]).is_none() {
        bail!(
            "{WHAT}: dpkg-query not found; this setup expects Debian 12. Install by hand: {}",
            DEBIAN_PACKAGES.join(" ")
        );
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        ok(WHAT, DEBIAN_PACKAGES.join(" "));
        return Ok(());
    }
    let fix = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        missing.join(" ")
    );
    if !is_root()? {
        bail!(
            "{WHAT}: missing {}; installing needs root: run `{fix}`",
            missing.join(" ")
        );
    }
    act(WHAT, format!("missing {}, installing", missing.join(" ")));
    let _no_services = NoServiceStarts::install()?;
    let apt = |args: &[&str]| {
        let mut cmd = command("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update"]))
        .with_context(|| format!("{WHAT}: `apt-get update` failed; check the apt sources"))?;
    run(apt(&["install", "-y", "--no-install-recommends"]).args(&missing))
        .with_context(|| format!("{WHAT}: installing failed; retry by hand: `{fix}`"))?;
    let still: Vec<&str> = missing
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if !still.is_empty() {
        bail!(
            "{WHAT}: still not installed after apt-get: {}",
            still.join(" ")
        );
    }
    ok(WHAT, format!("installed {}", missing.join(" ")));
    Ok(())
}

/// Debian's policy-rc.d hook, present only while packages are installed: exit 101 tells
/// maintainer scripts not to start services (the prometheus package would start a server).
/// An existing policy is left alone.
struct NoServiceStarts {
    created: Option<PathBuf>,
}

impl NoServiceStarts {
    const PATH: &str = "/usr/sbin/policy-rc.d";

    fn install() -> Result<Self> {
        let path = Path::new(Self::PATH);
        if path.exists() {
            return Ok(Self { created: None });
        }
        println!(
            "    (temporary {}: package scripts must not start services)",
            Self::PATH
        );
        fs::write(
            path,
            "#!/bin/sh\n# Written by `cargo xtask setup`; removed when it ends.\nexit 101\n",
        )
        .and_then(|()| fs::set_permissions(path, fs::Permissions::from_mode(0o755)))
        .with_context(|| format!("cannot write {}", Self::PATH))?;
        Ok(Self {
            created: Some(path.to_path_buf()),
        })
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.created
            && let Err(err) = fs::remove_file(path)
        {
            eprintln!("xtask: warning: could not remove {}: {err}", path.display());
        }
    }
}

/// `(mount point, fs type)` of every line of /proc/mounts.
fn mounts() -> Result<Vec<(String, String)>> {
    let text = fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            Some((fields.next()?.to_string(), fields.next()?.to_string()))
        })
        .collect())
}

fn bpffs() -> Result<()> {
    const WHAT: &str = "bpffs";
    if mounts()?
        .iter()
        .any(|(dir, fs)| dir == BPFFS && fs == "bpf")
    {
        ok(WHAT, format!("mounted at {BPFFS}"));
        return Ok(());
    }
    let fix = format!("mount -t bpf bpf {BPFFS}");
    if !is_root()? {
        bail!(
            "{WHAT}: not mounted at {BPFFS} (the agent pins its programs and maps there); as root run `{fix}`"
        );
    }
    act(WHAT, format!("not mounted at {BPFFS}, mounting"));
    run(command("mount").args(["-t", "bpf", "bpf", BPFFS])).with_context(|| {
        format!(
            "{WHAT}: `{fix}` failed; the kernel needs CONFIG_BPF_SYSCALL and {BPFFS} must exist"
        )
    })
}

fn cgroup2() -> Result<()> {
    const WHAT: &str = "cgroup v2";
    let dirs: Vec<String> = mounts()?
        .into_iter()
        .filter(|(_, fs)| fs == "cgroup2")
        .map(|(dir, _)| dir)
        .collect();
    if dirs.is_empty() {
        bail!(
            "{WHAT}: no cgroup2 filesystem in /proc/mounts. The agent attaches its connect and \
             sock_ops programs to a cgroup v2 tree; mount one (e.g. `mkdir -p /sys/fs/cgroup/unified \
             && mount -t cgroup2 none /sys/fs/cgroup/unified`) or boot with systemd.unified_cgroup_hierarchy=1"
        );
    }
    ok(WHAT, format!("mounted at {}", dirs.join(", ")));
    Ok(())
}

fn is_root() -> Result<bool> {
    // /proc/self/status: "Uid:\treal\teffective\tsaved\tfs".
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(euid == "0")
}

fn running_as_root() -> Result<()> {
    const WHAT: &str = "root";
    if !is_root()? {
        bail!(
            "{WHAT}: not running as root (euid != 0). The end-to-end tests and the demo create \
             network namespaces, cgroups and load eBPF programs; run as root (e.g. `sudo -E cargo xtask ...`)"
        );
    }
    ok(WHAT, "euid 0");
    Ok(())
}

fn kernel_btf() -> Result<()> {
    const WHAT: &str = "kernel BTF";
    if !Path::new(KERNEL_BTF).exists() {
        bail!(
            "{WHAT}: {KERNEL_BTF} is missing; the eBPF programs need a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y"
        );
    }
    ok(WHAT, KERNEL_BTF);
    Ok(())
}

fn kernel_version() -> Result<()> {
    const WHAT: &str = "kernel version";
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .context("cannot read /proc/sys/kernel/osrelease")?;
    let release = release.trim();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (numbers.next(), numbers.next()) else {
        bail!("{WHAT}: cannot parse the kernel release {release:?}");
    };
    if (major, minor) < MIN_KERNEL {
        bail!(
            "{WHAT}: kernel {release} is too old; Ambit needs Linux >= {}.{} (sk_lookup, \
             bpf_get_netns_cookie in sock_addr and sock_ops programs, bpf links)",
            MIN_KERNEL.0,
            MIN_KERNEL.1
        );
    }
    ok(
        WHAT,
        format!("{release} (>= {}.{})", MIN_KERNEL.0, MIN_KERNEL.1),
    );
    Ok(())
}
