//! Retries: which failed tries are retried (the route's `retryOn`), how long to wait between
//! them (Envoy's backoff), how many may run at once (a retry budget), and the request body
//! that lets a request be sent again.
//!
//! - **What is retried** ([`Failure::retry_reason`]): Envoy's conditions as Istio passes them
//!   (`5xx`, `gateway-error`, `reset`, `connect-failure`, `refused-stream`,
//!   `retriable-status-codes`, the gRPC statuses...).
//! - **Backoff**: Envoy's: full jitter over `base × 2ⁿ`, capped at 10 × base (25 ms base by
//!   default), with the crate's one [`Backoff`].
//! - **Budget** ([`RetryBudget`]): Envoy's `retry_budget` with its defaults: the retries in
//!   flight to a destination service may be at most 20% of its active requests, and at least
//!   3. A retry over budget is not made (flag `UO`): a failing service sees at most 1.2 times
//!   its load, not `attempts + 1` times.
//! - **Idempotency** ([`ReplayBody`]): a request is retried only if its body can be sent again:
//!   the body is teed while it streams to the first try, up to [`REPLAY_LIMIT`] bytes; a longer
//!   body is not kept, and such a request is never retried once its body started to stream.
use std::{
    collections::HashMap,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// The error of a client body, whatever its type.
type BoxError = Box<dyn std::error::Error + Send + Sync>;
use prometheus::{IntCounterVec, Opts};

use crate::{
    backoff::Backoff,
    state::routes::resilience::{RetryOn, RetryPolicy},
    telemetry::metrics::Metrics,
};

/// The longest request body kept to be replayed by a retry or a mirror (bytes). Envoy keeps up
/// to its buffer limit (1 MiB by default); a waypoint serving many streams keeps less.
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Envoy's retry budget: retries in flight at most this share of active requests...
pub const BUDGET_PERCENT: usize = 20;
/// ...and at least this many.
pub const BUDGET_MIN_CONCURRENCY: usize = 3;

/// Why a try failed.
#[derive(Debug)]
pub enum Failure {
    /// The endpoint could not be reached (tunnel or HTTP handshake).
    Connect(String),
    /// The endpoint refused the HTTP/2 stream.
    RefusedStream(String),
    /// The connection or stream failed before the response headers.
    Reset(String),
    /// The try's timeout expired before the response headers.
    PerTryTimeout,
    /// An answer (its status and headers).
    Response(StatusCode, HeaderMap),
    /// Not sent: a connection pool limit of the cluster was reached (never retried, as
    /// Envoy's overflow).
    Overflow(String),
    /// Nothing moved in either direction for the stream idle timeout before the response
    /// headers (`super::idle`; never retried, as Envoy's).
    StreamIdleTimeout,
}

impl Failure {
    /// The name of the condition of `policy` under which this failure is retried, if any
    /// (Envoy's semantics: `5xx` and `gateway-error` include no answer at all).
    pub fn retry_reason(&self, policy: &RetryPolicy) -> Option<&'static str> {
        let on = |c: RetryOn| policy.on(c).then(|| c.name());
        let no_answer = || {
            on(RetryOn::FiveXx)
                .or_else(|| on(RetryOn::GatewayError))
                .or_else(|| on(RetryOn::Reset))
        };
        match self {
            Failure::Connect(_) => on(RetryOn::ConnectFailure)
                .or_else(|| on(RetryOn::ResetBeforeRequest))
                .or_else(no_answer),
            Failure::RefusedStream(_) => on(RetryOn::RefusedStream)
                .or_else(|| on(RetryOn::ResetBeforeRequest))
                .or_else(no_answer),
            Failure::Reset(_) | Failure::PerTryTimeout => no_answer(),
            Failure::Response(status, headers) => response_reason(policy, *status, headers),
            Failure::Overflow(_) | Failure::StreamIdleTimeout => None,
        }
    }

    /// Reads a failed `send_request`: a refused HTTP/2 stream, or a reset.
    pub fn from_send(err: &hyper::Error) -> Self {
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            if cause.is::<super::idle::IdleTimeout>() {
                return Failure::StreamIdleTimeout;
            }
            source = cause.source();
        }
        let refused = std::error::Error::source(err)
            .and_then(|e| e.downcast_ref::<h2::Error>())
            .and_then(h2::Error::reason)
            == Some(h2::Reason::REFUSED_STREAM);
        if refused {
            Failure::RefusedStream(err.to_string())
        } else {
            Failure::Reset(err.to_string())
        }
    }
}

