//! `testpod`: the client and server that test-bed pods run.
//!
//! Every output line on stdout is one JSON object.
//!
//! - `testpod serve --port P [--port P2 ...] [--bind ADDR] [--name NAME]`: TCP echo server.
//!   Each accepted connection first gets `HELLO <name> <peer as accepted> <local>\n`, then every
//!   byte is echoed until EOF, then the server shuts down its write side and closes. Prints
//!   `{"event":"listening",...}` once all sockets listen, then `accepted`/`closed` events.
//! - `testpod client --connect ADDR [--bytes N] [--count C] [--timeout-ms T] [--pattern S]
//!   [--rate R]`: C connections, each sending N deterministic pseudo-random bytes (seeded by the
//!   connection index; with `--pattern`, the string S repeated instead; with `--rate`, at most R
//!   bytes per second, so a transfer lasts as long as a test needs) and checking the echo; one
//!   JSON line per connection; exit 0 only if all are ok. With `--send-first` each connection
//!   starts sending as soon as it is connected, before the server's greeting arrives (a client
//!   that talks first, as HTTP clients do). Each line has the socket's `peer` (`getpeername`),
//!   `local` (`getsockname`) and `kernel_peer` (the remote address in the kernel's socket
//!   table, which no hook rewrites: `127.0.0.1:15001` for a connection redirected to the agent).
//! - `testpod churn --connect ADDR --count C [--max-seconds S] [--greeting-only]`: C short
//!   sequential connections; one summary line. With `--greeting-only` (for a server started
//!   with `--greeting-only`) each connection only reads the greeting and the server's close.
//! - `testpod serve ... --greeting-only`: each connection gets the greeting, then the server
//!   closes first (so TIME_WAIT stays on the server) and reports nothing per connection.
//! - `testpod hold --connect ADDR`: one long-lived connection, echoing stdin lines through it.
//! - `testpod flood --kind K --connect ADDR --count C`: C connects that fail after the connect
//!   hook ran (an attacker's attempt to leave state behind in the kernel); one summary line with
//!   the errors seen. Kinds: `v6only-mapped` (an IPV6_V6ONLY socket dialling `::ffff:<v4>`),
//!   `addr-in-use` (a source port whose 4-tuple is taken), `plain` (whatever ADDR gives, e.g.
//!   an IPv6 address with IPv6 disabled in the pod).
//! - `testpod pending --connect ADDR --count C --hold-seconds S`: C non-blocking connects at
//!   once, held S seconds (handshakes that cannot complete stay in flight), then closed; one
//!   summary line.
//! - `testpod idle --connect ADDR --count N [--max-seconds S] [--outstanding W]`: opens N
//!   connections (128 connects in flight, at most W connecting or open at a time) and sends
//!   nothing on them, watching them until the peer has closed every one (or S seconds passed
//!   after the last connect). Prints `{"event":"opened",...}` once all connects are done, progress
//!   every second while some are open, and `{"event":"done","opened":..,"failed":..,
//!   "closed_eof":..,"closed_reset":..,"still_open":..,"closed_after_s":{"<s>":n,..}}`: how many
//!   the peer closed with a FIN or a reset, and how many seconds after their connect.
//! - `testpod http --port P [--name NAME]`: an HTTP server (HTTP/1.1, and HTTP/2 with prior
//!   knowledge, on one port) answering every request 200 with `<name> <version seen>\n` and the
//!   header `x-served-by: <name>`, so a client tells which endpoint answered and in which HTTP
//!   version the request reached it. Prints `{"event":"listening",...}` once it listens.
//!   A request with a body (read up to 1 MiB) gets ` body=<bytes>` added to the line.
//!   With `--delay-ms D`, each answer waits D ms first (a slow endpoint). For resilience tests,
//!   per request: `x-fail-first: N` answers 503 to the first N requests of each path (then
//!   200), `x-delay-ms: N` waits N ms (at most 60 s) before answering. With `--log-requests`,
//!   each request is printed as `{"event":"request","method":..,"path":..,"host":..,
//!   "attempt":..,"headers":{..}}` (path with its query; `attempt`: its
//!   `x-envoy-attempt-count`; each header's values joined by `, `), so a test sees what reached
//!   it, with the server's connection number (`connection`, from 1) and the requests in flight
//!   (`in_flight`, this one included; `max_in_flight` since it started); with `--hang`, it
//!   accepts and reads requests and never answers (a black hole); with `--fail-status S`, it
//!   answers every request S (a broken endpoint).
//! - `testpod burst --connect ADDR --count C [--bytes N] [--hold-seconds S]`: C connections
//!   opened one after another and kept open, each exchanging N bytes with the echo server first;
//!   prints `{"event":"opened",...}` once all are open, holds them until a line (or EOF) on stdin
//!   or S seconds, then half-closes each and reads it to the end; one `closed` summary line.
//! - `testpod stall --addr ADDR --count C [--bytes N] [--small-buffers B] --hold-seconds S`:
//!   a hostile pod's stalled half-closes. Listens on ADDR (the pod's own address) and never
//!   reads what it accepts; opens C connections to ADDR, writes each until the kernel takes no
//!   more (at most N bytes), then half-closes it. With `--small-buffers`, first lowers the
//!   namespace's TCP buffer maxima (`net.ipv4.tcp_rmem`/`tcp_wmem`) to B bytes, so the stalled
//!   bytes take little memory. Prints `{"event":"stalled","open":..,"failed":..,"bytes":..}`,
//!   holds everything until a line (or EOF) on stdin or S seconds, closes it all and prints
//!   `{"event":"closed"}`.
//! - `testpod grpc-serve --port P [--name NAME]`: a gRPC server (tonic) of
//!   tests/proto/greeter.proto: unary `Say` and server-streaming `Count`, with statuses in
//!   headers (`fail`: NOT_FOUND) and in trailers after replies (`abort`: ABORTED).
//! - `testpod grpc-call --addr http://H:P [--calls N] [--stream M] [--text T]`: N unary calls
//!   and one stream of M replies on one channel; one line per call with its status code.
//! - `testpod ws-serve --port P [--name NAME]` and `testpod ws-echo --url ws://H:P/ [--messages
//!   N]`: a WebSocket echo server answering `<name>: <message>`, and a client checking N echoes.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

// In a directory of their own: a file directly in src/bin/ would be taken for a binary.
#[path = "testpod/grpc.rs"]
mod grpc;
#[path = "testpod/ws.rs"]
mod ws;

