//! The bytes of an allowed connection, both ways, unchanged, until both sides are done, or no byte moved
//! either way for the idle timeout, or the connection moved its byte cap (both ways together). One task,
//! two small buffers; dropping the future stops it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Each way's buffer.
const BUFFER: usize = 16 * 1024;

/// A connection's bounds.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// No byte either way for this long ends it.
    pub idle: Duration,
    /// The most bytes both ways together, those already moved (the request head, the ClientHello) included.
    pub max_bytes: u64,
}

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed (or one failed).
    Closed,
    /// No byte moved for the idle timeout.
    Idle,
    /// The byte cap was reached.
    ByteLimit,
}

/// Why one way stopped early.
enum Stop {
    ByteLimit,
    Failed,
}

/// Relays until the end; `already` bytes count toward the cap.
pub async fn relay(client: &mut TcpStream, upstream: &mut TcpStream, limits: Limits, already: u64) -> End {
    if already > limits.max_bytes {
        return End::ByteLimit;
    }
    let start = Instant::now();
    let moved = AtomicU64::new(already);
    // Milliseconds from `start` to the last byte moved.
    let last = AtomicU64::new(0);
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let counters = Counters { start, moved: &moved, last: &last, max: limits.max_bytes };
    let both = async {
        tokio::try_join!(pump(client_read, upstream_write, &counters), pump(upstream_read, client_write, &counters))
    };
    let idle = async {
        loop {
            let deadline = start + Duration::from_millis(last.load(Ordering::Relaxed)) + limits.idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    };
    tokio::select! {
        ended = both => match ended {
            Ok(_) | Err(Stop::Failed) => End::Closed,
            Err(Stop::ByteLimit) => End::ByteLimit,
        },
        () = idle => End::Idle,
    }
}

/// What both ways share.
struct Counters<'a> {
    start: Instant,
    moved: &'a AtomicU64,
    last: &'a AtomicU64,
    max: u64,
}

impl Counters<'_> {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One way: reads and writes until the reader is done (then half-closes the writer).
async fn pump<R, W>(mut from: R, mut to: W, counters: &Counters<'_>) -> Result<(), Stop>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buffer).await.map_err(|_| Stop::Failed)?;
        if n == 0 {
            let _ = to.shutdown().await;
            return Ok(());
        }
        counters.touch();
        let before = counters.moved.fetch_add(n as u64, Ordering::Relaxed);
        if before + n as u64 > counters.max {
            return Err(Stop::ByteLimit);
        }
        to.write_all(&buffer[..n]).await.map_err(|_| Stop::Failed)?;
        counters.touch();
    }
}
