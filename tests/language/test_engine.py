"""The paged batching engine: same tokens as generate(), requests joining and leaving,
admission by KV blocks, preemption by recompute, sampling and stop conditions."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
import torch

from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.engine import Engine, PrefillArea, StepOutput
from mmdisagg.language.request import Req, ReqStatus
from mmdisagg.models.base import LanguageHalf
from mmdisagg.models.errors import InputError
from tests.models.fixtures import (
    TinyModel,
    assert_same_tokens,
    encode,
    generate_greedy,
    image_part,
    paged_engine,
    run_engine,
    text_part,
    user,
)

PROMPTS = {
    "one image": user(image_part(112, 84, seed=11), text_part("What is in this picture?")),
    "two images": user(text_part("Compare"), image_part(56, 84, seed=12), text_part("and"),
                       image_part(112, 140, seed=13)),
    "text only": [{"role": "user", "content": "The cat sits on the windowsill."}],
    "long text": [{"role": "user", "content": "Describe the chart in detail. " * 6}],
}
GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture
def qwen2_vl(tiny_models: dict[str, TinyModel]) -> TinyModel:
    return tiny_models["qwen2_vl"]


def req(tiny: TinyModel, name: str, params: SamplingParams = GREEDY,
        request_id: str | None = None) -> Req:
    return Req(request_id or name, params, encode(tiny, PROMPTS[name]))


def drain(engine: Engine, steps: int | None = None) -> dict[str, list[StepOutput]]:
    """Step until nothing is left (or ``steps`` times); outputs by request."""
    outputs: dict[str, list[StepOutput]] = defaultdict(list)
    while engine.has_work() and steps != 0:
        for output in engine.step():
            outputs[output.request_id].append(output)
        steps = None if steps is None else steps - 1
    return outputs


def tokens(outputs: list[StepOutput]) -> list[int]:
    return [output.token_id for output in outputs]


def assert_idle(engine: Engine) -> None:
    engine.blocks.check()
    assert engine.blocks.stats().used_blocks == 0 and len(engine) == 0


def test_batch_of_three_lengths_matches_generate(tiny: TinyModel) -> None:
    names = ("one image", "two images", "text only")
    generated = run_engine(paged_engine(tiny.language), [req(tiny, name) for name in names])
    for name in names:
        assert_same_tokens(generated[name], generate_greedy(tiny, PROMPTS[name], 12))


def test_preempted_many_times_still_matches_generate(tiny: TinyModel) -> None:
    """A cache of 144 tokens in 2-token blocks holds two of these prompts at most: requests
    are admitted as blocks free up, preempted as decoding ones grow, and recomputed."""
    names = ("one image", "two images", "text only", "long text")
    engine = paged_engine(tiny.language, kv_tokens=144, block_size=2, max_prefill_tokens=32)
    generated = run_engine(engine, [req(tiny, name, request_id=f"{name} {copy}")
                                    for copy in range(3) for name in names])
    assert engine.preemptions >= 5
    for name in names:
        expected = generate_greedy(tiny, PROMPTS[name], 12)
        for copy in range(3):
            assert_same_tokens(generated[f"{name} {copy}"], expected)


def test_admission_waits_for_kv_blocks(qwen2_vl: TinyModel) -> None:
    prompt_tokens = encode(qwen2_vl, PROMPTS["two images"]).total_tokens
    engine = paged_engine(qwen2_vl.language, kv_tokens=prompt_tokens + 16)
    first, second = req(qwen2_vl, "two images", request_id="1"), req(qwen2_vl, "two images",
                                                                     request_id="2")
    engine.add(first)
    engine.add(second)
    engine.step()
    assert first.status is ReqStatus.RUNNING and second.status is ReqStatus.WAITING
    assert len(first.block_table) == math.ceil((prompt_tokens + 1) / 16)
    outputs = drain(engine)
    assert tokens(outputs["2"]) == [*first.output_ids][:len(outputs["2"])]
    assert_idle(engine)


def test_requests_join_and_leave_between_steps(qwen2_vl: TinyModel) -> None:
    engine = paged_engine(qwen2_vl.language)
    aborted = req(qwen2_vl, "long text", request_id="aborted")
    for new in (req(qwen2_vl, "one image", request_id="a"),
                req(qwen2_vl, "text only", SamplingParams(max_tokens=4), "short"), aborted):
        engine.add(new)
    outputs = drain(engine, steps=2)
    assert engine.abort(aborted) and not engine.abort(aborted)
    assert aborted.status is ReqStatus.FINISHED and not aborted.block_table
    engine.add(req(qwen2_vl, "two images", request_id="late"))
    for request_id, new_outputs in drain(engine).items():
        outputs[request_id] += new_outputs
    assert [o.finish_reason for o in outputs["short"]] == [None, None, None, "length"]
    assert len(outputs["aborted"]) == 2
    for request_id, name, count in (("a", "one image", 12), ("short", "text only", 4),
                                    ("late", "two images", 12)):
        expected = generate_greedy(qwen2_vl, PROMPTS[name], count)
        assert_same_tokens(tokens(outputs[request_id]), expected)
    assert_idle(engine)


def test_a_prompt_still_arriving_is_prefilled_as_far_as_its_rows_go(tiny: TinyModel) -> None:
    """Rows land 7 tokens at a time, one step apart, while another request decodes: each step
    prefills just what landed (a step with none ready computes nothing for it), the prompt's
    first token comes only once all of it is computed, and both match generate()."""
    engine = paged_engine(tiny.language)
    arriving, decoding = req(tiny, "two images"), req(tiny, "one image")
    total = arriving.prompt_tokens
    arriving.landed_tokens = 0
    engine.add(decoding)
    engine.add(arriving)
    outputs: dict[str, list[StepOutput]] = defaultdict(list)
    computed: list[int] = []
    while engine.has_work():
        if arriving.landed_tokens is not None:
            assert arriving.num_computed == arriving.landed_tokens  # caught up, never past
            landed = arriving.landed_tokens + 7
            arriving.landed_tokens = None if landed >= total else landed
        for output in engine.step():
            outputs[output.request_id].append(output)
        computed.append(arriving.num_computed)
        if not outputs["two images"]:
            assert arriving.num_computed < total or arriving.landed_tokens is None
    assert computed[: math.ceil(total / 7) - 1] == [7 * (i + 1) for i in range(
        math.ceil(total / 7) - 1)]
    assert engine.prefilled_while_arriving == 7 * (math.ceil(total / 7) - 1)
    for name in ("two images", "one image"):
        assert_same_tokens(tokens(outputs[name]), generate_greedy(tiny, PROMPTS[name], 12))
    idle = req(tiny, "text only")
    idle.landed_tokens = 0
    engine.add(idle)
    engine.step()
    assert engine.stepped_tokens == 0 and idle.num_computed == 0 and not idle.output_ids
    engine.abort(idle)
    assert_idle(engine)


def test_prefill_budget_is_shared_by_the_step(qwen2_vl: TinyModel) -> None:
    engine = paged_engine(qwen2_vl.language, max_prefill_tokens=16)
    reqs = [req(qwen2_vl, name) for name in ("long text", "one image")]
    for new in reqs:
        engine.add(new)
    first_token_step: dict[str, int] = {}
    for step in itertools.count(1):
        if not engine.has_work():
            break
        for output in engine.step():
            first_token_step.setdefault(output.request_id, step)
    lengths = [new.prompt_tokens for new in reqs]
    assert first_token_step == {"long text": math.ceil(lengths[0] / 16),
                                "one image": math.ceil(sum(lengths) / 16)}


def test_decode_rows_beyond_the_workspace_wait_a_step(qwen2_vl: TinyModel) -> None:
    """On CPU a decode step reads the decoding rows' keys from a workspace of as many tokens
    as the pool, each row padded to the longest: rows beyond it wait a step. After every step
    each row of the workspace equals its sequence's keys and values in the pool, bit for bit,
    and every answer is generate()'s."""
    names = ["two images", "text only", "text only", "text only"]
    reqs = [req(qwen2_vl, name, request_id=str(i)) for i, name in enumerate(names)]
    longest = max(new.prompt_tokens for new in reqs) + 12
    needed = sum(math.ceil((new.prompt_tokens + 12) / 16) * 16 for new in reqs)
    assert len(reqs) * math.ceil(longest / 16) * 16 > needed  # padded, they do not fit
    engine = paged_engine(qwen2_vl.language, kv_tokens=needed)
    workspace = engine.runner.cache.decode
    assert workspace is not None and workspace.tokens == needed
    offered = engine.runner.fitting
    taken: list[tuple[int, int]] = []

    def fitting(decode: list[Req]) -> int:
        taken.append((offered(decode), len(decode)))
        return taken[-1][0]

    engine.runner.fitting = fitting  # type: ignore[method-assign]
    for new in reqs:
        engine.add(new)
    cache = engine.runner.cache
    layers, _, _, heads, dim = cache.keys.shape
    while engine.has_work():
        engine.step()
        for row, (owner, length) in enumerate(zip(workspace.owners, workspace.lengths,
                                                  strict=True)):
            assert owner.num_computed == length
            for pool, copy in ((cache.keys, workspace.keys), (cache.values, workspace.values)):
                expected = pool[:, owner.block_table].reshape(layers, -1, heads, dim)[:, :length]
                assert torch.equal(copy[:, row, :, :length], expected.transpose(1, 2))
    assert any(count < len_offered for count, len_offered in taken)
    for new, name in zip(reqs, names, strict=True):
        assert_same_tokens(new.output_ids, generate_greedy(qwen2_vl, PROMPTS[name], 12))
    assert_idle(engine)
    assert not workspace.owners