/// The condition of `policy` under which an answer with `status` and `headers` is retried.
pub fn response_reason(
    policy: &RetryPolicy,
    status: StatusCode,
    headers: &HeaderMap,
) -> Option<&'static str> {
    let on = |c: RetryOn| policy.on(c).then(|| c.name());
    let code = status.as_u16();
    let by_status = [
        (code >= 500, RetryOn::FiveXx),
        (matches!(code, 502..=504), RetryOn::GatewayError),
        (code == 409, RetryOn::Retriable4xx),
        (
            policy.retriable_status_codes.contains(&code),
            RetryOn::RetriableStatusCodes,
        ),
        (
            headers.contains_key("x-envoy-ratelimited"),
            RetryOn::EnvoyRateLimited,
        ),
    ];
    if let Some(reason) = by_status
        .into_iter()
        .find_map(|(holds, condition)| holds.then(|| on(condition)).flatten())
    {
        return Some(reason);
    }
    let grpc = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())?;
    let condition = match grpc {
        1 => RetryOn::Cancelled,
        4 => RetryOn::DeadlineExceeded,
        8 => RetryOn::ResourceExhausted,
        13 => RetryOn::Internal,
        14 => RetryOn::Unavailable,
        _ => return None,
    };
    on(condition)
}

/// Envoy's retry backoff for `policy`: full jitter, base `backoff`, cap 10 × base.
pub fn backoff(policy: &RetryPolicy) -> Backoff {
    Backoff::new(policy.backoff, policy.backoff.saturating_mul(10)).with_jitter(0.0..=1.0)
}

/// Retry budgets, one per destination service (`namespace/name`): the map holds one entry per
/// service the routes sent to, so it is bounded by the configuration.
#[derive(Debug, Default)]
pub struct RetryBudget {
    services: Mutex<HashMap<String, Arc<Counters>>>,
}

#[derive(Debug, Default)]
struct Counters {
    active: AtomicUsize,
    retries: AtomicUsize,
}

impl RetryBudget {
    /// Counts a request to `service` as active until the guard is dropped.
    pub fn request(&self, service: &str) -> ActiveRequest {
        let counters = self
            .services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(service.to_string())
            .or_default()
            .clone();
        counters.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest { counters }
    }
}

/// A request counted as active by its service's budget.
#[derive(Debug)]
pub struct ActiveRequest {
    counters: Arc<Counters>,
}

impl ActiveRequest {
    /// Takes a retry from the budget, held until the guard is dropped; `None`: over budget, or
    /// `max_retries` (the DestinationRule's `connectionPool.http.maxRetries`) in flight.
    pub fn retry(&self, max_retries: u32) -> Option<RetryInFlight> {
        let active = self.counters.active.load(Ordering::Relaxed);
        let allowed = (active * BUDGET_PERCENT / 100)
            .max(BUDGET_MIN_CONCURRENCY)
            .min(usize::try_from(max_retries).unwrap_or(usize::MAX));
        self.counters
            .retries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < allowed).then_some(n + 1)
            })
            .ok()?;
        Some(RetryInFlight {
            counters: self.counters.clone(),
        })
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.counters.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry counted by its service's budget.
#[derive(Debug)]
pub struct RetryInFlight {
    counters: Arc<Counters>,
}

