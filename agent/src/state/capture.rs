//! Per-pod capture exclusions: what of one pod's traffic the mesh leaves alone.
//!
//! The same three lists come from the mesh file (a workload's `excludeOutboundPorts`,
//! `excludeOutboundCidrs`, `excludeInboundPorts`) and from a pod's annotations in Kubernetes
//! mode (`ambit.dev/exclude-outbound-ports`, `ambit.dev/exclude-outbound-cidrs`,
//! `ambit.dev/exclude-inbound-ports`), with the semantics of Istio's sidecar annotations
//! `traffic.sidecar.istio.io/excludeOutboundPorts|excludeOutboundIPRanges|excludeInboundPorts`:
//! an excluded outbound destination is connected directly, an excluded inbound port reaches the
//! application directly (plaintext, no policy). One validation serves both sources, so a value
//! is accepted or refused the same way wherever it is written; each source reports a refusal
//! its own way (the mesh file is rejected; a pod keeps no exclusions and is reported).
//!
//! The lists are bounded ([`limits::MAX_POD_EXCLUSIONS`]) so one pod cannot fill the node's
//! exclusion maps, and the proxy's own ports ([`POD_PROXY_PORTS`]) cannot be excluded inbound:
//! they belong to the agent.
use std::{collections::BTreeMap, fmt};

use ambit_common::{POD_PROXY_PORTS, limits};
use ipnet::IpNet;
use serde::Serialize;

/// Which list a value belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExclusionList {
    /// Destination ports of outbound TCP left alone.
    OutboundPorts,
    /// Destination networks of outbound TCP left alone.
    OutboundCidrs,
    /// Ports of the pod whose inbound TCP reaches the application directly.
    InboundPorts,
}

impl ExclusionList {
    /// Every list, in the order they are read.
    pub const ALL: [Self; 3] = [Self::OutboundPorts, Self::OutboundCidrs, Self::InboundPorts];

    /// The pod annotation of this list (Kubernetes mode).
    pub const fn annotation(self) -> &'static str {
        match self {
            Self::OutboundPorts => "ambit.dev/exclude-outbound-ports",
            Self::OutboundCidrs => "ambit.dev/exclude-outbound-cidrs",
            Self::InboundPorts => "ambit.dev/exclude-inbound-ports",
        }
    }

    /// The workload field of this list (mesh file).
    pub const fn field(self) -> &'static str {
        match self {
            Self::OutboundPorts => "excludeOutboundPorts",
            Self::OutboundCidrs => "excludeOutboundCidrs",
            Self::InboundPorts => "excludeInboundPorts",
        }
    }
}

/// Why one value of a list was refused. Its `Display` is the reason alone; the caller names
/// the pod and the field or annotation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExclusionError {
    /// Not a port number.
    #[error("{0:?} is not a port number")]
    NotAPort(String),
    /// A port outside 1..=65535.
    #[error("{0} is out of range 1..=65535")]
    PortOutOfRange(i64),
    /// An inbound port the agent listens on in every pod.
    #[error(
        "{0} is one of the agent's own ports in the pod ({ports}), which cannot be excluded",
        ports = reserved_ports()
    )]
    ReservedPort(u16),
    /// Not a CIDR.
    #[error("invalid CIDR {0:?}")]
    NotACidr(String),
    /// More entries than a pod may have.
    #[error("{0} entries, more than the {max} a pod may have", max = limits::MAX_POD_EXCLUSIONS)]
    TooMany(usize),
}

fn reserved_ports() -> String {
    POD_PROXY_PORTS.map(|p| p.to_string()).join(", ")
}

/// A refusal, with the list and the value's index in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The list.
    pub list: ExclusionList,
    /// The entry's index, or `None` when the list as a whole is refused (too long).
    pub index: Option<usize>,
    /// Why.
    pub error: ExclusionError,
}

/// One pod's capture exclusions, validated: sorted, without duplicates.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CaptureExclusions {
    /// Outbound TCP to these destination ports goes directly, unmeshed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outbound_ports: Vec<u16>,
    /// Outbound TCP to these networks goes directly, unmeshed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outbound_cidrs: Vec<IpNet>,
    /// Inbound TCP to these ports of the pod reaches the application directly: plaintext, no
    /// peer authentication, no policy.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub inbound_ports: Vec<u16>,
    /// Kubernetes mode: why the pod's annotations were refused. The lists are then empty (the
    /// pod's traffic is captured whole: fail closed) and the agent reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
}

