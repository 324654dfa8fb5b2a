//! Memory for the relay's read buffers, shared by every pod of the node.
//!
//! A relayed connection reads into a buffer that grows with what the connection has moved
//! (1 KiB, then 16 KiB, then 256 KiB: [`crate::relay`]), so bulk transfers make few system calls.
//! Unbounded, that growth is a way for one pod to take the agent's memory from every other: open
//! many connections, move enough through each to grow its buffers, then keep them full (a
//! destination that does not read leaves the relay holding the last chunk it read). So:
//!
//! - A buffer holds memory only while it reads or its chunk waits to be written; a socket that
//!   has nothing to read gives its buffer back ([`crate::relay::ReadBuffer`]), so an idle
//!   connection, however much it moved before, holds none.
//! - Every size above the smallest is granted from a node-wide budget of bytes
//!   (`--max-relay-buffer-mib`, 64 MiB), of which the connections of one source address may
//!   hold a quarter, the source being the one their connection slot is counted under
//!   ([`super::Limits::admit`]). A read that cannot get its size takes the largest that fits,
//!   down to the smallest, which needs nothing: a pod past its share gets slower, never
//!   refused, and the others keep theirs. Such reads are counted by the limit that stood in
//!   the way (`ambit_relay_buffer_reads_shrunk_total`).
//!
//! The count is of the buffers the relay holds, not of every copy of their bytes: a chunk handed
//! to an HBONE tunnel stays allocated until HTTP/2 has sent it, which its flow-control window
//! bounds, and the kernel's socket buffers are the kernel's (tcp_mem).
use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, atomic::Ordering},
};

use super::{Limit, Limits, Permit, index};

/// Where one connection's read buffers take their memory from: the node's budget, under the
/// connection's source. Cheap to clone.
#[derive(Clone)]
pub struct BufferShare {
    limits: Option<Arc<Limits>>,
    source: IpAddr,
}

/// Bytes granted to one read buffer; given back when dropped.
pub struct BufferGrant {
    _permit: Option<Permit<IpAddr>>,
}

impl BufferShare {
    /// No budget: every size is granted (unit tests, and streams the agent does not relay for
    /// a pod).
    pub fn unlimited() -> Self {
        Self {
            limits: None,
            source: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        }
    }

    /// `size` bytes for one buffer, or the limit that stands in the way.
    pub(crate) fn grant(&self, size: usize) -> Result<BufferGrant, Limit> {
        let Some(limits) = &self.limits else {
            return Ok(BufferGrant { _permit: None });
        };
        let permit = limits.buffers.try_acquire_many(self.source, size)?;
        Ok(BufferGrant {
            _permit: Some(permit),
        })
    }

    /// Counts a read made with a smaller buffer than asked because of `limit`.
    pub(crate) fn shrunk(&self, limit: Limit) {
        if let Some(limits) = &self.limits {
            limits.counters.buffers_shrunk[index(&Limit::ALL, limit)]
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Limits {
    /// The read-buffer share of connections counted under `source` (the same source as their
    /// connection slot).
    pub fn buffer_share(self: &Arc<Self>, source: IpAddr) -> BufferShare {
        BufferShare {
            limits: Some(self.clone()),
            source: source.to_canonical(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LimitSettings;

    #[test]
    fn a_source_is_granted_its_share_and_others_keep_theirs() {
        let settings = LimitSettings::for_descriptors(20_000)
            .with_relay_buffer_mib(Some(1))
            .unwrap();
        assert_eq!(settings.max_relay_buffer_bytes_per_source, 256 * 1024);
        let limits = Arc::new(Limits::new(settings));
        let a = limits.buffer_share("10.0.0.1".parse().unwrap());
        let b = limits.buffer_share("10.0.0.2".parse().unwrap());
        let held = a.grant(200 * 1024).unwrap();
        assert!(matches!(a.grant(100 * 1024), Err(Limit::PerSource)));
        let _small = a.grant(56 * 1024).unwrap();
        let _b = b.grant(256 * 1024).unwrap();
        assert_eq!(limits.snapshot().relay_buffer_bytes, 512 * 1024);
        drop(held);
        assert_eq!(limits.snapshot().relay_buffer_bytes, 312 * 1024);
        a.shrunk(Limit::PerSource);
        assert_eq!(
            limits.snapshot().relay_buffers_shrunk,
            vec![(Limit::PerSource, 1)]
        );
    }

    #[test]
    fn zero_is_refused_naming_the_flag() {
        let err = LimitSettings::for_descriptors(20_000)
            .with_relay_buffer_mib(Some(0))
            .unwrap_err();
        assert_eq!(err.to_string(), "--max-relay-buffer-mib must be at least 1");
    }
}
