//! Gateway API resources (`gateway.networking.k8s.io/v1`, standard channel) as Ambit reads and
//! writes them.
//!
//! The spec and status types are those of kube-rs's `gateway-api` crate (generated from the
//! upstream CRDs). Its latest release is built on kube 4 and k8s-openapi 0.28, so its resource
//! types implement kube-core 4's `Resource`, which this crate's kube 5 cannot use: the
//! resource types here wrap its spec and status structs with k8s-openapi 0.29's metadata and
//! implement the traits kube 5 needs. When `gateway-api` moves to kube 5, these wrappers become
//! its types.
use k8s_openapi::{NamespaceResourceScope, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use serde::{Deserialize, Serialize};

pub use gateway_api::{gateways::GatewaySpec, gateways::GatewayStatus};

/// The Gateway API's group.
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// The Gateway API's version Ambit reads (standard channel).
pub const GATEWAY_API_VERSION: &str = "gateway.networking.k8s.io/v1";

macro_rules! gateway_resource {
    ($(#[$doc:meta])* $type:ident, $spec:ty, $status:ty, $kind:literal, $plural:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
        pub struct $type {
            /// The object's metadata.
            #[serde(default)]
            pub metadata: ObjectMeta,
            /// Its spec, as the Gateway API defines it.
            pub spec: $spec,
            /// Its status, as the Gateway API defines it.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }

        super::kube_resource!(
            $type,
            GATEWAY_API_VERSION,
            GATEWAY_GROUP,
            "v1",
            $kind,
            $plural,
            NamespaceResourceScope
        );
    };
}

gateway_resource!(
    /// A `Gateway`: for Ambit, a waypoint when its class is
    /// [`super::waypoint_controller::WAYPOINT_CLASS`].
    GatewayResource,
    GatewaySpec,
    GatewayStatus,
    "Gateway",
    "gateways"
);
