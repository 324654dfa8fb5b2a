use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;
use crate::{
    netns::NetnsRef,
    policy::{
        Action, AuthorizationPolicy, Match, Pattern, PeerAuthentication, PolicySet, Rule, Scope,
        Source,
    },
    relay::{Relayed, relay_until},
    state::RedirectSettings,
};

const SERVER_IP: &str = "10.10.1.2";

fn workload(name: &str, ip: &str, labels: &[(&str, &str)], enrolled: bool) -> Workload {
    Workload {
        name: name.into(),
        controller: None,
        namespace: "default".into(),
        service_account: name.into(),
        node: "n1".into(),
        ips: vec![ip.parse().unwrap()],
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        enrolled,
        ready: true,
        netns: NetnsRef::Path(PathBuf::from(format!("/run/netns/{name}"))),
        capture_exclusions: Default::default(),
    }
}

fn server(labels: &[(&str, &str)]) -> Workload {
    workload("server", SERVER_IP, labels, true)
}

fn state_with(
    workloads: Vec<Workload>,
    authorizations: Vec<AuthorizationPolicy>,
    peer: Vec<PeerAuthentication>,
) -> MeshState {
    MeshState::new(RedirectSettings::default(), workloads, Vec::new())
        .with_policies(PolicySet::new(authorizations, peer))
}

fn mesh_wide_mode(mode: PeerAuthMode) -> PeerAuthentication {
    PeerAuthentication {
        name: "mesh".into(),
        scope: Scope::Mesh,
        mode: Some(mode),
    }
}

/// `action` on the workloads labelled `app=server`, for sources with these principals
/// (`None`: every connection).
fn on_server(name: &str, action: Action, principals: Option<&[&str]>) -> AuthorizationPolicy {
    let rule = match principals {
        None => Rule::default(),
        Some(principals) => Rule {
            from: vec![Source {
                principals: Match::new(
                    principals
                        .iter()
                        .map(|p| Pattern::parse(p).unwrap())
                        .collect(),
                    Vec::new(),
                ),
                ..Source::default()
            }],
            ..Rule::default()
        },
    };
    AuthorizationPolicy {
        name: name.into(),
        scope: Scope::new(
            Some("default".into()),
            Some([("app".to_string(), "server".to_string())].into()),
        ),
        action,
        dry_run: false,
        rules: vec![rule],
    }
}

fn principal(sa: &str) -> String {
    format!("cluster.local/ns/default/sa/{sa}")
}

fn hbone_from(sa: &str, pod: &Arc<Workload>) -> Arc<Inbound> {
    Arc::new(Inbound::hbone(
        "10.10.0.2".parse().unwrap(),
        SpiffeId::new("cluster.local", "default", sa),
        format!("{SERVER_IP}:8080").parse().unwrap(),
        pod.clone(),
    ))
}

fn plaintext(pod: &Arc<Workload>) -> Arc<Inbound> {
    Arc::new(Inbound::plaintext(
        "10.10.9.9".parse().unwrap(),
        format!("{SERVER_IP}:8080").parse().unwrap(),
        pod.clone(),
    ))
}

/// A registry with `conns` admitted under `before` (each must be allowed there, as the accept
/// path requires), then re-evaluated under `after`.
struct Bed {
    registry: Arc<OpenConnections>,
    admissions: Vec<Admission>,
    pass: Reevaluation,
}

fn admit_then_change(before: &MeshState, after: &MeshState, conns: &[Arc<Inbound>]) -> Bed {
    let registry = Arc::new(OpenConnections::new());
    let admissions = conns
        .iter()
        .map(|conn| {
            let admission = registry.register(conn.clone());
            let dst = before.workload_by_ip(conn.dst.ip()).unwrap();
            assert_eq!(
                decide(before, conn, dst).allowed,
                Ok(()),
                "{conn:?} must be allowed before the change"
            );
            admission
        })
        .collect();
    let pass = registry.reevaluate(after);
    Bed {
        registry,
        admissions,
        pass,
    }
}

impl Bed {
    /// What each connection got: `None` (still open) or the refusal's reason.
    fn outcomes(&mut self) -> Vec<Option<&'static str>> {
        self.admissions
            .iter_mut()
            .map(|a| a.try_revoked().map(|r| r.reason))
            .collect()
    }
}

