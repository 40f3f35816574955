"""Qwen3-VL end to end over each data plane: deepstack features travel from the encode server
to the language server (across window boundaries: 16-token blocks, first windows of 2 blocks,
one block per window after that) and the answers equal the unsplit model's generate() (for
videos: fed by transformers' own processor). The bytes moved are a text token's for each token
plus the deepstack rows of each image or video token (a video's timestamps are text)."""

from __future__ import annotations

import asyncio

import pytest
from cluster import Cluster, metrics, wait_pools_free

from mmdisagg.config import ImageSettings
from mmdisagg.pool.layout import PoolLayout
from tests.models.fixtures import (
    assert_same_tokens,
    generate_greedy,
    generate_on,
    image_part,
    text_part,
    transformers_inputs,
    user,
    video_part,
)
from tests.transfer.backends import BACKENDS

MAX_TOKENS = 10
BLOCK = 16
CASES = {
    "one image": user(image_part(112, 84, seed=21), text_part("Describe the image.")),
    "two images": user(text_part("Compare"), image_part(64, 96, seed=22), text_part("with"),
                       image_part(128, 64, seed=23), text_part("please.")),
    "image in the middle": user(text_part("Here is a picture of the lake:"),
                                image_part(96, 96, seed=24), text_part("What colour is it?")),
    "text only": user(text_part("Tell me a story about a cat and a boat, please.")),
}
VIDEO_CASES = {
    "short video": user(video_part(8, 64, 48, fps=4, seed=27),
                        text_part("What happens in the video?")),
    "video and image": user(text_part("Compare"), video_part(8, 64, 48, fps=4, seed=25),
                            text_part("with"), image_part(64, 64, seed=26), text_part("now.")),
}


@pytest.fixture(scope="module", params=BACKENDS)
def cluster(request, tiny_checkpoints):
    # the whole path: these tests repeat prompts and count the bytes of whole prompts; the
    # prefix cache's path has its own cluster below
    cluster = Cluster(tiny_checkpoints["qwen3_vl"], transfer_backend=request.param,
                      block_size=BLOCK, default_blocks=2, window_blocks=1, torch_threads=1,
                      prefix_cache=False)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module", params=BACKENDS)
def cached_cluster(request, tiny_checkpoints):
    cluster = Cluster(tiny_checkpoints["qwen3_vl"], transfer_backend=request.param,
                      block_size=BLOCK, default_blocks=2, window_blocks=1, torch_threads=1,
                      image_cache_bytes=0)
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def expected(tiny_models):
    return {case: generate_greedy(tiny_models["qwen3_vl"], messages, MAX_TOKENS)
            for case, messages in CASES.items()}


@pytest.fixture(scope="module")
def video_expected(tiny_checkpoints, tiny_models, tmp_path_factory):
    references = transformers_inputs(
        tiny_checkpoints, {case: (messages, ImageSettings().max_video_frames)
                           for case, messages in VIDEO_CASES.items()},
        tmp_path_factory.mktemp("video-reference"), families=("qwen3_vl",))
    return {case: generate_on(tiny_models["qwen3_vl"], references["qwen3_vl", case], MAX_TOKENS)
            for case in VIDEO_CASES}


@pytest.mark.parametrize("case", list(CASES))
def test_one_request_equals_generate(cluster, expected, case):
    assert asyncio.run(cluster.token_ids([CASES[case]], MAX_TOKENS))[0] == expected[case].tokens


@pytest.mark.timeout(900)  # the first run may create the peer venv
@pytest.mark.parametrize("case", list(VIDEO_CASES))
def test_video_request_equals_generate_and_moves_the_expected_bytes(cluster, video_expected,
                                                                   tiny_models, case):
    language = cluster.child("language-0").url
    before = metrics(language)
    assert asyncio.run(cluster.token_ids([VIDEO_CASES[case]], MAX_TOKENS))[0] == (
        video_expected[case])
    after = metrics(language)
    assert after["mmdisagg_transfer_resumes_total"] > before["mmdisagg_transfer_resumes_total"]
    assert moved_bytes(tiny_models["qwen3_vl"].encoder, [VIDEO_CASES[case]]) == (
        after["mmdisagg_transfer_bytes_total"] - before["mmdisagg_transfer_bytes_total"])
    assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}


