//! The metadata headers of an HBONE CONNECT request, as ztunnel writes and reads them.
//!
//! - `forwarded: for="<original client ip:port>"[;host=<service hostname>]` (RFC 7239): who
//!   opened the tunnelled connection, since the tunnel's own TCP peer is a proxy.
//! - `baggage: k8s.cluster.name=..,k8s.namespace.name=..,...` (W3C baggage): the source
//!   workload's metadata for the destination's metrics.
//! - `traceparent` (W3C trace context): passed through unchanged.
use std::net::{IpAddr, SocketAddr};

use http::{HeaderMap, HeaderName, header::FORWARDED};

/// The W3C baggage header.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
/// The W3C trace-context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// The source workload's metadata, sent in the `baggage` header. Absent fields are left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    /// `k8s.cluster.name`.
    pub cluster: Option<String>,
    /// `k8s.namespace.name`.
    pub namespace: Option<String>,
    /// The `<kind>` of `k8s.<kind>.name`: `deployment`, `pod`, `job`, `cronjob`... (`pod` when
    /// unset).
    pub workload_kind: Option<String>,
    /// The value of `k8s.<kind>.name`.
    pub workload_name: Option<String>,
    /// `service.name` (the canonical service).
    pub service_name: Option<String>,
    /// `service.version` (the canonical revision).
    pub service_version: Option<String>,
    /// `cloud.region`.
    pub region: Option<String>,
    /// `cloud.availability_zone`.
    pub zone: Option<String>,
}

impl Baggage {
    /// The header value; empty when no field is set.
    pub fn to_header_value(&self) -> String {
        let kind = self.workload_kind.as_deref().unwrap_or("pod");
        let workload_key = format!("k8s.{kind}.name");
        let fields = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (workload_key.as_str(), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ];
        let pairs: Vec<String> = fields
            .iter()
            .filter_map(|(key, value)| value.as_ref().map(|v| format!("{key}={v}")))
            .collect();
        pairs.join(",")
    }

    /// Reads all `baggage` headers; unknown keys, empty values and malformed entries are
    /// ignored (baggage is informational and must never fail a connection).
    pub fn from_headers(headers: &HeaderMap) -> Self {
        let mut baggage = Self::default();
        let entries = headers
            .get_all(BAGGAGE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','));
        for entry in entries {
            // Members may carry `;property` suffixes (W3C); we use the bare value.
            let entry = entry.split(';').next().unwrap_or_default();
            let Some((key, value)) = entry.split_once('=') else {
                continue;
            };
            let (key, value) = (key.trim(), value.trim());
            if value.is_empty() {
                continue;
            }
            let value = Some(value.to_string());
            match key {
                "k8s.cluster.name" => baggage.cluster = value,
                "k8s.namespace.name" => baggage.namespace = value,
                "service.name" => baggage.service_name = value,
                "service.version" => baggage.service_version = value,
                "cloud.region" => baggage.region = value,
                "cloud.availability_zone" => baggage.zone = value,
                other => {
                    if let Some(kind) = other
                        .strip_prefix("k8s.")
                        .and_then(|k| k.strip_suffix(".name"))
                    {
                        baggage.workload_kind = Some(kind.to_string());
                        baggage.workload_name = value;
                    }
                }
            }
        }
        baggage
    }
}

/// The `forwarded` header value for a connection opened by `source`, optionally addressed to
/// the service `host`: `for="<ip:port>"[;host=<host>]`. The address is quoted because an IPv6
/// address with a port (`[::1]:80`) needs quoting in RFC 7239.
pub fn forwarded(source: SocketAddr, host: Option<&str>) -> String {
    match host {
        Some(host) => format!("for=\"{source}\";host={host}"),
        None => format!("for=\"{source}\""),
    }
}

/// The original client named by the first `for=` of the `forwarded` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardedFor {
    /// Its address.
    pub ip: IpAddr,
    /// Its port, when the sender included one (ztunnel and Ambit do).
    pub port: Option<u16>,
}

/// Parses the first `for=` element of the `forwarded` header; `None` when absent or not an
/// address (RFC 7239 also allows obfuscated identifiers such as `for=_hidden`).
pub fn forwarded_for(headers: &HeaderMap) -> Option<ForwardedFor> {
    let value = headers.get(FORWARDED)?.to_str().ok()?;
    // The first element (before any `,`) is the hop closest to the original client.
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })?;
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(ForwardedFor {
            ip: addr.ip().to_canonical(),
            port: Some(addr.port()),
        });
    }
    let bare = node.trim_start_matches('[').trim_end_matches(']');
    let ip = bare.parse::<IpAddr>().ok()?;
    Some(ForwardedFor {
        ip: ip.to_canonical(),
        port: None,
    })
}

/// Service hostname named by the `host=` parameter of the first `forwarded` element.
pub fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(FORWARDED)?.to_str().ok()?;
    let first = value.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("host")
            .then(|| value.trim().trim_matches('"').to_string())
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn headers(name: HeaderName, value: &str) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.append(name, HeaderValue::from_str(value).unwrap());
        map
    }

    #[test]
    fn baggage_round_trips() {
        let baggage = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("shop".into()),
            workload_kind: Some("deployment".into()),
            workload_name: Some("web".into()),
            service_name: Some("web".into()),
            service_version: Some("v1".into()),
            region: None,
            zone: Some("z1".into()),
        };
        let value = baggage.to_header_value();
        assert_eq!(
            value,
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=web,\
             service.name=web,service.version=v1,cloud.availability_zone=z1"
        );
        assert_eq!(Baggage::from_headers(&headers(BAGGAGE, &value)), baggage);
    }

    #[test]
    fn baggage_ignores_empty_and_unknown() {
        let parsed = Baggage::from_headers(&headers(
            BAGGAGE,
            "k8s.cluster.name=,foo=bar,garbage,k8s.namespace.name=ns",
        ));
        assert_eq!(
            parsed,
            Baggage {
                namespace: Some("ns".into()),
                ..Default::default()
            }
        );
        assert_eq!(Baggage::default().to_header_value(), "");
    }

    #[test]
    fn forwarded_round_trips() {
        let v4: SocketAddr = "10.0.0.1:4321".parse().unwrap();
        let map = headers(
            FORWARDED,
            &forwarded(v4, Some("web.shop.svc.cluster.local")),
        );
        assert_eq!(
            forwarded_for(&map),
            Some(ForwardedFor {
                ip: v4.ip(),
                port: Some(4321)
            })
        );
        assert_eq!(
            forwarded_host(&map).as_deref(),
            Some("web.shop.svc.cluster.local")
        );

        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        let map = headers(FORWARDED, &forwarded(v6, None));
        assert_eq!(map.get(FORWARDED).unwrap(), "for=\"[fd00::1]:80\"");
        assert_eq!(
            forwarded_for(&map),
            Some(ForwardedFor {
                ip: v6.ip(),
                port: Some(80)
            })
        );
    }

    #[test]
    fn forwarded_for_without_port_or_address() {
        let map = headers(FORWARDED, "for=192.0.2.60;proto=http, for=198.51.100.17");
        assert_eq!(
            forwarded_for(&map),
            Some(ForwardedFor {
                ip: "192.0.2.60".parse().unwrap(),
                port: None
            })
        );
        assert_eq!(
            forwarded_for(&headers(FORWARDED, "for=\"[2001:db8::1]\"")),
            Some(ForwardedFor {
                ip: "2001:db8::1".parse().unwrap(),
                port: None
            })
        );
        assert_eq!(forwarded_for(&headers(FORWARDED, "for=_hidden")), None);
    }
}
