//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) scraping
//! the bed's metrics endpoints, and its query API.

use std::collections::BTreeMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::Cluster;
use crate::cluster::CA_ADDR;
use crate::tool::Tool;
use crate::util::{self, Netns};

/// Percent-encodes a query parameter value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A free TCP port on `ip` inside the network namespace `netns`.
fn free_port(netns: &Path, ip: Ipv4Addr) -> Result<u16> {
    Netns::enter_thread(netns, || -> Result<u16> {
        let l = std::net::TcpListener::bind((ip, 0))?;
        Ok(l.local_addr()?.port())
    })?
}

/// A Prometheus server running in the fabric namespace.
pub struct Prometheus {
    /// The server process.
    pub tool: Tool,
    addr: SocketAddr,
    netns: PathBuf,
}

impl Prometheus {
    /// Starts a server in the fabric namespace scraping `targets` (`ip:port`) every second and
    /// waits until it is ready.
    pub fn start(cluster: &Cluster, targets: &[String]) -> Result<Prometheus> {
        let netns = Path::new(util::NETNS_DIR).join(cluster.fabric_netns());
        let ip = match CA_ADDR.ip() {
            std::net::IpAddr::V4(ip) => ip,
            std::net::IpAddr::V6(_) => bail!("the fabric address is expected to be IPv4"),
        };
        let addr = SocketAddr::from((ip, free_port(&netns, ip)?));
        let dir = cluster.run_dir().join("prometheus");
        fs::create_dir_all(dir.join("data"))?;
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: ambit\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        fs::write(&config_path, config)?;
        let mut cmd = Command::new("/usr/bin/prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=info");
        let tool = Tool::spawn(
            cluster,
            "prometheus",
            "prometheus",
            &netns,
            cmd,
            dir.join("prometheus.log"),
            false,
        )?;
        let mut prom = Prometheus { tool, addr, netns };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = prom.tool.try_status() {
                bail!("prometheus exited ({s}): {}", prom.tool.log_tail());
            }
            let last = match prom.get("/-/ready") {
                Ok(r) if r.status == 200 => break,
                Ok(r) => format!("HTTP {}: {}", r.status, r.body.trim()),
                Err(e) => format!("{e:#}"),
            };
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready within 60 s (last: {last}): {}",
                prom.tool.log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(prom)
    }

    /// `GET path` on the server.
    pub fn get(&self, path: &str) -> Result<crate::HttpResponse> {
        let addr = self.addr;
        Netns::enter_thread(&self.netns, || {
            util::http_get(addr, path, Duration::from_secs(5))
        })?
    }

    /// `GET /api/v1/query?query=<promql>`: the result vector as (labels, value) pairs.
    pub fn query(&self, promql: &str) -> Result<Vec<(BTreeMap<String, String>, f64)>> {
        let r = self.get(&format!("/api/v1/query?query={}", urlencode(promql)))?;
        let v: Value = serde_json::from_str(&r.body)
            .with_context(|| format!("query answer is not JSON (HTTP {}): {}", r.status, r.body))?;
        ensure!(
            r.status == 200 && v["status"] == "success",
            "query {promql:?} failed: HTTP {}: {v}",
            r.status
        );
        let result = v["data"]["result"]
            .as_array()
            .ok_or_else(|| anyhow!("no data.result in {v}"))?;
        result
            .iter()
            .map(|s| {
                let labels: BTreeMap<String, String> = s["metric"]
                    .as_object()
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let value: f64 = s["value"][1]
                    .as_str()
                    .and_then(|x| x.parse().ok())
                    .ok_or_else(|| anyhow!("bad sample {s}"))?;
                Ok((labels, value))
            })
            .collect()
    }
}

/// Query results keyed by the values of some labels (in order), for comparisons.
pub type Series = BTreeMap<Vec<String>, f64>;

/// A query result keyed by the values of `labels` (in that order), for comparisons.
pub fn by_labels(result: &[(BTreeMap<String, String>, f64)], labels: &[&str]) -> Series {
    result
        .iter()
        .map(|(m, v)| {
            (
                labels
                    .iter()
                    .map(|l| m.get(*l).cloned().unwrap_or_default())
                    .collect(),
                *v,
            )
        })
        .collect()
}

/// A [`Series`] from rows of label values and a value.
pub fn expect(rows: &[(&[&str], f64)]) -> Series {
    rows.iter()
        .map(|(k, v)| (k.iter().map(|s| s.to_string()).collect(), *v))
        .collect()
}
