//! The log's writer: lines formatted on the proxy's workers are copied into one buffer, and a
//! thread of their own writes that buffer out (to stderr), so a worker never makes a system
//! call to log and a reader of stderr that falls behind (a stalled container log pipe) never
//! blocks one. When the buffer holds [`QUEUE_BYTES`] a new line is dropped and counted instead.
//!
//! Why not tracing-appender's non-blocking writer, which this replaced: its thread takes lines
//! from a crossbeam channel, which spins and calls `sched_yield` before it parks, about four
//! system calls per proxied connection (two access lines) with nothing to write, plus one heap
//! allocation per line and a queue bounded in lines rather than bytes (docs/perf/README.md,
//! "System calls per connection"). Here a worker holds the lock only to copy its line and wakes
//! the thread only when it sleeps; the thread, once woken, lets lines gather for [`GATHER`],
//! then takes everything queued at once (a swap of two buffers) and writes it in one call.
use std::{
    io::Write,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

/// Bytes queued for the log thread before new lines are dropped (and counted): seconds of the
/// busiest node's access log (about 8,000 lines of 500 bytes).
pub(crate) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// What the thread's buffers keep between bursts; a burst grows them up to [`QUEUE_BYTES`],
/// and they shrink back to this once written.
const BUFFER_KEPT: usize = 64 * 1024;
/// How long the thread, woken by a line, lets more lines gather before it writes: a line
/// reaches the sink at most about this late, and a proxy logging thousands of lines a second
/// wakes the thread about a hundred times a second, not once per line.
const GATHER: Duration = Duration::from_millis(10);
/// How long dropping the [`LogThread`] waits for what is queued to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// Lines dropped because the queue was full, by every queue of the process.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Lines every log queue of the process dropped because it was full.
pub(crate) fn lines_dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

struct Queue {
    /// Lines queued, and whether the thread sleeps.
    state: Mutex<State>,
    /// Wakes the thread: lines were queued while it slept, or the process is ending.
    wake: Condvar,
    /// Tells the owner of the [`LogThread`] that the thread wrote its last bytes.
    finished: Condvar,
    /// Most bytes queued at once before lines are dropped.
    limit: usize,
    /// Lines this queue dropped.
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// The thread waits on `wake`: the next line queued must wake it.
    asleep: bool,
    /// Write what is queued, then stop.
    closing: bool,
    finished: bool,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked holding the lock left at worst a line half-copied; logging
        // must go on.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The log thread: it writes what the [`LogWriter`]s queue. Dropping it writes out what is
/// queued (waiting at most a second for the sink) and stops the thread.
pub(crate) struct LogThread {
    queue: Arc<Queue>,
}

/// Where the proxy's workers write whole lines (one `write` per line, as tracing's formatter
/// does): copied into the queue, or dropped and counted when it is full. Never blocks on the
/// sink.
#[derive(Clone)]
pub(crate) struct LogWriter {
    queue: Arc<Queue>,
}

impl LogThread {
    /// Starts a thread named `name` writing to `sink` what the returned writer is given, with
    /// at most `limit` bytes queued.
    pub(crate) fn spawn<W: Write + Send + 'static>(
        name: &str,
        sink: W,
        limit: usize,
    ) -> std::io::Result<(LogThread, LogWriter)> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            finished: Condvar::new(),
            limit,
            dropped: AtomicU64::new(0),
        });
        let worker = queue.clone();
        thread::Builder::new()
            .name(name.to_string())
            .spawn(move || write_queued(&worker, sink))?;
        Ok((
            LogThread {
                queue: queue.clone(),
            },
            LogWriter { queue },
        ))
    }

    /// Lines this thread's queue dropped because it was full.
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }
}

