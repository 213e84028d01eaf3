"""Exceptions: one class per error code of the API, grouped under a class per HTTP status.

Every error the API answers is `{"error": {"code", "message"}}`; :func:`from_response` turns it into the
class named after its code (``queue_full`` -> :class:`QueueFull`, a subclass of :class:`TooManyRequests`), so
callers can catch as narrowly or as broadly as they like. A code this client does not know yet falls back to
its status's class, never to a bare exception. Some codes share their status's class and are told apart by
``code``: network by name's ``network_off`` (the server offers no networks) is a :class:`Forbidden`,
``invalid_network`` and ``network_forbidden`` (the message names the entry) are :class:`InvalidRequest`.

An execution that *ran* is not an API error: an error in the code is a result with ``status == "error"``.
A kernel killed under it (out of memory, the session deleted) raises :class:`ExecutionKilled`
(:class:`OutOfMemory` for the memory limit) carrying the result, since the session's state is gone.
"""

from __future__ import annotations

import email.utils
import json
import math
import time
from typing import TYPE_CHECKING, Any, Optional

import httpx

if TYPE_CHECKING:
    from .models import ExecutionResult

__all__ = [
    "KernelboxError",
    "TransportError",
    "APIError",
    "BadRequest",
    "InvalidJson",
    "InvalidBody",
    "NotSupported",
    "Unauthorized",
    "Forbidden",
    "OutsideWorkingDirectory",
    "NotFound",
    "SessionNotFound",
    "FileNotFound",
    "RequestTimeout",
    "TransferStalled",
    "Conflict",
    "SessionNotRunning",
    "SessionClosing",
    "NoInputWaiting",
    "InstallRunning",
    "WrongKind",
    "PayloadTooLarge",
    "TooLarge",
    "UnsupportedMediaType",
    "InvalidRequest",
    "UnknownLanguage",
    "InvalidPath",
    "InvalidPackageSpec",
    "TooManyRequests",
    "RateLimited",
    "TooManySessions",
    "QueueFull",
    "TooManyTransfers",
    "TooManyDownloads",
    "ServerError",
    "InternalError",
    "BadGateway",
    "DockerError",
    "KernelError",
    "FileToolFailed",
    "FetcherFailed",
    "ServiceUnavailable",
    "DockerUnavailable",
    "ImageMissing",
    "KernelStartFailed",
    "GatewayTimeout",
    "InstallTimeout",
    "InsufficientStorage",
    "DiskFull",
    "ExecutionKilled",
    "OutOfMemory",
    "from_response",
]


