//! The one accept loop of every listener (the pods' 15001, 15006 and 15008, the agent's 15000,
//! 15020 and 15021, the CA's 15012, the CNI plugin's Unix socket), generic over [`Listener`].
//!
//! `accept(2)` fails for two kinds of reasons. Some belong to the connection being accepted (it
//! was reset or aborted while it waited): the next one is fine, so the loop goes on at once.
//! The others belong to the process or the system: out of descriptors (EMFILE, ENFILE), of
//! buffers or memory (ENOBUFS, ENOMEM). Then the pending connection stays in the backlog and the
//! listener stays readable, so retrying at once spins a core at 100% doing nothing else, just
//! when the agent is short of something. The loop backs off instead: 5 ms, doubling to 1 s,
//! back to 5 ms after the next success. Errors are logged at most every 10 s, with how many
//! there were since.
//!
//! A listener whose connections each hold something scarce until they are served can be
//! [`Gated`]: it accepts only while a place is free, so the others wait in the kernel's backlog
//! instead of holding a descriptor and a task each.
use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream, UnixListener, UnixStream, unix},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tracing::{debug, warn};

use super::Throttle;
use crate::backoff::Backoff;

/// The first and the longest pause after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often a listener logs that accepting fails.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Whether an accept error belongs to the connection being accepted rather than to the process:
/// the errors accept(2) passes on from a connection that failed while it waited in the backlog.
fn is_connection_error(err: &io::Error) -> bool {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    ) {
        return true;
    }
    matches!(
        err.raw_os_error(),
        Some(
            libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
                | libc::ENETDOWN
                | libc::EPERM
                | libc::ETIMEDOUT
        )
    )
}

/// A listening socket [`accept_loop`] drives: TCP or Unix, or one of those [`Gated`].
pub trait Listener {
    /// An accepted connection.
    type Stream;
    /// The peer's address.
    type Addr;
    /// Waits for the next connection.
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Addr)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Addr = SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Addr = unix::SocketAddr;

    fn accept(&self) -> impl Future<Output = io::Result<(UnixStream, unix::SocketAddr)>> + Send {
        UnixListener::accept(self)
    }
}

/// A listener that accepts only while fewer than its number of places are taken: each accepted
/// connection comes with the permit of its place, which frees it when dropped. Further
/// connections wait in the backlog until a place is free.
pub struct Gated<L> {
    listener: L,
    places: Arc<Semaphore>,
}

impl<L> Gated<L> {
    /// `listener`, accepting while fewer than `places` connections hold their permit.
    pub fn new(listener: L, places: usize) -> Self {
        Self {
            listener,
            places: Arc::new(Semaphore::new(places)),
        }
    }
}

impl<L: Listener + Sync> Listener for Gated<L> {
    type Stream = (L::Stream, OwnedSemaphorePermit);
    type Addr = L::Addr;

    async fn accept(&self) -> io::Result<(Self::Stream, L::Addr)> {
        // The semaphore is never closed, so this only waits.
        let permit = self
            .places
            .clone()
            .acquire_owned()
            .await
            .map_err(io::Error::other)?;
        let (stream, peer) = self.listener.accept().await?;
        Ok(((stream, permit), peer))
    }
}

