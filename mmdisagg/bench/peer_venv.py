"""The separate virtual environment ``transformers serve`` runs from.

Its torch (and the torchvision the Qwen2-VL processor needs) must never enter mmdisagg's own
environment, so the peer gets a venv of its own, created on first use.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import transformers

DEFAULT_PATH = Path("~/.cache/mmdisagg/peer-venv")
PACKAGES = ("torch==2.14.1", "torchvision==0.29.1")


class PeerUnavailable(Exception):
    """The peer server cannot be set up or started; the message says why."""


def transformers_cli(venv: Path) -> Path:
    return venv / "bin" / "transformers"


def ensure_peer_venv(venv: Path) -> Path:
    """The ``transformers`` command of ``venv``, creating the venv first if it lacks one
    (several GB: torch, torchvision, the same transformers release as ours, its serving
    extra)."""
    venv = venv.expanduser()
    cli = transformers_cli(venv)
    if cli.is_file():
        return cli
    print(f"peer: creating {venv} for transformers serve ({', '.join(PACKAGES)}, "
          f"transformers[serving]=={transformers.__version__}); this takes minutes",
          file=sys.stderr, flush=True)
    steps = [[sys.executable, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--progress-bar", "off", *PACKAGES,
              f"transformers[serving]=={transformers.__version__}"]]
    for step in steps:
        print("peer: $ " + " ".join(step), file=sys.stderr, flush=True)
        try:
            result = subprocess.run(step, stdout=sys.stderr, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise PeerUnavailable(f"{step[0]}: {exc}") from None
        if result.returncode != 0:
            raise PeerUnavailable(f"'{' '.join(step[:3])} ...' exited with {result.returncode}")
    if not cli.is_file():
        raise PeerUnavailable(f"{cli} is missing after installing transformers[serving]")
    return cli
