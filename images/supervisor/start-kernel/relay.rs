//! One relayed connection: the bytes between the service's side and the kernel's, both ways, with
//! bounded buffers (a side is not read while the other cannot take more), and its closing (what was
//! already read is passed on for at most FLUSH). It knows nothing of retries or of the kernel process.

use std::io;
use std::os::unix::io::RawFd;
use std::time::Instant;

use crate::net::Stream;
use crate::sys::{POLLERR, POLLHUP, POLLIN, POLLOUT};
use crate::{CHUNK, FLUSH};

/// One direction's bytes in flight: `buf[start..]`, less than two chunks (reads go through one shared
/// scratch chunk; an empty pipe holds no memory).
struct Pipe {
    buf: Vec<u8>,
    start: usize,
}

impl Pipe {
    fn new() -> Pipe {
        Pipe { buf: Vec::new(), start: 0 }
    }
    fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
    fn wants_input(&self) -> bool {
        self.pending() < CHUNK
    }
    /// Reads once from `from` (through `scratch`): Ok(false) at EOF.
    fn fill(&mut self, from: &mut Stream, scratch: &mut [u8]) -> io::Result<bool> {
        let n = from.read(scratch)?;
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(&scratch[..n]);
        Ok(n > 0)
    }
    /// Writes what it can to `to`.
    fn drain(&mut self, to: &mut Stream) -> io::Result<()> {
        while self.pending() > 0 {
            match to.write(&self.buf[self.start..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Nothing in flight: an idle relay holds no buffer.
        self.buf = Vec::new();
        self.start = 0;
        Ok(())
    }
}

/// A relayed connection: the service's side and the kernel's.
pub struct Relay {
    service: Stream,
    kernel: Stream,
    to_kernel: Pipe,
    to_service: Pipe,
    /// Set when a side closed or failed: what was read is passed on until then, and both close.
    closing: Option<Instant>,
}

fn is_transient(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

impl Relay {
    pub fn new(service: Stream, kernel: Stream) -> Relay {
        Relay { service, kernel, to_kernel: Pipe::new(), to_service: Pipe::new(), closing: None }
    }

    /// When the relay ends at the latest, once it is closing.
    pub fn closing(&self) -> Option<Instant> {
        self.closing
    }

    /// What to poll for: the service's side, then the kernel's.
    pub fn interest(&self) -> [(RawFd, i16); 2] {
        let mut s = 0;
        let mut k = 0;
        if self.closing.is_none() {
            if self.to_kernel.wants_input() {
                s |= POLLIN;
            }
            if self.to_service.wants_input() {
                k |= POLLIN;
            }
        }
        if self.to_service.pending() > 0 {
            s |= POLLOUT;
        }
        if self.to_kernel.pending() > 0 {
            k |= POLLOUT;
        }
        // Poll reports a hang-up even for no events: a side with nothing to do is left out (-1).
        let fd = |stream: &Stream, events: i16| if events == 0 && self.closing.is_some() { -1 } else { stream.fd() };
        [(fd(&self.service, s), s), (fd(&self.kernel, k), k)]
    }

    fn close_soon(&mut self, now: Instant) {
        if self.closing.is_none() {
            self.closing = Some(now + FLUSH);
        }
    }

    /// One round of I/O after poll (`service`, `kernel`: the sides' revents); false once the relay is over.
    pub fn step(&mut self, service: i16, kernel: i16, scratch: &mut [u8], now: Instant) -> bool {
        const ANY: i16 = POLLIN | POLLOUT | POLLERR | POLLHUP;
        if self.closing.is_none() {
            for (revents, from, pipe) in
                [(service, &mut self.service, &mut self.to_kernel), (kernel, &mut self.kernel, &mut self.to_service)]
            {
                if revents & ANY == 0 {
                    continue;
                }
                if !pipe.wants_input() {
                    // A side that hung up while the other cannot take more would wake poll forever.
                    if revents & (POLLHUP | POLLERR) != 0 {
                        self.closing = Some(now + FLUSH);
                    }
                    continue;
                }
                match pipe.fill(from, scratch) {
                    Ok(true) => {}
                    Err(e) if is_transient(&e) => {}
                    Ok(false) | Err(_) => self.closing = Some(self.closing.unwrap_or(now + FLUSH)),
                }
            }
        }
        if self.to_kernel.drain(&mut self.kernel).is_err() {
            self.to_kernel = Pipe::new();
            self.close_soon(now);
        }
        if self.to_service.drain(&mut self.service).is_err() {
            self.to_service = Pipe::new();
            self.close_soon(now);
        }
        match self.closing {
            None => true,
            Some(deadline) => now < deadline && (self.to_kernel.pending() > 0 || self.to_service.pending() > 0),
        }
    }
}
