"""kernelbox's ``run_code`` as the tool of an LLM function-calling loop.

The loop is the usual one: send the conversation and the tool's JSON schema to a chat model; when the model
answers with tool calls, run each (here: the code, in a fresh sandboxed kernel that is removed afterwards),
append what it printed as a ``tool`` message and ask again; stop at the first answer without tool calls.
Messages are in the OpenAI chat-completions shape, which most providers and agent frameworks accept.

Run it against a model (needs ``pip install openai`` and ``OPENAI_API_KEY``)::

    KERNELBOX_URL=http://127.0.0.1:8080 KERNELBOX_API_KEY=... python llm_tool_loop.py "What is 2**100?"

or replay a recorded conversation, with no model at all (what the client's test does)::

    python llm_tool_loop.py --replay recorded_tool_call.json

To keep state between tool calls (variables, files), hold one ``kb.session(...)`` for the conversation and
call ``s.run(code)`` in ``run_tool`` instead of ``kb.run_code``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Dict, List, Tuple

from kernelbox import ExecutionKilled, Kernelbox

Message = Dict[str, Any]
#: (messages, tools) -> the assistant's next message.
Complete = Callable[[List[Message], List[Dict[str, Any]]], Message]

SYSTEM = (
    "You can run code with the run_code tool. Each call runs in a fresh, sandboxed kernel with no network; "
    "print what you need to see."
)


def tool_schema(kb: Kernelbox) -> Dict[str, Any]:
    """The tool as the model sees it; the languages are the service's own."""
    languages = [lang.name for lang in kb.languages() if lang.available]
    return {
        "type": "function",
        "function": {
            "name": "run_code",
            "description": (
                "Run code in a sandboxed Jupyter kernel and return what it printed, its result and any error."
            ),
            "parameters": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "description": "The code to run."},
                    "language": {"type": "string", "enum": languages, "default": "python"},
                },
                "required": ["code"],
                "additionalProperties": False,
            },
        },
    }


def run_tool(kb: Kernelbox, arguments: Dict[str, Any]) -> str:
    """One tool call: the code's output as the text a model reads."""
    try:
        r = kb.run_code(str(arguments["code"]), language=str(arguments.get("language", "python")), timeout=60)
    except ExecutionKilled as e:
        return e.result.output_text() + f"[the kernel was killed: {e.reason}]"
    text = r.output_text(strip_ansi=True)
    for image in r.images:
        text += f"[an image was displayed: {image.image_mime}]\n"
    return text or "[no output]"


def agent_loop(kb: Kernelbox, complete: Complete, question: str, *, max_turns: int = 8) -> Tuple[str, List[Message]]:
    """Asks ``question`` and runs the model's tool calls until it answers; returns the answer and the
    conversation."""
    tools = [tool_schema(kb)]
    messages: List[Message] = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    for _ in range(max_turns):
        reply = complete(messages, tools)
        messages.append(reply)
        calls = reply.get("tool_calls") or []
        if not calls:
            return str(reply.get("content") or ""), messages
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": run_tool(kb, arguments)})
    raise RuntimeError(f"no answer within {max_turns} turns")


class Replay:
    """A recorded model: answers with the recorded assistant messages, in order."""

    def __init__(self, path: str) -> None:
        with open(path) as f:
            recorded = json.load(f)
        self.question: str = recorded["question"]
        self.replies: List[Message] = list(recorded["replies"])

    def __call__(self, messages: List[Message], tools: List[Dict[str, Any]]) -> Message:
        assert tools[0]["function"]["name"] == "run_code"
        return self.replies.pop(0)


def openai_model(model: str) -> Complete:  # pragma: no cover (needs a model)
    from openai import OpenAI  # type: ignore[import-not-found]

    client = OpenAI()

    def complete(messages: List[Message], tools: List[Dict[str, Any]]) -> Message:
        reply = client.chat.completions.create(model=model, messages=messages, tools=tools)
        message: Message = reply.choices[0].message.model_dump(exclude_none=True)
        return message

    return complete


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("question", nargs="?", default="What is the sum of the squares of 0 to 9?")
    parser.add_argument("--replay", help="a recorded conversation (JSON) instead of a model")
    parser.add_argument("--model", default="gpt-4o-mini")
    args = parser.parse_args(argv)
    if args.replay:
        replay = Replay(args.replay)
        complete: Complete = replay
        question = replay.question
    else:
        complete, question = openai_model(args.model), args.question
    with Kernelbox() as kb:
        answer, messages = agent_loop(kb, complete, question)
    for m in messages[1:]:
        print(json.dumps(m))
    print(answer)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