#[derive(Parser)]
#[command(name = "testpod", about = "Test bed client/server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// TCP echo server with a greeting line.
    Serve {
        /// Port to listen on (repeatable).
        #[arg(long = "port", required = true)]
        ports: Vec<u16>,
        /// Listen only on this address (default: `0.0.0.0` and `[::]`).
        #[arg(long)]
        bind: Option<IpAddr>,
        /// Name in the greeting (default: $POD_NAME).
        #[arg(long)]
        name: Option<String>,
        /// Send the greeting and close, without echo or per-connection events.
        #[arg(long)]
        greeting_only: bool,
        /// Set SO_REUSEPORT, joining the listener group of a socket of the same user on the
        /// same address (as a root application could try with the agent's).
        #[arg(long)]
        reuse_port: bool,
    },
    /// Connect, send bytes, verify the echo. A flag given twice takes its last value.
    #[command(args_override_self = true)]
    Client {
        /// Address to connect to, e.g. `10.10.1.2:8080` or `[fd00:10:1::2]:8080`.
        #[arg(long)]
        connect: SocketAddr,
        /// Bytes to send per connection.
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        /// Number of sequential connections.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Time limit per connection, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Send this string repeated (a recognisable payload, e.g. to look for in a packet
        /// capture) instead of pseudo-random bytes.
        #[arg(long)]
        pattern: Option<String>,
        /// Set this socket mark (`SO_MARK`) before connecting, as a process with
        /// CAP_NET_RAW can.
        #[arg(long, value_parser = parse_u32)]
        mark: Option<u32>,
        /// Bind to this address with `IP_TRANSPARENT` before connecting, posing as a client
        /// it is not, as a process with CAP_NET_RAW can.
        #[arg(long)]
        transparent_from: Option<IpAddr>,
        /// Send at most this many bytes per second (a long transfer whatever the machine's
        /// speed).
        #[arg(long)]
        rate: Option<u64>,
        /// Start sending as soon as connected, without waiting for the greeting.
        #[arg(long)]
        send_first: bool,
    },
    /// Connects that fail after the connect hook ran.
    Flood {
        /// How they fail.
        #[arg(long, value_enum)]
        kind: FloodKind,
        /// Address to connect to.
        #[arg(long)]
        connect: SocketAddr,
        /// Number of connects.
        #[arg(long)]
        count: u32,
        /// Stop early after this many seconds.
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
    },
    /// Many non-blocking connects at once, held open.
    Pending {
        /// Address to connect to.
        #[arg(long)]
        connect: SocketAddr,
        /// Number of sockets.
        #[arg(long)]
        count: u32,
        /// How long to hold them before closing.
        #[arg(long)]
        hold_seconds: u64,
    },
    /// Many short sequential connections.
    Churn {
        /// Address to connect to.
        #[arg(long)]
        connect: SocketAddr,
        /// Number of connections.
        #[arg(long)]
        count: u32,
        /// Stop early after this many seconds.
        #[arg(long)]
        max_seconds: Option<u64>,
        /// Time limit per connection, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        /// Only read the greeting and the server's close (see `serve --greeting-only`).
        #[arg(long)]
        greeting_only: bool,
    },
    /// Open many connections, send nothing, report when the peer closes them.
    Idle {
        /// Address to connect to.
        #[arg(long)]
        connect: SocketAddr,
        /// Number of connections.
        #[arg(long)]
        count: u32,
        /// Give up watching after this many seconds (the rest are reported still open).
        #[arg(long, default_value_t = 120)]
        max_seconds: u64,
        /// Time limit per connect, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
        /// At most this many connections connecting or open (not yet closed by the peer) at
        /// once: a new one starts when the peer has closed an earlier one. Keep it under the
        /// peer's listen backlog, or the kernel drops what overflows its accept queue and the
        /// client never learns (its side stays "established").
        #[arg(long, default_value_t = 256)]
        outstanding: usize,
    },
    /// Many connections open at once, each used once, held, then closed.
    Burst {
        /// Address to connect to (an echo server).
        #[arg(long)]
        connect: SocketAddr,
        /// Number of connections.
        #[arg(long)]
        count: u32,
        /// Bytes each connection sends (and reads back) before it is held.
        #[arg(long, default_value_t = 1024)]
        bytes: u64,
        /// Longest hold: they close earlier on a line or EOF on stdin.
        #[arg(long)]
        hold_seconds: u64,
        /// Time limit per connection for opening and for closing, in milliseconds.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Stalled half-closed connections to a listener of this pod that never reads.
    Stall {
        /// The pod's own address and the port to listen on and connect to.
        #[arg(long)]
        addr: SocketAddr,
        /// Number of connections.
        #[arg(long)]
        count: u32,
        /// Most bytes written on each connection.
        #[arg(long, default_value_t = 1 << 20)]
        bytes: u64,
        /// Lower the namespace's TCP buffer maxima to this many bytes first.
        #[arg(long)]
        small_buffers: Option<u32>,
        /// Longest hold: everything closes earlier on a line or EOF on stdin.
        #[arg(long)]
        hold_seconds: u64,
    },
    /// Hold one connection open; echo stdin lines through it.
    Hold {
        /// Address to connect to.
        #[arg(long)]
        connect: SocketAddr,
        /// Time limit for connecting and for each echo, in milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
    /// HTTP server (HTTP/1.1 and HTTP/2 with prior knowledge on one port) that says who
    /// answered: every request gets 200 and the body `<name> <HTTP version seen>\n`.
    Http {
        /// Port to listen on (all addresses).
        #[arg(long)]
        port: u16,
        /// Name in the body and in `x-served-by` (default: $POD_NAME).
        #[arg(long)]
        name: Option<String>,
        /// Resilience test behaviour.
        #[command(flatten)]
        behaviour: http::Behaviour,
    },
    /// gRPC server of tests/proto/greeter.proto.
    GrpcServe {
        /// Port to listen on (all IPv4 addresses).
        #[arg(long)]
        port: u16,
        /// Name in the replies (default: $POD_NAME).
        #[arg(long)]
        name: Option<String>,
    },
    /// gRPC client: unary calls, then one server stream, on one channel.
    GrpcCall {
        /// The server, `http://host:port`.
        #[arg(long)]
        addr: String,
        /// Unary `Say` calls.
        #[arg(long, default_value_t = 1)]
        calls: u32,
        /// Replies of one `Count` stream (0: no stream).
        #[arg(long, default_value_t = 0)]
        stream: u32,
        /// The text sent (`fail`, `abort`: the server answers an error status).
        #[arg(long, default_value = "hello")]
        text: String,
    },
    /// WebSocket echo server.
    WsServe {
        /// Port to listen on (all IPv4 addresses).
        #[arg(long)]
        port: u16,
        /// Name in the replies (default: $POD_NAME).
        #[arg(long)]
        name: Option<String>,
    },
    /// WebSocket client checking echoes.
    WsEcho {
        /// The server, `ws://host:port/path`.
        #[arg(long)]
        url: String,
        /// Messages sent, one at a time.
        #[arg(long, default_value_t = 10)]
        messages: u32,
    },
}

/// How `testpod flood` makes its connects fail.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FloodKind {
    /// An AF_INET6 socket with IPV6_V6ONLY dialling the IPv4-mapped form of an IPv4 ADDR.
    V6onlyMapped,
    /// A socket bound to the source port of a connection to ADDR that is still open.
    AddrInUse,
    /// A plain connect to ADDR (which must fail, e.g. IPv6 with IPv6 disabled).
    Plain,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| format!("{s:?}: {e}"))
}

