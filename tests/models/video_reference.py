"""What transformers' own processor makes of prompts with videos: run in a venv that has
torchvision (the peer venv of mmdisagg/bench/peer_venv.py), never in mmdisagg's own.

    python video_reference.py cases.json OUT_DIR

``cases.json`` is a list of ``{"name", "family", "checkpoint", "text", "images": [png path],
"videos": [{"frames": npy path, "fps", "max_frames"}]}``; ``text`` is the chat-templated
prompt with one placeholder per image and video, the frames are every frame of the video
decoded (``[T, H, W, 3]`` uint8). For each case OUT_DIR/<name>.safetensors gets the
processor's output: input ids with the placeholders expanded (Qwen3-VL: with its timestamps),
pixel values, grids and, for Qwen2.5-VL, ``second_per_grid_ts``. Frames are sampled by the
processor (``do_sample_frames`` with the checkpoint's fps), as mmdisagg claims to do;
``max_frames`` is the processor's (Qwen3-VL's ``sample_frames`` reads only its own, so it is
set there).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    AutoVideoProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.video_utils import VideoMetadata

PROCESSORS = {"qwen2_vl": Qwen2VLProcessor, "qwen2_5_vl": Qwen2_5_VLProcessor,
              "qwen3_vl": Qwen3VLProcessor, "qwen3_vl_moe": Qwen3VLProcessor}


def run(case: dict, out_dir: Path) -> None:
    path = case["checkpoint"]
    video_processor = AutoVideoProcessor.from_pretrained(path)
    processor = PROCESSORS[case["family"]](
        image_processor=AutoImageProcessor.from_pretrained(path, backend="pil"),
        tokenizer=AutoTokenizer.from_pretrained(path), video_processor=video_processor)
    images = [Image.open(name).convert("RGB") for name in case["images"]]
    videos, metadata = [], []
    for video in case["videos"]:
        frames = np.load(video["frames"])
        videos.append(frames)
        metadata.append(VideoMetadata(total_num_frames=len(frames), fps=video["fps"],
                                      width=frames.shape[2], height=frames.shape[1],
                                      duration=len(frames) / video["fps"]))
    max_frames = {video["max_frames"] for video in case["videos"]}
    kwargs = {"max_frames": max_frames.pop()} if max_frames else {}
    if kwargs and case["family"].startswith("qwen3_vl"):
        video_processor.max_frames = min(video_processor.max_frames, kwargs["max_frames"])
    outputs = processor(text=[case["text"]], images=images or None, videos=videos or None,
                        video_metadata=metadata or None, do_sample_frames=True,
                        fps=video_processor.fps, return_tensors="pt", **kwargs)
    tensors = {key: torch.as_tensor(value).contiguous() for key, value in outputs.items()}
    save_file(tensors, str(out_dir / f"{case['name']}.safetensors"))


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    for case in cases:
        run(case, out_dir)


if __name__ == "__main__":
    main()
