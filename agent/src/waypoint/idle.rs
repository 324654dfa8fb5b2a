//! The stream idle timeout of pooled upstream requests (Envoy's `stream_idle_timeout`, 5 min by
//! default; `ambit waypoint --stream-idle-timeout`).
//!
//! A request holds a pooled upstream connection (HTTP/1.1) or stream (HTTP/2) from the time it
//! is sent until its response has been read to the end. Without a bound, one client holds it as
//! long as it likes by never reading the response or by trickling nothing of its upload, and
//! with `maxConnections` every other client of the cluster is answered 503 `UO`. So each pooled
//! request gets a [`StreamIdle`]: every frame of the request body (client to endpoint) and of the
//! response body (endpoint to client) that carries bytes or trailers counts as activity (empty
//! DATA frames do not), and once nothing moved in either
//! direction for the timeout:
//!
//! - before the response headers, the try fails with [`super::retry::Failure::StreamIdleTimeout`]
//!   (the waypoint answers 408 with flag `SI`, as Envoy);
//! - after them, a watchdog task drops the upstream side of the response (which closes an
//!   HTTP/1.1 connection or resets an HTTP/2 stream, giving its connection and request slots
//!   back) even if nobody polls the body any more, and the response body ends with an error
//!   (the client's stream is reset);
//! - the request body fails too, so that a trickled upload stops.
//!
//! The watchdog ends as soon as both bodies are done. Upgrades and opaque TCP use tunnels of
//! their own, outside the pool, and are not covered.
use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::{sync::Notify, time::Instant};

/// Envoy's default `stream_idle_timeout`.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Whether `frame` is activity: bytes or trailers. Empty DATA frames are not, or a peer could
/// hold its stream (and its pooled connection) forever by sending nothing in them.
fn moves(frame: &Frame<Bytes>) -> bool {
    frame.data_ref().is_none_or(|data| !data.is_empty())
}

/// The error of either body, whatever its type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The error of the waypoint's bodies (`proxy::Body`): a client's or an endpoint's body error,
/// or [`IdleTimeout`]. A type of its own rather than a bare `BoxError`, whose identity
/// conversions trip the compiler's lifetime inference in async code.
#[derive(Debug)]
pub struct BodyError(BoxError);

impl BodyError {
    /// Wraps `error`.
    pub fn new<E: Into<BoxError>>(error: E) -> Self {
        Self(error.into())
    }

    /// Whether it is the stream idle timeout.
    pub fn is_idle_timeout(&self) -> bool {
        self.0.is::<IdleTimeout>()
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// The error a body ends with when the stream was idle too long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream idle timeout ({0:?} without a byte in either direction)")]
pub struct IdleTimeout(pub Duration);

/// The activity of one stream, shared by its two bodies and its watchdog.
pub struct StreamIdle {
    timeout: Duration,
    epoch: Instant,
    /// Nanoseconds after `epoch` of the last frame in either direction.
    last: AtomicU64,
    expired: AtomicBool,
    request_done: AtomicBool,
    response_done: AtomicBool,
    /// Woken when the stream ends or expires.
    changed: Notify,
    /// The bodies' tasks waiting for a frame, woken when the stream expires.
    wakers: Mutex<Vec<Waker>>,
}

impl StreamIdle {
    /// A stream that starts now, idle after `timeout` without activity.
    pub fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(Self {
            timeout,
            epoch: Instant::now(),
            last: AtomicU64::new(0),
            expired: AtomicBool::new(false),
            request_done: AtomicBool::new(false),
            response_done: AtomicBool::new(false),
            changed: Notify::new(),
            wakers: Mutex::new(Vec::new()),
        })
    }

    /// Something moved.
    fn touch(&self) {
        let now = u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(now, Ordering::Relaxed);
    }

    /// When the stream will have been idle for the timeout, unless something moves before.
    fn deadline(&self) -> Instant {
        let last = Duration::from_nanos(self.last.load(Ordering::Relaxed));
        self.epoch
            .checked_add(last.saturating_add(self.timeout))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365))
    }

    /// Whether the timeout fired.
    pub fn expired(&self) -> bool {
        self.expired.load(Ordering::Relaxed)
    }

    /// Whether both bodies are done (nothing left to watch).
    fn done(&self) -> bool {
        self.request_done.load(Ordering::Relaxed) && self.response_done.load(Ordering::Relaxed)
    }

    fn set_done(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Relaxed);
        if self.done() {
            self.changed.notify_waiters();
        }
    }

    fn register(&self, waker: &Waker) {
        let mut wakers = self.wakers.lock().unwrap_or_else(|e| e.into_inner());
        if !wakers.iter().any(|w| w.will_wake(waker)) {
            wakers.push(waker.clone());
        }
    }

    fn expire(&self) {
        self.expired.store(true, Ordering::Relaxed);
        self.changed.notify_waiters();
        let wakers = std::mem::take(&mut *self.wakers.lock().unwrap_or_else(|e| e.into_inner()));
        wakers.into_iter().for_each(Waker::wake);
    }

    /// Resolves when the stream has been idle for the timeout (and marks it expired); never
    /// when both bodies end first.
    pub async fn idle(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.expired() {
                return;
            }
            if self.done() {
                return std::future::pending().await;
            }
            let deadline = self.deadline();
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep_until(deadline) => {
                    if self.deadline() <= Instant::now() {
                        self.expire();
                        return;
                    }
                }
            }
        }
    }
}

