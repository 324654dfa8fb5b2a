//! End-to-end HBONE tests: real TLS and real HTTP/2 over 127.0.0.1, against the servers of
//! `crate::testing::hbone`.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{HeaderValue, StatusCode};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};

use super::{
    headers::{Baggage, ForwardedFor},
    tls::{self, PeerIdentityError},
    *,
};
use crate::{
    identity::{SpiffeId, WorkloadCertificate},
    limits::{Limit, LimitSettings, Limits, Path, Phase},
    testing::{
        ca::TestCa,
        hbone::{
            Failure, LOCALHOST, Server, TD, generous_limits, recv, start_limited, start_server,
            start_server_with, start_upstream,
        },
    },
};

const MIB: usize = 1024 * 1024;

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new(TD, "shop", sa)
}

/// Deterministic, position-dependent bytes so a reordering or a lost chunk shows.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

fn test_pool(config: PoolConfig) -> Pool {
    Pool::new(
        |key: &PoolKey| {
            let destination = key.destination();
            async move { TcpStream::connect(destination).await }
        },
        config,
    )
}

fn key_for(client: &WorkloadCertificate, server: &Server, allowed: Vec<SpiffeId>) -> PoolKey {
    PoolKey::new(client.id.clone(), LOCALHOST, server.addr, allowed)
}

fn app_source() -> SocketAddr {
    SocketAddr::new(LOCALHOST, 40_000)
}

/// Writes `payload` then half-closes, while reading the answer to EOF.
async fn exchange(stream: HboneStream, payload: &[u8]) -> Vec<u8> {
    let (mut read, mut write) = tokio::io::split(stream);
    let writer = async {
        write.write_all(payload).await.unwrap();
        write.shutdown().await.unwrap();
    };
    let reader = async {
        let mut got = Vec::new();
        read.read_to_end(&mut got).await.unwrap();
        got
    };
    tokio::join!(writer, reader).1
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test]
async fn connect_round_trips_bytes_with_half_close() {
    // Leaves from an intermediate: the chain, not just the leaf, has to travel and verify.
    let ca = TestCa::new("root").intermediate("intermediate");
    let server_cert = ca.issue(&id("server"));
    let client_cert = ca.issue(&id("client"));
    let mut server = start_server(&server_cert, false).await;
    let reply = pattern(MIB, 0x5a);
    let (upstream, mut upstream_got) = start_upstream(reply.clone()).await;

    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let mut request = TunnelRequest::new(app_source(), upstream);
    request.baggage = Baggage {
        namespace: Some("shop".into()),
        workload_kind: Some("deployment".into()),
        workload_name: Some("client".into()),
        ..Default::default()
    };
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    request.traceparent = Some(HeaderValue::from_static(traceparent));

    let stream = pool.open(&key, &client_cert, &request).await.unwrap();
    let payload = pattern(MIB, 0xa5);
    let got = exchange(stream, &payload).await;
    assert!(got == reply, "reply corrupted ({} bytes)", got.len());
    assert!(
        recv(&mut upstream_got).await == payload,
        "request corrupted"
    );

    let seen = recv(&mut server.requests).await;
    assert_eq!(seen.peer, client_cert.id);
    assert_eq!(seen.source.ip(), LOCALHOST);
    assert_eq!(seen.destination, upstream);
    assert_eq!(
        seen.forwarded_for(),
        Some(ForwardedFor {
            ip: LOCALHOST,
            port: Some(40_000)
        })
    );
    assert_eq!(seen.baggage(), request.baggage);
    assert_eq!(seen.traceparent().unwrap(), traceparent);

    let report = recv(&mut server.reports).await;
    assert_eq!(report.status, StatusCode::OK);
    assert!(report.result.is_ok(), "{:?}", report.result);
    assert_eq!(report.transferred.sent, MIB as u64);
    assert_eq!(report.transferred.received, MIB as u64);
}

