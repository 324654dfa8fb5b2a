//! The certificate manager: one certificate for each identity this node needs, no more.
//!
//! The agent tells the manager which identities its pods run as ([`CertificateManager::set_wanted`],
//! called whenever the state changes). For each new identity a background task fetches a
//! certificate at once, then renews it at half of its remaining lifetime. When the CA cannot
//! be reached the current certificate is kept (until it expires) and the task retries with
//! exponential backoff and jitter. When an identity is no longer wanted its task stops and its
//! certificate, key included, is dropped: the agent never holds the key of an identity that
//! has no pod on its node. (A connection already established with that certificate keeps its
//! own reference until it ends.)
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{SpiffeId, WorkloadCertificate, client::CaClient};
use crate::{backoff::Backoff, timefmt::rfc3339};

/// Default lifetime asked for workload certificates.
pub const DEFAULT_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

/// How the manager asks for and renews certificates.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Lifetime asked of the CA (which may grant less).
    pub ttl: Duration,
    /// First retry delay after a failure.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            ttl: DEFAULT_CERT_TTL,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Why [`CertificateManager::wait_for`] returned without a certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    /// The identity is not (or no longer) wanted on this node.
    #[error("no certificate is wanted for {0} on this node")]
    NotWanted(SpiffeId),
    /// No valid certificate arrived in time.
    #[error("no certificate for {0} within {1:?}")]
    Timeout(SpiffeId, Duration),
}

/// Counters and gauges of the manager, for metrics and the admin endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagerStats {
    /// Failed CA calls since start (each retry counts).
    pub ca_errors_total: u64,
    /// Certificates received since start (first fetches and renewals).
    pub certificates_issued_total: u64,
    /// Identities wanted now.
    pub wanted: usize,
    /// Wanted identities holding a valid certificate.
    pub held: usize,
    /// Wanted identities still without a valid certificate.
    pub pending: usize,
    /// The earliest expiry among the certificates held.
    pub earliest_expiry: Option<SystemTime>,
}

/// One wanted identity, for the admin endpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// The identity.
    pub id: String,
    /// Start of the current certificate's validity.
    pub not_before: Option<String>,
    /// End of the current certificate's validity.
    pub not_after: Option<String>,
    /// Serial number of the current certificate (hex).
    pub serial: Option<String>,
    /// The last CA error since the last success.
    pub last_error: Option<String>,
}

/// Shared by the manager and its tasks (not the entries: dropping the manager must stop the
/// tasks, so they must not keep the entry map alive).
struct Shared {
    client: CaClient,
    config: ManagerConfig,
    ca_errors: AtomicU64,
    issued: AtomicU64,
}

/// One identity's slot: the current certificate and the task keeping it fresh.
struct Entry {
    cert: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
    _task: AbortOnDrop,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Fetches, renews and drops the certificates of this node's identities. Cheap to clone.
#[derive(Clone)]
pub struct CertificateManager {
    shared: Arc<Shared>,
    entries: Arc<Mutex<BTreeMap<SpiffeId, Entry>>>,
}

impl fmt::Debug for CertificateManager {
    // Identities only: certificates hold keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let wanted: Vec<String> = self.lock().keys().map(ToString::to_string).collect();
        f.debug_struct("CertificateManager")
            .field("config", &self.shared.config)
            .field("wanted", &wanted)
            .finish_non_exhaustive()
    }
}

