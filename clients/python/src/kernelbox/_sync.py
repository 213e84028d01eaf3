"""The blocking client: :class:`Kernelbox`, :class:`Session` (with ``files`` and ``packages``) and
:class:`Execution`, a streamed execution. ``_async.py`` is the same shape with ``async``; what they share
(requests, retries, event decoding) is in ``_core.py``."""

from __future__ import annotations

import contextlib
import os
import time
from types import TracebackType
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Generator,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Type,
    TypeVar,
    Union,
    overload,
)

import httpx
from httpx_sse import EventSource

from . import _calls, _core
from ._core import Call, Callbacks, FileSource, ImageMode, Retry, RetryAttempt, operation
from .errors import APIError, KernelboxError, SessionNotFound, TransportError, from_response
from .models import (
    Display,
    Event,
    ExecutionError,
    ExecutionResult,
    InputRequest,
    InstallReport,
    Language,
    Listing,
    NetworkInfo,
    SessionInfo,
    Written,
)

T = TypeVar("T")

__all__ = ["Kernelbox", "Session", "Files", "Packages", "Execution"]


class Kernelbox:
    """A connection to a kernelbox service.

    ``base_url`` and ``api_key`` default to ``KERNELBOX_URL`` and ``KERNELBOX_API_KEY``. ``timeout`` (seconds,
    or an ``httpx.Timeout``) bounds ordinary calls; executions wait as long as their own time limit
    (``run(..., request_timeout=...)`` sets a bound of the caller's), and session starts, restarts and
    installs get the time the service may take. ``retry`` says how refused requests (429, 503) are tried
    again. ``http_client`` lends an ``httpx.Client`` of the caller's (its base URL and headers are set per
    request; it is not closed by :meth:`close`).
    """

    def __init__(
        self,
        base_url: Optional[str] = None,
        *,
        api_key: Optional[str] = None,
        timeout: Union[float, httpx.Timeout, None] = None,
        retry: Optional[Retry] = None,
        headers: Optional[Mapping[str, str]] = None,
        http_client: Optional[httpx.Client] = None,
    ) -> None:
        self.base_url = _core.resolve_base_url(base_url)
        self.retry = retry if retry is not None else Retry()
        self._timeout = _core.resolve_timeout(timeout)
        self._headers = _core.default_headers(_core.resolve_api_key(api_key), headers)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(timeout=self._timeout)

    # -- plumbing

    def _request(self, call: Call[Any]) -> httpx.Request:
        return self._http.build_request(
            call.method,
            self.base_url + call.path,
            params=call.params,
            json=call.json,
            content=call.body() if call.body is not None else None,
            headers={**self._headers, **call.headers},
            timeout=_core.longer(self._timeout, call.read_timeout),
        )

    def _send(self, call: Call[Any]) -> httpx.Response:
        """Sends ``call`` until it is answered without an error to retry; returns the open response (read
        whole unless ``call.stream``). Raises the API's error as its exception."""
        retries = 0
        while True:
            try:
                response = self._http.send(self._request(call), stream=True)
            except httpx.TransportError as e:
                raise TransportError(f"{call.method} {call.path}: {e}") from e
            if response.status_code < 400:
                if not call.stream:
                    try:
                        response.read()
                    except httpx.TransportError as e:
                        raise TransportError(f"{call.method} {call.path}: {e}") from e
                    finally:
                        response.close()
                return response
            error = self._read_error(response)
            delay = self.retry.delay(call, error, retries)
            if delay is None:
                raise error
            retries += 1
            if self.retry.on_retry is not None:
                self.retry.on_retry(RetryAttempt(call.method, call.path, retries, error, delay))
            time.sleep(delay)

    @staticmethod
    def _read_error(response: httpx.Response) -> APIError:
        body = b""
        try:
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) >= _core.ERROR_BODY_LIMIT:
                    break
        except httpx.TransportError:
            pass
        finally:
            response.close()
        return from_response(response, body[: _core.ERROR_BODY_LIMIT])

    def _call(self, call: Call[T]) -> T:
        return call.parse(self._send(call))

    # -- the API

    @operation("GET", "/v1/languages")
    def languages(self) -> List[Language]:
        """The languages the service offers, whether their images are built, and their warm pools."""
        return self._call(_calls.languages())

    @operation("GET", "/v1/sessions")
    def list(self) -> List[SessionInfo]:
        """This API key's sessions."""
        return self._call(_calls.sessions())

    @operation("POST", "/v1/sessions")
    def session(
        self,
        language: str = "python",
        *,
        memory_mb: Optional[int] = None,
        cpus: Optional[float] = None,
        timeout_s: Optional[int] = None,
        idle_timeout_s: Optional[int] = None,
        env: Optional[Mapping[str, str]] = None,
        metadata: Optional[Mapping[str, str]] = None,
        auto_restart: Optional[bool] = None,
        runtime: Optional[str] = None,
        network: Optional[Sequence[str]] = None,
    ) -> Session:
        """Starts a session (a private kernel in its own container) and returns once its kernel is ready.
        Use it in a ``with`` block to have it deleted at the end, also when the block raises. ``runtime``
        asks for an OCI runtime the server offers for the language (``runsc``: gVisor; see ``languages()``).
        ``network`` names the hosts its code may reach through the server's egress proxy (``api.example.com``,
        ``*.example.com``, ``pypi.org:443``; ``[]``: none yet, allowed later with :meth:`Session.set_network`);
        without it the session has no network. A server that offers none refuses a list (``Forbidden``,
        ``network_off``); a malformed or forbidden entry is an ``InvalidRequest`` naming it."""
        call = _calls.create(
            language,
            memory_mb=memory_mb,
            cpus=cpus,
            timeout_s=timeout_s,
            idle_timeout_s=idle_timeout_s,
            env=env,
            metadata=metadata,
            auto_restart=auto_restart,
            runtime=runtime,
            network=network,
        )
        info = self._call(call)
        return Session(self, info.id, info)

    @operation("GET", "/v1/sessions/{id}")
    def get(self, session_id: str) -> Session:
        """Attaches to an existing session of this API key (``SessionNotFound`` if there is none)."""
        return Session(self, session_id, self._info(session_id))

    def _info(self, session_id: str) -> SessionInfo:
        return self._call(_calls.get(session_id))

    def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        timeout: Optional[float] = None,
        stdin: Optional[Sequence[str]] = None,
        images: ImageMode = "inline",
        memory_mb: Optional[int] = None,
        cpus: Optional[float] = None,
        env: Optional[Mapping[str, str]] = None,
        on_stdout: Optional[Callable[[str], object]] = None,
        on_stderr: Optional[Callable[[str], object]] = None,
        on_display: Optional[Callable[[Display], object]] = None,
        on_error: Optional[Callable[[ExecutionError], object]] = None,
        on_input: Optional[Callable[[InputRequest], str]] = None,
        on_event: Optional[Callable[[Event], object]] = None,
    ) -> ExecutionResult:
        """Runs ``code`` once in a fresh session, which is deleted afterwards whatever happens."""
        with self.session(language, memory_mb=memory_mb, cpus=cpus, env=env) as s:
            return s.run(
                code,
                timeout=timeout,
                stdin=stdin,
                images=images,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                on_display=on_display,
                on_error=on_error,
                on_input=on_input,
                on_event=on_event,
            )

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Kernelbox:
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Kernelbox({self.base_url!r})"


