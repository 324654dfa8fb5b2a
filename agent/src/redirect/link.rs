//! Detaching a pinned eBPF link at once.
//!
//! Removing a link's bpffs pin does not detach its program when `unlink` returns: bpffs frees
//! the inode after an RCU grace period and the link is then released from a workqueue. Under
//! load that takes tens of milliseconds, during which an un-enrolled pod's namespace still runs
//! sk_lookup against listeners that are gone, and its inbound connections are refused.
//! `BPF_LINK_DETACH` (Linux 5.9) takes the program off its hook before the call returns; aya
//! has no call for it, so this module makes the two `bpf(2)` calls with the kernel's own
//! `bpf_attr` layout from `aya-obj`'s generated bindings.
use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Detaches the link pinned at `pin` from its hook, then removes the pin. A missing pin is
/// not an error (nothing is attached through it).
pub fn detach_and_unpin(pin: &Path) -> io::Result<()> {
    match open_pinned(pin) {
        Ok(link) => detach(&link)?,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    }
    match std::fs::remove_file(pin) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// `BPF_OBJ_GET`: a new descriptor for the object pinned at `pin`.
fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pin path holds a NUL byte"))?;
    // SAFETY: an all-zero bpf_attr is valid: the union holds only integers.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &attr)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `BPF_LINK_DETACH`: the link's program leaves its hook; the link object stays (defunct)
/// until its last descriptor and pin go.
fn detach(link: &OwnedFd) -> io::Result<()> {
    // SAFETY: as in `open_pinned`.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    attr.link_detach.link_fd = link.as_raw_fd() as u32;
    bpf(bpf_cmd::BPF_LINK_DETACH, &attr).map(drop)
}

fn bpf(cmd: bpf_cmd, attr: &bpf_attr) -> io::Result<i32> {
    // SAFETY: `attr` is a valid bpf_attr of the size passed, living across the call; the
    // kernel only reads it for these commands (and reads `pathname` as a NUL-terminated
    // string the caller keeps alive).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_ref(attr),
            size_of::<bpf_attr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    i32::try_from(rc).map_err(|_| io::Error::other("bpf(2) returned an out-of-range descriptor"))
}
