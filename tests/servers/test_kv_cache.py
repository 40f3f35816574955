"""The language server's paged KV cache through the whole service: a prompt the cache can never
hold is refused before its embeddings move; a cache so small that requests are preempted still
gives every right answer; 100 concurrent long requests keep the server's memory bounded."""

from __future__ import annotations

import asyncio

import openai
import pytest
from cluster import Cluster, metrics, wait_pools_free

from mmdisagg.models.base import LanguageHalf
from tests.models.fixtures import (
    assert_same_tokens,
    generate_greedy,
    image_part,
    text_part,
    user,
)

PREEMPTIONS = "mmdisagg_kv_preemptions_total"
KV_USED = 'mmdisagg_kv_blocks{state="used"}'
TRANSFER_BYTES = "mmdisagg_transfer_bytes_total"


def kv_bytes_per_token(path) -> int:
    """--kv-cache-memory per token of the pool: on CPU it also holds the decode workspace,
    as many tokens again."""
    return 2 * LanguageHalf.from_pretrained(path).kv_layout.bytes_per_token


def test_prompt_longer_than_the_kv_cache_is_refused_before_transfer(tiny_checkpoints):
    path = tiny_checkpoints["qwen2_vl"]
    cache_tokens = 64
    cluster = Cluster(path, torch_threads=1, kv_block_size=16,
                      kv_cache_memory=str(cache_tokens * kv_bytes_per_token(path)))
    try:
        language = cluster.child("language-0").url
        before = metrics(language)[TRANSFER_BYTES]
        client = cluster.client()
        long = user(text_part("Describe the harbour, the boats and the sky. " * 8))
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-model", messages=long, max_tokens=4)
        message = str(refused.value)
        # NOTE: a quarter of the blocks may hold pinned prefixes: no sequence gets those
        assert "the prompt is" in message and f"holds {cache_tokens * 3 // 4} tokens" in message
        assert metrics(language)[TRANSFER_BYTES] == before, "the prompt was not refused early"
        reply = client.chat.completions.create(model="tiny-model", messages=user(text_part("hi")),
                                               max_tokens=4, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    finally:
        cluster.close()


def test_kv_cache_so_small_that_requests_are_preempted(tiny_checkpoints, tiny_models):
    """2-token blocks, room for about two prompts: requests wait for blocks, and decoding ones
    preempt each other; every answer is still generate()'s."""
    path = tiny_checkpoints["qwen2_vl"]
    distinct = [user(image_part(56 + 28 * (i % 2), 56, seed=200 + i),
                     text_part(f"Question {i}: what do you see?")) for i in range(4)]
    expected = [generate_greedy(tiny_models["qwen2_vl"], messages, 12) for messages in distinct]
    cluster = Cluster(path, torch_threads=1, kv_block_size=2, prefix_cache=False,
                      kv_cache_memory=str(150 * kv_bytes_per_token(path)))
    try:
        answers = asyncio.run(cluster.token_ids(distinct * 4, max_tokens=12))
        for i, tokens in enumerate(answers):
            assert_same_tokens(tokens, expected[i % len(distinct)])
        assert metrics(cluster.child("language-0").url)[PREEMPTIONS] > 0
        assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    finally:
        cluster.close()


def long_prompt(i: int) -> list[dict]:
    return user(text_part(f"Report {i}. " + "The harbour master logged the tides, the wind "
                          "and every boat that came in before dawn. " * 34))


def test_100_concurrent_long_requests_keep_memory_bounded(tiny_models):
    """100 concurrent prompts of ~1,600 tokens, 64 running at a time: per-sequence caches
    would hold 64 x 3,200 tokens (200 MiB for this model: a cache doubles on its first
    decoded token); a 64 MiB cache keeps the server's peak growth within it plus a fixed
    margin: its embedding pool, the prompts it may hold in host memory (the engine's running
    and waiting ones, and the transfers that copied their windows out of the pool) and
    64 MiB for allocator slack."""
    model = tiny_models["qwen2_vl"]
    distinct = [long_prompt(i) for i in range(4)]
    prompt_tokens = model.encoder.prepare(distinct[0]).total_tokens
    assert prompt_tokens > 1500
    expected = [generate_greedy(model, messages, 4) for messages in distinct]
    # NOTE: with the prefix cache, dozens of these prompts prefill short suffixes against long
    # cached contexts: a prefill step's padded area is bounded (--max-prefill-tokens counts
    # padding, --max-prefill-kv-tokens the gathered contexts); unbounded, this grew 511 MiB.
    cluster = Cluster(model.path, torch_threads=1, kv_cache_memory="64MiB")
    try:
        language = cluster.child("language-0")
        asyncio.run(cluster.token_ids(distinct[:2], max_tokens=4))  # warm up: a 2-prompt step
        baseline = peak_rss(language.process.pid)
        answers = asyncio.run(cluster.token_ids([distinct[i % 4] for i in range(100)],
                                      max_tokens=4))
        for i, tokens in enumerate(answers):
            assert_same_tokens(tokens, expected[i % 4])
        growth = peak_rss(language.process.pid) - baseline
        token_bytes = model.encoder.hidden_size * 4 + 4 * 8  # embedding, id, positions
        settings = cluster.settings
        held_prompts = 2 * 64 + 100
        margin = (settings.pool.pool_blocks * settings.pool.block_size
                  + held_prompts * prompt_tokens) * token_bytes + 64 * 2**20
        print(f"language server peak RSS growth {growth / 2**20:.0f} MiB; bound "
              f"{(64 * 2**20 + margin) / 2**20:.0f} MiB")
        assert growth <= 64 * 2**20 + margin, (
            f"peak RSS grew {growth / 2**20:.0f} MiB with a 64 MiB KV cache")
        samples = metrics(language.url)
        assert samples['mmdisagg_requests_total{outcome="ok",role="language"}'] == 102
        assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    finally:
        cluster.close()


def peak_rss(pid: int) -> int:
    """The process's high-water resident size (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")
