//! start-kernel: the supervisor of one Jupyter kernel in a kernelbox session container.
//!
//! A port of the Python supervisor to a small static binary (~15 MiB PSS less per session). It is built
//! inside the `supervisor` image by Debian bookworm's `rustc` (1.63): edition 2021, std only, no crates;
//! the few libc calls std lacks are declared in `sys`. One thread, one `poll` loop, no allocation per byte.
//!
//! The image-local descriptor /opt/kernelbox/kernel.json says how to start the kernel: "argv" (a
//! template; "{connection_file}" is replaced), "transport" ("ipc" or "tcp": what the kernel itself can
//! bind), "env" (added to the environment), optional "seed" ({"/writable/dir": "/opt/read-only/dir"}:
//! copied before a start if missing, e.g. a cache built into the image), optional "connects" (true: the
//! kernel connects to the service's sockets itself, see below), plus language / display_name /
//! language_version / interrupt_mode for --describe.
//!
//! The service's connection file (read-only mount, "ip": "/kernel/k") names four unix sockets
//! "<ip>-<port>" (shell, iopub, stdin, control) that the SERVICE listens on. This program never writes
//! under that directory. It
//!   1. writes a private connection file for the kernel under /tmp/kernelbox (same key and signature
//!      scheme; ipc sockets in /tmp/kernelbox for ipc kernels, 127.0.0.1 with free ports for tcp
//!      kernels), starts the kernel and waits until its four sockets accept connections;
//!   2. for each channel, connects OUT to the service's socket (retrying every RETRY, forever, while
//!      the kernel lives: the service may be restarting) and then to the kernel's socket, and relays
//!      bytes both ways. ZMTP is a plain byte stream, so the relay is transparent. Buffers are bounded:
//!      a side is not read while the other side cannot take more.
//!   3. When either side of a relayed connection closes, it closes the other (after passing on what was
//!      already read, for at most FLUSH) and connects again RETRY later (service first, then kernel).
//!
//! A kernel whose descriptor says "connects" (ipykernel through kernelbox's launcher; the transport must
//! be ipc) gets the service's socket prefix in its argv ("{service_ip}", e.g. "/kernel/k") and connects
//! its four channels there itself, as ZeroMQ allows either side to bind: there is nothing to relay, and
//! this program only supervises (signals, restarts, exit status). libzmq reconnects by itself when the
//! service restarts. Kernels that can only bind (Deno, JJava, bash_kernel) are relayed as above.
//!
//! There is no heartbeat relay and no ready file: the service knows the kernel is up when its four
//! connections arrive and kernel_info is answered.
//!
//! The proxy port (issue 22, network by name; see `egress`). The container has no network but `lo`; for a
//! session allowed some domains the service sets HTTP_PROXY=http://127.0.0.1:PORT (and the like) for
//! standard clients, plus KERNELBOX_EGRESS_PORT=PORT and KERNELBOX_EGRESS_SOCKET=/kernel/egress (a unix
//! socket the SERVICE listens on in the read-only run directory). With both set and well-formed, this
//! program binds 127.0.0.1:PORT BEFORE the first kernel starts (so the kernel's code cannot take the port
//! first; if the bind fails it logs and goes on without it), and relays each connection, byte for byte, to
//! a new connection to the socket; the service passes the bytes on to the egress proxy, which enforces the
//! allow-list. It understands nothing of HTTP. Fail closed: when the socket does not accept at once, the
//! client's connection is closed at once. At most 256 are relayed at once; beyond that a connection is
//! accepted and closed. SIGHUP leaves the port and its connections alone: they belong to the session's
//! code, not to one kernel, and those of the old kernel's processes end as those processes are killed
//! (their sockets close); so the port is never unbound, and never free for the new kernel's code to take.
//! SIGTERM closes them first. Without the variables there is no listener.
//!
//! Signals (Docker's --init forwards them to us):
//!   SIGINT   forwarded to the kernel's process group (Jupyter "signal" interrupt)
//!   SIGHUP   restart: close every relayed connection (both sides; the proxy port's stay) FIRST, then TERM
//!            the kernel's process group, KILL it after 2 s, start a fresh kernel with the same key and
//!            relay again once it is ready. The service waits for EOF on the old connections, so it never
//!            mistakes the old kernel for the new one.
//!   SIGTERM  close the connections (the proxy port's too), stop the kernel, exit 0.
//! If the kernel exits on its own, this program exits with the same status (128+N for a death by signal
//! N), so that the container dies with it.
//!
//! Before anything else it seals the sandbox a little further (see `seccomp`): a seccomp filter, stacked
//! on Docker's default profile and inherited by every process of the session, makes ptrace,
//! process_vm_readv, process_vm_writev and pidfd_getfd fail with EPERM, and this process marks itself
//! non-dumpable. If the filter cannot be installed it refuses to start the kernel (exit 3).
//!
//! The modules, one thing each: `main` the command line and the order of the first steps; `descriptor`
//! the image-local descriptor; `seccomp` the filter; `signals` the self-pipe; `supervisor` the poll loop
//! (connecting, restarts, exit); `kernel` the kernel process; `relay` one relayed connection; `egress`
//! the proxy port (its listener, its relays, their poll interest and steps); `net` the sockets; `json` the
//! files' format; `sys` the libc declarations.

