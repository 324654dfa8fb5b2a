//! The fake API server's pod port-forward (`GET .../pods/<name>/portforward?ports=P[,Q]`): the
//! WebSocket protocol kube's `Api::<Pod>::portforward` (and kubectl's WebSocket port-forward)
//! speak, forwarding each port to a local TCP address the test chose
//! ([`super::FakeApiServer::forward_port`]), where a kubelet would connect to the pod's port.
//!
//! The protocol (kube-client 5, `api/portforward.rs`; the API server's `wsstream`): the client
//! offers the subprotocols `v5.channel.k8s.io, v4.channel.k8s.io` and the server answers with
//! one (here v4). Every message is binary, its first byte the channel: port `i` of the request
//! has the data channel `2i` and the error channel `2i + 1`. The server's first message on
//! each channel is the port number (two bytes, little-endian); then data, both ways, on the
//! data channel, and at most one error text on the error channel, after which the port is
//! unusable. A port whose address is not set, or refuses the connection, gets that error, as
//! a kubelet sends it.
use std::{collections::BTreeMap, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _, future::BoxFuture};
use http::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _, ReadHalf, WriteHalf},
    net::TcpStream,
    sync::mpsc,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{Message, handshake::derive_accept_key, protocol::Role},
};

use super::{Body, Inner, error_response, full, percent_decode};

/// The subprotocol answered.
const PROTOCOL: &str = "v4.channel.k8s.io";

/// Opens the connection to a pod's port (in another network namespace, say).
pub type Dial = Arc<dyn Fn() -> BoxFuture<'static, std::io::Result<TcpStream>> + Send + Sync>;

/// Where a pod's port is forwarded.
#[derive(Clone)]
pub(super) enum Forward {
    /// A connection to this address.
    Addr(SocketAddr),
    /// What this opens.
    Dial(Dial),
}

/// Where each port of each pod is forwarded, by `(namespace, pod, port)`.
pub(super) type Forwards = BTreeMap<(String, String, u16), Forward>;

/// Whether `path` is a pod's port-forward: its namespace and name.
pub(super) fn target(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/v1/namespaces/")?;
    let [namespace, "pods", name, "portforward"] = rest.split('/').collect::<Vec<_>>()[..] else {
        return None;
    };
    Some((namespace.to_string(), name.to_string()))
}

/// Answers the upgrade and serves the WebSocket on its own task.
pub(super) fn serve(
    inner: &Arc<Inner>,
    mut request: Request<hyper::body::Incoming>,
    namespace: String,
    pod: String,
) -> Response<Body> {
    let ports: Result<Vec<u16>, _> = request
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|pair| pair.strip_prefix("ports="))
        .flat_map(|ports| {
            percent_decode(ports)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|port| port.trim().parse::<u16>())
        .collect();
    let ports = match ports {
        Ok(ports) if !ports.is_empty() => ports,
        _ => return error_response(400, "BadRequest", "ports: a list of port numbers is needed"),
    };
    let exists = {
        let state = inner.state();
        state
            .type_index(std::any::TypeId::of::<k8s_openapi::api::core::v1::Pod>())
            .is_some_and(|i| state.objects[i].contains_key(&(namespace.clone(), pod.clone())))
    };
    if !exists {
        return error_response(404, "NotFound", &format!("pods \"{pod}\" not found"));
    }
    let headers = request.headers();
    let offered = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
        return error_response(400, "BadRequest", "a WebSocket upgrade is needed (no SPDY)");
    };
    if !upgrade || !offered.split(',').any(|p| p.trim() == PROTOCOL) {
        return error_response(
            400,
            "BadRequest",
            &format!("a WebSocket upgrade offering {PROTOCOL} is needed"),
        );
    }
    let targets: Vec<Option<Forward>> = {
        let state = inner.state();
        ports
            .iter()
            .map(|port| {
                state
                    .port_forwards
                    .get(&(namespace.clone(), pod.clone(), *port))
                    .cloned()
            })
            .collect()
    };
    let mut life = inner.life();
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                tracing::debug!("fake API server: port-forward upgrade failed: {e}");
                return;
            }
        };
        let socket =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        tokio::select! {
            () = forward(socket, &namespace, &pod, &ports, &targets) => {}
            () = life.ended() => {}
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        header::UPGRADE,
        header::HeaderValue::from_static("websocket"),
    );
    headers.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    headers.insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        header::HeaderValue::from_static(PROTOCOL),
    );
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        derive_accept_key(key.as_bytes())
            .parse()
            .expect("base64 is a header value"),
    );
    response
}

/// A channel's message: its byte, then `data`.
fn message(channel: usize, data: &[u8]) -> Message {
    let mut bytes = Vec::with_capacity(data.len() + 1);
    bytes.push(channel as u8);
    bytes.extend_from_slice(data);
    Message::binary(bytes)
}

