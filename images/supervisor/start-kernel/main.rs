//! start-kernel: the supervisor of one Jupyter kernel in a kernelbox session container.
//!
//! A port of the Python supervisor to a small static binary (~15 MiB PSS less per session). It is built
//! inside the `supervisor` image by Debian bookworm's `rustc` (1.63): edition 2021, std only, no crates;
//! the few libc calls std lacks are declared below. One thread, one `poll` loop, no allocation per byte.
//!
//! The image-local descriptor /opt/kernelbox/kernel.json says how to start the kernel: "argv" (a
//! template; "{connection_file}" is replaced), "transport" ("ipc" or "tcp": what the kernel itself can
//! bind), "env" (added to the environment), optional "seed" ({"/writable/dir": "/opt/read-only/dir"}:
//! copied before a start if missing, e.g. a cache built into the image), plus language / display_name /
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
//! There is no heartbeat relay and no ready file: the service knows the kernel is up when its four
//! connections arrive and kernel_info is answered.
//!
//! Signals (Docker's --init forwards them to us):
//!   SIGINT   forwarded to the kernel's process group (Jupyter "signal" interrupt)
//!   SIGHUP   restart: close every relayed connection (both sides) FIRST, then TERM the kernel's process
//!            group, KILL it after 2 s, start a fresh kernel with the same key and relay again once it
//!            is ready. The service waits for EOF on the old connections, so it never mistakes the old
//!            kernel for the new one.
//!   SIGTERM  close the connections, stop the kernel, exit 0.
//! If the kernel exits on its own, this program exits with the same status (128+N for a death by signal
//! N), so that the container dies with it.
//!
//! Before anything else it seals the sandbox a little further (see `sandbox`): a seccomp filter, stacked
//! on Docker's default profile and inherited by every process of the session, makes ptrace,
//! process_vm_readv, process_vm_writev and pidfd_getfd fail with EPERM, and this process marks itself
//! non-dumpable. If the filter cannot be installed it refuses to start the kernel (exit 3).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: start-kernel CONNECTION_FILE | --describe

Runs the kernel described by /opt/kernelbox/kernel.json and relays its shell, iopub, stdin and control
channels to the unix sockets \"<ip>-<port>\" the service listens on (named by CONNECTION_FILE).
SIGINT interrupts the kernel's process group, SIGHUP restarts the kernel, SIGTERM stops it; when the
kernel exits on its own this program exits with its status (128+N for signal N).
";

const DEFAULT_DESCRIPTOR: &str = "/opt/kernelbox/kernel.json";
/// Where the kernel's private connection file (and its ipc sockets) go; `KERNELBOX_PRIVATE_DIR` (for tests
/// on a host) overrides it.
const DEFAULT_PRIVATE_DIR: &str = "/tmp/kernelbox";
/// Relayed channels (no heartbeat); the kernel binds all five ports.
const CHANNELS: [&str; 4] = ["shell_port", "iopub_port", "stdin_port", "control_port"];
const PORT_KEYS: [&str; 5] = ["shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"];
const DESCRIBE_KEYS: [&str; 5] = ["language", "display_name", "language_version", "transport", "interrupt_mode"];
/// Between TERM and KILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// To pass on the last bytes of a closing connection (also after the kernel's exit).
const FLUSH: Duration = Duration::from_secs(1);
/// Between probes of the kernel's sockets while it starts.
const POLL: Duration = Duration::from_millis(10);
/// Between attempts to connect to the service, and after a relay ends.
const RETRY: Duration = Duration::from_millis(100);
/// Read size; each direction holds less than two chunks.
const CHUNK: usize = 64 * 1024;

// --- libc -------------------------------------------------------------------------------------------

#[allow(non_camel_case_types)]
type c_int = i32;
#[allow(non_camel_case_types)]
type c_ulong = u64;

#[repr(C)]
struct PollFd {
    fd: c_int,
    events: i16,
    revents: i16,
}

#[repr(C)]
struct SockaddrUn {
    family: u16,
    path: [u8; 108],
}