#[tokio::test]
async fn client_refuses_wrong_server_identity() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let server = start_server(&ca.issue(&id("impostor")), false).await;
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![id("server"), id("other")]);
    let request = TunnelRequest::new(app_source(), SocketAddr::new(LOCALHOST, 8080));
    let err = pool.open(&key, &client_cert, &request).await.unwrap_err();
    let HboneError::Identity { source, .. } = err else {
        panic!("expected an identity refusal, got {err:?}");
    };
    match *source {
        PeerIdentityError::NotAllowed { presented, .. } => {
            assert_eq!(presented, vec![id("impostor")]);
        }
        other => panic!("expected a disallowed identity, got {other:?}"),
    }
    assert_eq!(pool.connection_count(), 0);
}

/// Opens a tunnel the server must refuse at TLS, and returns why it did.
async fn refused_client(client_cert: WorkloadCertificate, server_ca: &TestCa) -> Failure {
    let mut server = start_server(&server_ca.issue(&id("server")), false).await;
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), SocketAddr::new(LOCALHOST, 8080));
    // In TLS 1.3 the client finishes first, so it learns of the refusal at TLS or at HTTP/2.
    let err = pool.open(&key, &client_cert, &request).await.unwrap_err();
    assert!(err.status().is_none(), "refused after TLS: {err:?}");
    assert!(
        server.requests.try_recv().is_err(),
        "a refused client reached authorization"
    );
    recv(&mut server.failures).await
}

#[tokio::test]
async fn server_refuses_client_from_another_trust_domain() {
    let ca = TestCa::new("root");
    let foreign = SpiffeId::new("evil.example", "shop", "client");
    match refused_client(ca.issue(&foreign), &ca).await {
        Failure::Identity(PeerIdentityError::ForeignTrustDomain {
            expected,
            presented,
        }) => {
            assert_eq!(expected, TD);
            assert_eq!(presented, foreign);
        }
        other => panic!("expected a trust-domain refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn server_refuses_client_from_unknown_root() {
    let ca = TestCa::new("root");
    let rogue = TestCa::new("rogue");
    // Trusts the real root (so it accepts the server) but is signed by the rogue one.
    let client_cert = rogue.issue_trusting(&id("client"), vec![ca.root()]);
    match refused_client(client_cert, &ca).await {
        Failure::Rustls(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        )) => {}
        other => panic!("expected an unknown-issuer refusal, got {other:?}"),
    }
}

/// Opens a tunnel to `target` against a server that denies or not, expecting a refusal.
async fn refused_connect(target: SocketAddr, deny: bool) -> (HboneError, StreamReport) {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let mut server = start_server(&ca.issue(&id("server")), deny).await;
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), target);
    let err = pool.open(&key, &client_cert, &request).await.unwrap_err();
    let report = recv(&mut server.reports).await;
    // A refusal leaves the connection pooled for the next tunnel.
    assert_eq!(pool.connection_count(), 1);
    (err, report)
}

#[tokio::test]
async fn authority_not_naming_the_pod_is_400() {
    let elsewhere = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 8080);
    let (err, report) = refused_connect(elsewhere, false).await;
    assert_eq!(err.status(), Some(StatusCode::BAD_REQUEST));
    assert!(matches!(report.result, Err(StreamError::NotThisPod(addr)) if addr == elsewhere));
}

#[tokio::test]
async fn a_waypoint_leaves_the_destination_to_its_handler() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let settings = InboundSettings::with_destinations(Destinations::DecidedByHandler);
    let mut server = start_server_with(&ca.issue(&id("waypoint")), true, settings).await;
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    // A service VIP, not an address of the waypoint.
    let vip = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
    let request = TunnelRequest::new(app_source(), vip);
    let err = pool.open(&key, &client_cert, &request).await.unwrap_err();
    // It got as far as authorization (which this handler denies), not a 400.
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    assert_eq!(recv(&mut server.requests).await.destination, vip);
}

#[tokio::test]
async fn proxy_port_in_authority_is_503() {
    let (err, report) = refused_connect(SocketAddr::new(LOCALHOST, 15006), false).await;
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(matches!(
        report.result,
        Err(StreamError::ReservedPort(15006))
    ));
}

#[tokio::test]
async fn denied_by_policy_is_401() {
    let (upstream, mut upstream_got) = start_upstream(Vec::new()).await;
    let (err, report) = refused_connect(upstream, true).await;
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    assert!(matches!(report.result, Err(StreamError::Denied(_))));
    assert!(
        upstream_got.try_recv().is_err(),
        "a denied tunnel reached the application"
    );
}

