"""OpenAI sampling features end to end, through router, encode and language servers, with the
official client: penalties, min_tokens and logit_bias equal the unsplit model's generate()
with transformers' matching logits processors; logprobs equal its log-softmax; n choices
share one encode; structured outputs and forced tool calls are always well-formed."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from cluster import Cluster, metrics, wait_pools_free
from transformers import LogitsProcessor, LogitsProcessorList

from tests.models.fixtures import (
    Greedy,
    assert_same_tokens,
    image_part,
    reference_inputs,
    text_part,
    user,
)

MAX_TOKENS = 16
STORY = user(text_part("Tell me a story about a cat and a boat."))
PICTURE = user(image_part(56, 56, seed=1), text_part("Describe the picture."))


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    cluster = Cluster(tiny_checkpoints["qwen2_vl"], torch_threads=1)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["qwen2_vl"]


class OpenAIPenalties(LogitsProcessor):
    """presence/frequency penalties as OpenAI defines them, over the generated tokens only
    (a plain per-row loop: the reference, not the implementation)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length, self.presence, self.frequency = prompt_length, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_length:]):
            counts = torch.bincount(ids, minlength=scores.shape[-1]).to(scores.dtype)
            scores[row] -= self.frequency * counts + self.presence * (counts > 0).to(scores)
        return scores


def reference(tiny, messages, **generate_kwargs) -> tuple[Greedy, list[torch.Tensor]]:
    """The unsplit model's greedy tokens (and raw logits) with the given processors."""
    inputs = reference_inputs(tiny, messages)
    with torch.no_grad():
        output = tiny.reference.generate(
            **inputs, max_new_tokens=MAX_TOKENS, do_sample=False, output_scores=True,
            output_logits=True, return_dict_in_generate=True, **generate_kwargs)
    margins = [float(top[0] - top[1]) for top in
               (scores[0].topk(2).values for scores in output.scores)]
    tokens = output.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return Greedy(tokens, margins), [logits[0] for logits in output.logits]


def served(cluster, messages, **fields):
    reply = cluster.client().chat.completions.create(
        model="tiny-model", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True, **fields.pop("extra_body", {})}, **fields)
    return reply


def tokens_of(reply, index=0) -> list[int]:
    return reply.choices[index].model_extra["token_ids"]


def prompt_length(tiny, messages) -> int:
    return reference_inputs(tiny, messages)["input_ids"].shape[1]


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_generate(cluster, tiny, penalty):
    expected, _ = reference(tiny, STORY, repetition_penalty=penalty)
    plain, _ = reference(tiny, STORY)
    assert expected.tokens != plain.tokens  # the penalty changes this answer
    assert_same_tokens(tokens_of(served(cluster, STORY, extra_body={
        "repetition_penalty": penalty})), expected)


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 1.0), (-0.5, 0.8)])
def test_presence_and_frequency_penalties_equal_generate(cluster, tiny, presence, frequency):
    processor = OpenAIPenalties(prompt_length(tiny, STORY), presence, frequency)
    expected, _ = reference(tiny, STORY, logits_processor=LogitsProcessorList([processor]))
    assert_same_tokens(tokens_of(served(cluster, STORY, presence_penalty=presence,
                                        frequency_penalty=frequency)), expected)


def test_min_tokens_equals_generate(cluster, tiny):
    """The third greedy token is made a stop token: the answer ends there, unless min_tokens
    keeps stop tokens (and EOS) out of the first six, as transformers' min_new_tokens does."""
    plain, _ = reference(tiny, STORY)
    stop = plain.tokens[2]
    eos = sorted(tiny.language.eos_token_ids)
    assert tokens_of(served(cluster, STORY, extra_body={"stop_token_ids": [stop]})) == \
        plain.tokens[:3]
    expected, _ = reference(tiny, STORY, eos_token_id=[*eos, stop], min_new_tokens=6)
    reply = served(cluster, STORY, extra_body={"stop_token_ids": [stop], "min_tokens": 6})
    assert len(tokens_of(reply)) > 6
    assert_same_tokens(tokens_of(reply), expected)


