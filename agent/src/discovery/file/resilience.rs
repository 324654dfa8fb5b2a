//! The resilience fields of a VirtualService's `http[]` route: `timeout`, `retries`, `mirror`,
//! `mirrorPercentage`, `mirrors` and `fault`, with Istio's names, defaults and meaning, built
//! into the state's [`RouteResilience`].
//!
//! Istio's defaults: no `timeout` (none for HTTP); no `retries` block means Istio's default
//! policy (2 retries on `connect-failure,refused-stream,unavailable,cancelled,
//! retriable-status-codes`), `attempts: 0` means none; `retryOn` replaces the conditions and
//! its numbers are retriable status codes (adding `retriable-status-codes`); a mirror without
//! a percentage copies every request; a fault without `percentage` injects into no request.
//! Istio's deprecated integer `percent` fields and `mirrorPercent` are refused (unknown
//! fields), as is `retryRemoteLocalities: true` (Ambit has no localities to retry across).
use std::{
    collections::{BTreeMap, HashMap},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use super::{ConfigError, DestinationFile, Validator};
use crate::state::{
    Service,
    routes::Subset,
    routes::resilience::{
        AbortError, Fault, FaultAbort, FaultDelay, Mirror, RetryOn, RetryPolicy, RouteResilience,
    },
};

/// Istio's `HTTPRetry`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetryFile {
    /// Retries allowed after the first try (0: none).
    #[serde(default)]
    pub attempts: i64,
    /// Each try's timeout, e.g. `2s` (default: the route's timeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
    /// Comma-separated conditions; numbers are retriable status codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
    /// Retry in other localities (refused when true: Ambit has no localities).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_remote_localities: Option<bool>,
    /// Avoid the endpoints already tried (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// The backoff's base interval (default 25ms; its cap is 10 times it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// Istio's `Percent`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PercentFile {
    /// 0 to 100.
    #[serde(default)]
    pub value: f64,
}

// `Eq` for the file types that embed it; NaN is refused when validated.
impl Eq for PercentFile {}

/// Istio's `HTTPMirrorPolicy` (an entry of `mirrors`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicyFile {
    /// Where copies go.
    pub destination: DestinationFile,
    /// Share copied (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<PercentFile>,
}

/// Istio's `HTTPFaultInjection`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjectionFile {
    /// Delay some requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelayFile>,
    /// Answer some requests with an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbortFile>,
}

/// Istio's `HTTPFaultInjection.Delay`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultDelayFile {
    /// How long, e.g. `5s`.
    pub fixed_delay: String,
    /// Share delayed (absent: none, as Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<PercentFile>,
}

/// Istio's `HTTPFaultInjection.Abort`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultAbortFile {
    /// The HTTP status answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<i64>,
    /// The gRPC status answered, by name (`UNAVAILABLE`) or number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<GrpcStatusFile>,
    /// Share aborted (absent: none, as Istio).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<PercentFile>,
}

/// A gRPC status as Istio's `grpcStatus` takes it: a name such as `UNAVAILABLE` (Istio's form)
/// or its number.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum GrpcStatusFile {
    /// By number.
    Code(i64),
    /// By name.
    Name(String),
}

/// gRPC's status codes by name.
const GRPC_STATUS: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// The resilience fields of one `http[]` route, as the file has them.
pub struct ResilienceFields<'f> {
    /// `timeout`.
    pub timeout: Option<&'f str>,
    /// `retries`.
    pub retries: Option<&'f HttpRetryFile>,
    /// `mirror`.
    pub mirror: Option<&'f DestinationFile>,
    /// `mirrorPercentage`.
    pub mirror_percentage: Option<&'f PercentFile>,
    /// `mirrors`.
    pub mirrors: &'f [HttpMirrorPolicyFile],
    /// `fault`.
    pub fault: Option<&'f HttpFaultInjectionFile>,
}