#[tokio::test]
async fn unreachable_application_is_503() {
    // A port that was just free: nothing listens there.
    let closed = TcpListener::bind((LOCALHOST, 0))
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (err, report) = refused_connect(closed, false).await;
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE));
    assert!(matches!(report.result, Err(StreamError::Upstream(_))));
}

#[tokio::test]
async fn non_connect_method_is_405() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let mut server = start_server(&ca.issue(&id("server")), false).await;
    let config = tls::client_config(&client_cert, std::slice::from_ref(&server.id)).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let tls = client::connect_tls(tcp, config, server.addr).await.unwrap();
    let (mut send, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("https://127.0.0.1:8080/")
        .body(())
        .unwrap();
    let (response, _body) = send.send_request(request, true).unwrap();
    assert_eq!(
        response.await.unwrap().status(),
        StatusCode::METHOD_NOT_ALLOWED
    );
    let report = recv(&mut server.reports).await;
    assert!(matches!(
        report.result,
        Err(StreamError::MethodNotAllowed(_))
    ));
}

#[tokio::test]
async fn pool_reuses_connections_up_to_the_stream_cap() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let server = start_server(&ca.issue(&id("server")), false).await;
    let (upstream, _upstream_got) = start_upstream(b"pong".to_vec()).await;
    let pool = test_pool(PoolConfig {
        max_streams_per_connection: 2,
        ..Default::default()
    });
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), upstream);

    // Sequential tunnels share one connection.
    for _ in 0..3 {
        let stream = pool.open(&key, &client_cert, &request).await.unwrap();
        assert_eq!(exchange(stream, b"ping").await, b"pong");
    }
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 1);

    // Three at once with a cap of two: a second connection.
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(pool.open(&key, &client_cert, &request).await.unwrap());
    }
    assert_eq!(pool.connection_count(), 2);
    assert_eq!(pool.stream_count(), 3);
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
    for stream in open {
        assert_eq!(exchange(stream, b"ping").await, b"pong");
    }
    eventually("streams released", || pool.stream_count() == 0).await;

    // The same destination under another set of acceptable identities gets its own connection.
    let other_key = key_for(&client_cert, &server, vec![server.id.clone(), id("spare")]);
    let stream = pool.open(&other_key, &client_cert, &request).await.unwrap();
    assert_eq!(exchange(stream, b"ping").await, b"pong");
    assert_eq!(pool.connection_count(), 3);
}

#[tokio::test]
async fn idle_connections_expire() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let mut server = start_server(&ca.issue(&id("server")), false).await;
    let (upstream, _upstream_got) = start_upstream(b"pong".to_vec()).await;
    let pool = test_pool(PoolConfig {
        idle_timeout: Duration::from_millis(200),
        ..Default::default()
    });
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), upstream);

    let stream = pool.open(&key, &client_cert, &request).await.unwrap();
    assert_eq!(exchange(stream, b"ping").await, b"pong");
    eventually("the idle connection closes", || {
        pool.connection_count() == 0
    })
    .await;
    // It closed cleanly (GOAWAY): the server saw no failure.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(server.failures.try_recv().is_err());

    // The next tunnel dials afresh.
    let stream = pool.open(&key, &client_cert, &request).await.unwrap();
    assert_eq!(exchange(stream, b"ping").await, b"pong");
    assert_eq!(server.accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_busy_connection_does_not_expire() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let server = start_server(&ca.issue(&id("server")), false).await;
    let (upstream, _upstream_got) = start_upstream(b"pong".to_vec()).await;
    let pool = test_pool(PoolConfig {
        idle_timeout: Duration::from_millis(100),
        ..Default::default()
    });
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), upstream);

    let stream = pool.open(&key, &client_cert, &request).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.connection_count(), 1);
    assert_eq!(exchange(stream, b"ping").await, b"pong");
}

#[tokio::test]
async fn pool_rejects_a_certificate_for_another_source() {
    let ca = TestCa::new("root");
    let server = start_server(&ca.issue(&id("server")), false).await;
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&ca.issue(&id("client")), &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), SocketAddr::new(LOCALHOST, 8080));
    let err = pool
        .open(&key, &ca.issue(&id("someone")), &request)
        .await
        .unwrap_err();
    assert!(matches!(err, HboneError::SourceMismatch { .. }), "{err:?}");
}

