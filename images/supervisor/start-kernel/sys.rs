//! The few libc types, calls and constants that std lacks (Linux, glibc), declared by hand because the
//! supervisor is std only: no `libc` crate. Only declarations here; the modules that call them say why.

#![allow(non_camel_case_types)]

pub type c_int = i32;
pub type c_ulong = u64;

#[repr(C)]
pub struct PollFd {
    pub fd: c_int,
    pub events: i16,
    pub revents: i16,
}

#[repr(C)]
pub struct SockaddrUn {
    pub family: u16,
    pub path: [u8; 108],
}

extern "C" {
    pub fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
    pub fn signal(sig: c_int, handler: usize) -> usize;
    pub fn pipe2(fds: *mut c_int, flags: c_int) -> c_int;
    pub fn read(fd: c_int, buf: *mut u8, n: usize) -> isize;
    pub fn write(fd: c_int, buf: *const u8, n: usize) -> isize;
    pub fn kill(pid: c_int, sig: c_int) -> c_int;
    pub fn setsid() -> c_int;
    pub fn socket(domain: c_int, ty: c_int, protocol: c_int) -> c_int;
    pub fn connect(fd: c_int, addr: *const SockaddrUn, len: u32) -> c_int;
    pub fn close(fd: c_int) -> c_int;
    pub fn prctl(option: c_int, arg2: c_ulong, arg3: c_ulong, arg4: c_ulong, arg5: c_ulong) -> c_int;
}

pub const SIGHUP: c_int = 1;
pub const SIGINT: c_int = 2;
pub const SIGKILL: c_int = 9;
pub const SIGTERM: c_int = 15;
pub const SIGCHLD: c_int = 17;
pub const POLLIN: i16 = 0x1;
pub const POLLOUT: i16 = 0x4;
pub const POLLERR: i16 = 0x8;
pub const POLLHUP: i16 = 0x10;
pub const O_NONBLOCK: c_int = 0o4000;
pub const O_CLOEXEC: c_int = 0o2000000;
pub const AF_UNIX: c_int = 1;
pub const SOCK_STREAM: c_int = 1;