#[repr(C)]
struct SockFilter {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

#[repr(C)]
struct SockFprog {
    len: u16,
    filter: *const SockFilter,
}

extern "C" {
    fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
    fn signal(sig: c_int, handler: usize) -> usize;
    fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    fn read(fd: c_int, buf: *mut u8, n: usize) -> isize;
    fn write(fd: c_int, buf: *const u8, n: usize) -> isize;
    fn kill(pid: c_int, sig: c_int) -> c_int;
    fn setsid() -> c_int;
    fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    fn connect(fd: c_int, addr: *const SockaddrUn, len: u32) -> c_int;
    fn close(fd: c_int) -> c_int;
    fn prctl(option: c_int, arg2: c_ulong, arg3: c_ulong, arg4: c_ulong, arg5: c_ulong) -> c_int;
}

const SIGHUP: c_int = 1;
const SIGINT: c_int = 2;
const SIGKILL: c_int = 9;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const POLLIN: i16 = 0x1;
const POLLOUT: i16 = 0x4;
const POLLERR: i16 = 0x8;
const POLLHUP: i16 = 0x10;
const O_NONBLOCK: c_int = 0o4000;
const O_CLOEXEC: c_int = 0o2000000;
const AF_UNIX: c_int = 1;
const SOCK_STREAM: c_int = 1;

// --- the seccomp filter ------------------------------------------------------------------------------

/// Offsets of `nr` and `arch` in `struct seccomp_data`.
const SECCOMP_NR: u32 = 0;
const SECCOMP_ARCH: u32 = 4;
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_JGE_K: u16 = 0x35;
const BPF_RET_K: u16 = 0x06;
const RET_ALLOW: u32 = 0x7FFF_0000;
/// SECCOMP_RET_ERRNO | EPERM.
const RET_EPERM: u32 = 0x0005_0000 | 1;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
/// Per audit architecture: ptrace, process_vm_readv, process_vm_writev, pidfd_getfd. Each native
/// architecture comes with its 32-bit compat one (int 0x80 on x86_64, AArch32 on arm64), which Docker's
/// profile allows too.
const DENIED: [(u32, [u32; 4]); 4] = [
    (AUDIT_ARCH_X86_64, [101, 310, 311, 438]), // x32 calls: all refused
    (0x4000_0003, [26, 347, 348, 438]),        // AUDIT_ARCH_I386
    (0xC000_00B7, [117, 270, 271, 438]),       // AUDIT_ARCH_AARCH64
    (0x4000_0028, [26, 376, 377, 438]),        // AUDIT_ARCH_ARM
];
const PR_SET_DUMPABLE: c_int = 4;
const PR_SET_SECCOMP: c_int = 22;
const PR_SET_NO_NEW_PRIVS: c_int = 38;
const SECCOMP_MODE_FILTER: c_ulong = 2;

fn ins(code: u16, jt: u8, jf: u8, k: u32) -> SockFilter {
    SockFilter { code, jt, jf, k }
}

/// The classic BPF program: per known architecture, EPERM for its denied calls; any other architecture,
/// EPERM for every call (fail closed: its numbers mean something else).
fn seccomp_program() -> Vec<SockFilter> {
    let mut prog = Vec::new();
    for (arch, denied) in DENIED.iter() {
        let mut checks: Vec<(u16, u32)> = Vec::new();
        if *arch == AUDIT_ARCH_X86_64 {
            checks.push((BPF_JGE_K, X32_SYSCALL_BIT));
        }
        checks.extend(denied.iter().map(|n| (BPF_JEQ_K, *n)));
        let mut block = vec![ins(BPF_LD_W_ABS, 0, 0, SECCOMP_NR)];
        for (i, (code, k)) in checks.iter().enumerate() {
            block.push(ins(*code, (checks.len() - i) as u8, 0, *k)); // jump to the block's EPERM
        }
        block.push(ins(BPF_RET_K, 0, 0, RET_ALLOW));
        block.push(ins(BPF_RET_K, 0, 0, RET_EPERM));
        prog.push(ins(BPF_LD_W_ABS, 0, 0, SECCOMP_ARCH));
        prog.push(ins(BPF_JEQ_K, 0, block.len() as u8, *arch)); // not this architecture: skip its block
        prog.extend(block);
    }
    prog.push(ins(BPF_RET_K, 0, 0, RET_EPERM));
    prog
}

/// Installs the filter and drops dumpability; an error message if it cannot.
fn sandbox() -> Result<(), String> {
    if !cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
        return Err(format!("unknown architecture {:?}: no seccomp filter for it", std::env::consts::ARCH));
    }
    let prog = seccomp_program();
    let fprog = SockFprog { len: prog.len() as u16, filter: prog.as_ptr() };
    let steps: [(&str, c_int, c_ulong, c_ulong); 3] = [
        ("PR_SET_NO_NEW_PRIVS", PR_SET_NO_NEW_PRIVS, 1, 0),
        ("PR_SET_SECCOMP", PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fprog as *const SockFprog as c_ulong),
        ("PR_SET_DUMPABLE", PR_SET_DUMPABLE, 0, 0),
    ];
    for (name, option, arg, ptr) in steps.iter() {
        // SAFETY: prctl with integer arguments and, for PR_SET_SECCOMP, a pointer to a live sock_fprog.
        if unsafe { prctl(*option, *arg, *ptr, 0, 0) } != 0 {
            return Err(format!("prctl({}): {}", name, io::Error::last_os_error()));
        }
    }
    Ok(())
}

