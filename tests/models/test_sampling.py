"""Top-k and top-p keep exactly the tokens they should."""

from __future__ import annotations

import math

import torch

from mmdisagg.core import SamplingParams
from mmdisagg.models.sampling import new_generator, sample

LOGITS = torch.tensor([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])


def drawn(params: SamplingParams, draws: int = 300) -> set[int]:
    generator = new_generator(0, torch.device("cpu"))
    return set(sample(LOGITS.expand(draws, -1), [params] * draws, [generator] * draws))


def test_top_k() -> None:
    assert drawn(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_it() -> None:
    assert drawn(SamplingParams(temperature=1.0, top_p=0.79)) == {0, 1}
    assert drawn(SamplingParams(temperature=1.0, top_p=0.81)) == {0, 1, 2}


def test_no_truncation_reaches_every_token() -> None:
    assert drawn(SamplingParams(temperature=1.0)) == {0, 1, 2, 3}


def test_greedy() -> None:
    assert drawn(SamplingParams(temperature=0.0), draws=3) == {0}
