//! Writes Ambit's CRD YAML from the Rust types (`ambit::discovery::kube::crd`) into
//! `deploy/crds/` and `deploy/helm/ambit/files/crds/`. Run through `cargo xtask crds`.
//!
//! Usage: `crds [WORKSPACE_ROOT]` (default: the parent of the agent crate).
use std::path::{Path, PathBuf};

use ambit::discovery::kube::crd;
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::env::args_os().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(".."),
        PathBuf::from,
    );
    let root = root
        .canonicalize()
        .with_context(|| format!("the workspace root {}", root.display()))?;
    let changed =
        crd::write(&root).with_context(|| format!("writing the CRDs under {}", root.display()))?;
    for file in crd::files() {
        println!("generated {}", file.name);
    }
    if changed.is_empty() {
        println!("every CRD file was up to date");
    }
    for path in changed {
        println!("updated {}", path.display());
    }
    Ok(())
}
