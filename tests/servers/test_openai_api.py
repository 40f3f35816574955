"""The OpenAI surface a real client expects, end to end through router, encode server and
language server with the official client: text completions, checkpoint sampling defaults,
tools rendered by the chat template, the developer role, image detail, model cards and
OpenAI-shaped errors. Greedy answers equal the unsplit model's generate()."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest
import torch
from cluster import Cluster

from mmdisagg.models.tiny import MIN_PIXELS
from tests.models.fixtures import generate_greedy, image_part, text_part, user

MAX_TOKENS = 12
# The checkpoint's generation_config.json gets these sampling defaults; the server overrides one.
CHECKPOINT_DEFAULTS = {"temperature": 0.0, "top_k": 1, "max_new_tokens": 7}
OVERRIDE = {"top_p": 0.5}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoints, tmp_path_factory):
    """The tiny qwen2_vl checkpoint, with sampling defaults in its generation_config.json."""
    path = tmp_path_factory.mktemp("with_defaults") / "model"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], path)
    config_file = path / "generation_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text())
                                      | CHECKPOINT_DEFAULTS))
    return path


@pytest.fixture(scope="module")
def cluster(checkpoint):
    cluster = Cluster(checkpoint, api_key="sesame", torch_threads=1,
                      override_generation_config=json.dumps(OVERRIDE))
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models["qwen2_vl"]


def reference_from_ids(tiny, token_ids: list[int], max_new_tokens: int) -> list[int]:
    """The unsplit model's greedy continuation of raw token ids (no chat template)."""
    input_ids = torch.tensor([token_ids])
    with torch.no_grad():
        output = tiny.reference.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
            mm_token_type_ids=torch.zeros_like(input_ids), max_new_tokens=max_new_tokens,
            do_sample=False)
    return output[0, len(token_ids):].tolist()


def chat_reference(tiny, messages, tools, max_new_tokens: int) -> list[int]:
    """generate() on the chat template's own rendering of a (text-only) conversation."""
    text = tiny.encoder.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                      add_generation_prompt=True)
    return reference_from_ids(tiny, tiny.encoder.tokenizer.encode(text), max_new_tokens)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token_ids"])
