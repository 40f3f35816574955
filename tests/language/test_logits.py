"""The whole-batch logits processors equal transformers' own logits processors row by row (each
row with its own parameters, in one batch), and logprobs are the log-softmax sampled from."""

from __future__ import annotations

import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from mmdisagg.language.logits import (
    Penalties,
    apply_logit_bias,
    apply_min_p,
    apply_penalties,
    forbid,
    logprobs,
    padded_ids,
    token_counts,
)

VOCAB = 50
PROMPTS = [[1, 2, 3, 3], [4], [5, 6, 7, 8, 9, 10]]
OUTPUTS = [[3, 11, 11, 12], [], [7, 7, 7]]


def random_logits(rows: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def penalties(repetition, presence, frequency) -> Penalties:
    return Penalties(torch.tensor(repetition), torch.tensor(presence), torch.tensor(frequency),
                     token_counts(padded_ids(PROMPTS, torch.device("cpu")), VOCAB) > 0,
                     token_counts(padded_ids(OUTPUTS, torch.device("cpu")), VOCAB))


def test_token_counts_are_per_row_bincounts():
    counts = token_counts(padded_ids(OUTPUTS, torch.device("cpu")), VOCAB)
    for row, output in enumerate(OUTPUTS):
        assert counts[row].tolist() == torch.bincount(torch.tensor(output, dtype=torch.long),
                                                      minlength=VOCAB).tolist()


def test_repetition_penalty_equals_transformers_per_row():
    logits = random_logits()
    repetition = [1.3, 1.0, 0.7]
    ours = apply_penalties(logits, penalties(repetition, [0.0] * 3, [0.0] * 3))
    for row, penalty in enumerate(repetition):
        ids = torch.tensor([PROMPTS[row] + OUTPUTS[row]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[row:row + 1].clone())
        torch.testing.assert_close(ours[row], expected[0], rtol=0, atol=0)


def test_presence_and_frequency_penalties_follow_openai():
    logits = random_logits()
    presence, frequency = [0.5, 2.0, -1.0], [0.25, 0.0, 1.5]
    ours = apply_penalties(logits, penalties([1.0] * 3, presence, frequency))
    for row in range(len(PROMPTS)):
        expected = logits[row].clone()
        for token in set(OUTPUTS[row]):  # the prompt does not count
            expected[token] -= frequency[row] * OUTPUTS[row].count(token) + presence[row]
        torch.testing.assert_close(ours[row], expected)


def test_min_p_equals_transformers_per_row():
    logits = random_logits()
    min_p = [0.0, 0.05, 0.3]
    ours = apply_min_p(logits, torch.tensor(min_p))
    for row, value in enumerate(min_p):
        expected = (MinPLogitsWarper(value)(None, logits[row:row + 1].clone())
                    if value else logits[row:row + 1])
        assert torch.equal(ours[row], expected[0])


def test_min_tokens_forbids_stop_tokens_like_transformers():
    logits = random_logits()
    eos = [7, 9]
    # Row 1 has generated enough: only rows 0 and 2 are listed.
    ours = forbid(logits, torch.tensor([0, 0, 2, 2]), torch.tensor(eos * 2))
    expected = MinNewTokensLengthLogitsProcessor(0, 5, eos)(torch.zeros(1, 2, dtype=torch.long),
                                                            logits.clone())
    assert torch.equal(ours[[0, 2]], expected[[0, 2]]) and torch.equal(ours[1], logits[1])


def test_logit_bias_equals_transformers_sequence_bias():
    logits = random_logits()
    ours = apply_logit_bias(logits, torch.tensor([0, 0, 2]), torch.tensor([5, 6, 5]),
                            torch.tensor([10.0, -100.0, 3.5]))
    expected_0 = SequenceBiasLogitsProcessor([[[5], 10.0], [[6], -100.0]])(
        torch.zeros(1, 1, dtype=torch.long), logits[:1].clone())
    torch.testing.assert_close(ours[0], expected_0[0])
    assert torch.equal(ours[1], logits[1])
    assert ours[2, 5] == logits[2, 5] + 3.5


def test_logprobs_are_the_log_softmax_of_the_distribution_sampled_from():
    logits = apply_min_p(random_logits(), torch.tensor([0.0, 0.2, 0.0]))
    tokens = logits.argmax(dim=-1)
    result = logprobs(logits, tokens, k=3)
    expected = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(result.chosen, expected.gather(1, tokens[:, None])[:, 0])
    torch.testing.assert_close(result.top, expected.topk(3, dim=-1).values)
    assert torch.equal(result.top_ids[:, 0], tokens)
    assert logprobs(logits, tokens, k=0).top.shape == (3, 0)
