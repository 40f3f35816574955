"""The servers ``bench compare`` measures, each started as its own process tree on a free port
and stopped after its scenarios: ``mmdisagg serve`` (disaggregated or ``--colocated``) and
``transformers serve`` from its own venv."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mmdisagg.bench.peer_venv import PeerUnavailable, ensure_peer_venv
from mmdisagg.serve.launcher import answers_health, free_port

HOST = "127.0.0.1"
STOP_GRACE_S = 20.0
# Every server under test computes on one thread (two shared cores); see docs/benchmarks.md.
MMDISAGG_FLAGS = ("--torch-threads", "1", "--log-level", "warning")


class ServerFailed(Exception):
    """A system under test could not be set up or started; the message says why."""


@dataclass(frozen=True)
class System:
    name: str
    description: str
    mmdisagg_flags: tuple[str, ...] = ()  # for ``mmdisagg serve``
    peer: bool = False  # ``transformers serve`` instead

    def command(self, model_path: Path, port: int, peer_venv: Path) -> list[str]:
        if self.peer:
            try:
                cli = ensure_peer_venv(peer_venv)
            except PeerUnavailable as exc:
                raise ServerFailed(f"no transformers serve: {exc}") from None
            return [str(cli), "serve", str(model_path), "--device",
                    "cpu", "--host", HOST, "--port", str(port), "--continuous-batching"]
        return [sys.executable, "-m", "mmdisagg.cli", "serve", "--model-path", str(model_path),
                "--host", HOST, "--port", str(port), *MMDISAGG_FLAGS, *self.mmdisagg_flags]

    def model(self, model_path: Path) -> str:
        """The model name requests carry: the path for ``transformers serve`` (it lists no
        local model); mmdisagg's own first listed model otherwise."""
        return str(model_path) if self.peer else ""


class RunningServer:
    """One system under test, up and answering /health; ``stop`` ends its whole tree."""

    def __init__(self, system: System, model_path: Path, peer_venv: Path, log_dir: Path,
                 startup_timeout_s: float) -> None:
        self.system = system
        self.port = free_port(HOST)
        self.base_url = f"http://{HOST}:{self.port}/v1"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{system.name}.log"
        command = system.command(model_path, self.port, peer_venv)
        self._log: IO[bytes] = self.log_path.open("wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if system.peer:  # its /v1/models scans the hub cache, which must at least exist
            hub = log_dir / "peer-hub-cache"
            hub.mkdir(exist_ok=True)
            env["HF_HUB_CACHE"] = str(hub)
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        try:
            self._wait_healthy(startup_timeout_s)
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not answers_health(f"http://{HOST}:{self.port}/health"):
            if self.process.poll() is not None:
                raise ServerFailed(f"{self.system.name} exited with code "
                                      f"{self.process.returncode} while starting; "
                                      f"last lines of {self.log_path}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.system.name} did not answer /health within "
                                      f"{timeout_s:g} s; see {self.log_path}")
            time.sleep(0.5)

    def log_tail(self, lines: int = 8) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM to its process group (``mmdisagg serve`` then stops its children), SIGKILL
        after a grace period."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
