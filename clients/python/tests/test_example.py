"""The LLM tool-loop example runs end to end, its model replaced by a recorded conversation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_tool_loop_example_runs_the_recorded_tool_calls(url: str, api_key: str) -> None:
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "llm_tool_loop.py"), "--replay", str(EXAMPLES / "recorded_tool_call.json")],
        env={**os.environ, "KERNELBOX_URL": url, "KERNELBOX_API_KEY": api_key},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.strip().splitlines()
    messages = [json.loads(line) for line in lines[:-1]]
    tool_results = {m["tool_call_id"]: m["content"] for m in messages if m["role"] == "tool"}
    assert tool_results["call_0"] == "[0, 1, 4, 9, 16, 25, 36, 49, 64, 81]\n285\n", tool_results
    assert tool_results["call_1"] == "bash says 285\n", tool_results
    assert lines[-1] == "The sum of the squares of 0 to 9 is 285."