impl Validator<'_> {
    /// Checks the resilience fields of the route at `at` and builds them.
    pub(super) fn resilience(
        &self,
        at: &str,
        fields: ResilienceFields<'_>,
        namespace: &str,
        known: &HashMap<(&str, &str), &Service>,
        subsets: &HashMap<String, BTreeMap<String, Subset>>,
    ) -> Result<RouteResilience, ConfigError> {
        let mut out = RouteResilience::default();
        if let Some(timeout) = fields.timeout {
            out.timeout = Some(self.duration(&format!("{at}.timeout"), timeout)?);
        }
        if let Some(retries) = fields.retries {
            out.retries = self.retries(&format!("{at}.retries"), retries)?;
        }
        if fields.mirror.is_some() && !fields.mirrors.is_empty() {
            return Err(self.invalid(
                format!("{at}.mirrors"),
                "set either mirror (with mirrorPercentage) or mirrors, not both",
            ));
        }
        if fields.mirror.is_none() && fields.mirror_percentage.is_some() {
            return Err(self.invalid(
                format!("{at}.mirrorPercentage"),
                "needs a mirror to apply to",
            ));
        }
        if let Some(mirror) = fields.mirror {
            let field = format!("{at}.mirror");
            out.mirrors.push(Mirror {
                destination: self.destination(&field, mirror, namespace, known, subsets)?,
                per_million: self.percentage(
                    &format!("{at}.mirrorPercentage"),
                    fields.mirror_percentage,
                    1_000_000,
                )?,
            });
        }
        for (m, mirror) in fields.mirrors.iter().enumerate() {
            let field = format!("{at}.mirrors[{m}]");
            out.mirrors.push(Mirror {
                destination: self.destination(
                    &format!("{field}.destination"),
                    &mirror.destination,
                    namespace,
                    known,
                    subsets,
                )?,
                per_million: self.percentage(
                    &format!("{field}.percentage"),
                    mirror.percentage.as_ref(),
                    1_000_000,
                )?,
            });
        }
        if let Some(fault) = fields.fault {
            out.fault = Some(self.fault(&format!("{at}.fault"), fault)?);
        }
        Ok(out)
    }

    fn retries(&self, at: &str, retries: &HttpRetryFile) -> Result<RetryPolicy, ConfigError> {
        if retries.attempts < 0 {
            return Err(self.invalid(
                format!("{at}.attempts"),
                format!("{} is negative", retries.attempts),
            ));
        }
        if retries.attempts == 0 {
            // Istio: attempts 0 disables retries, whatever else the block says.
            return Ok(RetryPolicy::none());
        }
        let mut policy = RetryPolicy {
            attempts: u32::try_from(retries.attempts)
                .map_err(|_| self.invalid(format!("{at}.attempts"), "is too large".to_string()))?,
            ..RetryPolicy::default()
        };
        if let Some(per_try) = &retries.per_try_timeout {
            policy.per_try_timeout = Some(self.duration(&format!("{at}.perTryTimeout"), per_try)?);
        }
        if let Some(retry_on) = &retries.retry_on {
            let field = format!("{at}.retryOn");
            policy.retry_on.clear();
            for part in retry_on.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                if let Ok(code) = part.parse::<u16>() {
                    if !(100..=599).contains(&code) {
                        return Err(
                            self.invalid(field, format!("{code} is not an HTTP status code"))
                        );
                    }
                    policy.retriable_status_codes.push(code);
                    continue;
                }
                let condition = RetryOn::from_name(part).ok_or_else(|| {
                    self.invalid(
                        field.clone(),
                        format!(
                            "{part:?} is not a supported retry condition (one of {}, or an HTTP \
                             status code)",
                            RetryOn::ALL.map(|(name, _)| name).join(", ")
                        ),
                    )
                })?;
                if !policy.retry_on.contains(&condition) {
                    policy.retry_on.push(condition);
                }
            }
            if !policy.retriable_status_codes.is_empty()
                && !policy.on(RetryOn::RetriableStatusCodes)
            {
                policy.retry_on.push(RetryOn::RetriableStatusCodes);
            }
            if policy.retry_on.is_empty() {
                return Err(self.invalid(field, "names no condition"));
            }
        }
        if retries.retry_remote_localities == Some(true) {
            return Err(self.invalid(
                format!("{at}.retryRemoteLocalities"),
                "true is not supported (Ambit has no localities to retry across)",
            ));
        }
        if let Some(ignore) = retries.retry_ignore_previous_hosts {
            policy.ignore_previous_hosts = ignore;
        }
        if let Some(backoff) = &retries.backoff {
            policy.backoff = self.duration(&format!("{at}.backoff"), backoff)?;
        }
        Ok(policy)
    }

    fn fault(&self, at: &str, fault: &HttpFaultInjectionFile) -> Result<Fault, ConfigError> {
        if fault.delay.is_none() && fault.abort.is_none() {
            return Err(self.invalid(at, "set delay, abort or both"));
        }
        let delay = match &fault.delay {
            Some(delay) => Some(FaultDelay {
                fixed_delay: self
                    .duration(&format!("{at}.delay.fixedDelay"), &delay.fixed_delay)?,
                per_million: self.percentage(
                    &format!("{at}.delay.percentage"),
                    delay.percentage.as_ref(),
                    0,
                )?,
            }),
            None => None,
        };
        let abort = match &fault.abort {
            Some(abort) => {
                let field = format!("{at}.abort");
                let error = match (abort.http_status, &abort.grpc_status) {
                    (Some(status), None) => match u16::try_from(status) {
                        Ok(code) if (200..=599).contains(&code) => AbortError::HttpStatus(code),
                        _ => {
                            return Err(self.invalid(
                                format!("{field}.httpStatus"),
                                format!("{status} is not an HTTP status in 200..=599"),
                            ));
                        }
                    },
                    (None, Some(grpc)) => {
                        let code = match grpc {
                            GrpcStatusFile::Code(n) => u16::try_from(*n)
                                .ok()
                                .filter(|n| usize::from(*n) < GRPC_STATUS.len()),
                            GrpcStatusFile::Name(name) => GRPC_STATUS
                                .iter()
                                .position(|n| *n == name)
                                .and_then(|n| u16::try_from(n).ok()),
                        };
                        AbortError::GrpcStatus(code.filter(|c| *c != 0).ok_or_else(|| {
                            self.invalid(
                                format!("{field}.grpcStatus"),
                                format!(
                                    "{grpc:?} is not a gRPC error status (a name such as \
                                     UNAVAILABLE, or its number 1..=16)"
                                ),
                            )
                        })?)
                    }
                    _ => {
                        return Err(
                            self.invalid(field, "set exactly one of httpStatus, grpcStatus")
                        );
                    }
                };
                Some(FaultAbort {
                    error,
                    per_million: self.percentage(
                        &format!("{field}.percentage"),
                        abort.percentage.as_ref(),
                        0,
                    )?,
                })
            }
            None => None,
        };
        Ok(Fault { delay, abort })
    }

    /// A duration as Istio writes them (`10s`, `500ms`, `1.5s`, `1m`), at least 1 ms.
    pub(super) fn duration(&self, field: &str, text: &str) -> Result<Duration, ConfigError> {
        let duration = humantime::parse_duration(text.trim()).map_err(|e| {
            self.invalid(
                field,
                format!("invalid duration {text:?}: {e} (write e.g. 10s, 500ms, 1.5s, 1m)"),
            )
        })?;
        if duration < Duration::from_millis(1) {
            return Err(self.invalid(field, format!("{text:?} is less than 1ms")));
        }
        Ok(duration)
    }

    /// Istio's `Percent` in parts per million; `default` when absent.
    fn percentage(
        &self,
        field: &str,
        percent: Option<&PercentFile>,
        default: u32,
    ) -> Result<u32, ConfigError> {
        let Some(percent) = percent else {
            return Ok(default);
        };
        if !(0.0..=100.0).contains(&percent.value) {
            return Err(self.invalid(
                format!("{field}.value"),
                format!("{} is not in 0..=100", percent.value),
            ));
        }
        Ok((percent.value * 10_000.0).round() as u32)
    }
}