#[test]
fn test_certificates_carry_their_identity() {
    let ca = TestCa::new("root").intermediate("intermediate");
    let cert = ca.issue(&id("web"));
    assert_eq!(cert.chain.len(), 2);
    assert_eq!(
        tls::certificate_identity(&cert.chain[0]).unwrap(),
        id("web")
    );
    assert_eq!(
        tls::spiffe_ids(&cert.chain[1]).unwrap(),
        Vec::<SpiffeId>::new()
    );
    assert!(cert.not_before < cert.not_after);
}

/// A TCP forwarder that can be frozen: it then stops moving bytes without closing anything,
/// like a peer whose node went down.
async fn start_freezable_proxy(to: SocketAddr) -> (SocketAddr, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::AtomicBool;
    async fn forward(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let Ok(n) = from.read(&mut buf).await else {
                return;
            };
            if frozen.load(Ordering::SeqCst) {
                // Hold both sockets open and silent.
                std::future::pending::<()>().await;
            }
            if n == 0 || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let frozen = Arc::new(AtomicBool::new(false));
    let flag = frozen.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(to).await.unwrap();
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(forward(client_read, server_write, flag.clone()));
            tokio::spawn(forward(server_read, client_write, flag.clone()));
        }
    });
    (addr, frozen)
}

#[tokio::test]
async fn unresponsive_peer_is_dropped_from_the_pool() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let server = start_server(&ca.issue(&id("server")), false).await;
    let (proxy, frozen) = start_freezable_proxy(server.addr).await;
    let (upstream, _upstream_got) = start_upstream(b"pong".to_vec()).await;
    let http2 = Http2Config {
        keepalive_interval: Some(Duration::from_millis(100)),
        keepalive_timeout: Duration::from_millis(300),
        ..Default::default()
    };
    let pool = test_pool(PoolConfig {
        http2,
        ..Default::default()
    });
    let key = PoolKey::new(
        client_cert.id.clone(),
        LOCALHOST,
        proxy,
        vec![server.id.clone()],
    );
    let request = TunnelRequest::new(app_source(), upstream);

    let stream = pool.open(&key, &client_cert, &request).await.unwrap();
    assert_eq!(exchange(stream, b"ping").await, b"pong");
    // Answered PINGs keep it pooled past several intervals.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.connection_count(), 1);

    frozen.store(true, Ordering::SeqCst);
    eventually("the silent connection is dropped", || {
        pool.connection_count() == 0
    })
    .await;
}

/// Reads to EOF, then writes it all back and half-closes.
async fn echo(stream: HboneStream) {
    let (mut read, mut write) = tokio::io::split(stream);
    let mut buf = Vec::new();
    read.read_to_end(&mut buf).await.unwrap();
    write.write_all(&buf).await.unwrap();
    write.shutdown().await.unwrap();
}

#[tokio::test]
async fn goaway_moves_new_tunnels_without_cutting_live_ones() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let server_cert = ca.issue(&id("server"));
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(&server_cert).unwrap());
    // A bare server: echo tunnels, and a graceful GOAWAY right after each connection's first.
    let counter = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let mut connection = h2::server::handshake(tls).await.unwrap();
                let mut first = true;
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    let send = respond
                        .send_response(http::Response::new(()), false)
                        .unwrap();
                    tokio::spawn(echo(HboneStream::new(send, request.into_body(), None)));
                    if std::mem::take(&mut first) {
                        connection.graceful_shutdown();
                    }
                }
            });
        }
    });

    let pool = test_pool(PoolConfig::default());
    let key = PoolKey::new(
        client_cert.id.clone(),
        LOCALHOST,
        addr,
        vec![server_cert.id.clone()],
    );
    let request = TunnelRequest::new(app_source(), SocketAddr::new(LOCALHOST, 8080));
    let live = pool.open(&key, &client_cert, &request).await.unwrap();
    // Let the GOAWAY arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = pool.open(&key, &client_cert, &request).await.unwrap();
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a tunnel went to a closing connection"
    );
    assert_eq!(exchange(next, b"second").await, b"second");
    // The closing connection still carries the tunnel it had.
    assert_eq!(exchange(live, b"first").await, b"first");
}

