//! Inbound admission: the one decision that lets a connection into a pod, taken when the
//! connection is accepted and taken again, while it is open, on every change of the mesh state.
//!
//! A policy change must reach connections already open: a DENY applied during a long transfer
//! would otherwise leave the transfer running. ztunnel closes the connections a change no
//! longer allows (its `ConnectionManager` and `PolicyWatcher`); so does Ambit:
//!
//! - Every inbound connection (an HBONE stream on 15008, a plaintext connection on 15006) is
//!   registered in [`OpenConnections`] with the inputs of its decision ([`Inbound`]: source
//!   address and verified identity, the address and port dialled, the pod) *before* the
//!   accept path reads the state it decides with. So a state published while the connection is
//!   being admitted is either the one it was decided with, or one the re-evaluation sees it
//!   under: no change slips between the two.
//! - The [`Admission`] the connection's task holds removes the entry when dropped, however the
//!   connection ends (refused, finished, failed, task aborted): the registry holds what is open
//!   and nothing else. One registration per connection: one short lock of one shard, never
//!   held across I/O.
//! - On every new [`MeshState`] the agent receives, whichever its source (mesh file or
//!   Kubernetes), [`reevaluate_on_change`] decides every registered connection again with
//!   [`decide`], the function the accept paths use, against the destination workload as it is
//!   now (its current labels), and signals those now denied. Their task stops relaying (see
//!   [`crate::relay::relay_until`]), which closes both sides, logs the access record with why and
//!   counts it in `ambit_connections_closed_by_policy_total`.
//! - Dry-run policies never take part in a decision, so they never cut anything. A connection
//!   whose destination pod is no longer an enrolled workload (un-enrolled, or gone from the
//!   state) is left alone: enrolment says nothing about policy, and un-enrolment never cuts
//!   what is open.
//!
//! The re-evaluation must not stall the accept paths: each shard is copied out under its lock
//! (pointers only), decided without any lock held, and only the connections to close are
//! removed under the lock again; the task yields between shards.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::sync::{oneshot, watch};
use tracing::{debug, info};

use crate::{
    identity::SpiffeId,
    policy::{Admission, ConnectionInfo, Decision, PeerAuthMode, Refusal},
    state::{MeshState, Workload},
};

/// The inputs of an inbound connection's authorization, kept while it is open so that it can
/// be decided again exactly as it was when accepted.
#[derive(Debug)]
pub struct Inbound {
    /// The client's address (for HBONE, the TCP peer of the tunnel's connection).
    pub src_ip: IpAddr,
    /// The client's verified identity (HBONE); `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    /// The pod address and port the client dialled.
    pub dst: SocketAddr,
    /// The enrolled pod that accepted the connection.
    pub pod: Arc<Workload>,
}

impl Inbound {
    /// A tunnel from `identity` at `src_ip` to `dst` in `pod`.
    pub fn hbone(src_ip: IpAddr, identity: SpiffeId, dst: SocketAddr, pod: Arc<Workload>) -> Self {
        Self {
            src_ip,
            src_identity: Some(identity),
            dst,
            pod,
        }
    }

    /// A plaintext connection from `src_ip` to `dst` in `pod`.
    pub fn plaintext(src_ip: IpAddr, dst: SocketAddr, pod: Arc<Workload>) -> Self {
        Self {
            src_ip,
            src_identity: None,
            dst,
            pod,
        }
    }
}

/// The outcome of [`decide`].
#[derive(Debug)]
pub struct Verdict {
    /// `Ok` to let the connection in (or keep it open).
    pub allowed: Result<(), Refusal>,
    /// What the authorization policies decided, when they were asked (plaintext refused by
    /// STRICT never gets that far); the accept path reports its dry-run part.
    pub policy: Option<Decision>,
}

/// Decides an inbound connection to `workload` under `state`: a plaintext one must find the
/// workload PERMISSIVE, then the authorization policies (DENY, then ALLOW; dry-run ones aside)
/// must allow it. The same function decides at accept and on every re-evaluation.
pub fn decide(state: &MeshState, conn: &Inbound, workload: &Workload) -> Verdict {
    if conn.src_identity.is_none() && state.peer_auth_mode(workload) == PeerAuthMode::Strict {
        return Verdict {
            allowed: Err(Refusal {
                reason: "plaintext_strict",
                message: "STRICT peer authentication: plaintext refused".into(),
            }),
            policy: None,
        };
    }
    let decision = state.policies().authorize(&ConnectionInfo {
        src_ip: conn.src_ip,
        src_identity: conn.src_identity.as_ref(),
        dst_workload: workload.policy_target(),
        dst_ip: conn.dst.ip(),
        dst_port: conn.dst.port(),
    });
    let allowed = if decision.allowed {
        Ok(())
    } else {
        Err(Refusal {
            reason: decision.reason.label(),
            message: decision.reason.to_string(),
        })
    };
    Verdict {
        allowed,
        policy: Some(decision),
    }
}

