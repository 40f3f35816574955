"""``mmdisagg serve`` run as a user runs it: one command, its secrets in the environment, its
output and its children's in one log file; the servers it started found through psutil."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from mmdisagg.serve.launcher import answers_health, free_port
from tests.conftest import SPAWNED

TOKEN = "tok-7c1e9a52-never-in-logs"
API_KEY = "key-3f8d04b6-never-in-logs"


class Served:
    def __init__(self, model: Path, log: Path, *flags: str, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log = log
        env = {**os.environ, "MMDISAGG_AUTH_TOKEN": TOKEN, "MMDISAGG_API_KEY": API_KEY}
        with log.open("ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mmdisagg.cli", "serve", "--model-path", str(model),
                 "--served-model-name", "tiny-model", "--port", str(self.port), "--host", host,
                 "--torch-threads", "1", *flags],
                env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
        SPAWNED.add(self.process.pid)
        deadline = time.monotonic() + 180
        while not answers_health(f"{self.url}/health"):
            assert self.process.poll() is None, f"serve exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "serve did not come up"
            time.sleep(0.2)
        SPAWNED.update(child.pid for child in self.processes()[1:])

    def processes(self) -> list[psutil.Process]:
        """The serve process and every server it started."""
        parent = psutil.Process(self.process.pid)
        return [parent, *parent.children(recursive=True)]

    def servers(self) -> dict[str, str]:
        """Role and index (encode-0, language-0, router) -> HTTP URL, from command lines."""
        found: dict[str, str] = {}
        for process in self.processes()[1:]:
            line = " ".join(process.cmdline())
            role = re.search(r"mmdisagg\.cli (\w+)", line).group(1)
            port = re.search(r"--port (\d+)", line).group(1)
            name = role if role == "router" else f"{role}-{sum(k.startswith(role) for k in found)}"
            found[name] = f"http://{self.host}:{port}"
        return found

    def stop(self) -> None:
        """SIGTERM, as a user stops it: serve stops every server it started."""
        children = []
        if self.process.poll() is None:
            children = self.processes()[1:]
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"serve stopped but left servers running: {alive}"
