//! `cargo xtask image`: Ambit's container image, built with podman (no daemon) from the
//! repository's `Dockerfile`, written as an OCI archive.
//!
//! The image holds `ambit` (agent, CA, waypoint, CLI) and `ambit-cni` on an empty base with
//! only what they load: the dynamic loader and the shared libraries `ldd` names, plus the CA
//! certificates a waypoint trusts when it fetches an https `jwksUri` (rustls-native-certs).
//! No shell, no package manager. `ambit-cni` is linked statically (`+crt-static`): the
//! container runtime runs it on the host, whose C library may be older than the image's.
//!
//! One code path assembles the image's root filesystem ([`rootfs`]), wherever the binaries are
//! compiled:
//! - `prebuilt` (what this command does, and the only way on machines without a registry, such
//!   as the project's test machines): the binaries are compiled on the host with its pinned
//!   toolchains (or taken from `--binaries`), the root filesystem is assembled here in the
//!   build context (`rootfs/`), and the Dockerfile's `prebuilt` stage copies it in.
//! - `source` (the Dockerfile's default, for CI with a registry): the Dockerfile's builder stage
//!   (a Rust image with the same toolchains) runs `cargo xtask image --rootfs-only /rootfs`,
//!   the same code, and the final stage copies that.
//!
//! The image's name is `deploy/image.env`'s `AMBIT_IMAGE_REPOSITORY` and its tag the workspace
//! version: the chart's values and appVersion and every manifest name the same image, which the
//! deploy test checks (tests/tests/deploy.rs).
//!
//! The build context and podman's storage (vfs: no overlay or fuse needed), state and
//! temporary files are in a directory of this run under target/image, removed at the end: the
//! machine's own container storage and configuration are not touched.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, bail};

use crate::cmd::{capture, command, probe, run};
use crate::setup::{self, Scope};
use crate::tasks::target_dir;
use crate::workspace_root;

/// The image's tag: the workspace version (xtask shares it), which `ambit --version` prints.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The file that names the image's repository, relative to the workspace root.
pub const IMAGE_ENV: &str = "deploy/image.env";

/// Where the binaries go in the image; the entrypoint is `ambit` there, and `ambit cni
/// install` finds `ambit-cni` beside it.
const BIN_DIR: &str = "usr/local/bin";

/// The CA bundle of Debian's ca-certificates (the path rustls-native-certs reads first).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// What `cargo xtask image` was asked for.
pub struct Options {
    /// Take `ambit` and `ambit-cni` from this directory instead of compiling them.
    pub binaries: Option<PathBuf>,
    /// Only assemble the root filesystem here (what the Dockerfile's `source` stage runs).
    pub rootfs_only: Option<PathBuf>,
    /// The OCI archive to write.
    pub out: Option<PathBuf>,
}

/// The image's repository, from [`IMAGE_ENV`] (`AMBIT_IMAGE_REPOSITORY=<name>`).
pub fn repository(root: &Path) -> Result<String> {
    let path = root.join(IMAGE_ENV);
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let value = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("AMBIT_IMAGE_REPOSITORY="))
        .with_context(|| format!("{}: no AMBIT_IMAGE_REPOSITORY= line", path.display()))?;
    // A tag or digest belongs elsewhere (the tag is the version); a registry's port may not.
    let last = value.rsplit('/').next().unwrap_or(value);
    if value.is_empty()
        || last.contains(':')
        || value.contains(|c: char| c == '@' || c == '"' || c == '\'' || c.is_whitespace())
        || value != value.to_ascii_lowercase()
    {
        bail!(
            "{}: AMBIT_IMAGE_REPOSITORY={value:?} is not an image repository (registry/path, \
             without tag or digest)",
            path.display()
        );
    }
    Ok(value.to_string())
}

pub fn image(opts: Options) -> Result<()> {
    let root = workspace_root();
    let target = target_dir(&root);
    if let Some(dir) = &opts.rootfs_only {
        let bins = match &opts.binaries {
            Some(dir) => binaries_in(dir)?,
            None => compile(&root, &target)?,
        };
        return rootfs(&bins, dir);
    }
    let reference = format!("{}:{VERSION}", repository(&root)?);
    let podman = probe("podman", &["--version"]).with_context(|| {
        "podman is needed to build the image (Debian's `podman` and `runc`: `cargo xtask setup` \
         installs them)"
    })?;
    println!("==> image {reference} ({})", podman.trim());
    let bins = match &opts.binaries {
        Some(dir) => binaries_in(dir)?,
        None => compile(&root, &target)?,
    };

    let work = target.join("image");
    let state = Scratch::new(&work)?;
    let context = state.dir.join("context");
    rootfs(&bins, &context.join("rootfs"))?;

    let out = match opts.out {
        Some(out) => out,
        None => work.join(format!("ambit-{VERSION}.oci.tar")),
    };
    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    println!("==> podman build (the Dockerfile's `prebuilt` stage)");
    run(state
        .podman()
        .args(["build", "--pull=never", "--network=none", "--layers=false"])
        .args(["--build-arg", "ROOTFS=prebuilt"])
        .args(["--build-arg", &format!("VERSION={VERSION}")])
        .arg("--file")
        .arg(root.join("Dockerfile"))
        .args(["--tag", &reference])
        .arg(&context))
    .context("podman build failed")?;
    let size =
        capture(
            state
                .podman()
                .args(["image", "inspect", "--format", "{{.Size}}", &reference]),
        )?;
    let _ = fs::remove_file(&out);
    run(state
        .podman()
        .args(["save", "--format", "oci-archive", "--output"])
        .arg(&out)
        .arg(&reference))
    .context("podman save failed")?;
    let archive = fs::metadata(&out)
        .with_context(|| format!("{} was not written", out.display()))?
        .len();
    println!(
        "==> {reference}: {} MB unpacked, archive {} ({} MB)",
        mb(size.trim().parse().unwrap_or(0)),
        out.display(),
        mb(archive)
    );
    println!(
        "    load it with `podman load -i {}`; to push: docs/install.md",
        out.display()
    );
    Ok(())
}

fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// The two binaries of the image.
struct Binaries {
    ambit: PathBuf,
    cni: PathBuf,
}

fn binaries_in(dir: &Path) -> Result<Binaries> {
    let bins = Binaries {
        ambit: dir.join("ambit"),
        cni: dir.join("ambit-cni"),
    };
    for bin in [&bins.ambit, &bins.cni] {
        if !bin.is_file() {
            bail!(
                "--binaries {}: there is no {} (build with `cargo build -p ambit -p ambit-cni \
                 --bins`)",
                dir.display(),
                bin.file_name().unwrap_or_default().to_string_lossy()
            );
        }
    }
    Ok(bins)
}

/// Release builds of `ambit` and of a statically linked `ambit-cni`.
fn compile(root: &Path, target: &Path) -> Result<Binaries> {
    setup::ensure(Scope::Toolchain)?;
    println!("==> release build: ambit");
    run(command("cargo").current_dir(root).args([
        "build",
        "--release",
        "-p",
        "ambit",
        "--bin",
        "ambit",
    ]))
    .context("release build of ambit failed")?;
    // `--target` keeps the flag away from build scripts and proc macros, and the static build
    // in its own directory beside the normal one.
    let host = host_triple()?;
    println!("==> release build: ambit-cni, statically linked ({host})");
    run(command("cargo")
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "ambit-cni",
            "--bin",
            "ambit-cni",
        ])
        .args(["--target", &host])
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("RUSTFLAGS", "-C target-feature=+crt-static"))
    .context("static release build of ambit-cni failed")?;
    let cni = target.join(&host).join("release/ambit-cni");
    if !shared_libraries(&cni)?.is_empty() {
        bail!(
            "{} is dynamically linked despite +crt-static (is glibc's static libc.a \
             installed? Debian: libc6-dev)",
            cni.display()
        );
    }
    Ok(Binaries {
        ambit: target.join("release/ambit"),
        cni,
    })
}

fn host_triple() -> Result<String> {
    let vv = capture(command("rustc").arg("-vV"))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_string())
        .context("`rustc -vV` names no host")
}

/// The image's root filesystem in `dir` (made afresh): the binaries in /usr/local/bin
/// (debug info stripped; symbols kept, so backtraces name functions), every shared library
/// and the loader `ldd` names for them at the same paths, and the CA bundle.
fn rootfs(bins: &Binaries, dir: &Path) -> Result<()> {
    println!("==> root filesystem in {}", dir.display());
    remove_dir(dir)?;
    let bin_dir = dir.join(BIN_DIR);
    fs::create_dir_all(&bin_dir).with_context(|| format!("cannot create {}", bin_dir.display()))?;
    let mut libs = Vec::new();
    for (bin, name) in [(&bins.ambit, "ambit"), (&bins.cni, "ambit-cni")] {
        let to = bin_dir.join(name);
        run(command("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&to)
            .arg(bin))
        .with_context(|| format!("cannot copy {} into the image", bin.display()))?;
        for lib in shared_libraries(bin)? {
            if !libs.contains(&lib) {
                libs.push(lib);
            }
        }
    }
    libs.push(PathBuf::from(CA_BUNDLE));
    for file in &libs {
        let to = dir.join(file.strip_prefix("/").unwrap_or(file));
        fs::create_dir_all(to.parent().context("a file has a directory")?)?;
        // Follows symlinks: the image gets the file at the path the loader asks for.
        fs::copy(file, &to).with_context(|| {
            format!(
                "cannot copy {} into the image (Debian: the CA bundle is the ca-certificates \
                 package)",
                file.display()
            )
        })?;
        println!("    {}", file.display());
    }
    Ok(())
}

/// The absolute paths `ldd` prints for a binary: its shared libraries and the loader; none
/// for a static binary.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let output = command("ldd")
        .arg(bin)
        .output()
        .context("cannot run ldd (Debian: libc-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || text.contains("statically linked") {
        // glibc's ldd exits 1 with "not a dynamic executable" for static binaries.
        let stderr = String::from_utf8_lossy(&output.stderr);
        if text.contains("statically linked") || stderr.contains("not a dynamic executable") {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", bin.display(), stderr.trim());
    }
    Ok(text
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
        .map(PathBuf::from)
        .collect())
}

fn remove_dir(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", dir.display())),
    }
}

/// One run's directory, removed on drop: the build context, and podman's storage (vfs), state
/// and temporary files, so that nothing of the machine's container configuration is read or
/// changed and runs at the same time do not meet.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(work: &Path) -> Result<Self> {
        let dir = work.join(format!("run-{}", std::process::id()));
        remove_dir(&dir)?;
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self { dir })
    }

    fn podman(&self) -> Command {
        let mut cmd = command("podman");
        cmd.arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run"))
            .arg("--tmpdir")
            .arg(self.dir.join("tmp"))
            .args(["--storage-driver", "vfs", "--events-backend", "none"])
            .args(["--cgroup-manager", "cgroupfs"]);
        cmd
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(err) = remove_dir(&self.dir) {
            eprintln!("xtask: warning: {err:#}");
        }
    }
}
