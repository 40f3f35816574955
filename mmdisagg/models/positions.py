"""M-RoPE positions of a prompt: three rows (time, height, width) per token."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mrope_positions(token_ids: torch.Tensor, image_token_id: int,
                    grids: Sequence[tuple[int, int, int]], merge_size: int
                    ) -> tuple[torch.Tensor, int]:
    """``[L, 3]`` positions and the ``mrope_delta`` of a non-empty prompt whose images (in
    order, with patch grids ``grids``) fill runs of ``image_token_id``.

    Text advances all three rows together. An image's tokens take their (t, h, w) coordinates
    in the merged grid, offset by where the image starts, and the text after it resumes at
    that start + max(h, w). Decoded tokens continue at ``tokens so far + mrope_delta``, where
    ``mrope_delta = max position + 1 - L`` (zero for text-only prompts).
    """
    is_image = (token_ids == image_token_id).tolist()
    sizes = [(t, h // merge_size, w // merge_size) for t, h, w in grids]
    if sum(is_image) != sum(t * h * w for t, h, w in sizes):
        raise ValueError(f"{sum(is_image)} image tokens in the prompt, but the image grids "
                         f"{list(grids)} need {sum(t * h * w for t, h, w in sizes)}")
    pieces: list[torch.Tensor] = []
    next_position = 0
    cursor = 0
    for t, h, w in sizes:
        start = is_image.index(True, cursor)
        pieces.append(_text_positions(start - cursor, next_position))
        next_position += start - cursor
        grid = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        pieces.append(torch.stack(grid).reshape(3, -1) + next_position)
        next_position += max(h, w)
        cursor = start + t * h * w
        if not all(is_image[start:cursor]):
            raise ValueError(f"the image starting at token {start} is not one run of image tokens")
    pieces.append(_text_positions(len(is_image) - cursor, next_position))
    positions = torch.cat(pieces, dim=1).T.contiguous()
    return positions, int(positions.max()) + 1 - len(is_image)


def _text_positions(length: int, start: int) -> torch.Tensor:
    return (torch.arange(length) + start).expand(3, length)
