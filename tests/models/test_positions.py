"""M-RoPE positions computed on the encode side."""

from __future__ import annotations

import pytest
import torch

from mmdisagg.models.positions import Span, mrope_positions

IMAGE = 9
VIDEO = 10


def spans(grids: list[tuple[int, int, int]]) -> list[Span]:
    return [Span(IMAGE, grid) for grid in grids]


def test_image_between_text() -> None:
    # two text tokens, a 4x6-patch image (2x3 merged tokens), one text token
    token_ids = torch.tensor([1, 2] + [IMAGE] * 6 + [3])
    positions, delta = mrope_positions(token_ids, spans([(1, 4, 6)]), merge_size=2)
    assert positions.T.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],  # time
        [0, 1, 2, 2, 2, 3, 3, 3, 5],  # height
        [0, 1, 2, 3, 4, 2, 3, 4, 5],  # width
    ]
    assert delta == 6 - 9


def test_text_only() -> None:
    positions, delta = mrope_positions(torch.tensor([5, 6, 7]), [], merge_size=2)
    assert positions.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]] and delta == 0


def test_two_images_each_start_after_the_previous() -> None:
    token_ids = torch.tensor([IMAGE] * 4 + [1] + [IMAGE])
    positions, delta = mrope_positions(token_ids, spans([(1, 4, 4), (1, 2, 2)]), merge_size=2)
    assert positions[:, 0].tolist() == [0, 0, 0, 0, 2, 3]
    assert positions[:, 2].tolist() == [0, 1, 0, 1, 2, 3]
    assert delta == 4 - 6


@pytest.mark.parametrize("token_ids, grids", [
    ([IMAGE] * 3, [(1, 4, 4)]),  # too few image tokens for the grid
    ([IMAGE, IMAGE, 1, IMAGE, IMAGE], [(1, 4, 4)]),  # one image split in two runs
])
def test_mismatched_image_tokens(token_ids: list[int], grids: list[tuple[int, int, int]]) -> None:
    with pytest.raises(ValueError, match="image"):
        mrope_positions(torch.tensor(token_ids), spans(grids), merge_size=2)


def test_video_time_advances_per_temporal_patch() -> None:
    # a video of 3 temporal patches of 2x2 patches (one merged token each), then text
    token_ids = torch.tensor([1] + [VIDEO] * 3 + [2])
    positions, delta = mrope_positions(token_ids, [Span(VIDEO, (3, 2, 2))], merge_size=2)
    assert positions.T.tolist() == [[0, 1, 2, 3, 2], [0, 1, 1, 1, 2], [0, 1, 1, 1, 2]]
    assert delta == 2 + 1 - 5


def test_video_time_step_spaces_patches_by_their_timestamps() -> None:
    """Qwen2.5-VL: tokens_per_second * seconds per temporal patch, truncated (float32)."""
    token_ids = torch.tensor([VIDEO] * 4 + [1])
    positions, delta = mrope_positions(token_ids, [Span(VIDEO, (4, 2, 2), time_step=2.5)],
                                       merge_size=2)
    assert positions[:, 0].tolist() == [0, 2, 5, 7, 1]  # 0, 2.5, 5, 7.5 truncated; text: 0 + 1
    assert delta == 2 - 5  # one past the last token (at 1), not past the timestamps (7)


def test_image_and_video_each_fill_their_own_placeholder() -> None:
    token_ids = torch.tensor([VIDEO] * 2 + [1] + [IMAGE])
    visuals = [Span(VIDEO, (2, 2, 2)), Span(IMAGE, (1, 2, 2))]
    positions, _ = mrope_positions(token_ids, visuals, merge_size=2)
    assert positions[:, 0].tolist() == [0, 1, 1, 2]  # the text resumes at 0 + max(h, w)
    with pytest.raises(ValueError, match="not one run of its placeholder"):
        mrope_positions(token_ids, visuals[::-1], merge_size=2)
