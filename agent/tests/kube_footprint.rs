//! Memory footprint of the Kubernetes source with 10,000 pods and 1,000 services.
//!
//! Counts the bytes held through a counting global allocator (this test binary only): the four
//! reflector stores as the source fills them (each object as the API sends it, in JSON, parsed
//! into the source's views), then the `MeshState` built from them, and the transient peak of
//! one rebuild. Run with
//! `cargo test -p ambit --test kube_footprint -- --nocapture` to see the figures
//! (docs/operations.md, "Footprint").
use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use ambit::{
    discovery::kube::{
        ClusterView, Converter,
        convert::{MODE_AMBIENT, MODE_LABEL},
        objects::SERVICE_NAME_LABEL,
        objects::{EndpointSliceView, NamespaceView, PodView, ServiceView},
    },
    state::{MeshState, RedirectSettings},
};
use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, EnvVar, Namespace, Pod, PodCondition, PodIP, PodSpec,
            PodStatus, Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use kube::runtime::{reflector::store::Writer, watcher::Event};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(size: usize) {
    let now = CURRENT.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: delegates every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's guarantees for `alloc` (a non-zero-size layout) are passed on.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (every allocation here is) with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` was allocated by `System` with `layout`; the caller's guarantees for
        // `new_size` are passed on.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const NAMESPACES: usize = 100;
const NODES: usize = 100;
const MIB: f64 = 1024.0 * 1024.0;

fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// A pod as the API serves it (containers, env, annotations).
fn pod(i: usize) -> Pod {
    let app = format!("svc-{}", i % SERVICES);
    let ip = format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256);
    let container = |name: &str| Container {
        name: name.into(),
        image: Some(format!("registry.example/{app}/{name}:1.2.3")),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: 8080,
            ..ContainerPort::default()
        }]),
        env: Some(
            (0..5)
                .map(|k| EnvVar {
                    name: format!("SETTING_{k}"),
                    value: Some(format!("value-{k}")),
                    ..EnvVar::default()
                })
                .collect(),
        ),
        ..Container::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("{app}-{i:05}-x7k2p")),
            namespace: Some(format!("ns-{}", i % NAMESPACES)),
            uid: Some(format!("5f0c3a2e-1b2d-4c8e-9a7f-{i:012}")),
            resource_version: Some(format!("{}", 100_000 + i)),
            labels: labels(&[
                ("app", &app),
                ("pod-template-hash", "7d9f8c6b5"),
                ("version", "v1"),
            ]),
            annotations: labels(&[("kubectl.kubernetes.io/restartedAt", "2026-01-01T00:00:00Z")]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(format!("node-{}", i % NODES)),
            service_account_name: Some(app.clone()),
            containers: vec![container("app"), container("sidecar")],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            host_ip: Some("192.0.2.1".into()),
            conditions: Some(
                ["Initialized", "Ready", "ContainersReady", "PodScheduled"]
                    .iter()
                    .map(|t| PodCondition {
                        type_: t.to_string(),
                        status: "True".into(),
                        ..PodCondition::default()
                    })
                    .collect(),
            ),
            ..PodStatus::default()
        }),
    }
}

fn namespace(i: usize) -> Namespace {
    Namespace {
        metadata: ObjectMeta {
            name: Some(format!("ns-{i}")),
            labels: labels(&[
                (MODE_LABEL, MODE_AMBIENT),
                ("kubernetes.io/metadata.name", &format!("ns-{i}")),
            ]),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    }
}

fn service(i: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}")),
            namespace: Some(format!("ns-{}", i % NAMESPACES)),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", i / 256, i % 256)),
            cluster_ips: Some(vec![format!("10.96.{}.{}", i / 256, i % 256)]),
            selector: labels(&[("app", &format!("svc-{i}"))]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

fn endpoint_slice(i: usize) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("svc-{i}-abcde")),
            namespace: Some(format!("ns-{}", i % NAMESPACES)),
            labels: labels(&[(SERVICE_NAME_LABEL, &format!("svc-{i}"))]),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints: Some(
            (0..PODS / SERVICES)
                .map(|k| Endpoint {
                    addresses: vec![format!("10.0.{k}.{}", i % 256)],
                    ..Endpoint::default()
                })
                .collect(),
        ),
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..EndpointPort::default()
        }]),
    }
}

