//! All the policy resources of the cluster converted at once, into the policy set of the state:
//! each resource by [`super::security`]'s rules, oldest first, with the last accepted version of
//! a rejected one kept where that is what stays in force (the routing resources' rule,
//! `super::routes::judge`).
use std::{collections::HashMap, sync::Arc};

use serde_json::Value;

use super::{
    routes::{RouteKey, RouteKind, judge},
    security::{
        Acceptance, AuthorizationPolicyResource, PeerAuthenticationResource,
        RequestAuthenticationResource, authorization_policy, creation_order,
        describe_authentication, peer_authentication, request_authentication,
        request_authentication_of, targets_waypoint, waypoint_authorization_policy,
        waypoint_policy_of,
    },
};
use crate::policy::{
    PolicySet,
    l7::{TargetRef, WaypointPolicies},
};

/// The policies of the cluster, as the node agents and the waypoints enforce them.
#[derive(Debug, Default)]
pub struct ConvertedPolicies {
    /// The policy set of the state.
    pub set: PolicySet,
    /// Each rejected resource and its verdict.
    pub rejected: Vec<(RouteKey, Acceptance)>,
    /// The spec in force of each waypoint AuthorizationPolicy and RequestAuthentication: the
    /// current one if accepted, else its last accepted one when that is what is enforced (to be
    /// given back as `last_good` next time).
    pub in_force: HashMap<RouteKey, Value>,
}

/// Converts every policy resource; see [`authorization_policy`],
/// [`waypoint_authorization_policy`], [`peer_authentication`] and [`request_authentication`].
/// `last_good` holds the specs in force after the previous conversion
/// ([`ConvertedPolicies::in_force`]), used for the resources now rejected (the routing
/// resources' rule, `super::routes::judge`): a rejected RequestAuthentication keeps its last
/// accepted version, and so does a rejected waypoint AuthorizationPolicy whose targets cannot be
/// read (one whose targets can be read fails closed there instead).
///
/// Policies are ordered oldest first (by `creationTimestamp`), except that rejected
/// PeerAuthentications come before accepted ones, so that at their level (selector,
/// namespace, mesh) a rejected one's STRICT wins over an accepted one's mode.
pub fn convert_policies(
    authorizations: &[Arc<AuthorizationPolicyResource>],
    peer_authentications: &[Arc<PeerAuthenticationResource>],
    request_authentications: &[Arc<RequestAuthenticationResource>],
    root_namespace: &str,
    last_good: &HashMap<RouteKey, Value>,
) -> ConvertedPolicies {
    let mut rejected = Vec::new();
    let mut in_force = HashMap::new();
    let mut authorizations: Vec<&AuthorizationPolicyResource> =
        authorizations.iter().map(|r| &**r).collect();
    authorizations.sort_by(|a, b| creation_order(&a.metadata).cmp(&creation_order(&b.metadata)));
    let (mut node, mut waypoint) = (Vec::new(), Vec::new());
    for resource in authorizations {
        let key = RouteKey::of(RouteKind::AuthorizationPolicy, &resource.metadata);
        let acceptance = if targets_waypoint(&resource.spec) {
            let converted = waypoint_authorization_policy(resource);
            let unbound = matches!(
                converted.policy.targets.as_slice(),
                [TargetRef::Namespace { .. }]
            );
            let (_, previous) = judge(
                &key,
                &resource.spec,
                last_good,
                |spec| waypoint_policy_of(resource, spec),
                |_| String::new(),
            );
            match previous {
                // Accepted: the current spec. Rejected with no readable target: the last
                // accepted one, if any.
                Some((spec, policy)) if converted.acceptance.accepted() || unbound => {
                    in_force.insert(key.clone(), spec);
                    waypoint.push(policy);
                }
                _ => waypoint.push(converted.policy),
            }
            converted.acceptance
        } else {
            let converted = authorization_policy(resource, root_namespace);
            node.push(converted.policy);
            converted.acceptance
        };
        if !acceptance.accepted() {
            rejected.push((key, acceptance));
        }
    }
    let mut authentications: Vec<&RequestAuthenticationResource> =
        request_authentications.iter().map(|r| &**r).collect();
    authentications.sort_by(|a, b| creation_order(&a.metadata).cmp(&creation_order(&b.metadata)));
    let authentications = authentications
        .into_iter()
        .filter_map(|resource| {
            let key = RouteKey::of(RouteKind::RequestAuthentication, &resource.metadata);
            let (acceptance, previous) = judge(
                &key,
                &resource.spec,
                last_good,
                |spec| request_authentication_of(resource, spec),
                describe_authentication,
            );
            if !acceptance.accepted() {
                // The status writer's verdict (Invalid), whatever `judge` calls it.
                rejected.push((key.clone(), request_authentication(resource).acceptance));
            }
            let (spec, authentication) = previous?;
            in_force.insert(key, spec);
            Some(authentication)
        })
        .collect();
    let mut peers: Vec<&PeerAuthenticationResource> =
        peer_authentications.iter().map(|r| &**r).collect();
    peers.sort_by(|a, b| creation_order(&a.metadata).cmp(&creation_order(&b.metadata)));
    let (mut first, mut then) = (Vec::new(), Vec::new());
    for resource in peers {
        let converted = peer_authentication(resource, root_namespace);
        if converted.acceptance.accepted() {
            then.push(converted.policy);
        } else {
            rejected.push((
                RouteKey::of(RouteKind::PeerAuthentication, &resource.metadata),
                converted.acceptance,
            ));
            first.push(converted.policy);
        }
    }
    first.extend(then);
    ConvertedPolicies {
        set: PolicySet::new(node, first)
            .with_waypoint_policies(WaypointPolicies::new(waypoint, authentications)),
        rejected,
        in_force,
    }
}
