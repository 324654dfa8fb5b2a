//! Local rate limits of the waypoint: Ambit's `RateLimitPolicy` (there is no Istio field;
//! Istio users write an EnvoyFilter with Envoy's `local_ratelimit`), validated and resolved,
//! whatever front end described it (the mesh file's `rateLimitPolicies`, the Kubernetes CRD).
//!
//! A policy attaches to a service (every request the waypoint routes for it) or to one named
//! route of a service; the route's policy, when there is one, replaces the service's for the
//! route's requests (the most specific attachment wins, as Gateway API policies merge). Each
//! carries a token bucket shared by every client, one per client identity, or both. The waypoint
//! enforces them (`waypoint::ratelimit`).
use std::{collections::BTreeMap, time::Duration};

use serde::{Serialize, Serializer};

/// Envoy's `TokenBucket`: `max_tokens` at most, `tokens_per_fill` added every `fill_interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenBucket {
    /// The bucket's size: the burst allowed after a quiet period (at least 1).
    pub max_tokens: u32,
    /// Tokens added per fill (at least 1, at most `max_tokens`).
    pub tokens_per_fill: u32,
    /// How often tokens are added (at least 50 ms, as Envoy requires).
    #[serde(serialize_with = "duration")]
    pub fill_interval: Duration,
}

impl TokenBucket {
    /// The time one token takes to come back: `fill_interval / tokens_per_fill`.
    pub fn per_token(&self) -> Duration {
        self.fill_interval / self.tokens_per_fill.max(1)
    }

    /// The time an empty bucket takes to fill up.
    pub fn refill(&self) -> Duration {
        self.per_token().saturating_mul(self.max_tokens)
    }
}

/// One policy's limits, as it applies to one service or route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// The resource it comes from, e.g. `RateLimitPolicy shop/web-limit`, for logs.
    pub source: String,
    /// One bucket for every request of the target (Envoy's route-level `token_bucket`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_bucket: Option<TokenBucket>,
    /// One bucket per client identity (SPIFFE id of the HBONE peer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_identity: Option<TokenBucket>,
    /// Whether responses carry the deciding bucket's `x-ratelimit-*` headers (Envoy's
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`; off by default, as Envoy's: the level of a
    /// shared bucket is then no caller's to read).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub x_ratelimit_headers: bool,
}

/// The rate limits of one service: the service-wide one and the per-route ones.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceRateLimits {
    /// For every request of the service without a route of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<RateLimit>,
    /// By route name: for the requests that route takes.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub routes: BTreeMap<String, RateLimit>,
}

impl ServiceRateLimits {
    /// The limit of a request that took the route named `route` (`None`: an unnamed route, or
    /// no route), and the route name it is kept under (`None`: the service's).
    pub fn for_route(&self, route: Option<&str>) -> Option<(&RateLimit, Option<&str>)> {
        if let Some(name) = route
            && let Some((name, limit)) = self.routes.get_key_value(name)
        {
            return Some((limit, Some(name.as_str())));
        }
        self.service.as_ref().map(|limit| (limit, None))
    }
}

fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(source: &str) -> RateLimit {
        RateLimit {
            source: source.into(),
            token_bucket: None,
            x_ratelimit_headers: false,
            per_identity: Some(TokenBucket {
                max_tokens: 10,
                tokens_per_fill: 5,
                fill_interval: Duration::from_secs(1),
            }),
        }
    }

    #[test]
    fn a_route_policy_replaces_the_service_policy_for_its_route_only() {
        let mut limits = ServiceRateLimits {
            service: Some(limit("service")),
            ..Default::default()
        };
        limits.routes.insert("api".into(), limit("route"));
        let (l, route) = limits.for_route(Some("api")).unwrap();
        assert_eq!((l.source.as_str(), route), ("route", Some("api")));
        let (l, route) = limits.for_route(Some("other")).unwrap();
        assert_eq!((l.source.as_str(), route), ("service", None));
        assert_eq!(limits.for_route(None).unwrap().0.source, "service");
        limits.service = None;
        assert!(limits.for_route(Some("other")).is_none());
    }

    #[test]
    fn bucket_times() {
        let bucket = TokenBucket {
            max_tokens: 10,
            tokens_per_fill: 5,
            fill_interval: Duration::from_secs(1),
        };
        assert_eq!(bucket.per_token(), Duration::from_millis(200));
        assert_eq!(bucket.refill(), Duration::from_secs(2));
    }
}
