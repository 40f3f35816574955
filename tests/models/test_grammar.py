"""Structured outputs on the tiny tokenizer: a spec compiles, its bitmask allows exactly the
tokens that keep the output inside the grammar, and a walk that picks random allowed tokens
always ends in JSON that parses and validates (or in a well-formed tool call)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from mmdisagg.core import GrammarSpec
from mmdisagg.models.errors import InputError
from mmdisagg.models.grammar import GrammarCompiler, GrammarMask
from mmdisagg.router.openai import ChatCompletionRequest
from mmdisagg.router.tools import split_tool_calls

MAX_STEPS = 300
# Bounded schemas: a random walk through an open one ({"type": "object"}) may never end.
SCHEMAS = {
    "enum and bool": {"type": "object", "properties": {
        "colour": {"enum": ["red", "green", "blue"]}, "sure": {"type": "boolean"}},
        "required": ["colour", "sure"], "additionalProperties": False},
    "bounded values": {"type": "object", "properties": {
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
        "required": ["count", "name", "tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {"box": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -5, "maximum": 5}}, "required": ["x"],
        "additionalProperties": False}}, "required": ["box"], "additionalProperties": False},
}
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
    "required": ["city"], "additionalProperties": False}}
TIME = {"name": "get_time", "parameters": {"type": "object", "properties": {},
                                           "additionalProperties": False}}


@pytest.fixture(scope="module")
def language(tiny_models):
    return tiny_models["qwen2_vl"].language


@pytest.fixture(scope="module")
def compiler(language):
    return GrammarCompiler(language.tokenizer, len(language.tokenizer), language.eos_token_ids)


def random_walk(compiler: GrammarCompiler, language, specs: list[GrammarSpec],
                seed: int) -> list[str]:
    """Several constrained rows in one batch, each taking a random allowed token per step
    until its grammar ends (with a stop token)."""
    matchers = [compiler.matcher(spec) for spec in specs]
    mask = GrammarMask(compiler.vocab_size)
    generator = torch.Generator().manual_seed(seed)
    outputs: list[list[int]] = [[] for _ in specs]
    for _ in range(MAX_STEPS):
        live = [None if matcher.is_terminated() else matcher for matcher in matchers]
        if not any(live):
            break
        logits = torch.randn(len(specs), compiler.vocab_size, generator=generator)
        mask.apply(logits, live)
        tokens = logits.argmax(dim=-1).tolist()
        mask.accept(live, tokens)
        for output, matcher, token in zip(outputs, live, tokens, strict=True):
            if matcher is not None and token not in language.eos_token_ids:
                output.append(token)
    assert all(matcher.is_terminated() for matcher in matchers), "a walk did not finish"
    return [language.tokenizer.decode(output) for output in outputs]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_walks_give_json_that_validates(compiler, language, seed):
    specs = [GrammarSpec(json.dumps(schema)) for schema in SCHEMAS.values()]
    texts = random_walk(compiler, language, specs, seed)
    for text, schema in zip(texts, SCHEMAS.values(), strict=True):
        jsonschema.validate(json.loads(text), schema)


def test_the_first_mask_allows_only_tokens_that_open_an_object(compiler, language):
    matcher = compiler.matcher(GrammarSpec(json.dumps({"type": "object"})))
    logits = torch.zeros(1, compiler.vocab_size)
    GrammarMask(compiler.vocab_size).apply(logits, [matcher])
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and all(language.tokenizer.decode([t]).startswith("{") for t in allowed)
    assert len(allowed) < compiler.vocab_size // 10


def test_unconstrained_rows_are_left_alone(compiler):
    matcher = compiler.matcher(GrammarSpec(json.dumps({"type": "object"})))
    logits = torch.randn(3, compiler.vocab_size)
    before = logits.clone()
    GrammarMask(compiler.vocab_size).apply(logits, [None, matcher, None])
    assert torch.equal(logits[[0, 2]], before[[0, 2]])
    assert not torch.isfinite(logits[1]).all()


@pytest.mark.parametrize(("tool_choice", "names"), [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})])
def test_required_and_named_tool_calls_are_well_formed(compiler, language, tool_choice,
                                                      names):
    request = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": f} for f in (WEATHER, TIME)],
        "tool_choice": tool_choice})
    for text in random_walk(compiler, language, [request.grammar()] * 4, seed=5):
        content, calls = split_tool_calls(text)
        assert content is None and len(calls) == 1
        call = calls[0]["function"]
        assert call["name"] in names
        schema = WEATHER if call["name"] == "get_weather" else TIME
        jsonschema.validate(json.loads(call["arguments"]), schema["parameters"])


def test_a_bad_schema_is_a_client_error(compiler):
    with pytest.raises(InputError, match="JSON schema"):
        compiler.matcher(GrammarSpec(json.dumps({"type": "no-such-type"})))


def test_a_spec_compiles_once(compiler):
    spec = GrammarSpec(json.dumps({"type": "object", "properties": {"q": {"type": "null"}}}))
    assert compiler.compile(spec) is compiler.compile(spec)
