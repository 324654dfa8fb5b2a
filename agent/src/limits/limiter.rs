//! A counter of something shared, with a cap on the whole and a cap per key (per source).
//!
//! Slots are taken with [`Limiter::try_acquire`], which never waits: a connection over a limit
//! is refused at once, so a flood queues nowhere in the agent. The [`Permit`] gives its slot
//! back when dropped, however the connection ends (panic included). A permit may hold several
//! slots at once ([`Limiter::try_acquire_many`]): the relay's buffer budget counts bytes.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex, MutexGuard},
};

/// Which cap refused a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exceeded {
    /// Every slot is taken.
    #[error("the limit of {0} is reached")]
    Total(usize),
    /// The key holds its share already.
    #[error("the limit of {0} per source is reached")]
    PerKey(usize),
}

/// A cap of `total` slots, of which one key may hold at most `per_key`. Cheap to clone; clones
/// share their slots.
pub struct Limiter<K> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for Limiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<K> {
    total: usize,
    per_key: usize,
    state: Mutex<State<K>>,
}

struct State<K> {
    used: usize,
    /// Keys holding at least one slot: the map never outgrows the slots in use.
    by_key: HashMap<K, usize>,
}

impl<K> Shared<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        // Plain counters: consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter of `total` slots, at most `per_key` of them for one key.
    pub fn new(total: usize, per_key: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                total,
                per_key: per_key.min(total),
                state: Mutex::new(State {
                    used: 0,
                    by_key: HashMap::new(),
                }),
            }),
        }
    }

    /// Takes a slot for `key`, or says which cap stands in the way. The per-key cap is checked
    /// first: a source over its share is told so even when the whole is full too.
    pub fn try_acquire(&self, key: K) -> Result<Permit<K>, Exceeded> {
        self.try_acquire_many(key, 1)
    }

    /// Takes `n` slots at once for `key` (all or none), as [`Limiter::try_acquire`] takes one.
    pub fn try_acquire_many(&self, key: K, n: usize) -> Result<Permit<K>, Exceeded> {
        let shared = &self.shared;
        let mut state = shared.lock();
        let held = state.by_key.get(&key).copied().unwrap_or(0);
        if held.saturating_add(n) > shared.per_key {
            return Err(Exceeded::PerKey(shared.per_key));
        }
        if state.used.saturating_add(n) > shared.total {
            return Err(Exceeded::Total(shared.total));
        }
        state.used += n;
        *state.by_key.entry(key.clone()).or_insert(0) += n;
        drop(state);
        Ok(Permit {
            shared: self.shared.clone(),
            key,
            n,
        })
    }

    /// The cap per key.
    #[cfg(test)]
    fn per_key(&self) -> usize {
        self.shared.per_key
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        self.shared.lock().used
    }

    /// Slots `key` holds.
    #[cfg(test)]
    fn held_by(&self, key: &K) -> usize {
        self.shared.lock().by_key.get(key).copied().unwrap_or(0)
    }

    /// How many keys hold a slot.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.shared.lock().by_key.len()
    }
}

/// Slots of a [`Limiter`] (one, or `n` from [`Limiter::try_acquire_many`]), given back on drop.
pub struct Permit<K: Hash + Eq> {
    shared: Arc<Shared<K>>,
    key: K,
    n: usize,
}

impl<K: Hash + Eq> std::fmt::Debug for Permit<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Permit")
    }
}

impl<K: Hash + Eq> Drop for Permit<K> {
    fn drop(&mut self) {
        let mut state = self.shared.lock();
        state.used -= self.n;
        if let Some(held) = state.by_key.get_mut(&self.key) {
            *held -= self.n;
            if *held == 0 {
                state.by_key.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_gets_its_share_and_no_more() {
        let limiter = Limiter::new(10, 3);
        let a: Vec<_> = (0..3).map(|_| limiter.try_acquire("a").unwrap()).collect();
        assert_eq!(limiter.try_acquire("a").unwrap_err(), Exceeded::PerKey(3));
        // Another key is not affected by the first one's share.
        let b = limiter.try_acquire("b").unwrap();
        assert_eq!((limiter.in_use(), limiter.held_by(&"a")), (4, 3));
        drop(a);
        assert_eq!((limiter.in_use(), limiter.held_by(&"a")), (1, 0));
        assert_eq!(limiter.keys(), 1, "a key with no slot is forgotten");
        let _again = limiter.try_acquire("a").unwrap();
        drop(b);
        assert_eq!(limiter.keys(), 1);
    }

    #[test]
    fn many_slots_are_taken_all_or_none_and_given_back_together() {
        let limiter = Limiter::new(100, 40);
        let a = limiter.try_acquire_many("a", 30).unwrap();
        // 30 + 20 would pass the share of 40: nothing is taken.
        assert_eq!(
            limiter.try_acquire_many("a", 20).unwrap_err(),
            Exceeded::PerKey(40)
        );
        assert_eq!(limiter.held_by(&"a"), 30);
        let _b = limiter.try_acquire_many("b", 40).unwrap();
        let _c = limiter.try_acquire_many("c", 25).unwrap();
        assert_eq!(
            limiter.try_acquire_many("d", 6).unwrap_err(),
            Exceeded::Total(100)
        );
        let _d = limiter.try_acquire_many("d", 5).unwrap();
        drop(a);
        assert_eq!((limiter.in_use(), limiter.held_by(&"a")), (70, 0));
        assert_eq!(limiter.keys(), 3);
    }

    #[test]
    fn the_whole_is_capped_across_keys() {
        let limiter = Limiter::new(4, 2);
        let held: Vec<_> = ["a", "a", "b", "b"]
            .into_iter()
            .map(|k| limiter.try_acquire(k).unwrap())
            .collect();
        assert_eq!(limiter.try_acquire("c").unwrap_err(), Exceeded::Total(4));
        // Over its share and the whole is full too: the share is what it is told.
        assert_eq!(limiter.try_acquire("a").unwrap_err(), Exceeded::PerKey(2));
        drop(held);
        assert_eq!(limiter.in_use(), 0);
        assert!(limiter.try_acquire("c").is_ok());
    }

    #[test]
    fn clones_share_slots_and_per_key_never_exceeds_total() {
        let limiter = Limiter::new(2, 5);
        assert_eq!(limiter.per_key(), 2);
        let other = limiter.clone();
        let _a = limiter.try_acquire(1).unwrap();
        let _b = other.try_acquire(2).unwrap();
        assert_eq!(limiter.try_acquire(3).unwrap_err(), Exceeded::Total(2));
        assert_eq!(other.in_use(), 2);
    }

    #[test]
    fn slots_come_back_when_holders_panic_or_move_across_threads() {
        let limiter = Limiter::new(100, 100);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let limiter = limiter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        let permit = limiter.try_acquire(i % 3).unwrap();
                        drop(permit);
                    }
                    let _held = limiter.try_acquire(i % 3).unwrap();
                    if i == 0 {
                        panic!("holder panics");
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        assert_eq!((limiter.in_use(), limiter.keys()), (0, 0));
    }
}