impl Drop for RetryInFlight {
    fn drop(&mut self) {
        self.counters.retries.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The retry metrics.
pub struct RetryMetrics {
    retries: IntCounterVec,
    overflow: IntCounterVec,
}

impl RetryMetrics {
    /// Creates the families and registers them in `metrics`.
    pub fn new(metrics: &Metrics) -> prometheus::Result<Self> {
        let retries = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_upstream_retries_total",
                "Retries the waypoint made, by destination service and the retryOn condition \
                 that caused them",
            ),
            &["destination_service", "reason"],
        )?;
        let overflow = IntCounterVec::new(
            Opts::new(
                "ambit_waypoint_upstream_retry_overflow_total",
                "Retries not made because the destination service's retry budget was spent",
            ),
            &["destination_service"],
        )?;
        metrics.register(Box::new(retries.clone()))?;
        metrics.register(Box::new(overflow.clone()))?;
        Ok(Self { retries, overflow })
    }

    /// Counts a retry to `service` (its hostname) for `reason`.
    pub fn retried(&self, service: &str, reason: &str) {
        self.retries.with_label_values(&[service, reason]).inc();
    }

    /// Counts a retry refused by the budget.
    pub fn overflowed(&self, service: &str) {
        self.overflow.with_label_values(&[service]).inc();
    }
}

/// A request body that can be sent more than once: each [`ReplayBody::attempt`] yields the
/// frames the previous tries already read (kept while they total at most [`REPLAY_LIMIT`]
/// bytes), then reads on from the client. Only the latest attempt reads: an older one (a try
/// abandoned while its connection still polls its body) gets an error.
pub struct ReplayBody<B = Incoming> {
    shared: Arc<Mutex<Shared<B>>>,
}

struct Shared<B> {
    incoming: B,
    /// Frames read so far, while they fit the limit.
    kept: Vec<Frame<Bytes>>,
    kept_bytes: usize,
    /// More than the limit was read: what was read is gone.
    overflowed: bool,
    /// The client's body ended.
    done: bool,
    /// The client's body failed (the client aborted its upload, or sent more or less than it
    /// declared).
    failed: bool,
    /// The attempt allowed to read.
    current: u64,
    /// Attempts made.
    attempts: u64,
}

impl<B> ReplayBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    /// Wraps the client's body.
    pub fn new(incoming: B) -> Self {
        let done = incoming.is_end_stream();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                incoming,
                kept: Vec::new(),
                kept_bytes: 0,
                overflowed: false,
                done,
                failed: false,
                current: 0,
                attempts: 0,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<B>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the client's body was received to its end.
    pub fn client_done(&self) -> bool {
        self.lock().done
    }

    /// Whether the client's body failed.
    pub fn client_failed(&self) -> bool {
        self.lock().failed
    }

    /// Whether a new attempt can send the whole body: nothing read so far was dropped.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// The body of a new attempt (the previous ones' stop reading).
    pub fn attempt(&self) -> AttemptBody<B> {
        let mut shared = self.lock();
        shared.attempts += 1;
        shared.current = shared.attempts;
        AttemptBody {
            shared: self.shared.clone(),
            id: shared.current,
            next: 0,
        }
    }

    /// The whole body, when it was read to its end and kept (for a mirror).
    pub fn complete(&self) -> Option<Vec<Frame<Bytes>>> {
        let shared = self.lock();
        (shared.done && !shared.overflowed).then(|| {
            shared
                .kept
                .iter()
                .map(|f| match f.data_ref() {
                    Some(data) => Frame::data(data.clone()),
                    None => Frame::trailers(f.trailers_ref().cloned().unwrap_or_default()),
                })
                .collect()
        })
    }
}

/// One attempt's view of a [`ReplayBody`].
pub struct AttemptBody<B = Incoming> {
    shared: Arc<Mutex<Shared<B>>>,
    id: u64,
    /// The next kept frame to yield.
    next: usize,
}

/// Why an attempt's body stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The client's body failed.
    #[error("request body: {0}")]
    Client(BoxError),
    /// A newer attempt took over the body.
    #[error("request body taken over by a newer attempt")]
    Superseded,
    /// The kept frames were dropped (the body outgrew the limit) before this attempt read them.
    #[error("request body no longer available to replay")]
    Lost,
}

