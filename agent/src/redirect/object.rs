//! Loading the eBPF object without aya parsing the kernel's BTF.
//!
//! aya 0.14's `EbpfLoader::new` parses all of `/sys/kernel/btf/vmlinux` (5.5 MB here, about
//! 20 MB of heap for a moment) for CO-RE relocations, whatever `.btf(None)` says afterwards.
//! Our object has no such relocations, so the parse only raised the agent's peak memory: a
//! fresh release agent peaked at 37-38 MiB resident (VmHWM) and rested at 16; without the parse
//! its peak is what it holds (docs/perf/README.md, "The kernel BTF, not parsed at all"). aya
//! 0.16 parses only for an object that needs it, but needs a newer Rust than this project's.
//!
//! Until then the object is loaded on a thread of its own that first moves into a private mount
//! namespace where an empty tmpfs covers `/sys/kernel/btf`: `Btf::from_sys_fs` finds no file
//! and aya loads as on a kernel without BTF. `unshare(CLONE_NEWNS)` unshares only the calling
//! thread's file-system context; the new namespace's mounts are made private before anything
//! is mounted, so nothing propagates to the node's, and the namespace goes when the thread exits.
//! A mount namespace copies mounts, not file systems: the maps pinned during the load land in
//! the same bpffs the rest of the agent (and the next agent) sees.
//!
//! Where the kernel BTF is needed (an object with CO-RE relocations) or the namespace cannot be
//! made (SELinux or a seccomp profile refusing the mount, `ambit check` run without
//! CAP_SYS_ADMIN, a thread that cannot be started), the object loads as before, with the parse;
//! a warning says why, and the `eBPF object loaded` line's `kernel_btf` says which way it went.

use std::path::Path;

use anyhow::Context as _;
use aya::{Ebpf, EbpfLoader};
use nix::{
    mount::{MsFlags, mount},
    sched::{CloneFlags, unshare},
};
use tracing::{info, warn};

/// The directory of the kernel's BTF, which the loader's thread covers.
const KERNEL_BTF_DIR: &str = "/sys/kernel/btf";
/// The kernel's BTF: where aya 0.14 reads it (`Btf::from_sys_fs`), and what the node checks
/// look for.
pub(super) const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Loads `object` with its maps pinned by name in `pin_dir`, without parsing the kernel's BTF
/// where the object does not need it.
pub(super) fn load(object: &'static [u8], pin_dir: &Path) -> anyhow::Result<Ebpf> {
    let needs_kernel_btf = aya_obj::Object::parse(object)
        .context("parsing the eBPF object")?
        .has_btf_relocations();
    if needs_kernel_btf || !Path::new(KERNEL_BTF).exists() {
        let kernel_btf = if needs_kernel_btf {
            "parsed: the object has CO-RE relocations"
        } else {
            "none on this kernel"
        };
        return load_with_kernel_btf_as_seen(object, pin_dir, kernel_btf);
    }
    let owned_pin_dir = pin_dir.to_path_buf();
    let span = tracing::Span::current();
    // Only this thread ever leaves the agent's mount namespace.
    let spawned = std::thread::Builder::new()
        .name("ambit-ebpf-load".into())
        .spawn(move || {
            let _entered = span.entered();
            match hide_kernel_btf_from_this_thread() {
                Ok(()) => load_with_kernel_btf_as_seen(
                    object,
                    &owned_pin_dir,
                    "not parsed: the object needs none",
                ),
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "the kernel BTF could not be hidden from the eBPF loader, which parses it (about 20 MB of memory for a moment)");
                    load_with_kernel_btf_as_seen(
                        object,
                        &owned_pin_dir,
                        "parsed: it could not be hidden from the loader",
                    )
                }
            }
        });
    match spawned {
        Ok(thread) => thread
            .join()
            .map_err(|_| anyhow::anyhow!("the thread loading the eBPF object panicked"))?,
        Err(err) => {
            warn!(error = %err, "no thread to load the eBPF object on; loading here, parsing the kernel BTF");
            load_with_kernel_btf_as_seen(object, pin_dir, "parsed: no thread to hide it on")
        }
    }
}

/// Loads `object` with whatever kernel BTF this thread sees, and logs `kernel_btf`: what
/// became of it.
fn load_with_kernel_btf_as_seen(
    object: &'static [u8],
    pin_dir: &Path,
    kernel_btf: &'static str,
) -> anyhow::Result<Ebpf> {
    let ebpf = EbpfLoader::new()
        .default_map_pin_directory(pin_dir)
        .load(object)?;
    info!(kernel_btf, "eBPF object loaded");
    Ok(ebpf)
}

/// Moves this thread into a private mount namespace with an empty tmpfs over
/// [`KERNEL_BTF_DIR`], and checks that [`KERNEL_BTF`] is gone from its view.
fn hide_kernel_btf_from_this_thread() -> anyhow::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    // Before any mount: a shared `/` (systemd's default) would carry the tmpfs to the node.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .context("making this thread's mounts private")?;
    mount(
        Some("ambit-no-btf"),
        KERNEL_BTF_DIR,
        Some("tmpfs"),
        MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("size=4k"),
    )
    .with_context(|| format!("mounting an empty tmpfs on {KERNEL_BTF_DIR}"))?;
    anyhow::ensure!(
        !Path::new(KERNEL_BTF).exists(),
        "{KERNEL_BTF} is still visible"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    /// The object must stay loadable without the kernel's BTF, or every agent parses it again
    /// (20 MB of heap at start-up): CO-RE relocations would need it.
    #[test]
    fn the_object_has_no_co_re_relocations() {
        let object = aya_obj::Object::parse(super::super::EBPF_OBJECT).unwrap();
        assert!(!object.has_btf_relocations());
    }
}