impl CertificateManager {
    /// A manager getting certificates from `client`; it wants nothing until told.
    pub fn new(client: CaClient, config: ManagerConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                client,
                config,
                ca_errors: AtomicU64::new(0),
                issued: AtomicU64::new(0),
            }),
            entries: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<SpiffeId, Entry>> {
        // A panic elsewhere while holding the lock leaves a consistent map: keep going.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the identities this node needs: fetching starts at once for new ones, and the
    /// certificates (and keys) of those no longer listed are dropped. Must be called from
    /// within a Tokio runtime.
    pub fn set_wanted(&self, wanted: BTreeSet<SpiffeId>) {
        let mut entries = self.lock();
        entries.retain(|id, _| {
            let keep = wanted.contains(id);
            if !keep {
                info!(identity = %id, "certificate dropped: no pod of this identity on the node");
            }
            keep
        });
        for id in wanted {
            if entries.contains_key(&id) {
                continue;
            }
            let (cert, _) = watch::channel(None);
            let last_error = Arc::default();
            let task = tokio::spawn(keep_fresh(
                Arc::clone(&self.shared),
                id.clone(),
                cert.clone(),
                Arc::clone(&last_error),
            ));
            entries.insert(
                id,
                Entry {
                    cert,
                    last_error,
                    _task: AbortOnDrop(task),
                },
            );
        }
    }

    /// The identities wanted now.
    pub fn wanted(&self) -> BTreeSet<SpiffeId> {
        self.lock().keys().cloned().collect()
    }

    /// The current, unexpired certificate of `id`, if it is wanted and has one.
    pub fn get(&self, id: &SpiffeId) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.lock();
        let cert = entries.get(id)?.cert.borrow().clone()?;
        valid_now(&cert).then_some(cert)
    }

    /// Waits up to `timeout` for a valid certificate of `id` (e.g. for a pod that just
    /// appeared). Fails at once if `id` is not wanted, or as soon as it stops being wanted.
    pub async fn wait_for(
        &self,
        id: &SpiffeId,
        timeout: Duration,
    ) -> Result<Arc<WorkloadCertificate>, WaitError> {
        let mut rx = match self.lock().get(id) {
            Some(entry) => entry.cert.subscribe(),
            None => return Err(WaitError::NotWanted(id.clone())),
        };
        let wait = rx.wait_for(|cert| cert.as_ref().is_some_and(valid_now));
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(cert)) => Ok(Arc::clone(cert.as_ref().expect("checked by wait_for"))),
            // The sender went away: the identity was dropped.
            Ok(Err(_)) => Err(WaitError::NotWanted(id.clone())),
            Err(_) => Err(WaitError::Timeout(id.clone(), timeout)),
        }
    }

    /// Counters and gauges.
    pub fn stats(&self) -> ManagerStats {
        let entries = self.lock();
        let held: Vec<Arc<WorkloadCertificate>> = entries
            .values()
            .filter_map(|e| e.cert.borrow().clone())
            .filter(valid_now)
            .collect();
        ManagerStats {
            ca_errors_total: self.shared.ca_errors.load(Ordering::Relaxed),
            certificates_issued_total: self.shared.issued.load(Ordering::Relaxed),
            wanted: entries.len(),
            held: held.len(),
            pending: entries.len() - held.len(),
            earliest_expiry: held.iter().map(|c| c.not_after).min(),
        }
    }

    /// The end of validity of each certificate held (expired ones included, until dropped).
    pub fn expiries(&self) -> Vec<(SpiffeId, SystemTime)> {
        self.lock()
            .iter()
            .filter_map(|(id, entry)| Some((id.clone(), entry.cert.borrow().as_ref()?.not_after)))
            .collect()
    }

    /// Every wanted identity with its certificate's validity and serial, and its last error.
    pub fn certificates(&self) -> Vec<CertificateStatus> {
        self.lock()
            .iter()
            .map(|(id, entry)| {
                let cert = entry.cert.borrow().clone();
                CertificateStatus {
                    id: id.to_string(),
                    not_before: cert.as_ref().map(|c| rfc3339(c.not_before)),
                    not_after: cert.as_ref().map(|c| rfc3339(c.not_after)),
                    serial: cert.as_deref().and_then(serial_hex),
                    last_error: entry
                        .last_error
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone(),
                }
            })
            .collect()
    }
}

fn valid_now(cert: &Arc<WorkloadCertificate>) -> bool {
    SystemTime::now() < cert.not_after
}