class Session:
    """A session: a stateful kernel. Made by :meth:`Kernelbox.session` or attached with
    :meth:`Kernelbox.get`; as a context manager it is deleted when the block ends."""

    def __init__(self, client: Kernelbox, session_id: str, info: Optional[SessionInfo] = None) -> None:
        self.client = client
        self.id = session_id
        #: The session as last seen (at creation, attachment, restart or :meth:`info`).
        self.last_info = info
        self.files = Files(self)
        self.packages = Packages(self)

    @property
    def language(self) -> Optional[str]:
        return self.last_info.language if self.last_info is not None else None

    @operation("GET", "/v1/sessions/{id}")
    def info(self) -> SessionInfo:
        """The session now: status (``idle``, ``busy``, ``dead``, ...), limits, executions so far."""
        self.last_info = self.client._info(self.id)
        return self.last_info

    @operation("POST", "/v1/sessions/{id}/execute")
    def run(
        self,
        code: str,
        *,
        timeout: Optional[float] = None,
        stdin: Optional[Sequence[str]] = None,
        images: ImageMode = "inline",
        on_stdout: Optional[Callable[[str], object]] = None,
        on_stderr: Optional[Callable[[str], object]] = None,
        on_display: Optional[Callable[[Display], object]] = None,
        on_error: Optional[Callable[[ExecutionError], object]] = None,
        on_input: Optional[Callable[[InputRequest], str]] = None,
        on_event: Optional[Callable[[Event], object]] = None,
        request_timeout: Optional[float] = None,
    ) -> ExecutionResult:
        """Runs ``code`` and returns its result. State persists between runs.

        ``timeout`` (seconds) interrupts the kernel at that limit (default: the session's); the result is
        then ``status == "timeout"`` with the output so far. ``stdin`` answers the code's prompts in order.
        With any callback the outputs stream as they happen (server-sent events), each print reaching
        ``on_stdout`` before the next; a prompt after ``stdin`` ran out goes to ``on_input``, or, without it,
        interrupts the code. A callback that raises stops the execution (the kernel is interrupted) and the
        exception propagates. Without callbacks it is one JSON call. A kernel killed under the code raises
        :class:`~kernelbox.ExecutionKilled` (:class:`~kernelbox.OutOfMemory` for the memory limit).
        ``request_timeout`` bounds each wait for data on the client's side (default: none; the service ends
        every execution at its time limit).
        """
        callbacks = Callbacks(on_stdout, on_stderr, on_display, on_error, on_input, on_event)
        if not callbacks.any():
            call = _calls.execute(
                self.id, code, timeout=timeout, stdin=stdin, images=images, request_timeout=request_timeout
            )
            return _core.finish(self.client._call(call))
        with self.stream(code, timeout=timeout, stdin=stdin, images=images, request_timeout=request_timeout) as ex:
            for event in ex:
                for cb, arg in callbacks.calls(event):
                    cb(arg)
                if isinstance(event, InputRequest):
                    if callbacks.on_input is None:
                        self.interrupt()
                    else:
                        ex.send_input(_core.input_answer(callbacks.on_input(event)))
            return _core.finish(ex.wait())

    @operation("POST", "/v1/sessions/{id}/execute")
    def stream(
        self,
        code: str,
        *,
        timeout: Optional[float] = None,
        stdin: Optional[Sequence[str]] = None,
        images: ImageMode = "inline",
        request_timeout: Optional[float] = None,
    ) -> Execution:
        """Starts ``code`` and returns its events as they happen; use it as a context manager and iterate::

            with s.stream(code) as ex:
                for event in ex:
                    ...
            ex.result

        Leaving the block (or :meth:`Execution.close`) before the result closes the connection, and the
        service interrupts the code at once; the session keeps its state. ``request_timeout`` bounds each
        wait for the next event (the service sends a keep-alive every 15 s).
        """
        call = _calls.execute_stream(
            self.id, code, timeout=timeout, stdin=stdin, images=images, request_timeout=request_timeout
        )
        return Execution(self, call)

    @operation("POST", "/v1/sessions/{id}/input")
    def send_input(self, value: str) -> None:
        """Answers the prompt a streamed execution of this session waits on (``NoInputWaiting`` if none)."""
        self.client._call(_calls.send_input(self.id, value))

    @operation("POST", "/v1/sessions/{id}/interrupt")
    def interrupt(self) -> None:
        """Interrupts the running execution, like Ctrl-C; the session keeps its state."""
        self.client._call(_calls.interrupt(self.id))

    @operation("GET", "/v1/sessions/{id}/network")
    def network(self) -> NetworkInfo:
        """The session's network now: the names its next connection may reach (``allow``), its open
        connections, whether the egress proxy is up. ``Forbidden`` (``network_off``) from a server that
        offers no networks."""
        return self.client._call(_calls.network(self.id))

    @operation("PUT", "/v1/sessions/{id}/network")
    def set_network(self, allow: Sequence[str]) -> NetworkInfo:
        """Replaces the names the session's code may reach (``[]`` takes every name away) and returns the
        network as it now is. The next connection follows the list; open connections to a host it drops
        are closed. A malformed entry or one the operator forbids is an ``InvalidRequest`` naming it (the
        list stays as it was)."""
        return self.client._call(_calls.set_network(self.id, allow))

    @operation("POST", "/v1/sessions/{id}/restart")
    def restart(self) -> SessionInfo:
        """A fresh kernel: variables and imports are gone, files and installed packages stay."""
        self.last_info = self.client._call(_calls.restart(self.id))
        return self.last_info

    @operation("GET", "/v1/sessions/{id}/notebook")
    def notebook(self) -> Dict[str, Any]:
        """Every execution so far as a Jupyter notebook (nbformat 4.5), as a dict (``json.dump`` it to save)."""
        return self.client._call(_calls.notebook(self.id))

    @operation("DELETE", "/v1/sessions/{id}")
    def delete(self) -> None:
        """Ends the session and removes its container."""
        self.client._call(_calls.delete(self.id))

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        try:
            self.delete()
        except SessionNotFound:
            pass
        except KernelboxError:
            # Cleaning up must not hide the error that ended the block.
            if exc is None:
                raise

    def __repr__(self) -> str:
        return f"Session({self.id!r}, language={self.language!r})"