#[test]
fn a_new_policy_closes_exactly_the_connections_it_denies() {
    let pod = Arc::new(server(&[("app", "server")]));
    let before = state_with(
        vec![(*pod).clone()],
        Vec::new(),
        vec![mesh_wide_mode(PeerAuthMode::Permissive)],
    );
    let frontend = principal("frontend");
    let after = state_with(
        vec![(*pod).clone()],
        vec![on_server(
            "frontend-only",
            Action::Allow,
            Some(&[frontend.as_str()]),
        )],
        vec![mesh_wide_mode(PeerAuthMode::Permissive)],
    );
    let conns = [
        hbone_from("frontend", &pod),
        hbone_from("intruder", &pod),
        plaintext(&pod),
    ];
    let mut bed = admit_then_change(&before, &after, &conns);
    assert_eq!(
        bed.outcomes(),
        [None, Some("no_allow_match"), Some("no_allow_match")],
        "only the frontend's tunnel is still allowed"
    );
    assert_eq!(
        bed.pass,
        Reevaluation {
            checked: 3,
            skipped: 0,
            closed: 2
        }
    );
    // Closed connections leave the registry at once; the open one stays until it ends.
    assert_eq!(bed.registry.len(), 1);
    // The message names the decision, for the access log.
    let mut again = admit_then_change(&before, &after, &conns[1..2]);
    let refusal = again.admissions[0].try_revoked().unwrap();
    assert!(
        refusal.message.contains("no ALLOW policy matched"),
        "{refusal:?}"
    );
}

#[test]
fn a_deny_names_its_policy_and_an_unchanged_state_closes_nothing() {
    let pod = Arc::new(server(&[("app", "server")]));
    let before = state_with(vec![(*pod).clone()], Vec::new(), Vec::new());
    let after = state_with(
        vec![(*pod).clone()],
        vec![on_server("deny-all", Action::Deny, None)],
        Vec::new(),
    );
    let conns = [hbone_from("frontend", &pod)];

    let mut same = admit_then_change(&before, &before, &conns);
    assert_eq!(same.outcomes(), [None]);
    assert_eq!(same.pass.closed, 0);

    let mut bed = admit_then_change(&before, &after, &conns);
    let refusal = bed.admissions[0].try_revoked().unwrap();
    assert_eq!(refusal.reason, "deny_policy");
    assert!(refusal.message.contains("default/deny-all"), "{refusal:?}");
}

#[test]
fn strict_closes_plaintext_and_keeps_tunnels() {
    let pod = Arc::new(server(&[("app", "server")]));
    let before = state_with(
        vec![(*pod).clone()],
        Vec::new(),
        vec![mesh_wide_mode(PeerAuthMode::Permissive)],
    );
    // The pod alone becomes STRICT (a workload-level policy overrides the mesh-wide one).
    let after = state_with(
        vec![(*pod).clone()],
        Vec::new(),
        vec![
            mesh_wide_mode(PeerAuthMode::Permissive),
            PeerAuthentication {
                name: "server-strict".into(),
                scope: Scope::new(
                    Some("default".into()),
                    Some([("app".to_string(), "server".to_string())].into()),
                ),
                mode: Some(PeerAuthMode::Strict),
            },
        ],
    );
    let mut bed = admit_then_change(
        &before,
        &after,
        &[plaintext(&pod), hbone_from("frontend", &pod)],
    );
    assert_eq!(bed.outcomes(), [Some("plaintext_strict"), None]);
}

#[test]
fn the_destinations_current_labels_decide() {
    // A DENY for `app=server` exists from the start, but the pod carries no such label yet.
    let deny = vec![on_server("deny-all", Action::Deny, None)];
    let unlabelled = Arc::new(server(&[("app", "other")]));
    let before = state_with(vec![(*unlabelled).clone()], deny.clone(), Vec::new());
    let after = state_with(vec![server(&[("app", "server")])], deny, Vec::new());
    let mut bed = admit_then_change(&before, &after, &[hbone_from("frontend", &unlabelled)]);
    assert_eq!(bed.outcomes(), [Some("deny_policy")]);

    // And the other way round: losing the label lifts the deny, nothing is closed.
    let labelled = Arc::new(server(&[("app", "server")]));
    let allow_frontend = vec![on_server(
        "frontend-only",
        Action::Allow,
        Some(&["cluster.local/ns/default/sa/frontend"]),
    )];
    let before = state_with(
        vec![(*labelled).clone()],
        allow_frontend.clone(),
        Vec::new(),
    );
    let after = state_with(
        vec![server(&[("app", "other")])],
        allow_frontend,
        Vec::new(),
    );
    let mut bed = admit_then_change(&before, &after, &[hbone_from("frontend", &labelled)]);
    assert_eq!(bed.outcomes(), [None]);
}