/// The leaf's serial number in hex.
pub fn serial_hex(cert: &WorkloadCertificate) -> Option<String> {
    let (_, leaf) = X509Certificate::from_der(cert.chain.first()?).ok()?;
    Some(leaf.raw_serial_as_string().replace(':', ""))
}

/// The retry delays after failed CA calls: from `initial_backoff`, doubling up to
/// `max_backoff`, each drawn uniformly from [d/2, d] so that agents that lost the CA together
/// do not retry together, and none exceeds the cap.
fn retry_backoff(config: &ManagerConfig) -> Backoff {
    Backoff::new(config.initial_backoff, config.max_backoff).with_jitter(0.5..=1.0)
}

/// Keeps `id`'s certificate fresh until aborted.
async fn keep_fresh(
    shared: Arc<Shared>,
    id: SpiffeId,
    cert_tx: watch::Sender<Option<Arc<WorkloadCertificate>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut backoff = retry_backoff(&shared.config);
    loop {
        match shared.client.fetch(&id, shared.config.ttl).await {
            Ok(cert) => {
                backoff.reset();
                shared.issued.fetch_add(1, Ordering::Relaxed);
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                let now = SystemTime::now();
                // Half of the remaining lifetime: the certificate's notBefore is backdated, so
                // half of its nominal lifetime would come too late for short lifetimes.
                let renew_in = (cert.not_after.duration_since(now).unwrap_or_default() / 2)
                    .max(Duration::from_millis(500));
                info!(
                    identity = %id,
                    serial = serial_hex(&cert).unwrap_or_default(),
                    not_after = %rfc3339(cert.not_after),
                    renew_in = ?renew_in,
                    "workload certificate received"
                );
                cert_tx.send_replace(Some(Arc::new(cert)));
                tokio::time::sleep(renew_in).await;
            }
            Err(e) => {
                shared.ca_errors.fetch_add(1, Ordering::Relaxed);
                *last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                let current = cert_tx.borrow().clone();
                let holding = match current {
                    Some(cert) if valid_now(&cert) => Some(cert.not_after),
                    Some(_) => {
                        // An expired certificate proves nothing: stop offering it.
                        warn!(identity = %id, "workload certificate expired before it could be renewed");
                        cert_tx.send_replace(None);
                        None
                    }
                    None => None,
                };
                let delay = backoff.next_delay();
                match holding {
                    Some(not_after) => warn!(
                        identity = %id,
                        retry_in = ?delay,
                        keeping_until = %rfc3339(not_after),
                        "cannot renew the workload certificate, keeping the current one: {e}"
                    ),
                    None => warn!(
                        identity = %id,
                        retry_in = ?delay,
                        "cannot get a workload certificate: {e}"
                    ),
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        identity::CaClient,
        testing::ca::{TOKEN_A, TestCaServer, id},
    };

    fn manager(ca: &TestCaServer, ttl: Duration) -> CertificateManager {
        let config = ManagerConfig {
            ttl,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
        };
        CertificateManager::new(CaClient::new(ca.client_config(TOKEN_A)).unwrap(), config)
    }

    fn serial(cert: &WorkloadCertificate) -> String {
        serial_hex(cert).unwrap()
    }

    /// Polls `check` every 100 ms for up to `limit`.
    async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if check() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check()
    }

    #[tokio::test]
    async fn fetches_wanted_identities_and_drops_unwanted_ones() {
        let ca = TestCaServer::start().await;
        let manager = manager(&ca, Duration::from_secs(600));
        let (web, db, pay) = (id("shop", "web"), id("shop", "db"), id("pay", "pay"));
        manager.set_wanted([web.clone(), db.clone()].into());

        let web_cert = manager
            .wait_for(&web, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(web_cert.id, web);
        manager
            .wait_for(&db, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&manager.get(&web).unwrap(), &web_cert));
        let stats = manager.stats();
        assert_eq!((stats.wanted, stats.held, stats.pending), (2, 2, 0));
        assert_eq!(stats.certificates_issued_total, 2);
        assert!(stats.earliest_expiry.is_some());

        // db's last pod left the node: its certificate and key go at once.
        manager.set_wanted([web.clone()].into());
        assert!(manager.get(&db).is_none());
        assert_eq!(
            manager
                .wait_for(&db, Duration::from_secs(1))
                .await
                .unwrap_err(),
            WaitError::NotWanted(db.clone())
        );
        assert_eq!(manager.certificates().len(), 1);
        // web was untouched.
        assert!(Arc::ptr_eq(&manager.get(&web).unwrap(), &web_cert));

        // An identity the CA will not sign for this node stays pending, and errors are counted.
        manager.set_wanted([web.clone(), pay.clone()].into());
        assert!(matches!(
            manager.wait_for(&pay, Duration::from_secs(1)).await,
            Err(WaitError::Timeout(..))
        ));
        let stats = manager.stats();
        assert!(stats.ca_errors_total >= 1, "{stats:?}");
        assert_eq!((stats.wanted, stats.held, stats.pending), (2, 1, 1));
        let pay_status = manager
            .certificates()
            .into_iter()
            .find(|c| c.id == pay.to_string())
            .unwrap();
        assert!(pay_status.last_error.unwrap().contains("PermissionDenied"));

        manager.set_wanted(BTreeSet::new());
        assert!(manager.get(&web).is_none());
        assert_eq!(manager.stats().wanted, 0);
    }

    #[tokio::test]
    async fn renews_at_half_life_before_expiry() {
        let ca = TestCaServer::start().await;
        let manager = manager(&ca, Duration::from_secs(4));
        let web = id("shop", "web");
        manager.set_wanted([web.clone()].into());
        let first = manager
            .wait_for(&web, Duration::from_secs(10))
            .await
            .unwrap();
        let renewed = eventually(Duration::from_secs(10), || {
            manager
                .get(&web)
                .is_some_and(|cert| serial(&cert) != serial(&first))
        })
        .await;
        assert!(renewed, "no renewal");
        assert!(
            SystemTime::now() < first.not_after,
            "renewed only after expiry"
        );
        let second = manager.get(&web).unwrap();
        assert!(second.not_after > first.not_after);
        assert_ne!(
            second.key.secret_der(),
            first.key.secret_der(),
            "a new key per certificate"
        );
    }

    #[tokio::test]
    async fn keeps_the_certificate_while_the_ca_is_down() {
        let mut ca = TestCaServer::start().await;
        let manager = manager(&ca, Duration::from_secs(6));
        let web = id("shop", "web");
        manager.set_wanted([web.clone()].into());
        let first = manager
            .wait_for(&web, Duration::from_secs(10))
            .await
            .unwrap();
        ca.stop().await;

        // The renewal, due after ~3 s, fails: the certificate stays in use.
        let failed = eventually(Duration::from_secs(10), || {
            manager.stats().ca_errors_total > 0
        })
        .await;
        assert!(failed, "no failed renewal");
        let held = manager.get(&web).expect("kept while the CA is down");
        assert_eq!(serial(&held), serial(&first));

        // It is offered until it expires, not after.
        let expired = eventually(Duration::from_secs(10), || manager.get(&web).is_none()).await;
        assert!(expired && SystemTime::now() >= first.not_after);

        // The CA comes back: a new certificate arrives without help.
        ca.resume().await;
        let next = manager
            .wait_for(&web, Duration::from_secs(15))
            .await
            .unwrap();
        assert_ne!(serial(&next), serial(&first));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut backoff = retry_backoff(&ManagerConfig::default());
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        for (n, delay) in delays.iter().enumerate() {
            let base = Duration::from_millis(500 * (1 << n)).min(Duration::from_secs(30));
            assert!(*delay >= base / 2 && *delay <= base, "{n}: {delay:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(500));
    }
}