/// Prints one JSON line (ignoring a closed stdout).
fn emit(v: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ok = match cli.cmd {
        Cmd::Serve {
            ports,
            bind,
            name,
            greeting_only,
            reuse_port,
        } => serve(&ports, bind, name, greeting_only, reuse_port),
        Cmd::Client {
            connect,
            bytes,
            count,
            timeout_ms,
            pattern,
            mark,
            transparent_from,
            rate,
            send_first,
        } => client(
            connect,
            count,
            &Sending {
                bytes,
                timeout: Duration::from_millis(timeout_ms),
                pattern: pattern.map(String::into_bytes),
                mark,
                transparent_from,
                rate,
                first: send_first,
            },
        ),
        Cmd::Flood {
            kind,
            connect,
            count,
            max_seconds,
        } => flood(kind, connect, count, Duration::from_secs(max_seconds)),
        Cmd::Pending {
            connect,
            count,
            hold_seconds,
        } => pending(connect, count, Duration::from_secs(hold_seconds)),
        Cmd::Churn {
            connect,
            count,
            max_seconds,
            timeout_ms,
            greeting_only,
        } => churn(
            connect,
            count,
            max_seconds.map(Duration::from_secs),
            Duration::from_millis(timeout_ms),
            greeting_only,
        ),
        Cmd::Burst {
            connect,
            count,
            bytes,
            hold_seconds,
            timeout_ms,
        } => burst(
            connect,
            count,
            bytes,
            Duration::from_secs(hold_seconds),
            Duration::from_millis(timeout_ms),
        ),
        Cmd::Stall {
            addr,
            count,
            bytes,
            small_buffers,
            hold_seconds,
        } => stall(
            addr,
            count,
            bytes,
            small_buffers,
            Duration::from_secs(hold_seconds),
        ),
        Cmd::Hold {
            connect,
            timeout_ms,
        } => hold(connect, Duration::from_millis(timeout_ms)),
        Cmd::Http {
            port,
            name,
            behaviour,
        } => http::serve(
            port,
            name.or_else(|| std::env::var("POD_NAME").ok())
                .unwrap_or_else(|| "unknown".into()),
            behaviour,
        ),
        Cmd::GrpcServe { port, name } => grpc::serve(
            port,
            name.or_else(|| std::env::var("POD_NAME").ok())
                .unwrap_or_else(|| "unknown".into()),
        ),
        Cmd::GrpcCall {
            addr,
            calls,
            stream,
            text,
        } => grpc::call(addr, calls, stream, text),
        Cmd::WsServe { port, name } => ws::serve(
            port,
            name.or_else(|| std::env::var("POD_NAME").ok())
                .unwrap_or_else(|| "unknown".into()),
        ),
        Cmd::WsEcho { url, messages } => ws::echo(url, messages),
        Cmd::Idle {
            connect,
            count,
            max_seconds,
            timeout_ms,
            outstanding,
        } => idle(
            connect,
            count,
            Duration::from_secs(max_seconds),
            Duration::from_millis(timeout_ms),
            outstanding,
        ),
    };
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

// ---------------------------------------------------------------------------------------------
// serve

fn listen(addr: SocketAddr, v6only: bool, reuse_port: bool) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(v6only)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

fn serve(
    ports: &[u16],
    bind: Option<IpAddr>,
    name: Option<String>,
    greeting_only: bool,
    reuse_port: bool,
) -> bool {
    let name = name
        .or_else(|| std::env::var("POD_NAME").ok())
        .unwrap_or_else(|| "unknown".into());
    let mut listeners = Vec::new();
    for &port in ports {
        let addrs: Vec<(SocketAddr, bool)> = match bind {
            Some(ip) => vec![(SocketAddr::new(ip, port), false)],
            None => vec![
                (
                    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
                    false,
                ),
                (
                    SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
                    true,
                ),
            ],
        };
        for (addr, v6only) in addrs {
            match listen(addr, v6only, reuse_port) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    emit(json!({"event": "error", "error": format!("listen {addr}: {e}")}));
                    return false;
                }
            }
        }
    }
    let addrs: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect();
    emit(json!({"event": "listening", "name": name, "addrs": addrs}));
    let handles: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            let name = name.clone();
            std::thread::spawn(move || accept_loop(l, name, greeting_only))
        })
        .collect();
    for h in handles {
        let _ = h.join();
    }
    true
}

