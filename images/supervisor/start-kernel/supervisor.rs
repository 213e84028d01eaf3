//! The supervisor's loop: one thread, one `poll` over the signal pipe and every relay. It connects each
//! channel (service first, then kernel; retrying while the kernel lives), turns signals into an
//! interrupt, a restart or a stop, and ends with the kernel's own exit status. The proxy port (`egress`),
//! if any, is served in every wait, also while a kernel starts or stops; a restart leaves it alone, a stop
//! closes it first.

use std::time::{Duration, Instant};

use crate::egress::Egress;
use crate::json::{parse_json, Json};
use crate::kernel::Kernel;
use crate::log;
use crate::net::Addr;
use crate::relay::Relay;
use crate::signals::Signals;
use crate::sys::{c_int, c_ulong, poll, PollFd, POLLIN, SIGHUP, SIGINT, SIGTERM};
use crate::{CHANNELS, CHUNK, FLUSH, RETRY};

/// Between TERM and KILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// Between probes of the kernel's sockets while it starts.
const POLL: Duration = Duration::from_millis(10);

enum Channel {
    /// Not relaying: connects (service first) at `retry_at`; `warned` once the service refused.
    Idle {
        retry_at: Instant,
        warned: bool,
    },
    Relaying(Box<Relay>),
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Cmd {
    Restart,
    Stop,
}

pub struct Supervisor {
    /// The service's four sockets, "<ip>-<port>".
    service: Vec<Addr>,
    kernel: Kernel,
    signals: Signals,
    /// Set by a signal: what to do with the running kernel.
    cmd: Option<Cmd>,
    /// The proxy port and its relays, if the service asked for one; bound before the first kernel starts.
    egress: Option<Egress>,
    /// Every read goes through this one chunk.
    scratch: Vec<u8>,
}

impl Supervisor {
    pub fn new(desc: Json, conn_file: &str, signals: Signals, egress: Option<Egress>) -> Result<Supervisor, String> {
        let text = std::fs::read_to_string(conn_file).map_err(|e| e.to_string())?;
        let conn = parse_json(&text)?;
        let ip = conn.get("ip").and_then(Json::as_str).ok_or("no \"ip\"")?.to_owned();
        let mut service = Vec::new();
        for key in CHANNELS.iter() {
            let port = conn.get(key).and_then(Json::as_port).ok_or_else(|| format!("no {:?}", key))?;
            service.push(Addr::Unix(format!("{}-{}", ip, port)));
        }
        let kernel = Kernel::new(desc, conn);
        Ok(Supervisor { service, kernel, signals, cmd: None, egress, scratch: vec![0; CHUNK] })
    }

    /// Reads the self-pipe: SIGINT is forwarded at once, SIGHUP/SIGTERM become a command.
    fn handle_signals(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            let received = self.signals.received(&mut buf);
            if received.is_empty() {
                break;
            }
            for sig in received {
                match *sig as c_int {
                    SIGINT => {
                        self.kernel.reap();
                        self.kernel.signal_group(SIGINT);
                    }
                    SIGTERM => self.cmd = Some(Cmd::Stop),
                    SIGHUP => self.cmd = Some(self.cmd.unwrap_or(Cmd::Restart)),
                    _ => {} // SIGCHLD: only a wake-up
                }
            }
        }
        self.kernel.reap();
    }

    /// Waits for a signal (or anything else among `fds`) for at most `timeout`; returns the poll results.
    /// The proxy port's connections are polled and served here too, whatever the caller waits for.
    fn wait(&mut self, fds: &mut Vec<PollFd>, timeout: Duration) {
        let theirs = fds.len();
        fds.insert(0, PollFd { fd: self.signals.fd(), events: POLLIN, revents: 0 });
        let mut timeout = timeout;
        if let Some(egress) = &self.egress {
            if let Some(deadline) = egress.interest(fds) {
                // Rounded up, as in `serve`.
                let due = deadline.saturating_duration_since(Instant::now()) + Duration::from_micros(999);
                timeout = timeout.min(due);
            }
        }
        let ms = timeout.as_millis().min(1000) as c_int;
        // SAFETY: poll over a live slice of pollfd structures.
        unsafe {
            poll(fds.as_mut_ptr(), fds.len() as c_ulong, ms.max(0));
        }
        fds.remove(0);
        if let Some(egress) = self.egress.as_mut() {
            egress.step(&fds[theirs..], &mut self.scratch, Instant::now());
        }
        fds.truncate(theirs);
        self.handle_signals();
    }

    /// TERM the kernel's group, KILL after KILL_GRACE, and reap it.
    fn stop_kernel(&mut self) {
        self.kernel.reap();
        if self.kernel.alive() {
            self.kernel.signal_group(SIGTERM);
            let deadline = Instant::now() + KILL_GRACE;
            loop {
                let now = Instant::now();
                if !self.kernel.alive() || now >= deadline {
                    break;
                }
                self.wait(&mut Vec::new(), deadline - now);
            }
            if self.kernel.alive() {
                log(&format!("kernel ignored SIGTERM for {} s, killing it", KILL_GRACE.as_secs()));
            }
        }
        self.kernel.kill();
    }

    fn log_connecting(&self, started: Instant) {
        let names: Vec<String> = self.service.iter().map(|a| a.to_string()).collect();
        log(&format!("kernel ready ({:.2} s); connecting to {}", started.elapsed().as_secs_f64(), names.join(", ")));
    }