def moved_bytes(encoder, prompts: list) -> int:
    """What the prompts' transfers carry: every token's embedding row, and the deepstack rows
    of the image and video tokens only."""
    layout = PoolLayout(1, BLOCK, encoder.hidden_size, "float32", encoder.deepstack_layers)
    prepared = [encoder.prepare(messages) for messages in prompts]
    tokens = sum(prompt.total_tokens for prompt in prepared)
    visual = sum(image.num_tokens for prompt in prepared for image in prompt.images)
    return tokens * layout.token_bytes + visual * layout.deepstack_bytes


def test_concurrent_batch_equals_generate_and_moves_the_expected_bytes(cluster, expected,
                                                                      tiny_models):
    """Every case at once (the language server prefills them in one batch); then the bytes
    the language server received: image tokens carry their deepstack rows, text tokens only
    what a Qwen2-VL token carries."""
    encoder = tiny_models["qwen3_vl"].encoder
    language = cluster.child("language-0").url
    before = metrics(language)
    cases = list(CASES) * 2
    answers = asyncio.run(cluster.token_ids([CASES[c] for c in cases], MAX_TOKENS))
    for case, tokens in zip(cases, answers, strict=True):
        assert_same_tokens(tokens, expected[case])
    after = metrics(language)
    assert after["mmdisagg_transfer_resumes_total"] > before["mmdisagg_transfer_resumes_total"]
    moved = after["mmdisagg_transfer_bytes_total"] - before["mmdisagg_transfer_bytes_total"]
    assert moved == moved_bytes(encoder, [CASES[case] for case in cases])
    assert wait_pools_free(cluster) == {"encode-0": 0, "language-0": 0}


def test_a_prompt_sent_again_hits_inside_its_image(cached_cluster, tiny_models):
    """The prefix cache with deepstack features, over each plane: the same image-only prompt
    twice. The second's hit (whole KV blocks, short of the last token) ends inside the image,
    so the encoder runs the vision tower again and sends the rest of the image's tokens with
    their deepstack rows, and nothing before; then a next turn hits past the image. Every
    answer equals generate()."""
    tiny = tiny_models["qwen3_vl"]
    layout = PoolLayout(1, BLOCK, tiny.encoder.hidden_size, "float32",
                        tiny.encoder.deepstack_layers)

    def ask(messages) -> tuple[list[int], dict[str, float]]:
        """The answer, and what it moved: hit tokens, bytes received, images encoded."""
        servers = [cached_cluster.child(name).url for name in ("language-0", "encode-0")]
        before = [metrics(url) for url in servers]
        tokens = asyncio.run(cached_cluster.token_ids([messages], MAX_TOKENS))[0]
        after = [metrics(url) for url in servers]
        return tokens, {key: after[at][name] - before[at][name] for key, at, name in (
            ("hit", 0, "mmdisagg_prefix_cache_hit_tokens_total"),
            ("bytes", 0, "mmdisagg_transfer_bytes_total"),
            ("images", 1, "mmdisagg_vision_images_total"))}

    turn = user(image_part(224, 224, seed=28))
    prepared = tiny.encoder.prepare(turn)
    (span,) = prepared.image_spans()
    hit = (prepared.total_tokens - 1) // BLOCK * BLOCK
    assert span.start < hit < span.end
    expected = generate_greedy(tiny, turn, MAX_TOKENS).tokens
    assert ask(turn)[0] == expected
    tokens, moved = ask(turn)
    assert tokens == expected
    assert moved == {"hit": hit, "images": 1,
                     "bytes": (prepared.total_tokens - hit) * layout.token_bytes
                     + (span.end - hit) * layout.deepstack_bytes}
    turn = [*turn, {"role": "assistant", "content": tiny.language.tokenizer.decode(
        expected, skip_special_tokens=True)}, {"role": "user", "content": "Why?"}]
    tokens, moved = ask(turn)
    assert tokens == generate_greedy(tiny, turn, MAX_TOKENS).tokens
    assert moved["hit"] >= span.end and moved["images"] == 0
    assert wait_pools_free(cached_cluster) == {"encode-0": 0, "language-0": 0}
