"""The sampler with the OpenAI fields: adjustments reach greedy rows too and leave other rows
alone, a row's draws do not depend on its neighbours, and logprobs describe the distribution
each row was drawn from."""

from __future__ import annotations

import torch

from mmdisagg.core import SamplingParams
from mmdisagg.language.request import Req
from mmdisagg.language.sampler import Sampler, SamplingBatch

VOCAB = 12
EOS = frozenset({11})


def logits_for(rows: int) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(1)) * 2


def sample(reqs, logits):
    return Sampler().sample(logits, SamplingBatch.of(reqs, logits.device, VOCAB, EOS))


def test_bias_and_min_tokens_apply_to_greedy_rows_only_where_asked():
    logits = logits_for(3)
    logits[:, 11] = 50.0  # EOS would win everywhere
    reqs = [Req("bias", SamplingParams(logit_bias=((3, 100.0),))),
            Req("min", SamplingParams(min_tokens=2), output_ids=[5]),
            Req("plain", SamplingParams())]
    assert sample(reqs, logits).tokens[0] == 3
    assert sample(reqs, logits).tokens[1] == int(logits[1, :11].argmax())
    assert sample(reqs, logits).tokens[2] == 11
    reqs[1].output_ids.append(6)  # two tokens out: EOS allowed again
    assert sample(reqs, logits).tokens[1] == 11


def test_a_penalized_seeded_row_draws_the_same_alone_or_in_a_batch():
    params = SamplingParams(temperature=1.0, seed=9, presence_penalty=1.5,
                            repetition_penalty=1.2)
    alone = sample([Req("a", params, seed=9, output_ids=[1, 2])], logits_for(1)).tokens
    mixed = [Req("x", SamplingParams(), output_ids=[4]),
             Req("a", params, seed=9, output_ids=[1, 2]),
             Req("y", SamplingParams(temperature=1.0, min_p=0.3), seed=3)]
    logits = torch.cat([logits_for(2)[1:], logits_for(1), logits_for(1)])
    assert sample(mixed, logits).tokens[1] == alone[0]


def test_logprobs_are_of_the_distribution_drawn_from():
    logits = logits_for(2)
    reqs = [Req("greedy", SamplingParams(logprobs=3)),
            Req("hot", SamplingParams(temperature=0.5, top_k=4, logprobs=2), seed=1),
            Req("none", SamplingParams())]
    logits = torch.cat([logits, logits_for(1)])
    result = sample(reqs, logits)
    greedy, hot, none = result.logprobs
    assert none is None and len(hot[1]) == 2 and len(greedy[1]) == 3
    expected = torch.log_softmax(logits[0], dim=-1)
    assert abs(greedy[0] - float(expected.max())) < 1e-6
    scaled = logits[1] / 0.5
    kept = scaled.topk(4).values[-1]
    drawn_from = torch.log_softmax(scaled.masked_fill(scaled < kept, float("-inf")), dim=-1)
    assert abs(hot[0] - float(drawn_from[result.tokens[1]])) < 1e-5
    assert [t for t, _ in hot[1]] == drawn_from.topk(2).indices.tolist()


def test_min_p_keeps_tokens_at_least_that_share_of_the_most_likely():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(300, -1)
    reqs = [Req(str(seed), SamplingParams(temperature=1.0, min_p=0.4), seed=seed)
            for seed in range(300)]
    assert set(Sampler()(logits, SamplingBatch.of(reqs, logits.device, 4))) == {0, 1}


def test_impossible_tokens_are_no_alternatives():
    """A row that allows two tokens reports at most two, never a -inf (not JSON)."""
    logits = logits_for(1)
    req = Req("r", SamplingParams(logprobs=5, logit_bias=tuple((t, -float("inf"))
                                                               for t in range(2, VOCAB))))
    token_logprob, top = sample([req], logits).logprobs[0]
    assert len(top) == 2 and all(value > float("-inf") for _, value in top)
    assert token_logprob > float("-inf")
