"""Qwen's <tool_call> blocks become OpenAI tool calls, whole and streamed in any pieces."""

from __future__ import annotations

import json

import pytest

from mmdisagg.router.tools import ToolCallParser, split_tool_calls

TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def names_and_arguments(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_calls_are_split_from_the_content():
    content, calls = split_tool_calls("Let me check.\n" + TWO_CALLS)
    assert content == "Let me check."
    assert names_and_arguments(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_only_calls_means_no_content_and_one_call_without_parallel_calls():
    assert split_tool_calls(TWO_CALLS)[0] is None
    assert names_and_arguments(split_tool_calls(TWO_CALLS, parallel=False)[1]) == [
        ("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("text", [
    "no calls at all, but a < sign and <tool",
    "<tool_call>not json</tool_call> after",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "f", "arguments": {}}',  # never closed (cut by max_tokens)
])
def test_text_that_is_not_a_well_formed_call_stays_content(text):
    assert split_tool_calls(text) == (text, [])


def test_streamed_in_any_pieces_gives_the_same_calls_and_content():
    text = "Sure <b>.\n" + TWO_CALLS + "\nDone."
    whole_content, whole_calls = split_tool_calls(text)
    for size in (1, 2, 3, 5, 11, len(text)):
        parser = ToolCallParser()
        deltas = []
        for start in range(0, len(text), size):
            deltas += parser.feed(text[start:start + size])
        deltas += parser.flush()
        content = "".join(d.get("content", "") for d in deltas)
        calls = [call for d in deltas for call in d.get("tool_calls", ())]
        assert content.strip() == whole_content
        assert [c["index"] for c in calls] == [0, 1]
        assert names_and_arguments(calls) == names_and_arguments(whole_calls)
        # Content before the first call streams before it; nothing of a call leaks as content.
        assert "tool_call" not in content and "content" in deltas[0]