class Execution:
    """A streamed execution: iterate for its events; :attr:`result` once they are over."""

    def __init__(self, session: Session, call: Call[None]) -> None:
        self.session = session
        self._call = call
        self._response: Optional[httpx.Response] = None
        self._events: Optional[Generator[Event, None, None]] = None
        self._decoder = _core.StreamDecoder()

    @property
    def result(self) -> Optional[ExecutionResult]:
        """The result, once the last event has been read (None before)."""
        return self._decoder.result

    def _open(self) -> Generator[Event, None, None]:
        if self._events is None:
            self._response = self.session.client._send(self._call)
            # A function of its own, not a method: the generator must not hold the Execution, so that
            # one dropped half-read is freed (and its connection closed) at once, not by a later GC pass.
            self._events = _read_events(self._decoder, self._response)
        return self._events

    def __iter__(self) -> Iterator[Event]:
        return self._open()

    def send_input(self, value: str) -> None:
        """Answers the prompt the code waits on (after an :class:`InputRequest` event)."""
        self.session.send_input(value)

    def wait(self) -> ExecutionResult:
        """Reads the remaining events and returns the result."""
        for _ in self._open():
            pass
        assert self._decoder.result is not None
        return self._decoder.result

    def close(self) -> None:
        """Stops listening: if the code still runs, the service interrupts it."""
        if self._response is not None:
            self._response.close()
        if self._events is not None:
            self._events.close()

    def __enter__(self) -> Execution:
        self._open()
        return self

    def __exit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        self.close()


