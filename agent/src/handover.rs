//! Replacing a node's agent without cutting a connection or refusing a new one.
//!
//! The DaemonSet rolls with a surge: the new agent starts beside the old one on each node. Both
//! may bind the same addresses, because every listener of the agent (the node's admin, metrics
//! and readiness ports, and the listeners inside each pod's network namespace) sets
//! SO_REUSEPORT. The CNI socket and this module's socket are taken over by path: the newer agent
//! unlinks the old path and binds its own.
//!
//! The two agents agree over a Unix socket beside the CNI socket ([`SOCKET_NAME`], root only),
//! one line each way per step:
//!
//! 1. successor → predecessor `hello`: the predecessor [freezes](Control::Freeze) its enrolment
//!    reconciler (it keeps serving but writes no kernel state, so nothing it does can undo the
//!    successor's), stops answering ready (the readiness port is shared), and answers `frozen`.
//! 2. The successor adopts the pins (as any agent does at start), enrols every pod: opens its
//!    listeners beside the predecessor's, points `POD_LISTENERS` and `HBONE_LISTENERS` at them,
//!    marks the pods meshed.
//! 3. successor → predecessor `takeover`: the predecessor [retires](Control::Retire): closes its
//!    listeners in every pod (nothing is queued on them: each group sends its new connections
//!    to the successor's listener, see `prefer_successor` in [`crate::enrolment`]), closes its
//!    node ports and CNI socket, answers
//!    `retired`, and from then on only serves the connections it holds. The successor answers
//!    ready.
//! 4. On SIGTERM (the DaemonSet deletes it once the successor is ready) the retired agent waits
//!    until its last connection ends or `--termination-grace-period` passes, then exits.
//!
//! If the successor goes away between 1 and 3 (its connection closes, or [`TAKEOVER_TIMEOUT`]
//! passes), the predecessor resumes as before. An agent stopped without a successor exits at
//! once, and one that crashes leaves the pins as they are: enrolled pods fail closed until an
//! agent returns ([`crate::redirect`]).
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
    sync::{mpsc, oneshot, watch},
};
use tracing::{info, warn};

use crate::{
    cni::bind_private,
    enrolment::Control,
    limits::{Gated, Limits, accept_loop},
};

/// The handover socket's file name, in the CNI socket's directory.
pub const SOCKET_NAME: &str = "agent-handover.sock";
/// How long either side waits for the other's answer to a step.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a frozen predecessor waits for its successor to take over (the successor's first
/// enrolment of every pod) before it resumes.
pub const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest line either side sends.
const MAX_LINE: u64 = 64;

/// Where this agent stands in a replacement; shown by readiness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// A predecessor was found and froze; this agent enrols the pods, then takes over.
    TakingOver,
    /// The node's agent.
    Active,
    /// A successor is taking over: this agent serves but writes no kernel state.
    Superseded,
    /// The successor took over: this agent only serves the connections it holds.
    Retired,
}

impl Role {
    /// Why an agent in this role is not ready, if it is not.
    pub fn not_ready(self) -> Option<&'static str> {
        match self {
            Role::Active => None,
            Role::TakingOver => Some("taking over from the agent it replaces"),
            Role::Superseded => Some("a successor agent is taking over"),
            Role::Retired => Some("retired: a successor agent serves this node"),
        }
    }
}

/// The handover socket of an agent whose CNI socket is `cni_socket`.
pub fn socket_path(cni_socket: &Path) -> PathBuf {
    cni_socket.with_file_name(SOCKET_NAME)
}

async fn read_line(
    stream: &mut BufReader<UnixStream>,
    timeout: Duration,
) -> anyhow::Result<String> {
    let mut line = Vec::new();
    let mut limited = (&mut *stream).take(MAX_LINE);
    tokio::time::timeout(timeout, limited.read_until(b'\n', &mut line))
        .await
        .with_context(|| format!("no answer within {timeout:?}"))??;
    if line.last() != Some(&b'\n') {
        bail!("connection closed");
    }
    Ok(String::from_utf8_lossy(&line).trim().to_string())
}