impl CaptureExclusions {
    /// True when nothing is excluded.
    pub fn is_empty(&self) -> bool {
        self.outbound_ports.is_empty()
            && self.outbound_cidrs.is_empty()
            && self.inbound_ports.is_empty()
    }

    /// True when nothing is excluded and nothing was refused (nothing worth showing).
    pub fn is_unset(&self) -> bool {
        self.is_empty() && self.refused.is_none()
    }

    /// Validates the three lists (as given: numbers may be out of range, CIDRs unparsed).
    pub fn new(
        outbound_ports: &[i64],
        outbound_cidrs: &[impl AsRef<str>],
        inbound_ports: &[i64],
    ) -> Result<Self, Refusal> {
        Ok(Self {
            outbound_ports: ports(ExclusionList::OutboundPorts, outbound_ports)?,
            outbound_cidrs: cidrs(outbound_cidrs)?,
            inbound_ports: ports(ExclusionList::InboundPorts, inbound_ports)?,
            refused: None,
        })
    }

    /// A pod's exclusions from its annotations (comma-separated lists, as Istio's; blanks
    /// around entries and empty entries are ignored). Other annotations are ignored.
    pub fn from_annotations(annotations: &BTreeMap<String, String>) -> Result<Self, Refusal> {
        let numbers = |which: ExclusionList| -> Result<Vec<i64>, Refusal> {
            let texts = list_of(which, annotations);
            list(which, &texts)?
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    text.parse::<i64>().map_err(|_| Refusal {
                        list: which,
                        index: Some(index),
                        error: ExclusionError::NotAPort(text.clone()),
                    })
                })
                .collect()
        };
        Self::new(
            &numbers(ExclusionList::OutboundPorts)?,
            &list_of(ExclusionList::OutboundCidrs, annotations),
            &numbers(ExclusionList::InboundPorts)?,
        )
    }

    /// Kubernetes mode: the annotations' exclusions, or, if a value is refused, none at all
    /// with the reason kept in [`Self::refused`] (naming the annotation and the value).
    pub fn from_annotations_or_none(annotations: &BTreeMap<String, String>) -> Self {
        match Self::from_annotations(annotations) {
            Ok(exclusions) => exclusions,
            Err(refusal) => Self {
                refused: Some(format!(
                    "annotation {}: {}",
                    refusal.list.annotation(),
                    refusal.error
                )),
                ..Self::default()
            },
        }
    }
}