def test_text_completion_equals_generate(cluster, tiny, stream, as_ids):
    prompt_text = "The cat sits on the windowsill, watching"
    token_ids = tiny.encoder.tokenizer.encode(prompt_text)
    expected = reference_from_ids(tiny, token_ids, MAX_TOKENS)
    client = cluster.client()
    args = {"model": "tiny-model", "prompt": token_ids if as_ids else prompt_text,
            "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"return_token_ids": True}}
    if not stream:
        reply = client.completions.create(**args)
        choice = reply.choices[0]
        tokens, text = choice.model_extra["token_ids"], choice.text
        assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
        assert reply.usage.prompt_tokens == len(token_ids)
        assert reply.usage.completion_tokens == len(tokens)
    else:
        tokens, text = [], ""
        for chunk in client.completions.create(stream=True, **args):
            assert chunk.object == "text_completion"
            for choice in chunk.choices:
                tokens += choice.model_extra.get("token_ids") or []
                text += choice.text
    assert tokens == expected
    assert text == tiny.encoder.tokenizer.decode(expected, skip_special_tokens=True)


def test_checkpoint_defaults_apply_and_a_request_overrides_them(cluster, tiny):
    language = cluster.child("language-0").url
    assert httpx.get(f"{language}/info").json()["sampling_defaults"] == \
        CHECKPOINT_DEFAULTS | OVERRIDE
    client = cluster.client()
    messages = user(text_part("Tell me a story about a cat and a boat."))
    # No temperature, no max_tokens: the checkpoint's greedy decoding and 7 tokens.
    reply = client.chat.completions.create(model="tiny-model", messages=messages,
                                           extra_body={"return_token_ids": True,
                                                       "ignore_eos": True})
    tokens = reply.choices[0].model_extra["token_ids"]
    assert len(tokens) == CHECKPOINT_DEFAULTS["max_new_tokens"]
    assert tokens == generate_greedy(tiny, messages, len(tokens)).tokens[:len(tokens)]
    # A request's own values win: sampling over the whole vocabulary, 7 tokens again.
    sampled = [client.chat.completions.create(
        model="tiny-model", messages=messages, temperature=2.0, top_p=1.0, seed=seed,
        extra_body={"return_token_ids": True, "ignore_eos": True, "top_k": 0},
    ).choices[0].model_extra["token_ids"] for seed in (1, 2)]
    assert tokens not in sampled and sampled[0] != sampled[1]


def test_tool_conversation_round_trips_through_the_chat_template(cluster, tiny):
    """Tools, an assistant tool call and the tool's answer reach the model as the checkpoint's
    template renders them: the answer equals generate() on that rendering."""
    conversation = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    as_templated = [{"role": "system", "content": "Answer briefly."}, conversation[1],
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris"}}}]},
                    {"role": "tool", "content": "sunny, 24 C"}]
    expected = chat_reference(tiny, as_templated, [WEATHER], MAX_TOKENS)
    reply = cluster.client().chat.completions.create(
        model="tiny-model", messages=conversation, tools=[WEATHER], tool_choice="auto",
        max_tokens=MAX_TOKENS, temperature=0, extra_body={"return_token_ids": True})
    assert reply.choices[0].model_extra["token_ids"] == expected
    # Without tools the prompt is another one, so (for this model) another answer.
    assert chat_reference(tiny, as_templated, None, MAX_TOKENS) != expected


def test_developer_role_is_the_system_role(cluster):
    client = cluster.client()

    def answer(role: str) -> list[int]:
        return client.chat.completions.create(
            model="tiny-model", max_tokens=MAX_TOKENS, temperature=0,
            messages=[{"role": role, "content": "You are terse."},
                      {"role": "user", "content": "Describe the image in detail."}],
            extra_body={"return_token_ids": True}).choices[0].model_extra["token_ids"]

    assert answer("developer") == answer("system")


def test_low_image_detail_uses_the_smallest_pixel_budget(cluster):
    client = cluster.client()
    image = image_part(224, 224, seed=4)

    def prompt_tokens(detail: str | None) -> int:
        part = {"type": "image_url", "image_url": dict(image["image_url"])}
        if detail is not None:
            part["image_url"]["detail"] = detail
        return client.chat.completions.create(
            model="tiny-model", messages=user(part, text_part("What is it?")), max_tokens=1,
            temperature=0).usage.prompt_tokens

    default = prompt_tokens(None)
    assert prompt_tokens("auto") == prompt_tokens("high") == default
    # 224 px: 8 x 8 merged tokens of 28 px; "low": the processor's minimum pixels, in tokens.
    assert default - prompt_tokens("low") == 8 * 8 - MIN_PIXELS // 28**2
    with pytest.raises(openai.BadRequestError, match="detail must be one of"):
        prompt_tokens("medium")


def test_bookkeeping_fields_are_accepted_and_replies_carry_a_fingerprint(cluster):
    client = cluster.client()
    reply = client.chat.completions.create(
        model="tiny-model", messages=user(text_part("hi")), max_tokens=2, temperature=0,
        store=False, metadata={"team": "vision"}, user="u-1", service_tier="auto",
        response_format={"type": "text"}, parallel_tool_calls=True)
    assert reply.system_fingerprint.startswith("fp_")
    chunks = list(client.chat.completions.create(
        model="tiny-model", messages=user(text_part("hi")), max_tokens=2, stream=True))
    assert all(chunk.system_fingerprint == reply.system_fingerprint for chunk in chunks)


def test_model_card_and_error_codes_as_openai_sends_them(cluster):
    client = cluster.client()
    assert client.models.retrieve("tiny-model").id == "tiny-model"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny-model", messages=user(text_part("hi")),
                                       logit_bias={"not-a-token": 5})
    assert refused.value.code is None and "logit_bias" in refused.value.message
    with pytest.raises(openai.AuthenticationError) as unauthorized:
        openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="guess",
                      max_retries=0).models.list()
    assert unauthorized.value.code == "invalid_api_key"
