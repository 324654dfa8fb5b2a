//! Kubernetes Events (`events.k8s.io/v1`) Ambit writes: the policy status writer's verdicts and
//! the node agents' reports on pods they had to close. One builder, so every Event has the same
//! shape (name, timestamps, note limit, reporting controller and instance).

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};

/// The events.k8s.io/v1 limit on an Event's `note`.
const NOTE_MAX: usize = 1024;

/// What an Event says.
#[derive(Clone, Debug)]
pub struct EventReport<'a> {
    /// The object it is about.
    pub regarding: ObjectReference,
    /// What was done (`Validate`, `Enrol`).
    pub action: &'a str,
    /// Why, in one CamelCase word.
    pub reason: &'a str,
    /// For people; cut to the API's limit.
    pub note: String,
    /// `Warning` rather than `Normal`.
    pub warning: bool,
    /// `reportingController`, e.g. `ambit.dev/agent`.
    pub controller: &'a str,
    /// `reportingInstance`: the pod or node writing it.
    pub instance: &'a str,
}

/// The Event of `report`, in the namespace of the object it regards.
pub fn event(report: EventReport<'_>) -> Event {
    let now = Timestamp::now();
    let mut note = report.note;
    if note.len() > NOTE_MAX {
        let end = crate::telemetry::clip(&note, NOTE_MAX - 3).len();
        note.truncate(end);
        note.push_str("...");
    }
    let name = report.regarding.name.clone().unwrap_or_default();
    Event {
        metadata: ObjectMeta {
            // client-go's naming: unique without a round trip for generateName.
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            namespace: report.regarding.namespace.clone(),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(now)),
        action: Some(report.action.to_string()),
        reason: Some(report.reason.to_string()),
        note: Some(note),
        type_: Some(if report.warning { "Warning" } else { "Normal" }.to_string()),
        regarding: Some(report.regarding),
        reporting_controller: Some(report.controller.to_string()),
        reporting_instance: Some(report.instance.to_string()),
        ..Event::default()
    }
}

/// Writes the Event of `report`; a failure is logged, never retried (Events are a courtesy:
/// the state they report is also in metrics, logs and status).
pub async fn emit(client: &Client, report: EventReport<'_>) {
    let event = event(report);
    let namespace = event.metadata.namespace.clone().unwrap_or_default();
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    if let Err(error) = api.create(&PostParams::default(), &event).await {
        let regarding = event.regarding.as_ref().and_then(|r| r.name.clone());
        tracing::warn!(%namespace, ?regarding, %error, "cannot write an Event");
    }
}

/// An Event regarding the pod `namespace/name`.
pub fn regarding_pod(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..ObjectReference::default()
    }
}
