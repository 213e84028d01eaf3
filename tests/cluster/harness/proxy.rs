//! The test's "one address": a round-robin TCP proxy on 127.0.0.1 over the API replicas' published ports,
//! as a load balancer in front of a real cluster would be. A connection goes to the next backend that
//! accepts it (a dead replica is skipped, as a health-checked balancer would); bytes are copied both ways
//! untouched (SSE and WebSocket upgrades included). A backend that closes the connection before it
//! answered a byte (a replica that just died behind a port forwarder that still accepts) is retried on the
//! next with what the client had sent, as a balancer's "retry on empty response" does (bounded by
//! [`RETRY_BUFFER`]).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one backend may take to accept before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// The most of a client's bytes kept to replay on the next backend when one closes without an answer.
const RETRY_BUFFER: usize = 256 << 10;

pub struct Proxy {
    addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    /// How many connections each backend (by index) got, for tests that check the spread.
    served: Arc<Mutex<Vec<usize>>>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Proxy {
    /// Listens on an ephemeral loopback port and forwards to `backends` in turn.
    pub async fn start(backends: Vec<SocketAddr>) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(Mutex::new(vec![0; backends.len()]));
        let backends = Arc::new(Mutex::new(backends));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let next = Arc::new(AtomicUsize::new(0));
        let (b, s, st, t) = (backends.clone(), served.clone(), stop.clone(), tasks.clone());
        tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = st.cancelled() => return,
                    accepted = listener.accept() => accepted,
                };
                let Ok((client, _)) = accepted else { continue };
                let (b, s, st, next) = (b.clone(), s.clone(), st.clone(), next.clone());
                t.spawn(async move {
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = relay(client, &b, &s, &next) => {}
                    }
                });
            }
        });
        Ok(Proxy { addr, backends, served, stop, tasks })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the backends (a restarted node's published port may have changed).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        let n = backends.len();
        *self.backends.lock().unwrap() = backends;
        *self.served.lock().unwrap() = vec![0; n];
    }

    /// Connections each backend took so far.
    pub fn served(&self) -> Vec<usize> {
        self.served.lock().unwrap().clone()
    }

    /// Stops listening and cuts every open connection.
    pub async fn stop(self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Relays one client connection: to the next backend that accepts; while that backend has not answered
/// a byte, what the client sends is kept, and if the backend closes first, the next backend gets it all
/// again; after the first byte of an answer, bytes flow both ways untouched.
async fn relay(
    mut client: TcpStream,
    backends: &Mutex<Vec<SocketAddr>>,
    served: &Mutex<Vec<usize>>,
    next: &AtomicUsize,
) {
    let attempts = backends.lock().unwrap().len();
    let mut sent = Vec::new();
    let mut client_done = false;
    let (mut from_client, mut from_backend) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    for _ in 0..attempts {
        let Some(mut upstream) = connect_next(backends, served, next).await else { return };
        if upstream.write_all(&sent).await.is_err() {
            continue;
        }
        if client_done {
            let _ = upstream.shutdown().await;
        }
        loop {
            tokio::select! {
                read = client.read(&mut from_client), if !client_done => match read {
                    Ok(0) | Err(_) => {
                        client_done = true;
                        let _ = upstream.shutdown().await;
                    }
                    Ok(n) => {
                        if sent.len() + n > RETRY_BUFFER {
                            // Too much to replay: no retry; relay as it is.
                            if upstream.write_all(&from_client[..n]).await.is_ok() {
                                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                            }
                            return;
                        }
                        sent.extend_from_slice(&from_client[..n]);
                        if upstream.write_all(&from_client[..n]).await.is_err() {
                            break;
                        }
                    }
                },
                read = upstream.read(&mut from_backend) => match read {
                    // Closed before answering: the next backend.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if client.write_all(&from_backend[..n]).await.is_ok() {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        return;
                    }
                },
            }
        }
    }
}

/// The next backend, round robin, that accepts within [`CONNECT_TIMEOUT`]; each is tried at most once.
async fn connect_next(
    backends: &Mutex<Vec<SocketAddr>>,
    served: &Mutex<Vec<usize>>,
    next: &AtomicUsize,
) -> Option<TcpStream> {
    let list = backends.lock().unwrap().clone();
    for _ in 0..list.len() {
        let i = next.fetch_add(1, Ordering::Relaxed) % list.len();
        if let Ok(Ok(stream)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(list[i])).await {
            if let Some(count) = served.lock().unwrap().get_mut(i) {
                *count += 1;
            }
            return Some(stream);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that answers every connection with its own name.
    async fn named_backend(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let _ = s.write_all(name.as_bytes()).await;
            }
        });
        addr
    }

    async fn ask(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn connections_take_turns_and_a_dead_backend_is_skipped() {
        let a = named_backend("a").await;
        let b = named_backend("b").await;
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap(); // closed at once
        let proxy = Proxy::start(vec![a, dead, b]).await.unwrap();
        let mut answers = Vec::new();
        for _ in 0..4 {
            answers.push(ask(proxy.addr()).await);
        }
        assert_eq!(answers, ["a", "b", "a", "b"]);
        assert_eq!(proxy.served(), [2, 0, 2]);
        proxy.stop().await;
    }

    #[tokio::test]
    async fn a_backend_that_accepts_and_closes_without_answering_is_retried_on_the_next() {
        // A port forwarder in front of a dead replica: it accepts, reads the request, closes.
        let forwarder = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = forwarder.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = forwarder.accept().await {
                let mut buf = [0u8; 64];
                let _ = s.read(&mut buf).await;
            }
        });
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let alive = echo.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).await.unwrap();
                let _ = s.write_all(&[b"alive:", &buf[..n]].concat()).await;
            }
        });
        let proxy = Proxy::start(vec![dead, alive]).await.unwrap();
        for _ in 0..2 {
            let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
            s.write_all(b"hello").await.unwrap();
            let mut out = [0u8; 11];
            s.read_exact(&mut out).await.unwrap();
            assert_eq!(&out, b"alive:hello");
        }
        proxy.stop().await;
    }
}
