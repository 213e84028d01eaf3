//! The session's proxy port (issue 22): a TCP listener on 127.0.0.1:KERNELBOX_EGRESS_PORT whose
//! connections are relayed, byte for byte, to the unix socket KERNELBOX_EGRESS_SOCKET the service listens
//! on (one connection to it per accepted one), and the set of those relays, their poll interest and their
//! steps. It understands nothing of HTTP: the service passes the bytes on to the egress proxy, which
//! enforces the allow-list. It never touches the kernel's relays, and the kernel's restarts leave it alone.
//!
//! Fail closed: when the service's socket does not accept at once (absent, restarting, backlog full), the
//! TCP connection is closed at once. The kernel's code runs as the same user and may connect as often as
//! it likes: at most MAX_RELAYS are relayed at once (each holds two descriptors and, only while bytes are
//! in flight, less than four chunks); beyond that a connection is accepted and closed at once, so that the
//! backlog does not fill with connections nobody will serve.

use std::io;
use std::net::TcpListener;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

use crate::log;
use crate::net::{Addr, Stream};
use crate::relay::Relay;
use crate::sys::{PollFd, POLLIN};
use crate::RETRY;

/// Relayed proxy connections at once: 2 descriptors each, and < 4 chunks each while busy (< 64 MiB for all
/// at worst, counted in the session's own memory limit; none when idle).
const MAX_RELAYS: usize = 256;
/// Accepted per wake-up, so that a flood of connections cannot starve the kernel's relays (the listener
/// stays readable, and the next poll returns at once).
const ACCEPT_BATCH: usize = 64;
/// The longest unix socket path (sun_path holds 108 bytes with its NUL).
const MAX_PATH: usize = 107;

/// The proxy port's configuration from the two variables: None when neither is set; an error (to log)
/// when only one is, or either is malformed.
fn parse_config(socket: Option<&str>, port: Option<&str>) -> Result<Option<(String, u16)>, String> {
    let (socket, port) = match (socket, port) {
        (None, None) => return Ok(None),
        (Some(s), Some(p)) => (s, p),
        _ => return Err("KERNELBOX_EGRESS_SOCKET and KERNELBOX_EGRESS_PORT go together; one is missing".into()),
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => return Err(format!("KERNELBOX_EGRESS_PORT {:?} is not a port (1..65535)", port)),
    };
    if !socket.starts_with('/') || socket.len() > MAX_PATH || socket.contains('\0') {
        return Err(format!(
            "KERNELBOX_EGRESS_SOCKET {:?} is not an absolute path of at most {} bytes",
            socket, MAX_PATH
        ));
    }
    Ok(Some((socket.to_owned(), port)))
}

pub struct Egress {
    /// 127.0.0.1:port, non-blocking; bound before the kernel starts, so that its code cannot take the port
    /// first, and kept for the whole life of this process (across restarts). std sets CLOEXEC: the kernel
    /// does not inherit it.
    listener: TcpListener,
    /// The service's socket, connected to once per accepted connection.
    socket: Addr,
    /// The relayed connections: the service's side (unix), then the client's (TCP).
    relays: Vec<Relay>,
    /// Not polled until then, after accept failed for a reason other than "none waiting" (e.g. out of
    /// descriptors: the listener would stay readable and poll would spin).
    paused_until: Option<Instant>,
    /// Logged once that the service's socket refused, until it accepts again (the kernel's code may
    /// connect in a loop).
    warned_refused: bool,
    /// Logged once that MAX_RELAYS are open, until fewer are.
    warned_full: bool,
}

impl Egress {
    /// Binds the proxy port if the service asked for it; None (and a log line) if not, or if the
    /// variables are malformed or the port cannot be bound: the kernel starts anyway, without it.
    pub fn from_env() -> Option<Egress> {
        let var = |name: &str| std::env::var(name).ok();
        let (socket, port) =
            match parse_config(var("KERNELBOX_EGRESS_SOCKET").as_deref(), var("KERNELBOX_EGRESS_PORT").as_deref()) {
                Ok(Some(config)) => config,
                Ok(None) => return None,
                Err(e) => {
                    log(&format!("egress: {}; no proxy port", e));
                    return None;
                }
            };
        let listener = match TcpListener::bind(("127.0.0.1", port)).and_then(|l| l.set_nonblocking(true).map(|_| l)) {
            Ok(l) => l,
            Err(e) => {
                log(&format!("egress: cannot listen on 127.0.0.1:{} ({}); no proxy port", port, e));
                return None;
            }
        };
        log(&format!("egress: relaying 127.0.0.1:{} to {}", port, socket));
        Some(Egress {
            listener,
            socket: Addr::Unix(socket),
            relays: Vec::new(),
            paused_until: None,
            warned_refused: false,
            warned_full: false,
        })
    }

    /// Appends what to poll for (the listener, then two per relay, in `step`'s order); returns the next
    /// deadline (a closing relay's end, the end of a pause), if any.
    pub fn interest(&self, fds: &mut Vec<PollFd>) -> Option<Instant> {
        let mut deadline = self.paused_until;
        let fd = if self.paused_until.is_some() { -1 } else { self.listener.as_raw_fd() };
        fds.push(PollFd { fd, events: POLLIN, revents: 0 });
        for r in &self.relays {
            for (fd, events) in r.interest().iter() {
                fds.push(PollFd { fd: *fd, events: *events, revents: 0 });
            }
            if let Some(c) = r.closing() {
                deadline = Some(deadline.map_or(c, |d| d.min(c)));
            }
        }
        deadline
    }