#[cfg(test)]
mod tests {
    use std::{path::Path, time::Duration};

    use crate::{
        discovery::parse_mesh,
        state::{
            MeshState,
            routes::resilience::{AbortError, RetryOn, RetryPolicy, RouteResilience},
        },
    };

    const MESH: &str = r#"
workloads:
- {name: reviews-0, namespace: default, node: n0, ips: [10.10.0.3], labels: {app: reviews}, netns: {pid: 1}}
services:
- {name: reviews, namespace: default, vips: [10.96.0.10], selector: {app: reviews}, ports: [{port: 9080}], waypoint: {name: waypoint}}
- {name: shadow, namespace: default, vips: [10.96.0.12], selector: {app: shadow}, ports: [{port: 9080}]}
- {name: waypoint, namespace: default, vips: [10.96.0.11], selector: {app: waypoint}, ports: [{port: 15008}]}
virtualServices:
- apiVersion: networking.ambit.dev/v1
  kind: VirtualService
  metadata: {name: reviews}
  spec:
    hosts: [reviews]
    http:
    - route:
      - destination: {host: reviews}
"#;

    /// The mesh with `fields` (YAML lines) added to its route, beside `route`.
    fn parse(fields: &str) -> Result<MeshState, String> {
        let route: String = fields.lines().map(|l| format!("      {l}\n")).collect();
        let text = format!("{MESH}{route}");
        parse_mesh(Path::new("/etc/mesh.yaml"), text.as_bytes()).map_err(|e| e.to_string())
    }

