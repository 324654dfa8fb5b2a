//! End-to-end: one pod cannot take what its node's agent needs for every other pod.
//!
//! A hostile pod (not enrolled, so its connects reach the agent's listeners directly) opens
//! 20,000 connections to the agent's readiness endpoint on its node address and 20,000 to a
//! meshed pod's HBONE port, and sends nothing on them. The agent runs under this machine's
//! descriptor limit (20,000, which a test cannot raise), so it could not even hold one of the two
//! floods: it must refuse what is over the pod's share, close the rest at its timeouts, and keep
//! serving the other pods throughout.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ambit_tests::traffic::{connect_ok, connect_ok_n, metric, serve};
use ambit_tests::{Cluster, ClusterSpec, PodProcess, READINESS_PORT, ensure_or_dump, testpod_bin};
use anyhow::{Context, Result, anyhow};

/// Connections per attacking process: two processes, each well under its own descriptor limit,
/// make up each flood.
const PER_PROCESS: u32 = 10_000;
const PROCESSES: u32 = 2;
const FLOOD: u32 = PER_PROCESS * PROCESSES;

fn descriptors(pid: u32) -> Result<u64> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("reading /proc/{pid}/fd"))?
        .count() as u64)
}

/// CPU time (user + system) the process used so far.
fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name, which may contain spaces, in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(0)
        .max(1) as u64;
    // utime and stime are the 14th and 15th fields, the 12th and 13th after the name.
    Ok(Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz))
}