/// Drops `slot`'s body once `idle` expires (giving back what it holds upstream), and returns;
/// returns at once when the stream ends first.
pub async fn watchdog<B>(idle: Arc<StreamIdle>, slot: Arc<Mutex<Option<B>>>) {
    tokio::select! {
        () = idle.idle() => {
            let body = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
            drop(body);
        }
        () = async {
            loop {
                let changed = idle.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if idle.done() {
                    return;
                }
                changed.await;
            }
        } => {}
    }
}

/// The request body of a pooled request: counts its frames as activity and fails once the
/// stream expired.
pub struct RequestBody<B> {
    inner: B,
    idle: Arc<StreamIdle>,
}

impl<B> RequestBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Arc<StreamIdle>) -> Self {
        Self { inner, idle }
    }
}

impl<B> Drop for RequestBody<B> {
    fn drop(&mut self) {
        self.idle.set_done(&self.idle.request_done);
    }
}

impl<B> Body for RequestBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.idle.expired() {
            return Poll::Ready(Some(Err(IdleTimeout(self.idle.timeout).into())));
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if moves(frame) {
                    self.idle.touch();
                }
                if self.inner.is_end_stream() {
                    self.idle.set_done(&self.idle.request_done);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                self.idle.set_done(&self.idle.request_done)
            }
            Poll::Pending => self.idle.register(cx.waker()),
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response body of a pooled request: counts its frames as activity; its upstream body is
/// shared with the [`watchdog`], which drops it when the stream expires.
pub struct ResponseBody<B> {
    inner: Arc<Mutex<Option<B>>>,
    idle: Arc<StreamIdle>,
    /// The error was reported: the body has ended.
    ended: bool,
}

impl<B> ResponseBody<B> {
    /// Wraps `inner`, returning the body and the slot to hand to [`watchdog`].
    pub fn new(inner: B, idle: Arc<StreamIdle>) -> (Self, Arc<Mutex<Option<B>>>) {
        let slot = Arc::new(Mutex::new(Some(inner)));
        (
            Self {
                inner: slot.clone(),
                idle,
                ended: false,
            },
            slot,
        )
    }
}

impl<B> Drop for ResponseBody<B> {
    fn drop(&mut self) {
        // The upstream side goes now, not when the watchdog ends.
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(inner);
        self.idle.set_done(&self.idle.response_done);
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let this = &mut *self;
        let mut slot = this.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inner) = slot.as_mut().filter(|_| !this.idle.expired()) else {
            drop(slot.take());
            this.ended = true;
            this.idle.set_done(&this.idle.response_done);
            return Poll::Ready(Some(Err(BodyError::new(IdleTimeout(this.idle.timeout)))));
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if moves(frame) {
                    this.idle.touch();
                }
                if inner.is_end_stream() {
                    this.idle.set_done(&this.idle.response_done);
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                this.idle.set_done(&this.idle.response_done)
            }
            Poll::Pending => this.idle.register(cx.waker()),
        }
        polled.map(|frame| frame.map(|r| r.map_err(BodyError::new)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
            || self
                .inner
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(Body::size_hint)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};
    use tokio::sync::mpsc;

    use super::*;

    /// A body fed by hand: frames sent on the channel, ended when it is dropped.
    fn channel_body() -> (
        mpsc::Sender<Result<Frame<Bytes>, BoxError>>,
        impl Body<Data = Bytes, Error = BoxError> + Unpin,
    ) {
        let (tx, rx) = mpsc::channel(4);
        let frames =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        (tx, StreamBody::new(Box::pin(frames)))
    }

    fn data(s: &'static str) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(s.as_bytes())))
    }

    /// Nobody reads the response: the watchdog still drops its upstream side after the
    /// timeout, and the next read fails.
    #[tokio::test(start_paused = true)]
    async fn an_unread_response_is_dropped_upstream_after_the_timeout() {
        let idle = StreamIdle::new(Duration::from_secs(10));
        let (req_tx, req) = channel_body();
        drop(req_tx);
        let mut request = RequestBody::new(req, idle.clone());
        assert!(request.frame().await.is_none(), "the upload is done");
        let (tx, inner) = channel_body();
        let (mut response, slot) = ResponseBody::new(inner, idle.clone());
        let dog = tokio::spawn(watchdog(idle.clone(), slot.clone()));
        tx.send(data("a")).await.unwrap();
        assert!(response.frame().await.unwrap().is_ok());
        tokio::time::sleep(Duration::from_secs(9)).await;
        assert!(
            slot.lock().unwrap().is_some(),
            "not idle for the timeout yet"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        dog.await.unwrap();
        assert!(
            slot.lock().unwrap().is_none(),
            "the upstream side is dropped"
        );
        assert!(tx.is_closed(), "and with it the upstream body");
        let err = response.frame().await.unwrap().unwrap_err();
        assert!(err.is_idle_timeout(), "{err}");
        assert!(response.frame().await.is_none());
    }

    /// Activity in either direction keeps the stream alive; a stalled upload fails it.
    #[tokio::test(start_paused = true)]
    async fn activity_either_way_resets_the_clock_and_a_stalled_upload_fails() {
        let idle = StreamIdle::new(Duration::from_secs(10));
        let (req_tx, req) = channel_body();
        let mut request = RequestBody::new(req, idle.clone());
        let (resp_tx, inner) = channel_body();
        let (mut response, slot) = ResponseBody::new(inner, idle.clone());
        let dog = tokio::spawn(watchdog(idle.clone(), slot.clone()));
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            req_tx.send(data("up")).await.unwrap();
            assert!(request.frame().await.unwrap().is_ok());
            tokio::time::sleep(Duration::from_secs(6)).await;
            resp_tx.send(data("down")).await.unwrap();
            assert!(response.frame().await.unwrap().is_ok());
        }
        assert!(!idle.expired(), "36 s of traffic, never 10 s without");
        // Empty frames are no activity: a peer sending only them cannot hold the stream.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(4)).await;
            // Once idle, the watchdog has dropped the upstream side (and with it the channel).
            if resp_tx.send(data("")).await.is_err() || response.frame().await.unwrap().is_err() {
                break;
            }
        }
        assert!(idle.expired(), "12 s of empty frames are 12 s idle");
        // The upload stalls (the client sends nothing more): the waiting read fails.
        let err = request.frame().await.unwrap().unwrap_err();
        assert!(err.is::<IdleTimeout>(), "{err}");
        dog.await.unwrap();
        assert!(slot.lock().unwrap().is_none());
    }

