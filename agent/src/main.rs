//! The `ambit` binary.
use std::path::PathBuf;

use ambit::{
    app::AgentArgs,
    telemetry::{LogFormat, LogSettings, Sampling},
};
use clap::{Parser, Subcommand};

/// jemalloc, not the system's malloc: after a burst of connections, glibc keeps the freed
/// memory in its per-thread arenas and the agent's resident memory never comes back down;
/// jemalloc's background thread returns freed pages to the kernel within seconds (its dirty
/// page decay, 10 s). Measured in docs/benchmarks.md ("Agent memory after a burst").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once at start (its `malloc_conf`, under the prefix of
/// tikv-jemalloc-sys's symbols; `_RJEM_MALLOC_CONF` in the environment overrides them).
///
/// One arena, not jemalloc's default of four per CPU. Each arena keeps its own freed pages
/// until they decay, and a bulk transfer's buffers (up to 256 KiB, HTTP/2 frames as large) are
/// allocated on whichever worker thread its tasks run, so each arena the workers used kept a
/// transfer's churn of its own: on the bench, one arena took 12-13 MiB off both agents' peaks
/// during HBONE bulk with 8 streams (49.2 / 52.0 -> 36.8 / 39.9 MiB) at the same throughput and
/// CPU per byte (docs/perf/README.md, "One allocator arena"). The price is one set of locks for
/// every thread's allocations above the thread caches' 32 KiB: nothing measurable with two
/// workers, not measured with dozens (one per CPU on a large node); `_RJEM_MALLOC_CONF=
/// narenas:default` restores jemalloc's default there (docs/operations.md, "Footprint").
/// A thin pointer (`&[u8; N]`) to a NUL-terminated string, as C's `const char *malloc_conf`.
#[cfg(feature = "jemalloc")]
#[unsafe(export_name = "_rjem_malloc_conf")]
static JEMALLOC_CONF: &[u8; ambit::allocator::CONF.len()] = ambit::allocator::CONF;

/// Ambit: a sidecarless service mesh. One agent per node steers enrolled pods' TCP, through
/// socket-layer eBPF, into a node-level proxy.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log line format.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,ambit::proxy=debug`.
    #[arg(long, env = "RUST_LOG", default_value = "info", global = true)]
    log_level: String,
    /// The percentage of successful connections (and, in `ambit waypoint`, requests) that get an
    /// access-log line, 0 to 100 (`1` or `1%`: one in a hundred); failed and refused ones are
    /// always logged.
    #[arg(long, env = "AMBIT_ACCESS_LOG_SAMPLING", default_value = "100", value_parser = Sampling::parse, global = true)]
    access_log_sampling: Sampling,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the node agent: load and attach the eBPF programs, enrol this node's pods, proxy.
    Agent(AgentArgs),
    /// Run the mesh's certificate authority: `init` a root, `serve` the signing API.
    Ca(ambit::ca::CaArgs),
    /// Run a waypoint: the L7 proxy (HTTP routing) of the services bound to it.
    Waypoint(ambit::waypoint::WaypointCommand),
    /// Install or remove the CNI plugin `ambit-cni` on this node.
    Cni {
        #[command(subcommand)]
        command: CniCommand,
    },
    /// Show what an agent holds (workloads, services, policies, certificates), from its admin
    /// endpoint, as `istioctl ztunnel-config` does.
    Config(ambit::cli::config::ConfigArgs),
    /// Per workload, what an agent carried over an interval (connections, bytes, mTLS share),
    /// from its metrics endpoint, as `linkerd viz stat` shows.
    Stat(ambit::cli::stat::StatArgs),
    /// Check this node before installing (`--pre`) or its running agent after, one line per
    /// requirement with the fix, as `linkerd check` does.
    Check(ambit::cli::check::CheckArgs),
    /// Mount a bpf filesystem at --path unless one is there (the agent DaemonSet's init
    /// container, for hosts without one).
    MountBpffs {
        /// Where the bpf filesystem must be.
        #[arg(long, default_value = "/sys/fs/bpf")]
        path: PathBuf,
    },
    /// Remove everything an agent pinned (programs detach, maps are freed). Enrolled pods'
    /// new connections then go direct, outside the mesh. `ambit uninstall cluster` finishes an
    /// uninstall in Kubernetes.
    #[command(args_conflicts_with_subcommands = true)]
    Uninstall {
        /// `cluster` or `done`; without one, this node's pins are removed.
        #[command(subcommand)]
        command: Option<UninstallCommand>,
        /// The agent's bpffs directory.
        #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf/ambit")]
        bpffs: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum UninstallCommand {
    /// Wait until the uninstall DaemonSet has removed Ambit from every node, then delete it
    /// (the chart's post-delete hook Job runs this).
    Cluster(ambit::cli::uninstall::ClusterUninstallArgs),
    /// Print that this node is uninstalled and wait until stopped (the uninstall DaemonSet's
    /// container, which keeps its pod Ready).
    Done,
}

#[derive(Subcommand, Debug)]
enum CniCommand {
    /// Copy the plugin into the CNI bin directory and chain it after the node's network plugin
    /// (with `--watch`, keep it chained until SIGTERM).
    Install(ambit::cni::install::InstallArgs),
    /// Take the plugin out of every network configuration and remove its binary.
    Uninstall(ambit::cni::install::UninstallArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let logging = LogSettings {
        format: cli.log_format,
        filter: cli.log_level.clone(),
        access_log_sampling: cli.access_log_sampling,
    };
    // Held to the end: dropping it writes out the lines still queued.
    let _log = match ambit::telemetry::init_logging(&logging) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("error: {err:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Agent(args) => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            if let Some(threads) = args.worker_threads {
                runtime.worker_threads(threads.into());
            }
            runtime
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|rt| rt.block_on(ambit::app::run(args)))
        }
        Command::Ca(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::ca::run(args))),
        Command::Waypoint(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::waypoint::command(args))),
        Command::Cni {
            command: CniCommand::Install(args),
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::cni::install::install(args))),
        Command::Cni {
            command: CniCommand::Uninstall(args),
        } => ambit::cni::install::uninstall(&args),
        Command::Config(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::cli::config::run(args))),
        Command::Stat(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::cli::stat::run(args))),
        Command::Check(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::cli::check::run(args))),
        Command::Uninstall {
            command: Some(UninstallCommand::Cluster(args)),
            ..
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::cli::uninstall::run(args))),
        Command::Uninstall {
            command: Some(UninstallCommand::Done),
            ..
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ambit::cli::uninstall::done())),
        Command::MountBpffs { path } => ambit::redirect::mount_bpffs(&path),
        Command::Uninstall {
            command: None,
            bpffs,
        } => ambit::redirect::uninstall(&bpffs),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
