//! `testpod ws-serve` and `testpod ws-echo`: a WebSocket echo server and client
//! (tokio-tungstenite), to pass HTTP/1.1 upgrades through the mesh.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            super::emit(json!({"event": "error", "error": e.to_string()}));
            None
        }
    }
}

/// Accepts WebSocket connections on `port` and answers every text message `m` with
/// `<name>: m`, until killed.
pub fn serve(port: u16, name: String) -> bool {
    let Some(runtime) = runtime() else {
        return false;
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
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let name = name.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let reply = match message {
                        Message::Text(text) => Message::text(format!("{name}: {text}")),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    })
}

/// Connects to `url` (`ws://host:port/path`), sends `messages` text messages one at a time
/// and checks each reply, then closes. One JSON line; exit 0 when every reply came back.
pub fn echo(url: String, messages: u32) -> bool {
    let Some(runtime) = runtime() else {
        return false;
    };
    runtime.block_on(async move {
        let run = async {
            let (mut ws, response) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .map_err(|e| format!("connect {url}: {e}"))?;
            let status = response.status().as_u16();
            let mut served_by = String::new();
            for i in 0..messages {
                let sent = format!("message {i}");
                ws.send(Message::text(sent.clone()))
                    .await
                    .map_err(|e| format!("send {i}: {e}"))?;
                let reply = match ws.next().await {
                    Some(Ok(Message::Text(text))) => text.to_string(),
                    other => return Err(format!("reply {i}: {other:?}")),
                };
                let Some((name, echoed)) = reply.split_once(": ") else {
                    return Err(format!("reply {i}: {reply:?}"));
                };
                if echoed != sent {
                    return Err(format!("reply {i}: {reply:?}, sent {sent:?}"));
                }
                served_by = name.to_string();
            }
            ws.close(None).await.map_err(|e| format!("close: {e}"))?;
            Ok::<_, String>((status, served_by))
        };
        match tokio::time::timeout(Duration::from_secs(60), run).await {
            Ok(Ok((status, served_by))) => {
                super::emit(json!({"ok": true, "status": status, "replies": messages,
                                   "served_by": served_by}));
                true
            }
            Ok(Err(error)) => {
                super::emit(json!({"ok": false, "error": error}));
                false
            }
            Err(_) => {
                super::emit(json!({"ok": false, "error": "timed out after 60 s"}));
                false
            }
        }
    })
}
