"""A Jupyter front end's part, played against a real Jupyter server (PyPI `jupyter_server`) that runs its
kernels on kernelbox (`--gateway-url`): the server's REST API to start, interrupt, restart and end kernels,
and its kernel WebSocket (which the server relays to kernelbox's) to run cells, as JupyterLab does; and a
notebook saved elsewhere (kernelspec `python3`, as most notebooks say) opened as JupyterLab opens one.

Usage: gateway_client.py <jupyter server base URL> <its token>
Prints one JSON report on its last line; the Rust test asserts on it.
"""

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request
import uuid

from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

BASE, TOKEN = sys.argv[1], sys.argv[2]
AUTH = {"Authorization": f"token {TOKEN}"}


def rest(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={**AUTH, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


class Channels:
    """One front end's WebSocket to a kernel, through the Jupyter server."""

    def __init__(self, kernel_id):
        self.kernel_id = kernel_id
        self.session = uuid.uuid4().hex
        self.ws = None

    async def open(self):
        url = BASE.replace("http", "ws", 1) + f"/api/kernels/{self.kernel_id}/channels?session_id={self.session}"
        self.ws = await websocket_connect(HTTPRequest(url, headers=AUTH))
        return self

    def close(self):
        self.ws.close()

    async def send(self, channel, msg_type, content, parent=None):
        msg_id = uuid.uuid4().hex
        msg = {
            "channel": channel,
            "header": {"msg_id": msg_id, "msg_type": msg_type, "session": self.session, "username": "tester",
                       "date": "2026-12-01T00:00:00.000000Z", "version": "5.3"},
            "parent_header": parent or {}, "metadata": {}, "content": content, "buffers": [],
        }
        await self.ws.write_message(json.dumps(msg))
        return msg_id

    async def recv(self, timeout=120):
        raw = await asyncio.wait_for(self.ws.read_message(), timeout)
        if raw is None:
            raise ConnectionError("the WebSocket closed")
        return json.loads(raw)

    async def language(self):
        """The kernel's language, as its `kernel_info_reply` names it."""
        info_id = await self.send("shell", "kernel_info_request", {})
        while True:
            msg = await self.recv()
            if msg["msg_type"] == "kernel_info_reply" and msg["parent_header"]["msg_id"] == info_id:
                return msg["content"]["language_info"]["name"]

    async def run(self, code, on_message=None, timeout=120):
        """Runs a cell; returns its reply, outputs and the message types seen, once the kernel is idle."""
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": True}
        msg_id = await self.send("shell", "execute_request", content)
        reply, outputs, seen, idle = None, [], [], False
        deadline = time.monotonic() + timeout
        while reply is None or not idle:
            msg = await self.recv(max(1, deadline - time.monotonic()))
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            seen.append(f"{msg['channel']}:{kind}")
            if on_message:
                await on_message(msg)
            if kind == "execute_reply":
                reply = msg["content"]
            elif kind == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
            elif kind in ("stream", "execute_result", "display_data", "error"):
                outputs.append(msg["content"])
        return {"reply": reply, "outputs": outputs, "seen": seen}


def text_of(outputs):
    out = []
    for o in outputs:
        if "text" in o:
            out.append(o["text"])
        elif "data" in o:
            out.append(o["data"].get("text/plain", ""))
    return "".join(out)


async def python_scientific(report):
    status, kernel = rest("POST", "/api/kernels", {"name": "python_scientific"})
    report["start_status"] = status
    kid = kernel["id"]
    report["kernel_id"] = kid
    status, listed = rest("GET", "/api/kernels")
    report["listed"] = any(k["id"] == kid for k in listed)
    status, model = rest("GET", f"/api/kernels/{kid}")
    report["model"] = {"status": status, "name": model.get("name"), "execution_state": model.get("execution_state")}

    ch = await Channels(kid).open()
    report["language"] = await ch.language()

    cell = await ch.run("x = 6 * 7\nprint('hello through jupyter_server')\nx")
    report["hello"] = {"status": cell["reply"]["status"], "text": text_of(cell["outputs"]), "seen": cell["seen"]}

    plot = await ch.run("import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
                        "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9, 16])\nplt.show()")
    images = [o["data"]["image/png"] for o in plot["outputs"] if "image/png" in o.get("data", {})]
    report["plot"] = {"status": plot["reply"]["status"], "pngs": len(images),
                      "png_bytes": len(images[0]) if images else 0,
                      "png_magic": images[0][:8] if images else None}

    # Interrupt a long cell through the server's REST API, as the stop button does.
    interrupted = {}

    async def interrupt_when_running(msg):
        if msg["msg_type"] == "execute_input" and "sent" not in interrupted:
            interrupted["sent"] = time.monotonic()
            await asyncio.sleep(0.5)
            interrupted["status"] = rest("POST", f"/api/kernels/{kid}/interrupt")[0]

    t = time.monotonic()
    long = await ch.run("import time\ntime.sleep(60)", on_message=interrupt_when_running)
    report["interrupt"] = {"status": interrupted.get("status"), "reply": long["reply"]["status"],
                           "ename": long["reply"].get("ename"), "seconds": round(time.monotonic() - t, 1)}
    after = await ch.run("print(x)")
    report["interrupt"]["state_kept"] = text_of(after["outputs"]).strip()

    # Restart through REST; the front end reconnects and the kernel's state is gone.
    status, model = rest("POST", f"/api/kernels/{kid}/restart")
    report["restart_status"] = status
    ch.close()
    ch = await Channels(kid).open()
    fresh = await ch.run("print('x' in dir())")
    report["after_restart"] = text_of(fresh["outputs"]).strip()
    ch.close()

    status, _ = rest("DELETE", f"/api/kernels/{kid}")
    report["delete_status"] = status
    status, _ = rest("GET", f"/api/kernels/{kid}")
    report["after_delete_status"] = status


async def bash(report):
    status, kernel = rest("POST", "/api/kernels", {"name": "bash"})
    kid = kernel["id"]
    ch = await Channels(kid).open()
    cell = await ch.run("echo hello from bash; echo $((6 * 7))")
    report["bash"] = {"start_status": status, "status": cell["reply"]["status"], "text": text_of(cell["outputs"])}
    ch.close()
    report["bash"]["delete_status"] = rest("DELETE", f"/api/kernels/{kid}")[0]


# A notebook written by a stock Jupyter install: its kernelspec is Jupyter's own `python3`.
LEGACY_NOTEBOOK = {
    "nbformat": 4, "nbformat_minor": 5,
    "metadata": {
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
    },
    "cells": [{"cell_type": "code", "id": "c1", "metadata": {}, "execution_count": None, "outputs": [],
               "source": "import sys\nprint(sys.version_info[0], 6 * 7)"}],
}


async def notebook_python3(report):
    """Uploads a notebook whose kernelspec is `python3`, opens it as JupyterLab does (a session with the
    notebook's kernel name) and runs its cell; then a session that names no kernel gets the default."""
    status, _ = rest("PUT", "/api/contents/legacy.ipynb", {"type": "notebook", "format": "json", "content": LEGACY_NOTEBOOK})
    out = {"upload_status": status}
    status, model = rest("GET", "/api/contents/legacy.ipynb")
    name = model["content"]["metadata"]["kernelspec"]["name"]
    status, session = rest("POST", "/api/sessions", {"path": "legacy.ipynb", "type": "notebook", "name": "legacy.ipynb",
                                                     "kernel": {"name": name}})
    out["session_status"] = status
    if status != 201:
        out["session_error"] = session
        report["notebook"] = out
        return
    out["kernel_name"] = session["kernel"]["name"]
    kid = session["kernel"]["id"]
    ch = await Channels(kid).open()
    out["language"] = await ch.language()
    cell = await ch.run(LEGACY_NOTEBOOK["cells"][0]["source"])
    out["status"] = cell["reply"]["status"]
    out["text"] = text_of(cell["outputs"])
    ch.close()
    out["delete_status"] = rest("DELETE", f"/api/sessions/{session['id']}")[0]

    # Nothing named: the server starts its default kernel, which kernelbox's kernelspecs set to `python3`.
    status, console = rest("POST", "/api/sessions", {"path": "scratch", "type": "console", "name": "scratch"})
    out["default_status"] = status
    out["default_kernel_name"] = console["kernel"]["name"] if status == 201 else console
    if status == 201:
        out["default_delete_status"] = rest("DELETE", f"/api/sessions/{console['id']}")[0]
    report["notebook"] = out


async def main():
    report = {}
    status, specs = rest("GET", "/api/kernelspecs")
    report["kernelspecs"] = sorted(specs["kernelspecs"]) if status == 200 else specs
    report["default_kernelspec"] = specs.get("default") if status == 200 else None
    await python_scientific(report)
    await bash(report)
    await notebook_python3(report)
    print(json.dumps(report))


asyncio.run(main())