    /// One kernel's lifetime: relays until a command or the kernel's exit. Returns the relays still open.
    /// A kernel that connects to the service itself has nothing to relay: this only waits.
    fn serve(&mut self) -> Vec<Channel> {
        let started = Instant::now();
        let relayed = if self.kernel.connects() { 0 } else { CHANNELS.len() };
        if relayed == 0 {
            log("the kernel connects to the service's sockets itself: nothing to relay");
        }
        let mut channels: Vec<Channel> =
            (0..relayed).map(|_| Channel::Idle { retry_at: started, warned: false }).collect();
        let mut probed = 0; // how many of the kernel's sockets have accepted a connection
        let mut next_probe = started;
        let mut drain_until: Option<Instant> = None; // after the kernel's exit: FLUSH for the last bytes
        loop {
            let now = Instant::now();
            if self.cmd.is_some() {
                return channels;
            }
            if !self.kernel.alive() {
                let until = *drain_until.get_or_insert(now + FLUSH);
                let relaying = channels.iter().any(|c| matches!(c, Channel::Relaying(_)));
                if !relaying || now >= until {
                    return channels;
                }
            }
            let kernel = self.kernel.addrs();
            // Connect what is due while the kernel lives.
            if self.kernel.alive() && probed < kernel.len() && now >= next_probe {
                while probed < kernel.len() && kernel[probed].open().is_ok() {
                    probed += 1;
                }
                if probed == kernel.len() {
                    self.log_connecting(started);
                } else {
                    next_probe = Instant::now() + POLL;
                }
            }
            if self.kernel.alive() && probed == kernel.len() {
                for (i, ch) in channels.iter_mut().enumerate() {
                    if let Channel::Idle { retry_at, warned } = ch {
                        if Instant::now() < *retry_at {
                            continue;
                        }
                        let service = match self.service[i].open() {
                            Ok(s) => s,
                            Err(e) => {
                                if !*warned {
                                    log(&format!(
                                        "{}: cannot connect ({}); retrying every {:.2} s",
                                        self.service[i],
                                        e,
                                        RETRY.as_secs_f64()
                                    ));
                                    *warned = true;
                                }
                                *retry_at = Instant::now() + RETRY;
                                continue;
                            }
                        };
                        match kernel[i].open() {
                            Ok(stream) => {
                                log(&format!("{}: connected", self.service[i]));
                                *ch = Channel::Relaying(Box::new(Relay::new(service, stream)));
                            }
                            Err(e) => {
                                // The kernel is dying; the loop will notice.
                                log(&format!("{}: kernel socket {}: {}", self.service[i], kernel[i], e));
                                *retry_at = Instant::now() + RETRY;
                            }
                        }
                    }
                }
            }
            // Wait for I/O, a signal or the next deadline.
            let now = Instant::now();
            let mut deadline = now + Duration::from_secs(1);
            if self.kernel.alive() && probed < kernel.len() {
                deadline = deadline.min(next_probe);
            }
            let mut fds = Vec::new();
            for ch in &channels {
                match ch {
                    Channel::Idle { retry_at, .. } if self.kernel.alive() && probed == kernel.len() => {
                        deadline = deadline.min(*retry_at)
                    }
                    Channel::Idle { .. } => {}
                    Channel::Relaying(r) => {
                        for (fd, events) in r.interest().iter() {
                            fds.push(PollFd { fd: *fd, events: *events, revents: 0 });
                        }
                        if let Some(c) = r.closing() {
                            deadline = deadline.min(c);
                        }
                    }
                }
            }
            if let Some(until) = drain_until {
                deadline = deadline.min(until);
            }
            let timeout = deadline.saturating_duration_since(now);
            // Rounded up, so that a deadline 0.4 ms away is not a busy loop.
            self.wait(&mut fds, timeout + Duration::from_micros(999));
            let now = Instant::now();
            let mut polled = fds.iter();
            for (i, ch) in channels.iter_mut().enumerate() {
                if let Channel::Relaying(r) = ch {
                    let s = polled.next().map(|p| p.revents).unwrap_or(0);
                    let k = polled.next().map(|p| p.revents).unwrap_or(0);
                    let open = if s != 0 || k != 0 || r.closing().is_some() {
                        r.step(s, k, &mut self.scratch, now)
                    } else {
                        true
                    };
                    if !open {
                        log(&format!("{}: closed", self.service[i]));
                        // A short pause before reconnecting also lets the kernel drop the old connection
                        // first (a ZMQ ROUTER ignores a second peer with the same identity while the first
                        // is still attached).
                        *ch = Channel::Idle { retry_at: now + RETRY, warned: false };
                    }
                }
            }
        }
    }

    pub fn run(&mut self) -> i32 {
        loop {
            if let Err(e) = self.kernel.spawn() {
                log(&e);
                return 1;
            }
            let channels = self.serve();
            // Every relayed connection goes first, before the kernel stops.
            drop(channels);
            let cmd = match self.cmd.take() {
                Some(cmd) => cmd,
                None => {
                    let rc = self.kernel.exit_code().expect("serve returns on a command or the kernel's exit");
                    log(&format!("kernel exited on its own with status {}", rc));
                    self.kernel.kill();
                    return rc;
                }
            };
            let word = if cmd == Cmd::Stop { "stop" } else { "restart" };
            if cmd == Cmd::Stop {
                // The proxy's connections go first too. A restart keeps them: see `main`.
                self.egress = None;
            }
            log(&format!("{}: stopping kernel pid {}", word, self.kernel.pid()));
            self.stop_kernel();
            if cmd == Cmd::Stop {
                return 0;
            }
        }
    }
}
