//! The waypoint path: client agent -> waypoint -> server agent, measured beside the L4 mesh and
//! the direct path in the same run, with h2load (HTTP/2, prior knowledge) and wrk (HTTP/1.1) at 1
//! and at 64 connections.
//!
//! The server is `p1-0` (across nodes from the client `p0-0`); the waypoint runs in `p1-1`, not
//! enrolled, as Istio's waypoints are not captured. Three services select the server: `web`
//! (plain L4 mesh), `web-l7` (bound to the waypoint, no route resource: every request goes
//! to the service dialled, round robin), so the two meshed paths differ only by the waypoint,
//! and `web-l7-secure` (the same waypoint, with an L7 AuthorizationPolicy and a
//! RequestAuthentication: every request carries a JWT that is verified and whose claim the
//! policy checks), so the last two differ only by L7 policy and JWT. The direct path dials the
//! server's pod IP with nothing enrolled.

use ambit_test_jwt::TestIssuer;
use ambit_tests::mesh::Policies;
use serde_json::json;

use super::*;

/// The L4 service and the waypoint-bound one: the same endpoints.
const WEB_VIP: &str = "10.96.0.40";
const WEB_L7_VIP: &str = "10.96.0.41";
const WAYPOINT_VIP: &str = "10.96.0.42";
const WEB_L7_SECURE_VIP: &str = "10.96.0.43";
/// The issuer of the secured path's tokens.
const ISSUER: &str = "https://idp.bench.test";
/// The service ports: HTTP/1.1 to nginx's 8080, HTTP/2 to its h2c listener.
const SERVICE_H1: u16 = 80;
const SERVICE_H2: u16 = 81;

/// Labels the server and the waypoint pod and adds the three services to the mesh (written by
/// the caller before the agents start).
pub(crate) fn configure(cluster: &Cluster) -> Result<()> {
    let (server, waypoint) = (cluster.pod(1, 0), cluster.pod(1, 1));
    let namespace = server.namespace();
    cluster.set_labels(server, &[("app", "bench-web")]);
    cluster.set_labels(waypoint, &[("app", "bench-waypoint")]);
    waypoint.set_service_account("waypoint");
    let ports = [(SERVICE_H1, HTTP_PORT), (SERVICE_H2, HTTP2_PORT)];
    let selector = [("app", "bench-web")];
    cluster.add_service("web", &namespace, &[WEB_VIP], &selector, &ports);
    cluster.add_service("web-l7", &namespace, &[WEB_L7_VIP], &selector, &ports);
    cluster.add_service(
        "waypoint",
        &namespace,
        &[WAYPOINT_VIP],
        &[("app", "bench-waypoint")],
        &[(15008, 15008)],
    );
    cluster.add_service(
        "web-l7-secure",
        &namespace,
        &[WEB_L7_SECURE_VIP],
        &selector,
        &ports,
    );
    for service in ["web-l7", "web-l7-secure"] {
        anyhow::ensure!(
            cluster.set_service_waypoint(service, &namespace, "waypoint"),
            "no service {service}"
        );
    }
    let client = cluster.pod(0, 0);
    let principal = format!(
        "cluster.local/ns/{namespace}/sa/{}",
        client.service_account()
    );
    let target = json!([{"kind": "Service", "group": "", "name": "web-l7-secure"}]);
    cluster.set_policies(Policies {
        authorization_policies: vec![json!({
            "name": "bench-l7",
            "namespace": namespace,
            "targetRefs": target,
            "action": "ALLOW",
            "rules": [{
                "from": [{"source": {
                    "principals": [principal],
                    "requestPrincipals": [format!("{ISSUER}/*")]
                }}],
                "to": [{"operation": {"methods": ["GET"], "paths": ["/*"]}}],
                "when": [{"key": "request.auth.claims[groups]", "values": ["bench"]}]
            }]
        })],
        request_authentications: vec![json!({
            "name": "bench-idp",
            "namespace": namespace,
            "targetRefs": target,
            "jwtRules": [{"issuer": ISSUER, "jwks": TestIssuer::jwks(&[issuer()])}]
        })],
        ..Default::default()
    });
    Ok(())
}

