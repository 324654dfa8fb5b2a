//! Gateway API `HTTPRoute` and `GRPCRoute` (`gateway.networking.k8s.io/v1`) whose
//! `parentRefs` name Services (GAMMA), read from the API server and converted into the state's
//! route model by the mesh file's conversion (`discovery::file::gateway_route`): the same
//! fields are supported, the same rules hold, the problems name the same fields (under
//! `spec.`).
//!
//! What is Kubernetes' own lives here: which routes are Ambit's (those with a Service parent;
//! routes of Gateways belong to their gateway's controller and are left alone), their order
//! (the oldest first, then by namespace and name, as the Gateway API ranks routes), a rejected
//! route keeping its last accepted version in force (as a rejected VirtualService does), and
//! the verdict on each Service parent, which the status writer (`route_status`) writes in
//! `status.parents[]` under Ambit's `controllerName` with the Gateway API's conditions:
//! `Accepted` (reasons `Accepted`, `UnsupportedValue`, `NoMatchingParent`) and `ResolvedRefs`
//! (`ResolvedRefs`, `BackendNotFound`, `InvalidKind`, `RefNotPermitted`).
//!
//! A Service routed by both a VirtualService and Gateway API routes takes the Gateway API
//! routes (docs/waypoint.md, "Both front ends on one service").
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

use super::{
    gateway::{GATEWAY_API_VERSION, GATEWAY_GROUP},
    routes::{RouteKey, RouteKind},
    security::creation_order,
};
use crate::{
    discovery::file::{
        CheckedGatewayRoute, GatewayKind, GatewayProblem, gateway_route, known_services,
        merge_gateway_routes,
    },
    state::{Service, routes::ServiceRoutes},
};

// The status is kept as JSON: other controllers' `parents[]` entries stay as they are.
super::spec_resource!(
    /// An `httproutes.gateway.networking.k8s.io/v1` resource.
    HttpRouteResource,
    status: Value,
    GATEWAY_API_VERSION,
    GATEWAY_GROUP,
    "HTTPRoute",
    "httproutes"
);
super::spec_resource!(
    /// A `grpcroutes.gateway.networking.k8s.io/v1` resource.
    GrpcRouteResource,
    status: Value,
    GATEWAY_API_VERSION,
    GATEWAY_GROUP,
    "GRPCRoute",
    "grpcroutes"
);

/// One condition as Ambit judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteCondition {
    /// `True` or `False`.
    pub status: bool,
    /// The Gateway API reason.
    pub reason: &'static str,
    /// What it means here.
    pub message: String,
}

/// The verdict on one Service parent of a route: its `status.parents[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ParentVerdict {
    /// The `parentRef` as written in the spec.
    pub parent_ref: Value,
    /// `Accepted`.
    pub accepted: RouteCondition,
    /// `ResolvedRefs`.
    pub resolved_refs: RouteCondition,
}

/// The Gateway API routes of the cluster, and the verdict on each of Ambit's.
#[derive(Debug, Default)]
pub struct ConvertedGatewayRoutes {
    /// The routes of each Service some route binds.
    pub by_service: BTreeMap<String, ServiceRoutes>,
    /// Per route with a Service parent: the verdict on each such parent.
    pub verdicts: HashMap<RouteKey, Vec<ParentVerdict>>,
    /// The spec in force of each route: the current one if accepted, else its last accepted
    /// one (given back as `last_good` next time).
    pub in_force: HashMap<RouteKey, Value>,
}

fn route_kind(kind: GatewayKind) -> RouteKind {
    match kind {
        GatewayKind::HttpRoute => RouteKind::HttpRoute,
        GatewayKind::GrpcRoute => RouteKind::GrpcRoute,
    }
}

/// A problem of the shared conversion, its field named from `spec`.
fn under_spec(problem: GatewayProblem) -> GatewayProblem {
    GatewayProblem {
        field: problem.field.trim_start_matches('.').to_string(),
        ..problem
    }
}

/// The `parentRefs` of `spec` that name Services, as written.
fn service_parents(spec: &Value) -> Vec<Value> {
    spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|parent| {
            let group = parent["group"]
                .as_str()
                .unwrap_or("gateway.networking.k8s.io");
            let kind = parent["kind"].as_str().unwrap_or("Gateway");
            (group.is_empty() || group == "core") && kind == "Service"
        })
        .cloned()
        .collect()
}

