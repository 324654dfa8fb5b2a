//! `ambit stat`: per workload, what its node agent carried over an interval (connection rate,
//! open connections, bytes per second each way, the share of connections in mutual TLS) from
//! two scrapes of the agent's metrics endpoint: `linkerd viz stat` without a metrics stack.
//!
//! It reads the `istio_tcp_*` series the agent exports for Prometheus, so it shows what a
//! dashboard would: inbound figures are the destination agent's (`reporter="destination"`),
//! outbound ones the source agent's (`reporter="source"`). Run it against each node's agent to
//! see the workloads of that node (`--node N` reaches it through the API server).
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::Context;
use clap::ValueEnum;
use serde::Serialize;

use super::{
    cluster::{self, KubeArgs},
    fetch::{self, Endpoint},
    table,
};

/// Output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// One JSON object per workload, in an array.
    Json,
}

/// `ambit stat`.
#[derive(clap::Args, Debug)]
pub struct StatArgs {
    /// The agent's metrics endpoint (on its node: `127.0.0.1:15020`).
    #[arg(long, env = "AMBIT_METRICS_ADDR", default_value = "127.0.0.1:15020")]
    pub metrics: SocketAddr,
    /// Read the agent of this node through the API server's pod port-forward (with the
    /// kubeconfig), instead of --metrics.
    #[arg(long)]
    pub node: Option<String>,
    /// The cluster, for --node.
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The interval between the two scrapes the rates are computed over.
    #[arg(long, default_value = "5s", value_parser = crate::timefmt::parse_duration)]
    pub interval: Duration,
    /// Only workloads of this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Scrapes twice, `interval` apart, and prints the difference.
pub async fn run(args: StatArgs) -> anyhow::Result<()> {
    let endpoint = if args.node.is_some() || args.kube.named() {
        cluster::agent_endpoint(&args.kube, args.node.as_deref(), cluster::METRICS_PORT).await?
    } else {
        Endpoint::Addr(args.metrics)
    };
    let first = scrape(&endpoint).await?;
    tokio::time::sleep(args.interval).await;
    let second = scrape(&endpoint).await?;
    let stats = between(&first, &second, args.interval, args.namespace.as_deref());
    match args.output {
        Output::Table => print!("{}", render(&stats)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&stats)?),
    }
    Ok(())
}

async fn scrape(endpoint: &Endpoint) -> anyhow::Result<Totals> {
    let body = fetch::get_from(endpoint, "/metrics").await?;
    let text = std::str::from_utf8(&body).context("the metrics are not UTF-8")?;
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .with_context(|| format!("parsing the metrics of {endpoint}"))?;
    Ok(Totals::of(&scrape))
}

/// A workload, `namespace/name` (the controller's name, as the metrics label it).
type WorkloadKey = (String, String);

/// The counters of one workload at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
struct Counters {
    inbound_opened: f64,
    inbound_closed: f64,
    inbound_mtls: f64,
    /// Bytes the workload received (client to server on its inbound connections).
    inbound_bytes_in: f64,
    /// Bytes it sent back on them.
    inbound_bytes_out: f64,
    outbound_opened: f64,
    outbound_closed: f64,
    outbound_bytes_out: f64,
    outbound_bytes_in: f64,
}

/// Every workload's counters at one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
struct Totals(BTreeMap<WorkloadKey, Counters>);

impl Totals {
    fn of(scrape: &prometheus_parse::Scrape) -> Self {
        let mut totals = Totals::default();
        for sample in &scrape.samples {
            let (prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value)) = sample.value
            else {
                continue;
            };
            let label = |name: &str| sample.labels.get(name).unwrap_or_default().to_string();
            let (side, inbound) = match label("reporter").as_str() {
                "destination" => ("destination", true),
                "source" => ("source", false),
                _ => continue,
            };
            let key = (
                label(&format!("{side}_workload_namespace")),
                label(&format!("{side}_workload")),
            );
            if key.1.is_empty() || key.1 == "unknown" {
                continue;
            }
            let c = totals.0.entry(key).or_default();
            let mtls = label("connection_security_policy") == "mutual_tls";
            // `received` is what the client sent (to the server), `sent` what came back.
            match (sample.metric.as_str(), inbound) {
                ("istio_tcp_connections_opened_total", true) => {
                    c.inbound_opened += value;
                    if mtls {
                        c.inbound_mtls += value;
                    }
                }
                ("istio_tcp_connections_closed_total", true) => c.inbound_closed += value,
                ("istio_tcp_received_bytes_total", true) => c.inbound_bytes_in += value,
                ("istio_tcp_sent_bytes_total", true) => c.inbound_bytes_out += value,
                ("istio_tcp_connections_opened_total", false) => c.outbound_opened += value,
                ("istio_tcp_connections_closed_total", false) => c.outbound_closed += value,
                ("istio_tcp_received_bytes_total", false) => c.outbound_bytes_out += value,
                ("istio_tcp_sent_bytes_total", false) => c.outbound_bytes_in += value,
                _ => {}
            }
        }
        totals
    }
}