    /// One round after poll: `polled` is what `interest` appended, with its revents. Steps the relays
    /// (dropping those that ended), then accepts what is waiting.
    pub fn step(&mut self, polled: &[PollFd], scratch: &mut [u8], now: Instant) {
        let mut revents = polled.iter().map(|p| p.revents);
        let listener = revents.next().unwrap_or(0);
        self.relays.retain_mut(|r| {
            let s = revents.next().unwrap_or(0);
            let c = revents.next().unwrap_or(0);
            if s == 0 && c == 0 && r.closing().is_none() {
                return true; // nothing happened
            }
            r.step(s, c, scratch, now)
        });
        if self.relays.len() < MAX_RELAYS {
            self.warned_full = false;
        }
        if let Some(until) = self.paused_until {
            if now < until {
                return;
            }
            self.paused_until = None;
        }
        if listener != 0 {
            self.accept(now);
        }
    }

    /// Accepts up to ACCEPT_BATCH waiting connections: each is relayed, or closed at once when the
    /// service's socket refuses or MAX_RELAYS are open.
    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPT_BATCH {
            let client = match self.listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted) => continue,
                Err(e) => {
                    log(&format!("egress: accept: {}; pausing the proxy port for {:.2} s", e, RETRY.as_secs_f64()));
                    self.paused_until = Some(now + RETRY);
                    return;
                }
            };
            if self.relays.len() >= MAX_RELAYS {
                if !self.warned_full {
                    log(&format!("egress: {} proxy connections open; closing new ones", MAX_RELAYS));
                    self.warned_full = true;
                }
                continue; // dropped: closed
            }
            // An accepted socket does not inherit O_NONBLOCK on Linux.
            if client.set_nonblocking(true).is_err() {
                continue;
            }
            let _ = client.set_nodelay(true);
            match self.socket.open() {
                Ok(service) => {
                    if self.warned_refused {
                        log(&format!("egress: {} accepts again", self.socket));
                        self.warned_refused = false;
                    }
                    self.relays.push(Relay::new(service, Stream::Tcp(client)));
                }
                Err(e) => {
                    // Fail closed: the client sees its connection closed, never a wait.
                    if !self.warned_refused {
                        log(&format!("egress: {}: cannot connect ({}); closing proxy connections", self.socket, e));
                        self.warned_refused = true;
                    }
                }
            }
        }
    }
}

/// `start-kernel --proxy-only SECONDS`: the proxy port and nothing else, for a container that runs no kernel
/// (a package fetcher, whose commands the service runs through Docker's exec API with the proxy
/// variables). Serves until SIGTERM or SECONDS have passed; 0 then, 2 when the variables are missing.
pub fn serve_alone(signals: &crate::signals::Signals, seconds: u64) -> i32 {
    let mut egress = match Egress::from_env() {
        Some(e) => e,
        None => {
            log("--proxy-only: no proxy port (KERNELBOX_EGRESS_SOCKET and KERNELBOX_EGRESS_PORT)");
            return 2;
        }
    };
    let end = Instant::now() + std::time::Duration::from_secs(seconds);
    let mut scratch = vec![0u8; crate::CHUNK];
    let mut sigbuf = [0u8; 32];
    loop {
        let now = Instant::now();
        if now >= end {
            return 0;
        }
        let mut fds = vec![PollFd { fd: signals.fd(), events: POLLIN, revents: 0 }];
        let mut due = end;
        if let Some(d) = egress.interest(&mut fds) {
            due = due.min(d);
        }
        let ms = (due.saturating_duration_since(now).as_millis() + 1).min(1000) as crate::sys::c_int;
        // SAFETY: poll over a live slice of pollfd structures.
        unsafe {
            crate::sys::poll(fds.as_mut_ptr(), fds.len() as crate::sys::c_ulong, ms);
        }
        if signals.received(&mut sigbuf).contains(&(crate::sys::SIGTERM as u8)) {
            return 0;
        }
        egress.step(&fds[1..], &mut scratch, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_port_needs_both_variables_well_formed() {
        assert_eq!(parse_config(None, None), Ok(None));
        assert_eq!(parse_config(Some("/kernel/egress"), Some("3128")), Ok(Some(("/kernel/egress".into(), 3128))));
        assert_eq!(parse_config(Some("/e"), Some("65535")), Ok(Some(("/e".into(), 65535))));
        for (socket, port) in [
            (Some("/kernel/egress"), None),
            (None, Some("3128")),
            (Some("/kernel/egress"), Some("0")),
            (Some("/kernel/egress"), Some("65536")),
            (Some("/kernel/egress"), Some("-1")),
            (Some("/kernel/egress"), Some("")),
            (Some("/kernel/egress"), Some(" 3128")),
            (Some("kernel/egress"), Some("3128")),
            (Some(""), Some("3128")),
        ] {
            assert!(parse_config(socket, port).is_err(), "{:?} {:?}", socket, port);
        }
        let longest = format!("/{}", "a".repeat(MAX_PATH - 1));
        assert!(parse_config(Some(&longest), Some("3128")).is_ok());
        assert!(parse_config(Some(&format!("{}a", longest)), Some("3128")).is_err());
    }
}