// --- small helpers -----------------------------------------------------------------------------------

fn log(msg: &str) {
    let _ = io::stderr().write_all(format!("[start-kernel] {}\n", msg).as_bytes());
}

/// A death by signal N is 128+N, as a shell says.
fn exit_status(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    }
}

fn free_local_ports(n: usize) -> io::Result<Vec<u16>> {
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
enum Addr {
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

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Addr {
    fn open(&self) -> io::Result<Stream> {
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
    fn fd(&self) -> RawFd {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
}

// --- JSON (just enough for the descriptor and the connection file) ------------------------------------

#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    /// The number's text, as written.
    Num(String),
    Str(String),
    Arr(Vec<Json>),
    /// In document order.
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
    fn set(&mut self, key: &str, value: Json) {
        if let Json::Obj(fields) = self {
            match fields.iter_mut().find(|(k, _)| k == key) {
                Some(field) => field.1 = value,
                None => fields.push((key.to_owned(), value)),
            }
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Json::Str(s) => Some(s),
            _ => None,
        }
    }
    /// A value as Python's `str()` would put it in the environment.
    fn to_env_string(&self) -> String {
        match self {
            Json::Str(s) => s.clone(),
            Json::Num(n) => n.clone(),
            Json::Bool(true) => "True".into(),
            Json::Bool(false) => "False".into(),
            Json::Null => "None".into(),
            other => other.dump(None),
        }
    }
    /// An integer port, from a number or a string of digits.
    fn as_port(&self) -> Option<u16> {
        match self {
            Json::Num(n) | Json::Str(n) => n.trim().parse().ok(),
            _ => None,
        }
    }

    /// Compact (`, ` and `: ` as Python writes) or indented; non-ASCII escaped, like `json.dumps`.
    fn dump(&self, indent: Option<usize>) -> String {
        let mut out = String::new();
        self.write_to(&mut out, indent, 0);
        out
    }

    fn write_to(&self, out: &mut String, indent: Option<usize>, level: usize) {
        let newline = |out: &mut String, level: usize| {
            if let Some(n) = indent {
                out.push('\n');
                out.push_str(&" ".repeat(n * level));
            }
        };
        let sep = if indent.is_some() { "," } else { ", " };
        match self {
            Json::Null => out.push_str("null"),
            Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Json::Num(n) => out.push_str(n),
            Json::Str(s) => write_json_str(out, s),
            Json::Arr(items) if items.is_empty() => out.push_str("[]"),
            Json::Obj(fields) if fields.is_empty() => out.push_str("{}"),
            Json::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    newline(out, level + 1);
                    v.write_to(out, indent, level + 1);
                }
                newline(out, level);
                out.push(']');
            }
            Json::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push_str(sep);
                    }
                    newline(out, level + 1);
                    write_json_str(out, k);
                    out.push_str(": ");
                    v.write_to(out, indent, level + 1);
                }
                newline(out, level);
                out.push('}');
            }
        }
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{:04x}", u));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = Parser { s: text.as_bytes(), i: 0 };
    let v = p.value(0)?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing data at byte {}", p.i));
    }
    Ok(v)
}

