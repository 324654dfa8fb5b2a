//! `ambit cni install|uninstall`: puts the `ambit-cni` plugin on a node and chains it after the
//! node's network plugin, or takes it away.
//!
//! Container runtimes (through libcni) use the first network configuration of the CNI
//! configuration directory in file-name order (`*.conf`, `*.conflist`, `*.json`). The installer
//! appends an `ambit-cni` entry to that configuration's plugin list (turning a single-plugin
//! `.conf` into a `.conflist`), copies the plugin binary into the CNI bin directory, and with
//! `--watch` keeps it so: network plugins (Calico, Cilium...) rewrite their configuration when
//! they restart, which would silently drop the chained plugin. Writes are atomic (a temporary
//! file renamed over the old), so a runtime never reads half a file. Uninstall removes the entry
//! from every configuration of the directory and the binary.
//!
//! It is never removed on the agent's own shutdown: while the agent restarts, new pods that must
//! be meshed fail their sandbox and are retried, rather than start unmeshed.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use tracing::{info, warn};

/// The plugin's `type`, and its binary's name.
pub const PLUGIN: &str = "ambit-cni";

/// Flags of `ambit cni install`.
#[derive(Clone, Debug, clap::Args)]
pub struct InstallArgs {
    /// The node's CNI bin directory (where runtimes look for plugins).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The plugin binary to install [default: `ambit-cni` beside this executable].
    #[arg(long)]
    pub plugin: Option<PathBuf>,
    /// The agent's CNI socket as the plugin sees it on the node.
    #[arg(long, default_value = ambit_cni::protocol::DEFAULT_SOCKET)]
    pub agent_socket: PathBuf,
    /// Namespaces whose pods never wait for the agent (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "kube-system")]
    pub exclude_namespaces: Vec<String>,
    /// Keep the plugin installed: re-check whenever the configuration directory changes (and
    /// every 30 s), until SIGTERM.
    #[arg(long)]
    pub watch: bool,
}

/// Flags of `ambit cni uninstall`.
#[derive(Clone, Debug, clap::Args)]
pub struct UninstallArgs {
    /// The node's CNI bin directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// The node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
}

/// What one pass of the installer did.
#[derive(Debug, PartialEq, Eq)]
pub struct Installed {
    /// The configuration the plugin is chained in.
    pub config: PathBuf,
    /// Whether the configuration or the binary had to be (re)written.
    pub changed: bool,
}