#[test]
fn dry_run_policies_never_close_anything() {
    let pod = Arc::new(server(&[("app", "server")]));
    let before = state_with(vec![(*pod).clone()], Vec::new(), Vec::new());
    let mut dry_deny = on_server("dry-deny", Action::Deny, None);
    dry_deny.dry_run = true;
    let mut dry_allow_nobody = on_server("dry-allow", Action::Allow, Some(&["nobody"]));
    dry_allow_nobody.dry_run = true;
    let after = state_with(
        vec![(*pod).clone()],
        vec![dry_deny, dry_allow_nobody],
        Vec::new(),
    );
    let mut bed = admit_then_change(&before, &after, &[hbone_from("frontend", &pod)]);
    assert_eq!(bed.outcomes(), [None]);
    assert_eq!(bed.pass.closed, 0);
    assert_eq!(bed.pass.checked, 1);
}

#[test]
fn connections_to_pods_no_longer_enrolled_are_left_alone() {
    let pod = Arc::new(server(&[("app", "server")]));
    let before = state_with(vec![(*pod).clone()], Vec::new(), Vec::new());
    let deny = vec![on_server("deny-all", Action::Deny, None)];
    let conns = [hbone_from("frontend", &pod)];

    // Un-enrolled in the same change as the deny.
    let unenrolled = workload("server", SERVER_IP, &[("app", "server")], false);
    let after = state_with(vec![unenrolled], deny.clone(), Vec::new());
    let mut bed = admit_then_change(&before, &after, &conns);
    assert_eq!(bed.outcomes(), [None]);
    assert_eq!(bed.pass.skipped, 1);

    // Gone from the state altogether.
    let after = state_with(Vec::new(), deny.clone(), Vec::new());
    let mut bed = admit_then_change(&before, &after, &conns);
    assert_eq!(bed.outcomes(), [None]);
    assert_eq!(bed.pass.skipped, 1);

    // Its address now another pod's: the connection is still to `server`, found by name.
    let moved = workload("server", "10.10.1.3", &[("app", "server")], true);
    let squatter = workload("squatter", SERVER_IP, &[], true);
    let after = state_with(vec![squatter, moved], deny, Vec::new());
    let mut bed = admit_then_change(&before, &after, &conns);
    assert_eq!(bed.outcomes(), [Some("deny_policy")]);
}

#[test]
fn entries_leave_with_their_connection_and_memory_comes_back() {
    let pod = Arc::new(server(&[]));
    let registry = Arc::new(OpenConnections::new());
    let conn = hbone_from("frontend", &pod);
    let burst: Vec<Admission> = (0..20_000)
        .map(|_| registry.register(conn.clone()))
        .collect();
    assert_eq!(registry.len(), 20_000);
    let peak: usize = registry.shards.iter().map(|s| lock(s).capacity()).sum();
    drop(burst);
    assert!(registry.is_empty());
    let after: usize = registry.shards.iter().map(|s| lock(s).capacity()).sum();
    assert!(
        after <= SHARDS * MIN_SHARD_CAPACITY * 2 && after < peak,
        "the maps kept their burst capacity: {peak} -> {after}"
    );
    // Only the connections' own Arcs remain: the registry holds nothing of them.
    assert_eq!(Arc::strong_count(&conn), 1);

    // An unconditional admission registers nothing and is never revoked.
    let mut free = Admission::unconditional();
    assert!(free.try_revoked().is_none());
    assert!(registry.is_empty());
}

#[tokio::test]
async fn a_revocation_stops_the_relay_and_closes_both_sides() {
    let pod = Arc::new(server(&[("app", "server")]));
    let before = state_with(vec![(*pod).clone()], Vec::new(), Vec::new());
    let (states_tx, states) = watch::channel(Arc::new(before));
    let registry = Arc::new(OpenConnections::new());
    let watcher = tokio::spawn(reevaluate_on_change(registry.clone(), states));

    let (mut client, client_side) = tokio::io::duplex(64 * 1024);
    let (upstream_side, mut app) = tokio::io::duplex(64 * 1024);
    let mut admission = registry.register(hbone_from("frontend", &pod));
    let relay = tokio::spawn(async move {
        let (moved, ended) = relay_until(
            client_side,
            upstream_side,
            &(),
            &crate::limits::BufferShare::unlimited(),
            admission.revoked(),
        )
        .await;
        (moved, ended)
    });
    // Bytes flow while allowed.
    client.write_all(b"hello").await.unwrap();
    let mut got = [0u8; 5];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");

    let after = state_with(
        vec![(*pod).clone()],
        vec![on_server("deny-all", Action::Deny, None)],
        Vec::new(),
    );
    states_tx.send_replace(Arc::new(after));
    let (moved, ended) = tokio::time::timeout(Duration::from_secs(20), relay)
        .await
        .expect("the relay was not stopped")
        .unwrap();
    match ended {
        Relayed::Stopped(refusal) => assert_eq!(refusal.reason, "deny_policy"),
        Relayed::Finished(result) => panic!("the relay ended on its own: {result:?}"),
    }
    assert_eq!(moved.sent, 5);
    // Both sides see their connection closed.
    let mut rest = Vec::new();
    assert_eq!(app.read_to_end(&mut rest).await.unwrap(), 0);
    assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    assert!(registry.is_empty());
    watcher.abort();
}