class KernelboxError(Exception):
    """Anything this client raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TransportError(KernelboxError):
    """The service could not be reached or the connection broke (the cause is httpx's exception)."""


class APIError(KernelboxError):
    """The API answered with an error: ``status`` (HTTP), ``code`` (stable, machine-readable), ``message``."""

    #: The HTTP status this class stands for (the fallback for codes this client does not know).
    http_status: Optional[int] = None

    def __init__(self, message: str, *, status: int, code: str, headers: Optional[httpx.Headers] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.headers = headers if headers is not None else httpx.Headers()

    @property
    def retry_after(self) -> Optional[float]:
        """Seconds the server asked to wait (its ``Retry-After``), if it said."""
        return parse_retry_after(self.headers.get("retry-after"))

    def __str__(self) -> str:
        return f"{self.message} ({self.status} {self.code})"


class BadRequest(APIError):
    http_status = 400


class InvalidJson(BadRequest):
    pass


class InvalidBody(BadRequest):
    pass


class NotSupported(BadRequest):
    """The session's language cannot do this (e.g. installing packages into bash)."""


class Unauthorized(APIError):
    """No API key, or not a valid one."""

    http_status = 401


class Forbidden(APIError):
    http_status = 403


class OutsideWorkingDirectory(Forbidden):
    """A symlink led out of the session's working directory."""


class NotFound(APIError):
    http_status = 404


class SessionNotFound(NotFound):
    """No such session for this API key (another key's sessions are not found either)."""


class FileNotFound(NotFound):
    pass


class RequestTimeout(APIError):
    http_status = 408


class TransferStalled(RequestTimeout):
    pass


class Conflict(APIError):
    http_status = 409


class SessionNotRunning(Conflict):
    pass


class SessionClosing(Conflict):
    pass


class NoInputWaiting(Conflict):
    """An answer was sent but no execution of the session waits for input."""


class InstallRunning(Conflict):
    pass


class WrongKind(Conflict):
    """A file where a directory was expected, or the other way round."""


class PayloadTooLarge(APIError):
    http_status = 413


class TooLarge(PayloadTooLarge):
    """The upload is larger than the service's upload limit."""


class UnsupportedMediaType(APIError):
    http_status = 415


class InvalidRequest(APIError):
    """Well-formed but not allowed (e.g. more memory than the operator allows)."""

    http_status = 422


class UnknownLanguage(InvalidRequest):
    pass


class InvalidPath(InvalidRequest):
    pass


class InvalidPackageSpec(InvalidRequest):
    pass


class TooManyRequests(APIError):
    """A 429: nothing was done; worth trying again later (the client does, see :class:`kernelbox.Retry`)."""

    http_status = 429


class RateLimited(TooManyRequests):
    pass


class TooManySessions(TooManyRequests):
    pass


class QueueFull(TooManyRequests):
    """The session has as many executions waiting as the service allows."""


class TooManyTransfers(TooManyRequests):
    pass


class TooManyDownloads(TooManyRequests):
    pass


class ServerError(APIError):
    """A 5xx: a broken dependency (Docker down) or a bug in the service."""

    http_status = 500


class InternalError(ServerError):
    pass


class BadGateway(ServerError):
    http_status = 502


class DockerError(BadGateway):
    pass


class KernelError(BadGateway):
    pass


class FileToolFailed(BadGateway):
    pass


class FetcherFailed(BadGateway):
    pass


class ServiceUnavailable(ServerError):
    http_status = 503


class DockerUnavailable(ServiceUnavailable):
    pass


class ImageMissing(ServiceUnavailable):
    pass


class KernelStartFailed(ServiceUnavailable):
    pass


class GatewayTimeout(ServerError):
    http_status = 504


class InstallTimeout(GatewayTimeout):
    pass


class InsufficientStorage(ServerError):
    http_status = 507


class DiskFull(InsufficientStorage):
    """The session's disk (a tmpfs counted in its memory) is full; the session is unharmed."""


class ExecutionKilled(KernelboxError):
    """The kernel died under the execution (``status == "killed"``): its state is gone. ``reason`` is the
    API's ``killed_reason``; ``result`` has the outputs up to then. Restart the session to go on."""

    def __init__(self, result: ExecutionResult) -> None:
        self.reason = result.killed_reason or "killed"
        self.result = result
        super().__init__(f"the kernel was killed: {self.reason}")


class OutOfMemory(ExecutionKilled):
    """The code went over the session's memory limit and the kernel was killed."""


_BY_CODE: dict[str, type[APIError]] = {
    "bad_request": BadRequest,
    "invalid_json": InvalidJson,
    "invalid_body": InvalidBody,
    "not_supported": NotSupported,
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "outside_working_directory": OutsideWorkingDirectory,
    "not_found": SessionNotFound,
    "file_not_found": FileNotFound,
    "request_timeout": RequestTimeout,
    "transfer_stalled": TransferStalled,
    "session_not_running": SessionNotRunning,
    "session_closing": SessionClosing,
    "no_input_waiting": NoInputWaiting,
    "install_running": InstallRunning,
    "wrong_kind": WrongKind,
    "payload_too_large": PayloadTooLarge,
    "too_large": TooLarge,
    "unsupported_media_type": UnsupportedMediaType,
    "invalid_request": InvalidRequest,
    "unknown_language": UnknownLanguage,
    "invalid_path": InvalidPath,
    "invalid_package_spec": InvalidPackageSpec,
    "too_many_requests": TooManyRequests,
    "rate_limited": RateLimited,
    "too_many_sessions": TooManySessions,
    "queue_full": QueueFull,
    "too_many_transfers": TooManyTransfers,
    "too_many_downloads": TooManyDownloads,
    "internal": InternalError,
    "docker_error": DockerError,
    "kernel_error": KernelError,
    "file_tool_failed": FileToolFailed,
    "fetcher_failed": FetcherFailed,
    "unavailable": ServiceUnavailable,
    "docker_unavailable": DockerUnavailable,
    "image_missing": ImageMissing,
    "kernel_start_failed": KernelStartFailed,
    "install_timeout": InstallTimeout,
    "disk_full": DiskFull,
    # Network by name: the status's class (the request, a list of names, says what was refused).
    "network_off": Forbidden,
    "invalid_network": InvalidRequest,
    "network_forbidden": InvalidRequest,
}

_BY_STATUS: dict[int, type[APIError]] = {
    cls.http_status: cls
    for cls in (
        BadRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        RequestTimeout,
        Conflict,
        PayloadTooLarge,
        UnsupportedMediaType,
        InvalidRequest,
        TooManyRequests,
        ServerError,
        BadGateway,
        ServiceUnavailable,
        GatewayTimeout,
        InsufficientStorage,
    )
    if cls.http_status is not None
}


def error_class(status: int, code: str) -> type[APIError]:
    """The class for an error answer: by its code, else by its status, else by its status's class."""
    found = _BY_CODE.get(code) or _BY_STATUS.get(status)
    if found is not None:
        return found
    return ServerError if status >= 500 else APIError


def from_response(response: httpx.Response, body: Optional[bytes] = None) -> APIError:
    """The exception for an error answer; ``body`` is what was read of it (default: the whole body,
    which must have been read)."""
    raw = response.content if body is None else body
    code, message = "", ""
    try:
        data: Any = json.loads(raw)
        detail = data.get("error") if isinstance(data, dict) else None
        if isinstance(detail, dict):
            code = str(detail.get("code") or "")
            message = str(detail.get("message") or "")
    except ValueError:
        pass
    if not message:
        text = raw.decode("utf-8", "replace").strip()[:500]
        message = text or response.reason_phrase or f"HTTP {response.status_code}"
    cls = error_class(response.status_code, code)
    return cls(message, status=response.status_code, code=code or "unknown", headers=response.headers)


def parse_retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` as seconds: a number of seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