impl<'a> Parser<'a> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }
    fn err<T>(&self, what: &str) -> Result<T, String> {
        Err(format!("{} at byte {}", what, self.i))
    }
    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }
    fn value(&mut self, depth: usize) -> Result<Json, String> {
        if depth > 64 {
            return self.err("too deep");
        }
        self.ws();
        match self.s.get(self.i) {
            None => self.err("unexpected end"),
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Obj(fields));
                }
                loop {
                    self.ws();
                    if self.s.get(self.i) != Some(&b'"') {
                        return self.err("expected a key");
                    }
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return self.err("expected ':'");
                    }
                    let v = self.value(depth + 1)?;
                    fields.push((k, v));
                    self.ws();
                    if self.eat(",") {
                        continue;
                    }
                    if self.eat("}") {
                        return Ok(Json::Obj(fields));
                    }
                    return self.err("expected ',' or '}'");
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Arr(items));
                }
                loop {
                    items.push(self.value(depth + 1)?);
                    self.ws();
                    if self.eat(",") {
                        continue;
                    }
                    if self.eat("]") {
                        return Ok(Json::Arr(items));
                    }
                    return self.err("expected ',' or ']'");
                }
            }
            Some(b'"') => self.string().map(Json::Str),
            Some(_) if self.eat("null") => Ok(Json::Null),
            Some(_) if self.eat("true") => Ok(Json::Bool(true)),
            Some(_) if self.eat("false") => Ok(Json::Bool(false)),
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    self.i += 1;
                }
                let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
                if text.is_empty() || text.parse::<f64>().is_err() {
                    self.i = start;
                    return self.err("unexpected character");
                }
                Ok(Json::Num(text.to_owned()))
            }
        }
    }
    fn hex4(&mut self) -> Result<u32, String> {
        let h = self.s.get(self.i..self.i + 4).and_then(|h| std::str::from_utf8(h).ok());
        match h.and_then(|h| u32::from_str_radix(h, 16).ok()) {
            Some(v) => {
                self.i += 4;
                Ok(v)
            }
            None => self.err("bad \\u escape"),
        }
    }
    fn string(&mut self) -> Result<String, String> {
        self.i += 1; // the opening quote
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = match self.s.get(self.i) {
                None => return self.err("unterminated string"),
                Some(c) => *c,
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = match self.s.get(self.i) {
                        None => return self.err("unterminated string"),
                        Some(e) => *e,
                    };
                    self.i += 1;
                    let simple = match e {
                        b'"' => Some('"'),
                        b'\\' => Some('\\'),
                        b'/' => Some('/'),
                        b'b' => Some('\u{8}'),
                        b'f' => Some('\u{c}'),
                        b'n' => Some('\n'),
                        b'r' => Some('\r'),
                        b't' => Some('\t'),
                        b'u' => None,
                        _ => return self.err("bad escape"),
                    };
                    let ch = match simple {
                        Some(ch) => ch,
                        None => {
                            let mut u = self.hex4()?;
                            if (0xD800..0xDC00).contains(&u) && self.eat("\\u") {
                                let lo = self.hex4()?;
                                if (0xDC00..0xE000).contains(&lo) {
                                    u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                                }
                            }
                            char::from_u32(u).unwrap_or('\u{fffd}')
                        }
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| "invalid UTF-8".to_owned())
    }
}

// --- signals -----------------------------------------------------------------------------------------

/// The write end of the self-pipe the signal handler writes each signal's number to.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: c_int) {
    let byte = sig as u8;
    // SAFETY: write(2) is async-signal-safe; the pipe is non-blocking (a full pipe drops the byte, but
    // then the loop has bytes to read anyway).
    unsafe {
        write(SIGNAL_PIPE.load(Ordering::Relaxed), &byte, 1);
    }
}