/// The accept paths' decision: [`decide`], logging what dry-run policies would have done. The
/// path's exit counts a refusal ([`super::record`], or the HBONE handler).
pub fn check(state: &MeshState, conn: &Inbound, workload: &Workload) -> Result<(), Refusal> {
    let verdict = decide(state, conn, workload);
    if let Some(decision) = &verdict.policy
        && let Some(dry_run) = &decision.dry_run
        && (!dry_run.matched.is_empty() || dry_run.allowed != decision.allowed)
    {
        let matched: Vec<String> = dry_run.matched.iter().map(|p| p.to_string()).collect();
        tracing::info!(
            target: "policy",
            dst_workload = %workload.uid(),
            src = %conn.src_ip,
            src_principal = conn.src_identity.as_ref().map(|id| id.to_string()),
            would_allow = dry_run.allowed,
            reason = %dry_run.reason,
            ?matched,
            "dry-run policy"
        );
    }
    verdict.allowed
}

/// Shards of the registry: registrations of different connections rarely wait on each other,
/// and a re-evaluation holds one shard's lock only while copying it out.
const SHARDS: usize = 32;
/// A shard's map is shrunk once it is used at less than a quarter, so memory taken by a burst
/// of connections comes back; not below this capacity (twice it, as the map rounds up).
const MIN_SHARD_CAPACITY: usize = 64;

struct Entry {
    conn: Arc<Inbound>,
    close: oneshot::Sender<Refusal>,
}

type Shard = HashMap<u64, Entry>;

/// The inbound connections open on this node, with what each was admitted on.
pub struct OpenConnections {
    shards: Box<[Mutex<Shard>]>,
    next_id: AtomicU64,
}

impl Default for OpenConnections {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for OpenConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenConnections")
            .field("open", &self.len())
            .finish()
    }
}

/// What one pass of [`OpenConnections::reevaluate`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reevaluation {
    /// Connections decided again.
    pub checked: usize,
    /// Connections left alone because their destination pod is no longer an enrolled workload.
    pub skipped: usize,
    /// Connections now denied and signalled to close.
    pub closed: usize,
}

impl std::ops::AddAssign for Reevaluation {
    fn add_assign(&mut self, other: Self) {
        self.checked += other.checked;
        self.skipped += other.skipped;
        self.closed += other.closed;
    }
}

/// A lock that survives a panic elsewhere: the maps stay consistent (no code panics while
/// holding one), and a connection's drop must never panic.
fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

fn shrink(shard: &mut Shard) {
    if shard.capacity() > 2 * MIN_SHARD_CAPACITY && shard.len() * 4 < shard.capacity() {
        shard.shrink_to((shard.len() * 2).max(MIN_SHARD_CAPACITY));
    }
}

impl OpenConnections {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, id: u64) -> &Mutex<Shard> {
        &self.shards[(id % SHARDS as u64) as usize]
    }

    /// Registers a connection about to be decided; it stays registered until the returned
    /// [`Admission`] is dropped (or a re-evaluation closes it).
    pub fn register(self: &Arc<Self>, conn: Arc<Inbound>) -> Admission {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (close, revoked) = oneshot::channel();
        lock(self.shard(id)).insert(id, Entry { conn, close });
        Admission::revocable(
            revoked,
            Registered {
                registry: self.clone(),
                id,
            },
        )
    }

    fn remove(&self, id: u64) {
        let mut shard = lock(self.shard(id));
        shard.remove(&id);
        shrink(&mut shard);
    }

    /// Connections registered now.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).len()).sum()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every open connection again under `state` and signals those now denied to
    /// close, in one go (see [`reevaluate_on_change`] for the agent's pass, which yields).
    pub fn reevaluate(&self, state: &MeshState) -> Reevaluation {
        let mut uids = UidIndex::default();
        let mut done = Reevaluation::default();
        for shard in &self.shards {
            done += reevaluate_shard(shard, state, &mut uids);
        }
        done
    }
}