/// The network configuration files of `dir`, in the order runtimes consider them.
fn network_configs(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading the CNI configuration directory {}", dir.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            path.is_file()
                && matches!(
                    path.extension().and_then(|e| e.to_str()),
                    Some("conf" | "conflist" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files)
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}

fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let name = path.file_name().context("a file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.ambit-tmp"));
    let mut file = fs::File::create(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// The plugin entry this installer writes.
fn entry(args: &InstallArgs) -> Value {
    json!({
        "type": PLUGIN,
        "agentSocket": args.agent_socket,
        "excludeNamespaces": args.exclude_namespaces,
        "timeoutSeconds": 30,
    })
}

/// `config` with the plugin chained last (a single plugin becomes a list); `None` if it
/// already is, as `plugin` says.
fn chained(config: &Value, plugin: &Value, file: &Path) -> anyhow::Result<Option<Value>> {
    let Some(object) = config.as_object() else {
        bail!("{} is not a JSON object", file.display());
    };
    let mut list = match object.get("plugins") {
        Some(Value::Array(_)) => config.clone(),
        Some(_) => bail!("{}: `plugins` is not a list", file.display()),
        None => {
            // A single-plugin configuration: the list keeps its version and name.
            let mut single = config.clone();
            let single_map = single.as_object_mut().expect("checked above");
            let version = single_map.remove("cniVersion");
            let name = single_map.remove("name");
            json!({"cniVersion": version, "name": name, "plugins": [single]})
        }
    };
    let plugins = list["plugins"].as_array_mut().expect("a list");
    let last_is_ours = plugins.last() == Some(plugin);
    let ours = plugins.iter().filter(|p| p["type"] == PLUGIN).count();
    if last_is_ours && ours == 1 && object.contains_key("plugins") {
        return Ok(None);
    }
    plugins.retain(|p| p["type"] != PLUGIN);
    if plugins.is_empty() {
        bail!("{} chains no network plugin", file.display());
    }
    plugins.push(plugin.clone());
    Ok(Some(list))
}

/// Installs the binary and chains the plugin in the node's primary configuration, once.
pub fn install_once(args: &InstallArgs) -> anyhow::Result<Installed> {
    let source = match &args.plugin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name(PLUGIN),
    };
    let binary = fs::read(&source)
        .with_context(|| format!("reading the plugin binary {}", source.display()))?;
    fs::create_dir_all(&args.bin_dir)
        .with_context(|| format!("creating {}", args.bin_dir.display()))?;
    let installed_binary = args.bin_dir.join(PLUGIN);
    let mut changed = false;
    if fs::read(&installed_binary).ok().as_deref() != Some(&binary[..]) {
        write_atomically(&installed_binary, &binary, 0o755)?;
        changed = true;
    }

    let Some(primary) = network_configs(&args.conf_dir)?.into_iter().next() else {
        bail!(
            "no network configuration in {} yet: the cluster's network plugin writes one; \
             ambit-cni is chained after it",
            args.conf_dir.display()
        );
    };
    let config = read_json(&primary)?;
    let Some(updated) = chained(&config, &entry(args), &primary)? else {
        return Ok(Installed {
            config: primary,
            changed,
        });
    };
    let target = match primary.extension().and_then(|e| e.to_str()) {
        Some("conflist") => primary.clone(),
        _ if config.get("plugins").is_some() => primary.clone(),
        // A single plugin's `.conf` becomes a `.conflist` of the same name; the `.conf` goes
        // so that runtimes do not keep using it.
        _ => primary.with_extension("conflist"),
    };
    let mut bytes = serde_json::to_vec_pretty(&updated)?;
    bytes.push(b'\n');
    write_atomically(&target, &bytes, 0o644)?;
    if target != primary {
        fs::remove_file(&primary).with_context(|| format!("removing {}", primary.display()))?;
    }
    info!(config = %target.display(), "ambit-cni chained in the node's network configuration");
    Ok(Installed {
        config: target,
        changed: true,
    })
}

/// Installs, then with `--watch` keeps the plugin installed until SIGTERM or SIGINT.
pub async fn install(args: InstallArgs) -> anyhow::Result<()> {
    let installed = install_once(&args)?;
    info!(config = %installed.config.display(), bin = %args.bin_dir.display(), "ambit-cni installed");
    if !args.watch {
        return Ok(());
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = tx.try_send(());
    })
    .context("watching the CNI configuration directory")?;
    notify::Watcher::watch(
        &mut watcher,
        &args.conf_dir,
        notify::RecursiveMode::NonRecursive,
    )
    .with_context(|| format!("watching {}", args.conf_dir.display()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = rx.recv() => {
                // Let the writer finish its burst of events.
                tokio::time::sleep(Duration::from_millis(200)).await;
                while rx.try_recv().is_ok() {}
            }
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
        match install_once(&args) {
            Ok(Installed {
                changed: true,
                config,
            }) => {
                warn!(config = %config.display(), "ambit-cni was missing from the node's network configuration; chained it again");
            }
            Ok(_) => {}
            Err(err) => warn!(
                err = format!("{err:#}"),
                "keeping ambit-cni installed failed; will retry"
            ),
        }
    }
}

