//! Which endpoint of a destination serves a request: the destination's load balancer
//! ([`LoadBalancer`], from a DestinationRule's `trafficPolicy.loadBalancer`).
//!
//! - Round robin: [`RoundRobin`], one turn per destination.
//! - Least request: of two endpoints drawn at random, the one with fewer requests in flight
//!   (Envoy's default "power of two choices"). Requests in flight are counted per endpoint for
//!   every request the waypoint sends, whatever balancer chose it, from the pick until the
//!   response's body is done ([`InFlight`]).
//! - Random.
//! - Consistent hash: a Maglev table (Eisenbud et al., NSDI 2016; Envoy's `MAGLEV`) per
//!   destination, built from the endpoints' names, so every waypoint replica maps a key to the
//!   same endpoint, a key stays on its endpoint while the endpoints stay, and adding or removing
//!   one of N endpoints moves about 1/N of the keys. A request without the key is balanced at
//!   random, as Envoy does when a hash policy yields no hash; a cookie with a `ttl` is created
//!   instead (`Set-Cookie`), and the new cookie's hash picks the endpoint.
//!
//! Memory is bounded by the configuration: one turn per destination, one counter per endpoint
//! with requests in flight, one table per consistent-hash destination (rebuilt when its
//! endpoints change; all tables dropped if there are ever more than [`MAX_TABLES`]).
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use http::HeaderMap;
use hyper::body::{Body, Frame, SizeHint};

use super::route::{RoundRobin, query_param};
use crate::state::{
    Workload,
    routes::{ConsistentHash, HashKey, LoadBalancer, RouteDestination},
};

/// Consistent-hash tables kept at most (more destinations than this with a consistent hash
/// would rebuild their tables more often, not grow memory).
pub const MAX_TABLES: usize = 1024;

/// What a consistent hash may read of a request.
#[derive(Clone, Copy, Debug)]
pub struct HashInput<'a> {
    /// The request headers (a header key, cookies).
    pub headers: &'a HeaderMap,
    /// The query string.
    pub query: Option<&'a str>,
    /// The client's address.
    pub source: IpAddr,
}

/// The endpoint chosen for one request.
#[derive(Debug)]
pub struct Pick<'e> {
    /// The endpoint.
    pub endpoint: &'e Arc<Workload>,
    /// Counts the request in flight at the endpoint until dropped.
    pub in_flight: InFlight,
    /// A cookie the response must set (`name=value; ...`): a consistent hash by a cookie with
    /// a `ttl` that the request did not carry.
    pub set_cookie: Option<String>,
}

/// One request in flight at an endpoint; the count goes down when it is dropped.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted in flight until it is done or dropped.
pub struct Tracked<B> {
    body: B,
    in_flight: Option<InFlight>,
}

