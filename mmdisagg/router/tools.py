"""Qwen's tool calls in generated text -> OpenAI ``tool_calls``.

Qwen checkpoints write a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.
A block that does not parse as such a call stays in the content, as the model wrote it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def parse_call(body: str) -> dict[str, Any] | None:
    """An OpenAI tool call from the text between the tags, or None if it is not one."""
    try:
        call = json.loads(body)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"],
                         "arguments": json.dumps(arguments, ensure_ascii=False)}}


class ToolCallParser:
    """Splits generated text, piece by piece, into content and tool calls.

    ``feed`` returns stream deltas: ``{"content": ...}`` for text that cannot be part of a
    call (text that may begin ``<tool_call>`` is held back) and ``{"tool_calls": [...]}`` for
    each call once it closes. With ``parallel`` False only the first call is kept."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.calls: list[dict[str, Any]] = []
        self._pending = ""
        self._inside = False
        self._after_call = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        self._pending += text
        deltas: list[dict[str, Any]] = []
        while True:
            if self._inside:
                end = self._pending.find(CLOSE)
                if end < 0:
                    return deltas
                body, self._pending = self._pending[:end], self._pending[end + len(CLOSE):]
                self._inside = False
                call = parse_call(body)
                if call is None:
                    self._content(OPEN + body + CLOSE, deltas)
                else:
                    if self.parallel or not self.calls:
                        deltas.append({"tool_calls": [{"index": len(self.calls), **call}]})
                        self.calls.append(call)
                    self._after_call = True
                continue
            start = self._pending.find(OPEN)
            if start >= 0:
                self._content(self._pending[:start], deltas)
                self._pending = self._pending[start + len(OPEN):]
                self._inside = True
                continue
            keep = _partial_open(self._pending)
            self._content(self._pending[:len(self._pending) - keep], deltas)
            self._pending = self._pending[len(self._pending) - keep:]
            return deltas

    def flush(self) -> list[dict[str, Any]]:
        """The text still held back, as content (an unclosed call is not a call)."""
        deltas: list[dict[str, Any]] = []
        self._content((OPEN if self._inside else "") + self._pending, deltas)
        self._pending, self._inside = "", False
        return deltas

    def _content(self, text: str, deltas: list[dict[str, Any]]) -> None:
        if self._after_call:  # NOTE: the newlines the model puts after a call are not content
            text = text.lstrip()
            self._after_call = not text
        if text:
            deltas.append({"content": text})


def _partial_open(text: str) -> int:
    """Length of the longest end of ``text`` that begins OPEN."""
    for size in range(min(len(text), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(text[-size:]):
            return size
    return 0


def split_tool_calls(text: str, parallel: bool = True) -> tuple[str | None, list[dict[str, Any]]]:
    """Whole generated text -> (content, or None when only calls remain; tool calls)."""
    parser = ToolCallParser(parallel)
    deltas = parser.feed(text) + parser.flush()
    content = "".join(delta.get("content", "") for delta in deltas)
    if parser.calls and not content.strip():
        return None, parser.calls
    return (content.strip() if parser.calls else content), parser.calls
