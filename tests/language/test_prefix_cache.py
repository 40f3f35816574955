"""The prefix cache: later turns of a chat start from the KV their earlier turns left, with the
same tokens as generate(); images are told apart by their pixels; eviction, pins and races."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mmdisagg.config import EngineSettings
from mmdisagg.core import EncodedPrompt, PrefixHit, SamplingParams, block_hashes
from mmdisagg.language.engine import Engine
from mmdisagg.language.kv_blocks import KVBlockManager
from mmdisagg.language.request import Req
from mmdisagg.models.kv_cache import PagedKVCache
from tests.models.fixtures import (
    TinyModel,
    assert_same_tokens,
    generate_greedy,
    image_part,
    run_engine,
    text_part,
    user,
)

BLOCK = 32  # tokens per KV block here: two hash blocks
MAX_TOKENS = 10


def engine(tiny: TinyModel, kv_tokens: int = 4096, cached: bool = True) -> Engine:
    cache = PagedKVCache(tiny.language.kv_layout, kv_tokens // BLOCK, BLOCK,
                         tiny.language.device)
    return Engine(tiny.language, cache, EngineSettings(max_prefill_tokens=2048),
                  prefix_cache=cached)


def encoded(tiny: TinyModel, messages: list[dict[str, Any]]) -> EncodedPrompt:
    prepared = tiny.encoder.prepare(messages)
    prompt = tiny.encoder.encode([prepared])[0]
    prompt.block_hashes, prompt.tail_images = prepared.block_hashes(), prepared.tail_images()
    return prompt


def answer(tiny: TinyModel, server: Engine, messages: list[dict[str, Any]],
           name: str = "r") -> list[int]:
    return run_engine(server, [Req(name, SamplingParams(max_tokens=MAX_TOKENS),
                                   encoded(tiny, messages))])[name]


def next_turn(tiny: TinyModel, messages: list[dict[str, Any]], tokens: list[int],
              question: str) -> list[dict[str, Any]]:
    reply = tiny.language.tokenizer.decode(tokens, skip_special_tokens=True)
    return [*messages, {"role": "assistant", "content": reply},
            {"role": "user", "content": question}]


@pytest.mark.parametrize("cached", [True, False], ids=["cache", "no-cache"])
def test_later_turns_of_a_chat_match_generate(tiny: TinyModel, cached: bool) -> None:
    server = engine(tiny, cached=cached)
    turn = user(text_part("Look:"), image_part(112, 84, seed=41), text_part("What is it?"))
    hits = []
    for question in ("And the colours?", "Anything else?"):
        tokens = answer(tiny, server, turn)
        assert_same_tokens(tokens, generate_greedy(tiny, turn, MAX_TOKENS))
        turn = next_turn(tiny, turn, tokens, question)
        hits.append(server.prefix_hit_tokens)
    assert_same_tokens(answer(tiny, server, turn), generate_greedy(tiny, turn, MAX_TOKENS))
    if cached:
        assert 0 < hits[1] < server.prefix_hit_tokens  # turns 2 and 3 each found turn 1's KV
        assert server.prefix_hit_tokens % BLOCK == 0
    else:
        assert server.prefix_hit_tokens == 0 and server.blocks.stats().cached_blocks == 0


def test_hashes_continue_over_generated_tokens(tiny: TinyModel) -> None:
    """What the language side hashes for a prompt and its answer is what the encoder hashes
    for a prompt that repeats both, whether or not a cached prefix was sent."""
    messages = user(image_part(112, 112, seed=44))
    prepared = tiny.encoder.prepare(messages)
    prompt = encoded(tiny, messages)
    assert prompt.tail_images  # the image reaches into the last, partial hash block
    generated = list(range(100, 140))
    whole = block_hashes(prepared.token_ids.tolist() + generated, prepared.image_spans())
    assert prompt.hashes_with(generated) == whole
    assert prompt.after(PrefixHit(BLOCK, [])).hashes_with(generated) == whole
    cut, hashed = 16 - prompt.total_tokens % 16, len(prompt.block_hashes)
    assert prompt.hashes_with(generated[:cut - 1]) == whole[:hashed]
    assert prompt.hashes_with(generated[:cut]) == whole[:hashed + 1]


@pytest.mark.parametrize("repeats", [True, False], ids=["answer-retokenizes-alike", "free-answer"])
def test_a_next_turn_finds_the_answer_too(tiny: TinyModel, repeats: bool) -> None:
    """Turn 1's answer is cached with its prompt: turn 2, which repeats both, hits past turn
    1's prompt as far as its re-tokenized answer equals the generated tokens (whole KV
    blocks; a random model's answer often re-tokenizes otherwise: a shorter hit, never a
    wrong one), and still matches generate()."""
    server = engine(tiny)
    turn = user(image_part(112, 112, seed=43))  # the image reaches into the last hash block
    prompt = encoded(tiny, turn)
    assert prompt.tail_images
    cat = tiny.language.tokenizer.encode(" cat")  # one token; " cat cat" re-tokenizes alike
    params = SamplingParams(max_tokens=40, logit_bias=((cat[0], 100.0),) if repeats else ())
    tokens = run_engine(server, [Req("1", params, prompt)])["1"]
    computed = tokens[:-1]  # the last token has no KV
    turn = next_turn(tiny, turn, tokens, "Why?")
    repeated = tiny.encoder.prepare(turn).token_ids.tolist()[prompt.total_tokens:]
    same = next((i for i, (a, b) in enumerate(zip(computed, repeated, strict=False)) if a != b),
                len(computed))
    before = server.prefix_hit_tokens
    assert_same_tokens(answer(tiny, server, turn), generate_greedy(tiny, turn, MAX_TOKENS))
    hit = server.prefix_hit_tokens - before
    assert hit == (prompt.total_tokens + same) // BLOCK * BLOCK
    if repeats:
        assert len(cat) == 1 and same == len(computed) and hit > prompt.total_tokens


def test_two_images_of_one_size_never_hit_each_other(tiny: TinyModel) -> None:
    server = engine(tiny)
    first = user(text_part("Look:"), image_part(112, 84, seed=51), text_part("What is it?"))
    second = user(text_part("Look:"), image_part(112, 84, seed=52), text_part("What is it?"))
    answer(tiny, server, first)
    image_start = tiny.encoder.prepare(second).image_starts[0]
    before = server.prefix_hit_tokens
    assert_same_tokens(answer(tiny, server, second), generate_greedy(tiny, second, MAX_TOKENS))
    assert server.prefix_hit_tokens - before == image_start // BLOCK * BLOCK


def test_the_same_image_elsewhere_does_not_hit_a_wrong_prefix(tiny: TinyModel) -> None:
    server = engine(tiny)
    image = image_part(84, 84, seed=53)
    answer(tiny, server, user(image, text_part("Tell me about it, in a few words please.")))
    moved = user(text_part("Tell me about it, in a few words please."), image)
    first = tiny.encoder.prepare(moved)
    before = server.prefix_hit_tokens
    assert_same_tokens(answer(tiny, server, moved), generate_greedy(tiny, moved, MAX_TOKENS))
    common = next(i for i, (a, b) in enumerate(zip(
        tiny.encoder.prepare(user(image, text_part("x"))).token_ids.tolist(),
        first.token_ids.tolist(), strict=False)) if a != b)
    assert server.prefix_hit_tokens - before <= common // BLOCK * BLOCK


def test_eviction_under_a_small_cache_keeps_answers_correct(tiny: TinyModel) -> None:
    """A cache of 512 tokens holds about three of these prompts: repeating them in turn evicts
    and refinds blocks again and again."""
    server = engine(tiny, kv_tokens=512)
    prompts = [user(text_part(f"Prompt {n}:"), image_part(84, 84, seed=60 + n),
                    text_part("What is it?")) for n in range(5)]
    for messages in [*prompts, *prompts[::-1], *prompts]:
        assert_same_tokens(answer(tiny, server, messages),
                           generate_greedy(tiny, messages, MAX_TOKENS))
    assert server.prefix_hit_tokens > 0
    server.blocks.check()


def test_a_prefix_found_at_announce_is_never_sent_and_still_matches(tiny: TinyModel) -> None:
    """The transfer layer's path: the hit is pinned before the prompt arrives, and the prompt
    comes without the rows it covers."""
    server = engine(tiny)
    turn = user(image_part(112, 84, seed=71), text_part("What is it?"))
    tokens = answer(tiny, server, turn)
    turn = next_turn(tiny, turn, tokens, "Really?")
    whole = encoded(tiny, turn)
    hit = server.blocks.match(whole.block_hashes, whole.total_tokens - 1)
    assert hit is not None and hit.tokens >= BLOCK
    sent = whole.after(hit)
    assert sent.total_tokens == whole.total_tokens - hit.tokens
    out = run_engine(server, [Req("r", SamplingParams(max_tokens=MAX_TOKENS), sent)])["r"]
    assert_same_tokens(out, generate_greedy(tiny, turn, MAX_TOKENS))


@pytest.mark.parametrize("found", ["at-announce", "at-admission"])
def test_a_hit_that_ends_inside_an_image_matches_generate(tiny: TinyModel, found: str) -> None:
    """A prompt sent again whose image reaches into its last KV block: the hit (short of the
    last token) ends inside the image, so the rest of the image's rows come with the suffix,
    their deepstack rows too (Qwen3-VL), and the answer is still generate()'s."""
    server = engine(tiny)
    messages = user(image_part(448, 448, seed=73))
    prepared = tiny.encoder.prepare(messages)
    (span,) = prepared.image_spans()
    expected = generate_greedy(tiny, messages, MAX_TOKENS)
    assert_same_tokens(answer(tiny, server, messages), expected)
    whole = encoded(tiny, messages)
    if found == "at-announce":
        hit = server.blocks.match(whole.block_hashes, whole.total_tokens - 1)
        assert hit is not None and span.start < hit.tokens < span.end, (hit, span)
        out = run_engine(server, [Req("r", SamplingParams(max_tokens=MAX_TOKENS),
                                      whole.after(hit))])["r"]
    else:
        before = server.prefix_hit_tokens
        out = run_engine(server, [Req("r", SamplingParams(max_tokens=MAX_TOKENS), whole)])["r"]
        assert span.start < server.prefix_hit_tokens - before < span.end
    assert_same_tokens(out, expected)
    if tiny.language.deepstack_layers:  # negative control: the suffix's deepstack rows count
        whole = encoded(tiny, messages)
        hit = server.blocks.match(whole.block_hashes, whole.total_tokens - 1)
        sent = whole.after(hit)
        sent.deepstack = torch.zeros_like(sent.deepstack)
        out = run_engine(server, [Req("z", SamplingParams(max_tokens=MAX_TOKENS), sent)])["z"]
        assert out != expected


