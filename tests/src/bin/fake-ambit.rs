//! `fake-ambit`: a stand-in for the `ambit` binary that speaks the test bed's contract without
//! any eBPF, so the harness (agent placement, readiness, admin, config generations, stop,
//! uninstall) can be tested on its own.
//!
//! - `fake-ambit agent --node N --mesh-file F --cgroup C --bpffs D [--log-format json] ...`:
//!   creates D, serves `GET /healthz/ready` on 0.0.0.0:15021 (200 once a mesh file has loaded,
//!   503 before) and `GET /config_dump` on 127.0.0.1:15000, and reloads F whenever its content
//!   changes (generation + 1 per good load; a bad file sets `lastError` and keeps the last good
//!   state). Logs JSON lines to stdout.
//! - `fake-ambit uninstall --bpffs D`: removes D.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ambit_tests::MeshFile;
use serde_json::{Value, json};

#[derive(Default)]
struct State {
    generation: u64,
    last_error: Option<String>,
    enrolled: Vec<String>,
    loaded: bool,
}

fn log(v: Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn flags(args: &[String]) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if let Some(k) = a.strip_prefix("--") {
            m.insert(k.to_string(), it.next().cloned().unwrap_or_default());
        }
    }
    m
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let f = flags(&args);
    match args.first().map(String::as_str) {
        Some("uninstall") => {
            if let Some(d) = f.get("bpffs") {
                let _ = std::fs::remove_dir_all(d);
            }
            ExitCode::SUCCESS
        }
        Some("agent") => agent(f),
        _ => {
            eprintln!("usage: fake-ambit agent|uninstall ...");
            ExitCode::from(2)
        }
    }
}

fn agent(f: BTreeMap<String, String>) -> ExitCode {
    let (Some(node), Some(mesh)) = (f.get("node").cloned(), f.get("mesh-file").cloned()) else {
        eprintln!("--node and --mesh-file are required");
        return ExitCode::from(2);
    };
    if let Some(d) = f.get("bpffs")
        && let Err(e) = std::fs::create_dir_all(d)
    {
        eprintln!("create {d}: {e}");
        return ExitCode::FAILURE;
    }
    log(json!({"level": "INFO", "message": "fake agent starting", "node": node, "flags": f}));
    let state = Arc::new(Mutex::new(State::default()));
    for (addr, admin) in [("0.0.0.0:15021", false), ("127.0.0.1:15000", true)] {
        let l = match TcpListener::bind(addr) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bind {addr}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let state = state.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let _ = serve(s, &state, admin);
            }
        });
    }
    let mesh = PathBuf::from(mesh);
    let mut last: Option<Vec<u8>> = None;
    loop {
        if let Ok(bytes) = std::fs::read(&mesh)
            && last.as_ref() != Some(&bytes)
        {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            last = Some(bytes);
            let mut st = state.lock().unwrap();
            match serde_yaml_ng::from_str::<MeshFile>(&text) {
                Ok(m) => {
                    st.generation += 1;
                    st.last_error = None;
                    st.loaded = true;
                    st.enrolled = m
                        .workloads
                        .iter()
                        .filter(|w| w.node == node && w.enrolled)
                        .map(|w| format!("{}/{}", w.namespace, w.name))
                        .collect();
                    log(json!({"level": "INFO", "message": "config applied",
                               "generation": st.generation}));
                }
                Err(e) => {
                    st.last_error = Some(format!("{}: {e}", mesh.display()));
                    log(json!({"level": "WARN", "message": "config rejected",
                               "error": st.last_error}));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn serve(mut s: TcpStream, state: &Mutex<State>, admin: bool) -> std::io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        req.extend_from_slice(&buf[..n]);
    }
    let req = String::from_utf8_lossy(&req);
    let path = req.split_whitespace().nth(1).unwrap_or("/");
    let st = state.lock().unwrap();
    let (code, body) = match (admin, path) {
        (false, "/healthz/ready") if st.loaded => (200, "ready".to_string()),
        (false, "/healthz/ready") => (503, "not ready".to_string()),
        (true, "/config_dump") => (
            200,
            json!({
                "config": {"generation": st.generation, "lastError": st.last_error},
                "maps": {"ORIG_DST_TUPLE": 0, "PENDING_CONNECTS": 0},
                "enrolled": st.enrolled,
            })
            .to_string(),
        ),
        _ => (404, "not found".to_string()),
    };
    drop(st);
    write!(
        s,
        "HTTP/1.1 {code} X\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}