/// The secured path's identity provider: one key for the whole run.
fn issuer() -> &'static TestIssuer {
    static ISSUER_KEY: std::sync::OnceLock<TestIssuer> = std::sync::OnceLock::new();
    ISSUER_KEY.get_or_init(|| TestIssuer::es256(ISSUER, "bench-1"))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Mesh,
    Waypoint,
    /// The waypoint with an L7 AuthorizationPolicy and JWT verification on every request.
    WaypointSecured,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Mesh => "L4 mesh (HBONE)",
            Path::Waypoint => "waypoint",
            Path::WaypointSecured => "waypoint + L7 policy + JWT",
        }
    }

    /// For file names.
    fn tag(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Mesh => "mesh",
            Path::Waypoint => "waypoint",
            Path::WaypointSecured => "waypoint-secured",
        }
    }

    fn through_waypoint(self) -> bool {
        matches!(self, Path::Waypoint | Path::WaypointSecured)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    H2load,
    Wrk,
}

impl Tool {
    /// The tool's name in file names.
    fn tag(self) -> &'static str {
        match self {
            Tool::H2load => "h2load",
            Tool::Wrk => "wrk",
        }
    }

    /// The tool's name in the report, with the HTTP version it speaks.
    fn name(self) -> &'static str {
        match self {
            Tool::H2load => "h2load (HTTP/2)",
            Tool::Wrk => "wrk (HTTP/1.1)",
        }
    }
}

struct Run {
    path: Path,
    tool: Tool,
    connections: u32,
    result: Result<Http, String>,
    /// CPU seconds of the agents (both nodes) and of the waypoint during the run.
    agents_cpu: f64,
    waypoint_cpu: f64,
}

