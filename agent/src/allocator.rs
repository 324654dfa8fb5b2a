//! Giving the allocator's freed pages back to the kernel at once.
//!
//! jemalloc (the binary's allocator, `src/main.rs`) returns freed pages to the kernel as they
//! age, over about ten seconds. That suits a burst of connections, which may come again, but
//! not a one-off: where loading the eBPF object has to parse the kernel's BTF (aya's
//! `EbpfLoader` reads all of `/sys/kernel/btf/vmlinux`, about 20 MB of heap for a moment; only
//! when `redirect::object` cannot hide it), without this the agent stays some 25 MiB above its
//! resting size for the first ten to twenty seconds of its life (docs/perf/README.md, "The
//! start-up transient").

/// Returns what this thread's cache and every arena hold freed to the kernel now. Without the
/// `jemalloc` feature (the system allocator) it does nothing.
pub fn return_freed_memory() {
    #[cfg(feature = "jemalloc")]
    for command in [c"thread.tcache.flush", c"arena.4096.purge"] {
        // SAFETY: jemalloc's void commands take no old or new value (all null, length 0), and
        // the names are NUL-terminated; 4096 is MALLCTL_ARENAS_ALL. An error (say, jemalloc
        // built without thread caches) leaves memory where it was, nothing worse.
        unsafe {
            tikv_jemalloc_sys::mallctl(
                command.as_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            );
        }
    }
}