def test_prefill_area_bounds_padded_queries_and_keys() -> None:
    """A prefill step pads every chunk to the longest and every context to the longest: both
    padded areas stay within their limits, except that the first chunk always runs."""
    area = PrefillArea(queries=64, keys=256, block_size=16)
    assert area.take(computed=1000, pending=500) == 64  # one chunk, whatever its context
    assert area.take(computed=0, pending=1) == 0  # 2 x 64 padded queries
    area = PrefillArea(queries=64, keys=256, block_size=16)
    assert area.take(computed=100, pending=10) == 10  # context 112
    assert area.take(computed=100, pending=40) == 28  # 2 rows: 128 keys each at most
    assert area.take(computed=0, pending=40) == 0  # 3 rows x 128 > 256
    area = PrefillArea(queries=64, keys=4096, block_size=16)
    assert [area.take(0, 20), area.take(0, 40), area.take(0, 5)] == [20, 32, 0]


def test_prompt_longer_than_the_whole_cache_is_refused(qwen2_vl: TinyModel) -> None:
    new = req(qwen2_vl, "two images")
    engine = paged_engine(qwen2_vl.language, kv_tokens=new.prompt_tokens // 16 * 16)
    with pytest.raises(InputError, match=f"prompt is {new.prompt_tokens} tokens.*KV cache holds "
                                         f"{engine.blocks.num_tokens} tokens"):
        engine.add(new)
    assert len(engine) == 0


def test_output_ends_before_it_outgrows_the_cache(qwen2_vl: TinyModel) -> None:
    new = req(qwen2_vl, "one image", SamplingParams(max_tokens=100, ignore_eos=True))
    engine = paged_engine(qwen2_vl.language, kv_tokens=new.prompt_tokens + 20)
    outputs = drain_one(engine, new)
    assert new.num_tokens == engine.blocks.num_tokens and outputs[-1].finish_reason == "length"


def drain_one(engine: Engine, new: Req) -> list[StepOutput]:
    engine.add(new)
    outputs = drain(engine)[new.request_id]
    assert_idle(engine)
    return outputs


@pytest.mark.parametrize("where", ["admission", "growth"])
def test_allocation_failure_fails_one_request_only(qwen2_vl: TinyModel, where: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = paged_engine(qwen2_vl.language)
    allocator = engine.blocks.allocator
    real = allocator.alloc_each
    calls = itertools.count()
    failing_call = 1 if where == "admission" else 2  # 0, 1: admissions; 2: first growth

    def alloc_each(count: int, num_blocks: int):
        if next(calls) == failing_call:
            raise MemoryError("injected")
        return real(count, num_blocks)

    monkeypatch.setattr(allocator, "alloc_each", alloc_each)
    reqs = [req(qwen2_vl, "text only", SamplingParams(max_tokens=30, ignore_eos=True), str(i))
            for i in range(3)]
    for new in reqs:
        engine.add(new)
    outputs = drain(engine)
    errors = [rid for rid, outs in outputs.items() if outs[-1].finish_reason == "error"]
    assert len(errors) == 1 and "injected" in outputs[errors[0]][-1].error
    assert sum(len(outs) == 30 for outs in outputs.values()) == 2
    assert_idle(engine)
    assert drain_one(engine, req(qwen2_vl, "text only"))[-1].finish_reason is not None


def sampled(engine: Engine, new: Req) -> list[int]:
    return tokens(drain_one(engine, new))


SEEDED = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=1234)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(qwen2_vl: TinyModel) -> None:
    first = sampled(paged_engine(qwen2_vl.language), req(qwen2_vl, "one image", SEEDED))
    crowded = paged_engine(qwen2_vl.language)
    crowded.add(req(qwen2_vl, "text only", SamplingParams(temperature=1.5), "noise"))
    crowded.add(req(qwen2_vl, "two images", GREEDY, "greedy"))
    assert sampled(crowded, req(qwen2_vl, "one image", SEEDED)) == first
    reseeded = SamplingParams(max_tokens=12, temperature=1.0, seed=99)
    assert sampled(paged_engine(qwen2_vl.language), req(qwen2_vl, "one image", reseeded)) != first


def test_seeded_sampling_survives_preemption(qwen2_vl: TinyModel) -> None:
    first = sampled(paged_engine(qwen2_vl.language), req(qwen2_vl, "one image", SEEDED))
    seeded = req(qwen2_vl, "one image", SEEDED)
    others = [req(qwen2_vl, "text only", SamplingParams(temperature=1.0, max_tokens=30,
                                                        ignore_eos=True), str(i))
              for i in range(2)]
    # All three fit when admitted, not once they grow: the last admitted is preempted.
    admitted = sum(new.prompt_tokens + 1 for new in [*others, seeded])
    engine = paged_engine(qwen2_vl.language, kv_tokens=admitted + 6, block_size=2)
    generated = run_engine(engine, [*others, seeded])
    assert seeded.preemptions > 0 and generated[seeded.request_id] == first


def test_unseeded_requests_differ(qwen2_vl: TinyModel) -> None:
    params = SamplingParams(max_tokens=12, temperature=1.0)
    runs = [sampled(paged_engine(qwen2_vl.language), req(qwen2_vl, "one image", params))
            for _ in range(2)]
    assert runs[0] != runs[1]


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12, temperature=5.0, top_k=1),
                                    SamplingParams(max_tokens=12, temperature=5.0, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(qwen2_vl: TinyModel, params: SamplingParams) -> None:
    engine = paged_engine(qwen2_vl.language)
    greedy = sampled(engine, req(qwen2_vl, "one image"))
    assert sampled(engine, req(qwen2_vl, "one image", params)) == greedy


def greedy_run(tiny: TinyModel, params: SamplingParams = GREEDY,
               language: LanguageHalf | None = None) -> list[StepOutput]:
    return drain_one(paged_engine(language or tiny.language), req(tiny, "one image", params))


def test_max_tokens_and_usage(qwen2_vl: TinyModel) -> None:
    outputs = greedy_run(qwen2_vl, SamplingParams(max_tokens=5))
    assert [o.finish_reason for o in outputs] == [None] * 4 + ["length"]
    assert len(outputs[-1].req.output_ids) == 5


def test_stop_token_ids(qwen2_vl: TinyModel) -> None:
    reference = tokens(greedy_run(qwen2_vl))
    stop_token = reference[4]
    outputs = greedy_run(qwen2_vl, SamplingParams(max_tokens=12, stop_token_ids=(stop_token,)))
    assert tokens(outputs) == reference[:reference.index(stop_token) + 1]
    assert outputs[-1].finish_reason == "stop"


def test_eos_stops_unless_ignored(qwen2_vl: TinyModel, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = tokens(greedy_run(qwen2_vl))
    monkeypatch.setattr(qwen2_vl.language, "eos_token_ids", frozenset({reference[3]}))
    stopped = greedy_run(qwen2_vl)
    assert tokens(stopped) == reference[:reference.index(reference[3]) + 1]
    assert stopped[-1].finish_reason == "stop"
    ignored = greedy_run(qwen2_vl, SamplingParams(max_tokens=12, ignore_eos=True))
    assert tokens(ignored) == reference and ignored[-1].finish_reason == "length"


def test_max_model_len_bounds_prompt_and_output(qwen2_vl: TinyModel) -> None:
    prompt_tokens = encode(qwen2_vl, PROMPTS["one image"]).total_tokens
    language = LanguageHalf.from_pretrained(qwen2_vl.path, max_model_len=prompt_tokens + 3)
    outputs = greedy_run(qwen2_vl, language=language)
    assert len(outputs) == 3 and outputs[-1].finish_reason == "length"
    short = LanguageHalf.from_pretrained(qwen2_vl.path, max_model_len=prompt_tokens)
    with pytest.raises(InputError, match="prompt is"):
        greedy_run(qwen2_vl, language=short)


@pytest.mark.parametrize("params, message", [
    (SamplingParams(max_tokens=0), "max_tokens"),
    (SamplingParams(temperature=-1.0), "temperature"),
    (SamplingParams(top_p=0.0), "top_p"),
    (SamplingParams(top_k=-2), "top_k"),
    (SamplingParams(seed=2**64), "seed"),
])
def test_bad_sampling_params_are_input_errors(qwen2_vl: TinyModel, params: SamplingParams,
                                              message: str) -> None:
    with pytest.raises(InputError, match=message):
        paged_engine(qwen2_vl.language).add(req(qwen2_vl, "text only", params))


def test_empty_prompt_is_an_input_error(qwen2_vl: TinyModel) -> None:
    prompt = encode(qwen2_vl, PROMPTS["text only"])
    empty = EncodedPrompt(prompt.embeddings[:0], prompt.token_ids[:0], prompt.positions[:0])
    with pytest.raises(InputError, match="empty"):
        paged_engine(qwen2_vl.language).add(Req("r", GREEDY, empty))
