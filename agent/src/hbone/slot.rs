//! Stream accounting of one pooled HBONE connection: how many tunnels it carries, whether it
//! takes more, and when it went idle. A [`Slot`] is one tunnel's claim; the client hands it to
//! the [`HboneStream`](super::HboneStream) it opens, which releases it when dropped. Its own
//! module so that the pool, the client and the stream all use it without depending on each
//! other in a circle.
use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use tokio::sync::Notify;

/// Stream accounting of one connection, shared with its driver task and its streams.
pub(super) struct ConnShared {
    state: Mutex<ConnState>,
    /// Signalled when the last stream ends, so the driver starts the idle clock.
    idle: Notify,
    max_streams: usize,
}

struct ConnState {
    active: usize,
    /// No stream will be added: idle-expired, or the connection ended.
    closed: bool,
    idle_since: Option<Instant>,
}

/// A claim on one stream of a pooled connection; released when the tunnel is dropped.
pub(crate) struct Slot {
    shared: Arc<ConnShared>,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data under these locks stays consistent across a panic (plain counters and lists).
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl ConnShared {
    /// A new connection with its first stream already claimed, so it cannot expire before the
    /// tunnel that caused it is opened.
    pub(super) fn new(max_streams: usize) -> (Arc<Self>, Slot) {
        let shared = Arc::new(Self {
            state: Mutex::new(ConnState {
                active: 1,
                closed: false,
                idle_since: None,
            }),
            idle: Notify::new(),
            max_streams,
        });
        let slot = Slot {
            shared: shared.clone(),
        };
        (shared, slot)
    }

    pub(super) fn try_claim(self: &Arc<Self>) -> Option<Slot> {
        let mut state = lock(&self.state);
        if state.closed || state.active >= self.max_streams {
            return None;
        }
        state.active += 1;
        state.idle_since = None;
        Some(Slot {
            shared: self.clone(),
        })
    }

    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
    }

    pub(super) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    pub(super) fn active(&self) -> usize {
        lock(&self.state).active
    }

    /// Completes once the connection has carried no stream for `timeout`, marking it closed
    /// in the same step so no stream can be claimed on it afterwards.
    pub(super) async fn idle_expired(&self, timeout: Duration) {
        loop {
            let (closed, deadline) = {
                let state = lock(&self.state);
                (state.closed, state.idle_since.map(|since| since + timeout))
            };
            if closed {
                // Closed for another reason (GOAWAY seen by `Entry::claim`): the tunnels still
                // on it finish, and then the connection ends by itself.
                return std::future::pending().await;
            }
            match deadline {
                None => self.idle.notified().await,
                Some(deadline) => {
                    tokio::time::sleep_until(deadline.into()).await;
                    let mut state = lock(&self.state);
                    let expired = state.active == 0
                        && state
                            .idle_since
                            .is_some_and(|since| since.elapsed() >= timeout);
                    if expired {
                        state.closed = true;
                        return;
                    }
                }
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = lock(&self.shared.state);
        state.active -= 1;
        if state.active == 0 {
            state.idle_since = Some(Instant::now());
            // `notify_one` keeps a permit if the driver is not waiting yet.
            self.shared.idle.notify_one();
        }
    }
}