/// Accepts connections on `listener` until the future is dropped, handing each to `on_accept`
/// (which should spawn whatever serves it, or drop the stream to refuse it). `on_error` sees
/// every failed accept (to count it); `what` names the listener in the log.
pub async fn accept_loop<L: Listener>(
    listener: &L,
    what: &str,
    mut on_error: impl FnMut(&io::Error),
    mut on_accept: impl FnMut(L::Stream, L::Addr),
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut throttle = Throttle::new(LOG_EVERY);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff.reset();
                on_accept(stream, peer);
            }
            Err(err) if is_connection_error(&err) => {
                on_error(&err);
                debug!(listener = what, %err, "a connection failed before it was accepted");
            }
            Err(err) => {
                on_error(&err);
                let pause = backoff.next_delay();
                if let Some(suppressed) = throttle.tick() {
                    warn!(
                        listener = what,
                        %err,
                        failures_since_last_warning = suppressed,
                        pause_ms = pause.as_millis() as u64,
                        "accept failed; backing off"
                    );
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    };
    use std::time::Instant;

    use super::*;
    use crate::limits::nofile::open_descriptors;

    #[test]
    fn backoff_doubles_to_a_ceiling_and_resets() {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let pauses: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert_eq!(pauses[0], BACKOFF_MIN);
        assert_eq!(pauses[1], BACKOFF_MIN * 2);
        assert_eq!(*pauses.last().unwrap(), BACKOFF_MAX);
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        backoff.reset();
        assert_eq!(backoff.next_delay(), BACKOFF_MIN);
    }

    #[test]
    fn process_errors_back_off_connection_errors_do_not() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_connection_error(&io::Error::from_raw_os_error(errno)));
        }
        for errno in [
            libc::ECONNABORTED,
            libc::EPROTO,
            libc::ENETUNREACH,
            libc::EINTR,
        ] {
            assert!(is_connection_error(&io::Error::from_raw_os_error(errno)));
        }
    }

    /// A gated Unix listener accepts no more than its places: the next connection stays in
    /// the backlog until a permit is dropped, and is then accepted.
    #[tokio::test]
    async fn gated_listener_accepts_only_while_a_place_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gated.sock");
        let gated = Gated::new(UnixListener::bind(&path).unwrap(), 1);
        let _first = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let _second = std::os::unix::net::UnixStream::connect(&path).unwrap();

        let ((_stream, permit), _) = gated.accept().await.unwrap();
        {
            // Both are connected; the second waits for the place, not for the kernel.
            let next = gated.accept();
            tokio::pin!(next);
            tokio::select! {
                biased;
                _ = &mut next => panic!("accepted beyond the gate's one place"),
                _ = std::future::ready(()) => {}
            }
        }
        drop(permit);
        let accepted = tokio::time::timeout(Duration::from_secs(30), gated.accept()).await;
        assert!(
            matches!(accepted, Ok(Ok(_))),
            "not accepted once the place was free"
        );
    }

    fn set_soft_nofile(soft: u64) {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, soft, hard).unwrap();
    }

    /// Out of descriptors for real (the soft limit lowered to what is open, then the rest
    /// filled): the loop retries a handful of times a second instead of spinning, and serves
    /// the waiting connections once descriptors are free again. nextest runs each test in a
    /// process of its own, so the lowered limit touches nothing else.
    #[tokio::test]
    async fn out_of_descriptors_backs_off_and_recovers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Connected by the kernel, waiting in the backlog.
        let clients: Vec<_> = (0..3)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let original = crate::limits::nofile::nofile_limit().unwrap().soft;
        set_soft_nofile(open_descriptors().unwrap() + 16);
        let mut fillers = Vec::new();
        let exhausted = loop {
            match std::fs::File::open("/dev/null") {
                Ok(file) => fillers.push(file),
                Err(err) => break err,
            }
        };
        assert_eq!(exhausted.raw_os_error(), Some(libc::EMFILE), "{exhausted}");

        let errors = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let (e, a) = (errors.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            accept_loop(
                &listener,
                "test",
                |_| {
                    e.fetch_add(1, Ordering::Relaxed);
                },
                |stream, _| {
                    a.fetch_add(1, Ordering::Relaxed);
                    drop(stream);
                },
            )
            .await
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while errors.load(Ordering::Relaxed) == 0 {
            assert!(Instant::now() < deadline, "accept never failed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let start = errors.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let in_a_second = errors.load(Ordering::Relaxed) - start;
        // 5 + 10 + 20 + ... ms: at most 8 retries fit in a second (a spinning loop makes
        // hundreds of thousands); a busy machine only makes it fewer.
        assert!(
            in_a_second <= 8,
            "{in_a_second} failed accepts in one second"
        );
        assert_eq!(accepted.load(Ordering::Relaxed), 0);

        drop(fillers);
        while accepted.load(Ordering::Relaxed) < 3 {
            assert!(
                Instant::now() < deadline,
                "waiting connections not served after descriptors came back"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        set_soft_nofile(original);
        drop(clients);
    }
}
