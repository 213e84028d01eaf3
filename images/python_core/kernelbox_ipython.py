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
  3. caps rich outputs (results and displays) before they are serialized:
     a MIME value over the budget could never reach the user (the service's
     response is capped at the same number of bytes) but would be copied two or
     three times on its way out (JSON, bytes), which is what got a kernel
     OOM-killed for `'x' * 200_000_000` as a cell's last line. So a text value
     (text/*) over the budget keeps its first half-budget of bytes and a
     marker; any other value over it (a base64 image, JSON) is dropped and
     named in text/plain. The metadata of such an output says
     {"kernelbox": {"truncated": true, ...}}, which makes the service report
     the execution `truncated`. The repr of a str, bytes or bytearray over
     the budget is built from its head only, so the 200 MB repr is never made.
  4. makes the kernel process non-dumpable (prctl(PR_SET_DUMPABLE, 0)): no
     other process of the session can open its /proc/<pid>/mem (ptrace itself
     is refused to the whole session by start-kernel's seccomp filter).
Output written by C code or subprocesses to the file descriptors goes through
OutStream.write too (ipykernel's fd watcher), so it is limited as well.
"""

import ctypes
import json
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


def _size(value):
    """UTF-8 bytes of a str (cheap), base64 bytes of binary data (an image's repr may be bytes: it is
    encoded on the way out), else the bytes of its compact JSON (what the wire carries)."""
    if isinstance(value, str):
        return _utf8_len(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (len(value) + 2) // 3 * 4
    try:
        return len(json.dumps(value, separators=(",", ":"), default=str))
    except (TypeError, ValueError, RecursionError):
        return 0


def cap_bundle(data, metadata, limit, cut=False):
    """Caps one MIME bundle (see 3. above); returns (data, metadata) unchanged when nothing is over and
    nothing was `cut` already (by the short repr)."""
    if not isinstance(data, dict):
        return data, metadata
    over = {key: _size(value) for key, value in data.items()}
    over = {key: n for key, n in over.items() if n > limit}
    if not over and not cut:
        return data, metadata
    data = dict(data)
    dropped = []
    for key, n in over.items():
        value = data[key]
        if key.startswith("text/") and isinstance(value, str):
            head = _prefix(value, limit // 2)
            data[key] = head + "\n[kernelbox: output truncated: %d bytes dropped]" % (n - _utf8_len(head))
        else:
            del data[key]
            dropped.append("%s (%d bytes)" % (key, n))
    message = "[kernelbox: output over the limit of %d bytes: %s]" % (
        limit, ", ".join(dropped) if dropped else "text cut")
    if dropped:
        plain = data.get("text/plain")
        data["text/plain"] = (plain + "\n" if isinstance(plain, str) else "") + message
    metadata = dict(metadata) if isinstance(metadata, dict) else {}
    metadata["kernelbox"] = {"truncated": True, "message": message}
    return data, metadata


class _Cut:
    """Set by the short repr when it cut something; read (and reset) when the output is sent."""
    flag = False

    @classmethod
    def take(cls, *_):
        cut, cls.flag = cls.flag, False
        return cut


def _short_repr(limit):
    """A text/plain printer for str, bytes and bytearray that, over the budget, formats only a head."""
    def printer(obj, p, cycle):
        if len(obj) > limit:
            _Cut.flag = True
            head = obj[:limit // 2]
            p.text("%s...  [kernelbox: a %s of length %d, cut to its first %d]" % (
                repr(head), type(obj).__name__, len(obj), len(head)))
        else:
            p.text(repr(obj))
    return printer


def _install_rich_caps(ip, limit):
    plain = ip.display_formatter.formatters["text/plain"]
    printer = _short_repr(limit)
    for t in (str, bytes, bytearray):
        previous = plain.for_type(t, printer)
        if previous is not None and t is str:
            # keep IPython's own printer below the budget (it splits long lines of multi-line strings)
            def str_printer(obj, p, cycle, previous=previous):
                return printer(obj, p, cycle) if len(obj) > limit else previous(obj, p, cycle)
            plain.for_type(str, str_printer)

    hook = ip.displayhook
    compute = hook.compute_format_data

    def capped_compute(result):
        _Cut.take()
        data, metadata = compute(result)
        return cap_bundle(data, metadata, limit, _Cut.take())

    hook.compute_format_data = capped_compute

    pub = ip.display_pub
    publish = pub.publish

    def capped_publish(data, metadata=None, *args, **kwargs):
        data, metadata = cap_bundle(data, metadata, limit, _Cut.take())
        return publish(data, metadata, *args, **kwargs)

    pub.publish = capped_publish
    ip.events.register("pre_execute", _Cut.take)


def _install_error_cap(ip, limit):
    """An exception with a huge message (``raise ValueError('x' * 20_000_000)``) would make an error
    message over the service's wire limit, which arrives with its name and value lost. Cut the value and
    the traceback's lines to a share of the budget before the error is sent."""
    show = ip._showtraceback
    line_cap = max(limit // 8, 1024)
    lines_cap = 200

    def capped_showtraceback(etype, evalue, stb):
        try:
            text = str(evalue)
        except Exception:
            text = "<unprintable %s>" % getattr(etype, "__name__", "exception")
        stb = list(stb or [])
        if _utf8_len(text) <= line_cap and len(stb) <= lines_cap and all(_utf8_len(l) <= line_cap for l in stb):
            return show(etype, evalue, stb)
        if _utf8_len(text) > line_cap:
            text = _prefix(text, line_cap) + " [kernelbox: message cut]"
        if len(stb) > lines_cap:
            stb = stb[: lines_cap // 2] + ["[kernelbox: %d traceback lines cut]" % (len(stb) - lines_cap)] + stb[-lines_cap // 2 :]
        stb = [l if _utf8_len(l) <= line_cap else _prefix(l, line_cap) + " [kernelbox: line cut]" for l in stb]
        return show(etype, text, stb)

    ip._showtraceback = capped_showtraceback


def _not_dumpable():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
            sys.stderr.write("kernelbox: prctl(PR_SET_DUMPABLE, 0) failed: %s\n" % os.strerror(ctypes.get_errno()))
    except OSError as e:
        sys.stderr.write("kernelbox: cannot make the kernel non-dumpable: %s\n" % e)


def load_ipython_extension(ip):
    _not_dumpable()
    ip.history_manager.outputs = _NoOutputHistory()
    limit = _limit_from_env()
    if not limit:
        return
    _install_rich_caps(ip, limit)
    _install_error_cap(ip, limit)
    budget = OutputBudget(limit)
    for name in ("stdout", "stderr"):
        budget.install(name)
    ip.events.register("pre_execute", budget.reset)
    ip.events.register("post_execute", budget.report)
