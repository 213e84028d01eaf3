"""What the sync and async clients share, so the two stay the same shape: settings, the retry policy, one
request description per API operation (``Call``), reading error answers, the operation registry that the
coverage test checks against the OpenAPI snapshot, and the decoding of execute's server-sent events.

Nothing here does I/O: ``_sync.py`` and ``_async.py`` send the calls and feed the events.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Callable,
    Dict,
    Generic,
    Iterator,
    List,
    Literal,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote

import httpx

from .errors import APIError, ExecutionKilled, KernelboxError, OutOfMemory, TooManyRequests
from .models import (
    Blocked,
    ClearEvent,
    Display,
    Event,
    ExecutionError,
    ExecutionResult,
    InputRequest,
    NetworkBlockedEvent,
    OutputEvent,
    Stream,
    UpdateEvent,
    parse_output,
)

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

VERSION = "0.1.0"
USER_AGENT = f"kernelbox-python/{VERSION}"

#: Error bodies are read up to this much (they are small JSON; a misbehaving proxy's page is not).
ERROR_BODY_LIMIT = 64 * 1024
#: Upload and download chunk size.
CHUNK = 64 * 1024

ImageMode = Literal["inline", "files"]


class Readable(Protocol):
    """A binary file object (``open(..., "rb")``, ``io.BytesIO``, a socket's file): read in chunks."""

    def read(self, size: int = ..., /) -> Optional[bytes]: ...

    def seekable(self) -> bool: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def tell(self) -> int: ...


#: What an upload takes: the content (``bytes``, or ``str`` as UTF-8), a local file's path
#: (``pathlib.Path``, streamed), or a binary file object (streamed from where it stands).
FileSource = Union[bytes, str, "os.PathLike[str]", Readable]


# ---------------------------------------------------------------------------------------------------- settings


def resolve_base_url(base_url: Optional[str]) -> str:
    url = base_url or os.environ.get("KERNELBOX_URL")
    if not url:
        raise KernelboxError("no service URL: pass Kernelbox(url) or set KERNELBOX_URL")
    return url.rstrip("/")


def resolve_api_key(api_key: Optional[str]) -> Optional[str]:
    return api_key if api_key is not None else os.environ.get("KERNELBOX_API_KEY") or None


def default_headers(api_key: Optional[str], extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    headers = {"user-agent": USER_AGENT}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    headers.update(extra or {})
    return headers


def resolve_timeout(timeout: Union[float, httpx.Timeout, None]) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(60.0 if timeout is None else timeout, connect=10.0)


def longer(base: httpx.Timeout, read: Optional[float]) -> httpx.Timeout:
    """``base`` with a read timeout of at least ``read`` (None: no read timeout)."""
    if read is None or base.read is None:
        return httpx.Timeout(connect=base.connect, read=None, write=base.write, pool=base.pool)
    return httpx.Timeout(connect=base.connect, read=max(base.read, read), write=base.write, pool=base.pool)


# ---------------------------------------------------------------------------------------------------- retries


@dataclass(frozen=True)
class RetryAttempt:
    """Passed to ``Retry.on_retry`` before the client sleeps and tries again."""

    method: str
    path: str
    #: The retry about to be made: 1 for the first.
    attempt: int
    #: The answer that is retried (``error.status``, ``error.code``, ``error.retry_after``).
    error: APIError
    #: Seconds the client will sleep first.
    delay: float


@dataclass(frozen=True)
class Retry:
    """When and how often a refused request is tried again.

    Only 429 (rate limited, queue full, too many sessions: nothing was done) and 503 (Docker or a kernel
    image unavailable) are retried, at most ``max_retries`` times, and an execution only after a 429 (a 503
    could come after the code ran). The wait is the server's ``Retry-After`` when it sends one, else
    exponential: ``backoff`` × 2^n with jitter, at most ``max_backoff``. A ``Retry-After`` above
    ``max_wait`` is not waited for: the error is raised at once. ``Retry(max_retries=0)`` turns retries off.
    """

    max_retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 8.0
    max_wait: float = 60.0
    statuses: Tuple[int, ...] = (429, 503)
    #: Called before each retry (logging, metrics); its return value is ignored.
    on_retry: Optional[Callable[[RetryAttempt], object]] = field(default=None, compare=False)

    def delay(self, call: Call[Any], error: APIError, retries_done: int) -> Optional[float]:
        """Seconds to wait before trying ``call`` again, or None to raise ``error`` now."""
        if retries_done >= self.max_retries or error.status not in self.statuses or not call.replayable:
            return None
        if call.retry == "refused" and not isinstance(error, TooManyRequests):
            return None
        asked = error.retry_after
        if asked is not None:
            return asked if asked <= self.max_wait else None
        step = min(self.max_backoff, self.backoff * 2.0**retries_done)
        return step / 2 + random.uniform(0, step / 2)


# ---------------------------------------------------------------------------------------------------- calls


@dataclass
class Call(Generic[T]):
    """One request to the API and how to read its answer; sent by either client, with retries."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    params: Optional[Dict[str, str]] = None
    #: Makes the body afresh for each attempt (bytes, or an iterator of chunks); None for no body.
    body: Optional[Callable[[], Union[bytes, Iterator[bytes]]]] = None
    headers: Dict[str, str] = field(default_factory=dict)
    #: ``any``: retried on 429 and 503; ``refused``: only on 429 (executions: a 503 may come after the
    #: code ran).
    retry: Literal["any", "refused"] = "any"
    #: False when the body cannot be sent twice (a stream read once).
    replayable: bool = True
    #: The read timeout this call needs at least (None: none), on top of the client's.
    read_timeout: Optional[float] = 0.0
    stream: bool = False


def segment(text: str) -> str:
    """One URL path segment, percent-encoded. ``.`` and ``..`` are encoded too (``%2E``): left as they are,
    the URL would be normalised before it is sent and name another endpoint (``files/..`` is the session
    itself); encoded, the service sees them and refuses them as it should."""
    if text in (".", ".."):
        return text.replace(".", "%2E")
    return quote(text, safe="")


def session_path(session_id: str, *rest: str) -> str:
    return "/".join(["/v1/sessions", segment(session_id)] + list(rest))


def file_path(session_id: str, path: str) -> str:
    """The URL of a file in the session; ``path`` relative to the working directory, each part encoded."""
    clean = path.strip("/")
    if not clean or clean == ".":
        raise ValueError("a file path is needed (relative to the session's working directory)")
    return session_path(session_id, "files", "/".join(segment(part) for part in clean.split("/")))


def no_content(response: httpx.Response) -> None:
    return None


def json_object(response: httpx.Response) -> Dict[str, Any]:
    value = response.json()
    if not isinstance(value, dict):
        raise KernelboxError(f"expected a JSON object from the service, got {type(value).__name__}")
    return value


def session_request(
    language: str,
    *,
    memory_mb: Optional[int],
    cpus: Optional[float],
    timeout_s: Optional[int],
    idle_timeout_s: Optional[int],
    env: Optional[Mapping[str, str]],
    metadata: Optional[Mapping[str, str]],
    auto_restart: Optional[bool] = None,
    runtime: Optional[str] = None,
    network: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"language": language}
    for key, value in (
        ("memory_mb", memory_mb),
        ("cpus", cpus),
        ("timeout_s", timeout_s),
        ("idle_timeout_s", idle_timeout_s),
        ("runtime", runtime),
    ):
        if value is not None:
            body[key] = value
    if env is not None:
        body["env"] = dict(env)
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if auto_restart is not None:
        body["auto_restart"] = auto_restart
    if network is not None:
        body["network"] = network_request(network)
    return body


def network_request(allow: Sequence[str]) -> Dict[str, Any]:
    """A session's network as the API takes it: ``{"allow": [...]}``; an empty list is sent as it is (a
    network with no name on it yet). A lone string is refused rather than sent letter by letter."""
    if isinstance(allow, (str, bytes)):
        raise TypeError(f"network takes a list of host names, not a {type(allow).__name__} (write [{allow!r}])")
    return {"allow": [str(a) for a in allow]}


def execute_request(
    code: str, *, timeout: Optional[float], stdin: Optional[Sequence[str]], images: ImageMode
) -> Dict[str, Any]:
    body: Dict[str, Any] = {"code": code}
    if timeout is not None:
        # The API counts whole seconds; round up so a limit is never shorter than asked.
        body["timeout_s"] = max(1, int(-(-timeout // 1)))
    if stdin:
        body["stdin"] = list(stdin)
    if images != "inline":
        body["images"] = images
    return body


def file_body(data: FileSource) -> Tuple[Callable[[], Union[bytes, Iterator[bytes]]], Dict[str, str], bool]:
    """An upload's body: a factory making it per attempt, its headers, and whether it can be sent again.
    ``bytes`` and ``str`` (UTF-8) are the content; a path (``pathlib.Path``) or a binary file object is
    streamed in chunks, never read whole."""
    headers = {"content-type": "application/octet-stream"}
    if isinstance(data, str):
        data = data.encode()
    if isinstance(data, bytes):
        content = data
        return (lambda: content), headers, True
    if isinstance(data, os.PathLike):
        path = os.fspath(data)
        headers["content-length"] = str(os.path.getsize(path))

        def from_path() -> Iterator[bytes]:
            with open(path, "rb") as f:
                yield from iter(lambda: f.read(CHUNK), b"")

        return from_path, headers, True
    stream = data
    start: Optional[int] = None
    try:
        if stream.seekable():
            start = stream.tell()
            end = stream.seek(0, os.SEEK_END)
            stream.seek(start)
            headers["content-length"] = str(end - start)
    except (AttributeError, OSError, ValueError):
        start = None

    def from_stream() -> Iterator[bytes]:
        if start is not None:
            stream.seek(start)
        while True:
            chunk = stream.read(CHUNK)
            if not chunk:
                return
            yield chunk

    return from_stream, headers, start is not None


# ---------------------------------------------------------------------------------------------------- operations

#: The attribute on a method that names the API operation it performs.
OPERATION_ATTR = "__kernelbox_operation__"


def operation(method: str, path: str) -> Callable[[F], F]:
    """Marks a method as the client's way to perform ``method path`` of the API (as the OpenAPI document
    names it). The test suite checks that every ``/v1`` operation of the snapshot has one, in both flavours."""

    def mark(f: F) -> F:
        setattr(f, OPERATION_ATTR, (method.upper(), path))
        return f

    return mark


def operations(*classes: type) -> Dict[Tuple[str, str], List[str]]:
    """``(METHOD, path)`` → the ``Class.method`` names that perform it, over ``classes``."""
    found: Dict[Tuple[str, str], List[str]] = {}
    for cls in classes:
        for name in dir(cls):
            op = getattr(getattr(cls, name, None), OPERATION_ATTR, None)
            if op is not None:
                found.setdefault(op, []).append(f"{cls.__name__}.{name}")
    return found


# ---------------------------------------------------------------------------------------------------- events


class StreamDecoder:
    """Turns execute's server-sent events into :class:`Event` values until the ``result`` event."""

    def __init__(self) -> None:
        self.result: Optional[ExecutionResult] = None

    def decode(self, event: str, data: str) -> Optional[Event]:
        if event == "result":
            self.result = ExecutionResult.from_json(json.loads(data))
            return None
        if event == "output":
            return OutputEvent(parse_output(json.loads(data)))
        if event == "update":
            shown = parse_output(json.loads(data))
            if isinstance(shown, Display) and shown.display_id is not None:
                return UpdateEvent(shown, shown.display_id)
            return None
        if event == "clear":
            return ClearEvent()
        if event == "input_request":
            asked = json.loads(data)
            asked = asked if isinstance(asked, dict) else {}
            prompt = asked.get("prompt")
            return InputRequest(prompt if isinstance(prompt, str) else "", bool(asked.get("password")))
        if event == "network_blocked":
            return NetworkBlockedEvent(Blocked.from_json(json.loads(data)))
        if event == "error":
            raise KernelboxError(f"the service could not encode an event: {data}")
        # An event this client does not know (a newer service): skipped, the result still has everything.
        return None


