//! Local rate limiting at the waypoint: the `RateLimitPolicy` of a request's service or route
//! ([`crate::state::ratelimit`]) enforced with token buckets, as Envoy's `local_ratelimit`.
//!
//! - The buckets are GCRA limiters of the `governor` crate: a bucket of `maxTokens` gets a token
//!   back every `fillInterval / tokensPerFill`, continuously rather than in batches at each fill
//!   as Envoy's timer does; the rate and the burst are Envoy's (docs/waypoint.md).
//! - A target (a service, or one route of it) has one bucket for everyone (`tokenBucket`), one per
//!   client identity (`perIdentity`), or both. The identity is the SPIFFE id the waypoint verified
//!   (the HBONE peer's certificate): a client cannot pick it. With both, the client's own bucket
//!   is asked first, so a client over its share takes nothing from everyone's bucket.
//! - Per-identity state is bounded: at most [`MAX_IDENTITIES`] per target, the least recently
//!   seen evicted beyond that, and identities idle long enough for their bucket to be full again
//!   are dropped as they reach the cold end (a dropped bucket is exactly a fresh one, so nothing
//!   changes for them). A hostile set of identities costs a bounded amount of memory; evicting a
//!   busy identity's bucket could only give it a fresh burst, never deny anyone.
//! - Buckets live across configuration changes as long as the target's limits stay the same;
//!   changed limits start fresh buckets, removed ones are dropped.
//!
//! A refused request is answered 429 `local_rate_limited` with response flag `RL`. With
//! `enableXRatelimitHeaders: DRAFT_VERSION_03` (off by default, as Envoy's
//! `enable_x_ratelimit_headers`), every request the policy applies to carries Envoy's
//! `x-ratelimit-limit`, `x-ratelimit-remaining` and `x-ratelimit-reset` of the bucket that
//! decided; off, none: a shared bucket's level would tell every caller how much the others send.
use std::{
    collections::HashMap,
    hash::Hash,
    num::NonZeroUsize,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use governor::{
    Quota, RateLimiter,
    clock::{Clock, DefaultClock, Reference},
    middleware::StateInformationMiddleware,
    state::{InMemoryState, NotKeyed},
};
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use lru::LruCache;

use crate::state::{
    RouteTable,
    ratelimit::{RateLimit, TokenBucket},
};

/// The most client identities whose buckets one target keeps.
pub const MAX_IDENTITIES: usize = 10_000;

/// How many idle identities one check drops at most (the work per request stays constant).
const PRUNE_PER_CHECK: usize = 4;

/// The body of a refused request (Envoy's).
pub const RATE_LIMITED_BODY: &str = "local_rate_limited";

/// What a limited target answered: Envoy's `DRAFT_VERSION_03` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XRateLimit {
    /// `x-ratelimit-limit`: the deciding bucket's `maxTokens`.
    pub limit: u32,
    /// `x-ratelimit-remaining`: the tokens left in it.
    pub remaining: u32,
    /// `x-ratelimit-reset`: seconds (rounded up) until it is full again; refused, until the
    /// next token.
    pub reset: u64,
}

impl XRateLimit {
    /// Sets the three headers on `headers`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert("x-ratelimit-limit", HeaderValue::from(self.limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(self.remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(self.reset));
    }
}

/// The decision on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let through; the headers of the bucket with the fewest tokens left.
    Allowed(XRateLimit),
    /// Refused by a bucket: `per_identity` tells which.
    Limited {
        /// The refusing bucket's headers.
        headers: XRateLimit,
        /// Whether it was the client's own bucket (else everyone's).
        per_identity: bool,
        /// The policy, for the log.
        source: String,
    },
}

impl Verdict {
    /// The headers to add to the response.
    pub fn headers(&self) -> XRateLimit {
        match self {
            Verdict::Allowed(headers) | Verdict::Limited { headers, .. } => *headers,
        }
    }
}

