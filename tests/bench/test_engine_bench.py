"""``bench engine`` end to end at a tiny size, its "today" column run from another checkout
(this one): decode measured, aten ops per step flat in the batch, the quarter-sized KV cache
run finishing every request."""

from __future__ import annotations

from pathlib import Path

from tests.bench.test_micro import bench, measured

ROOT = Path(__file__).resolve().parents[2]


def test_bench_engine(tmp_path: Path) -> None:
    result = bench(tmp_path, "engine", "--sizes", "tiny", "--batches", "1", "8",
                   "--prompt-tokens", "40", "--steps", "2", "--repeat", "1",
                   "--load-requests", "6", "--load-output-tokens", "8",
                   "--generate-max-tokens", "40", "--cache-dir", str(tmp_path / "models"),
                   "--today-root", str(ROOT))
    decode = result["ours"]["decode"]["tiny"]
    for point in decode.values():
        assert measured(point["tokens_per_s"]) and point["ops_per_step"] > 0, point
        assert measured(point["cpu_tokens_per_s"]), point
    assert decode["8"]["ops_per_step"] - decode["1"]["ops_per_step"] <= 8, decode
    assert result["today"]["decode"]["tiny"]["1"]["ops_per_step"] > 0
    for fraction, load in result["ours"]["load"]["tiny"].items():
        assert load["finished"] == 6 and load["failed"] == 0, (fraction, load)
    first, second = result["table"]
    assert "generate() tokens/s" in first and "generate() tokens/s" not in second