fn accept_loop(l: TcpListener, name: String, greeting_only: bool) {
    loop {
        match l.accept() {
            Ok((mut s, peer)) if greeting_only => {
                let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                let _ = s.write_all(format!("HELLO {name} {peer} {local}\n").as_bytes());
            }
            Ok((s, peer)) => {
                let name = name.clone();
                std::thread::spawn(move || handle_conn(s, peer, &name));
            }
            Err(e) => {
                emit(json!({"event": "error", "error": format!("accept: {e}")}));
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

fn handle_conn(mut s: TcpStream, peer: SocketAddr, name: &str) {
    let local = s
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|e| format!("?({e})"));
    emit(json!({"event": "accepted", "peer": peer.to_string(), "local": local}));
    let r = (|| -> io::Result<u64> {
        s.write_all(format!("HELLO {name} {peer} {local}\n").as_bytes())?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0u64;
        loop {
            let n = match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            s.write_all(&buf[..n])?;
            total += n as u64;
        }
        s.shutdown(Shutdown::Write)?;
        Ok(total)
    })();
    match r {
        Ok(bytes) => emit(json!({"event": "closed", "peer": peer.to_string(), "bytes": bytes})),
        Err(e) => emit(json!({
            "event": "closed",
            "peer": peer.to_string(),
            "error": e.to_string(),
        })),
    }
}

// ---------------------------------------------------------------------------------------------
// client

/// Deterministic byte stream (xorshift64*), seeded by the connection index.
struct Prng {
    state: u64,
    word: [u8; 8],
    pos: usize,
}

impl Prng {
    fn new(index: u32) -> Self {
        Self {
            state: (u64::from(index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            pos: 8,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.pos == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
                self.pos = 0;
            }
            *b = self.word[self.pos];
            self.pos += 1;
        }
    }
}

/// What a client connection sends: the pseudo-random stream, or a pattern repeated.
enum Payload {
    Prng(Prng),
    Pattern { pattern: Vec<u8>, pos: usize },
}

impl Payload {
    fn new(index: u32, pattern: Option<&[u8]>) -> Self {
        match pattern {
            Some(p) if !p.is_empty() => Self::Pattern {
                pattern: p.to_vec(),
                pos: 0,
            },
            _ => Self::Prng(Prng::new(index)),
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        match self {
            Self::Prng(prng) => prng.fill(buf),
            Self::Pattern { pattern, pos } => {
                for b in buf {
                    *b = pattern[*pos];
                    *pos = (*pos + 1) % pattern.len();
                }
            }
        }
    }
}

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    if d.is_zero() {
        Err(io::Error::new(io::ErrorKind::TimedOut, "deadline exceeded"))
    } else {
        Ok(d)
    }
}

/// Reads one `\n`-terminated line (without the newline) before `deadline`.
fn read_line_until(r: &mut BufReader<TcpStream>, deadline: Instant) -> io::Result<String> {
    r.get_ref().set_read_timeout(Some(remaining(deadline)?))?;
    let mut line = String::new();
    let n = r.read_line(&mut line)?;
    if n == 0 || !line.ends_with('\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("connection closed before a full line (got {line:?})"),
        ));
    }
    line.pop();
    if line.ends_with('\r') {
        line.pop();
    }
    Ok(line)
}

/// What each `testpod client` connection sends, and how.
struct Sending {
    bytes: u64,
    timeout: Duration,
    pattern: Option<Vec<u8>>,
    mark: Option<u32>,
    transparent_from: Option<IpAddr>,
    rate: Option<u64>,
    /// Before the greeting arrives.
    first: bool,
}

fn client(addr: SocketAddr, count: u32, sending: &Sending) -> bool {
    let mut all_ok = true;
    for i in 0..count {
        let v = client_conn(addr, i, sending);
        all_ok &= v["ok"] == true;
        emit(v);
    }
    all_ok
}

fn client_conn(addr: SocketAddr, index: u32, sending: &Sending) -> Value {
    let Sending {
        bytes,
        timeout,
        ref pattern,
        mark,
        transparent_from,
        rate,
        first,
    } = *sending;
    let pattern = pattern.as_deref();
    let start = Instant::now();
    let deadline = start + timeout;
    let mut out = json!({
        "conn": index, "ok": false, "peer": null, "local": null, "greeting": null,
        "sent": 0, "received": 0, "error": null,
    });
    let r = (|| -> Result<(), String> {
        let s = connect_marked(addr, timeout, mark, transparent_from)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        out["peer"] = json!(s.peer_addr().map(|a| a.to_string()).ok());
        out["local"] = json!(s.local_addr().map(|a| a.to_string()).ok());
        out["kernel_peer"] = json!(kernel_peer(&s).map(|a| a.to_string()));
        let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
        let mut w = s.try_clone().map_err(|e| e.to_string())?;
        let mut prng = Payload::new(index, pattern);
        // The writer starts at once with `--send-first`, else once the greeting is in.
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || -> Result<u64, String> {
            if !first && wait.recv().is_err() {
                // Never told to start: the greeting did not come.
                return Ok(0);
            }
            let mut buf = vec![0u8; 16 * 1024];
            let mut sent = 0u64;
            let paced_from = Instant::now();
            let r = (|| -> io::Result<()> {
                while sent < bytes {
                    let n = (bytes - sent).min(buf.len() as u64) as usize;
                    prng.fill(&mut buf[..n]);
                    w.set_write_timeout(Some(remaining(deadline)?))?;
                    w.write_all(&buf[..n])?;
                    sent += n as u64;
                    if let Some(rate) = rate.filter(|&r| r > 0) {
                        let due = paced_from + Duration::from_secs_f64(sent as f64 / rate as f64);
                        std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    }
                }
                Ok(())
            })();
            // Shut down even after an error so the peer sees EOF and the reader finishes.
            let _ = w.shutdown(Shutdown::Write);
            r.map(|()| sent)
                .map_err(|e| format!("send after {sent} bytes: {e}"))
        });
        let greeting =
            read_line_until(&mut reader, deadline).map_err(|e| format!("read greeting: {e}"))?;
        out["greeting"] = json!(greeting);
        let _ = go.send(());
        let mut prng = Payload::new(index, pattern);
        let mut buf = vec![0u8; 64 * 1024];
        let mut expect = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        let mut mismatch: Option<u64> = None;
        let read_result = (|| -> io::Result<()> {
            loop {
                reader
                    .get_ref()
                    .set_read_timeout(Some(remaining(deadline)?))?;
                let n = match reader.read(&mut buf) {
                    Ok(0) => return Ok(()),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                if mismatch.is_none() {
                    prng.fill(&mut expect[..n]);
                    if let Some(p) = (0..n).find(|&k| buf[k] != expect[k]) {
                        mismatch = Some(received + p as u64);
                    }
                }
                received += n as u64;
            }
        })();
        out["received"] = json!(received);
        let sent = writer
            .join()
            .map_err(|_| "writer thread panicked".to_string())?;
        if let Ok(n) = &sent {
            out["sent"] = json!(n);
        }
        let sent = sent?;
        read_result.map_err(|e| format!("receive after {received} bytes: {e}"))?;
        if let Some(p) = mismatch {
            return Err(format!("echoed bytes differ from sent at offset {p}"));
        }
        if received != sent {
            return Err(format!("sent {sent} bytes but received {received}"));
        }
        Ok(())
    })();
    match r {
        Ok(()) => out["ok"] = json!(true),
        Err(e) => out["error"] = json!(e),
    }
    out["elapsed_ms"] = json!(start.elapsed().as_millis() as u64);
    out
}

/// The remote address of `s` as the kernel's socket table (`/proc/self/net/tcp{,6}`) lists
/// it, found by the socket's inode: where the connection really goes, whatever a
/// `getpeername` hook makes the application see (for a redirected socket, the agent's
/// `127.0.0.1:15001`).
fn kernel_peer(s: &TcpStream) -> Option<SocketAddr> {
    use std::os::{fd::AsFd, unix::fs::MetadataExt};
    let inode = std::fs::File::from(s.as_fd().try_clone_to_owned().ok()?)
        .metadata()
        .ok()?
        .ino()
        .to_string();
    for table in ["/proc/self/net/tcp", "/proc/self/net/tcp6"] {
        let text = std::fs::read_to_string(table).ok()?;
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) != Some(&inode.as_str()) {
                continue;
            }
            let (addr, port) = fields.get(2)?.split_once(':')?;
            let port = u16::from_str_radix(port, 16).ok()?;
            // Each 32-bit word is printed in host byte order.
            let words: Vec<u32> = (0..addr.len() / 8)
                .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).map(u32::from_be))
                .collect::<Result<_, _>>()
                .ok()?;
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let ip = match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
                16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
                _ => return None,
            };
            return Some(SocketAddr::new(ip, port));
        }
    }
    None
}