fn copy(frame: &Frame<Bytes>) -> Frame<Bytes> {
    match frame.data_ref() {
        Some(data) => Frame::data(data.clone()),
        None => Frame::trailers(frame.trailers_ref().cloned().unwrap_or_default()),
    }
}

impl<B> Body for AttemptBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let this = self.get_mut();
        let mut shared = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.current != this.id {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if this.next < shared.kept.len() {
            let frame = copy(&shared.kept[this.next]);
            this.next += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if shared.overflowed && this.next != usize::MAX {
            // Only the attempt that was reading when the limit was passed reads on.
            return Poll::Ready(Some(Err(ReplayError::Lost)));
        }
        if shared.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut shared.incoming).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                shared.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(err))) => {
                shared.failed = true;
                Poll::Ready(Some(Err(ReplayError::Client(err.into()))))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let size = frame.data_ref().map_or(0, Bytes::len);
                if !shared.overflowed {
                    if shared.kept_bytes + size <= REPLAY_LIMIT {
                        shared.kept.push(copy(&frame));
                        shared.kept_bytes += size;
                        this.next = shared.kept.len();
                    } else {
                        shared.overflowed = true;
                        shared.kept = Vec::new();
                        // This attempt reads on from the client, past the dropped frames.
                        this.next = usize::MAX;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        shared.done && self.next >= shared.kept.len()
    }

    fn size_hint(&self) -> SizeHint {
        let shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if self.next == 0 && !shared.overflowed {
            // Nothing yielded yet: the client's hint, plus what earlier attempts read.
            let kept = shared.kept_bytes as u64;
            if shared.done {
                return SizeHint::with_exact(kept);
            }
            let client = shared.incoming.size_hint();
            let mut hint = SizeHint::new();
            hint.set_lower(client.lower() + kept);
            if let Some(upper) = client.upper() {
                hint.set_upper(upper + kept);
            }
            return hint;
        }
        SizeHint::default()
    }
}

/// The delay before retry number `n` (from 0) under `policy`, for tests and logs.
pub fn nominal_delay(policy: &RetryPolicy, n: u32) -> Duration {
    policy
        .backoff
        .saturating_mul(1 << n.min(20))
        .min(policy.backoff.saturating_mul(10))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn policy(retry_on: &[RetryOn], codes: &[u16]) -> RetryPolicy {
        RetryPolicy {
            attempts: 2,
            retry_on: retry_on.to_vec(),
            retriable_status_codes: codes.to_vec(),
            ..RetryPolicy::default()
        }
    }

    fn answer(code: u16) -> Failure {
        Failure::Response(StatusCode::from_u16(code).unwrap(), HeaderMap::new())
    }

    fn grpc(status: &'static str) -> Failure {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-status", HeaderValue::from_static(status));
        Failure::Response(StatusCode::OK, headers)
    }

    #[test]
    fn istio_default_retries_connect_failures_and_grpc_unavailable_not_503() {
        let default = RetryPolicy::default();
        assert_eq!(default.attempts, 2);
        assert_eq!(
            Failure::Connect("x".into()).retry_reason(&default),
            Some("connect-failure")
        );
        assert_eq!(
            Failure::RefusedStream("x".into()).retry_reason(&default),
            Some("refused-stream")
        );
        assert_eq!(grpc("14").retry_reason(&default), Some("unavailable"));
        assert_eq!(grpc("1").retry_reason(&default), Some("cancelled"));
        assert_eq!(grpc("13").retry_reason(&default), None);
        // No retriable status code by default: a 503 answer is passed on.
        assert_eq!(answer(503).retry_reason(&default), None);
        assert_eq!(Failure::Reset("x".into()).retry_reason(&default), None);
        assert_eq!(Failure::PerTryTimeout.retry_reason(&default), None);
    }

    #[test]
    fn envoy_conditions_cover_what_they_say() {
        let five = policy(&[RetryOn::FiveXx], &[]);
        for code in [500, 503, 504, 599] {
            assert_eq!(answer(code).retry_reason(&five), Some("5xx"), "{code}");
        }
        assert_eq!(answer(404).retry_reason(&five), None);
        assert_eq!(answer(200).retry_reason(&five), None);
        // No answer at all counts as a 5xx.
        assert_eq!(Failure::Reset("x".into()).retry_reason(&five), Some("5xx"));
        assert_eq!(Failure::PerTryTimeout.retry_reason(&five), Some("5xx"));
        assert_eq!(
            Failure::Connect("x".into()).retry_reason(&five),
            Some("5xx")
        );

        let gateway = policy(&[RetryOn::GatewayError], &[]);
        assert_eq!(answer(500).retry_reason(&gateway), None);
        for code in [502, 503, 504] {
            assert_eq!(answer(code).retry_reason(&gateway), Some("gateway-error"));
        }
        let reset = policy(&[RetryOn::Reset], &[]);
        assert_eq!(answer(503).retry_reason(&reset), None);
        assert_eq!(
            Failure::Reset("x".into()).retry_reason(&reset),
            Some("reset")
        );

        let codes = policy(&[RetryOn::RetriableStatusCodes], &[503, 418]);
        assert_eq!(
            answer(418).retry_reason(&codes),
            Some("retriable-status-codes")
        );
        assert_eq!(answer(500).retry_reason(&codes), None);
        let conflict = policy(&[RetryOn::Retriable4xx], &[]);
        assert_eq!(answer(409).retry_reason(&conflict), Some("retriable-4xx"));
        assert_eq!(answer(404).retry_reason(&conflict), None);

        let grpc_all = policy(
            &[
                RetryOn::Cancelled,
                RetryOn::DeadlineExceeded,
                RetryOn::Internal,
                RetryOn::ResourceExhausted,
                RetryOn::Unavailable,
            ],
            &[],
        );
        for (status, name) in [
            ("1", "cancelled"),
            ("4", "deadline-exceeded"),
            ("8", "resource-exhausted"),
            ("13", "internal"),
            ("14", "unavailable"),
        ] {
            assert_eq!(grpc(status).retry_reason(&grpc_all), Some(name));
        }
        assert_eq!(grpc("0").retry_reason(&grpc_all), None);
        assert_eq!(grpc("5").retry_reason(&grpc_all), None);
    }

    #[test]
    fn the_budget_allows_three_retries_or_a_fifth_of_active_requests() {
        let budget = RetryBudget::default();
        let requests: Vec<ActiveRequest> = (0..5).map(|_| budget.request("shop/a")).collect();
        let held: Vec<RetryInFlight> = (0..3).map_while(|_| requests[0].retry(u32::MAX)).collect();
        assert_eq!(held.len(), 3);
        assert!(
            requests[1].retry(u32::MAX).is_none(),
            "a 4th retry with 5 requests"
        );
        // Another service has its own budget.
        let other = budget.request("shop/b");
        assert!(other.retry(u32::MAX).is_some());
        // 50 active requests allow 10 retries.
        let more: Vec<ActiveRequest> = (0..45).map(|_| budget.request("shop/a")).collect();
        let extra: Vec<RetryInFlight> = (0..20).map_while(|_| more[0].retry(u32::MAX)).collect();
        assert_eq!(held.len() + extra.len(), 10);
        // A finished retry gives its place back.
        drop(extra);
        assert!(requests[0].retry(u32::MAX).is_some());
    }

    type Chunks = http_body_util::StreamBody<
        futures::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, std::convert::Infallible>>>,
    >;

    /// A client body whose exact size is known, as a content-length gives it (hyper's
    /// `Incoming` is one).
    struct Sized {
        chunks: Chunks,
        remaining: u64,
    }

    impl Body for Sized {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            let polled = Pin::new(&mut self.chunks).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                let len = frame.data_ref().map_or(0, Bytes::len) as u64;
                self.remaining -= len;
            }
            polled
        }

        fn size_hint(&self) -> SizeHint {
            SizeHint::with_exact(self.remaining)
        }
    }

    /// A client body of `chunks` data frames.
    fn client(chunks: &[&'static [u8]]) -> ReplayBody<Sized> {
        let frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        let size: usize = chunks.iter().map(|c| c.len()).sum();
        ReplayBody::new(Sized {
            chunks: http_body_util::StreamBody::new(futures::stream::iter(frames)),
            remaining: size as u64,
        })
    }

    async fn read<B>(body: AttemptBody<B>, frames: usize) -> Result<Vec<u8>, ReplayError>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt as _;
        let mut body = body;
        let mut out = Vec::new();
        for _ in 0..frames {
            match body.frame().await {
                Some(frame) => out.extend_from_slice(frame?.data_ref().unwrap()),
                None => break,
            }
        }
        Ok(out)
    }

    #[tokio::test]
    async fn a_kept_body_is_replayed_whole_by_each_attempt() {
        let replay = client(&[b"hello ", b"world"]);
        let first = replay.attempt();
        assert_eq!(first.size_hint().exact(), Some(11));
        // The first try reads only what a content-length asks for, not the end of stream.
        assert_eq!(read(first, 2).await.unwrap(), b"hello world");
        assert!(replay.replayable());
        // The retry gets the kept frames, then the client's end (its hint is coherent: the
        // client's remaining 0 plus the 11 kept bytes).
        let second = replay.attempt();
        assert_eq!(second.size_hint().lower(), 11);
        assert_eq!(read(second, 10).await.unwrap(), b"hello world");
        assert_eq!(replay.complete().unwrap().len(), 2);
        let third = replay.attempt();
        assert_eq!(third.size_hint().exact(), Some(11));
        assert!(!third.is_end_stream());
        assert_eq!(read(third, 10).await.unwrap(), b"hello world");
    }

    #[tokio::test]
    async fn a_retry_started_mid_body_replays_the_start_and_reads_on() {
        let replay = client(&[b"ab", b"cd", b"ef"]);
        let first = replay.attempt();
        assert_eq!(read(first, 1).await.unwrap(), b"ab");
        assert!(replay.complete().is_none(), "not read to its end yet");
        let second = replay.attempt();
        assert_eq!(read(second, 10).await.unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn an_older_attempt_stops_reading_when_a_newer_one_starts() {
        let replay = client(&[b"ab", b"cd"]);
        let mut first = replay.attempt();
        let _second = replay.attempt();
        use http_body_util::BodyExt as _;
        assert!(matches!(
            first.frame().await,
            Some(Err(ReplayError::Superseded))
        ));
    }

    #[tokio::test]
    async fn a_body_over_the_limit_streams_once_and_is_not_replayable() {
        static BIG: [u8; REPLAY_LIMIT] = [7; REPLAY_LIMIT];
        let replay = client(&[b"x", &BIG, b"tail"]);
        let first = replay.attempt();
        let got = read(first, 10).await.unwrap();
        assert_eq!(
            got.len(),
            1 + REPLAY_LIMIT + 4,
            "the first try gets all of it"
        );
        assert!(!replay.replayable());
        assert!(replay.complete().is_none());
        let second = replay.attempt();
        assert!(matches!(read(second, 1).await, Err(ReplayError::Lost)));
    }

    #[test]
    fn backoff_is_envoys_25ms_base_capped_at_ten_times() {
        let policy = RetryPolicy::default();
        assert_eq!(nominal_delay(&policy, 0), Duration::from_millis(25));
        assert_eq!(nominal_delay(&policy, 2), Duration::from_millis(100));
        assert_eq!(nominal_delay(&policy, 9), Duration::from_millis(250));
        let mut backoff = backoff(&policy);
        for n in 0..12 {
            let delay = backoff.next_delay();
            assert!(delay <= nominal_delay(&policy, n), "{n}: {delay:?}");
        }
    }
}