@dataclass
class Callbacks:
    """What ``run`` calls while an execution streams. Each is called in the order the outputs happen;
    for the async client a callback may also be a coroutine function."""

    on_stdout: Optional[Callable[[str], object]] = None
    on_stderr: Optional[Callable[[str], object]] = None
    #: New displays and the cell's result (updates in place come as ``UpdateEvent`` to ``on_event``).
    on_display: Optional[Callable[[Display], object]] = None
    on_error: Optional[Callable[[ExecutionError], object]] = None
    #: Answers a prompt once ``stdin`` has run out; without it such a prompt interrupts the execution.
    on_input: Optional[Callable[[InputRequest], object]] = None
    #: Every event, as it comes (after the specific callback): ``UpdateEvent``, ``ClearEvent`` and
    #: ``NetworkBlockedEvent`` only here.
    on_event: Optional[Callable[[Event], object]] = None

    def any(self) -> bool:
        return any(
            cb is not None
            for cb in (self.on_stdout, self.on_stderr, self.on_display, self.on_error, self.on_input, self.on_event)
        )

    def calls(self, event: Event) -> List[Tuple[Callable[[Any], object], Any]]:
        """The callbacks ``event`` triggers (not ``on_input``: the clients answer prompts themselves)."""
        out: List[Tuple[Callable[[Any], object], Any]] = []
        if isinstance(event, OutputEvent):
            o = event.output
            if isinstance(o, Stream):
                cb = self.on_stdout if o.name == "stdout" else self.on_stderr
                if cb is not None:
                    out.append((cb, o.text))
            elif isinstance(o, Display):
                if self.on_display is not None:
                    out.append((self.on_display, o))
            elif self.on_error is not None:
                out.append((self.on_error, o))
        if self.on_event is not None:
            out.append((self.on_event, event))
        return out


def finish(result: ExecutionResult) -> ExecutionResult:
    """``run``'s last step: a kernel killed under the execution is an exception (its state is gone)."""
    if result.status == "killed":
        if result.killed_reason == "out_of_memory":
            raise OutOfMemory(result)
        raise ExecutionKilled(result)
    return result


def input_answer(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"on_input must return a str, not {type(value).__name__}")
    return value


async def aiter_chunks(chunks: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A sync chunk iterator as an async one (the async client's upload body)."""
    for chunk in chunks:
        yield chunk
