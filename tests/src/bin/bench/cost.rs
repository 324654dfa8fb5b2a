//! What a load costs the whole machine, and the ceiling that cost sets on its speed.
//!
//! On the bench's bed the load generator, the server and both agents share the machine's CPUs.
//! A path costing c CPU seconds per request (or per GB) cannot go faster than the machine's CPUs
//! over c, however well the agents avoid waiting: over the direct path's measured rate, the
//! ceiling this module's figures give beside each path. A path measured near its ceiling, with
//! the CPUs near busy, is bound by what it costs, and only doing less work per byte or per
//! request moves it; one well under it also waits somewhere. (Measured over ceiling is, by
//! construction, the CPUs' busy share during the path's run: the ceiling restates the cost per
//! unit as the rate it would give at 100%.)
//!
//! The cipher's own cost is measured too (AES-256-GCM, the suite rustls negotiates between two
//! agents, with ring, rustls's provider here): what any HBONE path adds at the least, one agent
//! sealing and the other opening every byte, whatever else is saved.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

/// A reading of the whole machine's CPU time, from the `cpu` line of `/proc/stat`.
#[derive(Clone, Copy, Debug)]
pub struct MachineCpu {
    /// user, nice, system, irq and softirq, in seconds: the work done on any CPU.
    busy: f64,
    /// Time the hypervisor gave other guests while this one wanted to run, in seconds.
    steal: f64,
    /// The machine's CPUs (`cpuN` lines).
    cpus: usize,
    at: Instant,
}

/// The machine's CPU time over one run.
#[derive(Clone, Copy, Debug)]
pub struct Spent {
    /// CPU seconds of work, all CPUs together.
    pub busy: f64,
    /// CPU seconds stolen by the hypervisor.
    pub steal: f64,
    /// Wall-clock seconds the run took.
    pub wall: f64,
    /// The machine's CPUs.
    pub cpus: usize,
}

impl MachineCpu {
    /// Now, or `None` where `/proc/stat` cannot be read or parsed.
    pub fn now() -> Option<Self> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        // Every CPU the machine has (the `cpu` line sums them all), whatever this process may
        // use.
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count();
        let fields: Vec<u64> = stat
            .lines()
            .find_map(|l| l.strip_prefix("cpu "))?
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        // user nice system idle iowait irq softirq steal (guest time is inside user's).
        let tick = |i: usize| fields.get(i).copied().unwrap_or(0) as f64 / clock_ticks();
        Some(Self {
            busy: tick(0) + tick(1) + tick(2) + tick(5) + tick(6),
            steal: tick(7),
            cpus,
            at: Instant::now(),
        })
    }

    /// What the machine spent since this reading.
    pub fn since(self) -> Option<Spent> {
        let now = Self::now()?;
        Some(Spent {
            busy: now.busy - self.busy,
            steal: now.steal - self.steal,
            wall: now.at.duration_since(self.at).as_secs_f64(),
            cpus: now.cpus,
        })
    }
}

impl Spent {
    /// The share of the machine's CPUs that worked during the run (0 to 1).
    pub fn busy_share(&self) -> Option<f64> {
        (self.wall > 0.0 && self.cpus > 0).then(|| self.busy / (self.wall * self.cpus as f64))
    }
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc/stat` and `/proc/<pid>/stat`.
pub fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&hz| hz > 0)
        .unwrap_or(100) as f64
}

/// The cipher's speed on one CPU of this machine.
#[derive(Clone, Copy, Debug)]
pub struct CipherCost {
    /// Bytes sealed per second.
    pub seal: f64,
    /// Bytes opened per second.
    pub open: f64,
}

impl CipherCost {
    /// CPU seconds to seal a gigabyte (10^9 bytes) once and open it once: what HBONE adds to
    /// every byte at the least, one agent sealing and the other opening.
    pub fn seconds_per_gb(&self) -> f64 {
        1e9 / self.seal + 1e9 / self.open
    }
}

/// The size of the TLS records the agents write in bulk (rustls's largest plaintext).
const RECORD: usize = 16 * 1024;

/// Seals and opens 16 KiB records with AES-256-GCM on this thread for about `time` (at most
/// 4 GiB each way), timing each half apart.
pub fn measure_cipher(time: Duration) -> Result<CipherCost> {
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, &[0x5a; 32])
            .map_err(|_| anyhow!("AES-256-GCM rejected a 32-byte key"))?,
    );
    // A TLS 1.3 record's additional data is its 5-byte header.
    let header = [23u8, 3, 3, 0x40, 0x11];
    let mut record = vec![0xa5u8; RECORD];
    let (mut sealing, mut opening) = (Duration::ZERO, Duration::ZERO);
    let mut bytes = 0u64;
    let started = Instant::now();
    let mut sequence = 0u64;
    while started.elapsed() < time && bytes < 4 << 30 {
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&sequence.to_be_bytes());
        sequence += 1;
        let t = Instant::now();
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut record,
            )
            .map_err(|_| anyhow!("sealing record {sequence} failed"))?;
        sealing += t.elapsed();
        record.extend_from_slice(tag.as_ref());
        let t = Instant::now();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(header),
                &mut record,
            )
            .map_err(|_| anyhow!("opening record {sequence} failed"))?
            .len();
        opening += t.elapsed();
        record.truncate(plain);
        bytes += RECORD as u64;
    }
    let rate = |spent: Duration| {
        (spent > Duration::ZERO)
            .then(|| bytes as f64 / spent.as_secs_f64())
            .context("the cipher measurement ran no record")
    };
    Ok(CipherCost {
        seal: rate(sealing)?,
        open: rate(opening)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_machine_works_while_this_thread_spins() {
        let before = MachineCpu::now().expect("/proc/stat");
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(300) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let spent = before.since().expect("/proc/stat");
        // At least most of the 300 ms this thread spun was work on some CPU.
        assert!(spent.busy >= 0.2, "{spent:?}");
        assert!(spent.wall >= 0.3, "{spent:?}");
    }

    #[test]
    fn the_cipher_round_trips_and_has_a_cost() {
        let cost = measure_cipher(Duration::from_millis(50)).expect("cipher");
        assert!(cost.seal > 0.0 && cost.open > 0.0, "{cost:?}");
        assert!(cost.seconds_per_gb() > 0.0);
    }
}
