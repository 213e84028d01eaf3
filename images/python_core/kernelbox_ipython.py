"""kernelbox's IPython extension for the python kernels (loaded with --ext=kernelbox_ipython).

A kernel must survive what a user prints. Two things in ipykernel/IPython keep
every byte of output in memory, so `sys.stdout.write("x" * 200_000_000)` or a
long loop of prints got the kernel OOM-killed:
  * ipykernel's OutStream buffers all writes between two flushes and sends them
    as one message (a 200 MB string becomes a 200 MB buffer, then a JSON copy);
  * IPython 9 keeps every stream write, display and result of the session in
    `history_manager.outputs` (for `%notebook`), for ever.

So this extension
  1. gives each execution an output budget, KERNELBOX_OUTPUT_LIMIT_BYTES
     (UTF-8 bytes of stdout + stderr together; default 1 MiB; 0 = no limit).
     Writes beyond it are dropped and, when the execution ends, each stream
     that lost output gets one line:
         [kernelbox: output truncated: N bytes dropped]
     The budget is reset at each execution (IPython's pre_execute event); the
     marker is written at post_execute, before the kernel's last flush.
  2. keeps no output history (`%notebook` exports cells without outputs).
     `Out[n]`/`_` (the values of results) are unchanged.
Output written by C code or subprocesses to the file descriptors goes through
OutStream.write too (ipykernel's fd watcher), so it is limited as well.
"""

import os
import sys
import threading

DEFAULT_LIMIT = 1 << 20
CHUNK = 1 << 20  # characters encoded at a time to count the UTF-8 bytes of a huge string


def _limit_from_env():
    try:
        return max(0, int(os.environ.get("KERNELBOX_OUTPUT_LIMIT_BYTES", DEFAULT_LIMIT)))
    except ValueError:
        return DEFAULT_LIMIT


def _utf8_len(s):
    if s.isascii():  # O(1) in CPython
        return len(s)
    return sum(len(s[i:i + CHUNK].encode("utf-8", "surrogatepass")) for i in range(0, len(s), CHUNK))


def _prefix(s, nbytes):
    """The longest prefix of s that is at most nbytes in UTF-8 (never splits a character)."""
    head = s[:nbytes].encode("utf-8", "surrogatepass")[:nbytes]
    return head.decode("utf-8", "ignore")


class OutputBudget:
    def __init__(self, limit):
        self.limit = limit
        self.lock = threading.Lock()  # ipykernel's fd watcher writes from its own thread
        self.streams = {}             # name -> (stream, its unlimited write)
        self.reset()

    def reset(self, *_):
        with self.lock:
            self.left = self.limit
            self.dropped = {name: 0 for name in self.streams}
            self.line_start = {name: True for name in self.streams}

    def install(self, name):
        stream = getattr(sys, name)
        write = stream.write

        def limited_write(s):
            if not isinstance(s, str):
                return write(s)  # OutStream raises its usual TypeError
            n = _utf8_len(s)
            with self.lock:
                if n <= self.left:
                    self.left -= n
                    keep = s
                else:
                    keep = _prefix(s, self.left) if self.left else ""
                    kept = _utf8_len(keep)
                    self.left -= kept
                    self.dropped[name] += n - kept
                if keep:
                    self.line_start[name] = keep.endswith("\n")
            if keep:
                write(keep)
            return len(s)

        stream.write = limited_write  # an instance attribute: OutStream.writelines calls it too
        self.streams[name] = (stream, write)
        self.dropped[name] = 0
        self.line_start[name] = True

    def report(self, *_):
        with self.lock:
            lost = [(name, n, self.line_start[name]) for name, n in self.dropped.items() if n]
            for name, _n, _s in lost:
                self.dropped[name] = 0
        for name, n, line_start in lost:
            stream, write = self.streams[name]
            write(("" if line_start else "\n") + "[kernelbox: output truncated: %d bytes dropped]\n" % n)


class _NoOutputHistory(dict):
    """Stands in for IPython's `history_manager.outputs` (a defaultdict(list)):
    it looks empty and forgets whatever is appended."""

    def __contains__(self, key):
        return False

    def __getitem__(self, key):
        return []

    def get(self, key, default=None):
        return default


def load_ipython_extension(ip):
    ip.history_manager.outputs = _NoOutputHistory()
    limit = _limit_from_env()
    if not limit:
        return
    budget = OutputBudget(limit)
    for name in ("stdout", "stderr"):
        budget.install(name)
    ip.events.register("pre_execute", budget.reset)
    ip.events.register("post_execute", budget.report)
