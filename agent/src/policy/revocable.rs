//! A decision to let a connection in that a later change may take back: what a proxy holds for
//! each open connection it admitted under the policies, and why one was refused.
//!
//! Shared by every proxy: the HBONE server holds an [`Admission`] per tunnel and stops relaying
//! when it is revoked; the node proxy's admission registry (`proxy::admission`) creates and
//! revokes them.
use std::fmt;

use tokio::sync::oneshot;

/// Why a connection may not be, or no longer stay, open.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// A short fixed label, the `reason` of the metrics: `plaintext_strict`, or one of
    /// [`super::Reason::label`].
    pub reason: &'static str,
    /// What to log: the policy or the mode that decided.
    pub message: String,
}

/// An admitted connection's claim to stay open, held by its task for as long as it is open.
/// Whoever admitted it may revoke it, with a [`Refusal`]; dropping it drops the admitter's
/// guard too (the node proxy's registry entry).
pub struct Admission {
    /// Taken once it has delivered (or can no longer deliver) a revocation.
    revoked: Option<oneshot::Receiver<Refusal>>,
    /// Dropped with the admission: removes the connection from whatever tracks it.
    _guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("revocable", &self.revoked.is_some())
            .finish()
    }
}

impl Admission {
    /// An admission nothing revokes, for handlers that track no connections.
    pub fn unconditional() -> Self {
        Self {
            revoked: None,
            _guard: None,
        }
    }

    /// An admission revoked by a send on `revoked`'s sender; `guard` is dropped with it.
    pub fn revocable(
        revoked: oneshot::Receiver<Refusal>,
        guard: impl std::any::Any + Send + Sync,
    ) -> Self {
        Self {
            revoked: Some(revoked),
            _guard: Some(Box::new(guard)),
        }
    }

    /// Resolves, with why, when a change no longer allows the connection; never for an
    /// unconditional admission, nor once the sender is gone.
    pub async fn revoked(&mut self) -> Refusal {
        if let Some(receiver) = &mut self.revoked {
            let outcome = receiver.await;
            self.revoked = None;
            if let Ok(refusal) = outcome {
                return refusal;
            }
        }
        std::future::pending().await
    }

    /// The revocation, if one has arrived (and was not taken by [`Self::revoked`]).
    pub fn try_revoked(&mut self) -> Option<Refusal> {
        let refusal = self.revoked.as_mut()?.try_recv().ok()?;
        self.revoked = None;
        Some(refusal)
    }
}
