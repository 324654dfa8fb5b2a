//! What one client may cost the CA, bounded.
//!
//! The CA answers anyone who completes a TLS handshake, before knowing who they are. In
//! Kubernetes mode each unknown token costs a `TokenReview` at the API server, which every
//! controller of the cluster shares; every refusal costs a log line. So:
//!
//! - `ExpiringCache`: token reviews are remembered for a while, accepted ones (a minute) and
//!   refused ones (10 s by default), keyed by the SHA-256 of the token (never the token), each
//!   cache an LRU of fixed capacity: a client sending endless fresh garbage only evicts other
//!   garbage, since the two caches are separate.
//! - `ReviewLimiter`: the reviews a client address may cause (GCRA, by `governor`: a burst,
//!   then one per period), and those of all clients together, so that a client with many
//!   addresses cannot flood the API server either. The per-address state lives in an LRU of
//!   fixed capacity; an evicted address starts again with a full burst, which the overall limit
//!   bounds. Cache hits never count.
//! - `RefusalLog`: a refusal is logged at warning level once per client address and interval,
//!   the line counting the refusals of that address not logged since its previous one; the
//!   others go to debug level.
//!
//! Every structure here is bounded in memory by its capacity, whatever clients send.
use std::{
    hash::Hash,
    net::{IpAddr, Ipv4Addr},
    num::NonZeroU32,
    num::NonZeroUsize,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter, clock::Clock as _};
use lru::LruCache;

/// How long a refused review is remembered, unless configured otherwise.
pub const DEFAULT_REFUSED_TTL: Duration = Duration::from_secs(10);
/// Most refused reviews remembered at once.
pub const DEFAULT_REFUSED_CAPACITY: usize = 4096;
/// Most accepted reviews remembered at once (a cluster has one agent per node, and an agent one
/// token at a time, two while kubelet rotates it).
pub const DEFAULT_ACCEPTED_CAPACITY: usize = 16_384;
/// Token reviews one client address may cause at once ...
pub const DEFAULT_PEER_BURST: u32 = 20;
/// ... and then one per this period. An agent needs one a minute (the accepted cache's
/// lifetime), more only while its token rotates.
pub const DEFAULT_PEER_PERIOD: Duration = Duration::from_secs(3);
/// Client addresses whose review budget is tracked at once.
pub const DEFAULT_PEERS: usize = 4096;
/// Token reviews all clients together may cause at once ...
pub const DEFAULT_OVERALL_BURST: u32 = 200;
/// ... and then one per this period (50 a second): a thousand agents starting at once are all
/// reviewed within 20 s, while a flood from many addresses cannot go past it.
pub const DEFAULT_OVERALL_PERIOD: Duration = Duration::from_millis(20);
/// A client address's refusals are logged at warning level at most once per this interval.
pub const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Client addresses whose refusals are counted at once.
const REFUSAL_LOG_PEERS: usize = 4096;

/// The bounds on token reviews (Kubernetes mode), per CA replica.
#[derive(Debug, Clone)]
pub struct ReviewLimits {
    /// How long a refused review is remembered: the same token is refused again without asking
    /// the API server.
    pub refused_ttl: Duration,
    /// Most refused reviews remembered at once (least recently used go first).
    pub refused_capacity: NonZeroUsize,
    /// Most accepted reviews remembered at once (least recently used go first).
    pub accepted_capacity: NonZeroUsize,
    /// The reviews one client address may cause.
    pub per_peer: Quota,
    /// Client addresses tracked at once (least recently seen go first, forgetting what they
    /// spent).
    pub peers: NonZeroUsize,
    /// The reviews all clients together may cause.
    pub overall: Quota,
}

impl Default for ReviewLimits {
    fn default() -> Self {
        Self {
            refused_ttl: DEFAULT_REFUSED_TTL,
            refused_capacity: nonzero(DEFAULT_REFUSED_CAPACITY),
            accepted_capacity: nonzero(DEFAULT_ACCEPTED_CAPACITY),
            per_peer: quota(DEFAULT_PEER_BURST, DEFAULT_PEER_PERIOD),
            peers: nonzero(DEFAULT_PEERS),
            overall: quota(DEFAULT_OVERALL_BURST, DEFAULT_OVERALL_PERIOD),
        }
    }
}