    /// Both bodies done: the watchdog ends at once and never drops anything.
    #[tokio::test(start_paused = true)]
    async fn the_watchdog_ends_with_the_stream() {
        let idle = StreamIdle::new(Duration::from_secs(10));
        let (req_tx, req) = channel_body();
        drop(req_tx);
        let mut request = RequestBody::new(req, idle.clone());
        let (resp_tx, inner) = channel_body();
        let (mut response, slot) = ResponseBody::new(inner, idle.clone());
        let dog = tokio::spawn(watchdog(idle.clone(), slot.clone()));
        assert!(request.frame().await.is_none());
        resp_tx.send(data("all")).await.unwrap();
        drop(resp_tx);
        assert!(response.frame().await.unwrap().is_ok());
        assert!(response.frame().await.is_none());
        tokio::time::timeout(Duration::from_secs(1), dog)
            .await
            .expect("the watchdog ends with the stream")
            .unwrap();
        assert!(!idle.expired());
    }

    /// A client that drops its response gives the upstream side back at once, even while its
    /// upload is still open.
    #[tokio::test(start_paused = true)]
    async fn a_dropped_response_lets_go_of_the_upstream_at_once() {
        let idle = StreamIdle::new(Duration::from_secs(10));
        let (_req_tx, req) = channel_body();
        let _request = RequestBody::new(req, idle.clone());
        let (resp_tx, inner) = channel_body();
        let (response, slot) = ResponseBody::new(inner, idle.clone());
        let _dog = tokio::spawn(watchdog(idle.clone(), slot.clone()));
        drop(response);
        assert!(slot.lock().unwrap().is_none());
        assert!(resp_tx.is_closed());
    }

    /// Waiting for the response headers counts as idle too.
    #[tokio::test(start_paused = true)]
    async fn idle_resolves_when_nothing_moves() {
        let idle = StreamIdle::new(Duration::from_secs(5));
        let started = Instant::now();
        idle.idle().await;
        assert!(idle.expired());
        assert!(started.elapsed() >= Duration::from_secs(5));
    }
}
