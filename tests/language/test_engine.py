"""The batching engine: same tokens as generate(), requests joining and leaving, sampling and
stop conditions."""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest

from mmdisagg.config import EngineSettings
from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.language.engine import Engine, StepOutput
from mmdisagg.models.base import LanguageHalf
from mmdisagg.models.errors import InputError
from tests.models.fixtures import (
    TinyModel,
    assert_same_tokens,
    encode,
    generate_greedy,
    image_part,
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


def text(outputs: list[StepOutput]) -> str:
    return "".join(output.text for output in outputs)


def test_batch_of_three_lengths_matches_generate(tiny: TinyModel) -> None:
    engine = Engine(tiny.language)
    names = ("one image", "two images", "text only")
    for name in names:
        engine.add(name, encode(tiny, PROMPTS[name]), GREEDY)
    outputs = drain(engine)
    for name in names:
        assert_same_tokens(tokens(outputs[name]), generate_greedy(tiny, PROMPTS[name], 12))
    assert len(engine) == 0 and not engine.has_work()


def test_requests_join_and_leave_between_steps(qwen2_vl: TinyModel) -> None:
    engine = Engine(qwen2_vl.language)
    engine.add("a", encode(qwen2_vl, PROMPTS["one image"]), GREEDY)
    engine.add("short", encode(qwen2_vl, PROMPTS["text only"]), SamplingParams(max_tokens=4))
    engine.add("aborted", encode(qwen2_vl, PROMPTS["long text"]), GREEDY)
    outputs = drain(engine, steps=2)
    assert engine.abort("aborted") and not engine.abort("aborted")
    engine.add("late", encode(qwen2_vl, PROMPTS["two images"]), GREEDY)
    for request_id, new_outputs in drain(engine).items():
        outputs[request_id] += new_outputs
    assert [o.finish_reason for o in outputs["short"]] == [None, None, None, "length"]
    assert len(outputs["aborted"]) == 2
    for request_id, name, count in (("a", "one image", 12), ("short", "text only", 4),
                                    ("late", "two images", 12)):
        expected = generate_greedy(qwen2_vl, PROMPTS[name], count)
        assert_same_tokens(tokens(outputs[request_id]), expected)


def pieces(prompt: EncodedPrompt, sizes: list[int]) -> list[EncodedPrompt]:
    bounds = [0, *itertools.accumulate(sizes), prompt.total_tokens]
    return [EncodedPrompt(prompt.embeddings[a:b], prompt.token_ids[a:b], prompt.positions[a:b],
                          prompt.mrope_delta) for a, b in itertools.pairwise(bounds)]


def test_prompt_prefilled_while_it_arrives(qwen2_vl: TinyModel) -> None:
    engine = Engine(qwen2_vl.language, EngineSettings(max_prefill_tokens=16))
    engine.add("other", encode(qwen2_vl, PROMPTS["text only"]), GREEDY)
    prompt = encode(qwen2_vl, PROMPTS["one image"])
    engine.begin("arriving", GREEDY, prompt.total_tokens)
    outputs = drain(engine, steps=2)
    parts = pieces(prompt, [5, 30])
    for part in parts:
        engine.extend("arriving", part)
        for request_id, new_outputs in drain(engine, steps=1).items():
            outputs[request_id] += new_outputs
    for request_id, new_outputs in drain(engine).items():
        outputs[request_id] += new_outputs
    assert len(outputs["other"]) == 12
    assert_same_tokens(tokens(outputs["arriving"]),
                       generate_greedy(qwen2_vl, PROMPTS["one image"], 12))


def test_prefill_budget_is_shared_by_the_step(qwen2_vl: TinyModel) -> None:
    engine = Engine(qwen2_vl.language, EngineSettings(max_prefill_tokens=16))
    prompts = {name: encode(qwen2_vl, PROMPTS[name]) for name in ("long text", "one image")}
    for name, prompt in prompts.items():
        engine.add(name, prompt, GREEDY)
    first_token_step: dict[str, int] = {}
    for step in itertools.count(1):
        if not engine.has_work():
            break
        for output in engine.step():
            first_token_step.setdefault(output.request_id, step)
    lengths = [prompt.total_tokens for prompt in prompts.values()]
    assert first_token_step == {"long text": math.ceil(lengths[0] / 16),
                                "one image": math.ceil(sum(lengths) / 16)}


def test_begun_request_without_data_is_not_work(qwen2_vl: TinyModel) -> None:
    engine = Engine(qwen2_vl.language)
    engine.begin("waiting", GREEDY, 40)
    assert "waiting" in engine and not engine.has_work() and engine.step() == []


def sampled(engine: Engine, request_id: str) -> list[int]:
    return tokens(drain(engine)[request_id])


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(qwen2_vl: TinyModel) -> None:
    prompt = encode(qwen2_vl, PROMPTS["one image"])
    seeded = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, top_k=50, seed=1234)
    alone = Engine(qwen2_vl.language)
    alone.add("seeded", prompt, seeded)
    crowded = Engine(qwen2_vl.language)
    crowded.add("noise", encode(qwen2_vl, PROMPTS["text only"]), SamplingParams(temperature=1.5))
    crowded.add("seeded", prompt, seeded)
    crowded.add("greedy", encode(qwen2_vl, PROMPTS["two images"]), GREEDY)
    reseeded = Engine(qwen2_vl.language)
    reseeded.add("seeded", prompt, SamplingParams(max_tokens=12, temperature=1.0, seed=99))
    first = sampled(alone, "seeded")
    assert sampled(crowded, "seeded") == first
    assert sampled(reseeded, "seeded") != first


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12, temperature=5.0, top_k=1),
                                    SamplingParams(max_tokens=12, temperature=5.0, top_p=1e-6)])