    fn resilience(fields: &str) -> RouteResilience {
        let state = parse(fields).unwrap();
        state.routes().for_service("default/reviews").unwrap().http[0]
            .resilience
            .clone()
    }

    #[test]
    fn istio_defaults_without_the_fields() {
        let r = resilience("");
        assert_eq!(r, RouteResilience::default());
        assert_eq!(r.timeout, None);
        assert_eq!(r.retries.attempts, 2);
        assert_eq!(
            r.retries.retry_on,
            [
                RetryOn::ConnectFailure,
                RetryOn::RefusedStream,
                RetryOn::Unavailable,
                RetryOn::Cancelled,
                RetryOn::RetriableStatusCodes
            ]
        );
        assert!(r.retries.retriable_status_codes.is_empty());
        assert_eq!(r.retries.backoff, Duration::from_millis(25));
    }

    #[test]
    fn timeouts_retries_mirrors_and_faults_parse_with_istios_names() {
        let r = resilience(
            "timeout: 10s\n\
             retries: {attempts: 3, perTryTimeout: 500ms, retryOn: \"gateway-error,503,unavailable\", retryIgnorePreviousHosts: false, backoff: 0.1s}\n\
             mirror: {host: shadow}\n\
             mirrorPercentage: {value: 12.5}\n\
             fault: {delay: {fixedDelay: 1.5s, percentage: {value: 0.1}}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 100}}}",
        );
        assert_eq!(r.timeout, Some(Duration::from_secs(10)));
        assert_eq!(r.retries.attempts, 3);
        assert_eq!(r.retries.per_try_timeout, Some(Duration::from_millis(500)));
        // Numbers are status codes, and make `retriable-status-codes` a condition.
        assert_eq!(
            r.retries.retry_on,
            [
                RetryOn::GatewayError,
                RetryOn::Unavailable,
                RetryOn::RetriableStatusCodes
            ]
        );
        assert_eq!(r.retries.retriable_status_codes, [503]);
        assert!(!r.retries.ignore_previous_hosts);
        assert_eq!(r.retries.backoff, Duration::from_millis(100));
        assert_eq!(r.mirrors.len(), 1);
        assert_eq!(r.mirrors[0].destination.service.name, "shadow");
        assert_eq!(r.mirrors[0].per_million, 125_000);
        let fault = r.fault.unwrap();
        let delay = fault.delay.unwrap();
        assert_eq!(delay.fixed_delay, Duration::from_millis(1500));
        assert_eq!(delay.per_million, 1_000);
        let abort = fault.abort.unwrap();
        assert_eq!(abort.error, AbortError::GrpcStatus(14));
        assert_eq!(abort.per_million, 1_000_000);

        // attempts: 0 disables retries; a mirror without percentage copies everything; a
        // fault without percentage injects into nothing (Istio's defaults).
        let r = resilience(
            "retries: {attempts: 0, retryOn: 5xx}\n\
             mirrors: [{destination: {host: shadow}}]\n\
             fault: {abort: {httpStatus: 418}}",
        );
        assert_eq!(r.retries, RetryPolicy::none());
        assert_eq!(r.mirrors[0].per_million, 1_000_000);
        let abort = r.fault.unwrap().abort.unwrap();
        assert_eq!(abort.error, AbortError::HttpStatus(418));
        assert_eq!(abort.per_million, 0);
    }

