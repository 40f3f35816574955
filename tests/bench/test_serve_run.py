"""``mmdisagg bench serve`` against a real ``mmdisagg serve``: a few requests, valid results."""

from __future__ import annotations

import json

import pytest

from mmdisagg.cli import main
from tests.servers.cluster import Cluster

SUMMARY_KEYS = {"requests", "completed", "failed", "duration_s", "request_throughput",
                "output_throughput", "goodput", "mean_output_tokens", "ttft_ms", "tpot_ms",
                "itl_ms", "e2e_ms", "errors"}


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints):
    cluster = Cluster(tiny_checkpoints["qwen2_vl"], api_key="sesame", torch_threads=1)
    yield cluster
    cluster.close()


def test_a_short_run_writes_valid_json_and_plots(cluster, tmp_path, capsys):
    code = main(["bench", "serve", "--base-url", f"{cluster.url}/v1", "--api-key", "sesame",
                 "--num-requests", "3", "--images", "0-1", "--image-sizes", "64x48",
                 "--max-tokens", "4", "--warmup", "1", "--request-rate", "inf",
                 "--concurrency", "2", "--slo", "ttft=60000", "--out", str(tmp_path)])
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())  # strict: no NaN
    assert results["endpoint"]["model"] == cluster.model
    assert set(results["endpoint"]["extensions"]) == {"ignore_eos", "return_token_ids"}
    assert [run["label"] for run in results["runs"]] == ["rate inf/s", "concurrency 2"]
    for run in results["runs"]:
        summary = run["summary"]
        assert set(summary) == SUMMARY_KEYS
        assert (summary["requests"], summary["completed"], summary["errors"]) == (3, 3, {})
        assert summary["mean_output_tokens"] == 4  # ignore_eos holds the length
        assert summary["ttft_ms"]["count"] == 3 and summary["ttft_ms"]["p50"] > 0
        assert summary["itl_ms"]["count"] == 3 * 3  # one chunk per token
        assert summary["goodput"] == summary["request_throughput"] > 0
        assert set(run["groups"]) == {"main"}
    assert results["plots"] == [str(tmp_path / "latency_cdf.png")]  # one run per kind: no curve
    assert (tmp_path / "latency_cdf.png").read_bytes().startswith(b"\x89PNG")
    assert "| concurrency 2 | 3 | 0 |" in capsys.readouterr().out


def test_an_unreachable_endpoint_is_a_message_and_exit_code_1(capsys):
    code = main(["bench", "serve", "--base-url", "http://127.0.0.1:9/v1", "--warmup", "0"])
    assert code == 1
    assert "cannot reach http://127.0.0.1:9/v1" in capsys.readouterr().err


def test_a_wrong_api_key_or_model_is_named(cluster, capsys):
    assert main(["bench", "serve", "--base-url", f"{cluster.url}/v1", "--api-key", "wrong"]) == 1
    assert "refused the API key" in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", f"{cluster.url}/v1", "--api-key", "sesame",
                 "--model", "other"]) == 1
    assert "does not serve the model 'other'" in capsys.readouterr().err


def test_bad_flags_are_usage_errors(capsys):
    assert main(["bench", "serve", "--image-sizes", "big"]) == 2
    assert "'big' is not an image size" in capsys.readouterr().err