/// The thread's loop: sleep until lines are queued, take them all, write them, until closing.
fn write_queued<W: Write>(queue: &Queue, mut sink: W) {
    let mut taken = Vec::with_capacity(BUFFER_KEPT);
    loop {
        let closing = {
            let mut state = queue.lock();
            while state.pending.is_empty() && !state.closing {
                state.asleep = true;
                state = queue
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.asleep = false;
            // Let the lines of the next moments join this write: awake, the thread is not
            // woken by each line, so a busy proxy wakes it about once per GATHER.
            if !state.closing {
                state = queue
                    .wake
                    .wait_timeout_while(state, GATHER, |state| !state.closing)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut state.pending, &mut taken);
            state.closing
        };
        // A write that fails (stderr closed) loses these lines: there is nowhere to say so.
        let _ = sink.write_all(&taken).and_then(|()| sink.flush());
        taken.clear();
        taken.shrink_to(BUFFER_KEPT);
        if closing && queue.lock().pending.is_empty() {
            break;
        }
    }
    queue.lock().finished = true;
    queue.finished.notify_all();
}

impl Drop for LogThread {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.closing = true;
        self.queue.wake.notify_one();
        // A sink that never takes the bytes (a stalled pipe) must not hold the process.
        let _ = self
            .queue
            .finished
            .wait_timeout_while(state, FLUSH_WAIT, |state| !state.finished);
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.queue.lock();
        if state.pending.len() + line.len() > self.queue.limit {
            drop(state);
            self.queue.dropped.fetch_add(1, Ordering::Relaxed);
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        state.pending.extend_from_slice(line);
        if state.asleep {
            state.asleep = false;
            drop(state);
            self.queue.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// Whether a [`Sink`] takes bytes, and its signal when that changes.
    type Gate = Arc<(Mutex<bool>, Condvar)>;

    /// A sink that hands each write to the test, and can be held shut until the test opens it.
    struct Sink {
        writes: mpsc::Sender<Vec<u8>>,
        gate: Gate,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.gate;
            let open = open.lock().unwrap();
            drop(opened.wait_while(open, |open| !*open).unwrap());
            self.writes.send(buf.to_vec()).unwrap();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn gated_sink(open: bool) -> (Sink, mpsc::Receiver<Vec<u8>>, Gate) {
        let (writes, written) = mpsc::channel();
        let gate = Arc::new((Mutex::new(open), Condvar::new()));
        (
            Sink {
                writes,
                gate: gate.clone(),
            },
            written,
            gate,
        )
    }

    fn open(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
    }

    /// Everything the receiver got until `until` bytes arrived (or a second passed).
    fn received(written: &mpsc::Receiver<Vec<u8>>, until: usize) -> Vec<u8> {
        let mut all = Vec::new();
        while all.len() < until {
            match written.recv_timeout(Duration::from_secs(1)) {
                Ok(bytes) => all.extend(bytes),
                Err(_) => break,
            }
        }
        all
    }

    #[test]
    fn lines_reach_the_sink_whole_and_in_order() {
        let (sink, written, _gate) = gated_sink(true);
        let (_thread, writer) = LogThread::spawn("log-test", sink, 1024 * 1024).unwrap();
        let workers: Vec<_> = (0..4)
            .map(|worker| {
                let mut writer = writer.clone();
                thread::spawn(move || {
                    for n in 0..500 {
                        writer
                            .write_all(format!("worker {worker} line {n}\n").as_bytes())
                            .unwrap();
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let expected: usize = (0..4)
            .flat_map(|worker| (0..500).map(move |n| format!("worker {worker} line {n}\n").len()))
            .sum();
        let all = String::from_utf8(received(&written, expected)).unwrap();
        assert_eq!(all.len(), expected);
        for worker in 0..4 {
            let numbers: Vec<usize> = all
                .lines()
                .filter_map(|line| line.strip_prefix(&format!("worker {worker} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(numbers, (0..500).collect::<Vec<_>>(), "worker {worker}");
        }
    }

    /// A sink that takes nothing blocks only the thread: writers go on, what fits is kept,
    /// the rest is dropped and counted, and what was kept arrives once the sink takes bytes.
    #[test]
    fn a_stalled_sink_never_blocks_a_writer_and_drops_what_does_not_fit() {
        let (sink, written, gate) = gated_sink(false);
        let (thread, mut writer) = LogThread::spawn("log-test", sink, 1000).unwrap();
        let mut line = [b'x'; 100];
        line[99] = b'\n';
        // The thread takes the first lines and stalls in the sink; the next ones queue until
        // the 1000 bytes are taken, and the rest are dropped.
        for _ in 0..200 {
            writer.write_all(&line).unwrap();
        }
        let dropped = thread.dropped();
        assert!((100..=190).contains(&dropped), "dropped {dropped} of 200");
        open(&gate);
        drop(thread);
        let kept = received(&written, (200 - dropped as usize) * 100);
        assert_eq!(
            kept.len() as u64,
            (200 - dropped) * 100,
            "every line kept or counted"
        );
        assert!(
            kept.chunks(100).all(|kept| kept == line),
            "only whole lines"
        );
    }

    /// Dropping the thread writes out what is queued; with a sink that never takes it, the
    /// drop returns after a second instead of holding the process.
    #[test]
    fn dropping_the_thread_flushes_and_gives_up_on_a_stalled_sink() {
        let (sink, written, _gate) = gated_sink(true);
        let (thread, mut writer) = LogThread::spawn("log-test", sink, 1024).unwrap();
        writer.write_all(b"last words\n").unwrap();
        drop(thread);
        assert_eq!(received(&written, 11), b"last words\n");

        let (sink, _written, _gate) = gated_sink(false);
        let (thread, mut writer) = LogThread::spawn("log-test", sink, 1024).unwrap();
        writer.write_all(b"never written\n").unwrap();
        let started = std::time::Instant::now();
        drop(thread);
        assert!(
            started.elapsed() < FLUSH_WAIT * 3,
            "{:?}",
            started.elapsed()
        );
    }
}
