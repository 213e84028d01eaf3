"""What the API returns, as typed values. Each keeps the JSON it came from in ``raw``, so nothing the
service sends is lost to this client's view of it (a field added to the API is there before this module
knows its name).

Outputs are Jupyter's, whole: a :class:`Display` holds every MIME type of its bundle (``data``) with its
``metadata``, and offers the common views (``text``, ``html``, ``png`` as bytes, ...) on top.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Union

__all__ = [
    "Stream",
    "Display",
    "ExecutionError",
    "Output",
    "SavedImage",
    "ExecutionResult",
    "OutputEvent",
    "UpdateEvent",
    "ClearEvent",
    "InputRequest",
    "NetworkBlockedEvent",
    "Event",
    "SessionLimits",
    "SessionInfo",
    "PoolStatus",
    "Language",
    "FileEntry",
    "Listing",
    "Written",
    "PackageResult",
    "InstallReport",
    "Blocked",
    "NetworkReport",
    "NetworkInfo",
    "strip_ansi",
]

Json = Dict[str, Any]

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")


def strip_ansi(text: str) -> str:
    """``text`` without terminal escape sequences (colours, cursor moves), as IPython's tracebacks carry."""
    return _ANSI.sub("", text)


def _str(v: Any, default: str = "") -> str:
    return v if isinstance(v, str) else default


