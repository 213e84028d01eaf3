//! Signals: a self-pipe that turns SIGINT, SIGHUP, SIGTERM and SIGCHLD into bytes the poll loop reads
//! (a handler may do next to nothing safely), and signals sent to the kernel's process group. What each
//! signal means is the supervisor's.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::sys::{c_int, kill, pipe2, read, signal, write, O_CLOEXEC, O_NONBLOCK, SIGCHLD, SIGHUP, SIGINT, SIGTERM};

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

/// The read end of the self-pipe.
pub struct Signals(RawFd);

impl Signals {
    /// Installs the handlers.
    pub fn install() -> io::Result<Signals> {
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
        Ok(Signals(fds[0]))
    }

    /// For poll: readable when a signal came.
    pub fn fd(&self) -> RawFd {
        self.0
    }

    /// Signals received and not yet read, oldest first, as many as `buf` holds; empty when none.
    pub fn received<'b>(&self, buf: &'b mut [u8]) -> &'b [u8] {
        // SAFETY: a read into a live buffer from our own non-blocking pipe.
        let n = unsafe { read(self.0, buf.as_mut_ptr(), buf.len()) };
        &buf[..n.max(0) as usize]
    }
}

/// Sends `sig` to the process group `pid` leads.
pub fn killpg(pid: u32, sig: c_int) {
    // SAFETY: kill(2) of a process group; failures (gone already) are of no interest.
    unsafe {
        kill(-(pid as c_int), sig);
    }
}