/// Moves bytes between the WebSocket and one TCP connection per port until the client closes
/// or every port's connection has ended.
async fn forward<S>(
    socket: WebSocketStream<S>,
    namespace: &str,
    pod: &str,
    ports: &[u16],
    targets: &[Option<Forward>],
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = socket.split();
    let mut writers: Vec<Option<WriteHalf<TcpStream>>> = Vec::new();
    // What the connections read: (port index, bytes), empty at the end.
    let (read_tx, mut read_rx) = mpsc::channel::<(usize, Bytes)>(16);
    let mut open = 0;
    for (index, (port, target)) in ports.iter().zip(targets).enumerate() {
        for channel in [2 * index, 2 * index + 1] {
            if sink
                .send(message(channel, &port.to_le_bytes()))
                .await
                .is_err()
            {
                return;
            }
        }
        let connected = match target {
            Some(Forward::Addr(addr)) => TcpStream::connect(addr).await.map_err(|e| e.to_string()),
            Some(Forward::Dial(dial)) => dial().await.map_err(|e| e.to_string()),
            None => Err("connection refused (no address set for the port)".to_string()),
        };
        match connected {
            Ok(stream) => {
                let (reader, writer) = tokio::io::split(stream);
                writers.push(Some(writer));
                tokio::spawn(read_loop(index, reader, read_tx.clone()));
                open += 1;
            }
            Err(e) => {
                writers.push(None);
                let text =
                    format!("error forwarding port {port} to pod {namespace}/{pod}: dial tcp: {e}");
                if sink
                    .send(message(2 * index + 1, text.as_bytes()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    drop(read_tx);
    while open > 0 {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Binary(bytes))) if bytes.len() > 1 => {
                    let index = usize::from(bytes[0]) / 2;
                    if bytes[0] % 2 == 0
                        && let Some(Some(writer)) = writers.get_mut(index)
                        && writer.write_all(&bytes[1..]).await.is_err()
                    {
                        writers[index] = None;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            read = read_rx.recv() => match read {
                Some((_, data)) if data.is_empty() => open -= 1,
                Some((index, data)) => {
                    if sink.send(message(2 * index, &data)).await.is_err() {
                        break;
                    }
                }
                None => break,
            },
        }
    }
    let _ = sink.send(Message::Close(None)).await;
}

async fn read_loop(
    index: usize,
    mut reader: ReadHalf<TcpStream>,
    to: mpsc::Sender<(usize, Bytes)>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let data = match reader.read(&mut buffer).await {
            Ok(0) | Err(_) => Bytes::new(),
            Ok(n) => Bytes::copy_from_slice(&buffer[..n]),
        };
        let end = data.is_empty();
        if to.send((index, data)).await.is_err() || end {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Pod;
    use kube::Api;
    use tokio::net::TcpListener;

    use super::super::FakeApiServer;
    use super::*;

    fn pod(name: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ambit-system"},
        }))
        .unwrap()
    }

    /// An echo server: what it reads, it writes back, until the end of the stream.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn kube_port_forward_reaches_the_address_set_for_the_port_both_ways() {
        let server = FakeApiServer::start().await.unwrap();
        server.apply(&pod("agent-a"));
        server.forward_port("ambit-system", "agent-a", 15000, echo().await);
        let pods: Api<Pod> = Api::namespaced(server.client(), "ambit-system");
        let mut forwarder = pods.portforward("agent-a", &[15000]).await.unwrap();
        let mut stream = forwarder.take_stream(15000).unwrap();
        // More than one frame's worth, each byte its position, so order and loss both show.
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut stream);
        let writer = async {
            w.write_all(&sent).await.unwrap();
        };
        let mut received = vec![0u8; sent.len()];
        let reader = async {
            r.read_exact(&mut received).await.unwrap();
        };
        tokio::join!(writer, reader);
        assert!(received == sent, "the echo came back changed");
        drop(stream);
        forwarder.abort();
    }

    #[tokio::test]
    async fn a_port_without_an_address_gets_the_error_a_kubelet_sends_and_a_missing_pod_404() {
        let server = FakeApiServer::start().await.unwrap();
        server.apply(&pod("agent-a"));
        let pods: Api<Pod> = Api::namespaced(server.client(), "ambit-system");
        let mut forwarder = pods.portforward("agent-a", &[15020]).await.unwrap();
        let error = forwarder.take_error(15020).unwrap().await;
        let error = error.expect("an error message on the error channel");
        assert!(
            error.contains("error forwarding port 15020 to pod ambit-system/agent-a"),
            "{error}"
        );
        let missing = pods.portforward("agent-b", &[15000]).await.err().unwrap();
        assert!(
            matches!(&missing, kube::Error::Api(status) if status.code == 404),
            "{missing:?}"
        );
    }
}
