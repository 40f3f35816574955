"""Synthetic request streams are the same for a seed, varied across images, and repeat images
only when asked; arrival schedules are seeded too."""

from __future__ import annotations

import base64
import io
import itertools
import math
import statistics

import av
import pytest
from PIL import Image

from mmdisagg.bench.load import arrival_offsets
from mmdisagg.bench.workload import Workload, build_requests, parse_range, parse_size


def image_urls(requests) -> list[str]:
    return [part["image_url"]["url"] for r in requests for part in r.messages[0]["content"]
            if part["type"] == "image_url"]


def test_same_seed_same_stream_other_seed_other_stream():
    workload = Workload(num_requests=4, images=(0, 2), image_sizes=((32, 24), (16, 16)),
                        prompt_words=5, seed=7)
    assert build_requests(workload) == build_requests(workload)
    other = build_requests(Workload(num_requests=4, images=(0, 2),
                                    image_sizes=((32, 24), (16, 16)), prompt_words=5, seed=8))
    assert other != build_requests(workload)


def test_requests_carry_the_asked_images_text_and_output_length():
    workload = Workload(num_requests=6, images=(1, 3), image_sizes=((40, 30),), prompt_words=4,
                        max_tokens=17, group="g")
    requests = build_requests(workload)
    for request in requests:
        parts = request.messages[0]["content"]
        images = [p for p in parts if p["type"] == "image_url"]
        assert 1 <= len(images) == request.num_images <= 3
        assert parts[-1]["type"] == "text" and len(parts[-1]["text"].split()) > 4
        assert (request.max_tokens, request.group) == (17, "g")
    url = image_urls(requests)[0]
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert (image.format, image.size) == ("JPEG", (40, 30))


def test_images_are_all_different_unless_repeats_are_asked():
    sizes = ((24, 24),)
    distinct = image_urls(build_requests(Workload(num_requests=10, images=(2, 2),
                                                  image_sizes=sizes)))
    assert len(set(distinct)) == 20
    repeated = image_urls(build_requests(Workload(num_requests=10, images=(2, 2),
                                                  image_sizes=sizes, repeat_images=1.0)))
    assert len(set(repeated)) == 1  # every image after the first repeats an earlier one


def test_videos_are_mp4s_of_the_asked_frames_and_size():
    requests = build_requests(Workload(num_requests=3, images=(1, 1), image_sizes=((24, 24),),
                                       videos=(1, 1), video_frames=6, video_size=(64, 48)))
    urls = [part["video_url"]["url"] for r in requests for part in r.messages[0]["content"]
            if part["type"] == "video_url"]
    assert len(set(urls)) == 3 and all(r.num_videos == 1 for r in requests)
    header, encoded = urls[0].split(",", 1)
    assert header == "data:video/mp4;base64"
    with av.open(io.BytesIO(base64.b64decode(encoded))) as container:
        stream = container.streams.video[0]
        assert (stream.frames, stream.average_rate, stream.width, stream.height) == (6, 2, 64, 48)


def test_parsers_and_validation():
    assert parse_size("1024x768") == (1024, 768)
    assert parse_range("3") == (3, 3) and parse_range("0-2") == (0, 2)
    for bad in ("1024", "0x5", "axb"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("2-1", "x", "-1"):
        with pytest.raises(ValueError):
            parse_range(bad)
    with pytest.raises(ValueError):
        Workload(repeat_images=1.5)


def test_poisson_arrivals_are_seeded_with_the_asked_mean_rate():
    offsets = arrival_offsets(2000, rate=4.0, burstiness=1.0, seed=3)
    assert offsets == arrival_offsets(2000, rate=4.0, burstiness=1.0, seed=3)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.1)
    assert statistics.stdev(gaps) == pytest.approx(0.25, rel=0.15)  # exponential: sd = mean


def test_burstier_arrivals_keep_the_rate_but_vary_more():
    bursty = arrival_offsets(2000, rate=4.0, burstiness=0.25, seed=3)
    gaps = [b - a for a, b in itertools.pairwise(bursty)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.15)
    assert statistics.stdev(gaps) > 1.5 * 0.25  # gamma(k): sd = mean / sqrt(k) = 2 x mean


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(3, rate=math.inf, burstiness=1.0, seed=0) == [0.0, 0.0, 0.0]