def test_logit_bias_equals_generate(cluster, tiny):
    plain, _ = reference(tiny, STORY)
    banned, boosted = plain.tokens[0], plain.tokens[2]
    bias = {(banned,): -100.0, (boosted,): 5.0}
    expected, _ = reference(tiny, STORY, sequence_bias=bias)
    assert expected.tokens != plain.tokens
    assert_same_tokens(tokens_of(served(cluster, STORY, logit_bias={
        str(banned): -100, str(boosted): 5})), expected)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_logprobs_equal_the_reference_log_softmax(cluster, tiny, stream):
    expected, logits = reference(tiny, PICTURE)
    client = cluster.client()
    args = dict(model="tiny-model", messages=PICTURE, max_tokens=MAX_TOKENS, temperature=0,
                logprobs=True, top_logprobs=5, extra_body={"return_token_ids": True})
    if stream:
        tokens, entries = [], []
        for chunk in client.chat.completions.create(stream=True, **args):
            for choice in chunk.choices:
                tokens += choice.model_extra.get("token_ids") or []
                entries += choice.logprobs.content if choice.logprobs else []
    else:
        choice = client.chat.completions.create(**args).choices[0]
        tokens, entries = choice.model_extra["token_ids"], choice.logprobs.content
    assert_same_tokens(tokens, expected)
    assert len(entries) == len(tokens)
    text = tiny.language.tokenizer.decode
    for step, (token, entry) in enumerate(zip(tokens, entries, strict=True)):
        if step >= len(logits) or token != expected.tokens[step]:
            break
        reference_logp = torch.log_softmax(logits[step].float(), dim=-1)
        assert entry.token == text([token])
        assert abs(entry.logprob - float(reference_logp[token])) < 1e-4
        top = reference_logp.topk(5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            top.values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == text([int(top.indices[0])])


def test_n_choices_share_one_encode_and_are_reproducible(cluster):
    messages = user(image_part(84, 56, seed=11), text_part("What is in it?"))
    encoder = cluster.child("encode-0").url
    before = metrics(encoder)

    def ask(stream: bool = False):
        return cluster.client().chat.completions.create(
            model="tiny-model", messages=messages, n=3, seed=42, temperature=1.0,
            max_tokens=8, stream=stream, extra_body={"return_token_ids": True,
                                                     "ignore_eos": True})

    first = ask()
    after = metrics(encoder)
    looked_up = sum(after.get(f'mmdisagg_image_cache_total{{result="{r}"}}', 0)
                    - before.get(f'mmdisagg_image_cache_total{{result="{r}"}}', 0)
                    for r in ("hit", "miss"))
    assert looked_up == 1  # one encode: the vision tower saw the image once
    choices = [tokens_of(first, i) for i in range(3)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert all(len(c) == 8 for c in choices) and len({tuple(c) for c in choices}) == 3
    assert first.usage.completion_tokens == 24
    again = ask()
    assert [tokens_of(again, i) for i in range(3)] == choices
    streamed: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for chunk in ask(stream=True):
        for choice in chunk.choices:
            streamed[choice.index] += choice.model_extra.get("token_ids") or []
    assert [streamed[i] for i in range(3)] == choices


SCHEMAS = [
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                      "sure": {"type": "boolean"}},
     "required": ["colour", "sure"], "additionalProperties": False},
    {"type": "object", "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "name": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["count", "name", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
     "minItems": 1, "maxItems": 4},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["enum", "bounded", "array"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(cluster, schema, temperature):
    reply = cluster.client().chat.completions.create(
        model="tiny-model", messages=PICTURE, max_tokens=120, temperature=temperature,
        seed=3, response_format={"type": "json_schema",
                                 "json_schema": {"name": "answer", "schema": schema}})
    assert reply.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("tool_choice", [
    "required", {"type": "function", "function": {"name": "get_time"}}],
    ids=["required", "named"])
def test_forced_tool_call_is_well_formed(cluster, tool_choice, stream):
    args = dict(model="tiny-model", messages=STORY, tools=[WEATHER, TIME],
                tool_choice=tool_choice, max_tokens=60, temperature=1.0, seed=5)
    if stream:
        calls, content, finish = [], "", None
        for chunk in cluster.client().chat.completions.create(stream=True, **args):
            for choice in chunk.choices:
                calls += choice.delta.tool_calls or []
                content += choice.delta.content or ""
                finish = choice.finish_reason or finish
        assert not content.strip()
    else:
        choice = cluster.client().chat.completions.create(**args).choices[0]
        calls, finish = choice.message.tool_calls, choice.finish_reason
        assert choice.message.content is None
    assert finish == "tool_calls" and len(calls) == 1
    call = calls[0].function
    assert call.name == "get_time" or (tool_choice == "required" and call.name == "get_weather")
    schema = (WEATHER if call.name == "get_weather" else TIME)["function"]["parameters"]
    jsonschema.validate(json.loads(call.arguments), schema)


def test_text_completion_logprobs(cluster, tiny):
    prompt = "The cat sits on the windowsill"
    reply = cluster.client().completions.create(model="tiny-model", prompt=prompt, max_tokens=5,
                                                temperature=0, logprobs=3)
    logprobs = reply.choices[0].logprobs
    assert "".join(logprobs.tokens) == reply.choices[0].text
    assert len(logprobs.top_logprobs) == 5 and all(len(t) <= 3 for t in logprobs.top_logprobs)
    assert all(lp <= 0 for lp in logprobs.token_logprobs)


def test_nothing_is_left_held_after_all_of_the_above(cluster):
    """n choices, grammars and logprobs leave no embedding-pool or KV block behind."""
    assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    language = cluster.child("language-0").url
    assert metrics(language)['mmdisagg_kv_blocks{state="used"}'] == 0
