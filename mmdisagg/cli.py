"""The ``mmdisagg`` console script.

Each subcommand lives in its own module with ``configure(parser)`` and ``run(args) -> int``;
only the chosen one is imported, so ``mmdisagg --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from mmdisagg.config import SettingsError

COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("serve",): ("mmdisagg.serve.launcher", "all-in-one: router + encode + language servers"),
    ("demo",): ("mmdisagg.serve.demo", "start serve, ask about a picture, print, stop"),
    ("encode",): ("mmdisagg.encode.server", "an encode server (vision tower, sender)"),
    ("language",): ("mmdisagg.language.server", "a language server (receiver, decoder)"),
    ("router",): ("mmdisagg.router.app", "the OpenAI-compatible router"),
    ("make-tiny-model",): ("mmdisagg.models.tiny", "write a random-weight checkpoint to a folder"),
    ("bench", "pool"): ("mmdisagg.bench.pool", "scatter/gather speed of the embedding pool"),
    ("bench", "transfer"): ("mmdisagg.bench.transfer",
                            "data planes vs memcpy, sockets, zmq and safetensors"),
    ("bench", "serve"): ("mmdisagg.bench.serve",
                         "load generator against any OpenAI-compatible endpoint"),
    ("bench", "compare"): ("mmdisagg.bench.compare",
                           "disaggregated vs colocated vs transformers serve, same requests"),
    ("bench", "turn-bytes"): ("mmdisagg.bench.turn_bytes",
                              "embedding bytes and prefix-cache hits of each chat turn"),
    ("bench", "soak"): ("mmdisagg.bench.soak",
                        "mixed load with random faults: nothing lost or leaked, memory flat"),
    ("bench", "engine"): ("mmdisagg.bench.engine",
                          "language engine decode: tokens/s and aten ops per step, vs today "
                          "and generate()"),
    ("bench", "model-memory"): ("mmdisagg.bench.model_memory",
                                "resident memory of each model half vs the whole model"),
}


def _usage() -> str:
    lines = ["usage: mmdisagg COMMAND [options]", "", "commands:"]
    for words, (_, summary) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<22} {summary}")
    lines.append("")
    lines.append("Run 'mmdisagg COMMAND --help' for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words, (module_name, summary) in COMMANDS.items():
        if argv[: len(words)] == list(words):
            module = importlib.import_module(module_name)
            parser = argparse.ArgumentParser(prog="mmdisagg " + " ".join(words),
                                             description=summary)
            module.configure(parser)
            args = parser.parse_args(argv[len(words):])
            try:
                return int(module.run(args) or 0)
            except SettingsError as exc:
                print(f"mmdisagg: bad setting: {exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:
                return 130
    print(_usage(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
    return 0 if not argv or argv[0] in ("-h", "--help") else 2


if __name__ == "__main__":
    sys.exit(main())