/// One workload's figures over the interval.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadStat {
    /// Namespace.
    pub namespace: String,
    /// The workload (controller) name.
    pub workload: String,
    /// Inbound connections opened per second.
    pub inbound_connections_per_second: f64,
    /// Inbound connections open at the second scrape.
    pub inbound_open: f64,
    /// Bytes per second the workload received, and sent back, on inbound connections.
    pub inbound_bytes_in_per_second: f64,
    /// See above.
    pub inbound_bytes_out_per_second: f64,
    /// The share of its inbound connections (ever, not just the interval) in mutual TLS;
    /// `None` when it had none.
    pub inbound_mtls_share: Option<f64>,
    /// Outbound connections opened per second.
    pub outbound_connections_per_second: f64,
    /// Outbound connections open at the second scrape.
    pub outbound_open: f64,
    /// Bytes per second the workload sent, and received back, on outbound connections.
    pub outbound_bytes_out_per_second: f64,
    /// See above.
    pub outbound_bytes_in_per_second: f64,
}

fn between(
    first: &Totals,
    second: &Totals,
    interval: Duration,
    namespace: Option<&str>,
) -> Vec<WorkloadStat> {
    let seconds = interval.as_secs_f64().max(1e-3);
    let zero = Counters::default();
    second
        .0
        .iter()
        .filter(|((ns, _), _)| namespace.is_none_or(|want| want == ns))
        .map(|((ns, name), now)| {
            let before = first.0.get(&(ns.clone(), name.clone())).unwrap_or(&zero);
            // A counter that went down means the agent restarted in between: count from zero.
            let rate = |now: f64, before: f64| {
                let d = if now >= before { now - before } else { now };
                d / seconds
            };
            WorkloadStat {
                namespace: ns.clone(),
                workload: name.clone(),
                inbound_connections_per_second: rate(now.inbound_opened, before.inbound_opened),
                inbound_open: (now.inbound_opened - now.inbound_closed).max(0.0),
                inbound_bytes_in_per_second: rate(now.inbound_bytes_in, before.inbound_bytes_in),
                inbound_bytes_out_per_second: rate(now.inbound_bytes_out, before.inbound_bytes_out),
                inbound_mtls_share: (now.inbound_opened > 0.0)
                    .then(|| now.inbound_mtls / now.inbound_opened),
                outbound_connections_per_second: rate(now.outbound_opened, before.outbound_opened),
                outbound_open: (now.outbound_opened - now.outbound_closed).max(0.0),
                outbound_bytes_out_per_second: rate(
                    now.outbound_bytes_out,
                    before.outbound_bytes_out,
                ),
                outbound_bytes_in_per_second: rate(now.outbound_bytes_in, before.outbound_bytes_in),
            }
        })
        .collect()
}