/// The waypoint's rate limiters, by target; generic over the clock for tests.
pub struct RateLimits<C: Clock + Clone = DefaultClock> {
    clock: C,
    max_identities: NonZeroUsize,
    targets: Mutex<HashMap<TargetKey, Arc<Target<C>>>>,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self::with_clock(DefaultClock::default(), MAX_IDENTITIES)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TargetKey {
    service: String,
    route: Option<String>,
}

type Limiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;

/// A bucket and what it was made from.
struct Bucket<C: Clock> {
    spec: TokenBucket,
    limiter: Limiter<C>,
}

/// A client's bucket and when it was last asked.
struct IdentityBucket<C: Clock> {
    bucket: Bucket<C>,
    last_used: C::Instant,
}

struct Target<C: Clock> {
    limit: RateLimit,
    shared: Option<Bucket<C>>,
    per_identity: Mutex<LruCache<String, IdentityBucket<C>>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Limiter state is consistent whatever a panicking holder was doing.
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn quota(spec: &TokenBucket) -> Quota {
    let burst =
        std::num::NonZeroU32::new(spec.max_tokens.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
    Quota::with_period(spec.per_token().max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(burst))
        .allow_burst(burst)
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

impl<C: Clock + Clone> Bucket<C> {
    fn new(spec: TokenBucket, clock: &C) -> Self {
        Self {
            spec,
            limiter: RateLimiter::direct_with_clock(quota(&spec), clock.clone())
                .with_middleware::<StateInformationMiddleware>(),
        }
    }

    /// Takes a token: `Ok` with the headers after it, or `Err` with the refusal's headers.
    fn take(&self, clock: &C) -> Result<XRateLimit, XRateLimit> {
        let per_token = self.spec.per_token();
        match self.limiter.check() {
            Ok(snapshot) => {
                let remaining = snapshot
                    .remaining_burst_capacity()
                    .min(self.spec.max_tokens);
                let missing = self.spec.max_tokens - remaining;
                Ok(XRateLimit {
                    limit: self.spec.max_tokens,
                    remaining,
                    reset: ceil_secs(per_token.saturating_mul(missing)),
                })
            }
            Err(not_until) => Err(XRateLimit {
                limit: self.spec.max_tokens,
                remaining: 0,
                reset: ceil_secs(not_until.wait_time_from(clock.now())).max(1),
            }),
        }
    }
}

impl<C: Clock + Clone> RateLimits<C> {
    /// Limiters reading `clock`, keeping at most `max_identities` client buckets per target.
    pub fn with_clock(clock: C, max_identities: usize) -> Self {
        Self {
            clock,
            max_identities: NonZeroUsize::new(max_identities).unwrap_or(NonZeroUsize::MIN),
            targets: Mutex::new(HashMap::new()),
        }
    }

    /// The decision on a request of `identity` to the service `service` (uid) that took the
    /// route named `route`; `None` when no policy applies.
    pub fn check(
        &self,
        table: &RouteTable,
        service: &str,
        route: Option<&str>,
        identity: &str,
    ) -> Option<Verdict> {
        let (limit, route) = table.rate_limits.get(service)?.for_route(route)?;
        let target = self.target(table, service, route, limit);
        let mut decided: Option<XRateLimit> = None;
        if let Some(spec) = limit.per_identity {
            match self.take_for(&target, spec, identity) {
                Ok(headers) => decided = Some(headers),
                Err(headers) => {
                    return Some(Verdict::Limited {
                        headers,
                        per_identity: true,
                        source: limit.source.clone(),
                    });
                }
            }
        }
        if let Some(shared) = &target.shared {
            match shared.take(&self.clock) {
                Ok(headers) => {
                    if decided.is_none_or(|d| headers.remaining < d.remaining) {
                        decided = Some(headers);
                    }
                }
                Err(headers) => {
                    return Some(Verdict::Limited {
                        headers,
                        per_identity: false,
                        source: limit.source.clone(),
                    });
                }
            }
        }
        decided.map(Verdict::Allowed)
    }

    /// The buckets of a target, made (again) if its limits are new or changed; targets no
    /// longer configured are dropped.
    fn target(
        &self,
        table: &RouteTable,
        service: &str,
        route: Option<&str>,
        limit: &RateLimit,
    ) -> Arc<Target<C>> {
        let key = TargetKey {
            service: service.to_string(),
            route: route.map(str::to_string),
        };
        let mut targets = lock(&self.targets);
        if let Some(target) = targets.get(&key)
            && target.limit == *limit
        {
            return target.clone();
        }
        let configured: usize = table
            .rate_limits
            .values()
            .map(|l| l.routes.len() + usize::from(l.service.is_some()))
            .sum();
        if targets.len() >= configured {
            targets.retain(|k, t| {
                table
                    .rate_limits
                    .get(&k.service)
                    .and_then(|l| match &k.route {
                        Some(r) => l.routes.get(r),
                        None => l.service.as_ref(),
                    })
                    .is_some_and(|l| *l == t.limit)
            });
        }
        let target = Arc::new(Target {
            limit: limit.clone(),
            shared: limit
                .token_bucket
                .map(|spec| Bucket::new(spec, &self.clock)),
            per_identity: Mutex::new(LruCache::sparse(self.max_identities)),
        });
        targets.insert(key, target.clone());
        target
    }

    /// Takes a token from `identity`'s bucket of `target`, first dropping a few idle buckets.
    fn take_for(
        &self,
        target: &Target<C>,
        spec: TokenBucket,
        identity: &str,
    ) -> Result<XRateLimit, XRateLimit> {
        let now = self.clock.now();
        let refill = spec.refill();
        let mut buckets = lock(&target.per_identity);
        for _ in 0..PRUNE_PER_CHECK {
            let idle = buckets
                .peek_lru()
                .is_some_and(|(_, b)| Duration::from(now.duration_since(b.last_used)) >= refill);
            if !idle {
                break;
            }
            buckets.pop_lru();
        }
        let entry = match buckets.get_mut(identity) {
            Some(entry) => entry,
            None => {
                buckets.put(
                    identity.to_string(),
                    IdentityBucket {
                        bucket: Bucket::new(spec, &self.clock),
                        last_used: now,
                    },
                );
                buckets.get_mut(identity).expect("just inserted")
            }
        };
        entry.last_used = now;
        entry.bucket.take(&self.clock)
    }

    /// How many client buckets `service`'s (route's) target holds.
    #[cfg(test)]
    fn identities(&self, service: &str, route: Option<&str>) -> usize {
        let key = TargetKey {
            service: service.to_string(),
            route: route.map(str::to_string),
        };
        lock(&self.targets)
            .get(&key)
            .map_or(0, |t| lock(&t.per_identity).len())
    }
}

/// The answer to a refused request: 429 `local_rate_limited` (Envoy's), with the headers if the
/// policy shows them.
pub fn limited_reply(headers: Option<XRateLimit>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(RATE_LIMITED_BODY.as_bytes())));
    *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Some(headers) = headers {
        headers.apply(response.headers_mut());
    }
    response
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;
    use crate::state::ratelimit::ServiceRateLimits;

    fn bucket(max_tokens: u32, tokens_per_fill: u32, fill_interval: Duration) -> TokenBucket {
        TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
        }
    }