/// One wrk run: `-t1 -c N -d S --latency`; its `Requests/sec`, latency percentiles and errors.
fn run_wrk(client: &Pod, args: &[String], seconds: u32) -> Result<Http> {
    let wrk = tool("wrk")?;
    let mut p = client.spawn(&wrk, args)?;
    let (status, lines) = p.wait_output(Duration::from_secs(u64::from(seconds) + 30))?;
    let text = lines.join("\n");
    let context = || format!("{} ({status}):\n{text}\n{}", show("wrk", args), p.stderr());
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let rate: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no Requests/sec: {}", context()))?;
    let total: u64 = text
        .lines()
        .find_map(|l| l.trim().split_once(" requests in "))
        .and_then(|(n, _)| n.trim().parse().ok())
        .ok_or_else(|| anyhow!("no `N requests in` line: {}", context()))?;
    let non_2xx: u64 = field("Non-2xx or 3xx responses:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // `Socket errors: connect 0, read 1, write 0, timeout 0`
    let socket_errors: u64 = field("Socket errors:")
        .map(|v| {
            v.split(',')
                .filter_map(|c| c.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // `     50%  412.00us` in the latency distribution.
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .and_then(|v| wrk_micros(v.trim()))
            .ok_or_else(|| anyhow!("no {p} latency: {}", context()))
    };
    Ok(Http {
        rate,
        succeeded: total.saturating_sub(non_2xx),
        failed: non_2xx + socket_errors,
        p50: percentile("50%")?,
        p90: percentile("90%")?,
        p99: percentile("99%")?,
        machine: None,
    })
}

/// A latency as wrk prints it (`412.00us`, `1.23ms`, `2.00s`), in microseconds.
fn wrk_micros(s: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

fn run_one(
    cluster: &Cluster,
    args: &Args,
    tools: &Tools,
    waypoint_pid: u32,
    path: Path,
    tool_kind: Tool,
    connections: u32,
) -> Run {
    let client = cluster.pod(0, 0);
    let server_ip = cluster.pod(1, 0).ip4().to_string();
    let (host, h1, h2) = match path {
        Path::Direct => (server_ip, HTTP_PORT, HTTP2_PORT),
        Path::Mesh => (WEB_VIP.to_string(), SERVICE_H1, SERVICE_H2),
        Path::Waypoint => (WEB_L7_VIP.to_string(), SERVICE_H1, SERVICE_H2),
        Path::WaypointSecured => (WEB_L7_SECURE_VIP.to_string(), SERVICE_H1, SERVICE_H2),
    };
    // The secured path's token: valid for the run, with the claim its policy asks for.
    let auth: Vec<String> = if path == Path::WaypointSecured {
        let token = issuer().token("bench-client", json!({"groups": ["bench"]}));
        vec!["-H".into(), format!("Authorization: Bearer {token}")]
    } else {
        Vec::new()
    };
    let seconds = args.saturation_seconds;
    let c = connections.to_string();
    let before = (agents_cpu(cluster), cpu_seconds(waypoint_pid));
    let (what, result) = match tool_kind {
        Tool::H2load => {
            let log = tools
                .scratch
                .join(format!("h2load-waypoint-{}-{c}.log", path.tag()));
            let cmd: Vec<String> = [
                "-t",
                "1",
                "-c",
                &c,
                "-m",
                "1",
                "-D",
                &format!("{seconds}s"),
                "-N",
                "5s",
                &format!("--log-file={}", log.display()),
            ]
            .map(String::from)
            .into_iter()
            .chain(auth.iter().cloned())
            .chain([format!("http://{host}:{h2}/")])
            .collect();
            (
                format!("h2load, {c} connections"),
                run_h2load(client, tools, &cmd, &log, seconds),
            )
        }
        Tool::Wrk => {
            let cmd: Vec<String> = [
                "-t",
                "1",
                "-c",
                &c,
                "-d",
                &format!("{seconds}s"),
                "--timeout",
                "5s",
                "--latency",
            ]
            .map(String::from)
            .into_iter()
            .chain(auth.iter().cloned())
            .chain([format!("http://{host}:{h1}/")])
            .collect();
            (
                format!("wrk, {c} connections"),
                run_wrk(client, &cmd, seconds),
            )
        }
    };
    let result = report(&what, result, show_http);
    let agents: f64 = delta(&agents_cpu(cluster), &before.0).iter().sum();
    let waypoint = match (cpu_seconds(waypoint_pid), before.1) {
        (Some(after), Some(before)) => after - before,
        _ => f64::NAN,
    };
    Run {
        path,
        tool: tool_kind,
        connections,
        result,
        agents_cpu: agents,
        waypoint_cpu: waypoint,
    }
}

/// Starts profiling the waypoint (`--perf`) for one run.
fn profile(args: &Args, pid: u32, path: Path, tool: Tool, connections: u32) -> Option<Profile> {
    start_profile_of(
        &[pid],
        "the waypoint",
        args,
        &format!("{}-{}-{connections}", path.tag(), tool.tag()),
        &format!(
            "The waypoint, path \"{}\": {}, {connections} connections at saturation",
            path.name(),
            tool.name()
        ),
    )
}

/// Runs every path and load; returns the report section and the failed measurements.
pub(crate) fn section(
    cluster: &Cluster,
    args: &Args,
    tools: &Tools,
) -> Result<(String, Vec<String>)> {
    let (client, server, waypoint_pod) = (cluster.pod(0, 0), cluster.pod(1, 0), cluster.pod(1, 1));
    println!(
        "==> waypoint: {} -> {} through `ambit waypoint` in {}",
        client.name(),
        server.name(),
        waypoint_pod.name()
    );
    ambit_tests::waypoint::route_ca_to_pods_of(cluster, cluster.node(1))?;
    let waypoint =
        cluster.with_diagnostics(ambit_tests::waypoint::start_waypoint(cluster, waypoint_pod))?;
    let pid = waypoint.pid();
    let counted = || -> f64 {
        ambit_tests::waypoint::waypoint_metrics(cluster.node(1), waypoint_pod)
            .map(|m| ambit_tests::waypoint::sum_series(&m, "istio_requests_total", &[]))
            .unwrap_or(f64::NAN)
    };
    let mut runs = Vec::new();
    let mut errors = Vec::new();
    for path in [
        Path::Direct,
        Path::Mesh,
        Path::Waypoint,
        Path::WaypointSecured,
    ] {
        let enrolled: Vec<&Pod> = match path {
            Path::Direct => vec![],
            Path::Mesh | Path::Waypoint | Path::WaypointSecured => vec![client, server],
        };
        cluster.with_diagnostics(set_enrolment(cluster, &enrolled))?;
        println!("  -- {}", path.name());
        for tool_kind in [Tool::H2load, Tool::Wrk] {
            for connections in [1, 64] {
                let before = counted();
                // `--perf`: the waypoint under the heavier load of each of its paths.
                let profile = (path.through_waypoint() && connections > 1)
                    .then(|| profile(args, pid, path, tool_kind, connections))
                    .flatten();
                let run = run_one(cluster, args, tools, pid, path, tool_kind, connections);
                finish_profile(profile);
                // The path check: the waypoint counts exactly the requests of its own path.
                let through = counted() - before;
                if let Ok(h) = &run.result {
                    // A refused token or policy would make the secured path cheap and wrong.
                    if path == Path::WaypointSecured && h.failed > 0 {
                        errors.push(format!(
                            "waypoint / {} / {} connections: {} of {} requests refused",
                            path.name(),
                            connections,
                            h.failed,
                            h.failed + h.succeeded
                        ));
                    }
                    let expected_through = path.through_waypoint();
                    if expected_through != (through >= h.succeeded as f64 * 0.9) {
                        errors.push(format!(
                            "waypoint / {} / {} connections: the waypoint counted {through} \
                             requests of {} answered",
                            path.name(),
                            connections,
                            h.succeeded
                        ));
                    }
                }
                runs.push(run);
            }
        }
    }
    let hwm = util::proc_status_kb(pid, "VmHWM");
    let rss = util::proc_status_kb(pid, "VmRSS");
    drop(waypoint);
    for r in &runs {
        if let Err(e) = &r.result {
            errors.push(format!(
                "waypoint / {} / {} connections: {e}",
                r.path.name(),
                r.connections
            ));
        }
    }
    Ok((table_of(&runs, args, hwm, rss), errors))
}

fn table_of(runs: &[Run], args: &Args, hwm: Option<u64>, rss: Option<u64>) -> String {
    let ms = |v: f64| format!("{:.3} ms", v / 1000.0);
    let direct = |r: &Run| {
        runs.iter()
            .find(|d| d.path == Path::Direct && d.tool == r.tool && d.connections == r.connections)
            .and_then(|d| d.result.as_ref().ok())
    };
    let rows = runs
        .iter()
        .map(|r| {
            let tool = r.tool.name();
            let Ok(h) = &r.result else {
                return vec![
                    tool.to_string(),
                    r.connections.to_string(),
                    r.path.name().to_string(),
                    "failed".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ];
            };
            let (base_rate, base_p50, base_p99) = match (r.path, direct(r)) {
                (Path::Direct, _) | (_, None) => (None, None, None),
                (_, Some(d)) => (Some(d.rate), Some(d.p50), Some(d.p99)),
            };
            let per_request = |cpu: f64| {
                let n = h.succeeded + h.failed;
                if n == 0 || !cpu.is_finite() {
                    "-".to_string()
                } else {
                    format!("{:.0} µs", cpu * 1e6 / n as f64)
                }
            };
            vec![
                tool.to_string(),
                r.connections.to_string(),
                r.path.name().to_string(),
                format!("{:.0} req/s{}", h.rate, ratio(h.rate, base_rate)),
                format!("{}{}", ms(h.p50), ratio(h.p50, base_p50)),
                format!("{}{}", ms(h.p99), ratio(h.p99, base_p99)),
                format!("{} of {}", h.failed, h.failed + h.succeeded),
                per_request(r.agents_cpu),
                if r.path.through_waypoint() {
                    per_request(r.waypoint_cpu)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    let kb = |v: Option<u64>| {
        v.map_or("unknown".to_string(), |k| {
            format!("{:.1} MiB", k as f64 / 1024.0)
        })
    };
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### Waypoint: client agent -> waypoint -> server agent\n\n\
         Across nodes: `p0-0` to nginx in `p1-0` through `ambit waypoint` in `p1-1` (node n1, \
         not enrolled; no route resource: requests go to the service dialled). **waypoint + L7 \
         policy + JWT** dials a third service on the same waypoint with an ALLOW \
         AuthorizationPolicy (principal, request principal, method, path and a claim) and a \
         RequestAuthentication (ES256, inline JWKS): every request carries a token that is \
         verified. **L4 mesh** dials a service selecting the same server without a waypoint \
         (HBONE between the two agents); **direct** dials the pod IP with nothing enrolled. Each run saturates for \
         {} s: `h2load -t 1 -c N -m 1 -D {}s` (HTTP/2 prior knowledge, nginx's h2c listener) \
         and `wrk -t 1 -c N -d {}s --latency` (HTTP/1.1). Ratios are to the direct path of the \
         same tool and connections in this run. CPU per request: user + system time of both \
         agents, and of the waypoint, over the run, divided by the requests answered.\n",
        args.saturation_seconds, args.saturation_seconds, args.saturation_seconds
    );
    md.push_str(&table(
        &[
            "tool",
            "connections",
            "path",
            "req/s",
            "p50",
            "p99",
            "failed",
            "agents CPU / request",
            "waypoint CPU / request",
        ],
        rows,
    ));
    let _ = writeln!(
        md,
        "\nThe waypoint's memory: peak resident {} (VmHWM), {} resident at the end.\n",
        kb(hwm),
        kb(rss)
    );
    md
}
