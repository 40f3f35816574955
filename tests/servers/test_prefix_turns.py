"""A chat's later turns through a real ``mmdisagg serve``: the prefix the language server holds is
neither encoded, sent nor prefilled again, and the answers still equal generate()."""

from __future__ import annotations

from typing import Any

import pytest
from cluster import Cluster, metrics, wait_pools_free

from mmdisagg.core import HASH_BLOCK_TOKENS
from mmdisagg.pool.layout import PoolLayout
from tests.models.fixtures import generate_greedy, image_part, text_part

MAX_TOKENS = 8
LONG_QUESTION = ("Describe the colours, the shapes, the light and what the picture might be "
                 "used for. " * 6)


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    # No image cache on the encoder: a vision forward skipped here is the prefix cache's doing.
    cluster = Cluster(tiny_checkpoints["qwen2_vl"], torch_threads=1, image_cache_bytes=0)
    yield cluster
    cluster.close()


def ask(cluster: Cluster, messages: list[dict[str, Any]]) -> tuple[list[int], str]:
    reply = cluster.client().chat.completions.create(
        model="tiny-model", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"return_token_ids": True})
    return reply.choices[0].token_ids, reply.choices[0].message.content


def counters(cluster: Cluster) -> dict[str, float]:
    encoder, language = (metrics(cluster.child(f"{role}-0").url)
                         for role in ("encode", "language"))
    return {"vision": encoder["mmdisagg_vision_images_total"],
            "bytes": language["mmdisagg_transfer_bytes_total"],
            "skipped": language["mmdisagg_transfer_cached_tokens_total"],
            "hit": language["mmdisagg_prefix_cache_hit_tokens_total"],
            "queried": language["mmdisagg_prefix_cache_queries_tokens_total"]}


def test_later_turns_reuse_the_prefix_and_match_generate(cluster, tiny_models):
    tiny = tiny_models["qwen2_vl"]
    chunk = cluster.settings.pool.block_size
    token_bytes = PoolLayout(1, chunk, tiny.language.hidden_size, "float32").token_bytes
    turn = [{"role": "user", "content": [image_part(84, 84, seed=81),
                                         text_part(LONG_QUESTION)]}]
    first_prompt = tiny.encoder.prepare(turn).total_tokens // HASH_BLOCK_TOKENS * HASH_BLOCK_TOKENS
    before = counters(cluster)
    tokens, text = ask(cluster, turn)
    assert tokens == generate_greedy(tiny, turn, MAX_TOKENS).tokens
    first = counters(cluster)
    assert first["vision"] == before["vision"] + 1 and first["hit"] == before["hit"]
    for question in ("And the light?", "Anything else?"):
        turn = [*turn, {"role": "assistant", "content": text},
                {"role": "user", "content": question}]
        prompt_tokens = tiny.encoder.prepare(turn).total_tokens
        start = counters(cluster)
        tokens, text = ask(cluster, turn)
        assert tokens == generate_greedy(tiny, turn, MAX_TOKENS).tokens
        after = counters(cluster)
        hit = after["hit"] - start["hit"]
        assert hit >= first_prompt and hit % HASH_BLOCK_TOKENS == 0  # turn 1's whole blocks
        assert after["skipped"] - start["skipped"] == hit
        # only the uncached suffix crosses, though it starts inside a pool block
        assert after["bytes"] - start["bytes"] == (prompt_tokens - hit) * token_bytes
        assert after["vision"] == start["vision"]  # the image lies inside the cached prefix
        assert after["queried"] - start["queried"] == prompt_tokens
    assert max(wait_pools_free(cluster).values()) == 0


def test_a_next_turn_finds_the_answer_too(cluster, tiny_models):
    """Turn 1's answer is cached with its prompt: turn 2's hit reaches past turn 1's prompt,
    only what follows the hit crosses, and the answer still equals generate()."""
    tiny = tiny_models["qwen2_vl"]
    kv_block = cluster.settings.engine.kv_block_size
    token_bytes = PoolLayout(1, cluster.settings.pool.block_size, tiny.language.hidden_size,
                             "float32").token_bytes
    cat = tiny.language.tokenizer.encode(" cat")  # one token; " cat cat" re-tokenizes alike
    turn = [{"role": "user", "content": [image_part(84, 84, seed=85), text_part("Say cat.")]}]
    first = tiny.encoder.prepare(turn).total_tokens
    reply = cluster.client().chat.completions.create(
        model="tiny-model", messages=turn, max_tokens=40, temperature=0,
        logit_bias={str(cat[0]): 100}, extra_body={"return_token_ids": True}).choices[0]
    turn = [*turn, {"role": "assistant", "content": reply.message.content},
            {"role": "user", "content": "Why?"}]
    prompt = tiny.encoder.prepare(turn).token_ids.tolist()
    computed = reply.token_ids[:-1]  # the last token has no KV
    assert len(cat) == 1 and prompt[first: first + len(computed)] == computed
    start = counters(cluster)
    tokens, _ = ask(cluster, turn)
    assert tokens == generate_greedy(tiny, turn, MAX_TOKENS).tokens
    after = counters(cluster)
    hit = after["hit"] - start["hit"]
    assert hit == (first + len(computed)) // kv_block * kv_block > first
    assert after["bytes"] - start["bytes"] == (len(prompt) - hit) * token_bytes


def test_another_image_of_the_same_size_is_encoded_and_answered_right(cluster, tiny_models):
    tiny = tiny_models["qwen2_vl"]
    seen = [{"role": "user", "content": [image_part(84, 84, seed=82), text_part(LONG_QUESTION)]}]
    ask(cluster, seen)
    other = [{"role": "user", "content": [image_part(84, 84, seed=83), text_part(LONG_QUESTION)]}]
    start = counters(cluster)
    tokens, _ = ask(cluster, other)
    assert tokens == generate_greedy(tiny, other, MAX_TOKENS).tokens
    after = counters(cluster)
    image_start = tiny.encoder.prepare(other).image_starts[0]
    assert after["vision"] == start["vision"] + 1  # only the text before the image was found
    assert after["hit"] - start["hit"] == image_start // HASH_BLOCK_TOKENS * HASH_BLOCK_TOKENS
