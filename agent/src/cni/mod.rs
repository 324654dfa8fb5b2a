//! The node agent's side of `ambit-cni`: a Unix-socket server that hands the plugin's ADD, DEL
//! and CHECK to the enrolment reconciler and answers once it has acted.
//!
//! Why a socket and a reply: the runtime calls the plugin after the pod's network namespace is
//! made and before any of its containers start. The plugin waits for this answer, so when it
//! says "meshed" the pod's listeners, sk_lookup link and enrolment entry are in place and the
//! pod's first process is already captured; when it cannot say so, the sandbox fails and kubelet
//! retries. A pod this agent does not know yet (the API server's watch can trail the kubelet by
//! a moment) is asked about again at each new state, until a deadline.
//!
//! The socket is bounded like every shared resource: one request per connection, a size limit,
//! a read timeout, and a limit on requests in progress. [`install`] puts the plugin on a node.

pub mod install;
pub mod metrics;

pub use metrics::CniMetrics;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use ambit_cni::protocol::{self, Outcome, Reply, Request};
use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};
use tracing::{info, warn};

use crate::limits::{Gated, accept_loop};
use crate::state::MeshState;

/// How long a request may take to arrive once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an ADD waits for a pod the agent does not know yet (below the plugin's own 30 s).
const UNKNOWN_POD_WAIT: Duration = Duration::from_secs(20);
/// Requests in progress at once; more wait in the socket's backlog for a place.
const MAX_IN_PROGRESS: usize = 32;

/// A request for the enrolment reconciler, with where to send its reply.
#[derive(Debug)]
pub struct CniCall {
    /// What the plugin asked.
    pub request: Request,
    /// Where the reconciler answers.
    pub reply: oneshot::Sender<Reply>,
}

/// Listens on `socket` (replacing a stale one; root only) until the task is dropped.
pub async fn serve(
    socket: PathBuf,
    calls: mpsc::Sender<CniCall>,
    state: watch::Receiver<Arc<MeshState>>,
    metrics: CniMetrics,
) -> anyhow::Result<()> {
    let listener = Gated::new(bind_private(&socket, "the CNI socket")?, MAX_IN_PROGRESS);
    info!(socket = %socket.display(), "CNI plugin socket listening");
    accept_loop(
        &listener,
        "CNI",
        |_| {},
        |(stream, permit), _| {
            let (calls, state, metrics) = (calls.clone(), state.clone(), metrics.clone());
            tokio::spawn(async move {
                if let Err(err) = handle(stream, calls, state, &metrics).await {
                    warn!(err = format!("{err:#}"), "CNI request failed");
                }
                drop(permit);
            });
        },
    )
    .await;
    Ok(())
}

/// Listens on the Unix socket `socket` (`what`, for errors), private to root (0600): its
/// directory created, a stale file at its path replaced. The CNI socket's and the handover's.
pub(crate) fn bind_private(socket: &Path, what: &str) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::remove_file(socket) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(err).with_context(|| format!("removing a stale {}", socket.display()));
        }
        _ => {}
    }
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("listening on {what} {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("making {} private to root", socket.display()))?;
    Ok(listener)
}

async fn handle(
    stream: UnixStream,
    calls: mpsc::Sender<CniCall>,
    mut state: watch::Receiver<Arc<MeshState>>,
    metrics: &CniMetrics,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(protocol::MAX_MESSAGE as u64 + 1);
    tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line))
        .await
        .context("no request within the read timeout")??;
    let request: Request = protocol::read_message(&mut &line[..])
        .map_err(|e| anyhow::anyhow!("bad request from the CNI plugin: {e}"))?;
    let deadline = tokio::time::Instant::now() + UNKNOWN_POD_WAIT;
    let reply = loop {
        let (tx, rx) = oneshot::channel();
        calls
            .send(CniCall {
                request: request.clone(),
                reply: tx,
            })
            .await
            .context("the enrolment reconciler is gone")?;
        let reply = rx
            .await
            .context("the enrolment reconciler dropped the request")?;
        if reply.outcome != Outcome::Retry {
            break reply;
        }
        // Ask again once the state changes (the pod may arrive from the API server).
        match tokio::time::timeout_at(deadline, state.changed()).await {
            Ok(Ok(())) => continue,
            _ => break reply,
        }
    };
    metrics.count(&request, reply.outcome);
    let (command, sandbox) = match &request {
        Request::Add(s) => ("ADD", s),
        Request::Del(s) => ("DEL", s),
        Request::Check(s) => ("CHECK", s),
    };
    info!(
        command,
        pod = %sandbox.pod(),
        container_id = %sandbox.container_id,
        netns = %sandbox.netns,
        outcome = ?reply.outcome,
        message = %reply.message,
        "CNI request"
    );
    let mut out = Vec::new();
    protocol::write_message(&mut out, &reply)?;
    write.write_all(&out).await?;
    write.shutdown().await?;
    Ok(())
}
