"""Fixtures of the fault-injection suite: a checkpoint that takes large images (so vision work
and transfers last seconds), and one cluster of 2 encode servers and 1 language server over the
tcp data plane, with a ChunkProxy in front of the language server's data port."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mmdisagg.pool.layout import PoolLayout
from mmdisagg.serve.launcher import free_port
from tests.faults.harness import FaultCluster
from tests.faults.proxy import ChunkProxy
from tests.faults.served import Served
from tests.models.fixtures import png_bytes, tiny, tiny_checkpoints, tiny_models, video_bytes

__all__ = ["tiny", "tiny_checkpoints", "tiny_models"]

# The tiny checkpoint's image processor caps images at 224x224 (64 tokens). Raised to 2048x2048,
# one image is ~5,400 tokens and a few seconds of vision work on one CPU thread.
BIG_IMAGE_PIXELS = 2048 * 2048
MAX_MODEL_LEN = 16384
HIDDEN, DTYPE = 128, "float32"  # the tiny checkpoint's embeddings
MAX_REQUEST_BYTES = 16 << 20
MAX_VIDEO_SECONDS = 5
MAX_FRAME_PIXELS = 1_000_000  # of an image or a video frame


@pytest.fixture(scope="session")
def big_image_checkpoint(tiny_checkpoints, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("big-images") / "tiny-qwen2-vl"
    shutil.copytree(tiny_checkpoints["qwen2_vl"], path)
    config_file = path / "preprocessor_config.json"
    config = json.loads(config_file.read_text())
    config["size"]["longest_edge"] = BIG_IMAGE_PIXELS
    config_file.write_text(json.dumps(config))
    return path


FAULT_KNOBS = dict(
    encoders=2, language_servers=1, transfer_backend="tcp", torch_threads=1,
    max_model_len=MAX_MODEL_LEN, image_cache_bytes=0, prepared_image_cache_bytes=0,
    window_blocks=8, heartbeat_interval=0.5, heartbeat_timeout=3.0, transfer_timeout=10.0,
    prefix_cache=False)  # the faults hit the work (decoding, vision, transfer) a hit would skip


@pytest.fixture(scope="package")
def proxied(big_image_checkpoint):
    """(cluster, proxy): the proxy sits between both encode servers and the language server."""
    data_port = free_port("127.0.0.1")
    token_bytes = PoolLayout(1, 128, HIDDEN, DTYPE).token_bytes
    proxy = ChunkProxy(data_port, token_bytes)
    cluster = FaultCluster(big_image_checkpoint, data_port=data_port,
                           advertise_data_port=proxy.port, **FAULT_KNOBS)
    yield cluster, proxy
    proxy.close()
    cluster.close()


@pytest.fixture
def fault_cluster(proxied):
    """The proxied cluster, healthy and clean before the test and again after it (restarting
    whatever the test killed)."""
    cluster, proxy = proxied
    yield cluster, proxy
    proxy.release()
    for child in cluster.launcher.children:
        if child.process.poll() is not None:
            cluster.restart(child.name)
    cluster.wait_router_sees_all()
    cluster.assert_serving_and_clean()


@pytest.fixture(scope="package")
def media_dir(tmp_path_factory) -> Path:
    """The one folder file:// image URLs may read."""
    folder = tmp_path_factory.mktemp("media")
    (folder / "ok.png").write_bytes(png_bytes(40, 40))
    (folder / "ok.mp4").write_bytes(video_bytes(8, 64, 48))
    return folder


@pytest.fixture(scope="package")
def served(tiny_checkpoints, tmp_path_factory, media_dir):
    """``mmdisagg serve`` over tcp with an auth token and an API key in its environment,
    debug logs in a file, image fetches bounded to 2 s, videos to 5 s, frames to 1 Mpixel."""
    log = tmp_path_factory.mktemp("served") / "serve.log"
    served = Served(tiny_checkpoints["qwen2_vl"], log, "--transfer-backend", "tcp",
                    "--log-level", "debug", "--image-fetch-timeout", "2",
                    "--allowed-local-media-dirs", str(media_dir),
                    "--max-request-bytes", str(MAX_REQUEST_BYTES),
                    "--max-video-seconds", str(MAX_VIDEO_SECONDS),
                    "--max-image-pixels", str(MAX_FRAME_PIXELS))
    yield served
    served.stop()
