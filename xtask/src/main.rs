//! `cargo xtask`: the developer and CI entry points of the Ambit workspace.
//!
//! - `setup`: make this machine able to build and test Ambit (idempotent: check, then act).
//! - `build [--release]`: the toolchain part of setup, then the agent and test-bed binaries.
//! - `test [-- <nextest args>]`: setup, fmt, clippy, build, then every test through nextest.
//! - `demo`: setup, release build, then the cluster-in-a-box demo.
//! - `bench [-- <bench args>]`: setup, release build, then the benchmark on a cluster in a box;
//!   writes docs/benchmarks.md.
//! - `image [--binaries DIR]`: Ambit's container image (the Dockerfile, built with podman),
//!   written as an OCI archive under target/image.
//! - `crds`: writes the CRD YAML (deploy/crds and the Helm chart's crds/) from the Rust types.

mod cmd;
mod image;
mod setup;
mod tasks;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Ambit's developer and CI tasks",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install and check everything needed to build, test and run Ambit here (idempotent).
    Setup,
    /// Build the agent and the test-bed binaries (runs the toolchain part of setup first).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run setup, fmt check, clippy, build, then every test with cargo-nextest.
    Test {
        /// Extra arguments for `cargo nextest run`, after `--` (e.g. a test filter).
        #[arg(last = true)]
        nextest_args: Vec<String>,
    },
    /// Run setup, a release build, then the cluster-in-a-box demo.
    Demo,
    /// Run setup, a release build, then the benchmark (direct, passthrough and mesh paths, same
    /// node and across nodes) on a cluster in a box; writes docs/benchmarks.md.
    Bench {
        /// Extra arguments for the bench binary, after `--` (e.g. `--rate-seconds 5`; see
        /// `target/release/bench --help`).
        #[arg(last = true)]
        bench_args: Vec<String>,
    },
    /// Write the CRD YAML of deploy/crds and the Helm chart's files/crds/ from the Rust types
    /// (ambit::discovery::kube::crd); the deploy test fails until the committed files match.
    Crds,
    /// Build Ambit's container image (`ambit` and `ambit-cni`, Dockerfile) with podman and
    /// write it as an OCI archive (by default `target/image/ambit-<version>.oci.tar`); its name is
    /// deploy/image.env's, its tag the workspace version.
    Image {
        /// Take `ambit` and `ambit-cni` from this directory (e.g. target/debug) instead of
        /// compiling them for release.
        #[arg(long, value_name = "DIR")]
        binaries: Option<PathBuf>,
        /// Only assemble the image's root filesystem in DIR, without podman: what the
        /// Dockerfile's `source` stage runs in its builder.
        #[arg(long, value_name = "DIR", conflicts_with = "out")]
        rootfs_only: Option<PathBuf>,
        /// The OCI archive to write.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
}

/// The workspace root: xtask's parent directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::ensure(setup::Scope::Full),
        Command::Build { release } => tasks::build(release),
        Command::Test { nextest_args } => tasks::test(&nextest_args),
        Command::Demo => tasks::demo(),
        Command::Bench { bench_args } => tasks::bench(&bench_args),
        Command::Crds => tasks::crds(),
        Command::Image {
            binaries,
            rootfs_only,
            out,
        } => image::image(image::Options {
            binaries,
            rootfs_only,
            out,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\nxtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
