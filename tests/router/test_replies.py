"""Reply shapes from real token events: several choices by index, logprobs in OpenAI's chat and
legacy formats, tool calls whole and streamed."""

from __future__ import annotations

import json

from mmdisagg.messages import TokenEvent, TokenLogprob
from mmdisagg.router.openai import ChatReply, TextReply


def event(text, index=0, finish=None, done=1, logprobs=None):
    return TokenEvent(text, [7], finish, prompt_tokens=5, completion_tokens=done, index=index,
                      logprobs=logprobs)


INTERLEAVED = [event("A", 0), event("x", 1), event("B", 0, "stop", 2),
               event("y", 1), event("z", 1, "length", 3)]


def test_choices_are_gathered_by_index_and_usage_counts_the_prompt_once():
    reply = ChatReply("m", True, "r", n=2).whole(INTERLEAVED)
    assert [c["message"]["content"] for c in reply["choices"]] == ["AB", "xyz"]
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert [c["finish_reason"] for c in reply["choices"]] == ["stop", "length"]
    assert reply["choices"][1]["token_ids"] == [7, 7, 7]
    assert reply["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}


def test_streamed_choices_carry_their_index():
    reply = ChatReply("m", False, "r", n=2)
    chunks = reply.first_chunks() + [c for e in INTERLEAVED for c in reply.chunks(e)]
    assert [c["choices"][0]["index"] for c in chunks[:2]] == [0, 1]
    text = {0: "", 1: ""}
    for chunk in chunks[2:]:
        choice = chunk["choices"][0]
        text[choice["index"]] += choice["delta"].get("content", "")
    assert text == {0: "AB", 1: "xyz"}


def test_chat_logprobs_format():
    lp = [TokenLogprob("Hi", -0.5, [("Hi", -0.5), ("Yo", -1.25)])]
    reply = ChatReply("m", False, "r").whole([event("Hi", finish="stop", logprobs=lp)])
    assert reply["choices"][0]["logprobs"] == {"content": [{
        "token": "Hi", "logprob": -0.5, "bytes": [72, 105], "top_logprobs": [
            {"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
            {"token": "Yo", "logprob": -1.25, "bytes": [89, 111]}]}]}
    assert ChatReply("m", False, "r").whole([event("Hi", finish="stop")])["choices"][0][
        "logprobs"] is None


def test_text_logprobs_format_with_offsets_across_chunks():
    first = event("ab", logprobs=[TokenLogprob("a", -1.0, [("a", -1.0)]),
                                  TokenLogprob("b", -2.0, [("c", -0.5)])])
    second = event("cd", finish="stop", logprobs=[TokenLogprob("cd", -3.0, [])])
    whole = TextReply("m", False, "r").whole([first, second])["choices"][0]["logprobs"]
    assert whole == {"tokens": ["a", "b", "cd"], "token_logprobs": [-1.0, -2.0, -3.0],
                     "top_logprobs": [{"a": -1.0}, {"c": -0.5}, {}], "text_offset": [0, 1, 2]}
    reply = TextReply("m", False, "r")
    streamed = [reply.chunks(e)[0]["choices"][0]["logprobs"] for e in (first, second)]
    assert streamed[1]["text_offset"] == [2]


def test_a_streamed_tool_call_becomes_one_delta_and_finishes_as_tool_calls():
    pieces = ["<tool", '_call>\n{"name": "f", ', '"arguments": {"x": 1}}\n</tool_call>']
    reply = ChatReply("m", False, "r", tool_parsing=True)
    events = [event(p) for p in pieces] + [event("", finish="stop")]
    chunks = [c for e in events for c in reply.chunks(e)]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [call for d in deltas for call in d.get("tool_calls", ())]
    assert len(calls) == 1 and json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    assert not any(d.get("content") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    whole = ChatReply("m", False, "r", tool_parsing=True).whole(events)["choices"][0]
    assert whole["finish_reason"] == "tool_calls" and whole["message"]["content"] is None
