"""Tool calls out of a chat model's text: the Hermes convention (Qwen2.5, Qwen3, Hermes and the
demo model's templates), a JSON object `{"name": ..., "arguments": {...}}` between `<tool_call>`
and `</tool_call>`.

The router uses it for a chat request that gave `tools` (and not `tool_choice: "none"`) when the
model's chat template writes those tags (`parser_for`). Each choice's text goes through its own
`HermesToolCalls`, piece by piece as it streams: the text outside the tags goes on as content; a
complete call leaves as a tool call (OpenAI's shape, its arguments JSON text); the pieces that
may start a tag are held until they do or do not. A block that is not a call (bad JSON, no
name) goes on as the text it was, and so does an unfinished block at the end (a stream cut by
max_tokens).
"""
from __future__ import annotations

import json
import uuid
from typing import Any, Optional

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parser_for(chat_template: Any) -> Optional[str]:
    """The tool-call convention of a tokenizer's chat template ("hermes"), or None (the XML-style
    calls some templates put between the same tags, `<function=...>`, are not parsed)."""
    text = chat_template if isinstance(chat_template, str) else json.dumps(chat_template) if chat_template else ""
    return "hermes" if OPEN in text and "<function=" not in text else None


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _held(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (it may be the start of one)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _call(body: str, index: int) -> Optional[dict[str, Any]]:
    try:
        obj = json.loads(body, parse_constant=_no_constant)   # (NaN, Infinity: not JSON for clients)
    except (ValueError, RecursionError):  # (a model can nest brackets past the parser's depth)
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text already ("": none)
        try:
            args = json.loads(args, parse_constant=_no_constant) if args.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class HermesToolCalls:
    """One choice's text, piece by piece: `feed` gives the content to send now and the calls
    completed; `finish`, at the end, what was held back (as content)."""

    def __init__(self) -> None:
        self._buf = ""
        self._in_call = False
        self.count = 0  # calls found so far (each call's index)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        self._buf += text
        out: list[str] = []
        calls: list[dict[str, Any]] = []
        while True:
            if not self._in_call:
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _held(self._buf, OPEN)
                    out.append(self._buf[:len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                out.append(self._buf[:i])
                self._buf, self._in_call = self._buf[i + len(OPEN):], True
            else:
                j = self._buf.find(CLOSE)
                if j < 0:
                    break
                body, self._buf, self._in_call = self._buf[:j], self._buf[j + len(CLOSE):], False
                call = _call(body, self.count)
                if call is None:
                    out.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
                    self.count += 1
        return "".join(out), calls

    def finish(self) -> str:
        rest = OPEN + self._buf if self._in_call else self._buf
        self._buf, self._in_call = "", False
        return rest
