"""M-RoPE positions computed on the encode side."""

from __future__ import annotations

import pytest
import torch

from mmdisagg.models.positions import mrope_positions

IMAGE = 9


def test_image_between_text() -> None:
    # two text tokens, a 4x6-patch image (2x3 merged tokens), one text token
    token_ids = torch.tensor([1, 2] + [IMAGE] * 6 + [3])
    positions, delta = mrope_positions(token_ids, IMAGE, [(1, 4, 6)], merge_size=2)
    assert positions.T.tolist() == [
        [0, 1, 2, 2, 2, 2, 2, 2, 5],  # time
        [0, 1, 2, 2, 2, 3, 3, 3, 5],  # height
        [0, 1, 2, 3, 4, 2, 3, 4, 5],  # width
    ]
    assert delta == 6 - 9


def test_text_only() -> None:
    positions, delta = mrope_positions(torch.tensor([5, 6, 7]), IMAGE, [], merge_size=2)
    assert positions.tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]] and delta == 0


def test_two_images_each_start_after_the_previous() -> None:
    token_ids = torch.tensor([IMAGE] * 4 + [1] + [IMAGE])
    positions, delta = mrope_positions(token_ids, IMAGE, [(1, 4, 4), (1, 2, 2)], merge_size=2)
    assert positions[:, 0].tolist() == [0, 0, 0, 0, 2, 3]
    assert positions[:, 2].tolist() == [0, 1, 0, 1, 2, 3]
    assert delta == 4 - 6


@pytest.mark.parametrize("token_ids, grids", [
    ([IMAGE] * 3, [(1, 4, 4)]),  # too few image tokens for the grid
    ([IMAGE, IMAGE, 1, IMAGE, IMAGE], [(1, 4, 4)]),  # one image split in two runs
])
def test_mismatched_image_tokens(token_ids: list[int], grids: list[tuple[int, int, int]]) -> None:
    with pytest.raises(ValueError, match="image"):
        mrope_positions(torch.tensor(token_ids), IMAGE, grids, merge_size=2)
