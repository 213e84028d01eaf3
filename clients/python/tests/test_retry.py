"""429 and 503: retried with back-off that honours ``Retry-After``, bounded, configurable; an execution
only when the service refused it before it ran. Against a service with a small rate limit
(``KERNELBOX_TEST_LIMITED_URL``: a burst of 2, then one request a second)."""

from __future__ import annotations

from typing import List

import httpx
import pytest
from conftest import env

from kernelbox import Kernelbox, RateLimited, Retry, RetryAttempt, ServiceUnavailable, TooManyRequests
from kernelbox._core import Call, no_content


def test_a_rate_limited_call_waits_as_the_server_asks_and_succeeds(limited_url: str, api_key: str) -> None:
    attempts: List[RetryAttempt] = []
    with Kernelbox(limited_url, api_key=api_key, retry=Retry(max_retries=5, on_retry=attempts.append)) as kb:
        for _ in range(6):
            assert [lang.name for lang in kb.languages()][0] == "python"
    assert attempts, "six calls against a burst of two were refused at least once"
    for a in attempts:
        assert a.error.status == 429 and a.error.code == "rate_limited"
        assert isinstance(a.error, RateLimited)
        assert a.error.retry_after is not None and a.error.retry_after >= 1
        assert a.delay == a.error.retry_after, "the wait is the server's Retry-After"
        assert (a.method, a.path) == ("GET", "/v1/languages")


def test_without_retries_the_429_is_raised_with_its_retry_after(limited_url: str, api_key: str) -> None:
    with Kernelbox(limited_url, api_key=api_key, retry=Retry(max_retries=0)) as kb:
        with pytest.raises(RateLimited) as e:
            for _ in range(10):
                kb.languages()
    assert e.value.retry_after is not None and e.value.retry_after >= 1
    assert "too many requests" in e.value.message


def test_a_retry_after_longer_than_max_wait_is_not_waited_for(limited_url: str, api_key: str) -> None:
    attempts: List[RetryAttempt] = []
    retry = Retry(max_retries=5, max_wait=0.5, on_retry=attempts.append)
    with Kernelbox(limited_url, api_key=api_key, retry=retry) as kb:
        with pytest.raises(TooManyRequests):
            for _ in range(10):
                kb.languages()
    assert attempts == []


def test_an_execution_refused_by_a_full_queue_is_sent_again_and_runs_once(url: str, api_key: str) -> None:
    # The queue holds one waiting execution: `blocker` runs until the file `release` exists, `queued`
    # waits behind it, so the third call is refused (429 queue_full, before it ran). The client's first
    # retry notice releases the blocker; the call is then accepted, and it and `queued` each ran once.
    depth = int(env("KERNELBOX_TEST_QUEUE_DEPTH"))
    assert depth == 1, "this test fills a queue of one"
    attempts: List[RetryAttempt] = []

    def released(attempt: RetryAttempt) -> None:
        attempts.append(attempt)
        if len(attempts) == 1:
            s.files.upload("release", b"")

    retry = Retry(max_retries=50, backoff=0.2, max_backoff=1.0, on_retry=released)
    with Kernelbox(url, api_key=api_key, retry=retry) as kb, kb.session("python") as s:
        s.run("n = 0")
        wait = "import os, time\nfor _ in range(1200):\n    if os.path.exists('release'): break\n    time.sleep(0.05)"
        with s.stream(wait) as blocker, s.stream("n += 1") as queued:
            third = s.run("n += 1\nn")
            assert blocker.wait().status == "ok" and queued.wait().status == "ok"
        assert third.text == "2", "each execution ran exactly once"
        assert s.run("n").text == "2"
    assert attempts and all(a.error.code == "queue_full" for a in attempts)
    assert all(a.path.endswith("/execute") for a in attempts)


def error(status: int, code: str, retry_after: str = "") -> TooManyRequests | ServiceUnavailable:
    from kernelbox.errors import error_class

    headers = httpx.Headers({"retry-after": retry_after} if retry_after else {})
    cls = error_class(status, code)
    e = cls("x", status=status, code=code, headers=headers)
    assert isinstance(e, (TooManyRequests, ServiceUnavailable))
    return e


def test_the_policy() -> None:
    policy = Retry(max_retries=2, backoff=1.0, max_backoff=8.0, max_wait=30)
    ordinary: Call[None] = Call("GET", "/v1/sessions", no_content)
    execution: Call[None] = Call("POST", "/v1/sessions/x/execute", no_content, retry="refused")
    streamed_once: Call[None] = Call("PUT", "/v1/sessions/x/files/f", no_content, replayable=False)

    assert policy.delay(ordinary, error(429, "rate_limited", "3"), 0) == 3
    assert policy.delay(ordinary, error(429, "rate_limited", "31"), 0) is None, "longer than max_wait"
    backoff = policy.delay(ordinary, error(503, "docker_unavailable"), 1)
    assert backoff is not None and 1.0 <= backoff <= 2.0, "exponential with jitter"
    assert policy.delay(ordinary, error(503, "docker_unavailable"), 2) is None, "bounded"

    # An execution may have run when a 503 comes: only a 429 (refused before it ran) is retried.
    assert policy.delay(execution, error(429, "queue_full"), 0) is not None
    assert policy.delay(execution, error(503, "docker_unavailable"), 0) is None
    # A body that was a one-off stream cannot be sent again.
    assert policy.delay(streamed_once, error(429, "rate_limited", "1"), 0) is None
