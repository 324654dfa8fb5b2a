//! Builds what the agent embeds: the eBPF programs (ebpf/programs, with the nightly toolchain)
//! and the Rust code of Istio's CA API (proto/ca.proto).
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    compile_ca_api()?;
    // The shared types are part of the object's contract: rebuild when they change too.
    println!("cargo:rerun-if-changed=../ebpf/common");
    let package = aya_build::Package {
        name: "ambit-ebpf",
        root_dir: "../ebpf/programs",
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .context("building the eBPF programs (is bpf-linker installed? run `cargo xtask setup`)")
}

/// Generates the prost messages and the tonic client and server of
/// `istio.v1.auth.IstioCertificateService` into `$OUT_DIR/istio.v1.auth.rs`. protox parses the
/// .proto in Rust (it ships the well-known types, e.g. `google.protobuf.Struct`), so no `protoc`
/// is needed on build machines or in CI.
fn compile_ca_api() -> anyhow::Result<()> {
    const PROTO: &str = "proto/ca.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors =
        protox::compile([PROTO], ["proto"]).with_context(|| format!("compiling {PROTO}"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .with_context(|| format!("generating the Rust code of {PROTO}"))
}