def test_top_k_one_and_tiny_top_p_are_greedy(qwen2_vl: TinyModel, params: SamplingParams) -> None:
    prompt = encode(qwen2_vl, PROMPTS["one image"])
    greedy, truncated = Engine(qwen2_vl.language), Engine(qwen2_vl.language)
    greedy.add("r", prompt, GREEDY)
    truncated.add("r", prompt, params)
    assert sampled(truncated, "r") == sampled(greedy, "r")


def greedy_run(tiny: TinyModel, params: SamplingParams = GREEDY,
               language: LanguageHalf | None = None) -> list[StepOutput]:
    engine = Engine(language or tiny.language)
    engine.add("r", encode(tiny, PROMPTS["one image"]), params)
    return drain(engine)["r"]


def test_max_tokens_and_usage(qwen2_vl: TinyModel) -> None:
    outputs = greedy_run(qwen2_vl, SamplingParams(max_tokens=5))
    prompt_tokens = encode(qwen2_vl, PROMPTS["one image"]).total_tokens
    assert [o.finish_reason for o in outputs] == [None] * 4 + ["length"]
    assert [o.completion_tokens for o in outputs] == [1, 2, 3, 4, 5]
    assert {o.prompt_tokens for o in outputs} == {prompt_tokens}


def test_text_is_the_detokenized_tokens(qwen2_vl: TinyModel) -> None:
    outputs = greedy_run(qwen2_vl, SamplingParams(max_tokens=20))
    decoded = qwen2_vl.language.tokenizer.decode(tokens(outputs), skip_special_tokens=True)
    assert text(outputs) == decoded


def test_stop_string_ends_the_text_before_it(qwen2_vl: TinyModel) -> None:
    full = text(greedy_run(qwen2_vl, SamplingParams(max_tokens=20)))
    start = next(i for i in range(3, len(full) - 3) if full[i:i + 3].strip() == full[i:i + 3])
    stop = full[start:start + 3]
    outputs = greedy_run(qwen2_vl, SamplingParams(max_tokens=20, stop=("never seen", stop)))
    assert text(outputs) == full[:full.index(stop)]
    assert outputs[-1].finish_reason == "stop"
    assert len(outputs) < 20


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
        Engine(qwen2_vl.language).begin("r", params, 10)


def test_request_bookkeeping_errors(qwen2_vl: TinyModel) -> None:
    engine = Engine(qwen2_vl.language)
    prompt = encode(qwen2_vl, PROMPTS["text only"])
    engine.add("r", prompt, GREEDY)
    with pytest.raises(ValueError, match="already"):
        engine.add("r", prompt, GREEDY)
    with pytest.raises(KeyError, match="not in the engine"):
        engine.extend("unknown", prompt)
    engine.begin("partial", GREEDY, prompt.total_tokens - 1)
    with pytest.raises(ValueError, match="more than"):
        engine.extend("partial", prompt)
