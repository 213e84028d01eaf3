"""One :class:`~kernelbox._core.Call` per API operation: its method, path, body, how its answer is read,
and when it may be retried. Both flavours send exactly these, so they cannot drift apart."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

from ._core import (
    Call,
    FileSource,
    ImageMode,
    execute_request,
    file_body,
    file_path,
    json_object,
    network_request,
    no_content,
    session_request,
)
from ._core import session_path as path
from .models import ExecutionResult, InstallReport, Language, Listing, NetworkInfo, SessionInfo, Written

#: Starting or restarting a kernel may take the service's start timeout (90 s by default) and more
#: under load; an install its package timeout (300 s by default).
BOOT_WAIT = 300.0
INSTALL_WAIT = 900.0
#: A stream gets a keep-alive every 15 s: a wait this long for the next event means the connection is dead.
STREAM_WAIT = 120.0
SSE_HEADERS = {"accept": "text/event-stream", "cache-control": "no-store"}


def languages() -> Call[List[Language]]:
    return Call("GET", "/v1/languages", lambda r: [Language.from_json(x) for x in r.json()])


def sessions() -> Call[List[SessionInfo]]:
    return Call("GET", "/v1/sessions", lambda r: [SessionInfo.from_json(x) for x in r.json()])


def create(
    language: str,
    *,
    memory_mb: Optional[int],
    cpus: Optional[float],
    timeout_s: Optional[int],
    idle_timeout_s: Optional[int],
    env: Optional[Mapping[str, str]],
    metadata: Optional[Mapping[str, str]],
    auto_restart: Optional[bool],
    runtime: Optional[str] = None,
    network: Optional[Sequence[str]] = None,
) -> Call[SessionInfo]:
    body = session_request(
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
    return Call("POST", "/v1/sessions", lambda r: SessionInfo.from_json(r.json()), json=body, read_timeout=BOOT_WAIT)


def get(session_id: str) -> Call[SessionInfo]:
    return Call("GET", path(session_id), lambda r: SessionInfo.from_json(r.json()))


def delete(session_id: str) -> Call[None]:
    return Call("DELETE", path(session_id), no_content)


def execute(
    session_id: str,
    code: str,
    *,
    timeout: Optional[float],
    stdin: Optional[Sequence[str]],
    images: ImageMode,
    request_timeout: Optional[float],
) -> Call[ExecutionResult]:
    """A plain JSON execution. Retried only on 429: refused before it ran."""
    body = execute_request(code, timeout=timeout, stdin=stdin, images=images)
    return Call(
        "POST",
        path(session_id, "execute"),
        lambda r: ExecutionResult.from_json(r.json()),
        json=body,
        retry="refused",
        read_timeout=request_timeout,
    )


def execute_stream(
    session_id: str,
    code: str,
    *,
    timeout: Optional[float],
    stdin: Optional[Sequence[str]],
    images: ImageMode,
    request_timeout: Optional[float],
) -> Call[None]:
    """A streamed execution (server-sent events); the caller reads the open response."""
    body = execute_request(code, timeout=timeout, stdin=stdin, images=images)
    return Call(
        "POST",
        path(session_id, "execute"),
        no_content,
        json=body,
        headers=dict(SSE_HEADERS),
        retry="refused",
        read_timeout=request_timeout if request_timeout is not None else STREAM_WAIT,
        stream=True,
    )


def send_input(session_id: str, value: str) -> Call[None]:
    return Call("POST", path(session_id, "input"), no_content, json={"value": value}, retry="refused")


def interrupt(session_id: str) -> Call[None]:
    return Call("POST", path(session_id, "interrupt"), no_content)


def restart(session_id: str) -> Call[SessionInfo]:
    return Call("POST", path(session_id, "restart"), lambda r: SessionInfo.from_json(r.json()), read_timeout=BOOT_WAIT)


def notebook(session_id: str) -> Call[Dict[str, Any]]:
    return Call("GET", path(session_id, "notebook"), json_object)


def network(session_id: str) -> Call[NetworkInfo]:
    return Call("GET", path(session_id, "network"), lambda r: NetworkInfo.from_json(r.json()))


def set_network(session_id: str, allow: Sequence[str]) -> Call[NetworkInfo]:
    """Replaces the list (the same list twice is the same state: retried like any call)."""
    return Call(
        "PUT", path(session_id, "network"), lambda r: NetworkInfo.from_json(r.json()), json=network_request(allow)
    )


def upload(session_id: str, file: str, data: FileSource) -> Call[Written]:
    make, headers, replayable = file_body(data)
    return Call(
        "PUT",
        file_path(session_id, file),
        lambda r: Written.from_json(r.json()),
        body=make,
        headers=headers,
        replayable=replayable,
    )


def download(session_id: str, file: str) -> Call[None]:
    """The caller reads the open response in chunks."""
    return Call("GET", file_path(session_id, file), no_content, stream=True)


def list_files(session_id: str, directory: str) -> Call[Listing]:
    params = {} if directory.strip("/") in ("", ".") else {"path": directory}
    return Call("GET", path(session_id, "files"), lambda r: Listing.from_json(r.json()), params=params)


def delete_file(session_id: str, file: str) -> Call[None]:
    return Call("DELETE", file_path(session_id, file), no_content)


def install(session_id: str, packages: Sequence[str]) -> Call[InstallReport]:
    return Call(
        "POST",
        path(session_id, "packages"),
        lambda r: InstallReport.from_json(r.json()),
        json={"packages": list(packages)},
        read_timeout=INSTALL_WAIT,
    )
