"""``bench pool`` and ``bench transfer`` run end to end at small sizes, as a user runs them, and
report what they measured (the numbers themselves are for docs/benchmarks.md, not asserted)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path


def bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "mmdisagg.cli", "bench", *args, "--json", str(out)],
                   check=True, timeout=240, capture_output=True)
    return json.loads(out.read_text())


def measured(value: object) -> bool:
    return isinstance(value, float) and value > 0 and math.isfinite(value)


def test_bench_pool_reads_back_what_it_wrote(tmp_path: Path) -> None:
    result = bench(tmp_path, "pool", "--tokens", "140", "300", "--repeat", "3")
    assert [row["tokens"] for row in result["rows"]] == [140, 300]
    for row in result["rows"]:
        assert row["exact"] is True
        assert measured(row["scatter_GBps"]) and measured(row["gather_GBps"]), row


def test_bench_transfer_times_every_plane(tmp_path: Path) -> None:
    result = bench(tmp_path, "transfer", "--tokens", "140", "--repeat", "3",
                   "--backends", "shm", "tcp", "--resume-tokens", "1200")
    (row,) = result["rows"]
    for method in ("memcpy", "socket", "zmq", "safetensors", "shm", "tcp"):
        assert measured(row[f"{method}_ms"]), (method, row)
    assert [r["backend"] for r in result["resume"]] == ["shm", "tcp"]
    for resume in result["resume"]:
        assert measured(resume["resume_announced_ms"]), resume


def test_bench_transfer_refuses_a_resume_prompt_within_one_window() -> None:
    """A prompt that fits the first window would wait forever for a window it cannot get."""
    done = subprocess.run([sys.executable, "-m", "mmdisagg.cli", "bench", "transfer",
                           "--resume-tokens", "300"], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "longer than its first window (1024 tokens)" in done.stderr


def test_bench_transfer_deepstack_counts_the_rows_of_image_tokens_only(tmp_path: Path) -> None:
    result = bench(tmp_path, "transfer", "--deepstack-layers", "3", "--hidden-size", "64",
                   "--repeat", "3", "--backends", "shm", "tcp", "--resume-tokens", "1200")
    text = 64 * 2 + 4 + 12  # bfloat16 embedding, token id, 3 positions
    for row in result["rows"]:
        assert row["text_today_B_per_token"] == row["text_B_per_token"] == text, row
        assert row["image_B_per_token"] == text + 3 * 64 * 2, row
        assert measured(row["image_ms"]), row
    assert [row["backend"] for row in result["rows"]] == ["shm", "tcp"]