def _read_events(decoder: _core.StreamDecoder, response: httpx.Response) -> Generator[Event, None, None]:
    """The events of an open execute stream, until its result (in ``decoder.result``)."""
    try:
        for sse in EventSource(response).iter_sse():
            event = decoder.decode(sse.event, sse.data)
            if event is not None:
                yield event
            if decoder.result is not None:
                return
    except httpx.TransportError as e:
        raise TransportError(f"the event stream broke: {e}") from e
    finally:
        response.close()
    raise TransportError("the event stream ended before its result")


class Files:
    """The session's working directory (``/home/kernel``); paths are relative to it."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @operation("PUT", "/v1/sessions/{id}/files/{path}")
    def upload(self, path: str, data: FileSource) -> Written:
        """Writes ``data`` (bytes, a local file's path, or a binary file object, streamed) to ``path``,
        making directories on the way. The file appears whole or not at all."""
        return self._session.client._call(_calls.upload(self._session.id, path, data))

    @overload
    def download(self, path: str) -> bytes: ...

    @overload
    def download(self, path: str, dest: Union[str, os.PathLike[str], IO[bytes]]) -> int: ...

    @operation("GET", "/v1/sessions/{id}/files/{path}")
    def download(self, path: str, dest: Union[str, os.PathLike[str], IO[bytes], None] = None) -> Union[bytes, int]:
        """The file's bytes; or, with ``dest`` (a path or a binary file object), writes them there as they
        arrive, never holding the whole file, and returns how many were written."""
        response = self._session.client._send(_calls.download(self._session.id, path))
        try:
            if dest is None:
                return response.read()
            if isinstance(dest, (str, os.PathLike)):
                try:
                    with open(dest, "wb") as f:
                        return _copy(response, f)
                except BaseException:
                    # No half-written file is left behind.
                    with contextlib.suppress(OSError):
                        os.unlink(dest)
                    raise
            return _copy(response, dest)
        except httpx.TransportError as e:
            raise TransportError(f"the download of {path} broke: {e}") from e
        finally:
            response.close()

    @operation("GET", "/v1/sessions/{id}/files")
    def list(self, path: str = ".") -> Listing:
        """A directory's entries: name, size, kind (``file``, ``directory``, ``symlink``, ``other``), mtime."""
        return self._session.client._call(_calls.list_files(self._session.id, path))

    @operation("DELETE", "/v1/sessions/{id}/files/{path}")
    def delete(self, path: str) -> None:
        """Deletes a file, a symlink (never its target) or a directory with its contents."""
        self._session.client._call(_calls.delete_file(self._session.id, path))


def _copy(response: httpx.Response, out: IO[bytes]) -> int:
    n = 0
    for chunk in response.iter_bytes(_core.CHUNK):
        out.write(chunk)
        n += len(chunk)
    return n


class Packages:
    """Packages installed into the session (the session has no network: the service fetches them)."""

    def __init__(self, session: Session) -> None:
        self._session = session

    @operation("POST", "/v1/sessions/{id}/packages")
    def install(self, packages: Sequence[str]) -> InstallReport:
        """Installs ``packages`` (PEP 508 names with versions for Python, npm names for JavaScript); they
        import in the running kernel at once. ``report.ok`` is False when any failed (the session keeps
        what it had)."""
        return self._session.client._call(_calls.install(self._session.id, packages))
