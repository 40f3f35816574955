"""The batched sampler: top-k and top-p keep exactly the tokens they should, greedy rows take
the argmax, and a row's draws depend on its seed and position only."""

from __future__ import annotations

import math

import torch

from mmdisagg.core import SamplingParams
from mmdisagg.language.request import Req
from mmdisagg.language.sampler import Sampler, SamplingBatch, exponential_noise

LOGITS = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])


def rows(params: SamplingParams, count: int, step: int = 0) -> list[Req]:
    """``count`` requests, each with its own seed, all at output position ``step``."""
    return [Req(str(seed), params, seed=seed, output_ids=[0] * step) for seed in range(count)]


def drawn(params: SamplingParams, draws: int = 300) -> set[int]:
    reqs = rows(params, draws)
    return set(Sampler()(LOGITS.expand(draws, -1), SamplingBatch.of(reqs, LOGITS.device)))


def test_top_k() -> None:
    assert drawn(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_it() -> None:
    assert drawn(SamplingParams(temperature=1.0, top_p=0.79)) == {0, 1}
    assert drawn(SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}


def test_no_truncation_reaches_every_token() -> None:
    assert drawn(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}


def test_greedy() -> None:
    assert drawn(SamplingParams(temperature=0.0), draws=3) == {0}


def test_draws_follow_the_distribution() -> None:
    """4000 rows of one step: frequencies within a few standard errors of the probabilities."""
    reqs = rows(SamplingParams(temperature=1.0), 4000)
    tokens = torch.tensor(Sampler()(LOGITS.expand(4000, -1), SamplingBatch.of(reqs, LOGITS.device)))
    frequencies = torch.bincount(tokens, minlength=4).float() / 4000
    assert torch.allclose(frequencies, LOGITS.exp(), atol=0.03)


def test_mixed_batch_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    reqs = [Req("a", SamplingParams()), Req("b", SamplingParams(temperature=1.0, top_k=1)),
            Req("c", SamplingParams())]
    assert Sampler()(logits, SamplingBatch.of(reqs, logits.device)) == [1, 0, 2]


def test_noise_depends_on_seed_and_step_only() -> None:
    seeds, steps = torch.tensor([7, 7, 8]), torch.tensor([3, 4, 3])
    noise = exponential_noise(seeds, steps, 1000)
    assert torch.equal(noise[0], exponential_noise(seeds[:1], steps[:1], 1000)[0])
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[0], noise[2])
    assert (noise > 0).all() and torch.isfinite(noise).all()
    assert abs(float(noise.mean()) - 1.0) < 0.1  # Exp(1)
