"""Drives kernelbox's /mcp with the reference MCP Python client (PyPI `mcp`, its streamable-HTTP client).

Usage: python mcp_client.py <scenario> <base url> <api key> [<other api key>]
Prints one JSON document with what it saw; the Rust test (tests/api/mcp.rs) asserts on it.
"""

import asyncio
import json
import statistics
import sys
import time

from mcp import ClientSession
from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client


class Client:
    """One MCP connection with one API key."""

    def __init__(self, base, key):
        self.url = base + "/mcp"
        self.key = key

    async def __aenter__(self):
        self.http = create_mcp_http_client(headers={"Authorization": f"Bearer {self.key}"})
        self.transport = streamable_http_client(self.url, http_client=self.http)
        read, write = await self.transport.__aenter__()
        self.session = ClientSession(read, write)
        await self.session.__aenter__()
        self.init = await self.session.initialize()
        return self

    async def __aexit__(self, *exc):
        await self.session.__aexit__(*exc)
        await self.transport.__aexit__(*exc)
        await self.http.aclose()

    async def call(self, name, progress=None, **arguments):
        result = await self.session.call_tool(name, arguments, progress_callback=progress)
        return dump(result)


def dump(result):
    """A tool result as plain JSON: content items with their type, text or mime type and data size."""
    out = {"is_error": bool(getattr(result, "is_error", None) or getattr(result, "isError", None)), "content": []}
    for item in result.content:
        d = item.model_dump(mode="json", by_alias=True, exclude_none=True)
        out["content"].append(d)
    structured = getattr(result, "structuredContent", None)
    if structured is None:
        structured = getattr(result, "structured_content", None)
    out["structured"] = structured
    return out


def texts(result):
    return "\n".join(c.get("text", "") for c in result["content"] if c.get("type") == "text")


async def main_scenario(base, key, other):
    report = {}
    async with Client(base, key) as c:
        report["server"] = c.init.model_dump(mode="json", by_alias=True).get("serverInfo")
        tools = await c.session.list_tools()
        report["tools"] = {t.name: {"description": t.description, "schema": t.input_schema} for t in tools.tools}
        report["languages"] = await c.call("list_languages")

        snippets = {
            "python": "print('hello from python', 6*7)",
            "python_scientific": "import numpy; print('hello from python_scientific', int(numpy.arange(7).sum()) * 2)",
            "javascript": "console.log('hello from javascript', 6*7)",
            "typescript": "const n: number = 6*7; console.log('hello from typescript', n)",
            "java": "System.out.println(\"hello from java \" + (6*7));",
            "bash": "echo hello from bash $((6*7))",
        }
        report["run_code"] = {}
        for language, code in snippets.items():
            r = await c.call("run_code", language=language, code=code)
            report["run_code"][language] = {"is_error": r["is_error"], "text": texts(r)}

        started = await c.call("start_session", language="python_scientific")
        sid = started["structured"]["id"]
        report["session_id"] = sid
        plot = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()"
        r = await c.call("execute", session_id=sid, code=plot)
        report["plot"] = {
            "is_error": r["is_error"],
            "content": [{"type": x["type"], "mimeType": x.get("mimeType"), "size": len(x.get("data", ""))} for x in r["content"]],
            "status": r["structured"]["status"],
        }

        progress = []

        async def on_progress(value, total, message):
            progress.append({"progress": value, "message": message})

        loop_code = "import time\nfor i in range(3):\n    print('tick', i, flush=True)\n    time.sleep(0.5)"
        r = await c.call("execute", progress=on_progress, session_id=sid, code=loop_code)
        report["progress"] = {"notifications": progress, "text": texts(r)}

        r = await c.call("execute", session_id=sid, code="a = input('a? ')\nb = input('b? ')\nprint(a + b)", stdin=["4", "2"])
        report["stdin"] = {"is_error": r["is_error"], "text": texts(r)}
        r = await c.call("execute", session_id=sid, code="input('more? ')")
        report["stdin_missing"] = {"is_error": r["is_error"], "text": texts(r)}

        r = await c.call("execute", session_id=sid, code="1/0")
        report["error"] = {"is_error": r["is_error"], "text": texts(r)}

        await c.call("upload_file", session_id=sid, path="data/in.txt", content="hello file")
        report["list"] = await c.call("list_files", session_id=sid, path="data")
        report["download"] = await c.call("download_file", session_id=sid, path="data/in.txt")
        report["install"] = await c.call("install_packages", session_id=sid, packages=["six==1.16.0"])
        r = await c.call("execute", session_id=sid, code="import six; print('six', six.__version__)")
        report["installed"] = {"is_error": r["is_error"], "text": texts(r)}

        async with Client(base, other) as stranger:
            report["stranger"] = await stranger.call("execute", session_id=sid, code="print('not mine')")
            report["stranger_end"] = await stranger.call("end_session", session_id=sid)

        # A cancelled call interrupts the kernel: the next execution runs at once, state kept.
        await c.call("execute", session_id=sid, code="kept = 'yes'")
        task = asyncio.create_task(c.call("execute", session_id=sid, code="import time\ntime.sleep(60)"))
        await asyncio.sleep(2)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        t0 = time.monotonic()
        r = await c.call("execute", session_id=sid, code="print(kept)")
        report["after_cancel"] = {"text": texts(r), "seconds": time.monotonic() - t0}

        # This server offers no networks: the tool says so.
        report["set_network"] = await c.call("set_network", session_id=sid, allow=["pypi.org"])
        report["restart"] = await c.call("restart", session_id=sid)
        report["end"] = await c.call("end_session", session_id=sid)
        report["after_end"] = await c.call("execute", session_id=sid, code="1")
    return report


async def bench_scenario(base, key, _other):
    async with Client(base, key) as c:
        started = await c.call("start_session", language="python")
        sid = started["structured"]["id"]
        for _ in range(5):
            await c.call("execute", session_id=sid, code="1")
        times = []
        for _ in range(100):
            t0 = time.perf_counter()
            r = await c.call("execute", session_id=sid, code="1")
            times.append((time.perf_counter() - t0) * 1000)
            assert not r["is_error"], r
        await c.call("end_session", session_id=sid)
    times.sort()
    return {"p50_ms": statistics.median(times), "p90_ms": times[89], "runs": len(times)}


async def main():
    scenario, base, key = sys.argv[1], sys.argv[2], sys.argv[3]
    other = sys.argv[4] if len(sys.argv) > 4 else None
    run = {"main": main_scenario, "bench": bench_scenario}[scenario]
    print(json.dumps(await run(base, key, other)))


if __name__ == "__main__":
    asyncio.run(main())
