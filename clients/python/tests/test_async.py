"""The asyncio flavour: the same operations with ``await``, coroutine callbacks, ``async for`` over a
stream that stops early, and a cancelled task that interrupts the kernel."""

from __future__ import annotations

import asyncio
from typing import List

import pytest

from kernelbox import AsyncKernelbox, InputRequest, OutputEvent, SessionNotFound

DEADLINE = 120.0


def test_the_async_client_does_what_the_sync_one_does(url: str, api_key: str) -> None:
    async def main() -> None:
        async with AsyncKernelbox(url, api_key=api_key) as kb:
            assert "python" in [lang.name for lang in await kb.languages()]
            async with await kb.session("python", memory_mb=512) as s:
                assert s.id in [i.id for i in await kb.list()]
                attached = await kb.get(s.id)
                assert attached.id == s.id

                seen: List[str] = []

                async def on_stdout(text: str) -> None:
                    seen.append(text)
                    if text == "waiting\n":
                        await s.files.upload("go", b"")

                code = (
                    "import os, time\nprint('waiting', flush=True)\n"
                    "for _ in range(600):\n    if os.path.exists('go'): break\n    time.sleep(0.1)\n"
                    "print('go' if os.path.exists('go') else 'gave up')\n6 * 7"
                )
                r = await s.run(code, on_stdout=on_stdout)
                assert seen == ["waiting\n", "go\n"] and r.text == "42"

                async def answer(q: InputRequest) -> str:
                    return "Ada"

                r = await s.run("print('hi', input('name? '))", on_input=answer)
                assert r.stdout == "hi Ada\n"

                r = await s.run("import matplotlib.pyplot as plt; plt.plot([1, 2]); plt.show()")
                image = r.images[0].png
                assert image is not None and image.startswith(b"\x89PNG")

                await s.files.upload("f.txt", "text as UTF-8 ✓")
                assert (await s.files.list()).names.count("f.txt") == 1
                assert (await s.files.download("f.txt")).decode() == "text as UTF-8 ✓"
                await s.files.delete("f.txt")

                report = await s.packages.install(["six==1.16.0"])
                assert report.ok, report.log
                assert (await s.run("import six; six.__version__")).text == "'1.16.0'"

                async def interrupt_once_started(text: str) -> None:
                    if text == "started\n":
                        await s.interrupt()

                r = await s.run(
                    "import time\nprint('started', flush=True)\ntime.sleep(3600)",
                    on_stdout=interrupt_once_started,
                    timeout=3600,
                    request_timeout=DEADLINE,
                )
                assert r.error is not None and r.error.ename == "KeyboardInterrupt"

                await s.run("x = 1")
                await s.restart()
                assert (await s.run("x")).error is not None
                assert (await s.notebook())["nbformat"] == 4
                assert (await s.info()).status == "idle"
                sid = s.id
            with pytest.raises(SessionNotFound):
                await kb.get(sid)

            r = await kb.run_code("echo $((6 * 7))", language="bash")
            assert r.stdout == "42\n"

    asyncio.run(main())


def test_async_for_that_stops_early_interrupts_the_code(url: str, api_key: str) -> None:
    async def main() -> None:
        async with AsyncKernelbox(url, api_key=api_key) as kb, await kb.session("python") as s:
            await s.run("z = 'kept'")
            endless = "import itertools, time\nfor i in itertools.count(): print(i, flush=True); time.sleep(0.05)"
            async with s.stream(endless, timeout=3600) as ex:
                async for event in ex:
                    if isinstance(event, OutputEvent):
                        break
            assert ex.result is None
            assert (await s.run("z", request_timeout=DEADLINE)).text == "'kept'"

            # Without `async with`: the stream is dropped when the loop is left, and closed with it.
            async for _event in s.stream(endless, timeout=3600):
                break
            assert (await s.run("z", request_timeout=DEADLINE)).text == "'kept'"

            # A task cancelled while it waits for a plain JSON execution: the connection closes, the
            # service interrupts the code, and the kernel takes the next one.
            task = asyncio.ensure_future(
                s.run("import time\nprint('started', flush=True)\ntime.sleep(3600)", timeout=3600)
            )
            while (await s.info()).status != "busy":
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await s.run("z", request_timeout=DEADLINE)).text == "'kept'"

    asyncio.run(main())