/// A blocking connect with a timeout, the socket marked and bound transparently to
/// `transparent_from` first if asked.
fn connect_marked(
    addr: SocketAddr,
    timeout: Duration,
    mark: Option<u32>,
    transparent_from: Option<IpAddr>,
) -> io::Result<TcpStream> {
    if mark.is_none() && transparent_from.is_none() {
        return TcpStream::connect_timeout(&addr, timeout);
    }
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if let Some(mark) = mark {
        s.set_mark(mark)?;
    }
    if let Some(from) = transparent_from {
        if addr.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.bind(&SocketAddr::new(from, 0).into())?;
    }
    s.connect_timeout(&addr.into(), timeout)?;
    Ok(s.into())
}

// ---------------------------------------------------------------------------------------------
// flood and pending

fn flood(kind: FloodKind, addr: SocketAddr, count: u32, max: Duration) -> bool {
    let start = Instant::now();
    // addr-in-use: one connection holds the 4-tuple that every later connect asks for again.
    let holder = match kind {
        FloodKind::AddrInUse => {
            let r = (|| -> io::Result<Socket> {
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                s.set_reuse_address(true)?;
                s.connect_timeout(&addr.into(), Duration::from_secs(5))?;
                Ok(s)
            })();
            match r {
                Ok(s) => Some(s),
                Err(e) => {
                    emit(json!({"error": format!("holding connection to {addr}: {e}")}));
                    return false;
                }
            }
        }
        _ => None,
    };
    // The held connection's own address: binding it again (SO_REUSEADDR) and dialling the
    // same destination takes its 4-tuple.
    let held = holder
        .as_ref()
        .and_then(|s| s.local_addr().ok()?.as_socket());
    let mut errors: std::collections::BTreeMap<String, u64> = Default::default();
    let (mut attempted, mut connected) = (0u64, 0u64);
    for _ in 0..count {
        if start.elapsed() >= max {
            break;
        }
        attempted += 1;
        let r = (|| -> io::Result<()> {
            match kind {
                FloodKind::V6onlyMapped => {
                    let IpAddr::V4(v4) = addr.ip() else {
                        return Err(io::Error::other("v6only-mapped needs an IPv4 address"));
                    };
                    let s = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
                    s.set_only_v6(true)?;
                    let mapped = SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port());
                    s.connect(&mapped.into())
                }
                FloodKind::AddrInUse => {
                    let s =
                        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                    s.set_reuse_address(true)?;
                    let any: SocketAddr = if addr.is_ipv4() {
                        (Ipv4Addr::UNSPECIFIED, 0).into()
                    } else {
                        (Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    s.bind(&held.unwrap_or(any).into())?;
                    s.connect(&addr.into())
                }
                FloodKind::Plain => {
                    let s =
                        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                    s.connect(&addr.into())
                }
            }
        })();
        match r {
            Ok(()) => connected += 1,
            Err(e) => {
                let key = e
                    .raw_os_error()
                    .map(|n| format!("os error {n}"))
                    .unwrap_or_else(|| e.to_string());
                *errors.entry(key).or_default() += 1;
            }
        }
    }
    drop(holder);
    emit(json!({
        "attempted": attempted,
        "connected": connected,
        "errors": errors,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    connected == 0
}

fn pending(addr: SocketAddr, count: u32, hold: Duration) -> bool {
    let mut sockets = Vec::new();
    let mut open_errors: std::collections::BTreeMap<String, u64> = Default::default();
    for _ in 0..count {
        let r = (|| -> io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_nonblocking(true)?;
            match s.connect(&addr.into()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
                Err(e) => return Err(e),
            }
            Ok(s)
        })();
        match r {
            Ok(s) => sockets.push(s),
            Err(e) => *open_errors.entry(e.to_string()).or_default() += 1,
        }
    }
    emit(json!({"event": "opened", "sockets": sockets.len(), "errors": open_errors}));
    std::thread::sleep(hold);
    // How far each got: connected (the handshake with the agent completed), or still pending.
    let connected = sockets.iter().filter(|s| s.peer_addr().is_ok()).count();
    drop(sockets);
    emit(json!({"event": "closed", "connected": connected}));
    true
}

// ---------------------------------------------------------------------------------------------
// churn

fn churn_one(addr: SocketAddr, timeout: Duration, greeting_only: bool) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let mut s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    read_line_until(&mut reader, deadline).map_err(|e| format!("read greeting: {e}"))?;
    if greeting_only {
        let mut rest = Vec::new();
        reader
            .read_to_end(&mut rest)
            .map_err(|e| format!("receive the close: {e}"))?;
        return if rest.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected bytes after the greeting: {rest:?}"))
        };
    }
    s.set_write_timeout(Some(remaining(deadline).map_err(|e| e.to_string())?))
        .map_err(|e| e.to_string())?;
    s.write_all(b"x").map_err(|e| format!("send: {e}"))?;
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    reader
        .get_ref()
        .set_read_timeout(Some(remaining(deadline).map_err(|e| e.to_string())?))
        .map_err(|e| e.to_string())?;
    reader
        .read_to_end(&mut rest)
        .map_err(|e| format!("receive: {e}"))?;
    if rest != b"x" {
        return Err(format!(
            "expected echo \"x\", got {:?}",
            String::from_utf8_lossy(&rest)
        ));
    }
    Ok(())
}

fn churn(
    addr: SocketAddr,
    count: u32,
    max: Option<Duration>,
    timeout: Duration,
    greeting_only: bool,
) -> bool {
    let start = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut first_error: Option<String> = None;
    for _ in 0..count {
        if max.is_some_and(|m| start.elapsed() >= m) {
            break;
        }
        match churn_one(addr, timeout, greeting_only) {
            Ok(()) => ok += 1,
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    emit(json!({
        "ok": ok,
        "failed": failed,
        "first_error": first_error,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    failed == 0
}

// ---------------------------------------------------------------------------------------------
// burst

/// Opens one burst connection: reads the greeting, then sends `bytes` in chunks small enough
/// for the echo never to block on a full socket buffer, checking each chunk's echo.
fn burst_open(
    addr: SocketAddr,
    index: u32,
    bytes: u64,
    timeout: Duration,
) -> Result<TcpStream, String> {
    let deadline = Instant::now() + timeout;
    let s =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    read_line_until(&mut reader, deadline).map_err(|e| format!("read greeting: {e}"))?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let (mut out, mut expect) = (Payload::new(index, None), Payload::new(index, None));
    let (mut chunk, mut want, mut got) = (vec![0u8; 8192], vec![0u8; 8192], vec![0u8; 8192]);
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk.len() as u64) as usize;
        out.fill(&mut chunk[..n]);
        expect.fill(&mut want[..n]);
        let r = (|| -> io::Result<()> {
            w.set_write_timeout(Some(remaining(deadline)?))?;
            w.write_all(&chunk[..n])?;
            reader
                .get_ref()
                .set_read_timeout(Some(remaining(deadline)?))?;
            reader.read_exact(&mut got[..n])
        })();
        r.map_err(|e| format!("echo after {sent} bytes: {e}"))?;
        if got[..n] != want[..n] {
            return Err(format!("echoed bytes differ from sent after {sent} bytes"));
        }
        sent += n as u64;
    }
    Ok(s)
}

/// Half-closes a held burst connection and reads it to the end: the echo server's close.
fn burst_close(mut s: TcpStream, timeout: Duration) -> Result<(), String> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("receive the close: {e}"))?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(format!("{} unexpected bytes before the close", rest.len()))
    }
}

fn burst(addr: SocketAddr, count: u32, bytes: u64, hold: Duration, timeout: Duration) -> bool {
    let start = Instant::now();
    let mut first_error: Option<String> = None;
    let mut open = Vec::with_capacity(count as usize);
    for i in 0..count {
        match burst_open(addr, i, bytes, timeout) {
            Ok(s) => open.push(s),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let failed = u64::from(count) - open.len() as u64;
    emit(json!({
        "event": "opened",
        "open": open.len(),
        "failed": failed,
        "first_error": first_error,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    // Held until told (a line or EOF on stdin) or until the hold ends, whichever comes first.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = io::stdin().lock().read_line(&mut String::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(hold);
    let held_ms = start.elapsed().as_millis() as u64;
    let (mut clean, mut close_error) = (0u64, None);
    for s in open {
        match burst_close(s, timeout) {
            Ok(()) => clean += 1,
            Err(e) => {
                close_error.get_or_insert(e);
            }
        }
    }
    emit(json!({
        "event": "closed",
        "clean": clean,
        "failed": failed,
        "first_error": first_error.or(close_error),
        "held_ms": held_ms,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    failed == 0 && clean == u64::from(count)
}

// ---------------------------------------------------------------------------------------------
// stall

/// Writes `s` (non-blocking) until the kernel takes no more or `left` bytes went; returns the
/// bytes written.
fn stall_fill(s: &mut TcpStream, left: u64) -> io::Result<u64> {
    let chunk = [0x5au8; 16 * 1024];
    let mut written = 0u64;
    while written < left {
        let n = (left - written).min(chunk.len() as u64) as usize;
        match s.write(&chunk[..n]) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

fn stall(
    addr: SocketAddr,
    count: u32,
    bytes: u64,
    small_buffers: Option<u32>,
    hold: Duration,
) -> bool {
    let start = Instant::now();
    if let Some(max) = small_buffers {
        for (sysctl, value) in [
            ("tcp_rmem", format!("4096 {} {max}", max.min(16384))),
            ("tcp_wmem", format!("4096 {} {max}", max.min(16384))),
        ] {
            let path = format!("/proc/sys/net/ipv4/{sysctl}");
            if let Err(e) = std::fs::write(&path, &value) {
                emit(json!({"error": format!("writing {path}: {e}")}));
                return false;
            }
        }
    }
    let listener = (|| -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        // Inherited by the accepted sockets: they take little before the window closes.
        socket.set_recv_buffer_size(4096)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    })();
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            emit(json!({"error": format!("listen on {addr}: {e}")}));
            return false;
        }
    };
    // Accepted and held, never read.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let mut open = Vec::with_capacity(count as usize);
    let mut first_error: Option<String> = None;
    let mut written = 0u64;
    for _ in 0..count {
        let opened = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        });
        match opened {
            Ok(mut s) => match stall_fill(&mut s, bytes) {
                Ok(n) => {
                    written += n;
                    open.push((s, n));
                }
                Err(e) => {
                    first_error.get_or_insert(format!("write: {e}"));
                }
            },
            Err(e) => {
                first_error.get_or_insert(format!("connect {addr}: {e}"));
            }
        }
    }
    // The path behind each socket takes more once the first bytes moved on; fill it again,
    // then half-close.
    std::thread::sleep(Duration::from_millis(500));
    for (s, n) in &mut open {
        match stall_fill(s, bytes - *n) {
            Ok(more) => written += more,
            Err(e) => {
                first_error.get_or_insert(format!("write: {e}"));
            }
        }
        if let Err(e) = s.shutdown(Shutdown::Write) {
            first_error.get_or_insert(format!("shutdown: {e}"));
        }
    }
    let failed = u64::from(count) - open.len() as u64;
    emit(json!({
        "event": "stalled",
        "open": open.len(),
        "failed": failed,
        "bytes": written,
        "first_error": first_error,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = io::stdin().lock().read_line(&mut String::new());
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(hold);
    drop(open);
    emit(json!({"event": "closed", "elapsed_ms": start.elapsed().as_millis() as u64}));
    failed == 0
}

// ---------------------------------------------------------------------------------------------
// hold

fn hold(addr: SocketAddr, timeout: Duration) -> bool {
    let s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => {
            emit(json!({"error": format!("connect {addr}: {e}")}));
            return false;
        }
    };
    let mut reader = match s.try_clone() {
        Ok(c) => BufReader::new(c),
        Err(e) => {
            emit(json!({"error": e.to_string()}));
            return false;
        }
    };
    let greeting = match read_line_until(&mut reader, Instant::now() + timeout) {
        Ok(g) => g,
        Err(e) => {
            emit(json!({"error": format!("read greeting: {e}")}));
            return false;
        }
    };
    emit(json!({
        "event": "connected",
        "greeting": greeting,
        "peer": s.peer_addr().map(|a| a.to_string()).ok(),
        "local": s.local_addr().map(|a| a.to_string()).ok(),
    }));
    let mut w = s;
    let mut all_ok = true;
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let r = (|| -> io::Result<String> {
            w.set_write_timeout(Some(timeout))?;
            w.write_all(format!("{line}\n").as_bytes())?;
            read_line_until(&mut reader, Instant::now() + timeout)
        })();
        match r {
            Ok(echo) => emit(json!({"echo": echo})),
            Err(e) => {
                all_ok = false;
                emit(json!({"error": e.to_string()}));
            }
        }
    }
    let _ = w.shutdown(Shutdown::Write);
    emit(json!({"event": "closed"}));
    all_ok
}

// ---------------------------------------------------------------------------------------------
// idle

/// How the peer ended an idle connection, if it did: reads what is pending without blocking.
enum PeerEnd {
    Open,
    Eof,
    Reset,
}

fn peer_end(s: &mut TcpStream) -> PeerEnd {
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return PeerEnd::Eof,
            // The peer spoke (nothing here expects it to): keep watching.
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return PeerEnd::Open,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return PeerEnd::Reset,
        }
    }
}

/// Connects in flight at once: enough to keep the peer's accept queue busy, under the usual
/// listen backlog so a burst does not overflow it by itself.
const IDLE_WINDOW: usize = 128;

/// What an idle client knows so far.
#[derive(Default)]
struct IdleCounts {
    opened: u64,
    failed: u64,
    first_error: Option<String>,
    eof: u64,
    reset: u64,
    /// Closed by the peer, by whole seconds after their connect completed.
    after_s: std::collections::BTreeMap<u64, u64>,
}

impl IdleCounts {
    fn fail(&mut self, error: String) {
        self.failed += 1;
        self.first_error.get_or_insert(error);
    }

    fn closed(&mut self, end: PeerEnd, since: Instant) {
        match end {
            PeerEnd::Open => return,
            PeerEnd::Eof => self.eof += 1,
            PeerEnd::Reset => self.reset += 1,
        }
        *self.after_s.entry(since.elapsed().as_secs()).or_default() += 1;
    }
}

fn idle(
    addr: SocketAddr,
    count: u32,
    max: Duration,
    timeout: Duration,
    outstanding: usize,
) -> bool {
    let start = Instant::now();
    let mut c = IdleCounts::default();
    // Connects in progress (since when), and connections established (since when).
    let mut pending: Vec<(Socket, Instant)> = Vec::new();
    let mut open: Vec<(TcpStream, Instant)> = Vec::with_capacity(count as usize);
    let mut started = 0u32;
    let mut watch_until: Option<Instant> = None;
    let mut last_progress = Instant::now();
    loop {
        while pending.len() < IDLE_WINDOW
            && pending.len() + open.len() < outstanding
            && started < count
        {
            started += 1;
            let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
                .and_then(|s| s.set_nonblocking(true).map(|()| s));
            let socket = match socket {
                Ok(s) => s,
                Err(e) => {
                    c.fail(format!("socket: {e}"));
                    continue;
                }
            };
            match socket.connect(&addr.into()) {
                Ok(()) => {
                    c.opened += 1;
                    open.push((socket.into(), Instant::now()));
                }
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                    pending.push((socket, Instant::now()));
                }
                Err(e) => c.fail(format!("connect {addr}: {e}")),
            }
        }
        if started == count && pending.is_empty() && watch_until.is_none() {
            emit(json!({
                "event": "opened", "opened": c.opened, "failed": c.failed,
                "first_error": c.first_error, "elapsed_ms": start.elapsed().as_millis() as u64,
            }));
            watch_until = Some(Instant::now() + max);
        }
        if watch_until.is_some_and(|until| open.is_empty() || Instant::now() >= until) {
            break;
        }
        let ready: Vec<bool> = {
            use std::os::fd::AsFd as _;
            let mut fds: Vec<PollFd> = pending
                .iter()
                .map(|(s, _)| PollFd::new(s.as_fd(), PollFlags::POLLOUT))
                .chain(open.iter().map(|(s, _)| {
                    // nix has no name for POLLRDHUP (the peer shut down its side).
                    let rdhup = PollFlags::from_bits_retain(libc::POLLRDHUP);
                    PollFd::new(s.as_fd(), PollFlags::POLLIN | rdhup)
                }))
                .collect();
            // Errors (EINTR) only mean nothing is ready this round.
            let _ = poll(&mut fds, PollTimeout::from(100u16));
            // `None`: the kernel set a flag nix has no name for (POLLRDHUP), an event too.
            fds.iter().map(|fd| fd.any().unwrap_or(true)).collect()
        };
        let (pending_ready, open_ready) = ready.split_at(pending.len());
        // Established connections first, from the end, so `swap_remove` keeps the indices
        // still to visit valid.
        for i in (0..open.len()).rev() {
            if open_ready[i] {
                let end = peer_end(&mut open[i].0);
                if !matches!(end, PeerEnd::Open) {
                    let (_, since) = open.swap_remove(i);
                    c.closed(end, since);
                }
            }
        }
        for i in (0..pending.len()).rev() {
            let done = pending_ready[i];
            if !done && pending[i].1.elapsed() < timeout {
                continue;
            }
            let (socket, since) = pending.swap_remove(i);
            if !done {
                c.fail(format!("connect {addr}: timed out"));
                continue;
            }
            match socket.take_error() {
                Ok(None) => {
                    c.opened += 1;
                    open.push((socket.into(), Instant::now()));
                }
                // Established, then reset before we looked (a reset answering the SYN would
                // be "refused"): opened, and closed by the peer at once.
                Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionReset => {
                    c.opened += 1;
                    c.closed(PeerEnd::Reset, since);
                }
                Ok(Some(e)) | Err(e) => c.fail(format!("connect {addr}: {e}")),
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            emit(json!({
                "event": "progress", "connecting": pending.len(), "open": open.len(),
                "closed_eof": c.eof, "closed_reset": c.reset,
                "elapsed_ms": start.elapsed().as_millis() as u64,
            }));
        }
    }
    let after: serde_json::Map<String, Value> = c
        .after_s
        .iter()
        .map(|(s, n)| (s.to_string(), json!(n)))
        .collect();
    emit(json!({
        "event": "done", "opened": c.opened, "failed": c.failed, "first_error": c.first_error,
        "closed_eof": c.eof, "closed_reset": c.reset, "still_open": open.len(),
        "closed_after_s": after, "elapsed_ms": start.elapsed().as_millis() as u64,
    }));
    true
}

#[cfg(test)]
mod tests {
    use super::{Payload, Prng};

    #[test]
    fn prng_is_chunking_independent() {
        let mut a = Prng::new(3);
        let mut whole = vec![0u8; 100];
        a.fill(&mut whole);
        let mut b = Prng::new(3);
        let mut parts = vec![0u8; 100];
        b.fill(&mut parts[..7]);
        b.fill(&mut parts[7..50]);
        b.fill(&mut parts[50..]);
        assert_eq!(whole, parts);
        let mut c = Prng::new(4);
        let mut other = vec![0u8; 100];
        c.fill(&mut other);
        assert_ne!(whole, other);
    }

    #[test]
    fn pattern_payload_repeats_across_chunks() {
        let mut p = Payload::new(0, Some(b"abc"));
        let mut buf = vec![0u8; 4];
        p.fill(&mut buf);
        assert_eq!(buf, b"abca");
        p.fill(&mut buf[..3]);
        assert_eq!(&buf[..3], b"bca");
        // Without a pattern, the pseudo-random stream.
        let mut a = Payload::new(3, None);
        let mut b = Prng::new(3);
        let (mut x, mut y) = (vec![0u8; 32], vec![0u8; 32]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
    }
}

/// `testpod http`: hyper's auto server (the same builder the waypoint uses for its clients).
mod http {
    use std::{
        collections::HashMap,
        convert::Infallible,
        sync::{
            Arc, Mutex,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{Request, Response, StatusCode, body::Incoming};
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use serde_json::json;

    /// How the server misbehaves, for resilience tests.
    #[derive(Clone, Copy, Debug, Default, clap::Args)]
    pub struct Behaviour {
        /// Wait this long (ms) before each answer.
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Print each request (method, path, host, attempt, headers) as a JSON line.
        #[arg(long)]
        log_requests: bool,
        /// Never answer (a black hole that accepts).
        #[arg(long)]
        hang: bool,
        /// Answer every request with this status (a broken endpoint); 0: no.
        #[arg(long, default_value_t = 0)]
        fail_status: u16,
    }

    /// Requests in flight now and at most, for connection pool tests.
    #[derive(Default)]
    struct Concurrency {
        now: AtomicU64,
        max: AtomicU64,
    }

    /// Decrements the requests in flight when the answer is made.
    struct InFlight(Arc<Concurrency>);

    impl Drop for InFlight {
        fn drop(&mut self) {
            self.0.now.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Requests seen per path, for `x-fail-first` (cleared when it grows past 100,000 paths).
    type Seen = Arc<Mutex<HashMap<String, u64>>>;

    fn header_number(req: &Request<Incoming>, name: &str) -> u64 {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    async fn answer(
        req: Request<Incoming>,
        name: String,
        behaviour: Behaviour,
        seen: Seen,
        conn: (u64, Arc<Concurrency>),
    ) -> Response<Full<Bytes>> {
        let (connection, concurrency) = conn;
        let in_flight = concurrency.now.fetch_add(1, Ordering::SeqCst) + 1;
        concurrency.max.fetch_max(in_flight, Ordering::SeqCst);
        let _in_flight = InFlight(concurrency.clone());
        let path = req.uri().path().to_string();
        let version = req.version();
        if behaviour.log_requests {
            let host = req
                .headers()
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| req.uri().authority().map(|a| a.to_string()));
            let attempt = req
                .headers()
                .get("x-envoy-attempt-count")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let mut headers = serde_json::Map::new();
            for name in req.headers().keys() {
                let values: Vec<&str> = req
                    .headers()
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap_or("<binary>"))
                    .collect();
                headers.insert(name.to_string(), json!(values.join(", ")));
            }
            super::emit(json!({
                "event": "request",
                "method": req.method().as_str(),
                "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
                "host": host,
                "attempt": attempt,
                "headers": headers,
                "connection": connection,
                "in_flight": in_flight,
                "max_in_flight": concurrency.max.load(Ordering::SeqCst),
            }));
        }
        if behaviour.hang {
            std::future::pending::<()>().await;
        }
        let delay = header_number(&req, "x-delay-ms")
            .min(60_000)
            .max(behaviour.delay_ms);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let fail_first = header_number(&req, "x-fail-first");
        let body = http_body_util::Limited::new(req.into_body(), 1 << 20);
        let received = match http_body_util::BodyExt::collect(body).await {
            Ok(body) => body.to_bytes().len(),
            Err(_) => usize::MAX,
        };
        let failing = fail_first > 0 && {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.len() > 100_000 {
                seen.clear();
            }
            let count = seen.entry(path).or_default();
            *count += 1;
            *count <= fail_first
        };
        let seen_body = match received {
            0 => String::new(),
            usize::MAX => " body=error".to_string(),
            n => format!(" body={n}"),
        };
        let (status, body) = if behaviour.fail_status != 0 {
            (
                StatusCode::from_u16(behaviour.fail_status)
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                format!("{name} broken\n"),
            )
        } else if failing {
            (StatusCode::SERVICE_UNAVAILABLE, format!("{name} failing\n"))
        } else {
            (StatusCode::OK, format!("{name} {version:?}{seen_body}\n"))
        };
        Response::builder()
            .status(status)
            .header("x-served-by", name.as_str())
            .body(Full::new(Bytes::from(body)))
            .expect("static response")
    }

    pub fn serve(port: u16, name: String, behaviour: Behaviour) -> bool {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                super::emit(json!({"event": "error", "error": e.to_string()}));
                return false;
            }
        };
        runtime.block_on(async move {
            let listener = match tokio::net::TcpListener::bind(("0.0.0.0", port)).await {
                Ok(l) => l,
                Err(e) => {
                    super::emit(json!({"event": "error", "error": e.to_string()}));
                    return false;
                }
            };
            super::emit(json!({"event": "listening", "port": port, "name": name}));
            let seen = Seen::default();
            let concurrency = Arc::new(Concurrency::default());
            let mut connections = 0u64;
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                connections += 1;
                let connection = connections;
                let name = name.clone();
                let seen = seen.clone();
                let concurrency = concurrency.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let conn = (connection, concurrency.clone());
                        let response = answer(req, name.clone(), behaviour, seen.clone(), conn);
                        async move { Ok::<_, Infallible>(response.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        })
    }
}
