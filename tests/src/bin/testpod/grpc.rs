//! `testpod grpc-serve` and `testpod grpc-call`: a tonic server and client of
//! tests/proto/greeter.proto, to pass real gRPC (HTTP/2, trailers) through the mesh.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use serde_json::json;
use tonic::{Request, Response, Status, transport::Channel};

/// The code generated from tests/proto/greeter.proto.
#[allow(missing_docs, unused_qualifications, clippy::doc_lazy_continuation)]
mod pb {
    tonic::include_proto!("ambit.test");
}

use pb::{
    Hello, Reply,
    greeter_client::GreeterClient,
    greeter_server::{Greeter, GreeterServer},
};

/// The most replies one `Count` streams.
const MAX_COUNT: u32 = 10_000;

struct Service {
    name: String,
}

#[tonic::async_trait]
impl Greeter for Service {
    async fn say(&self, request: Request<Hello>) -> Result<Response<Reply>, Status> {
        let hello = request.into_inner();
        if hello.text == "fail" {
            return Err(Status::not_found("no such greeting"));
        }
        Ok(Response::new(Reply {
            text: hello.text,
            served_by: self.name.clone(),
            index: 0,
        }))
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<Reply, Status>> + Send>>;

    async fn count(&self, request: Request<Hello>) -> Result<Response<Self::CountStream>, Status> {
        let hello = request.into_inner();
        let mut replies: Vec<Result<Reply, Status>> = (0..hello.count.min(MAX_COUNT))
            .map(|index| {
                Ok(Reply {
                    text: hello.text.clone(),
                    served_by: self.name.clone(),
                    index,
                })
            })
            .collect();
        if hello.text == "abort" {
            replies.push(Err(Status::aborted("aborted after the replies")));
        }
        Ok(Response::new(Box::pin(futures::stream::iter(replies))))
    }
}

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

/// Serves Greeter on `port` (all IPv4 addresses, HTTP/2 with prior knowledge) until killed.
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
        // hyper's HTTP/2 server (as `testpod http`'s) with the generated service; tonic's own
        // server would need its router.
        let service = GreeterServer::new(Service { name });
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// On one channel to `addr` (`http://host:port`): `calls` unary `Say(text)`, then one
/// `Count(text, stream)` if `stream` > 0. One JSON line per call with its gRPC status code
/// (`0`: OK) and who served it; exit 0 when every call got the status `text` asks for.
pub fn call(addr: String, calls: u32, stream: u32, text: String) -> bool {
    let Some(runtime) = runtime() else {
        return false;
    };
    runtime.block_on(async move {
        let channel = match Channel::from_shared(addr.clone()) {
            Ok(endpoint) => endpoint
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(30)),
            Err(e) => {
                super::emit(json!({"event": "error", "error": e.to_string()}));
                return false;
            }
        };
        let channel = match channel.connect().await {
            Ok(c) => c,
            Err(e) => {
                super::emit(json!({"event": "error", "error": format!("connect {addr}: {e}")}));
                return false;
            }
        };
        let mut client = GreeterClient::new(channel);
        let expected_unary = if text == "fail" { 5 } else { 0 };
        let expected_stream = if text == "abort" { 10 } else { 0 };
        let mut all_ok = true;
        for i in 0..calls {
            let hello = Hello {
                text: text.clone(),
                count: 0,
            };
            let line = match client.say(hello).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    json!({"rpc": "say", "call": i, "code": 0, "text": reply.text,
                           "served_by": reply.served_by})
                }
                Err(status) => json!({"rpc": "say", "call": i, "code": status.code() as i32,
                                      "message": status.message()}),
            };
            all_ok &= line["code"] == expected_unary;
            super::emit(line);
        }
        if stream > 0 {
            let hello = Hello {
                text: text.clone(),
                count: stream,
            };
            let mut replies = 0u32;
            let mut served_by = std::collections::BTreeSet::new();
            let code = match client.count(hello).await {
                Ok(response) => {
                    let mut messages = response.into_inner();
                    loop {
                        match messages.message().await {
                            Ok(Some(reply)) if reply.index == replies => {
                                replies += 1;
                                served_by.insert(reply.served_by);
                            }
                            Ok(Some(_out_of_order)) => break -1,
                            Ok(None) => break 0,
                            Err(status) => break status.code() as i32,
                        }
                    }
                }
                Err(status) => status.code() as i32,
            };
            all_ok &= code == expected_stream && replies == stream;
            super::emit(json!({"rpc": "count", "code": code, "replies": replies,
                               "served_by": served_by}));
        }
        all_ok
    })
}
