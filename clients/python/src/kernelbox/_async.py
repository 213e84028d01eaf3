"""The asyncio client: :class:`AsyncKernelbox`, :class:`AsyncSession` (with ``files`` and ``packages``)
and :class:`AsyncExecution`, the same shape as ``_sync.py`` with ``await``. Callbacks may be plain
functions or coroutine functions. Cancelling a task that awaits an execution closes its connection, and the
service interrupts the code."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
from types import TracebackType
from typing import (
    IO,
    Any,
    AsyncGenerator,
    Callable,
    Dict,
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

__all__ = ["AsyncKernelbox", "AsyncSession", "AsyncFiles", "AsyncPackages", "AsyncExecution"]


async def _maybe_await(value: object) -> object:
    return await value if inspect.isawaitable(value) else value


class AsyncKernelbox:
    """A connection to a kernelbox service, for asyncio; see :class:`kernelbox.Kernelbox` for the
    arguments (``http_client`` is an ``httpx.AsyncClient`` here)."""

    def __init__(
        self,
        base_url: Optional[str] = None,
        *,
        api_key: Optional[str] = None,
        timeout: Union[float, httpx.Timeout, None] = None,
        retry: Optional[Retry] = None,
        headers: Optional[Mapping[str, str]] = None,
        http_client: Optional[httpx.AsyncClient] = None,
    ) -> None:
        self.base_url = _core.resolve_base_url(base_url)
        self.retry = retry if retry is not None else Retry()
        self._timeout = _core.resolve_timeout(timeout)
        self._headers = _core.default_headers(_core.resolve_api_key(api_key), headers)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(timeout=self._timeout)

    # -- plumbing

    def _request(self, call: Call[Any]) -> httpx.Request:
        body = call.body() if call.body is not None else None
        return self._http.build_request(
            call.method,
            self.base_url + call.path,
            params=call.params,
            json=call.json,
            content=body if body is None or isinstance(body, bytes) else _core.aiter_chunks(body),
            headers={**self._headers, **call.headers},
            timeout=_core.longer(self._timeout, call.read_timeout),
        )

    async def _send(self, call: Call[Any]) -> httpx.Response:
        retries = 0
        while True:
            try:
                response = await self._http.send(self._request(call), stream=True)
            except httpx.TransportError as e:
                raise TransportError(f"{call.method} {call.path}: {e}") from e
            if response.status_code < 400:
                if not call.stream:
                    try:
                        await response.aread()
                    except httpx.TransportError as e:
                        raise TransportError(f"{call.method} {call.path}: {e}") from e
                    finally:
                        await response.aclose()
                return response
            error = await self._read_error(response)
            delay = self.retry.delay(call, error, retries)
            if delay is None:
                raise error
            retries += 1
            if self.retry.on_retry is not None:
                self.retry.on_retry(RetryAttempt(call.method, call.path, retries, error, delay))
            await asyncio.sleep(delay)

    @staticmethod
    async def _read_error(response: httpx.Response) -> APIError:
        body = b""
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= _core.ERROR_BODY_LIMIT:
                    break
        except httpx.TransportError:
            pass
        finally:
            await response.aclose()
        return from_response(response, body[: _core.ERROR_BODY_LIMIT])

    async def _call(self, call: Call[T]) -> T:
        return call.parse(await self._send(call))

    # -- the API

    @operation("GET", "/v1/languages")
    async def languages(self) -> List[Language]:
        """The languages the service offers, whether their images are built, and their warm pools."""
        return await self._call(_calls.languages())

    @operation("GET", "/v1/sessions")
    async def list(self) -> List[SessionInfo]:
        """This API key's sessions."""
        return await self._call(_calls.sessions())

    @operation("POST", "/v1/sessions")
    async def session(
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
    ) -> AsyncSession:
        """Starts a session; ``async with await kb.session(...) as s:`` deletes it when the block ends. See
        :meth:`kernelbox.Kernelbox.session` for ``runtime`` and ``network``."""
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
        info = await self._call(call)
        return AsyncSession(self, info.id, info)

    @operation("GET", "/v1/sessions/{id}")
    async def get(self, session_id: str) -> AsyncSession:
        """Attaches to an existing session of this API key (``SessionNotFound`` if there is none)."""
        return AsyncSession(self, session_id, await self._info(session_id))

    async def _info(self, session_id: str) -> SessionInfo:
        return await self._call(_calls.get(session_id))

    async def run_code(
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
        on_input: Optional[Callable[[InputRequest], object]] = None,
        on_event: Optional[Callable[[Event], object]] = None,
    ) -> ExecutionResult:
        """Runs ``code`` once in a fresh session, which is deleted afterwards whatever happens."""
        async with await self.session(language, memory_mb=memory_mb, cpus=cpus, env=env) as s:
            return await s.run(
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

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncKernelbox:
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"AsyncKernelbox({self.base_url!r})"


class AsyncSession:
    """A session, for asyncio; see :class:`kernelbox.Session`."""

    def __init__(self, client: AsyncKernelbox, session_id: str, info: Optional[SessionInfo] = None) -> None:
        self.client = client
        self.id = session_id
        self.last_info = info
        self.files = AsyncFiles(self)
        self.packages = AsyncPackages(self)

    @property
    def language(self) -> Optional[str]:
        return self.last_info.language if self.last_info is not None else None

    @operation("GET", "/v1/sessions/{id}")
    async def info(self) -> SessionInfo:
        self.last_info = await self.client._info(self.id)
        return self.last_info

    @operation("POST", "/v1/sessions/{id}/execute")
    async def run(
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
        on_input: Optional[Callable[[InputRequest], object]] = None,
        on_event: Optional[Callable[[Event], object]] = None,
        request_timeout: Optional[float] = None,
    ) -> ExecutionResult:
        """Runs ``code`` and returns its result; see :meth:`kernelbox.Session.run`. Callbacks may be
        coroutine functions (``on_input`` then returns the answer when awaited)."""
        callbacks = Callbacks(on_stdout, on_stderr, on_display, on_error, on_input, on_event)
        if not callbacks.any():
            call = _calls.execute(
                self.id, code, timeout=timeout, stdin=stdin, images=images, request_timeout=request_timeout
            )
            return _core.finish(await self.client._call(call))
        async with self.stream(
            code, timeout=timeout, stdin=stdin, images=images, request_timeout=request_timeout
        ) as ex:
            async for event in ex:
                for cb, arg in callbacks.calls(event):
                    await _maybe_await(cb(arg))
                if isinstance(event, InputRequest):
                    if callbacks.on_input is None:
                        await self.interrupt()
                    else:
                        answer = await _maybe_await(callbacks.on_input(event))
                        await ex.send_input(_core.input_answer(answer))
            return _core.finish(await ex.wait())

    @operation("POST", "/v1/sessions/{id}/execute")
    def stream(
        self,
        code: str,
        *,
        timeout: Optional[float] = None,
        stdin: Optional[Sequence[str]] = None,
        images: ImageMode = "inline",
        request_timeout: Optional[float] = None,
    ) -> AsyncExecution:
        """``async with s.stream(code) as ex: async for event in ex: ...``; see
        :meth:`kernelbox.Session.stream`."""
        call = _calls.execute_stream(
            self.id, code, timeout=timeout, stdin=stdin, images=images, request_timeout=request_timeout
        )
        return AsyncExecution(self, call)

    @operation("POST", "/v1/sessions/{id}/input")
    async def send_input(self, value: str) -> None:
        await self.client._call(_calls.send_input(self.id, value))

    @operation("POST", "/v1/sessions/{id}/interrupt")
    async def interrupt(self) -> None:
        await self.client._call(_calls.interrupt(self.id))

    @operation("GET", "/v1/sessions/{id}/network")
    async def network(self) -> NetworkInfo:
        """The session's network now; see :meth:`kernelbox.Session.network`."""
        return await self.client._call(_calls.network(self.id))

    @operation("PUT", "/v1/sessions/{id}/network")
    async def set_network(self, allow: Sequence[str]) -> NetworkInfo:
        """Replaces the names the session's code may reach; see :meth:`kernelbox.Session.set_network`."""
        return await self.client._call(_calls.set_network(self.id, allow))

    @operation("POST", "/v1/sessions/{id}/restart")
    async def restart(self) -> SessionInfo:
        self.last_info = await self.client._call(_calls.restart(self.id))
        return self.last_info

    @operation("GET", "/v1/sessions/{id}/notebook")
    async def notebook(self) -> Dict[str, Any]:
        return await self.client._call(_calls.notebook(self.id))

    @operation("DELETE", "/v1/sessions/{id}")
    async def delete(self) -> None:
        await self.client._call(_calls.delete(self.id))

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        try:
            await self.delete()
        except SessionNotFound:
            pass
        except KernelboxError:
            if exc is None:
                raise

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r}, language={self.language!r})"


