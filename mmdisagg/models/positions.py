"""M-RoPE positions of a prompt: three rows (time, height, width) per token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch


class Visual(Protocol):
    """An image or video as positions see it (``PreparedImage`` is one)."""

    placeholder_id: int
    grid_thw: tuple[int, int, int]
    time_step: float


class Span(NamedTuple):
    """A ``Visual`` given by hand."""

    placeholder_id: int
    grid_thw: tuple[int, int, int]
    time_step: float = 1.0


def mrope_positions(token_ids: torch.Tensor, visuals: Sequence[Visual], merge_size: int
                    ) -> tuple[torch.Tensor, int]:
    """``[L, 3]`` positions and the ``mrope_delta`` of a non-empty prompt whose images and
    videos (``visuals``, in prompt order, with patch grids) each fill one run of its
    placeholder token.

    Text advances all three rows together. A visual's tokens take their (t, h, w) coordinates
    in the merged grid, offset by where it starts; time advances ``time_step`` per temporal
    patch (truncated to an integer, in float32 as transformers computes it: Qwen2.5-VL spaces
    video frames by their timestamps). The text after it resumes at that start + max(h, w).
    Decoded tokens continue at ``tokens so far + mrope_delta``, where
    ``mrope_delta = the last token's position + 1 - L`` (zero for text-only prompts).

    NOTE: transformers' ``generate()`` continues one past the last prompt token's position. For
    images that is also max position + 1; a Qwen2.5-VL video's timestamps can run past the text
    after it, and then only the last token's position gives generate()'s tokens.
    """
    ids = token_ids.tolist()
    placeholders = {visual.placeholder_id for visual in visuals}
    is_visual = [token in placeholders for token in ids]
    sizes = [(t, h // merge_size, w // merge_size) for t, h, w in
             (visual.grid_thw for visual in visuals)]
    if sum(is_visual) != sum(t * h * w for t, h, w in sizes):
        raise ValueError(f"{sum(is_visual)} image/video tokens in the prompt, but the grids "
                         f"{[visual.grid_thw for visual in visuals]} need "
                         f"{sum(t * h * w for t, h, w in sizes)}")
    pieces: list[torch.Tensor] = []
    next_position = 0
    cursor = 0
    for visual, (t, h, w) in zip(visuals, sizes, strict=True):
        start = is_visual.index(True, cursor)
        pieces.append(_text_positions(start - cursor, next_position))
        next_position += start - cursor
        times = (torch.arange(t) * torch.tensor(visual.time_step, dtype=torch.float32)).long()
        grid = torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack(grid).reshape(3, -1) + next_position)
        next_position += max(h, w)
        cursor = start + t * h * w
        if ids[start:cursor] != [visual.placeholder_id] * (t * h * w):
            raise ValueError(f"the image or video starting at token {start} is not one run of "
                             "its placeholder token")
    pieces.append(_text_positions(len(ids) - cursor, next_position))
    positions = torch.cat(pieces, dim=1).T.contiguous()
    return positions, int(positions[-1].max()) + 1 - len(ids)


def _text_positions(length: int, start: int) -> torch.Tensor:
    return (torch.arange(length) + start).expand(3, length)