async fn send(stream: &mut BufReader<UnixStream>, line: &str) -> anyhow::Result<()> {
    stream
        .get_mut()
        .write_all(format!("{line}\n").as_bytes())
        .await?;
    Ok(())
}

/// A running predecessor that froze for this agent.
#[derive(Debug)]
pub struct Predecessor {
    stream: BufReader<UnixStream>,
}

/// Asks the agent listening on `socket`, if any, to freeze for this one. `None` when no agent
/// answers (none runs, or it crashed and left its socket file).
pub async fn find_predecessor(socket: &Path) -> anyhow::Result<Option<Predecessor>> {
    let stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(err) => {
            return Err(err).with_context(|| format!("connecting to {}", socket.display()));
        }
    };
    let mut stream = BufReader::new(stream);
    send(&mut stream, "hello").await?;
    match read_line(&mut stream, REPLY_TIMEOUT).await? {
        answer if answer == "frozen" => Ok(Some(Predecessor { stream })),
        other => bail!("the running agent answered {other:?} to hello (expected \"frozen\")"),
    }
}

impl Predecessor {
    /// Tells the predecessor that this agent's listeners are in place; returns once it has
    /// closed its own.
    pub async fn take_over(mut self) -> anyhow::Result<()> {
        send(&mut self.stream, "takeover").await?;
        match read_line(&mut self.stream, REPLY_TIMEOUT).await? {
            answer if answer == "retired" => Ok(()),
            other => bail!("the previous agent answered {other:?} to takeover"),
        }
    }
}

/// Serves successors on `socket` (taking the path over from a predecessor's), one at a time
/// (the others wait in the socket's backlog), until one takes over.
pub async fn serve(
    socket: PathBuf,
    control: mpsc::Sender<Control>,
    role: watch::Sender<Role>,
) -> anyhow::Result<()> {
    let listener = Gated::new(bind_private(&socket, "the handover socket")?, 1);
    info!(socket = %socket.display(), "handover socket listening");
    let mut retired = role.subscribe();
    let role = Arc::new(role);
    let accepting = accept_loop(
        &listener,
        "handover",
        |_| {},
        |(stream, permit), _| {
            let (control, role) = (control.clone(), role.clone());
            tokio::spawn(async move {
                if let Err(err) = hand_over(BufReader::new(stream), &control, &role).await {
                    warn!(err = format!("{err:#}"), "handover failed");
                }
                drop(permit);
            });
        },
    );
    tokio::select! {
        () = accepting => {}
        _ = retired.wait_for(|r| *r == Role::Retired) => {}
    }
    Ok(())
}

/// One successor's handover.
async fn hand_over(
    mut stream: BufReader<UnixStream>,
    control: &mpsc::Sender<Control>,
    role: &watch::Sender<Role>,
) -> anyhow::Result<()> {
    let hello = read_line(&mut stream, REPLY_TIMEOUT).await?;
    if hello != "hello" {
        bail!("a successor sent {hello:?} (expected \"hello\")");
    }
    let (ack, acked) = oneshot::channel();
    control
        .send(Control::Freeze(ack))
        .await
        .context("the enrolment reconciler is gone")?;
    acked.await.context("the enrolment reconciler is gone")?;
    role.send_replace(Role::Superseded);
    info!("a successor agent is starting: enrolment frozen until it takes over");
    let next = match send(&mut stream, "frozen").await {
        Ok(()) => read_line(&mut stream, TAKEOVER_TIMEOUT).await,
        Err(err) => Err(err),
    };
    match next {
        Ok(line) if line == "takeover" => {
            let (ack, acked) = oneshot::channel();
            control
                .send(Control::Retire(ack))
                .await
                .context("the enrolment reconciler is gone")?;
            acked.await.context("the enrolment reconciler is gone")?;
            role.send_replace(Role::Retired);
            // The successor may already be gone; it took over all the same.
            let _ = send(&mut stream, "retired").await;
            Ok(())
        }
        other => {
            let _ = control.send(Control::Resume).await;
            role.send_replace(Role::Active);
            match other {
                Ok(line) => bail!("the successor sent {line:?} (expected \"takeover\"); resumed"),
                Err(err) => Err(err.context("the successor did not take over; resumed")),
            }
        }
    }
}

