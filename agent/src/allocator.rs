//! The allocator's options, and giving its freed pages back to the kernel at once.
//!
//! jemalloc runs with one arena ([`CONF`]; why, in `src/main.rs`), and the agent's start-up
//! line says what it took ([`summary`]): jemalloc reads its options from a symbol and ignores
//! them without a word when that symbol is misnamed.
//!
//! jemalloc (the binary's allocator, `src/main.rs`) returns freed pages to the kernel as they
//! age, over about ten seconds. That suits a burst of connections, which may come again, but
//! not a one-off: where loading the eBPF object has to parse the kernel's BTF (aya's
//! `EbpfLoader` reads all of `/sys/kernel/btf/vmlinux`, about 20 MB of heap for a moment; only
//! when `redirect::object` cannot hide it), without this the agent stays some 25 MiB above its
//! resting size for the first ten to twenty seconds of its life (docs/perf/README.md, "The
//! start-up transient").

/// jemalloc's options (`src/main.rs` hands them to jemalloc): one arena. Here, not in the
/// binary, so the agent can report what jemalloc took ([`arenas`]).
pub const CONF: &[u8; 10] = b"narenas:1\0";
// jemalloc reads it as a C string.
const _: () = assert!(CONF[CONF.len() - 1] == 0);

/// How many arenas jemalloc runs with (`opt.narenas`): 1 unless `_RJEM_MALLOC_CONF` said
/// otherwise; `None` without the `jemalloc` feature or when jemalloc would not say.
pub fn arenas() -> Option<u32> {
    #[cfg(feature = "jemalloc")]
    {
        let mut arenas: std::ffi::c_uint = 0;
        let mut len = size_of::<std::ffi::c_uint>();
        // SAFETY: `opt.narenas` is an `unsigned`; `arenas` and `len` are valid for jemalloc to
        // write one, and no new value is passed.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                c"opt.narenas".as_ptr(),
                (&raw mut arenas).cast(),
                &raw mut len,
                std::ptr::null_mut(),
                0,
            )
        };
        (status == 0).then_some(arenas)
    }
    #[cfg(not(feature = "jemalloc"))]
    None
}

/// The allocator in one phrase for the start-up log: `jemalloc, 1 arena`, or `system`.
pub fn summary() -> String {
    match arenas() {
        Some(1) => "jemalloc, 1 arena".to_string(),
        Some(n) => format!("jemalloc, {n} arenas"),
        None if cfg!(feature = "jemalloc") => "jemalloc, arenas unknown".to_string(),
        None => "system".to_string(),
    }
}

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
