"""The client cannot silently fall behind the API: every ``/v1`` operation of the OpenAPI snapshot
(``docs/openapi.json``, which the service's own unit test keeps equal to what it serves) has a method in
both flavours, and the two flavours have the same shape."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import kernelbox
from kernelbox import _core

SYNC = (kernelbox.Kernelbox, kernelbox.Session, kernelbox.Files, kernelbox.Packages)
ASYNC = (kernelbox.AsyncKernelbox, kernelbox.AsyncSession, kernelbox.AsyncFiles, kernelbox.AsyncPackages)


def snapshot() -> Dict[str, Any]:
    path = os.environ.get("KERNELBOX_TEST_OPENAPI") or Path(__file__).resolve().parents[3] / "docs" / "openapi.json"
    with open(path) as f:
        doc: Dict[str, Any] = json.load(f)
    return doc


def v1_operations() -> Set[Tuple[str, str]]:
    ops = set()
    for path, item in snapshot()["paths"].items():
        if not path.startswith("/v1/"):
            continue
        for method in item:
            if method in ("get", "put", "post", "delete", "patch"):
                ops.add((method.upper(), path))
    return ops


def test_the_snapshot_has_the_v1_operations_this_test_expects_to_find() -> None:
    # Guards the test itself: a snapshot read wrongly (no /v1 paths) would make the next test pass vacuously.
    ops = v1_operations()
    assert ("POST", "/v1/sessions/{id}/execute") in ops
    assert len(ops) >= 15, ops


def test_every_v1_operation_has_a_method_in_both_flavours() -> None:
    ops = v1_operations()
    for flavour in (SYNC, ASYNC):
        covered = _core.operations(*flavour)
        missing = sorted(ops - set(covered))
        assert not missing, f"{[c.__name__ for c in flavour]}: no method for {missing}"
        unknown = sorted(set(covered) - ops)
        assert not unknown, f"methods for operations the API does not have: {unknown}"


def public(cls: type) -> Dict[str, List[str]]:
    """Public methods and properties of ``cls`` with their parameter names."""
    shape: Dict[str, List[str]] = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            shape[name] = ["<property>"]
        elif callable(member):
            shape[name] = list(inspect.signature(member).parameters)
    return shape


def test_the_async_flavour_has_the_same_shape_as_the_sync_one() -> None:
    for sync, async_ in zip(SYNC + (kernelbox.Execution,), ASYNC + (kernelbox.AsyncExecution,)):
        a, b = public(sync), public(async_)
        # Closing is `close` in one and `aclose` in the other, as httpx has it.
        a.pop("close", None)
        b.pop("aclose", None)
        assert a == b, f"{sync.__name__} and {async_.__name__} differ"
        for name in a:
            m = getattr(async_, name)
            if not isinstance(m, property) and name not in ("stream",):
                assert inspect.iscoroutinefunction(m), f"{async_.__name__}.{name} is not async"