/// Fills a reflector store the way the source does: a list (Init, InitApply..., InitDone) of
/// the objects `make` builds, each going through JSON into the view `V`.
fn fill<K, V>(count: usize, make: fn(usize) -> K) -> Writer<V>
where
    K: serde::Serialize,
    V: kube::Resource<DynamicType = ()> + serde::de::DeserializeOwned + Clone + 'static,
{
    let mut writer = Writer::default();
    writer.apply_watcher_event(&Event::Init);
    for i in 0..count {
        let json = serde_json::to_vec(&make(i)).unwrap();
        let view: V = serde_json::from_slice(&json).unwrap();
        writer.apply_watcher_event(&Event::InitApply(view));
    }
    writer.apply_watcher_event(&Event::InitDone);
    writer
}

fn held() -> usize {
    CURRENT.load(Ordering::Relaxed)
}

#[test]
fn footprint_of_10k_pods_and_1k_services() {
    let before_stores = held();
    let pods = fill::<_, PodView>(PODS, pod);
    let namespaces = fill::<_, NamespaceView>(NAMESPACES, namespace);
    let services = fill::<_, ServiceView>(SERVICES, service);
    let slices = fill::<_, EndpointSliceView>(SERVICES, endpoint_slice);
    let stores = held() - before_stores;

    let before_state = held();
    PEAK.store(before_state, Ordering::Relaxed);
    let (pod_list, namespace_list) = (pods.as_reader().state(), namespaces.as_reader().state());
    let (service_list, slice_list) = (services.as_reader().state(), slices.as_reader().state());
    // Node 0's pods get a cgroup path each (not found here, so the guessed path): the
    // figure includes them as on a real node.
    let started = std::time::Instant::now();
    let mut converter = Converter::new("node-0", "/nonexistent/cgroup");
    let converted = converter.convert(ClusterView {
        pods: &pod_list,
        namespaces: &namespace_list,
        services: &service_list,
        endpoint_slices: &slice_list,
    });
    let conversion_time = started.elapsed();
    assert_eq!(converted.workloads.len(), PODS);
    assert_eq!(converted.services.len(), SERVICES);
    assert!(converted.workloads.iter().all(|w| w.enrolled));
    assert!(
        converted
            .services
            .iter()
            .all(|s| s.ports[0].target_port == 8080)
    );
    let state = Arc::new(MeshState::new(
        RedirectSettings::default(),
        converted.workloads,
        converted.services,
    ));
    let rebuild_time = started.elapsed();
    let indexing_time = rebuild_time - conversion_time;
    drop((
        pod_list,
        namespace_list,
        service_list,
        slice_list,
        converted.missing_cgroups,
    ));
    let state_bytes = held() - before_state;
    let rebuild_peak = PEAK.load(Ordering::Relaxed) - before_state;
    assert_eq!(state.endpoints(&state.services()[0]).len(), PODS / SERVICES);

    println!(
        "footprint with {PODS} pods, {SERVICES} services ({NAMESPACES} namespaces, {SERVICES} EndpointSlices):"
    );
    println!(
        "  reflector stores: {stores} bytes ({:.1} MiB, {} bytes per pod+service)",
        stores as f64 / MIB,
        stores / (PODS + SERVICES)
    );
    println!(
        "  mesh state:       {state_bytes} bytes ({:.1} MiB, {} bytes per pod+service)",
        state_bytes as f64 / MIB,
        state_bytes / (PODS + SERVICES)
    );
    println!(
        "  one rebuild's peak above the stores: {rebuild_peak} bytes ({:.1} MiB)",
        rebuild_peak as f64 / MIB
    );
    // Informative only (no assertion): the CPU cost of one rebuild in this build profile.
    println!(
        "  one rebuild took {rebuild_time:?} (conversion {conversion_time:?}, MeshState::new {indexing_time:?})"
    );
    // Bounds well above the measured figures (docs/operations.md): they catch a regression
    // that would make memory grow with something other than the mesh (a store keeping whole
    // pod specs, a state copying objects per service...).
    assert!(stores < 32 << 20, "stores take {stores} bytes");
    assert!(
        state_bytes < 32 << 20,
        "the state takes {state_bytes} bytes"
    );
    drop((state, pods, namespaces, services, slices));
}
