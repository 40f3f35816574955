"""``mmdisagg bench engine``: the language engine's decode step — tokens/s and aten ops per
step — at several batch sizes, next to transformers' ``generate()`` on a padded batch and to
another checkout's engine ("today"); and requests/s with a KV cache a quarter of the load.

Decode is measured from a KV cache holding each sequence's ``--prompt-tokens`` keys and
values as they lie in fresh memory (zeros), not a real prefill: a decode step costs the same
whatever the values, and
prefilling 256 x 400 tokens would take most of the run on a CPU. Decode is timed twice: by
the wall clock and by the process's CPU time (with one torch thread, the step's own work
without the time other processes hold the cores; memory contention still counts).
``generate()`` does prefill (so it runs only where the batch's prompts total at most
``--generate-max-tokens``); its decode time is the median gap between its steps after the first.

The "today" column runs this same file with another checkout's interpreter and sources
(``--today-root``, e.g. /work/main): it then drives that checkout's per-sequence engine
(``Engine(half)``, ``add(id, prompt, params)``), detected by the absence of ``Engine.build``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mmdisagg.core import EncodedPrompt, SamplingParams
from mmdisagg.models.base import LanguageHalf
from mmdisagg.models.tiny import make_tiny_model

DEFAULT_CACHE = "~/.cache/mmdisagg/bench-models"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", nargs="+", default=["small", "medium"],
                        choices=("tiny", "small", "medium"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--prompt-tokens", type=int, default=400)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per point")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per point (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--today-root", default="",
                        help="another checkout (e.g. `git archive 41e1445`) whose engine is "
                             "the 'today' column, run by its .venv's python if it has one, else "
                             "by this one's; empty: no such column")
    parser.add_argument("--generate-max-tokens", type=int, default=8192,
                        help="largest batch x prompt tokens run through generate()")
    parser.add_argument("--load-requests", type=int, default=32,
                        help="requests of the quarter-sized-cache run (0: skip it)")
    parser.add_argument("--load-output-tokens", type=int, default=32)
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active (kernel launches, on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def checkpoint(size: str, cache_dir: str) -> Path:
    path = Path(cache_dir).expanduser() / f"qwen2_vl-{size}"
    if not (path / "config.json").is_file():
        make_tiny_model(path, "qwen2_vl", size=size)
    return path


def prompt_ids(tokenizer, tokens: int, seed: int) -> torch.Tensor:
    """Random ids of ordinary tokens (special ones, image placeholders among them, come last
    in these tokenizers)."""
    ordinary = len(tokenizer) - len(tokenizer.added_tokens_decoder)
    return torch.randint(0, ordinary, (tokens,), generator=torch.Generator().manual_seed(seed))


def prompt(half: LanguageHalf, tokens: int, seed: int) -> EncodedPrompt:
    """A text prompt of random token ids."""
    ids = prompt_ids(half.tokenizer, tokens, seed)
    steps = torch.arange(tokens)[:, None].expand(-1, 3)
    return EncodedPrompt(half.embed(ids), ids, steps.contiguous())


class PagedDriver:
    """This checkout's engine, its cache filled without a prefill."""

    def __init__(self, half: LanguageHalf, kv_tokens: int, max_running: int) -> None:
        from mmdisagg.config import EngineSettings
        from mmdisagg.language.engine import Engine
        from mmdisagg.models.kv_cache import PagedKVCache

        settings = EngineSettings()
        cache = PagedKVCache(half.kv_layout, -(-kv_tokens // settings.kv_block_size),
                             settings.kv_block_size, half.device)
        self.engine = Engine(half, cache, settings, max_running)

    def add_decoding(self, request_id: str, encoded: EncodedPrompt, params: SamplingParams) -> None:
        """A request whose prompt is already in the cache and one token generated."""
        from mmdisagg.language.request import Req, ReqStatus

        req = Req(request_id, params, encoded)
        self.engine.add(req)
        self.engine.waiting.remove(req)
        assert self.engine.blocks.allocate(req, req.num_tokens + 1)
        req.num_computed = req.num_tokens
        req.output_ids.append(int(encoded.token_ids[-1]))
        req.status = ReqStatus.RUNNING
        self.engine.running.append(req)

    def add(self, request_id: str, encoded: EncodedPrompt, params: SamplingParams) -> None:
        from mmdisagg.language.request import Req

        self.engine.add(Req(request_id, params, encoded))

    def step(self) -> list:
        return self.engine.step()

    def has_work(self) -> bool:
        return self.engine.has_work()

    @property
    def preemptions(self) -> int:
        return self.engine.preemptions


class TodayDriver:
    """The per-sequence engine of an older checkout (run from there with --worker)."""

    def __init__(self, half: LanguageHalf, kv_tokens: int, max_running: int) -> None:
        from mmdisagg.language.engine import Engine

        self.engine = Engine(half)
        self.preemptions = 0

    def add_decoding(self, request_id: str, encoded: EncodedPrompt, params: SamplingParams) -> None:
        self.engine.add(request_id, encoded, params)
        request = self.engine._requests[request_id]
        request.arrived.clear()
        request.cache.reserve(encoded.total_tokens)
        request.cache.advance(encoded.total_tokens)
        request.output_ids.append(int(encoded.token_ids[-1]))

    def add(self, request_id: str, encoded: EncodedPrompt, params: SamplingParams) -> None:
        self.engine.add(request_id, encoded, params)

    def step(self) -> list:
        return self.engine.step()

    def has_work(self) -> bool:
        return self.engine.has_work()


def driver_class():
    from mmdisagg.language.engine import Engine

    return PagedDriver if hasattr(Engine, "build") else TodayDriver


def decode_point(half: LanguageHalf, batch: int, args: argparse.Namespace) -> dict:
    """Decode tokens/s and aten ops per step of ``batch`` sequences of ``prompt_tokens``."""
    params = SamplingParams(max_tokens=10**6, ignore_eos=True)
    encoded = prompt(half, args.prompt_tokens, seed=batch)
    times, cpu_times = [], []
    ops = 0
    for run in range(args.repeat + 1):
        driver = driver_class()(half, batch * (args.prompt_tokens + args.steps + 64), batch)
        for row in range(batch):
            driver.add_decoding(str(row), encoded, params)
        driver.step()  # warm-up
        if run == 0:
            with OpCounter() as counter:
                driver.step()
            ops = sum(counter.ops.values())
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            driver.step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    seconds = sorted(times)[len(times) // 2]
    cpu_seconds = sorted(cpu_times)[len(cpu_times) // 2]
    return {"tokens_per_s": batch * args.steps / seconds, "ops_per_step": ops,
            "step_ms": seconds / args.steps * 1000,
            "cpu_tokens_per_s": batch * args.steps / cpu_seconds}


def load_point(half: LanguageHalf, kv_fraction: float, args: argparse.Namespace) -> dict:
    """Requests/s of ``load_requests`` requests (prompt + output) with a KV cache holding
    ``kv_fraction`` of all of them at once; prefill included."""
    params = SamplingParams(max_tokens=args.load_output_tokens, ignore_eos=True)
    load_tokens = args.load_requests * (args.prompt_tokens + args.load_output_tokens)
    driver = driver_class()(half, int(load_tokens * kv_fraction), args.load_requests)
    for row in range(args.load_requests):
        driver.add(str(row), prompt(half, args.prompt_tokens, seed=row), params)
    finished = failed = 0
    start = time.perf_counter()
    while driver.has_work():
        for output in driver.step():
            finished += output.finish_reason is not None
            failed += output.finish_reason == "error"
    seconds = time.perf_counter() - start
    return {"requests_per_s": args.load_requests / seconds, "finished": finished,
            "failed": failed, "preemptions": driver.preemptions}


class StepTimes:
    """A logits processor that only notes when ``generate()`` reaches each step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def generate_point(half: LanguageHalf, path: Path, batch: int,
                   args: argparse.Namespace) -> dict | None:
    """``generate()`` on a batch of equal-length prompts; decode time per step is the median
    gap between its steps after the first (which includes the prefill)."""
    if batch * args.prompt_tokens > args.generate_max_tokens:
        return None
    from transformers import AutoModelForImageTextToText, LogitsProcessorList

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    ids = prompt_ids(half.tokenizer, args.prompt_tokens, seed=batch).expand(batch, -1)
    steps = StepTimes()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                       max_new_tokens=2 + args.steps * args.repeat,
                       min_new_tokens=2 + args.steps * args.repeat, do_sample=False,
                       logits_processor=LogitsProcessorList([steps]))
    gaps = sorted(b - a for a, b in itertools.pairwise(steps.times[1:]))
    return {"tokens_per_s": batch / gaps[len(gaps) // 2]}


def measure(args: argparse.Namespace) -> dict:
    """What the "today" worker reports: {"decode": {size: {batch: point}}}."""
    torch.set_num_threads(args.threads)
    results: dict = {"decode": {}}
    for size in args.sizes:
        half = LanguageHalf.from_pretrained(checkpoint(size, args.cache_dir))
        results["decode"][size] = {str(batch): decode_point(half, batch, args)
                                   for batch in args.batches}
    return results


def today(args: argparse.Namespace) -> dict:
    """``measure`` run by the other checkout's interpreter, on its sources."""
    root = Path(args.today_root).resolve()
    python = root / ".venv" / "bin" / "python"
    argv = [str(python if python.is_file() else sys.executable), str(Path(__file__).resolve()),
            "--worker",
            "--sizes", *args.sizes, "--batches", *map(str, args.batches), "--prompt-tokens",
            str(args.prompt_tokens), "--steps", str(args.steps), "--repeat", str(args.repeat),
            "--threads", str(args.threads), "--cache-dir", args.cache_dir]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONSAFEPATH": "1"}
    output = subprocess.run(argv, cwd=root, env=env, check=True, stdout=subprocess.PIPE,
                            text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    """Each point measured for this checkout and then for "today", one after the other, so
    both see the same load on a shared machine."""
    from mmdisagg.bench.timing import print_table, save_json

    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    torch.set_num_threads(args.threads)
    ours: dict = {"decode": {}, "load": {}}
    theirs: dict | None = {"decode": {}} if args.today_root else None
    rows = []
    for size in args.sizes:
        path = checkpoint(size, args.cache_dir)
        half = LanguageHalf.from_pretrained(path)
        ours["decode"][size] = {}
        for batch in args.batches:
            point = ours["decode"][size][str(batch)] = decode_point(half, batch, args)
            row = {"model": size, "batch": batch, "tokens/s": point["tokens_per_s"],
                   "CPU tokens/s": point["cpu_tokens_per_s"], "ops/step": point["ops_per_step"]}
            if theirs is not None:
                one = argparse.Namespace(**{**vars(args), "sizes": [size], "batches": [batch]})
                old = today(one)["decode"][size][str(batch)]
                theirs["decode"].setdefault(size, {})[str(batch)] = old
                row |= {"today tokens/s": old["tokens_per_s"],
                        "today CPU tokens/s": old["cpu_tokens_per_s"],
                        "today ops/step": old["ops_per_step"],
                        "vs today": point["tokens_per_s"] / old["tokens_per_s"],
                        "vs today, CPU": point["cpu_tokens_per_s"] / old["cpu_tokens_per_s"]}
            generated = generate_point(half, path, batch, args)
            if generated is not None:
                row |= {"generate() tokens/s": generated["tokens_per_s"],
                        "vs generate()": point["tokens_per_s"] / generated["tokens_per_s"]}
            rows.append(row)
        if args.load_requests:
            ours["load"][size] = {str(fraction): load_point(half, fraction, args)
                                  for fraction in (1.0, 0.25)}
    columns = ["model", "batch", "tokens/s", "CPU tokens/s", "ops/step"]
    if theirs is not None:
        columns += ["today tokens/s", "today CPU tokens/s", "today ops/step", "vs today",
                    "vs today, CPU"]
    columns += ["generate() tokens/s", "vs generate()"]
    print_table(rows, columns)
    if args.load_requests:
        load_rows = [{"model": size, "KV cache": f"{fraction} of the load", **point}
                     for size in args.sizes
                     for fraction, point in ours["load"][size].items()]
        print()
        print_table(load_rows, ["model", "KV cache", "requests_per_s", "finished", "failed",
                                "preemptions"])
    save_json(args.json, {"ours": ours, "today": theirs, "table": rows, "argv": sys.argv})
    return 0


if __name__ == "__main__":  # the "today" worker, run from another checkout
    parser = argparse.ArgumentParser()
    configure(parser)
    sys.exit(run(parser.parse_args()))
