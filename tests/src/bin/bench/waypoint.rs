//! The waypoint path: client agent -> waypoint -> server agent, measured beside the L4 mesh and
//! the direct path in the same run, with h2load (HTTP/2, prior knowledge) and wrk (HTTP/1.1) at 1
//! and at 64 connections.
//!
//! The server is `p1-0` (across nodes from the client `p0-0`); the waypoint runs in `p1-1`, not
//! enrolled, as Istio's waypoints are not captured. Two services select the server: `web`
//! (plain L4 mesh) and `web-l7` (bound to the waypoint, no route resource: every request goes
//! to the service dialled, round robin), so the two meshed paths differ only by the waypoint.
//! The direct path dials the server's pod IP with nothing enrolled.

use super::*;

/// The L4 service and the waypoint-bound one: the same endpoints.
const WEB_VIP: &str = "10.96.0.40";
const WEB_L7_VIP: &str = "10.96.0.41";
const WAYPOINT_VIP: &str = "10.96.0.42";
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
    anyhow::ensure!(
        cluster.set_service_waypoint("web-l7", &namespace, "waypoint"),
        "no service web-l7"
    );
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Direct,
    Mesh,
    Waypoint,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Mesh => "L4 mesh (HBONE)",
            Path::Waypoint => "waypoint",
        }
    }

    /// For file names.
    fn tag(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Mesh => "mesh",
            Path::Waypoint => "waypoint",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    H2load,
    Wrk,
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
                &format!("http://{host}:{h2}/"),
            ]
            .map(String::from)
            .to_vec();
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
                &format!("http://{host}:{h1}/"),
            ]
            .map(String::from)
            .to_vec();
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
    for path in [Path::Direct, Path::Mesh, Path::Waypoint] {
        let enrolled: Vec<&Pod> = match path {
            Path::Direct => vec![],
            Path::Mesh | Path::Waypoint => vec![client, server],
        };
        cluster.with_diagnostics(set_enrolment(cluster, &enrolled))?;
        println!("  -- {}", path.name());
        for tool_kind in [Tool::H2load, Tool::Wrk] {
            for connections in [1, 64] {
                let before = counted();
                let run = run_one(cluster, args, tools, pid, path, tool_kind, connections);
                // The path check: the waypoint counts exactly the requests of its own path.
                let through = counted() - before;
                if let Ok(h) = &run.result {
                    let expected_through = path == Path::Waypoint;
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
            let tool = match r.tool {
                Tool::H2load => "h2load (HTTP/2)",
                Tool::Wrk => "wrk (HTTP/1.1)",
            };
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
                if r.path == Path::Waypoint {
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
         not enrolled; no route resource: requests go to the service dialled). **L4 mesh** \
         dials a service selecting the same server without a waypoint (HBONE between the two \
         agents); **direct** dials the pod IP with nothing enrolled. Each run saturates for \
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
