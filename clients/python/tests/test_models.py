"""The parts that need no service: reading outputs, error answers and ``Retry-After``."""

from __future__ import annotations

import base64
import email.utils
import time

import httpx

from kernelbox import APIError, Display, ExecutionResult, QueueFull, ServerError, ServiceUnavailable, strip_ansi
from kernelbox.errors import from_response, parse_retry_after


def test_a_display_decodes_its_bundle_and_keeps_it_whole() -> None:
    raw = {
        "output_type": "display_data",
        "data": {
            "image/png": base64.encodebytes(b"\x89PNG fake").decode(),  # with newlines, as Jupyter may send
            "image/svg+xml": ["<svg>", "</svg>"],  # nbformat allows a list of lines
            "application/vnd.custom+json": {"k": 1},
            "text/plain": "<Figure>",
        },
        "metadata": {"image/png": {"width": 10}},
        "transient": {"display_id": "d1"},
    }
    r = ExecutionResult.from_json({"status": "ok", "outputs": [raw], "stdout": "", "stderr": ""})
    d = r.images[0]
    assert isinstance(d, Display) and d.display_id == "d1"
    assert d.png == b"\x89PNG fake" and d.svg == "<svg></svg>" and d.text == "<Figure>"
    assert d.decode("application/vnd.custom+json") == {"k": 1}
    assert d.metadata == {"image/png": {"width": 10}} and d.raw is raw
    assert d.jpeg is None and d.html is None and r.text is None


def test_strip_ansi() -> None:
    assert (
        strip_ansi("\x1b[0;31mZeroDivisionError\x1b[0m: x\x1b]8;;http://a\x07link\x1b]8;;\x07")
        == "ZeroDivisionError: xlink"
    )


def response(status: int, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(status, content=body, headers=headers or {}, request=httpx.Request("GET", "http://x/v1"))


def test_error_answers_become_their_classes() -> None:
    e = from_response(response(429, b'{"error": {"code": "queue_full", "message": "full"}}', {"retry-after": "2"}))
    assert isinstance(e, QueueFull) and e.message == "full" and e.retry_after == 2.0
    # A code this client does not know yet: its status's class.
    e = from_response(response(503, b'{"error": {"code": "something_new", "message": "m"}}'))
    assert type(e) is ServiceUnavailable and e.code == "something_new"
    # Not JSON (a proxy's page): the status's class with the text.
    e = from_response(response(502, b"<html>bad gateway</html>"))
    assert isinstance(e, ServerError) and "bad gateway" in e.message
    e = from_response(response(418, b""))
    assert type(e) is APIError and e.status == 418


def test_retry_after_as_seconds_or_a_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None and parse_retry_after("inf") is None
    later = email.utils.formatdate(time.time() + 3600, usegmt=True)
    seconds = parse_retry_after(later)
    assert seconds is not None and 3000 < seconds <= 3600


def test_dot_segments_reach_the_service_instead_of_naming_another_endpoint() -> None:
    from kernelbox._core import file_path, session_path

    assert file_path("s1", "../x") == "/v1/sessions/s1/files/%2E%2E/x"
    assert file_path("s1", "a/./b c.txt") == "/v1/sessions/s1/files/a/%2E/b%20c.txt"
    assert session_path("..") == "/v1/sessions/%2E%2E"
    assert httpx.Request("DELETE", "http://x" + file_path("s1", "..")).url.raw_path == b"/v1/sessions/s1/files/%2E%2E"
