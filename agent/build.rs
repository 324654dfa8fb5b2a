//! Builds the eBPF programs (ebpf/programs) with the nightly toolchain and embeds the object.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
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