/// The entries of `list`'s annotation (trimmed, empty ones dropped).
fn list_of(list: ExclusionList, annotations: &BTreeMap<String, String>) -> Vec<String> {
    annotations
        .get(list.annotation())
        .map(|text| {
            text.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `entries`, if there are not too many of them.
fn list<T>(list: ExclusionList, entries: &[T]) -> Result<&[T], Refusal> {
    if entries.len() > limits::MAX_POD_EXCLUSIONS {
        return Err(Refusal {
            list,
            index: None,
            error: ExclusionError::TooMany(entries.len()),
        });
    }
    Ok(entries)
}

fn ports(which: ExclusionList, values: &[i64]) -> Result<Vec<u16>, Refusal> {
    let mut ports = Vec::with_capacity(values.len());
    for (index, &value) in list(which, values)?.iter().enumerate() {
        let refuse = |error| Refusal {
            list: which,
            index: Some(index),
            error,
        };
        let port = match u16::try_from(value) {
            Ok(port) if port != 0 => port,
            _ => return Err(refuse(ExclusionError::PortOutOfRange(value))),
        };
        if which == ExclusionList::InboundPorts && POD_PROXY_PORTS.contains(&port) {
            return Err(refuse(ExclusionError::ReservedPort(port)));
        }
        ports.push(port);
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

fn cidrs(values: &[impl AsRef<str>]) -> Result<Vec<IpNet>, Refusal> {
    let which = ExclusionList::OutboundCidrs;
    let mut nets = Vec::with_capacity(values.len());
    for (index, text) in list(which, values)?.iter().enumerate() {
        let text = text.as_ref();
        let net = text.parse::<IpNet>().map_err(|_| Refusal {
            list: which,
            index: Some(index),
            error: ExclusionError::NotACidr(text.to_string()),
        })?;
        // Host bits set (10.0.0.1/8) name the same network; the maps want it clean.
        nets.push(net.trunc());
    }
    nets.sort_unstable();
    nets.dedup();
    Ok(nets)
}

impl fmt::Display for ExclusionList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.field())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_CIDRS: [&str; 0] = [];

    fn annotations(pairs: &[(ExclusionList, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(list, value)| (list.annotation().to_string(), value.to_string()))
            .collect()
    }

    #[test]
    fn annotations_are_comma_separated_trimmed_sorted_and_deduplicated() {
        let got = CaptureExclusions::from_annotations(&annotations(&[
            (ExclusionList::OutboundPorts, " 5432, 22,,22 "),
            (ExclusionList::OutboundCidrs, "10.1.2.3/16, 2001:db8::/32"),
            (ExclusionList::InboundPorts, "9090"),
        ]))
        .unwrap();
        assert_eq!(got.outbound_ports, [22, 5432]);
        assert_eq!(
            got.outbound_cidrs,
            [
                "10.1.0.0/16".parse::<IpNet>().unwrap(),
                "2001:db8::/32".parse().unwrap()
            ]
        );
        assert_eq!(got.inbound_ports, [9090]);
        assert!(!got.is_empty());
        // No annotation, or an empty one: nothing excluded.
        let none = CaptureExclusions::from_annotations(&annotations(&[(
            ExclusionList::OutboundPorts,
            "",
        )]))
        .unwrap();
        assert!(none.is_empty());
        let mut other = BTreeMap::new();
        other.insert(
            "traffic.sidecar.istio.io/excludeOutboundPorts".into(),
            "22".into(),
        );
        assert!(
            CaptureExclusions::from_annotations(&other)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn bad_values_are_refused_naming_them() {
        let cases = [
            (
                ExclusionList::OutboundPorts,
                "22,ssh",
                Some(1),
                "\"ssh\" is not a port number",
            ),
            (
                ExclusionList::OutboundPorts,
                "0",
                Some(0),
                "0 is out of range 1..=65535",
            ),
            (
                ExclusionList::InboundPorts,
                "65536",
                Some(0),
                "65536 is out of range 1..=65535",
            ),
            (
                ExclusionList::InboundPorts,
                "-1",
                Some(0),
                "-1 is out of range 1..=65535",
            ),
            (
                ExclusionList::InboundPorts,
                "80,15008",
                Some(1),
                "15008 is one of the agent's own ports in the pod (15001, 15006, 15008), which cannot be excluded",
            ),
            (
                ExclusionList::OutboundCidrs,
                "10.0.0.0/33",
                Some(0),
                "invalid CIDR \"10.0.0.0/33\"",
            ),
            (
                ExclusionList::OutboundCidrs,
                "10.0.0.1",
                Some(0),
                "invalid CIDR \"10.0.0.1\"",
            ),
        ];
        for (list, value, index, reason) in cases {
            let refusal = CaptureExclusions::from_annotations(&annotations(&[(list, value)]))
                .expect_err(value);
            assert_eq!(refusal.list, list, "{value}");
            assert_eq!(refusal.index, index, "{value}");
            assert_eq!(refusal.error.to_string(), reason);
        }
        // The proxy's ports are the agent's only inbound: outbound they are ordinary ports.
        assert!(CaptureExclusions::new(&[15008], &NO_CIDRS, &[]).is_ok());
    }

    #[test]
    fn lists_are_bounded() {
        let max = limits::MAX_POD_EXCLUSIONS;
        let ports: Vec<String> = (1..=max + 1).map(|p| p.to_string()).collect();
        let refusal = CaptureExclusions::from_annotations(&annotations(&[(
            ExclusionList::InboundPorts,
            &ports.join(","),
        )]))
        .unwrap_err();
        assert_eq!(refusal.error, ExclusionError::TooMany(max + 1));
        assert_eq!(refusal.index, None);
        let ok: Vec<i64> = (1..=max as i64).collect();
        assert_eq!(
            CaptureExclusions::new(&ok, &NO_CIDRS, &ok)
                .unwrap()
                .inbound_ports
                .len(),
            max
        );
        let cidrs: Vec<String> = (0..=max).map(|i| format!("10.0.{i}.0/24")).collect();
        assert_eq!(
            CaptureExclusions::new(&[], &cidrs, &[]).unwrap_err().error,
            ExclusionError::TooMany(max + 1)
        );
    }

    #[test]
    fn a_refused_annotation_leaves_no_exclusions_and_says_why() {
        let got = CaptureExclusions::from_annotations_or_none(&annotations(&[
            (ExclusionList::OutboundPorts, "22"),
            (ExclusionList::OutboundCidrs, "10.0.0.0/8,banana"),
        ]));
        assert!(got.is_empty());
        assert_eq!(
            got.refused.as_deref(),
            Some("annotation ambit.dev/exclude-outbound-cidrs: invalid CIDR \"banana\"")
        );
    }
}