/// One shard's part of a re-evaluation. Its lock is held to copy out the entries (pointers)
/// and to remove those to close, never while deciding.
fn reevaluate_shard<'s>(
    shard: &Mutex<Shard>,
    state: &'s MeshState,
    uids: &mut UidIndex<'s>,
) -> Reevaluation {
    let open: Vec<(u64, Arc<Inbound>)> = lock(shard)
        .iter()
        .map(|(id, entry)| (*id, entry.conn.clone()))
        .collect();
    let mut done = Reevaluation {
        checked: open.len(),
        ..Default::default()
    };
    let mut closing = Vec::new();
    for (id, conn) in &open {
        let Some(workload) = current_destination(state, conn, uids) else {
            done.skipped += 1;
            continue;
        };
        if let Err(refusal) = decide(state, conn, workload).allowed {
            closing.push((*id, refusal));
        }
    }
    if !closing.is_empty() {
        let mut shard = lock(shard);
        for (id, refusal) in closing {
            // Gone already when the connection ended meanwhile; a failed send likewise means
            // it is ending on its own.
            if let Some(entry) = shard.remove(&id)
                && entry.close.send(refusal).is_ok()
            {
                done.closed += 1;
            }
        }
        shrink(&mut shard);
    }
    done
}

/// The workloads of a state by `(namespace, name)`, built on first use in a pass: only a
/// connection whose address no longer leads to its pod needs it.
#[derive(Default)]
struct UidIndex<'s>(Option<HashMap<(&'s str, &'s str), &'s Arc<Workload>>>);

impl<'s> UidIndex<'s> {
    fn get(&mut self, state: &'s MeshState, pod: &Workload) -> Option<&'s Arc<Workload>> {
        let index = self.0.get_or_insert_with(|| {
            state
                .workloads()
                .iter()
                .map(|w| ((w.namespace.as_str(), w.name.as_str()), w))
                .collect()
        });
        index
            .get(&(pod.namespace.as_str(), pod.name.as_str()))
            .copied()
    }
}

/// The destination pod of `conn` as `state` has it now (its current labels decide which
/// policies apply), found by the address dialled as at accept, else by name; `None` when it is
/// no longer an enrolled workload, which leaves the connection alone.
fn current_destination<'s>(
    state: &'s MeshState,
    conn: &Inbound,
    uids: &mut UidIndex<'s>,
) -> Option<&'s Arc<Workload>> {
    let same_pod = |w: &Workload| w.name == conn.pod.name && w.namespace == conn.pod.namespace;
    let workload = match state.workload_by_ip(conn.dst.ip()) {
        Some(workload) if same_pod(workload) => workload,
        _ => uids.get(state, &conn.pod)?,
    };
    workload.enrolled.then_some(workload)
}

/// Re-evaluates the open connections on every new state `states` publishes, until the channel
/// closes. States published during a pass are coalesced: the next pass uses the latest. A state
/// `states` has not marked seen yet gets a pass at once (so none published before this task
/// first runs is missed).
pub async fn reevaluate_on_change(
    connections: Arc<OpenConnections>,
    mut states: watch::Receiver<Arc<MeshState>>,
) {
    while states.changed().await.is_ok() {
        let state = states.borrow_and_update().clone();
        let started = Instant::now();
        let mut uids = UidIndex::default();
        let mut done = Reevaluation::default();
        for shard in &connections.shards {
            done += reevaluate_shard(shard, &state, &mut uids);
            // Let accepts and relays in between: a pass over many connections takes a while.
            tokio::task::yield_now().await;
        }
        let elapsed_ms = started.elapsed().as_secs_f64() * 1e3;
        if done.closed > 0 {
            info!(
                checked = done.checked,
                skipped = done.skipped,
                closed = done.closed,
                elapsed_ms,
                "configuration changed: open inbound connections no longer allowed are being closed"
            );
        } else {
            debug!(
                checked = done.checked,
                skipped = done.skipped,
                elapsed_ms,
                "configuration changed: open inbound connections re-evaluated"
            );
        }
    }
}

/// A connection's entry in the registry, removed when its [`Admission`] is dropped.
#[derive(Debug)]
struct Registered {
    registry: Arc<OpenConnections>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

#[cfg(test)]
mod tests;
