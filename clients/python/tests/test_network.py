"""Network by name: ``session(network=[...])``, ``Session.network()`` and ``set_network()``, the result's
``network`` report and the streamed ``network_blocked`` event.

The service these tests run against offers no networks (no ``--egress``), so against it a list is refused
(403 ``network_off``) and results carry no report; what a server with networks answers is read from the
JSON it sends (as ``docs/openapi.json`` has it), and the requests the client makes are checked through an
``httpx.MockTransport`` standing in for such a server. The networks themselves (the proxy, refusals by
reason) are the service's own tests (``tests/api/egress.rs``).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Dict, List

import httpx
import pytest

from kernelbox import (
    AsyncKernelbox,
    Blocked,
    Event,
    ExecutionResult,
    Forbidden,
    InvalidRequest,
    Kernelbox,
    NetworkBlockedEvent,
    NetworkInfo,
    NetworkReport,
    OutputEvent,
    Session,
    SessionNotFound,
    Stream,
    _calls,
)
from kernelbox._core import Callbacks, StreamDecoder
from kernelbox.errors import from_response

# ---------------------------------------------------------------------------------------------------- the service


def test_a_network_from_a_server_that_offers_none_is_forbidden_network_off(kb: Kernelbox) -> None:
    before = {i.id for i in kb.list()}
    for allow in (["pypi.org", "*.example.com", "api.example.com:443"], []):
        with pytest.raises(Forbidden) as e:
            kb.session("python", network=allow)
        assert e.value.status == 403 and e.value.code == "network_off", e.value
        assert e.value.message
    assert {i.id for i in kb.list()} == before, "a refused create starts no session"


def test_a_session_s_network_on_a_server_that_offers_none(session: Session, kb: Kernelbox) -> None:
    with pytest.raises(Forbidden) as e:
        session.network()
    assert e.value.code == "network_off"
    with pytest.raises(Forbidden) as e:
        session.set_network(["pypi.org"])
    assert e.value.code == "network_off"
    # Without networks a result has no report at all (not an empty one), plain and streamed.
    r = session.run("6 * 7")
    assert r.text == "42" and r.network is None and "network" not in r.raw
    events: List[Event] = []
    r = session.run("print('hi')", on_event=events.append)
    assert r.network is None and not any(isinstance(e, NetworkBlockedEvent) for e in events)
    # Another key's session, or none: not found comes first.
    with pytest.raises(SessionNotFound):
        Session(kb, "no-such-session").network()


def test_the_async_flavour_is_refused_the_same_way(url: str, api_key: str) -> None:
    async def main() -> None:
        async with AsyncKernelbox(url, api_key=api_key) as kb:
            with pytest.raises(Forbidden) as e:
                await kb.session("python", network=["pypi.org"])
            assert e.value.code == "network_off"
            async with await kb.session("python") as s:
                with pytest.raises(Forbidden) as e:
                    await s.network()
                assert e.value.code == "network_off"
                with pytest.raises(Forbidden):
                    await s.set_network([])
                assert (await s.run("1")).network is None

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------------- parsing


def test_a_result_s_network_report() -> None:
    r = ExecutionResult.from_json(
        {
            "status": "ok",
            "outputs": [],
            "network": {
                "blocked": [
                    {"host": "api.openai.com", "port": 443, "reason": "not_allowed", "count": 2},
                    {"host": "10.0.0.1", "port": 80, "reason": "ip_literal", "count": 1},
                ],
                "allowed_bytes": 18231,
                "blocked_dropped": 3,
            },
        }
    )
    assert isinstance(r.network, NetworkReport)
    assert [(b.host, b.port, b.reason, b.count) for b in r.network.blocked] == [
        ("api.openai.com", 443, "not_allowed", 2),
        ("10.0.0.1", 80, "ip_literal", 1),
    ]
    assert r.network.allowed_bytes == 18231 and r.network.blocked_dropped == 3
    assert r.network.raw is r.raw["network"]
    first = r.network.blocked[0]
    assert first == Blocked(host="api.openai.com", port=443, reason="not_allowed", count=2, raw=first.raw)

    # `blocked_dropped` is left out when 0; nothing refused is an empty list, not None.
    r = ExecutionResult.from_json({"status": "ok", "network": {"blocked": [], "allowed_bytes": 0}})
    assert r.network is not None and r.network.blocked == [] and r.network.blocked_dropped == 0
    # No report (a server without networks), or one this client cannot read: None, never an exception.
    assert ExecutionResult.from_json({"status": "ok"}).network is None
    assert ExecutionResult.from_json({"status": "ok", "network": None}).network is None
    assert ExecutionResult.from_json({"status": "ok", "network": "?"}).network is None
    odd = ExecutionResult.from_json({"status": "ok", "network": {"blocked": ["x", {"port": "443"}], "new": 1}})
    assert odd.network is not None and odd.network.allowed_bytes == 0
    assert [(b.host, b.port, b.reason) for b in odd.network.blocked] == [("", 0, ""), ("", 0, "")]


def test_a_session_s_network_view() -> None:
    info = NetworkInfo.from_json({"allow": ["pypi.org", "*.example.com:8443"], "open_connections": 2, "proxy_up": True})
    assert info.allow == ["pypi.org", "*.example.com:8443"] and info.open_connections == 2 and info.proxy_up
    empty = NetworkInfo.from_json({"allow": [], "open_connections": 0, "proxy_up": False})
    assert empty.allow == [] and not empty.proxy_up
    assert NetworkInfo.from_json(None) == NetworkInfo(allow=[], open_connections=0, proxy_up=False, raw={})


def test_the_network_blocked_event_and_unknown_events() -> None:
    decoder = StreamDecoder()
    event = decoder.decode("network_blocked", '{"host": "pypi.org", "port": 443, "reason": "not_allowed", "count": 1}')
    assert isinstance(event, NetworkBlockedEvent) and event.kind == "network_blocked"
    assert (event.blocked.host, event.blocked.port, event.blocked.reason, event.blocked.count) == (
        "pypi.org",
        443,
        "not_allowed",
        1,
    )
    # Events this client has no type for are skipped, whatever their data.
    assert decoder.decode("auto_restart", '{"phase": "restarting", "reason": "x", "auto_restarts": 1}') is None
    assert decoder.decode("from_a_newer_service", "not even JSON") is None
    assert decoder.result is None
    # It reaches `on_event` (there is no callback of its own), nothing else.
    seen: List[Any] = []
    callbacks = Callbacks(on_stdout=seen.append, on_display=seen.append, on_error=seen.append, on_event=seen.append)
    assert [cb for cb, _ in callbacks.calls(event)] == [seen.append]


def test_network_errors_are_their_status_s_classes() -> None:
    def answer(status: int, code: str) -> httpx.Response:
        body = json.dumps({"error": {"code": code, "message": f"{code}: 'http://x' is not a host name"}})
        return httpx.Response(status, content=body.encode(), request=httpx.Request("POST", "http://x/v1/sessions"))

    off = from_response(answer(403, "network_off"))
    assert type(off) is Forbidden and off.code == "network_off"
    for code in ("invalid_network", "network_forbidden"):
        e = from_response(answer(422, code))
        assert type(e) is InvalidRequest and e.code == code and "'http://x'" in e.message


def test_the_requests() -> None:
    def create(network: Any) -> Dict[str, Any]:
        call = _calls.create(
            "python",
            memory_mb=None,
            cpus=None,
            timeout_s=None,
            idle_timeout_s=None,
            env=None,
            metadata=None,
            auto_restart=None,
            network=network,
        )
        assert (call.method, call.path) == ("POST", "/v1/sessions")
        body: Dict[str, Any] = call.json
        return body

    assert create(None) == {"language": "python"}, "no network: no field (the server's default, none)"
    assert create([]) == {"language": "python", "network": {"allow": []}}, "an empty list is a network with no name"
    assert create(("pypi.org", "*.example.com")) == {
        "language": "python",
        "network": {"allow": ["pypi.org", "*.example.com"]},
    }
    with pytest.raises(TypeError):
        create("pypi.org")

    get = _calls.network("s/1")
    assert (get.method, get.path, get.json) == ("GET", "/v1/sessions/s%2F1/network", None)
    put = _calls.set_network("s1", ["pypi.org:443"])
    assert (put.method, put.path, put.json) == ("PUT", "/v1/sessions/s1/network", {"allow": ["pypi.org:443"]})
    assert _calls.set_network("s1", []).json == {"allow": []}
    with pytest.raises(TypeError):
        _calls.set_network("s1", "pypi.org")


# ---------------------------------------------------------------------------------------------------- stand-in


BLOCKED = {"host": "pypi.org", "port": 443, "reason": "not_allowed", "count": 1}


class WithNetworks:
    """A stand-in for a server with networks, as an ``httpx.MockTransport`` handler: one session, whose
    code is refused ``pypi.org`` until the list has it; it records every request."""

    def __init__(self) -> None:
        self.requests: List[httpx.Request] = []
        self.allow: List[str] = []

    def body(self, request: httpx.Request) -> Any:
        return json.loads(request.content) if request.content else None

    def result(self) -> Dict[str, Any]:
        refused = not any(a in ("pypi.org", "pypi.org:443") for a in self.allow)
        return {
            "status": "ok",
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "403\n" if refused else "200\n"}],
            "stdout": "403\n" if refused else "200\n",
            "network": {"blocked": [BLOCKED] if refused else [], "allowed_bytes": 0 if refused else 5120},
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        route = (request.method, request.url.path)
        view = {"allow": self.allow, "open_connections": 0, "proxy_up": True}
        if route == ("POST", "/v1/sessions"):
            self.allow = list(self.body(request)["network"]["allow"])
            return httpx.Response(201, json={"id": "s1", "language": "python", "status": "idle"})
        if route == ("DELETE", "/v1/sessions/s1"):
            return httpx.Response(204)
        if route == ("GET", "/v1/sessions/s1/network"):
            return httpx.Response(200, json=view)
        if route == ("PUT", "/v1/sessions/s1/network"):
            allow = self.body(request)["allow"]
            if any(a.startswith("http") for a in allow):
                return httpx.Response(422, json={"error": {"code": "invalid_network", "message": f"{allow[0]!r}"}})
            self.allow = list(allow)
            return httpx.Response(200, json={**view, "allow": self.allow})
        if route == ("POST", "/v1/sessions/s1/execute"):
            if "text/event-stream" not in request.headers.get("accept", ""):
                return httpx.Response(200, json=self.result())
            events = [("output", self.result()["outputs"][0])]
            if self.result()["network"]["blocked"]:
                events.insert(0, ("network_blocked", BLOCKED))
            # An event this client has no type for, and one from a newer service, between them.
            events.insert(1, ("auto_restart", {"phase": "restarted", "reason": "x", "auto_restarts": 1}))
            events.insert(1, ("something_new", {"anything": True}))
            events.append(("result", self.result()))
            sse = "".join(f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in events)
            return httpx.Response(200, content=sse.encode(), headers={"content-type": "text/event-stream"})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": str(route)}})


def check_the_first_run(r: ExecutionResult, events: List[Event]) -> None:
    assert r.stdout == "403\n" and r.network is not None
    assert [(b.host, b.port, b.reason) for b in r.network.blocked] == [("pypi.org", 443, "not_allowed")]
    blocked = [e.blocked for e in events if isinstance(e, NetworkBlockedEvent)]
    assert [(b.host, b.port, b.reason, b.count) for b in blocked] == [("pypi.org", 443, "not_allowed", 1)]
    assert isinstance(events[0], NetworkBlockedEvent), "in the order the service sent them"
    assert [type(e) for e in events] == [NetworkBlockedEvent, OutputEvent]


def check_the_requests(fake: WithNetworks) -> None:
    sent = [(r.method, r.url.path) for r in fake.requests]
    assert json.loads(fake.requests[0].content) == {"language": "python", "network": {"allow": ["*.example.com"]}}
    puts = [json.loads(r.content) for r in fake.requests if r.method == "PUT"]
    assert puts == [{"allow": ["http://pypi.org"]}, {"allow": ["*.example.com", "pypi.org:443"]}]
    assert sent[-1] == ("DELETE", "/v1/sessions/s1")


def test_the_loop_of_an_agent_against_a_server_with_networks() -> None:
    fake = WithNetworks()
    code = "import requests; print(requests.get('https://pypi.org/simple/').status_code)"
    with httpx.Client(transport=httpx.MockTransport(fake)) as http:
        kb = Kernelbox("http://kernelbox.test", api_key="k", http_client=http)
        with kb.session("python", network=["*.example.com"]) as s:
            events: List[Event] = []
            r = s.run(code, on_event=events.append)
            check_the_first_run(r, events)

            with pytest.raises(InvalidRequest) as e:
                s.set_network(["http://pypi.org"])
            assert e.value.code == "invalid_network" and "http://pypi.org" in e.value.message

            assert r.network is not None
            info = s.set_network(s.network().allow + [f"{b.host}:{b.port}" for b in r.network.blocked])
            assert info.allow == ["*.example.com", "pypi.org:443"] and info.proxy_up
            r = s.run(code)
            assert r.stdout == "200\n" and r.network is not None and r.network.blocked == []
            assert r.network.allowed_bytes == 5120

            with s.stream(code) as ex:
                streamed = list(ex)
            assert [type(x) for x in streamed] == [OutputEvent], "nothing refused: no event"
            out = streamed[0]
            assert isinstance(out, OutputEvent) and isinstance(out.output, Stream)
            assert ex.result is not None and ex.result.network is not None and ex.result.network.blocked == []
    check_the_requests(fake)


def test_the_same_loop_with_asyncio() -> None:
    async def main() -> WithNetworks:
        fake = WithNetworks()
        code = "import requests; print(requests.get('https://pypi.org/simple/').status_code)"
        async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as http:
            kb = AsyncKernelbox("http://kernelbox.test", api_key="k", http_client=http)
            async with await kb.session("python", network=["*.example.com"]) as s:
                events: List[Event] = []

                async def on_event(event: Event) -> None:
                    events.append(event)

                r = await s.run(code, on_event=on_event)
                check_the_first_run(r, events)

                with pytest.raises(InvalidRequest):
                    await s.set_network(["http://pypi.org"])

                assert r.network is not None
                wanted = [f"{b.host}:{b.port}" for b in r.network.blocked]
                info = await s.set_network((await s.network()).allow + wanted)
                assert info.allow == ["*.example.com", "pypi.org:443"]
                r = await s.run(code)
                assert r.stdout == "200\n" and r.network is not None and r.network.blocked == []

                async with s.stream(code) as ex:
                    streamed = [x async for x in ex]
                assert [type(x) for x in streamed] == [OutputEvent]
                assert ex.result is not None and ex.result.network is not None
        return fake

    check_the_requests(asyncio.run(main()))