def test_requests_sharing_a_prefix_at_once(tiny: TinyModel) -> None:
    server = engine(tiny)
    messages = user(image_part(84, 112, seed=72), text_part("Say something."))
    reqs = [Req(str(n), SamplingParams(max_tokens=MAX_TOKENS), encoded(tiny, messages))
            for n in range(3)]
    expected = generate_greedy(tiny, messages, MAX_TOKENS)
    for tokens in run_engine(server, reqs).values():
        assert_same_tokens(tokens, expected)


# -- the block manager alone ----------------------------------------------------------------

def owner(name: str = "r") -> Req:
    return Req(name, SamplingParams())


def keys(*names: str) -> list[bytes]:
    """Block hashes for a manager of 16-token blocks: one per block."""
    return [name.encode() for name in names]


def test_blocks_are_found_pinned_and_evicted_oldest_first() -> None:
    blocks = KVBlockManager(num_blocks=16, block_size=16, prefix_cache=True)
    first, second = owner("a"), owner("b")
    assert blocks.allocate(first, 16 * 4) and blocks.allocate(second, 16 * 2)
    first.num_computed, second.num_computed = 16 * 4, 16 * 2
    blocks.index(first, keys("A", "B", "C", "D"), list(range(64)))
    blocks.index(second, keys("E", "F"), list(range(100, 132)))
    blocks.free(second)
    blocks.free(first)
    assert blocks.stats().cached_blocks == 6 and blocks.stats().used_blocks == 0
    hit = blocks.match(keys("A", "B", "C", "D", "X"), max_tokens=1000)
    assert hit.tokens == 64 and blocks.stats().cached_blocks == 2  # A-D pinned; E, F not
    assert hit.token_ids == list(range(64))  # what the prefix's tokens were
    assert blocks.match(keys("E"), 1000) is None  # pins are capped at a quarter: 4 blocks
    taker = owner("t")
    assert blocks.allocate(taker, 16 * 12)  # 12 blocks: the 10 free, then E's and F's
    assert not blocks.can_allocate(owner("u"), 16)
    blocks.release(hit)
    assert blocks.stats().cached_blocks == 4  # A-D, unreferenced but still found
    again = blocks.match(keys("A", "B"), max_tokens=31)  # whole blocks within the limit
    assert again.blocks == hit.blocks[:1]
    blocks.release(again)
    blocks.free(taker)
    blocks.check()
    assert blocks.stats().used_blocks == 0


