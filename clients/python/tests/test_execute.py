"""Running code: results by MIME type, streaming order, images byte for byte, errors, stdin, timeouts,
interrupts, out-of-memory, and a stream the caller stops reading."""

from __future__ import annotations

import struct
import zlib
from typing import Any, List, Tuple

import pytest
from conftest import env

from kernelbox import (
    Display,
    Event,
    ExecutionError,
    ExecutionKilled,
    InputRequest,
    Kernelbox,
    NoInputWaiting,
    OutOfMemory,
    OutputEvent,
    QueueFull,
    Retry,
    Session,
    Stream,
    TransportError,
)

#: A bound on waits that must end quickly when the client works (a functional deadline: failing it means
#: the kernel was not freed, not that something was slow).
DEADLINE = 120.0


def png(width: int, height: int, seed: int) -> bytes:
    """A real PNG made here (no imaging library needed): an RGB gradient."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(
        b"\x00" + bytes(((x * 7 + y * 3 + seed) % 256) for x in range(width) for _ in range(3)) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def test_results_keep_every_mime_type_and_offer_the_common_views(session: Session) -> None:
    r = session.run(
        "from IPython.display import display, HTML, JSON, Markdown\n"
        "print('printed')\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(JSON({'a': [1, 2]}))\n"
        "display(Markdown('*md*'))\n"
        "6 * 7"
    )
    assert r.status == "ok" and r.ok and r.error is None
    assert r.stdout == "printed\n" and r.stderr == ""
    assert r.text == "42" and r.result is not None and r.result.is_result
    assert r.execution_count == r.result.execution_count
    assert r.html == ["<b>bold</b>"]
    assert r.json == [{"a": [1, 2]}]
    html = r.displays[0]
    assert "text/html" in html.data and "text/plain" in html.data, "the whole bundle is kept"
    assert r.displays[2].markdown == "*md*"
    assert [type(o) for o in r.outputs] == [Stream, Display, Display, Display, Display]
    assert r.raw["outputs"][0]["output_type"] == "stream"
    assert "42" in r.output_text() and "printed" in r.output_text()


def test_a_matplotlib_plot_comes_back_as_png_bytes(session: Session, tmp_path: Any) -> None:
    r = session.run("import matplotlib.pyplot as plt; plt.plot([1, 4, 9]); plt.show()")
    assert r.status == "ok", r.raw
    assert len(r.images) == 1
    image = r.images[0].png
    assert image is not None and image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 1000
    r.images[0].save(tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes() == image


def test_an_image_round_trips_byte_for_byte(session: Session) -> None:
    original = png(64, 48, seed=5)
    session.files.upload("in.png", original)
    r = session.run("from IPython.display import Image, display\ndisplay(Image(filename='in.png'))")
    assert r.status == "ok", r.raw
    assert r.images[0].image_mime == "image/png"
    assert r.images[0].png == original

    # As files instead of inline: listed with a path, downloaded whole, the same bytes.
    r = session.run("display(Image(filename='in.png'))", images="files")
    assert r.images == [] and len(r.files) == 1
    saved = r.files[0]
    assert saved.mime == "image/png" and saved.size == len(original)
    assert session.files.download(saved.path) == original


def test_each_print_reaches_the_callback_before_the_result(session: Session) -> None:
    # The code waits for a file that only the on_stdout callback writes, after it got the first print:
    # it can finish only if that print arrived while the code was still running.
    code = (
        "import os, time\n"
        "print('waiting', flush=True)\n"
        "for _ in range(600):\n"
        "    if os.path.exists('go'): break\n"
        "    time.sleep(0.1)\n"
        "print('go' if os.path.exists('go') else 'gave up', flush=True)\n"
        "for i in range(3): print(i, flush=True)\n"
        "'done'"
    )
    seen: List[Tuple[str, str]] = []

    def on_stdout(text: str) -> None:
        seen.append(("stdout", text))
        if text == "waiting\n":
            session.files.upload("go", b"")

    r = session.run(code, on_stdout=on_stdout, on_display=lambda d: seen.append(("display", d.text or "")))
    seen.append(("result", r.status))
    lines = "".join(t for kind, t in seen if kind == "stdout")
    assert lines == "waiting\ngo\n0\n1\n2\n", seen
    assert seen[-2:] == [("display", "'done'"), ("result", "ok")], seen
    assert r.stdout == lines


def test_the_event_stream_in_order(session: Session) -> None:
    events: List[Event] = []
    with session.stream("import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\n1 + 1") as ex:
        for event in ex:
            events.append(event)
    assert ex.result is not None and ex.result.status == "ok"
    outputs = [e.output for e in events if isinstance(e, OutputEvent)]
    assert [(type(o), getattr(o, "text", None)) for o in outputs] == [(Stream, "a\n"), (Stream, "b\n"), (Display, "2")]


def test_an_error_has_its_name_value_and_traceback_with_ansi_stripped_on_request(session: Session) -> None:
    errors: List[ExecutionError] = []
    r = session.run("def f():\n    return 1 / 0\nf()", on_error=errors.append)
    assert r.status == "error" and r.error is not None
    assert r.error.ename == "ZeroDivisionError" and r.error.evalue == "division by zero"
    assert str(r.error) == "ZeroDivisionError: division by zero"
    coloured = r.error.format()
    assert "\x1b[" in coloured
    plain = r.error.format(strip_ansi=True)
    assert "\x1b" not in plain and "ZeroDivisionError" in plain and "return 1 / 0" in plain
    assert errors and errors[0].ename == "ZeroDivisionError", "on_error saw it as it happened"


def test_stdin_answers_prompts_in_json_and_streamed(session: Session) -> None:
    r = session.run("name = input('name? ')\nprint('hi', name)", stdin=["Ada"])
    assert r.stdout == "hi Ada\n"

    asked: List[InputRequest] = []

    def answer(request: InputRequest) -> str:
        asked.append(request)
        return "Grace"

    r = session.run("a = input('first? ')\nb = input('second? ')\nprint(a, b)", stdin=["Ada"], on_input=answer)
    assert r.stdout == "Ada Grace\n", r.raw
    assert [(q.prompt, q.password) for q in asked] == [("second? ", False)]

    # A plain call cannot be asked: the prompt is refused at once, the session keeps its state.
    r = session.run("x = 5\ninput('more? ')")
    assert r.status == "error" and r.error is not None and r.error.ename == "InputRequired"
    assert session.run("x").text == "5"

    # Streamed without on_input: the client interrupts the prompt rather than wait for the timeout.
    r = session.run("input('nobody answers? ')", on_stdout=lambda t: None)
    assert r.status == "error" and r.error is not None and r.error.ename == "KeyboardInterrupt"

    with pytest.raises(NoInputWaiting):
        session.send_input("nobody asked")


def test_a_timeout_interrupts_the_code_and_keeps_the_state(session: Session) -> None:
    r = session.run("x = 'kept'\nprint('before', flush=True)\nimport time; time.sleep(600)", timeout=2)
    assert r.status == "timeout", r.raw
    assert r.stdout == "before\n" and not r.kernel_restarted
    assert session.run("x").text == "'kept'"


def test_interrupt_stops_running_code_and_keeps_the_state(session: Session) -> None:
    def on_stdout(text: str) -> None:
        if text == "started\n":
            session.interrupt()

    r = session.run(
        "y = 'kept'\nimport time\nprint('started', flush=True)\ntime.sleep(600)",
        on_stdout=on_stdout,
        timeout=600,
        request_timeout=DEADLINE,
    )
    assert r.status == "error" and r.error is not None and r.error.ename == "KeyboardInterrupt"
    assert session.run("y").text == "'kept'"


def test_a_stream_the_caller_stops_reading_is_interrupted_and_the_kernel_is_free_at_once(session: Session) -> None:
    session.run("z = 'kept'")
    with session.stream(
        "import time, itertools\nfor i in itertools.count():\n    print(i, flush=True); time.sleep(0.05)", timeout=3600
    ) as ex:
        for event in ex:
            if isinstance(event, OutputEvent):
                break
    assert ex.result is None
    # Had the loop gone on, this would wait behind it for an hour: the deadline fails the test instead.
    r = session.run("z", request_timeout=DEADLINE)
    assert r.text == "'kept'"
    nb = session.notebook()
    assert any("itertools.count" in "".join(c["source"]) for c in nb["cells"])


def test_a_loop_that_breaks_out_of_a_stream_without_a_with_block_also_frees_the_kernel(session: Session) -> None:
    endless = "import itertools, time\nfor i in itertools.count():\n    print(i, flush=True); time.sleep(0.05)"
    for _event in session.stream(endless, timeout=3600):
        break
    assert session.run("'free'", request_timeout=DEADLINE).text == "'free'"


def test_a_callback_that_raises_stops_the_execution(session: Session) -> None:
    class Enough(Exception):
        pass

    def on_stdout(text: str) -> None:
        raise Enough(text)

    with pytest.raises(Enough):
        session.run(
            "w = 'kept'\nimport time\nwhile True:\n    print('.', flush=True); time.sleep(0.05)",
            on_stdout=on_stdout,
            timeout=3600,
        )
    assert session.run("w", request_timeout=DEADLINE).text == "'kept'"


def test_a_full_queue_is_queue_full(url: str, api_key: str, session: Session) -> None:
    depth = int(env("KERNELBOX_TEST_QUEUE_DEPTH"))
    impatient = Kernelbox(url, api_key=api_key, retry=Retry(max_retries=0))
    same = impatient.get(session.id)
    running = same.stream("import time\nprint('up', flush=True)\nwhile True: time.sleep(0.05)", timeout=3600)
    queued = [same.stream("1") for _ in range(depth)]
    with running:
        # Until the kernel has taken it, the running execution itself still waits in the queue.
        for event in running:
            if isinstance(event, OutputEvent) and isinstance(event.output, Stream):
                break
        for q in queued:
            q.__enter__()
        with pytest.raises(QueueFull) as e:
            same.run("1")
        assert e.value.status == 429 and e.value.code == "queue_full"
    for q in queued:
        assert q.wait().status == "ok"
    impatient.close()


def test_out_of_memory_is_an_exception_with_the_result_and_the_session_restarts(kb: Kernelbox) -> None:
    # Without automatic restarts the session stays dead until the client restarts it.
    with kb.session("python", memory_mb=128, auto_restart=False) as s:
        assert s.info().auto_restart is False
        with pytest.raises(OutOfMemory) as e:
            s.run("x = bytearray(1024 * 1024 * 1024)")
        assert isinstance(e.value, ExecutionKilled)
        assert e.value.reason == "out_of_memory" and e.value.result.status == "killed"
        assert s.info().status == "dead"
        s.restart()
        assert s.run("6 * 7").text == "42"


def test_out_of_memory_is_restarted_by_the_service_by_default(kb: Kernelbox) -> None:
    with kb.session("python", memory_mb=128) as s:
        assert s.info().auto_restart is True
        with pytest.raises(OutOfMemory) as e:
            s.run("x = bytearray(1024 * 1024 * 1024)")
        assert e.value.result.status == "killed"
        # The next execution waits for the new kernel and runs in it.
        assert s.run("6 * 7").text == "42"
        info = s.info()
        assert info.auto_restarts == 1 and info.status == "idle"


def test_run_code_is_one_shot_in_any_language(kb: Kernelbox) -> None:
    before = {i.id for i in kb.list()}
    r = kb.run_code("echo hello from bash; echo $((6 * 7))", language="bash")
    assert r.stdout == "hello from bash\n42\n"
    chunks: List[str] = []
    r = kb.run_code("console.log('hello from javascript')", language="javascript", on_stdout=chunks.append)
    assert r.status == "ok" and "".join(chunks) == "hello from javascript\n"
    assert {i.id for i in kb.list()} == before, "run_code leaves no session"


def test_a_broken_connection_is_a_transport_error() -> None:
    with Kernelbox("http://127.0.0.1:9", api_key="k") as kb:
        with pytest.raises(TransportError):
            kb.languages()