class AsyncExecution:
    """A streamed execution, for asyncio: ``async for`` its events; :attr:`result` once they are over."""

    def __init__(self, session: AsyncSession, call: Call[None]) -> None:
        self.session = session
        self._call = call
        self._response: Optional[httpx.Response] = None
        self._events: Optional[AsyncGenerator[Event, None]] = None
        self._decoder = _core.StreamDecoder()

    @property
    def result(self) -> Optional[ExecutionResult]:
        return self._decoder.result

    async def _open(self) -> AsyncGenerator[Event, None]:
        if self._events is None:
            self._response = await self.session.client._send(self._call)
            # Not a method: the generator must not hold the execution (see the sync flavour).
            self._events = _read_events(self._decoder, self._response)
        return self._events

    def __aiter__(self) -> AsyncExecution:
        return self

    async def __anext__(self) -> Event:
        # Not a generator of its own: one that stops early is left to the garbage collector, which would
        # keep the connection (and so the code) going until it runs.
        return await (await self._open()).__anext__()

    async def send_input(self, value: str) -> None:
        await self.session.send_input(value)

    async def wait(self) -> ExecutionResult:
        async for _ in await self._open():
            pass
        assert self._decoder.result is not None
        return self._decoder.result

    async def aclose(self) -> None:
        """Stops listening: if the code still runs, the service interrupts it."""
        if self._response is not None:
            await self._response.aclose()
        if self._events is not None:
            await self._events.aclose()

    async def __aenter__(self) -> AsyncExecution:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException], tb: Optional[TracebackType]
    ) -> None:
        await self.aclose()