def _opt_str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def _int(v: Any, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _opt_int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _float(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0


def _dict(v: Any) -> Json:
    return v if isinstance(v, dict) else {}


def _list(v: Any) -> List[Any]:
    return v if isinstance(v, list) else []


def _text(v: Any) -> str:
    """A MIME bundle's text value: a string, or (nbformat allows it) a list of lines."""
    if isinstance(v, list):
        return "".join(str(x) for x in v)
    return v if isinstance(v, str) else json.dumps(v)


# ---------------------------------------------------------------------------------------------------- outputs


@dataclass
class Stream:
    """Printed text: ``name`` is ``stdout`` or ``stderr``."""

    name: str
    text: str
    raw: Json = field(repr=False)
    output_type: Literal["stream"] = "stream"


_BINARY_PREFIXES = ("image/", "audio/", "video/", "application/pdf", "application/octet-stream")
_TEXT_IMAGES = ("image/svg+xml",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp", "image/bmp", "image/svg+xml")


def _is_json_mime(mime: str) -> bool:
    return mime == "application/json" or mime.endswith("+json")


@dataclass
class Display:
    """A rich output: a ``display_data`` (``plt.show()``, ``display(...)``) or an ``execute_result`` (the
    value of a cell's last expression). ``data`` is the whole MIME bundle as Jupyter sent it (binary types
    base64-encoded); the properties decode the common ones."""

    output_type: Literal["display_data", "execute_result"]
    data: Json
    metadata: Json
    raw: Json = field(repr=False)
    execution_count: Optional[int] = None
    #: Jupyter's ``transient.display_id`` on a streamed display that ``update`` events may replace.
    display_id: Optional[str] = None

    @property
    def is_result(self) -> bool:
        """The value of the cell's last expression (``execute_result``), not a display."""
        return self.output_type == "execute_result"

    @property
    def mime_types(self) -> List[str]:
        return list(self.data)

    def decode(self, mime: str) -> Union[bytes, str, Any, None]:
        """The value for ``mime``: bytes for binary types (base64-decoded), the object for JSON types, a
        string otherwise; None when the bundle has no such type."""
        if mime not in self.data:
            return None
        value = self.data[mime]
        if _is_json_mime(mime):
            return value
        if mime.startswith(_BINARY_PREFIXES) and mime not in _TEXT_IMAGES:
            return base64.b64decode(_text(value))
        return _text(value)

    def _bytes(self, mime: str) -> Optional[bytes]:
        value = self.decode(mime)
        return value if isinstance(value, bytes) else None

    def _string(self, mime: str) -> Optional[str]:
        value = self.decode(mime)
        return value if isinstance(value, str) else None

    @property
    def text(self) -> Optional[str]:
        return self._string("text/plain")

    @property
    def html(self) -> Optional[str]:
        return self._string("text/html")

    @property
    def markdown(self) -> Optional[str]:
        return self._string("text/markdown")

    @property
    def latex(self) -> Optional[str]:
        return self._string("text/latex")

    @property
    def javascript(self) -> Optional[str]:
        return self._string("application/javascript") or self._string("text/javascript")

    @property
    def svg(self) -> Optional[str]:
        return self._string("image/svg+xml")

    @property
    def png(self) -> Optional[bytes]:
        return self._bytes("image/png")

    @property
    def jpeg(self) -> Optional[bytes]:
        return self._bytes("image/jpeg")

    @property
    def gif(self) -> Optional[bytes]:
        return self._bytes("image/gif")

    @property
    def json(self) -> Any:
        """The ``application/json`` value (a dict, list, number, ...), or None."""
        return self.data.get("application/json")

    @property
    def image_mime(self) -> Optional[str]:
        """The bundle's first image type, if it has one."""
        return next((m for m in self.data if m.startswith("image/")), None)

    @property
    def is_image(self) -> bool:
        return self.image_mime is not None

    def save(self, path: Union[str, os.PathLike[str]], mime: Optional[str] = None) -> None:
        """Writes the value of ``mime`` (default: the first image type) to ``path``."""
        mime = mime or self.image_mime
        if mime is None or mime not in self.data:
            raise ValueError(f"this output has no {mime or 'image'}; it has {', '.join(self.data) or 'nothing'}")
        value = self.decode(mime)
        content = value if isinstance(value, bytes) else _text(value).encode()
        with open(path, "wb") as f:
            f.write(content)


@dataclass
class ExecutionError:
    """An exception the code raised: Jupyter's ``ename``, ``evalue`` and ``traceback`` (lines with terminal
    colours, as IPython makes them)."""

    ename: str
    evalue: str
    traceback: List[str]
    raw: Json = field(repr=False)
    output_type: Literal["error"] = "error"

    def format(self, *, strip_ansi: bool = False) -> str:
        """The whole traceback as one string; ``strip_ansi=True`` removes the colour codes."""
        text = "\n".join(self.traceback) if self.traceback else f"{self.ename}: {self.evalue}"
        return _strip(text) if strip_ansi else text

    def __str__(self) -> str:
        return f"{self.ename}: {self.evalue}"


_strip = strip_ansi

Output = Union[Stream, Display, ExecutionError]


def parse_output(raw: Any) -> Output:
    """One nbformat output (as the API sends it in ``outputs`` and in ``output``/``update`` events)."""
    d = _dict(raw)
    kind = d.get("output_type")
    if kind == "stream":
        return Stream(name=_str(d.get("name"), "stdout"), text=_text(d.get("text", "")), raw=d)
    if kind == "error":
        return ExecutionError(
            ename=_str(d.get("ename")),
            evalue=_str(d.get("evalue")),
            traceback=[str(x) for x in _list(d.get("traceback"))],
            raw=d,
        )
    transient = _dict(d.get("transient"))
    return Display(
        output_type="execute_result" if kind == "execute_result" else "display_data",
        data=_dict(d.get("data")),
        metadata=_dict(d.get("metadata")),
        raw=d,
        execution_count=_opt_int(d.get("execution_count")),
        display_id=_opt_str(transient.get("display_id")),
    )


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class SavedImage:
    """An image saved as a file in the session (``images="files"``): download it with ``s.files``."""

    output_index: int
    mime: str
    path: str
    size: int
    url: str
    raw: Json = field(repr=False)


@dataclass
class Blocked:
    """A connection the session's network rules refused: the ``host`` and ``port`` the code named, why, and
    how often (``count``; 1 in a ``network_blocked`` event, the total in a result's report).

    ``reason`` is ``not_allowed`` (the name is not on the session's list: allow it with
    ``Session.set_network``), ``forbidden`` (the operator forbids it: no list can allow it), ``ip_literal``
    (an address, not a name), ``private_address`` (the name resolves to an inside address), ``unresolved``,
    ``unreachable``, ``sni_mismatch``, ``sni_missing``, ``not_tls``, ``host_mismatch``, ``bad_request``,
    ``connection_limit``, ``byte_limit`` or ``proxy_down``."""

    host: str
    port: int
    reason: str
    count: int
    raw: Json = field(repr=False)

    @classmethod
    def from_json(cls, raw: Any) -> Blocked:
        d = _dict(raw)
        return cls(
            host=_str(d.get("host")),
            port=_int(d.get("port")),
            reason=_str(d.get("reason")),
            count=_int(d.get("count"), 1),
            raw=d,
        )


@dataclass
class NetworkReport:
    """What an execution's code did on the network (sessions of a server that offers networks): every
    refusal in ``blocked`` (distinct host, port and reason, at most 100; ``blocked_dropped`` counts the
    others) and the bytes moved both ways through allowed connections."""

    blocked: List[Blocked]
    allowed_bytes: int
    raw: Json = field(repr=False)
    blocked_dropped: int = 0

    @classmethod
    def from_json(cls, raw: Any) -> NetworkReport:
        d = _dict(raw)
        return cls(
            blocked=[Blocked.from_json(b) for b in _list(d.get("blocked"))],
            allowed_bytes=_int(d.get("allowed_bytes")),
            raw=d,
            blocked_dropped=_int(d.get("blocked_dropped", 0)),
        )


@dataclass
class NetworkInfo:
    """A session's network now: the names its next connection may reach (``allow``), its connections open
    now, and whether the egress proxy is up (when it is not, every connection is refused)."""

    allow: List[str]
    open_connections: int
    proxy_up: bool
    raw: Json = field(repr=False)

    @classmethod
    def from_json(cls, raw: Any) -> NetworkInfo:
        d = _dict(raw)
        return cls(
            allow=[a for a in _list(d.get("allow")) if isinstance(a, str)],
            open_connections=_int(d.get("open_connections")),
            proxy_up=d.get("proxy_up") is True,
            raw=d,
        )


ExecStatus = Literal["ok", "error", "timeout", "killed"]


@dataclass
class ExecutionResult:
    """What an execution returned. ``status`` is ``ok``, ``error`` (the code raised: see ``error``),
    ``timeout`` (interrupted at its time limit, with the output so far; ``kernel_restarted`` if the kernel
    ignored the interrupt) or ``killed`` (the kernel died: ``killed_reason``). ``network`` says what the
    code was refused on the network (None when the server offers no networks)."""

    status: str
    outputs: List[Output]
    stdout: str
    stderr: str
    execution_count: Optional[int]
    duration_ms: int
    truncated: bool
    kernel_restarted: bool
    killed_reason: Optional[str]
    stream_events_dropped: int
    error: Optional[ExecutionError]
    files: List[SavedImage]
    raw: Json = field(repr=False)
    #: The refusals and bytes of the code's connections (None from a server that offers no networks).
    network: Optional[NetworkReport] = None

    @classmethod
    def from_json(cls, raw: Any) -> ExecutionResult:
        d = _dict(raw)
        err = d.get("error")
        net = d.get("network")
        return cls(
            status=_str(d.get("status")),
            outputs=[parse_output(o) for o in _list(d.get("outputs"))],
            stdout=_str(d.get("stdout")),
            stderr=_str(d.get("stderr")),
            execution_count=_opt_int(d.get("execution_count")),
            duration_ms=_int(d.get("duration_ms")),
            truncated=bool(d.get("truncated")),
            kernel_restarted=bool(d.get("kernel_restarted")),
            killed_reason=_opt_str(d.get("killed_reason")),
            stream_events_dropped=_int(d.get("stream_events_dropped")),
            error=(
                ExecutionError(
                    ename=_str(err.get("ename")),
                    evalue=_str(err.get("evalue")),
                    traceback=[str(x) for x in _list(err.get("traceback"))],
                    raw=err,
                )
                if isinstance(err, dict)
                else None
            ),
            files=[
                SavedImage(
                    output_index=_int(f.get("output_index")),
                    mime=_str(f.get("mime")),
                    path=_str(f.get("path")),
                    size=_int(f.get("size")),
                    url=_str(f.get("url")),
                    raw=f,
                )
                for f in (_dict(x) for x in _list(d.get("files")))
            ],
            raw=d,
            network=NetworkReport.from_json(net) if isinstance(net, dict) else None,
        )

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def displays(self) -> List[Display]:
        """Every rich output in order: displays and the cell's result."""
        return [o for o in self.outputs if isinstance(o, Display)]

    @property
    def result(self) -> Optional[Display]:
        """The value of the cell's last expression (``execute_result``), if it had one."""
        return next((d for d in self.displays if d.is_result), None)

    @property
    def text(self) -> Optional[str]:
        """The ``text/plain`` of the cell's value (``6*7`` gives ``"42"``), None when it has none. Printed
        text is in ``stdout``."""
        r = self.result
        return r.text if r is not None else None

    @property
    def images(self) -> List[Display]:
        """The outputs that carry an image (``images[0].png`` is the PNG's bytes)."""
        return [d for d in self.displays if d.is_image]

    @property
    def html(self) -> List[str]:
        return [h for h in (d.html for d in self.displays) if h is not None]

    @property
    def json(self) -> List[Any]:
        return [d.json for d in self.displays if "application/json" in d.data]

    def output_text(self, *, strip_ansi: bool = True) -> str:
        """What a person would read, in order: printed text, the text of results and displays, the error's
        traceback. For an LLM tool's answer."""
        parts: List[str] = []
        for o in self.outputs:
            if isinstance(o, Stream):
                parts.append(o.text)
            elif isinstance(o, Display):
                if o.text is not None:
                    parts.append(o.text if o.text.endswith("\n") else o.text + "\n")
            else:
                t = o.format(strip_ansi=strip_ansi)
                parts.append(t if t.endswith("\n") else t + "\n")
        if self.status == "timeout":
            parts.append("[timed out]\n")
        elif self.status == "killed":
            parts.append(f"[kernel killed: {self.killed_reason or 'unknown reason'}]\n")
        return "".join(parts)


# ---------------------------------------------------------------------------------------------------- events


@dataclass
class OutputEvent:
    """An output as it happened (streamed executions)."""

    output: Output
    kind: Literal["output"] = "output"


@dataclass
class UpdateEvent:
    """A display replaced in place (``display_id``): every display with that id now shows ``output``."""

    output: Display
    display_id: str
    kind: Literal["update"] = "update"


@dataclass
class ClearEvent:
    """``clear_output``: the outputs so far were cleared."""

    kind: Literal["clear"] = "clear"


@dataclass
class InputRequest:
    """The code waits for input (``input()``, ``getpass()``): answer with ``Execution.send_input``."""

    prompt: str
    password: bool
    kind: Literal["input_request"] = "input_request"


@dataclass
class NetworkBlockedEvent:
    """A connection of the code was just refused by the session's network rules (the result's
    ``network.blocked`` has them all, counted): allow the host with ``Session.set_network`` and retry."""

    blocked: Blocked
    kind: Literal["network_blocked"] = "network_blocked"


Event = Union[OutputEvent, UpdateEvent, ClearEvent, InputRequest, NetworkBlockedEvent]


# ---------------------------------------------------------------------------------------------------- sessions


@dataclass
class SessionLimits:
    memory_mb: int
    cpus: float
    pids: int
    timeout_s: int
    idle_timeout_s: int
    tmpfs_mb: int

    @classmethod
    def from_json(cls, raw: Any) -> SessionLimits:
        d = _dict(raw)
        return cls(
            memory_mb=_int(d.get("memory_mb")),
            cpus=_float(d.get("cpus")),
            pids=_int(d.get("pids")),
            timeout_s=_int(d.get("timeout_s")),
            idle_timeout_s=_int(d.get("idle_timeout_s")),
            tmpfs_mb=_int(d.get("tmpfs_mb")),
        )


@dataclass
class SessionInfo:
    """A session as the API shows it. ``status``: ``starting``, ``idle``, ``busy``, ``restarting``, ``dead``."""

    id: str
    language: str
    status: str
    created_at: str
    last_used_at: str
    limits: SessionLimits
    metadata: Dict[str, str]
    executions: int
    kernel: Optional[Json]
    dead_reason: Optional[str]
    #: Whether the service restarts a kernel that dies (within its bound), and how often it did.
    auto_restart: bool
    auto_restarts: int
    raw: Json = field(repr=False)
    #: The OCI runtime its container runs under: ``runc``, or ``runsc`` (gVisor's user-space kernel).
    runtime: str = "runc"

    @classmethod
    def from_json(cls, raw: Any) -> SessionInfo:
        d = _dict(raw)
        kernel = d.get("kernel")
        return cls(
            id=_str(d.get("id")),
            language=_str(d.get("language")),
            status=_str(d.get("status")),
            created_at=_str(d.get("created_at")),
            last_used_at=_str(d.get("last_used_at")),
            limits=SessionLimits.from_json(d.get("limits")),
            metadata={str(k): str(v) for k, v in _dict(d.get("metadata")).items()},
            executions=_int(d.get("executions")),
            kernel=kernel if isinstance(kernel, dict) else None,
            dead_reason=_opt_str(d.get("dead_reason")),
            auto_restart=d.get("auto_restart") is not False,
            auto_restarts=_int(d.get("auto_restarts", 0)),
            raw=d,
            runtime=_str(d.get("runtime", "runc")),
        )


@dataclass
class PoolStatus:
    """Kernels booted ahead of demand for a language: ``target`` now (between ``floor`` and ``ceiling``,
    following recent creates), ``ready`` and ``booting`` now, and the ``hits`` and ``misses`` of creates
    since the server started (0 from a server that does not report them)."""

    target: int
    ready: int
    booting: int
    floor: int = 0
    ceiling: int = 0
    hits: int = 0
    misses: int = 0


@dataclass
class Language:
    name: str
    image: str
    available: bool
    display_name: Optional[str]
    language_version: Optional[str]
    pool: PoolStatus
    raw: Json = field(repr=False)
    #: The OCI runtime its sessions run under unless they ask, and those they may ask for (default first).
    runtime: str = "runc"
    runtimes: List[str] = field(default_factory=lambda: ["runc"])

    @classmethod
    def from_json(cls, raw: Any) -> Language:
        d = _dict(raw)
        pool = _dict(d.get("pool"))
        return cls(
            name=_str(d.get("name")),
            image=_str(d.get("image")),
            available=bool(d.get("available")),
            display_name=_opt_str(d.get("display_name")),
            language_version=_opt_str(d.get("language_version")),
            pool=PoolStatus(
                target=_int(pool.get("target")),
                ready=_int(pool.get("ready")),
                booting=_int(pool.get("booting")),
                floor=_int(pool.get("floor", 0)),
                ceiling=_int(pool.get("ceiling", 0)),
                hits=_int(pool.get("hits", 0)),
                misses=_int(pool.get("misses", 0)),
            ),
            raw=d,
            runtime=_str(d.get("runtime", "runc")),
            runtimes=[str(r) for r in d.get("runtimes", ["runc"]) if isinstance(r, str)],
        )


# ---------------------------------------------------------------------------------------------------- files


@dataclass
class FileEntry:
    """``kind``: ``file``, ``directory``, ``symlink`` (listed, never followed) or ``other``."""

    name: str
    size: int
    kind: str
    mtime: float


@dataclass
class Listing:
    path: str
    entries: List[FileEntry]
    #: More entries than the service lists (10,000): the rest are not here.
    truncated: bool
    raw: Json = field(repr=False)

    @classmethod
    def from_json(cls, raw: Any) -> Listing:
        d = _dict(raw)
        return cls(
            path=_str(d.get("path")),
            entries=[
                FileEntry(
                    name=_str(e.get("name")),
                    size=_int(e.get("size")),
                    kind=_str(e.get("kind")),
                    mtime=_float(e.get("mtime")),
                )
                for e in (_dict(x) for x in _list(d.get("entries")))
            ],
            truncated=bool(d.get("truncated")),
            raw=d,
        )

    @property
    def names(self) -> List[str]:
        return [e.name for e in self.entries]


@dataclass
class Written:
    """A file uploaded: its path relative to the working directory, size and modification time."""

    path: str
    size: int
    mtime: float

    @classmethod
    def from_json(cls, raw: Any) -> Written:
        d = _dict(raw)
        return cls(path=_str(d.get("path")), size=_int(d.get("size")), mtime=_float(d.get("mtime")))


# ---------------------------------------------------------------------------------------------------- packages


@dataclass
class PackageResult:
    spec: str
    name: str
    version: Optional[str]
    error: Optional[str]


@dataclass
class InstallReport:
    """What an install did. ``ok`` is False when any package failed (``packages[i].error`` says why); the
    session then keeps what it had."""

    ok: bool
    language: str
    packages: List[PackageResult]
    cached: bool
    downloaded: List[str]
    installed: List[str]
    log: str
    duration_ms: int
    raw: Json = field(repr=False)

    @classmethod
    def from_json(cls, raw: Any) -> InstallReport:
        d = _dict(raw)
        return cls(
            ok=bool(d.get("ok")),
            language=_str(d.get("language")),
            packages=[
                PackageResult(
                    spec=_str(p.get("spec")),
                    name=_str(p.get("name")),
                    version=_opt_str(p.get("version")),
                    error=_opt_str(p.get("error")),
                )
                for p in (_dict(x) for x in _list(d.get("packages")))
            ],
            cached=bool(d.get("cached")),
            downloaded=[str(x) for x in _list(d.get("downloaded"))],
            installed=[str(x) for x in _list(d.get("installed"))],
            log=_str(d.get("log")),
            duration_ms=_int(d.get("duration_ms")),
            raw=d,
        )
