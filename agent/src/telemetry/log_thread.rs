//! The log's writer: lines formatted on the proxy's workers are copied into one buffer, and a
//! thread of their own writes that buffer out (to stderr), so a reader of stderr that falls
//! behind (a stalled container log pipe) never blocks a worker. To log a line a worker makes
//! no system call but a futex wake when the thread sleeps (and a futex wait if another worker
//! holds the lock for its own copy). When the queue holds its limit ([`QUEUE_BYTES`], the batch
//! being written included) a new line is dropped and counted instead; access-log lines may fill
//! only three quarters of it ([`ACCESS_SHARE`]), so a pod that floods connections cannot crowd
//! out the process's own warnings and errors.
//!
//! Why not tracing-appender's non-blocking writer, which this replaced: its thread takes lines
//! from a crossbeam channel, which spins and calls `sched_yield` before it parks, about four
//! system calls per proxied connection (two access lines) with nothing to write, plus one heap
//! allocation per line and a queue bounded in lines rather than bytes (docs/perf/README.md,
//! "System calls per connection"). Here a worker holds the lock only to copy its line and wakes
//! the thread only when it sleeps; the thread takes everything queued at once (a swap of two
//! buffers) and writes it in one call, so lines logged while it writes join the next write.
//!
//! Access-log lines are gathered: the thread, woken by one (or done with a write that left
//! some queued), waits up to [`ACCESS_GATHER`] (10 ms) or until [`GATHER_BYTES`] are queued
//! before it writes, so a busy proxy has it write at most about a hundred times a second (more
//! only when over 64 KiB of lines come in 10 ms) instead of waking it for nearly every
//! connection or request (Envoy holds its
//! access log longer: it flushes its file every 10 s, `--file-flush-interval-msec`, or when its
//! buffer fills). Every other line (a warning, an error,
//! a state change) is written at once and takes the gathered lines with it: a 10 ms gathering of
//! every line made the end-to-end tests that read a warning right after the state it reports
//! fail, and shows what that would do to an operator reading the log (docs/perf/README.md).
use std::{
    io::Write,
    sync::{
        Arc, Condvar, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// Bytes queued for the log thread, the batch it is writing included, before new lines are
/// dropped (and counted): seconds of the busiest node's access log (about 8,000 lines of 500
/// bytes).
pub(crate) const QUEUE_BYTES: usize = 4 * 1024 * 1024;
/// The share of the queue access-log lines (target `access`) may fill, in quarters: the last
/// quarter is kept for every other line.
const ACCESS_SHARE: usize = 3;
/// What the thread's buffers keep while it sleeps; a burst grows them up to the limit, and
/// they shrink back to this once the thread has nothing left to write.
const BUFFER_KEPT: usize = 64 * 1024;
/// How long access-log lines wait for others before the thread writes them, at most; the
/// process's ([`super::init_logging`]).
pub(crate) const ACCESS_GATHER: Duration = Duration::from_millis(10);
/// Bytes queued that end a gathering at once (what the buffers keep while the thread sleeps).
const GATHER_BYTES: usize = BUFFER_KEPT;
/// How long dropping the [`LogThread`] waits for what is queued to be written.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

struct Queue {
    /// Lines queued, and what the thread is doing.
    state: Mutex<State>,
    /// Wakes the thread: lines were queued while it slept, or the process is ending.
    wake: Condvar,
    /// Tells the owner of the [`LogThread`] that the thread wrote its last bytes.
    done: Condvar,
    /// Most bytes queued at once (the batch being written included) before lines are dropped.
    limit: usize,
    /// How long access-log lines wait for others ([`ACCESS_GATHER`]).
    gather: Duration,
    /// Lines dropped because the queue was full, or because the sink refused their batch.
    dropped: AtomicU64,
}

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    /// Bytes of the batch the thread is writing: still held, so counted against the limit.
    in_flight: usize,
    /// The thread waits for a first line, so the next line queued must wake it. Without the
    /// flag every line would notify: std's `notify_one` makes a system call even when nobody
    /// waits.
    asleep: bool,
    /// The thread waits (at most its `gather`) for more access-log lines before it writes
    /// what is queued; a line that ends the wait clears it, so only one wakes the thread.
    gathering: bool,
    /// A line other than an access-log line is queued: write without gathering.
    urgent: bool,
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

    fn drop_lines(&self, lines: u64) {
        self.dropped.fetch_add(lines, Ordering::Relaxed);
    }
}

/// The log thread: it writes what the [`LogWriter`]s queue. Dropping it writes out what is
/// queued (waiting at most a second for the sink) and stops the thread.
pub(crate) struct LogThread {
    queue: Arc<Queue>,
}

/// Where the proxy's workers write whole lines (one `write` per line, as tracing's formatter
/// does): copied into the queue, or dropped and counted when it is full. Never blocks on the
/// sink. As a [`MakeWriter`], it gives access-log lines their share of the queue and lets them
/// be gathered.
#[derive(Clone)]
pub(crate) struct LogWriter {
    queue: Arc<Queue>,
    /// Most bytes queued at once for this writer's lines to be taken.
    limit: usize,
    /// This writer's lines are written at once (they are not access-log lines).
    urgent: bool,
}

impl LogThread {
    /// Starts a thread named `name` writing to `sink` what the returned writer is given, with
    /// at most `limit` bytes held and access-log lines gathered for at most `gather`.
    pub(crate) fn spawn<W: Write + Send + 'static>(
        name: &str,
        sink: W,
        limit: usize,
        gather: Duration,
    ) -> std::io::Result<(LogThread, LogWriter)> {
        let queue = Arc::new(Queue {
            state: Mutex::new(State {
                pending: Vec::with_capacity(BUFFER_KEPT),
                ..State::default()
            }),
            wake: Condvar::new(),
            done: Condvar::new(),
            limit,
            gather,
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
            LogWriter {
                queue,
                limit,
                urgent: true,
            },
        ))
    }
}

