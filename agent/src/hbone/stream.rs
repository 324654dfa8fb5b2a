//! One HBONE tunnel as a byte stream: an HTTP/2 stream's DATA frames, read and written through
//! tokio's `AsyncRead`/`AsyncWrite`, and handed to and taken from [`crate::relay`] as chunks
//! ([`Relayable`]) so the relay copies no byte of a tunnel.
use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::slot::Slot;
use crate::relay::{ReadBuffer, Relayable};

/// A tunnelled connection: the established CONNECT stream, on either side.
///
/// Reading yields the peer's DATA; end of stream (the peer's END_STREAM) reads as EOF.
/// `shutdown` sends END_STREAM, which the peer sees as EOF while the other direction stays
/// open: a TCP half-close passes through the tunnel. Dropping the stream before both
/// directions ended resets it (RST_STREAM CANCEL), the tunnel's equivalent of a TCP reset.
pub struct HboneStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read; `poll_read` may be handed a smaller buffer than a frame.
    pending: Bytes,
    write_closed: bool,
    /// The pool's claim on a stream slot of the connection, released on drop.
    _slot: Option<Slot>,
}

impl HboneStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<Slot>) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            _slot: slot,
        }
    }

    /// The HTTP/2 stream id, for logs.
    pub fn stream_id(&self) -> u32 {
        u32::from(self.send.stream_id())
    }
}

impl std::fmt::Debug for HboneStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneStream")
            .field("stream_id", &self.stream_id())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

/// An h2 error as the I/O error a socket would have given.
pub(crate) fn io_error(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    match err.reason() {
        // The peer (or we) ended the stream abruptly: what a TCP RST is to a socket.
        Some(_) if err.is_reset() => io::Error::new(io::ErrorKind::ConnectionReset, err),
        // The whole connection went away (GOAWAY or protocol error).
        Some(_) => io::Error::new(io::ErrorKind::ConnectionAborted, err),
        None => io::Error::other(err),
    }
}

impl HboneStream {
    /// The next chunk of the peer's DATA, as h2 received it; empty at the end of the stream.
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Bytes>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(std::mem::take(&mut self.pending)));
        }
        loop {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(Bytes::new())),
                // An empty DATA frame (END_STREAM alone, or padding): not the end by itself.
                Some(Ok(data)) if data.is_empty() => {}
                Some(Ok(data)) => {
                    // Re-open the window as soon as the bytes are ours: at most one frame waits
                    // here, and holding the window until it is read would halve throughput.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Ok(data));
                }
                // A reset with NO_ERROR is a peer saying "done, stop sending" after it ended its
                // side (RFC 9113 §8.1): the data it sent is complete, so read it as EOF.
                Some(Err(err)) if err.reason() == Some(Reason::NO_ERROR) => {
                    return Poll::Ready(Ok(Bytes::new()));
                }
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
            }
        }
    }

    /// Room to send up to `len` bytes now: how many h2 grants (flow control, its send buffer).
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            // Ask for room for the whole buffer; h2 grants what flow control and its send
            // buffer allow, and we send that much.
            self.send.reserve_capacity(len);
            match ready!(self.send.poll_capacity(cx)) {
                // Granted capacity can be taken back before we see it; ask again (this poll
                // registers the waker).
                Some(Ok(0)) => continue,
                Some(Ok(granted)) => return Poll::Ready(Ok(granted.min(len))),
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
                // The stream can no longer send: reset by the peer, or the connection is gone.
                None => return self.poll_send_closed(cx).map(Err),
            }
        }
    }

    /// Why the peer stopped our sending, as an I/O error.
    fn poll_send_closed(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        Poll::Ready(match ready!(self.send.poll_reset(cx)) {
            Ok(reason) => io::Error::new(
                io::ErrorKind::BrokenPipe,
                format!("HBONE stream reset by peer: {reason}"),
            ),
            Err(err) => io_error(err),
        })
    }
}

/// The relay moves a tunnel's bytes as h2 holds them: received DATA frames are handed on
/// as they are, and a chunk to send becomes a DATA frame without being copied.
impl Relayable for HboneStream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _buf: &mut ReadBuffer,
    ) -> Poll<io::Result<Bytes>> {
        self.poll_data(cx)
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        let data = chunk.split_to(n);
        Poll::Ready(
            self.send
                .send_data(data, false)
                .map(|()| n)
                .map_err(io_error),
        )
    }
}

impl AsyncRead for HboneStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut data = ready!(this.poll_data(cx))?;
        let n = buf.remaining().min(data.len());
        buf.put_slice(&data[..n]);
        crate::relay::consume(&mut data, n);
        this.pending = data;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HboneStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        Poll::Ready(
            this.send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .map(|()| n)
                .map_err(io_error),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            // An empty DATA frame with END_STREAM: the peer reads EOF, our read side stays open.
            if let Err(err) = this.send.send_data(Bytes::new(), true) {
                // A peer that sent its complete answer may end the stream with NO_ERROR
                // without waiting for our end (RFC 9113 §8.1; the h2 crate's servers do when
                // they drop a stream whose request is still open): our end then has nothing
                // left to tell it, as a TCP half-close after the peer's close.
                if let Poll::Ready(Ok(Reason::NO_ERROR)) = this.send.poll_reset(cx) {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io_error(err)));
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A tunnel whose server answered in full and then reset the stream with NO_ERROR, as an
    /// h2 server does when its application closed before the client's end (RFC 9113 §8.1):
    /// its client reads the whole answer, and ending its own side is not a failure (its
    /// relay would report the connection failed). Writing more is, as on a closed socket.
    #[tokio::test]
    async fn ending_a_tunnel_the_server_ended_with_no_error_is_clean() {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(async move {
            let mut connection = h2::server::handshake(server_io).await.unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            let mut send = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            send.send_data(Bytes::from_static(b"done"), true).unwrap();
            // The request's body is still open: dropping it resets the stream, NO_ERROR.
            drop((request, send, respond));
            while connection.accept().await.is_some() {}
        });
        let (client, connection) = h2::client::handshake(client_io).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:8080")
            .body(())
            .unwrap();
        let (response, send) = client
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        let recv = response.await.unwrap().into_body();
        let mut tunnel = HboneStream::new(send, recv, None);

        let mut answer = Vec::new();
        tunnel.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"done");
        let reason = std::future::poll_fn(|cx| tunnel.send.poll_reset(cx))
            .await
            .unwrap();
        assert_eq!(reason, Reason::NO_ERROR);

        let more = tunnel.write_all(b"more").await;
        assert!(
            more.is_err(),
            "sending more after the reset must fail: {more:?}"
        );
        tunnel
            .shutdown()
            .await
            .expect("ending our side after the server's NO_ERROR reset is clean");
        drop(tunnel);
        server.abort();
    }
}