/// `1.2 KB/s`, decimal units as `linkerd viz stat` and `kubectl top` print them.
fn per_second(bytes: f64) -> String {
    const UNITS: [&str; 4] = ["B/s", "kB/s", "MB/s", "GB/s"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[0])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn render(stats: &[WorkloadStat]) -> String {
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.namespace.clone(),
                s.workload.clone(),
                format!("{:.1}/s", s.inbound_connections_per_second),
                format!("{:.0}", s.inbound_open),
                per_second(s.inbound_bytes_in_per_second),
                per_second(s.inbound_bytes_out_per_second),
                s.inbound_mtls_share
                    .map_or("-".into(), |share| format!("{:.0}%", share * 100.0)),
                format!("{:.1}/s", s.outbound_connections_per_second),
                format!("{:.0}", s.outbound_open),
                per_second(s.outbound_bytes_out_per_second),
                per_second(s.outbound_bytes_in_per_second),
            ]
        })
        .collect();
    table::render(
        &[
            "NAMESPACE",
            "WORKLOAD",
            "IN CONN",
            "IN OPEN",
            "IN RX",
            "IN TX",
            "IN MTLS",
            "OUT CONN",
            "OUT OPEN",
            "OUT TX",
            "OUT RX",
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stat_node_scrapes_that_nodes_agent_through_the_port_forward() {
        let (_server, kubeconfig) = crate::cli::cluster_tests::cluster().await;
        let args = crate::cli::cluster_tests::kube_args(&kubeconfig);
        let endpoint = cluster::agent_endpoint(&args, Some("node-b"), cluster::METRICS_PORT)
            .await
            .unwrap();
        assert_eq!(
            endpoint.to_string(),
            "pod ambit-system/ambit-agent-node-b port 15020"
        );
        let scraped = scrape(&endpoint).await.unwrap();
        let web = &scraped.0[&("shop".to_string(), "web".to_string())];
        assert_eq!(web.inbound_opened, 3.0);
        assert_eq!(web.inbound_mtls, 3.0);
    }

    fn totals(text: &str) -> Totals {
        let scrape =
            prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
        Totals::of(&scrape)
    }

    const BEFORE: &str = r#"# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="mutual_tls"} 10
istio_tcp_connections_opened_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="none"} 10
istio_tcp_connections_opened_total{reporter="source",source_workload="client",source_workload_namespace="shop",connection_security_policy="mutual_tls"} 4
# TYPE istio_tcp_received_bytes_total counter
istio_tcp_received_bytes_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="mutual_tls"} 1000
"#;

    const AFTER: &str = r#"# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="mutual_tls"} 40
istio_tcp_connections_opened_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="none"} 10
istio_tcp_connections_opened_total{reporter="source",source_workload="client",source_workload_namespace="shop",connection_security_policy="mutual_tls"} 14
istio_tcp_connections_opened_total{reporter="source",source_workload="unknown",source_workload_namespace="unknown",connection_security_policy="none"} 3
# TYPE istio_tcp_connections_closed_total counter
istio_tcp_connections_closed_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="mutual_tls"} 45
# TYPE istio_tcp_received_bytes_total counter
istio_tcp_received_bytes_total{reporter="destination",destination_workload="web",destination_workload_namespace="shop",connection_security_policy="mutual_tls"} 11000
"#;

    #[test]
    fn rates_over_the_interval_open_connections_and_mtls_share() {
        let stats = between(
            &totals(BEFORE),
            &totals(AFTER),
            Duration::from_secs(10),
            None,
        );
        assert_eq!(stats.len(), 2, "{stats:?}");
        let web = stats.iter().find(|s| s.workload == "web").unwrap();
        assert_eq!(web.inbound_connections_per_second, 3.0);
        assert_eq!(web.inbound_open, 5.0);
        assert_eq!(web.inbound_bytes_in_per_second, 1000.0);
        assert_eq!(web.inbound_mtls_share, Some(0.8));
        let client = stats.iter().find(|s| s.workload == "client").unwrap();
        assert_eq!(client.outbound_connections_per_second, 1.0);
        assert_eq!(client.inbound_mtls_share, None);
        // Unknown workloads (clients outside the mesh) have no row.
        assert!(stats.iter().all(|s| s.workload != "unknown"));
        assert!(
            between(
                &totals(BEFORE),
                &totals(AFTER),
                Duration::from_secs(10),
                Some("other")
            )
            .is_empty()
        );
    }

    #[test]
    fn an_agent_restart_between_scrapes_counts_from_zero() {
        let stats = between(
            &totals(AFTER),
            &totals(BEFORE),
            Duration::from_secs(10),
            None,
        );
        // 50 opened before, 20 after: the 20 of the new agent, over 10 s.
        let web = stats.iter().find(|s| s.workload == "web").unwrap();
        assert_eq!(web.inbound_connections_per_second, 2.0);
        let table = render(&stats);
        assert!(table.starts_with("NAMESPACE  WORKLOAD"), "{table}");
        assert!(table.contains("100 B/s"), "{table}");
        assert_eq!(per_second(1234.0), "1.2 kB/s");
    }
}