impl LogWriter {
    /// Lines this writer's queue dropped: it was full, or the sink refused them.
    pub(crate) fn dropped(&self) -> u64 {
        self.queue.dropped.load(Ordering::Relaxed)
    }
}

/// The thread's loop: sleep until lines are queued, give access-log lines their gathering,
/// take them all, write them, until closing.
fn write_queued<W: Write>(queue: &Queue, mut sink: W) {
    let mut taken = Vec::with_capacity(BUFFER_KEPT);
    loop {
        let closing = {
            let mut state = queue.lock();
            if state.pending.is_empty() && !state.closing {
                // Idle: give back what a burst grew (both buffers are empty).
                taken.shrink_to(BUFFER_KEPT);
                state.pending.shrink_to(BUFFER_KEPT);
            }
            while state.pending.is_empty() && !state.closing {
                state.asleep = true;
                state = queue
                    .wake
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            state.asleep = false;
            if !state.urgent && !state.closing && state.pending.len() < GATHER_BYTES {
                state.gathering = true;
                state = queue
                    .wake
                    .wait_timeout_while(state, queue.gather, |state| {
                        state.gathering && !state.closing
                    })
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                state.gathering = false;
            }
            state.urgent = false;
            std::mem::swap(&mut state.pending, &mut taken);
            state.in_flight = taken.len();
            state.closing
        };
        if sink.write_all(&taken).and_then(|()| sink.flush()).is_err() {
            // The sink refused the batch (stderr closed): its lines are lost, and counted.
            let lines = taken.iter().filter(|&&byte| byte == b'\n').count();
            queue.drop_lines(lines as u64);
        }
        taken.clear();
        let mut state = queue.lock();
        state.in_flight = 0;
        if closing && state.pending.is_empty() {
            state.finished = true;
            queue.done.notify_all();
            return;
        }
    }
}

impl Drop for LogThread {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.closing = true;
        self.queue.wake.notify_one();
        // A sink that never takes the bytes (a stalled pipe) must not hold the process.
        let _ = self
            .queue
            .done
            .wait_timeout_while(state, FLUSH_WAIT, |state| !state.finished);
    }
}

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut state = self.queue.lock();
        let held = state.pending.len() + state.in_flight;
        if held + line.len() > self.limit {
            drop(state);
            self.queue.drop_lines(1);
            return Ok(line.len());
        }
        state.pending.extend_from_slice(line);
        state.urgent |= self.urgent;
        // Wake the thread if it sleeps, or end its gathering for a line that must not wait or
        // once enough is queued; one notification each time, as every one is a system call.
        let wake = if state.asleep {
            state.asleep = false;
            true
        } else if state.gathering && (self.urgent || state.pending.len() >= GATHER_BYTES) {
            state.gathering = false;
            true
        } else {
            false
        };
        drop(state);
        if wake {
            self.queue.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        if meta.target() == super::ACCESS_TARGET {
            LogWriter {
                queue: self.queue.clone(),
                limit: self.queue.limit / 4 * ACCESS_SHARE,
                urgent: false,
            }
        } else {
            self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;

    /// How many more writes a [`Sink`] lets through, and its signal when that changes.
    type Gate = Arc<(Mutex<u32>, Condvar)>;

    /// A sink that hands each write to the test, says when a write came in, and holds each
    /// write until the test lets it through.
    struct Sink {
        writes: mpsc::Sender<Vec<u8>>,
        entered: mpsc::Sender<()>,
        gate: Gate,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.entered.send(());
            let (permits, changed) = &*self.gate;
            let permits = permits.lock().unwrap();
            let mut permits = changed
                .wait_while(permits, |permits| *permits == 0)
                .unwrap();
            *permits -= 1;
            drop(permits);
            self.writes.send(buf.to_vec()).unwrap();
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Gated {
        sink: Sink,
        written: mpsc::Receiver<Vec<u8>>,
        entered: mpsc::Receiver<()>,
        gate: Gate,
    }

    fn gated_sink(open: bool) -> Gated {
        let (writes, written) = mpsc::channel();
        let (entered_tx, entered) = mpsc::channel();
        let gate = Arc::new((Mutex::new(if open { u32::MAX } else { 0 }), Condvar::new()));
        Gated {
            sink: Sink {
                writes,
                entered: entered_tx,
                gate: gate.clone(),
            },
            written,
            entered,
            gate,
        }
    }

    fn open(gate: &(Mutex<u32>, Condvar)) {
        *gate.0.lock().unwrap() = u32::MAX;
        gate.1.notify_all();
    }

    fn let_one_write_through(gate: &(Mutex<u32>, Condvar)) {
        *gate.0.lock().unwrap() += 1;
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

    /// Runs `write` on a thread of its own and fails if it has not returned within 5 s: a
    /// writer that blocks fails the test instead of hanging it.
    fn within_5s(write: impl FnOnce() + Send + 'static) {
        let (done, finished) = mpsc::channel();
        thread::spawn(move || {
            write();
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(5))
            .expect("a writer blocked");
    }

    #[test]
    fn lines_reach_the_sink_whole_and_in_order() {
        let gated = gated_sink(true);
        let (_thread, writer) =
            LogThread::spawn("log-test", gated.sink, 1024 * 1024, ACCESS_GATHER).unwrap();
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
        let all = String::from_utf8(received(&gated.written, expected)).unwrap();
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

    /// While the thread is stuck in a sink that takes nothing, writers go on: the queue takes
    /// what fits beside the batch stuck in the sink, drops the rest and counts it, and what
    /// was kept arrives once the sink takes bytes.
    #[test]
    fn a_stalled_sink_never_blocks_a_writer_and_drops_what_does_not_fit() {
        let gated = gated_sink(false);
        let (thread, writer) =
            LogThread::spawn("log-test", gated.sink, 1000, ACCESS_GATHER).unwrap();
        let mut line = [b'x'; 100];
        line[99] = b'\n';
        // The first line goes to the thread, which is then stuck in the sink with it.
        let mut first = writer.clone();
        within_5s(move || first.write_all(&line).unwrap());
        gated
            .entered
            .recv_timeout(Duration::from_secs(5))
            .expect("the thread never wrote");
        // The stuck line holds 100 of the 1000 bytes: 9 more fit, 191 are dropped.
        let mut rest = writer.clone();
        within_5s(move || {
            for _ in 0..200 {
                rest.write_all(&line).unwrap();
            }
        });
        assert_eq!(writer.dropped(), 191);
        open(&gated.gate);
        drop(thread);
        let kept = received(&gated.written, 1000);
        assert_eq!(kept.len(), 1000, "every line kept or counted");
        assert!(
            kept.chunks(100).all(|kept| kept == line),
            "only whole lines"
        );
    }

    /// The metadata of an event of `target`, as a subscriber's writer is asked for it.
    fn event_metadata(access: bool) -> &'static tracing::Metadata<'static> {
        use tracing_subscriber::{Layer, layer::Context, prelude::*};

        type Seen = Arc<Mutex<Option<&'static tracing::Metadata<'static>>>>;
        struct Capture(Seen);
        impl<S: tracing::Subscriber> Layer<S> for Capture {
            fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
                *self.0.lock().unwrap() = Some(event.metadata());
            }
        }
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry().with(Capture(seen.clone()));
        tracing::subscriber::with_default(subscriber, || {
            if access {
                tracing::info!(target: super::super::ACCESS_TARGET, "an access line");
            } else {
                tracing::warn!("a warning");
            }
        });
        let metadata = seen.lock().unwrap().take();
        metadata.expect("the event was not seen")
    }

    /// Access-log lines fill at most three quarters of the queue; other lines (warnings,
    /// errors) still find room beside them.
    #[test]
    fn access_lines_leave_room_for_the_others() {
        let gated = gated_sink(false);
        let (_thread, writer) =
            LogThread::spawn("log-test", gated.sink, 4000, ACCESS_GATHER).unwrap();
        let line = [b'a'; 100];
        let access = event_metadata(true);
        let mut access_lines = writer.make_writer_for(access);
        within_5s(move || {
            for _ in 0..40 {
                access_lines.write_all(&line).unwrap();
            }
        });
        // 30 of the 40 access lines fit in 3000 bytes (the batch stuck in the sink included).
        assert_eq!(writer.dropped(), 10);
        let mut warnings = writer.make_writer_for(event_metadata(false));
        warnings.write_all(&line).unwrap();
        assert_eq!(
            writer.dropped(),
            10,
            "a warning found no room beside access lines"
        );
    }

    /// Dropping the thread writes out what is queued before it returns; with a sink that
    /// never takes it, the drop returns after a second instead of holding the process.
    #[test]
    fn dropping_the_thread_flushes_and_gives_up_on_a_stalled_sink() {
        let gated = gated_sink(false);
        let (thread, mut writer) =
            LogThread::spawn("log-test", gated.sink, 1024, ACCESS_GATHER).unwrap();
        let entered = || {
            gated
                .entered
                .recv_timeout(Duration::from_secs(5))
                .expect("the thread never wrote")
        };
        // One line in the sink, one queued behind it; the first goes through, and the thread
        // is held in the sink with the second when the drop begins.
        writer.write_all(b"first\n").unwrap();
        entered();
        writer.write_all(b"last words\n").unwrap();
        let_one_write_through(&gated.gate);
        entered();
        let dropping = thread::spawn(move || drop(thread));
        thread::sleep(Duration::from_millis(100));
        assert!(
            !dropping.is_finished(),
            "the drop returned before the queued line was written"
        );
        let_one_write_through(&gated.gate);
        dropping.join().unwrap();
        let written: Vec<u8> = gated.written.try_iter().flatten().collect();
        assert_eq!(written, b"first\nlast words\n");

        let gated = gated_sink(false);
        let (thread, mut writer) =
            LogThread::spawn("log-test", gated.sink, 1024, ACCESS_GATHER).unwrap();
        writer.write_all(b"never written\n").unwrap();
        let started = std::time::Instant::now();
        drop(thread);
        assert!(
            started.elapsed() < FLUSH_WAIT * 3,
            "{:?}",
            started.elapsed()
        );
        assert!(gated.written.try_recv().is_err());
    }

    /// A gathering long enough that no test outlasts it: what ends it is the test's doing.
    const LONG_GATHER: Duration = Duration::from_secs(600);

    /// A log thread whose sink takes every write, gathering access lines for `gather`.
    struct Gathering {
        thread: LogThread,
        /// Its writer for lines other than access-log lines.
        writer: LogWriter,
        /// Its writer for access-log lines, as tracing asks for one.
        access: LogWriter,
        /// What the sink received, one item per write.
        written: mpsc::Receiver<Vec<u8>>,
    }

    fn gathering(gather: Duration) -> Gathering {
        let gated = gated_sink(true);
        let (thread, writer) =
            LogThread::spawn("log-test", gated.sink, 1024 * 1024, gather).unwrap();
        let access = writer.make_writer_for(event_metadata(true));
        Gathering {
            thread,
            writer,
            access,
            written: gated.written,
        }
    }

    /// Access-log lines wait for company; a warning is written at once and takes them with
    /// it, in one write and in order.
    #[test]
    fn access_lines_are_gathered_until_a_warning_takes_them() {
        let mut bed = gathering(LONG_GATHER);
        bed.access.write_all(b"access 1\n").unwrap();
        bed.access.write_all(b"access 2\n").unwrap();
        assert!(
            bed.written
                .recv_timeout(Duration::from_millis(300))
                .is_err(),
            "an access line was written without waiting for others"
        );
        let mut warnings = bed.writer.make_writer_for(event_metadata(false));
        warnings.write_all(b"a warning\n").unwrap();
        let write = bed
            .written
            .recv_timeout(Duration::from_secs(5))
            .expect("the warning waited");
        assert_eq!(write, b"access 1\naccess 2\na warning\n");
    }

    /// Gathered access lines are written when the gathering ends, alone; and at once when
    /// they fill what a gathering holds.
    #[test]
    fn gathered_access_lines_are_written_after_the_gathering_or_once_enough_are_queued() {
        let mut bed = gathering(Duration::from_millis(20));
        bed.access.write_all(b"alone\n").unwrap();
        assert_eq!(received(&bed.written, 6), b"alone\n");

        let mut bed = gathering(LONG_GATHER);
        let mut line = vec![b'a'; 1000];
        line[999] = b'\n';
        let lines = GATHER_BYTES / line.len() + 1;
        // The first line wakes the thread, which is gathering by the time the rest come.
        bed.access.write_all(&line).unwrap();
        thread::sleep(Duration::from_millis(100));
        for _ in 1..lines {
            bed.access.write_all(&line).unwrap();
        }
        assert_eq!(received(&bed.written, lines * 1000).len(), lines * 1000);
    }

    /// Dropping the thread ends a gathering: what it held is written before the drop returns.
    #[test]
    fn dropping_the_thread_writes_gathered_lines_at_once() {
        let mut bed = gathering(LONG_GATHER);
        bed.access.write_all(b"last access\n").unwrap();
        let started = std::time::Instant::now();
        drop(bed.thread);
        assert!(
            started.elapsed() < FLUSH_WAIT * 3,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            bed.written.try_iter().flatten().collect::<Vec<u8>>(),
            b"last access\n"
        );
    }
}