/// A budget of `burst` at once, refilled by one every `period` (both positive).
pub fn quota(burst: u32, period: Duration) -> Quota {
    let burst = NonZeroU32::new(burst).expect("a positive burst");
    Quota::with_period(period)
        .expect("a positive period")
        .allow_burst(burst)
}

fn nonzero(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).expect("a positive capacity")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The key a client address is known by: IPv4 clients of a dual-stack listener arrive as
/// IPv4-mapped IPv6 addresses, and are the same clients.
pub(crate) fn peer_key(peer: Option<IpAddr>) -> IpAddr {
    peer.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |ip| ip.to_canonical())
}

/// An LRU cache of fixed capacity whose entries expire `ttl` after they were put in.
pub(crate) struct ExpiringCache<K: Hash + Eq, V> {
    entries: Mutex<LruCache<K, (V, Instant)>>,
    ttl: Duration,
}

impl<K: Hash + Eq, V: Clone> ExpiringCache<K, V> {
    /// An empty cache of at most `capacity` entries (allocated as they come).
    pub(crate) fn new(capacity: NonZeroUsize, ttl: Duration) -> Self {
        Self {
            entries: Mutex::new(LruCache::sparse(capacity)),
            ttl,
        }
    }

    /// The value of `key`, if present and not expired (an expired one is removed).
    pub(crate) fn get(&self, key: &K) -> Option<V> {
        let mut entries = lock(&self.entries);
        match entries.get(key) {
            Some((value, expires)) if *expires > Instant::now() => Some(value.clone()),
            Some(_) => {
                entries.pop(key);
                None
            }
            None => None,
        }
    }

    /// Remembers `value` for `key` from now on; when full, the least recently used entry goes.
    pub(crate) fn insert(&self, key: K, value: V) {
        let expires = Instant::now() + self.ttl;
        lock(&self.entries).put(key, (value, expires));
    }

    /// How many entries are held, expired ones included until they are looked up or evicted.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        lock(&self.entries).len()
    }
}

/// Why a review may not be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Throttled {
    /// This client address has spent its budget; the time until it may try again.
    Peer(Duration),
    /// All clients together have; the time until the next review may be made.
    Overall(Duration),
}

/// Rate limits on the token reviews clients cause: per address, and overall.
pub(crate) struct ReviewLimiter {
    per_peer: Quota,
    peers: Mutex<LruCache<IpAddr, DefaultDirectRateLimiter>>,
    overall: DefaultDirectRateLimiter,
}

impl ReviewLimiter {
    pub(crate) fn new(limits: &ReviewLimits) -> Self {
        Self {
            per_peer: limits.per_peer,
            peers: Mutex::new(LruCache::sparse(limits.peers)),
            overall: RateLimiter::direct(limits.overall),
        }
    }

    /// Takes one review from `peer`'s budget and the overall one, or says which is spent. A
    /// refusal by the overall limit still counts against the peer: a flood stays a flood.
    pub(crate) fn check(&self, peer: IpAddr) -> Result<(), Throttled> {
        let clock = governor::clock::DefaultClock::default();
        {
            let mut peers = lock(&self.peers);
            let limiter = peers.get_or_insert(peer, || RateLimiter::direct(self.per_peer));
            if let Err(not_until) = limiter.check() {
                return Err(Throttled::Peer(not_until.wait_time_from(clock.now())));
            }
        }
        self.overall
            .check()
            .map_err(|not_until| Throttled::Overall(not_until.wait_time_from(clock.now())))
    }

    /// The budget of each client address.
    pub(crate) fn per_peer(&self) -> Quota {
        self.per_peer
    }

    /// How many client addresses are tracked.
    #[cfg(test)]
    pub(crate) fn peers(&self) -> usize {
        lock(&self.peers).len()
    }
}

/// When a client address's refusals were last logged, and how many were not since.
struct LogWindow {
    logged_at: Instant,
    suppressed: u64,
}

/// Decides which refusals are logged at warning level: the first of each client address in
/// each [`REFUSAL_LOG_INTERVAL`].
pub(crate) struct RefusalLog {
    peers: Mutex<LruCache<IpAddr, LogWindow>>,
    interval: Duration,
}

impl Default for RefusalLog {
    fn default() -> Self {
        Self::new(nonzero(REFUSAL_LOG_PEERS), REFUSAL_LOG_INTERVAL)
    }
}

impl RefusalLog {
    pub(crate) fn new(peers: NonZeroUsize, interval: Duration) -> Self {
        Self {
            peers: Mutex::new(LruCache::sparse(peers)),
            interval,
        }
    }