/// The read end of the self-pipe, after installing the handlers.
fn install_signal_handlers() -> io::Result<RawFd> {
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 fills two descriptors; signal installs a handler that only calls write(2).
    unsafe {
        if pipe2(fds.as_mut_ptr(), O_NONBLOCK | O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        SIGNAL_PIPE.store(fds[1], Ordering::Relaxed);
        for sig in [SIGINT, SIGHUP, SIGTERM, SIGCHLD] {
            signal(sig, on_signal as extern "C" fn(c_int) as usize);
        }
    }
    Ok(fds[0])
}

fn killpg(pid: u32, sig: c_int) {
    // SAFETY: kill(2) of a process group; failures (gone already) are of no interest.
    unsafe {
        kill(-(pid as c_int), sig);
    }
}

// --- relaying ----------------------------------------------------------------------------------------

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
struct Relay {
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
    fn interest(&self) -> [(RawFd, i16); 2] {
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
    fn step(&mut self, service: i16, kernel: i16, scratch: &mut [u8], now: Instant) -> bool {
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

enum Channel {
    /// Not relaying: connects (service first) at `retry_at`; `warned` once the service refused.
    Idle {
        retry_at: Instant,
        warned: bool,
    },
    Relaying(Box<Relay>),
}

// --- the supervisor ----------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Debug)]
enum Cmd {
    Restart,
    Stop,
}

struct Supervisor {
    desc: Json,
    conn: Json,
    /// The service's four sockets, "<ip>-<port>".
    service: Vec<Addr>,
    tcp: bool,
    /// The kernel's four sockets, set at each start.
    kernel: Vec<Addr>,
    signals: RawFd,
    /// Set by a signal: what to do with the running kernel.
    cmd: Option<Cmd>,
    /// The running kernel, until it has been reaped.
    child: Option<Child>,
    /// `DEFAULT_PRIVATE_DIR` or `KERNELBOX_PRIVATE_DIR`.
    private_dir: String,
    exited: Option<ExitStatus>,
    /// Every read goes through this one chunk.
    scratch: Vec<u8>,
}

impl Supervisor {
    fn new(desc: Json, conn_file: &str, signals: RawFd) -> Result<Supervisor, String> {
        let text = std::fs::read_to_string(conn_file).map_err(|e| e.to_string())?;
        let conn = parse_json(&text)?;
        let ip = conn.get("ip").and_then(Json::as_str).ok_or("no \"ip\"")?.to_owned();
        let mut service = Vec::new();
        for key in CHANNELS.iter() {
            let port = conn.get(key).and_then(Json::as_port).ok_or_else(|| format!("no {:?}", key))?;
            service.push(Addr::Unix(format!("{}-{}", ip, port)));
        }
        let tcp = desc.get("transport").and_then(Json::as_str).unwrap_or("ipc") == "tcp";
        Ok(Supervisor {
            desc,
            conn,
            service,
            tcp,
            kernel: Vec::new(),
            signals,
            cmd: None,
            child: None,
            exited: None,
            scratch: vec![0; CHUNK],
            private_dir: std::env::var("KERNELBOX_PRIVATE_DIR").unwrap_or_else(|_| DEFAULT_PRIVATE_DIR.to_owned()),
        })
    }

    // --- kernel process ---

    /// The kernel's private connection file; also sets `self.kernel`.
    fn write_kernel_conn_file(&mut self) -> io::Result<String> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.private_dir)?;
        let mut private = self.conn.clone();
        if self.tcp {
            // Free ports, new at each start (not the service's numbers: ports below 1024 would need a
            // capability; ZMTP carries no port numbers).
            let ports = free_local_ports(PORT_KEYS.len())?;
            private.set("transport", Json::Str("tcp".into()));
            private.set("ip", Json::Str("127.0.0.1".into()));
            for (key, port) in PORT_KEYS.iter().zip(&ports) {
                private.set(key, Json::Num(port.to_string()));
            }
            self.kernel = ports[..CHANNELS.len()].iter().map(|p| Addr::Tcp(*p)).collect();
        } else {
            let ip = format!("{}/k", self.private_dir);
            private.set("transport", Json::Str("ipc".into()));
            private.set("ip", Json::Str(ip.clone()));
            let port = |key: &str| self.conn.get(key).and_then(Json::as_port).unwrap_or(0);
            self.kernel = CHANNELS.iter().map(|k| Addr::Unix(format!("{}-{}", ip, port(k)))).collect();
            for key in PORT_KEYS.iter() {
                // A previous kernel's socket files.
                let _ = std::fs::remove_file(format!("{}-{}", ip, port(key)));
            }
        }
        let path = format!("{}/connection.json", self.private_dir);
        let tmp = format!("{}.tmp", path);
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(private.dump(None).as_bytes())?;
        drop(f);
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    fn seed(&self) {
        if let Some(Json::Obj(seeds)) = self.desc.get("seed") {
            for (dest, src) in seeds {
                let src = match src.as_str() {
                    Some(s) => s,
                    None => continue,
                };
                if std::fs::symlink_metadata(dest).is_err() {
                    if let Err(e) = copy_tree(std::path::Path::new(src), std::path::Path::new(dest)) {
                        log(&format!("cannot seed {} from {}: {}", dest, src, e));
                    }
                }
            }
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        self.seed();
        let conn = self.write_kernel_conn_file().map_err(|e| format!("private connection file: {}", e))?;
        let argv: Vec<String> = match self.desc.get("argv") {
            Some(Json::Arr(items)) => {
                items.iter().map(|a| a.to_env_string().replace("{connection_file}", &conn)).collect()
            }
            _ => return Err("the descriptor has no argv".into()),
        };
        if argv.is_empty() {
            return Err("the descriptor's argv is empty".into());
        }
        log(&format!("starting kernel: {}", argv.join(" ")));
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null());
        if let Some(Json::Obj(env)) = self.desc.get("env") {
            for (k, v) in env {
                cmd.env(k, v.to_env_string());
            }
        }
        // SAFETY: setsid(2) is async-signal-safe. Its own session and process group: signals reach the
        // kernel's children too.
        unsafe {
            cmd.pre_exec(|| {
                setsid();
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| format!("cannot start {}: {}", argv[0], e))?;
        self.child = Some(child);
        self.exited = None;
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn alive(&self) -> bool {
        self.child.is_some() && self.exited.is_none()
    }

    fn signal_group(&self, sig: c_int) {
        if self.alive() {
            killpg(self.pid(), sig);
        }
    }

    /// The whole group, also stragglers whose leader is gone.
    fn kill_leftovers(&self) {
        if self.child.is_some() {
            killpg(self.pid(), SIGKILL);
        }
    }

    fn reap(&mut self) {
        if self.exited.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.exited = Some(status);
                }
            }
        }
    }

    /// Reads the self-pipe: SIGINT is forwarded at once, SIGHUP/SIGTERM become a command.
    fn handle_signals(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: a read into a local buffer from our own non-blocking pipe.
            let n = unsafe { read(self.signals, buf.as_mut_ptr(), buf.len()) };
            if n <= 0 {
                break;
            }
            for sig in &buf[..n as usize] {
                match *sig as c_int {
                    SIGINT => {
                        self.reap();
                        self.signal_group(SIGINT);
                    }
                    SIGTERM => self.cmd = Some(Cmd::Stop),
                    SIGHUP => self.cmd = Some(self.cmd.unwrap_or(Cmd::Restart)),
                    _ => {} // SIGCHLD: only a wake-up
                }
            }
        }
        self.reap();
    }

    /// Waits for a signal (or anything else among `fds`) for at most `timeout`; returns the poll results.
    fn wait(&mut self, fds: &mut Vec<PollFd>, timeout: Duration) {
        fds.insert(0, PollFd { fd: self.signals, events: POLLIN, revents: 0 });
        let ms = timeout.as_millis().min(1000) as c_int;
        // SAFETY: poll over a live slice of pollfd structures.
        unsafe {
            poll(fds.as_mut_ptr(), fds.len() as c_ulong, ms.max(0));
        }
        fds.remove(0);
        self.handle_signals();
    }

    /// TERM the kernel's group, KILL after KILL_GRACE, and reap it.
    fn stop_kernel(&mut self) {
        self.reap();
        if self.alive() {
            self.signal_group(SIGTERM);
            let deadline = Instant::now() + KILL_GRACE;
            loop {
                let now = Instant::now();
                if !self.alive() || now >= deadline {
                    break;
                }
                self.wait(&mut Vec::new(), deadline - now);
            }
            if self.alive() {
                log(&format!("kernel ignored SIGTERM for {} s, killing it", KILL_GRACE.as_secs()));
            }
        }
        self.kill_leftovers();
        if self.exited.is_none() {
            if let Some(child) = self.child.as_mut() {
                self.exited = child.wait().ok();
            }
        }
    }

    fn log_connecting(&self, started: Instant) {
        let names: Vec<String> = self.service.iter().map(|a| a.to_string()).collect();
        log(&format!("kernel ready ({:.2} s); connecting to {}", started.elapsed().as_secs_f64(), names.join(", ")));
    }

    /// One kernel's lifetime: relays until a command or the kernel's exit. Returns the relays still open.
    fn serve(&mut self) -> Vec<Channel> {
        let started = Instant::now();
        let mut channels: Vec<Channel> =
            (0..CHANNELS.len()).map(|_| Channel::Idle { retry_at: started, warned: false }).collect();
        let mut probed = 0; // how many of the kernel's sockets have accepted a connection
        let mut next_probe = started;
        let mut drain_until: Option<Instant> = None; // after the kernel's exit: FLUSH for the last bytes
        loop {
            let now = Instant::now();
            if self.cmd.is_some() {
                return channels;
            }
            if !self.alive() {
                let until = *drain_until.get_or_insert(now + FLUSH);
                let relaying = channels.iter().any(|c| matches!(c, Channel::Relaying(_)));
                if !relaying || now >= until {
                    return channels;
                }
            }
            // Connect what is due while the kernel lives.
            if self.alive() && probed < self.kernel.len() && now >= next_probe {
                while probed < self.kernel.len() && self.kernel[probed].open().is_ok() {
                    probed += 1;
                }
                if probed == self.kernel.len() {
                    self.log_connecting(started);
                } else {
                    next_probe = Instant::now() + POLL;
                }
            }
            if self.alive() && probed == self.kernel.len() {
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
                        match self.kernel[i].open() {
                            Ok(kernel) => {
                                log(&format!("{}: connected", self.service[i]));
                                *ch = Channel::Relaying(Box::new(Relay {
                                    service,
                                    kernel,
                                    to_kernel: Pipe::new(),
                                    to_service: Pipe::new(),
                                    closing: None,
                                }));
                            }
                            Err(e) => {
                                // The kernel is dying; the loop will notice.
                                log(&format!("{}: kernel socket {}: {}", self.service[i], self.kernel[i], e));
                                *retry_at = Instant::now() + RETRY;
                            }
                        }
                    }
                }
            }
            // Wait for I/O, a signal or the next deadline.
            let now = Instant::now();
            let mut deadline = now + Duration::from_secs(1);
            if self.alive() && probed < self.kernel.len() {
                deadline = deadline.min(next_probe);
            }
            let mut fds = Vec::new();
            for ch in &channels {
                match ch {
                    Channel::Idle { retry_at, .. } if self.alive() && probed == self.kernel.len() => {
                        deadline = deadline.min(*retry_at)
                    }
                    Channel::Idle { .. } => {}
                    Channel::Relaying(r) => {
                        for (fd, events) in r.interest().iter() {
                            fds.push(PollFd { fd: *fd, events: *events, revents: 0 });
                        }
                        if let Some(c) = r.closing {
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
                    let open = if s != 0 || k != 0 || r.closing.is_some() {
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

    fn run(&mut self) -> i32 {
        loop {
            if let Err(e) = self.spawn() {
                log(&e);
                return 1;
            }
            let channels = self.serve();
            // Every relayed connection goes first, before the kernel stops.
            drop(channels);
            let cmd = match self.cmd.take() {
                Some(cmd) => cmd,
                None => {
                    let status = self.exited.expect("serve returns on a command or the kernel's exit");
                    let rc = exit_status(status);
                    log(&format!("kernel exited on its own with status {}", rc));
                    self.kill_leftovers();
                    return rc;
                }
            };
            let word = if cmd == Cmd::Stop { "stop" } else { "restart" };
            log(&format!("{}: stopping kernel pid {}", word, self.pid()));
            self.stop_kernel();
            if cmd == Cmd::Stop {
                return 0;
            }
            self.child = None;
        }
    }
}

/// Copies a directory tree (files keep their permission bits), as `shutil.copytree`.
fn copy_tree(src: &std::path::Path, dest: &std::path::Path) -> io::Result<()> {
    std::fs::create_dir(dest)?;
    for entry in std::fs::read_dir(src)? {
        let entry = entry?;
        let ty = entry.file_type()?;
        let to = dest.join(entry.file_name());
        if ty.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &to)?;
        } else {
            std::fs::copy(entry.path(), &to)?;
        }
    }
    let perms = std::fs::metadata(src)?.permissions();
    std::fs::set_permissions(dest, perms)
}

fn describe(desc: &Json) -> String {
    let fields = DESCRIBE_KEYS.iter().map(|k| (k.to_string(), desc.get(k).cloned().unwrap_or(Json::Null))).collect();
    Json::Obj(fields).dump(Some(2))
}

fn real_main() -> i32 {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 2 || args[1] == "-h" || args[1] == "--help" {
        let _ = io::stderr().write_all(USAGE.as_bytes());
        return 2;
    }
    if args[1] != "--describe" {
        // First of all, before any child exists: everything started later inherits the filter.
        if let Err(e) = sandbox() {
            log(&format!("REFUSING TO START: cannot seal the sandbox: {}", e));
            return 3;
        }
        log("seccomp filter installed: ptrace, process_vm_readv/writev and pidfd_getfd refused");
    }
    let descriptor = std::env::var("KERNELBOX_DESCRIPTOR").unwrap_or_else(|_| DEFAULT_DESCRIPTOR.to_owned());
    let desc = match std::fs::read_to_string(&descriptor).map_err(|e| e.to_string()).and_then(|t| parse_json(&t)) {
        Ok(d) => d,
        Err(e) => {
            log(&format!("cannot read descriptor {}: {}", descriptor, e));
            return 2;
        }
    };
    if args[1] == "--describe" {
        println!("{}", describe(&desc));
        return 0;
    }
    let signals = match install_signal_handlers() {
        Ok(fd) => fd,
        Err(e) => {
            log(&format!("cannot install signal handlers: {}", e));
            return 1;
        }
    };
    let mut sup = match Supervisor::new(desc, &args[1], signals) {
        Ok(s) => s,
        Err(e) => {
            log(&format!("bad connection file {}: {}", args[1], e));
            return 2;
        }
    };
    sup.run()
}

fn main() {
    std::process::exit(real_main());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trips_what_the_descriptors_hold() {
        let text = r#"{"a": [1, -2.5e3, "x\"\\\n\u00e9\ud83d\ude00"], "b": {"c": null, "d": true}, "e": {}}"#;
        let v = parse_json(text).unwrap();
        assert_eq!(parse_json(&v.dump(None)).unwrap(), v);
        assert_eq!(parse_json(&v.dump(Some(2))).unwrap(), v);
        assert_eq!(v.get("a").map(|a| a.dump(None)).unwrap(), r#"[1, -2.5e3, "x\"\\\n\u00e9\ud83d\ude00"]"#);
        assert!(parse_json("{\"a\": 1,}").is_err());
        assert!(parse_json("[1] x").is_err());
    }

    #[test]
    fn describe_prints_like_python() {
        let d = parse_json(r#"{"language": "bash", "transport": "ipc", "argv": []}"#).unwrap();
        assert_eq!(
            describe(&d),
            "{\n  \"language\": \"bash\",\n  \"display_name\": null,\n  \"language_version\": null,\n  \
             \"transport\": \"ipc\",\n  \"interrupt_mode\": null\n}"
        );
    }

    #[test]
    fn the_filter_has_one_block_per_architecture_and_fails_closed() {
        let prog = seccomp_program();
        // Per architecture: load arch, jump, load nr, checks (+ x32 on x86_64), allow, deny; then deny.
        assert_eq!(prog.len(), 4 * 9 + 1 + 1);
        assert_eq!(prog.last().map(|i| i.k), Some(RET_EPERM));
        assert_eq!(prog[1].k, AUDIT_ARCH_X86_64);
        assert_eq!(prog[1].jf as usize, 8);
    }
}
