//! Network namespaces: finding a pod's namespace ([`NetnsRef`], what the state model holds) and
//! entering it to create sockets there.
//!
//! Sockets belong to the namespace they were created in, whichever thread later uses them. So
//! the agent switches the *current thread* into a pod's namespace only for the few system calls
//! that create a socket, and switches straight back; tokio then drives the socket from any thread.
mod reference;
pub mod routing;

pub use self::reference::NetnsRef;

use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd},
    path::Path,
    sync::OnceLock,
};

use nix::sched::{CloneFlags, setns};

/// SO_NETNS_COOKIE (linux/asm-generic/socket.h); not yet in libc for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The agent's own network namespace, opened once so every switch can return to it.
fn home() -> &'static File {
    static HOME: OnceLock<File> = OnceLock::new();
    HOME.get_or_init(|| {
        File::open("/proc/self/ns/net").expect("open the agent's own network namespace")
    })
}

/// An open network namespace and its kernel cookie (the key of the eBPF enrolment map).
#[derive(Debug)]
pub struct Netns {
    file: File,
    cookie: u64,
}

impl Netns {
    /// Opens the namespace file and reads its cookie.
    pub fn from_file(file: File) -> io::Result<Self> {
        home();
        let mut netns = Self { file, cookie: 0 };
        netns.cookie = netns.run(|| {
            let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::DGRAM, None)?;
            socket_netns_cookie(&socket)
        })??;
        Ok(netns)
    }

    /// Opens the namespace at `path` (for example `/proc/<pid>/ns/net` or `/run/netns/<name>`).
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::from_file(File::open(path)?)
    }

    /// The namespace's cookie: stable for its lifetime, never reused while it lives.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the current thread inside this namespace, then returns to the agent's own.
    ///
    /// `f` must only make quick system calls (create, bind, listen on sockets): it blocks the
    /// calling thread. If switching back fails the process aborts, because a thread stranded in
    /// a pod's namespace would silently create later sockets in the wrong place.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let out = f();
        if let Err(err) = setns(home().as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!("fatal: cannot return to the agent's network namespace: {err}");
            std::process::abort();
        }
        Ok(out)
    }

    /// The namespace file, for attaching programs to it.
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The cookie of the network namespace a socket lives in.
pub fn socket_netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    // Neither std, nix nor rustix wraps SO_NETNS_COOKIE: this is the one raw getsockopt.
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes through the pointer, and `cookie` is a live
    // local of exactly that size; `len` is a live local too. A closed or foreign descriptor
    // only makes the call fail (EBADF, ENOTSOCK), which is returned.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
