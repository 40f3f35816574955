"""A prompt of several images through a real ``mmdisagg serve`` whose encode server runs one
image per vision forward: each forward's rows are sent as it ends, in several chunks per
window, the language server prefills them as they land, and the answers still equal
generate() (Qwen3-VL's deepstack rows too, though its prefill waits for the whole prompt)."""

from __future__ import annotations

import pytest
from cluster import Cluster, metrics, wait_pools_free

from tests.models.fixtures import generate_greedy, image_part, text_part, user

MAX_TOKENS = 6
PATCHES_PER_IMAGE = 256  # the tiny checkpoints' largest image: 64 tokens


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen3_vl"])
def served(request, tiny_checkpoints):
    cluster = Cluster(tiny_checkpoints[request.param], torch_threads=1, image_cache_bytes=0,
                      prepared_image_cache_bytes=0, max_encode_patches=PATCHES_PER_IMAGE,
                      block_size=16, default_blocks=2, window_blocks=4)
    yield request.param, cluster
    cluster.close()


def test_images_encoded_one_forward_each_are_answered_as_generate(served, tiny_models):
    family, cluster = served
    tiny = tiny_models[family]
    chats = [user(image_part(224, 224, seed=71), text_part("and"), image_part(168, 224, seed=72),
                  text_part("then"), image_part(224, 112, seed=73), image_part(224, 224, seed=74),
                  text_part("Compare all four.")),
             user(text_part("Just text, one stage.")),
             user(image_part(224, 224, seed=75), text_part("One image, text after it."))]
    language = cluster.child("language-0").url
    before = metrics(language)
    replies = [cluster.client().chat.completions.create(
        model="tiny-model", messages=chat, max_tokens=MAX_TOKENS, temperature=0, n=2,
        extra_body={"return_token_ids": True}) for chat in chats]
    for chat, reply in zip(chats, replies, strict=True):
        expected = generate_greedy(tiny, chat, MAX_TOKENS).tokens
        assert [choice.token_ids for choice in reply.choices] == [expected, expected]
    after = metrics(language)
    prompts = sum(tiny.encoder.prepare(chat).total_tokens for chat in chats)
    prefilled = (after["mmdisagg_prefill_while_arriving_tokens_total"]
                 - before["mmdisagg_prefill_while_arriving_tokens_total"])
    # (how much is timing; none at all for Qwen3-VL, whose prefill waits for deepstack rows)
    assert 0 <= prefilled < 2 * prompts and (family == "qwen2_vl" or prefilled == 0)
    assert max(wait_pools_free(cluster).values()) == 0
