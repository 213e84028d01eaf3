"""Sessions: languages and pools, start with limits, list, attach by id, restart, delete, the context
manager's cleanup when its block raises, and errors as the API's codes."""

from __future__ import annotations

from typing import List

import pytest
from conftest import env

from kernelbox import (
    InvalidRequest,
    Kernelbox,
    Retry,
    RetryAttempt,
    Session,
    SessionNotFound,
    TooManySessions,
    Unauthorized,
    UnknownLanguage,
)


def test_languages_list_every_kernel_with_its_pool(kb: Kernelbox) -> None:
    languages = {lang.name: lang for lang in kb.languages()}
    assert {"python", "python_scientific", "javascript", "typescript", "java", "bash"} <= set(languages)
    python = languages["python"]
    assert python.available and python.image and python.display_name
    assert python.pool.target >= 0 and python.pool.ready >= 0 and python.pool.booting >= 0
    assert python.pool.floor <= python.pool.target <= max(python.pool.ceiling, python.pool.floor)
    assert python.pool.hits >= 0 and python.pool.misses >= 0
    assert python.raw["name"] == "python"
    assert python.runtime == "runc" and python.runtimes == ["runc"], "this server offers no other runtime"


def test_a_session_starts_with_its_limits_and_is_listed_attached_and_deleted(
    kb: Kernelbox, url: str, api_key: str
) -> None:
    s = kb.session("python", memory_mb=512, timeout_s=30, metadata={"owner": "tests"})
    try:
        assert s.id and s.language == "python"
        assert s.last_info is not None
        assert s.last_info.limits.memory_mb == 512 and s.last_info.limits.timeout_s == 30
        assert s.last_info.metadata == {"owner": "tests"}
        assert s.last_info.runtime == "runc"
        assert s.id in [i.id for i in kb.list()]
        s.run("x = 6 * 7")

        # Another client (another process, say) attaches by id and sees the same kernel.
        with Kernelbox(url, api_key=api_key) as other:
            attached = other.get(s.id)
            assert attached.id == s.id and attached.language == "python"
            assert attached.run("x").text == "42"
            info = attached.info()
            assert info.status == "idle" and info.executions == 2
    finally:
        s.delete()
    with pytest.raises(SessionNotFound):
        kb.get(s.id)
    assert s.id not in [i.id for i in kb.list()]


def test_restart_gives_fresh_state_and_keeps_files(session: Session) -> None:
    session.run("x = 1")
    session.files.upload("kept.txt", b"still here")
    info = session.restart()
    assert info.status == "idle"
    r = session.run("x")
    assert r.status == "error" and r.error is not None and r.error.ename == "NameError"
    assert session.run("open('kept.txt').read()").text == "'still here'"


def test_the_context_manager_deletes_the_session_when_the_block_raises(kb: Kernelbox) -> None:
    seen = []
    with pytest.raises(ZeroDivisionError):
        with kb.session("python") as s:
            seen.append(s.id)
            s.run("y = 1")
            raise ZeroDivisionError("the block fails")
    assert seen
    with pytest.raises(SessionNotFound):
        kb.get(seen[0])
    assert seen[0] not in [i.id for i in kb.list()]


def test_a_session_deleted_inside_its_block_is_fine_at_exit(kb: Kernelbox) -> None:
    with kb.session("bash") as s:
        assert "hi" in s.run("echo hi").stdout
        s.delete()


def test_another_keys_sessions_are_not_found(kb: Kernelbox, url: str, other_key: str) -> None:
    with kb.session("python") as mine, Kernelbox(url, api_key=other_key) as stranger:
        with pytest.raises(SessionNotFound) as e:
            stranger.get(mine.id)
        assert e.value.status == 404 and e.value.code == "not_found" and e.value.message
        assert mine.id not in [i.id for i in stranger.list()]


def test_a_wrong_key_is_unauthorized(url: str) -> None:
    with Kernelbox(url, api_key="not-a-key") as kb:
        with pytest.raises(Unauthorized) as e:
            kb.list()
    assert e.value.status == 401 and "not valid" in e.value.message


def test_bad_requests_are_the_api_s_codes(kb: Kernelbox) -> None:
    with pytest.raises(UnknownLanguage) as e:
        kb.session("cobol")
    assert isinstance(e.value, InvalidRequest) and e.value.status == 422
    with pytest.raises(InvalidRequest) as e2:
        kb.session("python", memory_mb=1_000_000)
    assert e2.value.code == "invalid_request"
    with pytest.raises(InvalidRequest) as e3:
        kb.session("python", runtime="runsc")
    assert e3.value.status == 422 and e3.value.code == "runtime_not_allowed"
    assert "allowed runtimes are runc" in e3.value.message


def test_too_many_sessions_is_an_exception_once_retries_are_spent(url: str, api_key: str) -> None:
    limit = int(env("KERNELBOX_TEST_SESSIONS_PER_KEY"))
    attempts: List[RetryAttempt] = []
    retry = Retry(max_retries=1, backoff=0.05, on_retry=attempts.append)
    with Kernelbox(url, api_key=api_key, retry=retry) as kb:
        held = [kb.session("bash") for _ in range(limit)]
        try:
            with pytest.raises(TooManySessions) as e:
                kb.session("bash")
            assert e.value.status == 429
            assert len(attempts) == 1 and attempts[0].error.code == "too_many_sessions"
        finally:
            for s in held:
                s.delete()
        # With the slots free again the same client starts one.
        with kb.session("bash") as s:
            assert s.run("echo ok").stdout == "ok\n"