/// Takes the plugin out of every configuration of the directory and removes its binary.
pub fn uninstall(args: &UninstallArgs) -> anyhow::Result<()> {
    if args.conf_dir.is_dir() {
        for file in network_configs(&args.conf_dir)? {
            let Ok(mut config) = read_json(&file) else {
                continue;
            };
            let Some(plugins) = config.get_mut("plugins").and_then(Value::as_array_mut) else {
                continue;
            };
            let before = plugins.len();
            plugins.retain(|p| p["type"] != PLUGIN);
            if plugins.len() != before {
                let mut bytes = serde_json::to_vec_pretty(&config)?;
                bytes.push(b'\n');
                write_atomically(&file, &bytes, 0o644)?;
                info!(config = %file.display(), "ambit-cni removed from the network configuration");
            }
        }
    }
    let binary = args.bin_dir.join(PLUGIN);
    match fs::remove_file(&binary) {
        Ok(()) => info!(binary = %binary.display(), "ambit-cni removed"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("removing {}", binary.display())),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> InstallArgs {
        let plugin = dir.join("src-ambit-cni");
        fs::write(&plugin, b"#!plugin v1").unwrap();
        InstallArgs {
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            plugin: Some(plugin),
            agent_socket: "/var/run/ambit/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into(), "ambit-system".into()],
            watch: false,
        }
    }

    const CALICO: &str = r#"{"name": "k8s-pod-network", "cniVersion": "1.0.0", "plugins": [
        {"type": "calico", "ipam": {"type": "calico-ipam"}},
        {"type": "portmap", "capabilities": {"portMappings": true}}]}"#;

    #[test]
    fn chains_after_the_first_configuration_once_and_again_after_a_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        fs::create_dir_all(&args.conf_dir).unwrap();
        fs::write(args.conf_dir.join("10-calico.conflist"), CALICO).unwrap();
        fs::write(args.conf_dir.join("99-other.conflist"), CALICO).unwrap();

        let first = install_once(&args).unwrap();
        assert_eq!(first.config, args.conf_dir.join("10-calico.conflist"));
        assert!(first.changed);
        let config = read_json(&first.config).unwrap();
        let plugins = config["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(
            plugins[0]["type"], "calico",
            "the network plugin stays first"
        );
        assert_eq!(plugins[2]["type"], PLUGIN);
        assert_eq!(plugins[2]["agentSocket"], "/var/run/ambit/cni.sock");
        assert_eq!(
            plugins[2]["excludeNamespaces"],
            json!(["kube-system", "ambit-system"])
        );
        assert_eq!(fs::read(args.bin_dir.join(PLUGIN)).unwrap(), b"#!plugin v1");
        let other = read_json(&args.conf_dir.join("99-other.conflist")).unwrap();
        assert_eq!(
            other["plugins"].as_array().unwrap().len(),
            2,
            "only the first"
        );

        // Idempotent.
        assert!(!install_once(&args).unwrap().changed);
        // The network plugin rewrites its file: chained again.
        fs::write(args.conf_dir.join("10-calico.conflist"), CALICO).unwrap();
        assert!(install_once(&args).unwrap().changed);
        let config = read_json(&first.config).unwrap();
        assert_eq!(config["plugins"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_conflist() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        fs::create_dir_all(&args.conf_dir).unwrap();
        fs::write(
            args.conf_dir.join("10-bridge.conf"),
            r#"{"cniVersion": "0.4.0", "name": "bridge", "type": "bridge", "bridge": "cni0"}"#,
        )
        .unwrap();
        let installed = install_once(&args).unwrap();
        assert_eq!(installed.config, args.conf_dir.join("10-bridge.conflist"));
        assert!(!args.conf_dir.join("10-bridge.conf").exists());
        let config = read_json(&installed.config).unwrap();
        assert_eq!(config["cniVersion"], "0.4.0");
        assert_eq!(config["name"], "bridge");
        assert_eq!(
            config["plugins"][0],
            json!({"type": "bridge", "bridge": "cni0"})
        );
        assert_eq!(config["plugins"][1]["type"], PLUGIN);
    }

    #[test]
    fn uninstall_takes_it_out_everywhere_and_bad_input_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let args = args(dir.path());
        fs::create_dir_all(&args.conf_dir).unwrap();
        let err = install_once(&args).unwrap_err().to_string();
        assert!(err.contains("no network configuration"), "{err}");
        fs::write(args.conf_dir.join("05-broken.conflist"), "{not json").unwrap();
        let err = format!("{:#}", install_once(&args).unwrap_err());
        assert!(
            err.contains("05-broken.conflist is not valid JSON"),
            "{err}"
        );
        fs::remove_file(args.conf_dir.join("05-broken.conflist")).unwrap();
        fs::write(args.conf_dir.join("10-calico.conflist"), CALICO).unwrap();
        install_once(&args).unwrap();

        uninstall(&UninstallArgs {
            bin_dir: args.bin_dir.clone(),
            conf_dir: args.conf_dir.clone(),
        })
        .unwrap();
        let config = read_json(&args.conf_dir.join("10-calico.conflist")).unwrap();
        assert_eq!(config["plugins"].as_array().unwrap().len(), 2);
        assert!(!args.bin_dir.join(PLUGIN).exists());
    }
}