/// Waits until no proxied connection is open, or `grace` has passed; says which.
pub async fn drain(limits: &Limits, grace: Duration) {
    let deadline = tokio::time::Instant::now() + grace;
    let mut logged = None;
    loop {
        let open = limits.snapshot().connections;
        if open == 0 {
            info!("drained: no connection left open");
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(
                open,
                grace_s = grace.as_secs(),
                "termination grace period over: closing the connections still open"
            );
            return;
        }
        if logged != Some(open) {
            info!(open, "draining: serving the connections still open");
            logged = Some(open);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plays the enrolment reconciler: acknowledges what the handover asks and reports it.
    fn reconciler() -> (mpsc::Sender<Control>, mpsc::UnboundedReceiver<&'static str>) {
        let (control, mut requests) = mpsc::channel(4);
        let (seen, log) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(request) = requests.recv().await {
                let what = match request {
                    Control::Freeze(ack) => {
                        let _ = ack.send(());
                        "freeze"
                    }
                    Control::Resume => "resume",
                    Control::Retire(ack) => {
                        let _ = ack.send(());
                        "retire"
                    }
                };
                let _ = seen.send(what);
            }
        });
        (control, log)
    }

    /// A successor that takes over freezes, then retires the predecessor, which stops serving
    /// the socket; the successor's socket path replaces the predecessor's.
    #[tokio::test]
    async fn a_successor_freezes_then_retires_its_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_NAME);
        let (control, mut seen) = reconciler();
        let (role, mut roles) = watch::channel(Role::Active);
        let server = tokio::spawn(serve(socket.clone(), control, role));
        let predecessor = loop {
            if let Some(p) = find_predecessor(&socket).await.unwrap() {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(seen.recv().await, Some("freeze"));
        roles.wait_for(|r| *r == Role::Superseded).await.unwrap();
        assert_eq!(
            Role::Superseded.not_ready(),
            Some("a successor agent is taking over")
        );
        predecessor.take_over().await.unwrap();
        assert_eq!(seen.recv().await, Some("retire"));
        assert_eq!(*roles.borrow(), Role::Retired);
        server.await.unwrap().unwrap();
    }

    /// A successor that goes away before taking over leaves the predecessor serving as before:
    /// resumed, ready again, and still answering the next successor.
    #[tokio::test]
    async fn a_successor_gone_before_taking_over_resumes_the_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_NAME);
        let (control, mut seen) = reconciler();
        let (role, mut roles) = watch::channel(Role::Active);
        let _server = tokio::spawn(serve(socket.clone(), control, role));
        let predecessor = loop {
            if let Some(p) = find_predecessor(&socket).await.unwrap() {
                break p;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert_eq!(seen.recv().await, Some("freeze"));
        drop(predecessor);
        assert_eq!(seen.recv().await, Some("resume"));
        roles.wait_for(|r| *r == Role::Active).await.unwrap();
        // The next successor is answered.
        let next = find_predecessor(&socket).await.unwrap();
        assert!(next.is_some());
        assert_eq!(seen.recv().await, Some("freeze"));
    }

    /// No agent listening (none ever ran, or it crashed and left its socket file): no
    /// predecessor, start as usual.
    #[tokio::test]
    async fn no_running_agent_means_no_predecessor() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_NAME);
        assert!(find_predecessor(&socket).await.unwrap().is_none());
        drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
        assert!(socket.exists());
        assert!(find_predecessor(&socket).await.unwrap().is_none());
    }
}