impl<B> Tracked<B> {
    /// `body`, holding `in_flight`.
    pub fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            in_flight: Some(in_flight),
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            self.in_flight = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The waypoint's balancers' shared memory.
#[derive(Debug, Default)]
pub struct Balancer {
    round_robin: RoundRobin,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    tables: Mutex<HashMap<String, Arc<Maglev>>>,
}

impl Balancer {
    /// Picks an endpoint of `endpoints` (those of `destination`, in the state's order) by
    /// `policy`. `None` when there are none.
    pub fn pick<'e>(
        &self,
        policy: &LoadBalancer,
        destination: &RouteDestination,
        endpoints: &'e [Arc<Workload>],
        request: HashInput<'_>,
    ) -> Option<Pick<'e>> {
        if endpoints.is_empty() {
            return None;
        }
        let mut set_cookie = None;
        let endpoint = match policy {
            LoadBalancer::RoundRobin => self.round_robin.pick(destination, endpoints)?,
            LoadBalancer::Random => &endpoints[fastrand::usize(..endpoints.len())],
            LoadBalancer::LeastRequest => self.least_request(endpoints),
            LoadBalancer::ConsistentHash(hash) => {
                let key = match hash_key(&hash.key, request) {
                    Some(key) => Some(key),
                    None => new_cookie(&hash.key).map(|(value, header)| {
                        set_cookie = Some(header);
                        hash_of(&value)
                    }),
                };
                match key {
                    Some(key) => &endpoints[self.table(destination, hash, endpoints).lookup(key)],
                    None => &endpoints[fastrand::usize(..endpoints.len())],
                }
            }
        };
        Some(Pick {
            endpoint,
            in_flight: self.start(endpoint),
            set_cookie,
        })
    }

    /// Of two distinct endpoints drawn at random, the one with fewer requests in flight (the
    /// first drawn on a tie).
    fn least_request<'e>(&self, endpoints: &'e [Arc<Workload>]) -> &'e Arc<Workload> {
        let n = endpoints.len();
        if n == 1 {
            return &endpoints[0];
        }
        let first = fastrand::usize(..n);
        let mut second = fastrand::usize(..n - 1);
        if second >= first {
            second += 1;
        }
        if self.load(&endpoints[second]) < self.load(&endpoints[first]) {
            &endpoints[second]
        } else {
            &endpoints[first]
        }
    }

    /// Requests in flight at `endpoint`.
    pub fn load(&self, endpoint: &Workload) -> usize {
        let counts = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        counts
            .get(&endpoint.uid())
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Counts a request in flight at `endpoint`. Counters nobody holds are dropped when the
    /// map has grown past twice the live ones, so it stays bounded by the endpoints busy.
    fn start(&self, endpoint: &Workload) -> InFlight {
        let mut counts = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let counter = counts.entry(endpoint.uid()).or_default().clone();
        counter.fetch_add(1, Ordering::Relaxed);
        if counts.len() > 64 {
            let live = counts.values().filter(|c| Arc::strong_count(c) > 1).count();
            if counts.len() > 2 * live {
                counts.retain(|_, c| Arc::strong_count(c) > 1);
            }
        }
        InFlight(counter)
    }

    /// The Maglev table of `destination` over `endpoints`, rebuilt when they changed.
    fn table(
        &self,
        destination: &RouteDestination,
        hash: &ConsistentHash,
        endpoints: &[Arc<Workload>],
    ) -> Arc<Maglev> {
        let names: Vec<String> = endpoints.iter().map(|w| w.uid()).collect();
        let key = format!(
            "{}/{}",
            destination.service,
            destination.subset.as_ref().map_or("", |s| s.name.as_str())
        );
        let mut tables = self.tables.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(table) = tables.get(&key)
            && table.names == names
            && table.size() == hash.table_size as usize
        {
            return table.clone();
        }
        let table = Arc::new(Maglev::new(names, hash.table_size as usize));
        if tables.len() >= MAX_TABLES {
            tables.clear();
        }
        tables.insert(key, table.clone());
        table
    }
}

/// The hash of the request's key, if it carries one.
fn hash_key(key: &HashKey, request: HashInput<'_>) -> Option<u64> {
    match key {
        HashKey::Header(name) => {
            // Every value of the header, in order, as Envoy hashes a repeated header.
            let values: Vec<&[u8]> = request
                .headers
                .get_all(name.as_str())
                .iter()
                .map(|v| v.as_bytes())
                .collect();
            (!values.is_empty()).then(|| hash_of(&values))
        }
        HashKey::Cookie { name, .. } => cookie(request.headers, name).map(hash_of),
        HashKey::SourceIp => Some(hash_of(&request.source)),
        HashKey::QueryParameter(name) => query_param(request.query, name).map(hash_of),
    }
}

/// A new cookie for a cookie key with a `ttl`: its value and the `Set-Cookie` header value.
fn new_cookie(key: &HashKey) -> Option<(String, String)> {
    let HashKey::Cookie {
        name,
        path,
        ttl_seconds: Some(ttl),
    } = key
    else {
        return None;
    };
    let value = format!("{:016x}", fastrand::u64(..));
    // A ttl of 0 makes a session cookie (no Max-Age), as Envoy's.
    let mut header = format!("{name}={value}");
    if *ttl > 0 {
        header.push_str(&format!("; Max-Age={ttl}"));
    }
    if let Some(path) = path {
        header.push_str(&format!("; Path={path}"));
    }
    header.push_str("; HttpOnly");
    Some((value, header))
}

/// The value of the cookie `name` in the request's `cookie` headers.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (key, value) = pair.trim().split_once('=')?;
            (key == name).then_some(value)
        })
}

/// A stable 64-bit hash (SipHash with fixed keys: the same in every replica of one build).
fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// A Maglev lookup table: `size` (a prime) slots, each naming an endpoint, filled from each
/// endpoint's own permutation of the slots in turn, so every endpoint owns `size / n` slots
/// (within one) and a change of endpoints reassigns few slots.
#[derive(Debug)]
pub struct Maglev {
    names: Vec<String>,
    slots: Vec<u32>,
}

