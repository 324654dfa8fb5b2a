//! Generates the tonic client and server of tests/proto/greeter.proto for `testpod`'s gRPC
//! commands. protox parses the .proto in Rust, as the agent's build does: no `protoc` needed.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    const PROTO: &str = "proto/greeter.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let descriptors =
        protox::compile([PROTO], ["proto"]).with_context(|| format!("compiling {PROTO}"))?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
        .with_context(|| format!("generating the Rust code of {PROTO}"))
}
