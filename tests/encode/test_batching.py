"""Which prompts one encode step takes: text (and fully cached) prompts at once, and one
vision forward bounded in requests and in patches (none while one is running)."""

from __future__ import annotations

from collections import deque

import torch

from mmdisagg.encode.scheduler import take_batches
from mmdisagg.models.base import PreparedImage, PreparedPrompt
from mmdisagg.models.image_cache import ImageCache


def prompt(*patches: int, tag: str = "") -> PreparedPrompt:
    images = [PreparedImage(torch.zeros(n, 4), (1, 1, n), f"{tag}{i}", n // 4, placeholder_id=9)
              for i, n in enumerate(patches)]
    return PreparedPrompt(torch.zeros(10, dtype=torch.long), images, [0] * len(images))


def take(queue, cache=None, max_batch=16, max_patches=1000):
    return take_batches(queue, lambda p: p.images, cache, max_batch, max_patches)


def test_text_prompts_do_not_wait_behind_images():
    big, text, small = prompt(900, tag="big"), prompt(), prompt(50, tag="small")
    assert take(deque([big, text, small])) == ([text], [big, small])
    queue = deque([big, text, small])
    assert take(queue, max_patches=900) == ([text], [big]) and list(queue) == [small]


def test_while_a_vision_forward_runs_text_prompts_still_go():
    big, text = prompt(900, tag="big"), prompt()
    queue = deque([big, text])
    assert take(queue, max_batch=0) == ([text], []) and list(queue) == [big]


def test_one_oversized_prompt_still_goes_alone():
    huge, next_one = prompt(5000, tag="h"), prompt(10, tag="n")
    queue = deque([huge, next_one])
    assert take(queue, max_patches=1000) == ([], [huge])
    assert take(queue, max_patches=1000) == ([], [next_one])


def test_request_bound():
    queue = deque(prompt(1, tag=str(i)) for i in range(5))
    assert [len(b) for b in take(queue, max_batch=2)] == [0, 2]
    assert len(queue) == 3


def test_fully_cached_prompts_skip_the_vision_batch():
    cache = ImageCache(1 << 20)
    cached, fresh = prompt(300, tag="c"), prompt(300, tag="f")
    cache.put("c0", torch.zeros(75, 4))
    queue = deque([fresh, cached])
    assert take(queue, cache=cache, max_patches=100) == ([cached], [fresh])