impl Maglev {
    /// The table of `names` (non-empty, distinct) with `size` slots.
    pub fn new(names: Vec<String>, size: usize) -> Self {
        let n = names.len();
        let size = size.max(n.max(1));
        // Each endpoint's permutation: offset + j * skip (mod size), size prime.
        let perms: Vec<(usize, usize)> = names
            .iter()
            .map(|name| {
                let offset = (hash_of(&(name, 0u8)) % size as u64) as usize;
                let skip = (hash_of(&(name, 1u8)) % (size as u64 - 1).max(1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; n];
        let mut slots = vec![u32::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in perms.iter().enumerate() {
                let mut slot = (offset + next[i] * skip) % size;
                while slots[slot] != u32::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % size;
                }
                slots[slot] = i as u32;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Self { names, slots }
    }

    /// The slots.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// The index (in the names given) of the endpoint of `hash`.
    pub fn lookup(&self, hash: u64) -> usize {
        self.slots[(hash % self.slots.len() as u64) as usize] as usize
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::HeaderValue;

    use super::*;
    use crate::state::WaypointRef;

    fn endpoint(name: &str) -> Arc<Workload> {
        Arc::new(Workload {
            name: name.into(),
            namespace: "shop".into(),
            service_account: "reviews".into(),
            node: "n0".into(),
            ips: vec![],
            labels: BTreeMap::from([("app".to_string(), "reviews".to_string())]),
            enrolled: true,
            ready: true,
            netns: crate::netns::NetnsRef::Cni,
            controller: None,
            capture_exclusions: Default::default(),
        })
    }

    fn destination() -> RouteDestination {
        RouteDestination {
            service: WaypointRef {
                namespace: "shop".into(),
                name: "reviews".into(),
            },
            port: None,
            subset: None,
            weight: 1,
            headers: Default::default(),
        }
    }

    fn by_header() -> LoadBalancer {
        LoadBalancer::ConsistentHash(ConsistentHash {
            key: HashKey::Header("x-user".into()),
            table_size: 65537,
        })
    }

    fn input(headers: &HeaderMap) -> HashInput<'_> {
        HashInput {
            headers,
            query: None,
            source: IpAddr::from([10, 10, 0, 2]),
        }
    }

    fn user(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(key).unwrap());
        h
    }

    /// Every endpoint owns its share of a Maglev table within one slot, so keys spread evenly.
    #[test]
    fn maglev_slots_are_shared_evenly() {
        for n in [1, 2, 3, 7, 10] {
            let names: Vec<String> = (0..n).map(|i| format!("shop/e{i}")).collect();
            let table = Maglev::new(names, 65537);
            let mut owned = vec![0usize; n];
            for &slot in &table.slots {
                owned[slot as usize] += 1;
            }
            let (min, max) = (owned.iter().min().unwrap(), owned.iter().max().unwrap());
            assert!(max - min <= 1, "{n} endpoints: {owned:?}");
        }
    }

    /// A key stays on one endpoint; adding a fourth endpoint to three moves about a quarter of
    /// the keys (all to the new one), removing it moves them back. Bound: Maglev moves the new
    /// endpoint's 1/4 of the slots plus a small disruption; over 10,000 keys the moved share
    /// must be within [0.20, 0.32] (a modulo hash would move ~3/4).
    #[test]
    fn consistent_hash_is_sticky_and_moves_about_one_nth_of_keys() {
        const KEYS: usize = 10_000;
        let balancer = Balancer::default();
        let (policy, dest) = (by_header(), destination());
        let three: Vec<_> = ["e0", "e1", "e2"].into_iter().map(endpoint).collect();
        let mut four = three.clone();
        four.push(endpoint("e3"));
        let owner = |endpoints: &[Arc<Workload>], key: &str| {
            let h = user(key);
            balancer
                .pick(&policy, &dest, endpoints, input(&h))
                .unwrap()
                .endpoint
                .name
                .clone()
        };
        let before: Vec<String> = (0..KEYS).map(|k| owner(&three, &format!("u{k}"))).collect();
        // Sticky: the same key, again and again, the same endpoint.
        for (k, first) in before.iter().enumerate().take(100) {
            for _ in 0..20 {
                assert_eq!(&owner(&three, &format!("u{k}")), first);
            }
        }
        // Spread: each of three endpoints has about a third.
        for e in ["e0", "e1", "e2"] {
            let share = before.iter().filter(|o| *o == e).count() as f64 / KEYS as f64;
            assert!((0.30..0.37).contains(&share), "{e}: {share}");
        }
        let after: Vec<String> = (0..KEYS).map(|k| owner(&four, &format!("u{k}"))).collect();
        let moved: Vec<usize> = (0..KEYS).filter(|&k| before[k] != after[k]).collect();
        let share = moved.len() as f64 / KEYS as f64;
        eprintln!("adding a 4th endpoint moved {share:.3} of {KEYS} keys");
        assert!((0.20..=0.32).contains(&share), "moved {share}");
        let to_new = moved.iter().filter(|&&k| after[k] == "e3").count();
        assert!(
            to_new as f64 >= 0.9 * moved.len() as f64,
            "{to_new} of {} moved keys went to the new endpoint",
            moved.len()
        );
        let back: Vec<String> = (0..KEYS).map(|k| owner(&three, &format!("u{k}"))).collect();
        assert_eq!(back, before);
    }

    #[test]
    fn other_hash_keys_and_the_fallbacks() {
        let balancer = Balancer::default();
        let dest = destination();
        let endpoints: Vec<_> = (0..5).map(|i| endpoint(&format!("e{i}"))).collect();
        let policy = |key| {
            LoadBalancer::ConsistentHash(ConsistentHash {
                key,
                table_size: 65537,
            })
        };
        let pick = |policy: &LoadBalancer, input: HashInput<'_>| {
            let p = balancer.pick(policy, &dest, &endpoints, input).unwrap();
            (p.endpoint.name.clone(), p.set_cookie)
        };
        // Source IP: one client, one endpoint.
        let none = HeaderMap::new();
        let by_ip = policy(HashKey::SourceIp);
        let first = pick(&by_ip, input(&none)).0;
        for _ in 0..50 {
            assert_eq!(pick(&by_ip, input(&none)).0, first);
        }
        // A query parameter.
        let by_query = policy(HashKey::QueryParameter("session".into()));
        let q = |query| HashInput {
            headers: &none,
            query: Some(query),
            source: IpAddr::from([10, 0, 0, 1]),
        };
        let first = pick(&by_query, q("a=1&session=abc")).0;
        for _ in 0..50 {
            assert_eq!(pick(&by_query, q("session=abc&b=2")).0, first);
        }
        // A cookie: read among others; without a ttl and without the cookie, random and no
        // Set-Cookie; with a ttl, created, and the created value then keeps its endpoint.
        let mut cookies = HeaderMap::new();
        cookies.insert("cookie", HeaderValue::from_static("a=1; sticky=xyz; b=2"));
        let no_ttl = policy(HashKey::Cookie {
            name: "sticky".into(),
            path: None,
            ttl_seconds: None,
        });
        let first = pick(&no_ttl, input(&cookies)).0;
        for _ in 0..50 {
            assert_eq!(pick(&no_ttl, input(&cookies)), (first.clone(), None));
        }
        let seen: std::collections::BTreeSet<String> =
            (0..200).map(|_| pick(&no_ttl, input(&none)).0).collect();
        assert!(seen.len() > 1, "without the key the pick must not be fixed");
        let ttl = policy(HashKey::Cookie {
            name: "sticky".into(),
            path: Some("/".into()),
            ttl_seconds: Some(3600),
        });
        let (chosen, set) = pick(&ttl, input(&none));
        let set = set.expect("a cookie with a ttl is created");
        assert!(
            set.starts_with("sticky=") && set.ends_with("; Max-Age=3600; Path=/; HttpOnly"),
            "{set}"
        );
        let value = set.split(';').next().unwrap();
        let mut back = HeaderMap::new();
        back.insert("cookie", HeaderValue::from_str(value).unwrap());
        for _ in 0..20 {
            assert_eq!(pick(&ttl, input(&back)), (chosen.clone(), None));
        }
    }

    #[test]
    fn least_request_prefers_the_endpoint_with_fewer_in_flight() {
        let balancer = Balancer::default();
        let dest = destination();
        let endpoints: Vec<_> = ["slow", "a", "b"].into_iter().map(endpoint).collect();
        let none = HeaderMap::new();
        // Hold 5 requests at "slow".
        let held: Vec<InFlight> = (0..5).map(|_| balancer.start(&endpoints[0])).collect();
        assert_eq!(balancer.load(&endpoints[0]), 5);
        let mut to_slow = 0;
        for _ in 0..300 {
            let pick = balancer
                .pick(&LoadBalancer::LeastRequest, &dest, &endpoints, input(&none))
                .unwrap();
            if pick.endpoint.name == "slow" {
                to_slow += 1;
            }
            // Dropped at once: a and b stay at 0 in flight.
        }
        // Of two distinct endpoints drawn, "slow" loses to either other: never picked.
        assert_eq!(to_slow, 0);
        drop(held);
        assert_eq!(balancer.load(&endpoints[0]), 0);
        // Round robin cycles, random covers all.
        let rr: Vec<String> = (0..6)
            .map(|_| {
                balancer
                    .pick(&LoadBalancer::RoundRobin, &dest, &endpoints, input(&none))
                    .unwrap()
                    .endpoint
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(rr, ["slow", "a", "b", "slow", "a", "b"]);
        let random: std::collections::BTreeSet<String> = (0..200)
            .map(|_| {
                balancer
                    .pick(&LoadBalancer::Random, &dest, &endpoints, input(&none))
                    .unwrap()
                    .endpoint
                    .name
                    .clone()
            })
            .collect();
        assert_eq!(random.len(), 3);
        assert!(
            balancer
                .pick(&LoadBalancer::Random, &dest, &[], input(&none))
                .is_none()
        );
    }
}
