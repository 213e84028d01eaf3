"""Fixtures for the client's tests, which run against a real kernelbox service (real Docker, real kernels).

The service is named by the environment, as ``tests/api/python_client.rs`` sets it when it spawns one:

- ``KERNELBOX_URL``, ``KERNELBOX_API_KEY``: the service and a key of it (the client's own variables);
- ``KERNELBOX_TEST_OTHER_KEY``: a second key of the same service (isolation between keys);
- ``KERNELBOX_TEST_LIMITED_URL``: a second service with a small rate limit, for the 429 tests;
- ``KERNELBOX_TEST_SESSIONS_PER_KEY``: that service's ``--max-sessions-per-owner``;
- ``KERNELBOX_TEST_QUEUE_DEPTH``: its ``--queue-depth``.

Without them a test that needs the service fails (it is not skipped): a run that tested nothing must not
look green.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from kernelbox import Kernelbox, Session


def env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: these tests run against a real kernelbox service (see conftest.py)")
    return value


@pytest.fixture
def url() -> str:
    return env("KERNELBOX_URL")


@pytest.fixture
def api_key() -> str:
    return env("KERNELBOX_API_KEY")


@pytest.fixture
def other_key() -> str:
    return env("KERNELBOX_TEST_OTHER_KEY")


@pytest.fixture
def limited_url() -> str:
    return env("KERNELBOX_TEST_LIMITED_URL")


@pytest.fixture
def kb(url: str, api_key: str) -> Iterator[Kernelbox]:
    with Kernelbox(url, api_key=api_key) as client:
        yield client


@pytest.fixture
def session(kb: Kernelbox) -> Iterator[Session]:
    """A python session of its own for one test, deleted after it."""
    with kb.session("python") as s:
        yield s