/// Not a timed assertion: measures what a re-evaluation of 10,000 open connections costs and
/// how long registering a new connection (the accept paths' share) waits meanwhile, and prints
/// it (`cargo nextest run -E 'test(ten_thousand)' --no-capture`). It asserts what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_open_connections_reevaluated_while_accepting() {
    const OPEN: usize = 10_000;
    let pod = Arc::new(server(&[("app", "server")]));
    // 100 identities; the change denies the odd ones.
    let sa = |i: usize| format!("sa-{}", i % 100);
    let allowed: Vec<String> = (0..100).step_by(2).map(|i| principal(&sa(i))).collect();
    let allowed: Vec<&str> = allowed.iter().map(String::as_str).collect();
    let before = state_with(vec![(*pod).clone()], Vec::new(), Vec::new());
    let after = state_with(
        vec![(*pod).clone()],
        vec![on_server("evens", Action::Allow, Some(&allowed))],
        Vec::new(),
    );
    let registry = Arc::new(OpenConnections::new());
    let conns: Vec<Arc<Inbound>> = (0..OPEN).map(|i| hbone_from(&sa(i), &pod)).collect();

    // The cost of one pass, alone, when nothing changes for any connection.
    let mut admissions: Vec<Admission> =
        conns.iter().map(|c| registry.register(c.clone())).collect();
    let started = Instant::now();
    let pass = registry.reevaluate(&before);
    let alone = started.elapsed();
    assert_eq!(pass.checked, OPEN);
    assert_eq!(pass.closed, 0);

    // The agent's pass, with an accept loop registering and deciding new connections.
    let (states_tx, states) = watch::channel(Arc::new(before));
    let watcher = tokio::spawn(reevaluate_on_change(registry.clone(), states.clone()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (registry, stop, conn) = (registry.clone(), stop.clone(), conns[0].clone());
        tokio::spawn(async move {
            let mut waits = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let admission = registry.register(conn.clone());
                let state = states.borrow().clone();
                let _ = decide(&state, &conn, state.workload_by_ip(conn.dst.ip()).unwrap());
                waits.push(started.elapsed());
                drop(admission);
                tokio::task::yield_now().await;
            }
            waits
        })
    };
    let started = Instant::now();
    states_tx.send_replace(Arc::new(after));
    for (i, admission) in admissions.iter_mut().enumerate() {
        if i % 2 == 1 {
            let refusal = tokio::time::timeout(Duration::from_secs(60), admission.revoked())
                .await
                .expect("a denied connection was not closed");
            assert_eq!(refusal.reason, "no_allow_match");
        }
    }
    let pass_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut waits = prober.await.unwrap();
    watcher.abort();
    assert_eq!(
        registry.len(),
        OPEN / 2,
        "the allowed half stays registered"
    );
    for (i, admission) in admissions.iter_mut().enumerate() {
        if i % 2 == 0 {
            assert!(
                admission.try_revoked().is_none(),
                "an allowed one was closed"
            );
        }
    }
    drop(admissions);
    assert!(registry.is_empty());

    waits.sort();
    let pct = |p: f64| {
        waits
            .get(((waits.len() as f64 * p) as usize).min(waits.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    eprintln!(
        "re-evaluation of {OPEN} open connections: {alone:?} for a pass alone; {pass_time:?} \
         for the agent's pass closing {} of them; meanwhile {} accepts registered and decided, \
         each waiting p50 {:?}, p99 {:?}, max {:?}",
        OPEN / 2,
        waits.len(),
        pct(0.5),
        pct(0.99),
        waits.last().copied().unwrap_or_default(),
    );
}
