"""``mmdisagg bench model-memory``: resident memory of each model half next to the whole model.

Each measurement runs in a fresh Python process: it imports everything, notes its resident set
size (RSS), loads one part of the checkpoint, and reports how much the RSS grew and by how much
it peaked, next to the bytes of the weights that part holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

PARTS = ("encoder", "language", "whole")
MIB = 1024 * 1024


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="qwen2_vl", choices=("qwen2_vl", "qwen2_5_vl"))
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"],
                        choices=("tiny", "small", "medium"))
    parser.add_argument("--checkpoint", type=Path,
                        help="measure this checkpoint folder instead of generated ones")


def run(args: argparse.Namespace) -> int:
    print("| checkpoint | part | weights MiB | RSS growth MiB | RSS peak growth MiB |")
    print("|---|---|---:|---:|---:|")
    if args.checkpoint:
        _report(args.checkpoint.name, args.checkpoint)
        return 0
    from mmdisagg.models.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as scratch:
        for size in args.sizes:
            path = make_tiny_model(Path(scratch) / size, args.family, size)
            _report(f"{args.family} {size}", path)
    return 0


def _report(label: str, path: Path) -> None:
    for part in PARTS:
        result = subprocess.run([sys.executable, "-m", __name__, part, str(path)],
                                check=True, capture_output=True, text=True)
        row = json.loads(result.stdout.splitlines()[-1])
        print(f"| {label} | {part} | {row['weights'] / MIB:.1f} | {row['growth'] / MIB:.1f} "
              f"| {row['peak_growth'] / MIB:.1f} |", flush=True)


def measure(part: str, path: str) -> dict[str, int]:
    """In this (fresh) process: load ``part`` of the checkpoint and see what it costs."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mmdisagg.models.base import EncoderHalf, LanguageHalf
    from mmdisagg.models.qwen2_vl import QwenVLEncoderHalf  # noqa: F401 (imports count as before)

    torch.set_num_threads(1)
    gc.collect()
    before = psutil.Process().memory_info().rss
    if part == "encoder":
        loaded = EncoderHalf.from_pretrained(path)
        weights = list(loaded.loaded_weights.values())
    elif part == "language":
        loaded = LanguageHalf.from_pretrained(path)
        weights = list(loaded.loaded_weights.values())
    else:
        loaded = AutoModelForImageTextToText.from_pretrained(path)
        weights = list(loaded.state_dict().values())
    for tensor in weights:  # NOTE: weights may be mapped from the file; reading makes them resident
        tensor.sum()
    gc.collect()
    after = psutil.Process().memory_info().rss
    distinct = {tensor.data_ptr(): tensor.nbytes for tensor in weights}
    return {"weights": sum(distinct.values()), "growth": after - before,
            "peak_growth": _peak_rss() - before}


def _peak_rss() -> int:
    """This process's high-water RSS (unlike ru_maxrss, not inherited from the parent)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (not Linux?)")


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