/// Waits until the server closes `conn` (end of stream or a reset), skipping what it sends
/// first (TLS records, its HTTP/2 SETTINGS); fails the test after 10 s.
async fn closed_by_server(conn: &mut (impl AsyncRead + Unpin)) {
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the server never closed the connection");
        if matches!(read, Ok(0) | Err(_)) {
            return;
        }
    }
}

#[tokio::test]
async fn silent_clients_are_cut_at_the_handshake_and_preface_timeouts() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let limits = generous_limits();
    let mut settings = InboundSettings::new(vec![LOCALHOST]);
    settings.handshake_timeout = Duration::from_millis(300);
    settings.preface_timeout = Duration::from_millis(300);
    let server_cert = ca.issue(&id("server"));
    let mut server = start_limited(&server_cert, false, settings, None, limits.clone()).await;

    // Connected, and not a byte since.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    closed_by_server(&mut idle).await;
    let failure = recv(&mut server.failures).await;
    assert!(
        matches!(&failure, Failure::Other(e) if e == "TLS handshake timed out"),
        "{failure:?}"
    );

    // Through TLS with a good certificate, then silent: no HTTP/2 preface.
    let config = tls::client_config(&client_cert, std::slice::from_ref(&server.id)).unwrap();
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let mut tls = client::connect_tls(tcp, config, server.addr).await.unwrap();
    closed_by_server(&mut tls).await;
    let failure = recv(&mut server.failures).await;
    assert!(
        matches!(&failure, Failure::Other(e) if e == "HTTP/2 preface timed out"),
        "{failure:?}"
    );

    eventually("the connections' slots are given back", || {
        let held = limits.snapshot();
        held.connections == 0 && held.handshakes == 0
    })
    .await;
    assert_eq!(
        limits.snapshot().timed_out,
        vec![
            (Path::Hbone, Phase::TlsHandshake, 1),
            (Path::Hbone, Phase::Http2Preface, 1)
        ]
    );
}

/// A pool whose connections come from `source` (any 127/8 address is this host's).
fn pool_from(source: IpAddr) -> Pool {
    Pool::new(
        move |key: &PoolKey| {
            let destination = key.destination();
            async move {
                let socket = TcpSocket::new_v4()?;
                socket.bind(SocketAddr::new(source, 0))?;
                socket.connect(destination).await
            }
        },
        PoolConfig::default(),
    )
}

#[tokio::test]
async fn a_source_past_its_share_of_handshakes_is_reset_and_others_are_served() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let mut limit = LimitSettings::for_descriptors(1 << 20);
    limit.max_handshakes_per_source = 2;
    let limits = Arc::new(Limits::new(limit));
    let mut settings = InboundSettings::new(vec![LOCALHOST]);
    // Longer than `closed_by_server` waits: only the limit can close the third connection.
    settings.handshake_timeout = Duration::from_secs(60);
    let server_cert = ca.issue(&id("server"));
    let server = start_limited(&server_cert, false, settings, None, limits.clone()).await;

    // Two silent connections from 127.0.0.1 hold its share of handshakes...
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(server.addr).await.unwrap());
    }
    eventually("both connections in their handshake", || {
        limits.snapshot().handshakes == 2
    })
    .await;
    // ...so a third is reset as soon as it is accepted,
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    closed_by_server(&mut third).await;
    // while a client at another address gets its tunnel.
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let (upstream, _got) = start_upstream(b"hello".to_vec()).await;
    let pool = pool_from(other);
    let key = PoolKey::new(
        client_cert.id.clone(),
        other,
        server.addr,
        vec![server.id.clone()],
    );
    let request = TunnelRequest::new(app_source(), upstream);
    let stream = pool.open(&key, &client_cert, &request).await.unwrap();
    assert_eq!(exchange(stream, b"x").await, b"hello");
    assert_eq!(
        limits.snapshot().over_limit,
        vec![(Path::Hbone, Limit::HandshakesPerSource, 1)]
    );
    assert_eq!(
        server.accepted.load(Ordering::SeqCst),
        3,
        "the refused one was served"
    );
    drop(held);
}