    #[test]
    fn bad_values_name_their_field() {
        let at = "virtualServices[0].spec.http[0]";
        let cases = [
            ("timeout: 10", format!("{at}.timeout")),
            ("timeout: 0s", format!("{at}.timeout")),
            ("retries: {attempts: -1}", format!("{at}.retries.attempts")),
            (
                "retries: {attempts: 1, retryOn: \"5xx,sometimes\"}",
                format!("{at}.retries.retryOn"),
            ),
            (
                "retries: {attempts: 1, retryOn: \"999\"}",
                format!("{at}.retries.retryOn"),
            ),
            (
                "retries: {attempts: 1, retryRemoteLocalities: true}",
                format!("{at}.retries.retryRemoteLocalities"),
            ),
            ("mirror: {host: nowhere}", format!("{at}.mirror.host")),
            (
                "mirror: {host: shadow}\nmirrorPercentage: {value: 101}",
                format!("{at}.mirrorPercentage.value"),
            ),
            (
                "mirror: {host: shadow}\nmirrors: [{destination: {host: shadow}}]",
                format!("{at}.mirrors"),
            ),
            (
                "mirrors: [{destination: {host: shadow, subset: v9}}]",
                format!("{at}.mirrors[0].destination.subset"),
            ),
            (
                "fault: {abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}}",
                format!("{at}.fault.abort"),
            ),
            (
                "fault: {abort: {grpcStatus: OK}}",
                format!("{at}.fault.abort.grpcStatus"),
            ),
            (
                "fault: {abort: {httpStatus: 99}}",
                format!("{at}.fault.abort.httpStatus"),
            ),
            (
                "fault: {delay: {fixedDelay: soon}}",
                format!("{at}.fault.delay.fixedDelay"),
            ),
            ("fault: {}", format!("{at}.fault")),
        ];
        for (fields, field) in cases {
            let err = parse(fields).unwrap_err();
            assert!(err.contains(&format!("{field}:")), "{fields}: {err}");
        }
        // Istio's deprecated integer percentages are unknown fields, named by path.
        let err = parse("fault: {delay: {fixedDelay: 1s, percent: 10}}").unwrap_err();
        assert!(
            err.contains(&format!("{at}.fault.delay")) && err.contains("unknown field `percent`"),
            "{err}"
        );
        let err = parse("mirror: {host: shadow}\nmirrorPercent: 10").unwrap_err();
        assert!(err.contains("unknown field `mirrorPercent`"), "{err}");
    }
}
