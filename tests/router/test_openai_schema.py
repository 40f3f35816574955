"""Requests -> sampling parameters: checkpoint defaults fill what a request leaves out; every
OpenAI sampling field reaches the language servers; structured outputs become grammars."""

from __future__ import annotations

import json

import pytest

from mmdisagg.httpapp import ApiError
from mmdisagg.router.openai import ChatCompletionRequest, CompletionRequest

QWEN_INSTRUCT = {"temperature": 0.1, "top_p": 0.001, "top_k": 1}
MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def test_defaults_fill_only_what_the_request_leaves_out():
    params = chat(top_p=0.9).sampling_params(QWEN_INSTRUCT | {"max_new_tokens": 5}, 1024)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == \
        (0.1, 0.9, 1, 5)
    params = chat(max_completion_tokens=9, temperature=0).sampling_params(QWEN_INSTRUCT, 1024)
    assert (params.temperature, params.max_tokens) == (0.0, 9)


def test_without_defaults_the_neutral_values_apply():
    params = chat().sampling_params({}, 1024)
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == \
        (1.0, 1.0, 0, 1024)
    assert CompletionRequest.model_validate(
        {"model": "m", "prompt": "x"}).sampling_params({}, 1024).max_tokens == 16


def test_every_openai_sampling_field_reaches_the_sampling_params():
    params = chat(presence_penalty=0.5, frequency_penalty=-1, min_tokens=3, logit_bias={
        "7": 10, "5": -100}, n=3, seed=4, logprobs=True, top_logprobs=2).sampling_params(
        QWEN_INSTRUCT | {"repetition_penalty": 1.05, "min_p": 0.1}, 1024)
    assert (params.presence_penalty, params.frequency_penalty, params.min_tokens, params.n,
            params.seed, params.logprobs) == (0.5, -1, 3, 3, 4, 2)
    assert params.logit_bias == ((5, -100.0), (7, 10.0))
    assert (params.repetition_penalty, params.min_p) == (1.05, 0.1)  # the checkpoint's
    assert chat(repetition_penalty=1.0, logprobs=True).sampling_params(
        {"repetition_penalty": 1.05}, 1024).repetition_penalty == 1.0
    assert chat().sampling_params({}, 1024).logprobs is None
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": 0}
                                            ).sampling_params({}, 1024).logprobs == 0


@pytest.mark.parametrize("bias", [{"x": 1}, {"5": 101}, {"-1": 1}])
def test_bad_logit_bias_is_a_client_error(bias):
    with pytest.raises(ApiError, match="logit_bias: keys must be token ids"):
        chat(logit_bias=bias).sampling_params({}, 1024)


def test_structured_outputs_become_grammars():
    assert json.loads(chat(response_format={"type": "json_object"}).sampling_params(
        {}, 1024).grammar.json_schema) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert json.loads(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": schema}}).grammar().json_schema) == schema
    assert chat(response_format={"type": "text"}).grammar() is None
    with pytest.raises(ApiError, match=r"json_schema\.schema"):
        chat(response_format={"type": "json_schema", "json_schema": {"name": "s"}}).grammar()


def test_neutral_values_and_text_format_are_accepted():
    chat(presence_penalty=0, min_tokens=0, n=1, logit_bias={}, response_format={"type": "text"},
         store=True, metadata={"a": "b"}, user="u", service_tier="default",
         ).sampling_params({}, 1024)


@pytest.mark.parametrize(("fields", "words"), [
    ({"tool_choice": "auto"}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "not among the tools"),
    ({"top_logprobs": 3}, "top_logprobs needs logprobs"),
    ({"top_logprobs": 21, "logprobs": True}, "less than or equal to 20"),
])
def test_inconsistent_requests_are_invalid(fields, words):
    with pytest.raises(ValueError, match=words):
        chat(**fields)


def test_completion_prompt_forms():
    def prompt(value):
        return CompletionRequest.model_validate({"model": "m", "prompt": value}).prompt_input()

    assert prompt("hello").text == "hello"
    assert prompt([1, 2, 3]).text == [1, 2, 3]
    assert prompt(["hello"]).text == "hello" and prompt([[4, 5]]).text == [4, 5]
    with pytest.raises(ValueError, match="one prompt per request"):
        prompt(["a", "b"])
    with pytest.raises(ValueError, match="echo"):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "echo": True})