#[tokio::test]
async fn tunnels_past_the_source_share_are_refused_with_503() {
    let ca = TestCa::new("root");
    let client_cert = ca.issue(&id("client"));
    let mut limit = LimitSettings::for_descriptors(1 << 20);
    // The connection and one tunnel.
    limit.max_connections_per_source = 2;
    let limits = Arc::new(Limits::new(limit));
    let settings = InboundSettings::new(vec![LOCALHOST]);
    let server_cert = ca.issue(&id("server"));
    let server = start_limited(&server_cert, false, settings, None, limits.clone()).await;
    let (upstream, _got) = start_upstream(b"hello".to_vec()).await;
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let request = TunnelRequest::new(app_source(), upstream);

    let first = pool.open(&key, &client_cert, &request).await.unwrap();
    let err = pool.open(&key, &client_cert, &request).await.unwrap_err();
    assert_eq!(
        err.status(),
        Some(StatusCode::SERVICE_UNAVAILABLE),
        "{err:?}"
    );
    // The tunnel already open is not disturbed, and its end frees the slot.
    assert_eq!(exchange(first, b"x").await, b"hello");
    eventually("the first tunnel's slot is given back", || {
        limits.snapshot().connections == 1
    })
    .await;
    let again = pool.open(&key, &client_cert, &request).await.unwrap();
    assert_eq!(exchange(again, b"y").await, b"hello");
    assert_eq!(
        limits.snapshot().over_limit,
        vec![(Path::HboneTunnel, Limit::PerSource, 1)]
    );
    assert_eq!(
        pool.connection_count(),
        1,
        "a refused tunnel keeps its connection"
    );
}

/// Many tunnels held open at once, as a burst of long-lived connections makes them: each is
/// opened, echoes 16 KiB through relays on both ends (a socket relayed into the tunnel, as the
/// outbound proxy does; the tunnel relayed to the application by the HBONE server), and stays
/// open while the next one is made. More tunnels than one connection carries, so the pool
/// spreads them over several.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_held_tunnels_each_echo_while_the_others_stay_open() {
    const TUNNELS: usize = 150;
    const BYTES: usize = 16 * 1024;
    let ca = TestCa::new("root");
    let client_cert = Arc::new(ca.issue(&id("client")));
    let server = start_server(&ca.issue(&id("server")), false).await;
    // The application: echoes each connection until its end.
    let app = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let app_addr = app.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (socket, _) = app.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut read, mut write) = socket.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    // The outbound side: each accepted socket relayed into a tunnel of its own.
    let pool = test_pool(PoolConfig::default());
    let key = key_for(&client_cert, &server, vec![server.id.clone()]);
    let front = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let front_addr = front.local_addr().unwrap();
    {
        let pool = pool.clone();
        tokio::spawn(async move {
            loop {
                let (socket, _) = front.accept().await.unwrap();
                let (pool, key, cert) = (pool.clone(), key.clone(), client_cert.clone());
                tokio::spawn(async move {
                    let request = TunnelRequest::new(app_source(), app_addr);
                    let stream = pool.open(&key, &cert, &request).await.unwrap();
                    let _ = crate::relay::relay(
                        socket,
                        stream,
                        &(),
                        &crate::limits::BufferShare::unlimited(),
                    )
                    .await;
                });
            }
        });
    }

    let mut held = Vec::with_capacity(TUNNELS);
    for i in 0..TUNNELS {
        let payload = pattern(BYTES, i as u8);
        let opened = async {
            let mut conn = TcpStream::connect(front_addr).await.unwrap();
            let mut got = vec![0u8; 8 * 1024];
            for chunk in payload.chunks(got.len()) {
                conn.write_all(chunk).await.unwrap();
                conn.read_exact(&mut got[..chunk.len()]).await.unwrap();
                assert!(got[..chunk.len()] == *chunk, "tunnel {i}: echo corrupted");
            }
            conn
        };
        let conn = tokio::time::timeout(Duration::from_secs(20), opened)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "tunnel {i} did not echo with {} held open over {} connections",
                    held.len(),
                    pool.connection_count()
                )
            });
        held.push(conn);
    }
    assert!(pool.connection_count() >= TUNNELS.div_ceil(100));
}