/// The verdicts on the parents of a route that converted.
fn verdicts(route: &CheckedGatewayRoute) -> Vec<ParentVerdict> {
    let resolved_refs = match route.unresolved.first() {
        None => RouteCondition {
            status: true,
            reason: "ResolvedRefs",
            message: "every backendRef resolves".into(),
        },
        Some(first) => RouteCondition {
            status: false,
            reason: first.reason.as_str(),
            message: format!(
                "{} (a rule with a backend that does not resolve answers 500; a mirror that does \
                 not resolve is not sent)",
                route
                    .unresolved
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        },
    };
    route
        .parents
        .iter()
        .map(|parent| ParentVerdict {
            parent_ref: parent.parent_ref.clone(),
            accepted: match &parent.bound {
                Ok((uid, _)) => RouteCondition {
                    status: true,
                    reason: "Accepted",
                    message: format!("{} route(s) for service {uid}", route.entries.len()),
                },
                Err(problem) => RouteCondition {
                    status: false,
                    reason: problem.reason.as_str(),
                    message: problem.to_string(),
                },
            },
            resolved_refs: resolved_refs.clone(),
        })
        .collect()
}

/// Converts every Gateway API route with a Service parent against `services`; `last_good`
/// holds the specs in force after the previous conversion ([`ConvertedGatewayRoutes::in_force`]),
/// used for the routes now rejected.
pub fn convert_gateway_routes(
    http_routes: &[Arc<HttpRouteResource>],
    grpc_routes: &[Arc<GrpcRouteResource>],
    services: &[Service],
    last_good: &HashMap<RouteKey, Value>,
) -> ConvertedGatewayRoutes {
    let known = known_services(services);
    let mut resources: Vec<(GatewayKind, &ObjectMeta, &Value)> = http_routes
        .iter()
        .map(|r| (GatewayKind::HttpRoute, &r.metadata, &r.spec))
        .chain(
            grpc_routes
                .iter()
                .map(|r| (GatewayKind::GrpcRoute, &r.metadata, &r.spec)),
        )
        .collect();
    resources.sort_by(|a, b| creation_order(a.1).cmp(&creation_order(b.1)));
    let mut out = ConvertedGatewayRoutes::default();
    let mut checked = Vec::new();
    for (kind, meta, spec) in resources {
        let key = RouteKey::of(route_kind(kind), meta);
        let convert = |spec: &Value| {
            let mut route = gateway_route("", kind, &key.namespace, &key.name, spec, &known)
                .map_err(under_spec)?;
            for parent in &mut route.parents {
                if let Err(problem) = &mut parent.bound {
                    *problem = under_spec(problem.clone());
                }
            }
            for problem in &mut route.unresolved {
                *problem = under_spec(problem.clone());
            }
            Ok::<_, GatewayProblem>(route)
        };
        match convert(spec) {
            // Not a mesh route: its parents are Gateways, not Ambit's.
            Ok(route) if route.parents.is_empty() => {}
            Ok(route) => {
                out.verdicts.insert(key.clone(), verdicts(&route));
                out.in_force.insert(key, spec.clone());
                checked.push(route);
            }
            Err(problem) => {
                let parents = service_parents(spec);
                if parents.is_empty() {
                    continue;
                }
                let rejected = parents
                    .into_iter()
                    .map(|parent_ref| ParentVerdict {
                        parent_ref,
                        accepted: RouteCondition {
                            status: false,
                            reason: problem.reason.as_str(),
                            message: problem.to_string(),
                        },
                        resolved_refs: RouteCondition {
                            status: true,
                            reason: "ResolvedRefs",
                            message: "not checked: the route is not accepted".into(),
                        },
                    })
                    .collect();
                out.verdicts.insert(key.clone(), rejected);
                // The same verdict whoever judges (the status writer has no last good version).
                if let Some(previous) = last_good.get(&key).filter(|previous| *previous != spec)
                    && let Ok(route) = convert(previous)
                    && !route.parents.is_empty()
                {
                    out.in_force.insert(key, previous.clone());
                    checked.push(route);
                }
            }
        }
    }
    out.by_service = merge_gateway_routes(&checked.iter().collect::<Vec<_>>());
    out
}

#[cfg(test)]
mod tests;
