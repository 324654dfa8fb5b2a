//! Build script of the eBPF crate: fails early, naming the fix, when bpf-linker is missing.

use std::process::ExitCode;

/// Rebuild when bpf-linker changes: it is part of the toolchain that produces the object.
fn main() -> ExitCode {
    match which::which("bpf-linker") {
        Ok(path) => {
            println!("cargo:rerun-if-changed={}", path.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("bpf-linker not found on PATH ({err}); run `cargo xtask setup`");
            ExitCode::FAILURE
        }
    }
}