mod descriptor;
mod egress;
mod json;
mod kernel;
mod net;
mod relay;
mod seccomp;
mod signals;
mod supervisor;
mod sys;

use std::io::{self, Write};
use std::time::Duration;

use egress::Egress;
use signals::Signals;
use supervisor::Supervisor;

const USAGE: &str = "usage: start-kernel CONNECTION_FILE | --describe | --proxy-only SECONDS

Runs the kernel described by /opt/kernelbox/kernel.json and relays its shell, iopub, stdin and control
channels to the unix sockets \"<ip>-<port>\" the service listens on (named by CONNECTION_FILE), or,
if the descriptor says \"connects\", lets the kernel connect to them itself.
SIGINT interrupts the kernel's process group, SIGHUP restarts the kernel, SIGTERM stops it; when the
kernel exits on its own this program exits with its status (128+N for signal N).
With KERNELBOX_EGRESS_PORT and KERNELBOX_EGRESS_SOCKET set, it also relays 127.0.0.1:PORT to that socket.
--proxy-only SECONDS: that relay alone (no kernel), until SIGTERM or SECONDS have passed.
";

/// Relayed channels (no heartbeat).
const CHANNELS: [&str; 4] = ["shell_port", "iopub_port", "stdin_port", "control_port"];
/// To pass on the last bytes of a closing connection (also after the kernel's exit).
const FLUSH: Duration = Duration::from_secs(1);
/// Between attempts to connect to the service, and after a relay ends.
const RETRY: Duration = Duration::from_millis(100);
/// Read size; each direction holds less than two chunks.
const CHUNK: usize = 64 * 1024;

fn log(msg: &str) {
    let _ = io::stderr().write_all(format!("[start-kernel] {}\n", msg).as_bytes());
}

fn real_main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--proxy-only" {
        return proxy_only(&args[2]);
    }
    if args.len() != 2 || args[1] == "-h" || args[1] == "--help" {
        let _ = io::stderr().write_all(USAGE.as_bytes());
        return 2;
    }
    if args[1] != "--describe" {
        // First of all, before any child exists: everything started later inherits the filter.
        if let Err(e) = seccomp::sandbox() {
            log(&format!("REFUSING TO START: cannot seal the sandbox: {}", e));
            return 3;
        }
        log("seccomp filter installed: ptrace, process_vm_readv/writev and pidfd_getfd refused");
    }
    let desc = match descriptor::load() {
        Ok(d) => d,
        Err(e) => {
            log(&e);
            return 2;
        }
    };
    if args[1] == "--describe" {
        println!("{}", descriptor::describe(&desc));
        return 0;
    }
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            log(&format!("cannot install signal handlers: {}", e));
            return 1;
        }
    };
    // Before the kernel starts, so that its code cannot take the port first.
    let egress = Egress::from_env();
    let mut sup = match Supervisor::new(desc, &args[1], signals, egress) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("bad connection file {}: {}", args[1], e));
            return 2;
        }
    };
    sup.run()
}

/// `--proxy-only SECONDS`: sealed the same way, the proxy port alone (see `egress::serve_alone`).
fn proxy_only(seconds: &str) -> i32 {
    let seconds = match seconds.parse::<u64>() {
        Ok(s) if s > 0 => s,
        _ => {
            let _ = io::stderr().write_all(USAGE.as_bytes());
            return 2;
        }
    };
    if let Err(e) = seccomp::sandbox() {
        log(&format!("REFUSING TO START: cannot seal the sandbox: {}", e));
        return 3;
    }
    match Signals::install() {
        Ok(signals) => egress::serve_alone(&signals, seconds),
        Err(e) => {
            log(&format!("cannot install signal handlers: {}", e));
            1
        }
    }
}

fn main() {
    std::process::exit(real_main());
}
