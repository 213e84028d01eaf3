//! The test's "one address": a round-robin TCP proxy on 127.0.0.1 over the API replicas' published ports,
//! as a load balancer in front of a real cluster would be. A connection goes to the next backend that
//! accepts it (a dead replica is skipped, as a health-checked balancer would); bytes are copied both ways
//! untouched (SSE and WebSocket upgrades included).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long one backend may take to accept before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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
                    let Some(upstream) = connect_next(&b, &s, &next).await else { return };
                    let (mut client, mut upstream) = (client, upstream);
                    tokio::select! {
                        _ = st.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
}
