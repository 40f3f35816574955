"""Many concurrent image requests over 2 encoders and 2 language servers; a pool so small that
requests wait and resume. Every answer right, nothing dropped, every pool back to full."""

from __future__ import annotations

import asyncio

import pytest
from cluster import Cluster, metrics, wait_pools_free

from tests.models.fixtures import assert_same_tokens, generate_greedy, image_part, text_part, user

MAX_TOKENS = 8


def prompts(count: int) -> list[list[dict]]:
    """Distinct prompts (different images, sizes and texts), so the cache does not do the work."""
    sizes = [(56, 56), (84, 56), (56, 112), (112, 84)]
    return [user(image_part(*sizes[i % len(sizes)], seed=100 + i),
                 text_part(f"Question {i}: what do you see?")) for i in range(count)]


@pytest.fixture(scope="module")
def references(tiny_models):
    distinct = prompts(10)
    return distinct, [generate_greedy(tiny_models["qwen2_vl"], messages, MAX_TOKENS)
                      for messages in distinct]


def test_200_concurrent_image_requests_on_2_plus_2_servers(tiny_checkpoints, references):
    distinct, expected = references
    cluster = Cluster(tiny_checkpoints["qwen2_vl"], encoders=2, language_servers=2,
                      torch_threads=1)
    try:
        order = [i % len(distinct) for i in range(200)]
        answers = asyncio.run(cluster.token_ids([distinct[i] for i in order], MAX_TOKENS))
        assert len(answers) == 200
        for i, tokens in zip(order, answers, strict=True):
            assert_same_tokens(tokens, expected[i])
        assert wait_pools_free(cluster) == {name: 0 for name in
                                            ("encode-0", "encode-1", "language-0", "language-1")}
        served = {c.name: metrics(c.url) for c in cluster.servers}
        ok = 'mmdisagg_requests_total{outcome="ok",role="%s"}'
        assert sum(served[f"language-{i}"][ok % "language"] for i in range(2)) == 200
        assert all(served[f"{role}-{i}"][ok % role] > 0 for role in ("encode", "language")
                   for i in range(2)), "least-loaded routing used every server"
        assert metrics(cluster.url)['mmdisagg_requests_total{outcome="ok",role="router"}'] == 200
    finally:
        cluster.close()


def test_pool_so_small_that_requests_wait_and_resume(tiny_checkpoints, references):
    """16-token blocks, first windows of one block and at most one block per window after it,
    10 blocks on each side: prompts of 60-130 tokens need many windows, and requests queue for
    blocks."""
    distinct, expected = references
    cluster = Cluster(tiny_checkpoints["qwen2_vl"], block_size=16, pool_blocks=10,
                      default_blocks=1, window_blocks=1, torch_threads=1,
                      prefix_cache=False)  # repeated prompts would not be sent again
    try:
        answers = asyncio.run(cluster.token_ids(distinct * 2, MAX_TOKENS, concurrency=12))
        for i, tokens in enumerate(answers):
            assert_same_tokens(tokens, expected[i % len(distinct)])
        language = metrics(cluster.child("language-0").url)
        assert language["mmdisagg_transfer_resumes_total"] >= 20 * 3
        assert language["mmdisagg_transfer_spills_total"] > 0
        assert language["mmdisagg_pool_failed_allocs_total"] > 0, "requests had to wait"
        assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}
    finally:
        cluster.close()