    /// Records a refusal of `peer`: `Some(n)` if it is to be logged at warning level, `n` being
    /// the refusals of `peer` not so logged since its previous line; `None` if not.
    pub(crate) fn admit(&self, peer: IpAddr) -> Option<u64> {
        self.admit_at(peer, Instant::now())
    }

    fn admit_at(&self, peer: IpAddr, now: Instant) -> Option<u64> {
        let mut peers = lock(&self.peers);
        match peers.get_mut(&peer) {
            Some(window) if now.saturating_duration_since(window.logged_at) < self.interval => {
                window.suppressed += 1;
                None
            }
            Some(window) => {
                let suppressed = window.suppressed;
                *window = LogWindow {
                    logged_at: now,
                    suppressed: 0,
                };
                Some(suppressed)
            }
            None => {
                peers.put(
                    peer,
                    LogWindow {
                        logged_at: now,
                        suppressed: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn caches_hold_at_most_their_capacity_and_forget_the_least_recently_used() {
        let cache = ExpiringCache::new(nonzero(100), Duration::from_secs(3600));
        for n in 0..10_000u32 {
            cache.insert(n, n);
        }
        assert_eq!(cache.len(), 100);
        assert_eq!(cache.get(&9_999), Some(9_999));
        assert_eq!(cache.get(&0), None, "evicted");
        // A looked-up entry is recently used: the next insertion evicts another one.
        assert_eq!(cache.get(&9_900), Some(9_900));
        cache.insert(10_000, 10_000);
        assert_eq!(cache.get(&9_900), Some(9_900));
        assert_eq!(cache.get(&9_901), None);
    }

    #[test]
    fn cache_entries_expire() {
        let cache = ExpiringCache::new(nonzero(4), Duration::ZERO);
        cache.insert("k", 1);
        assert_eq!(cache.get(&"k"), None);
        assert_eq!(cache.len(), 0, "an expired entry is removed when looked up");
    }

    #[test]
    fn the_limiter_spends_each_peers_budget_and_the_overall_one() {
        let hour = Duration::from_secs(3600);
        let limiter = ReviewLimiter::new(&ReviewLimits {
            per_peer: quota(2, hour),
            peers: nonzero(3),
            overall: quota(5, hour),
            ..ReviewLimits::default()
        });
        for _ in 0..2 {
            limiter.check(ip(1)).unwrap();
        }
        let Err(Throttled::Peer(wait)) = limiter.check(ip(1)) else {
            panic!("a third review from one peer")
        };
        assert!(wait > hour / 2 && wait <= hour, "{wait:?}");
        // Another peer has its own budget ...
        limiter.check(ip(2)).unwrap();
        limiter.check(ip(2)).unwrap();
        // ... until all of them together reach the overall limit.
        limiter.check(ip(3)).unwrap();
        assert!(matches!(limiter.check(ip(4)), Err(Throttled::Overall(_))));
        // Only `peers` addresses are tracked, whatever the number of clients.
        for n in 10..1000 {
            let _ = limiter.check(ip(n));
        }
        assert_eq!(limiter.peers(), 3);
    }

    #[test]
    fn refusals_are_logged_once_per_peer_and_interval_with_a_count() {
        let log = RefusalLog::new(nonzero(2), Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(log.admit_at(ip(1), t0), Some(0));
        for s in 1..=5 {
            assert_eq!(log.admit_at(ip(1), t0 + Duration::from_secs(s)), None);
        }
        // Another peer is logged at once.
        assert_eq!(log.admit_at(ip(2), t0 + Duration::from_secs(5)), Some(0));
        // The interval over, the next line counts what was not logged.
        assert_eq!(log.admit_at(ip(1), t0 + Duration::from_secs(61)), Some(5));
        assert_eq!(log.admit_at(ip(1), t0 + Duration::from_secs(62)), None);
        // Bounded: a third peer evicts the least recently seen one (ip 2).
        assert_eq!(log.admit_at(ip(3), t0 + Duration::from_secs(63)), Some(0));
        assert_eq!(lock(&log.peers).len(), 2);
        assert_eq!(log.admit_at(ip(2), t0 + Duration::from_secs(64)), Some(0));
    }

    #[test]
    fn ipv4_mapped_peers_are_their_ipv4_address() {
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(
            peer_key(Some(mapped)),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
        assert_eq!(peer_key(None), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }
}