async def _read_events(decoder: _core.StreamDecoder, response: httpx.Response) -> AsyncGenerator[Event, None]:
    """The events of an open execute stream, until its result (in ``decoder.result``)."""
    try:
        async for sse in EventSource(response).aiter_sse():
            event = decoder.decode(sse.event, sse.data)
            if event is not None:
                yield event
            if decoder.result is not None:
                return
    except httpx.TransportError as e:
        raise TransportError(f"the event stream broke: {e}") from e
    finally:
        await response.aclose()
    raise TransportError("the event stream ended before its result")


class AsyncFiles:
    """The session's working directory; see :class:`kernelbox.Files`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @operation("PUT", "/v1/sessions/{id}/files/{path}")
    async def upload(self, path: str, data: FileSource) -> Written:
        return await self._session.client._call(_calls.upload(self._session.id, path, data))

    @overload
    async def download(self, path: str) -> bytes: ...

    @overload
    async def download(self, path: str, dest: Union[str, os.PathLike[str], IO[bytes]]) -> int: ...

    @operation("GET", "/v1/sessions/{id}/files/{path}")
    async def download(
        self, path: str, dest: Union[str, os.PathLike[str], IO[bytes], None] = None
    ) -> Union[bytes, int]:
        response = await self._session.client._send(_calls.download(self._session.id, path))
        try:
            if dest is None:
                return await response.aread()
            if isinstance(dest, (str, os.PathLike)):
                try:
                    with open(dest, "wb") as f:
                        return await _copy(response, f)
                except BaseException:
                    # No half-written file is left behind.
                    with contextlib.suppress(OSError):
                        os.unlink(dest)
                    raise
            return await _copy(response, dest)
        except httpx.TransportError as e:
            raise TransportError(f"the download of {path} broke: {e}") from e
        finally:
            await response.aclose()

    @operation("GET", "/v1/sessions/{id}/files")
    async def list(self, path: str = ".") -> Listing:
        return await self._session.client._call(_calls.list_files(self._session.id, path))

    @operation("DELETE", "/v1/sessions/{id}/files/{path}")
    async def delete(self, path: str) -> None:
        await self._session.client._call(_calls.delete_file(self._session.id, path))


async def _copy(response: httpx.Response, out: IO[bytes]) -> int:
    n = 0
    async for chunk in response.aiter_bytes(_core.CHUNK):
        out.write(chunk)
        n += len(chunk)
    return n


class AsyncPackages:
    """Packages installed into the session; see :class:`kernelbox.Packages`."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session

    @operation("POST", "/v1/sessions/{id}/packages")
    async def install(self, packages: Sequence[str]) -> InstallReport:
        return await self._session.client._call(_calls.install(self._session.id, packages))
