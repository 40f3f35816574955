"""Requests -> sampling parameters: checkpoint defaults fill what a request leaves out; what
the sampler cannot honour is refused with a 400 naming it, never silently dropped."""

from __future__ import annotations

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


def test_a_checkpoint_default_the_sampler_cannot_apply_is_refused_not_dropped():
    defaults = QWEN_INSTRUCT | {"repetition_penalty": 1.05}
    with pytest.raises(ApiError, match=r"repetition_penalty: 1.05 .*checkpoint's default"):
        chat().sampling_params(defaults, 1024)
    assert chat(repetition_penalty=1.0).sampling_params(defaults, 1024).top_k == 1


@pytest.mark.parametrize("fields", [
    {"presence_penalty": 0.5}, {"frequency_penalty": -1}, {"min_tokens": 3}, {"min_p": 0.1},
    {"logit_bias": {"5": 10}}, {"n": 2}, {"logprobs": True},
    {"response_format": {"type": "json_object"}},
])
def test_fields_that_change_results_are_refused_until_supported(fields):
    name = next(iter(fields))
    with pytest.raises(ApiError, match=f"{name}: .* not supported yet") as refused:
        chat(**fields).sampling_params({}, 1024)
    assert refused.value.status == 400 and refused.value.param == name


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
