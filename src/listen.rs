//! Accepting connections on the plaintext listeners (ext_proc without TLS, gRPC health,
//! metrics): a client must send its first bytes within [`FIRST_BYTES_TIMEOUT`], or it is
//! disconnected.
//!
//! Neither tonic nor axum bounds how long an accepted connection may stay silent, so a client
//! that connects and says nothing holds a socket and a task forever (the TLS port is bounded by
//! its handshake timeout instead). Every real client speaks at once: Envoy and gRPC probes send
//! the HTTP/2 preface, Prometheus its request line. Each accepted connection waits in a task of
//! its own, so one silent client never delays the next.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::{net::TcpStream, sync::mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// How long an accepted plaintext connection may stay silent before it is closed.
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed accept (out of file descriptors, say): retrying at once would spin a core.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The connections `incoming` accepts, each first passed through `admit` in a task of its own
/// (a slow or silent client never delays the next), yielded when `admit` returns one. Accepting
/// stops, and `incoming` is dropped, once the returned stream is. Tasks are tracked by `tasks`,
/// so shutdown returns only once the listener is closed.
pub fn admit_each<T, F, Fut>(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    tasks: &TaskTracker,
    admit: F,
) -> ReceiverStream<io::Result<T>>
where
    T: Send + 'static,
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = Option<T>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let admitting = tasks.clone();
    tasks.spawn(async move {
        let mut incoming = std::pin::pin!(incoming);
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                next = incoming.next() => match next {
                    Some(accepted) => accepted,
                    None => return,
                },
            };
            let tcp = match accepted {
                Ok(tcp) => tcp,
                Err(e) => {
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let (tx, admitted) = (tx.clone(), admit(tcp));
            admitting.spawn(async move {
                // A server that stopped serving (shutdown) abandons the connections still being
                // admitted rather than waiting out their timeouts.
                tokio::select! {
                    admitted = admitted => if let Some(conn) = admitted {
                        let _ = tx.send(Ok(conn)).await;
                    },
                    () = tx.closed() => {}
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The connections of `incoming` that send their first bytes within `timeout`, in the order
/// they do; the others are closed.
pub fn speaking_within(
    incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
    timeout: Duration,
    tasks: &TaskTracker,
) -> ReceiverStream<io::Result<TcpStream>> {
    admit_each(incoming, tasks, move |tcp| async move {
        let mut first = [0u8; 1];
        match tokio::time::timeout(timeout, tcp.peek(&mut first)).await {
            Ok(Ok(n)) if n > 0 => Some(tcp),
            Ok(Ok(_)) => {
                debug!("connection closed before it said anything");
                None
            }
            Ok(Err(e)) => {
                debug!(error = %e, "connection failed before it said anything");
                None
            }
            Err(_) => {
                debug!(?timeout, "silent connection closed");
                None
            }
        }
    })
}

/// [`speaking_within`] as an axum listener (the metrics server).
pub struct SpeakingListener {
    connections: ReceiverStream<io::Result<TcpStream>>,
    local: SocketAddr,
}

impl SpeakingListener {
    /// Connections of `incoming` (bound at `local`) that speak within `timeout`.
    pub fn new(
        incoming: impl Stream<Item = io::Result<TcpStream>> + Send + 'static,
        local: SocketAddr,
        timeout: Duration,
        tasks: &TaskTracker,
    ) -> Self {
        Self {
            connections: speaking_within(incoming, timeout, tasks),
            local,
        }
    }
}

impl axum::serve::Listener for SpeakingListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.connections.next().await {
                Some(Ok(tcp)) => match tcp.peer_addr() {
                    Ok(peer) => return (tcp, peer),
                    Err(e) => debug!(error = %e, "connection gone before it was served"),
                },
                Some(Err(e)) => debug!(error = %e, "connection not served"),
                // The acceptor ended (shutdown): nothing will come; wait for the server to stop.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };
    use tokio_stream::wrappers::TcpListenerStream;

    #[tokio::test]
    async fn a_silent_connection_is_closed_and_a_speaking_one_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tasks = TaskTracker::new();
        let timeout = Duration::from_millis(300);
        let mut served = speaking_within(TcpListenerStream::new(listener), timeout, &tasks);
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut speaking = TcpStream::connect(addr).await.unwrap();
        speaking.write_all(b"PRI * HTTP/2.0").await.unwrap();
        let first = served.next().await.unwrap().unwrap();
        assert_eq!(first.peer_addr().unwrap(), speaking.local_addr().unwrap());
        // The silent one is closed by the server once its time is up: its read sees the end
        // (bounded wait, far past the timeout).
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), silent.read(&mut buf))
            .await
            .expect("closed by the server, not left waiting")
            .unwrap_or(0);
        assert_eq!(n, 0);
        drop(served);
    }
}
