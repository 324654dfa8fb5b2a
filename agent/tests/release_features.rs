//! Test support never ships: no normal build in the workspace enables `ambit`'s `testing`
//! feature (the test CAs, the fake Kubernetes API server, the HBONE test servers of
//! `ambit::testing`).
//!
//! Cargo unifies a package's features across everything one invocation builds, so a single
//! crate depending on `ambit` with `features = ["testing"]` as a *normal* dependency would put
//! the test support into the `ambit` binary of every `cargo build --workspace` and of
//! `cargo xtask build --release` (the binary the image and the chart ship). Only dev-dependencies
//! may enable it: their features apply only when test targets are built.
//!
//! `cargo tree` resolves features as `cargo build` does, without a build (so this runs in every
//! `cargo xtask test`, no release build needed). A release build checked by hand, for the record:
//! `cargo build --release -p ambit && nm -C target/release/ambit | grep -c 'ambit::testing'` (0).
use std::{path::Path, process::Command};

/// The features `cargo tree` resolves for `ambit` when the whole workspace is built following
/// the dependency `edges` (e.g. `normal,build`).
fn ambit_features(edges: &str) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .current_dir(root)
        .args([
            "tree",
            "--offline",
            "--workspace",
            "--exclude",
            "ambit-ebpf",
        ])
        .args(["--edges", edges, "--invert", "ambit", "--depth", "0"])
        .args(["--format", "{p}|{f}"])
        .output()
        .expect("running cargo tree");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "cargo tree failed: {}{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|line| line.starts_with("ambit v"))
        .unwrap_or_else(|| panic!("no `ambit` line in cargo tree's output:\n{stdout}"));
    let (_, features) = line.split_once('|').unwrap();
    features
        .split(',')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn no_normal_build_enables_test_support() {
    let shipped = ambit_features("normal,build");
    assert!(
        !shipped.iter().any(|f| f == "testing"),
        "a normal build of the workspace enables ambit's `testing` feature ({shipped:?}): some \
         crate depends on ambit with features = [\"testing\"] outside [dev-dependencies] \
         (`cargo tree -e normal,build,features -i ambit` shows which)"
    );
    // The binary's own default features are there: the query reads what it claims to.
    assert!(
        shipped.iter().any(|f| f == "jemalloc"),
        "expected the default `jemalloc` feature in {shipped:?}; is the query broken?"
    );
    // And it would see `testing` where something enables it: the end-to-end tests' crate does,
    // as a dev-dependency.
    let for_tests = ambit_features("normal,build,dev");
    assert!(
        for_tests.iter().any(|f| f == "testing"),
        "expected the tests crate's dev-dependency to enable `testing` in {for_tests:?}; is the \
         query broken, or did the end-to-end tests stop using ambit::testing?"
    );
}
