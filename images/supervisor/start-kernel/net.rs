//! The sockets of both sides: an address (the service's unix sockets; the kernel's unix sockets or
//! loopback TCP ports), a connection to it that never blocks, and free loopback ports for a tcp kernel.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::sys::{close, connect, socket, SockaddrUn, AF_UNIX, O_CLOEXEC, O_NONBLOCK, SOCK_STREAM};
use crate::RETRY;

pub fn free_local_ports(n: usize) -> io::Result<Vec<u16>> {
    // All bound at once, so the n ports differ.
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0")).collect::<Result<_, _>>()?;
    listeners.iter().map(|l| l.local_addr().map(|a| a.port())).collect()
}

/// A unix socket connection made without blocking: a listener whose backlog is full is a failure to
/// retry, never a wait.
fn connect_unix(path: &str) -> io::Result<UnixStream> {
    let mut addr = SockaddrUn { family: AF_UNIX as u16, path: [0; 108] };
    let bytes = path.as_bytes();
    if bytes.len() >= addr.path.len() || bytes.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    addr.path[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: plain socket calls on a descriptor we own; it is closed on failure or owned by the stream.
    unsafe {
        let fd = socket(AF_UNIX, SOCK_STREAM | O_NONBLOCK | O_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let len = (2 + bytes.len() + 1) as u32;
        if connect(fd, &addr, len) != 0 {
            let e = io::Error::last_os_error();
            close(fd);
            return Err(e);
        }
        Ok(UnixStream::from_raw_fd(fd))
    }
}

/// A kernel or service address: a unix socket path or a TCP port on loopback.
#[derive(Clone, Debug)]
pub enum Addr {
    Unix(String),
    Tcp(u16),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "{}", p),
            Addr::Tcp(port) => write!(f, "{}", port),
        }
    }
}

pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Addr {
    pub fn open(&self) -> io::Result<Stream> {
        match self {
            Addr::Unix(path) => connect_unix(path).map(Stream::Unix),
            Addr::Tcp(port) => {
                let s = TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], *port)), RETRY)?;
                s.set_nonblocking(true)?;
                s.set_nodelay(true)?;
                Ok(Stream::Tcp(s))
            }
        }
    }
}

impl Stream {
    pub fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
    pub fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
}