/// The sum of the agent's series `name{path="<path>",<label>="..."}` over all values of the
/// other label.
fn sum_by_path(node: &ambit_tests::Node, name: &str, path: &str) -> Result<f64> {
    let r = node.http_get(
        ambit_tests::METRICS_PORT,
        "/metrics",
        Duration::from_secs(5),
    )?;
    let prefix = format!("{name}{{");
    let wanted = format!("path=\"{path}\"");
    Ok(r.body
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// What the attacking processes of one target reported when done, summed.
#[derive(Debug, Default)]
struct Flood {
    opened: u64,
    failed: u64,
    eof: u64,
    reset: u64,
    still_open: u64,
    /// Closed one second or more after their connect (held until a timeout, or refused after
    /// waiting in the listener's backlog while the machine was busy).
    late: u64,
    first_error: Option<String>,
}

/// Collects the summaries of `processes`, all of which must be done by `deadline`.
fn finish(target: SocketAddr, processes: &mut [PodProcess], deadline: Instant) -> Result<Flood> {
    let mut flood = Flood::default();
    for p in processes {
        let left = deadline.saturating_duration_since(Instant::now());
        let (_, lines) = p.wait_json(left).with_context(|| {
            format!(
                "the flood to {target} did not end within 150 s: were its idle connections closed?"
            )
        })?;
        let done = lines
            .iter()
            .find(|l| l["event"] == "done")
            .ok_or_else(|| anyhow!("no summary from an attacker of {target}: {lines:?}"))?;
        let n = |k: &str| done[k].as_u64().unwrap_or(0);
        flood.opened += n("opened");
        flood.failed += n("failed");
        flood.eof += n("closed_eof");
        flood.reset += n("closed_reset");
        flood.still_open += n("still_open");
        if flood.first_error.is_none() {
            flood.first_error = done["first_error"].as_str().map(str::to_string);
        }
        if let Some(after) = done["closed_after_s"].as_object() {
            flood.late += after
                .iter()
                .filter(|(s, _)| s.as_str() != "0")
                .filter_map(|(_, n)| n.as_u64())
                .sum::<u64>();
        }
    }
    Ok(flood)
}

#[test]
fn idle_floods_from_one_pod_are_bounded_and_timed_out_while_other_pods_flow() -> Result<()> {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        pods_per_node: 3,
    })?;
    let attacker = cluster.pod(0, 0);
    let client = cluster.pod(0, 1);
    let server = cluster.pod(0, 2);
    cluster.set_enrolled(attacker, false);
    cluster.write_mesh()?;
    cluster.start_agents()?;
    let node = cluster.node(0);
    let _srv = serve(server, &[8080])?;
    // The mesh path is warm (its pooled HBONE connection is part of the baseline).
    connect_ok(&cluster, client, server.addr4(8080), 10_000)?;

    let pid = node.agent_pid().context("agent not running")?;
    let dump = node.config_dump()?;
    let settings = &dump["limits"]["settings"];
    let limit = settings["descriptors"].as_u64().unwrap_or(0);
    let handshakes_per_source = settings["maxHandshakesPerSource"].as_u64().unwrap_or(0);
    let http_per_source = settings["httpMaxConnectionsPerSource"]
        .as_u64()
        .unwrap_or(0);
    ensure_or_dump!(
        cluster,
        limit > 0 && handshakes_per_source > 0 && http_per_source > 0,
        "config_dump shows no limits: {dump}"
    );
    let baseline = descriptors(pid)?;
    // What the floods may hold at once: the attacker's share of handshakes and of readiness
    // connections, plus the other pods' few connections and the test's own requests.
    let budget = baseline + handshakes_per_source + http_per_source + 64;
    eprintln!(
        "agent pid {pid}: {baseline} descriptors open, limit {limit}; the floods may add \
         {handshakes_per_source} + {http_per_source}"
    );

    let readiness = SocketAddr::new(IpAddr::V4(node.gateway_ip()), READINESS_PORT);
    let hbone = server.addr4(15008);
    let bin = testpod_bin()?;
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let cpu_before = cpu_time(pid)?;

    let (floods, fds_peak, rounds) = std::thread::scope(|scope| -> Result<_> {
        // The agent's descriptors, sampled throughout.
        let sampler = scope.spawn(|| {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(descriptors(pid).unwrap_or(u64::MAX));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        });
        // The other pods' traffic and kubelet's probe, over and over until the floods end.
        let other_pods = scope.spawn(|| -> Result<u32> {
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) || rounds == 0 {
                connect_ok_n(&cluster, client, server.addr4(8080), 64 * 1024, 5, &[])?;
                let probe =
                    node.http_get(READINESS_PORT, "/healthz/ready", Duration::from_secs(5))?;
                ensure_or_dump!(
                    cluster,
                    probe.status == 200,
                    "readiness from the node during the flood: HTTP {} {}",
                    probe.status,
                    probe.body
                );
                rounds += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(rounds)
        });

        let spawn = |target: SocketAddr| -> Result<PodProcess> {
            attacker.spawn(
                &bin,
                [
                    "idle",
                    "--connect",
                    &target.to_string(),
                    "--count",
                    &PER_PROCESS.to_string(),
                    "--max-seconds",
                    "120",
                    // At most 256 per process connecting or not yet closed: the two processes
                    // of a flood stay under the listeners' backlog (1024), so the kernel never
                    // drops a connection the agent did not see. They still hold more than
                    // the agent's budget for them allows.
                    "--outstanding",
                    "256",
                ],
            )
        };
        let result = (|| -> Result<_> {
            let mut to_readiness = Vec::new();
            let mut to_hbone = Vec::new();
            for _ in 0..PROCESSES {
                to_readiness.push(spawn(readiness)?);
                to_hbone.push(spawn(hbone)?);
            }
            // Generous: the floods take about 10 s here (the HBONE handshake timeout).
            let deadline = Instant::now() + Duration::from_secs(150);
            Ok((
                finish(readiness, &mut to_readiness, deadline)?,
                finish(hbone, &mut to_hbone, deadline)?,
            ))
        })();
        stop.store(true, Ordering::Relaxed);
        let peak = sampler.join().expect("sampler panicked");
        let rounds = other_pods.join().expect("traffic thread panicked");
        Ok((result?, peak, rounds?))
    })?;
    let (readiness_flood, hbone_flood) = floods;
    eprintln!(
        "floods done in {:?} (agent CPU {:?}): readiness {readiness_flood:?}, hbone \
         {hbone_flood:?}; agent descriptors peaked at {fds_peak}; {rounds} rounds of other \
         pods' traffic",
        started.elapsed(),
        cpu_time(pid)? - cpu_before,
    );

    for (what, flood) in [("readiness", &readiness_flood), ("HBONE", &hbone_flood)] {
        ensure_or_dump!(
            cluster,
            flood.opened == u64::from(FLOOD) && flood.failed == 0,
            "the attacker could not open its {FLOOD} connections to {what}: {flood:?}"
        );
        ensure_or_dump!(
            cluster,
            flood.still_open == 0 && flood.eof + flood.reset == u64::from(FLOOD),
            "the agent left idle connections to {what} open: {flood:?}"
        );
    }
    ensure_or_dump!(
        cluster,
        fds_peak <= budget && fds_peak < limit,
        "the agent held {fds_peak} descriptors during the floods: more than its budget of \
         {budget} (baseline {baseline}, limit {limit})"
    );

    // Every flooding connection was either refused at once (reset) or held and then closed by
    // a timeout (end of stream), and the agent counted each the same way.
    for (path, flood) in [("readiness", &readiness_flood), ("hbone", &hbone_flood)] {
        let refused = sum_by_path(node, "ambit_connections_over_limit_total", path)?;
        let timed_out = sum_by_path(node, "ambit_connections_timed_out_total", path)?;
        ensure_or_dump!(
            cluster,
            refused == flood.reset as f64 && timed_out == flood.eof as f64,
            "{path}: the attacker saw {} resets and {} closes, the agent counted {refused} \
             refusals and {timed_out} timeouts",
            flood.reset,
            flood.eof
        );
        ensure_or_dump!(
            cluster,
            flood.eof > 0 && flood.reset > 0,
            "{path}: expected some connections held until a timeout and the rest refused: \
             {flood:?}"
        );
    }
    let phase = |path: &str, phase: &str| {
        metric(
            node,
            &format!("ambit_connections_timed_out_total{{path=\"{path}\",phase=\"{phase}\"}}"),
        )
    };
    ensure_or_dump!(
        cluster,
        phase("hbone", "tls_handshake")? == Some(hbone_flood.eof as f64)
            && phase("readiness", "http_request")? == Some(readiness_flood.eof as f64),
        "the held connections were not closed by the TLS handshake and request timeouts"
    );
    let accept_errors = sum_by_path(node, "ambit_accept_errors_total", "hbone")?
        + sum_by_path(node, "ambit_accept_errors_total", "readiness")?;
    ensure_or_dump!(
        cluster,
        accept_errors == 0.0,
        "the agent failed {accept_errors} accepts (out of descriptors?)"
    );

    // Afterwards: the descriptors are back and the mesh serves as before.
    cluster.wait_for(Duration::from_secs(30), "agent descriptors back", || {
        let now = descriptors(pid)?;
        Ok(if now <= baseline + 8 {
            Ok(())
        } else {
            Err(format!("{now} open, baseline {baseline}"))
        })
    })?;
    connect_ok(&cluster, client, server.addr4(8080), 100_000)?;
    Ok(())
}