    fn table(service: Option<RateLimit>, routes: &[(&str, RateLimit)]) -> RouteTable {
        let mut table = RouteTable::default();
        table.rate_limits.insert(
            "shop/web".into(),
            ServiceRateLimits {
                service,
                routes: routes
                    .iter()
                    .map(|(n, l)| (n.to_string(), l.clone()))
                    .collect(),
            },
        );
        table
    }

    fn limit(token_bucket: Option<TokenBucket>, per_identity: Option<TokenBucket>) -> RateLimit {
        RateLimit {
            source: "RateLimitPolicy shop/limit".into(),
            token_bucket,
            per_identity,
            x_ratelimit_headers: true,
        }
    }

    const A: &str = "spiffe://cluster.local/ns/shop/sa/a";
    const B: &str = "spiffe://cluster.local/ns/shop/sa/b";

    fn allowed(verdicts: &[Option<Verdict>]) -> usize {
        verdicts
            .iter()
            .filter(|v| matches!(v, Some(Verdict::Allowed(_))))
            .count()
    }

    #[test]
    fn a_burst_gets_the_bucket_and_no_more_and_tokens_come_back() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock.clone(), 100);
        let table = table(
            Some(limit(Some(bucket(10, 5, Duration::from_secs(1))), None)),
            &[],
        );
        let verdicts: Vec<_> = (0..25)
            .map(|_| limits.check(&table, "shop/web", None, A))
            .collect();
        assert_eq!(allowed(&verdicts), 10);
        assert_eq!(
            verdicts[0],
            Some(Verdict::Allowed(XRateLimit {
                limit: 10,
                remaining: 9,
                reset: 1
            }))
        );
        let Some(Verdict::Limited {
            headers,
            per_identity,
            ..
        }) = &verdicts[10]
        else {
            panic!("{:?}", verdicts[10]);
        };
        assert_eq!(
            (*headers, *per_identity),
            (
                XRateLimit {
                    limit: 10,
                    remaining: 0,
                    reset: 1
                },
                false
            )
        );
        // Another identity shares the one bucket.
        assert!(matches!(
            limits.check(&table, "shop/web", None, B),
            Some(Verdict::Limited { .. })
        ));
        // 5 tokens per second: after one second, 5 more requests pass, the 6th does not.
        clock.advance(Duration::from_secs(1));
        let verdicts: Vec<_> = (0..6)
            .map(|_| limits.check(&table, "shop/web", None, A))
            .collect();
        assert_eq!(allowed(&verdicts), 5);
    }

    #[test]
    fn per_identity_buckets_are_separate() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock, 100);
        let table = table(
            Some(limit(None, Some(bucket(3, 1, Duration::from_secs(60))))),
            &[],
        );
        let a: Vec<_> = (0..10)
            .map(|_| limits.check(&table, "shop/web", None, A))
            .collect();
        assert_eq!(allowed(&a), 3);
        assert!(matches!(
            &a[3],
            Some(Verdict::Limited { per_identity: true, headers, .. }) if headers.reset == 60
        ));
        let b: Vec<_> = (0..10)
            .map(|_| limits.check(&table, "shop/web", None, B))
            .collect();
        assert_eq!(allowed(&b), 3, "another identity has its own bucket");
    }

    /// A client over its own share takes nothing from everyone's bucket.
    #[test]
    fn the_own_bucket_is_asked_first() {
        let limits = RateLimits::with_clock(FakeRelativeClock::default(), 100);
        let day = Duration::from_secs(86_400);
        let table = table(
            Some(limit(Some(bucket(5, 1, day)), Some(bucket(2, 1, day)))),
            &[],
        );
        let a: Vec<_> = (0..10)
            .map(|_| limits.check(&table, "shop/web", None, A))
            .collect();
        assert_eq!(allowed(&a), 2);
        let b: Vec<_> = (0..10)
            .map(|_| limits.check(&table, "shop/web", None, B))
            .collect();
        assert_eq!(allowed(&b), 2);
        // Everyone's bucket has 1 left: the third identity gets it, then everyone's refuses.
        let c: Vec<_> = (0..3)
            .map(|_| limits.check(&table, "shop/web", None, "c"))
            .collect();
        assert_eq!(allowed(&c), 1);
        assert!(matches!(
            &c[1],
            Some(Verdict::Limited {
                per_identity: false,
                ..
            })
        ));
    }

    #[test]
    fn routes_have_their_own_buckets_and_unlimited_targets_none() {
        let limits = RateLimits::with_clock(FakeRelativeClock::default(), 100);
        let day = Duration::from_secs(86_400);
        let table = table(
            Some(limit(Some(bucket(1, 1, day)), None)),
            &[("api", limit(Some(bucket(2, 1, day)), None))],
        );
        let api: Vec<_> = (0..4)
            .map(|_| limits.check(&table, "shop/web", Some("api"), A))
            .collect();
        assert_eq!(allowed(&api), 2);
        // The service's bucket was not touched by the route's requests.
        assert!(matches!(
            limits.check(&table, "shop/web", Some("other"), A),
            Some(Verdict::Allowed(_))
        ));
        assert!(matches!(
            limits.check(&table, "shop/web", None, A),
            Some(Verdict::Limited { .. })
        ));
        assert_eq!(limits.check(&table, "shop/db", None, A), None);
    }

    #[test]
    fn changed_limits_start_fresh_buckets_and_unchanged_ones_keep_theirs() {
        let limits = RateLimits::with_clock(FakeRelativeClock::default(), 100);
        let day = Duration::from_secs(86_400);
        let first = table(Some(limit(Some(bucket(1, 1, day)), None)), &[]);
        assert!(matches!(
            limits.check(&first, "shop/web", None, A),
            Some(Verdict::Allowed(_))
        ));
        let same = first.clone();
        assert!(matches!(
            limits.check(&same, "shop/web", None, A),
            Some(Verdict::Limited { .. })
        ));
        let changed = table(Some(limit(Some(bucket(2, 1, day)), None)), &[]);
        assert!(matches!(
            limits.check(&changed, "shop/web", None, A),
            Some(Verdict::Allowed(_))
        ));
        assert_eq!(lock(&limits.targets).len(), 1);
    }

    /// A hostile set of identities does not grow the state beyond the cap, and idle buckets
    /// (full again) are dropped.
    #[test]
    fn identities_are_capped_and_idle_ones_pruned() {
        let clock = FakeRelativeClock::default();
        let limits = RateLimits::with_clock(clock.clone(), 50);
        let table = table(
            Some(limit(None, Some(bucket(2, 1, Duration::from_secs(1))))),
            &[],
        );
        for i in 0..500 {
            limits.check(&table, "shop/web", None, &format!("id-{i}"));
        }
        assert_eq!(limits.identities("shop/web", None), 50);
        // A busy identity is not evicted by newcomers while it keeps coming.
        for i in 0..200 {
            assert!(limits.check(&table, "shop/web", None, A).is_some());
            limits.check(&table, "shop/web", None, &format!("new-{i}"));
        }
        assert!(matches!(
            limits.check(&table, "shop/web", None, A),
            Some(Verdict::Limited { .. })
        ));
        // After the refill time everyone is idle: each check drops a few of them.
        clock.advance(Duration::from_secs(3));
        for _ in 0..20 {
            limits.check(&table, "shop/web", None, A);
        }
        assert_eq!(
            limits.identities("shop/web", None),
            1,
            "only the one still coming"
        );
    }

    #[test]
    fn the_reply_is_envoys() {
        assert!(
            limited_reply(None)
                .headers()
                .keys()
                .all(|k| !k.as_str().starts_with("x-ratelimit"))
        );
        let response = limited_reply(Some(XRateLimit {
            limit: 10,
            remaining: 0,
            reset: 3,
        }));
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        let h = response.headers();
        assert_eq!(h["x-ratelimit-limit"], "10");
        assert_eq!(h["x-ratelimit-remaining"], "0");
        assert_eq!(h["x-ratelimit-reset"], "3");
    }
}