def test_a_referenced_block_is_never_taken() -> None:
    blocks = KVBlockManager(num_blocks=8, block_size=32, prefix_cache=True)
    holder = owner()
    assert blocks.allocate(holder, 64)
    holder.num_computed = 64
    # 32-token blocks: each one's key is the second of its two hashes
    blocks.index(holder, keys("a", "A", "b", "B"), list(range(64)))
    hit = blocks.match(keys("a", "A", "b", "B"), 64)
    assert hit is not None and hit.tokens == 64
    blocks.free(holder)  # still pinned by the hit
    assert not blocks.allocate(owner("x"), 32 * 7)
    assert blocks.allocate(owner("y"), 32 * 6)
    blocks.check()


def test_prefill_steps_of_cache_hits_stay_within_their_padded_keys(tiny: TinyModel) -> None:
    """Eight copies of a prompt whose first blocks are cached each prefill only their last
    tokens, against the whole cached context: a step takes as many of them as
    --max-prefill-kv-tokens holds, each context padded to the longest (here three)."""
    messages = user(text_part("Describe the harbour, the boats and the sky at dawn. " * 4))
    expected = generate_greedy(tiny, messages, MAX_TOKENS)
    context = -(-encoded(tiny, messages).total_tokens // BLOCK) * BLOCK
    limit = 3 * context
    cache = PagedKVCache(tiny.language.kv_layout, 4096 // BLOCK, BLOCK, tiny.language.device)
    server = Engine(tiny.language, cache, EngineSettings(max_prefill_tokens=2048,
                                                         max_prefill_kv_tokens=limit),
                    prefix_cache=True)
    assert_same_tokens(answer(tiny, server, messages, "first"), expected)
    areas: list[tuple[int, int]] = []
    run = server.runner.run

    def record(decode: list[Req], prefill: list[tuple[Req, int]]) -> Any:
        if prefill:
            areas.append((len(prefill), max(-(-(req.num_computed + count) // BLOCK) * BLOCK
                                            for req, count in prefill)))
        return run(decode, prefill)

    server.runner.run = record  # type: ignore[method-assign]
    hits = server.prefix_hit_tokens
    reqs = [Req(str(i), SamplingParams(max_tokens=MAX_TOKENS), encoded(tiny, messages))
            for i in range(8)]
    for tokens in run_engine(server, reqs).values():
        assert_same_tokens(tokens, expected)
    assert server.prefix_hit_tokens - hits >= 8 * BLOCK  # every copy started from the cache
    assert all(rows * longest <= limit for rows, longest in areas), areas
    assert max(rows for rows, _ in areas) == 3, areas
